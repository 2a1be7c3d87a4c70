//! Running the node: the admin HTTP API and its throttle, Prometheus metrics, syslog export of
//! security events, and readiness notification to systemd.

pub mod admin;
pub mod http;
pub mod metrics;
pub mod notify;
pub mod syslog;
pub mod throttle;
pub mod trail;
