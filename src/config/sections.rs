//! One struct per section of the configuration file, with its defaults and the values derived
//! from it (durations, addresses, the memory budget's shares).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::error::{invalid, optional_addr, ConfigError};

/// `[security]`: encryption at rest of the pixel objects.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityConfig {
    /// The node master key (32 random bytes as 64 hex digits); created with mode 0600 on first
    /// start. Every pixel object is sealed under a key derived from it: keep a backup apart from
    /// the object store, or nothing stored can be read again.
    #[serde(default = "default_master_key_file")]
    pub master_key_file: PathBuf,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        SecurityConfig {
            master_key_file: default_master_key_file(),
        }
    }
}

fn default_master_key_file() -> PathBuf {
    "var/master.key".into()
}

/// `[audit]`: where else the audit trail goes, besides the ledger.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// A syslog collector (host:port, UDP) that gets every ledger entry as an RFC 5424 message
    /// with its DICOM audit event ID; empty = none.
    #[serde(default)]
    pub syslog: String,
}

impl AuditConfig {
    pub fn syslog_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        optional_addr(
            &self.syslog,
            "audit.syslog",
            "must be ADDRESS:PORT (UDP), e.g. 10.0.0.9:514",
        )
    }
}

/// `[admin]`: the node's HTTP listener for operators: `GET /metrics` (Prometheus),
/// `GET /health`, and the admin API under `/v1/` (bearer token). Keep it on loopback or a
/// management network.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address and port, e.g. "127.0.0.1:8787"; empty = no admin listener.
    #[serde(default)]
    pub listen: String,
    /// The admin API's bearer token; created (mode 0600) on first start. The CLI reads it.
    #[serde(default = "default_admin_token_file")]
    pub token_file: PathBuf,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: String::new(),
            token_file: default_admin_token_file(),
        }
    }
}

fn default_admin_token_file() -> PathBuf {
    "var/admin-token".into()
}

impl AdminConfig {
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        optional_addr(
            &self.listen,
            "admin.listen",
            "must be ADDRESS:PORT, e.g. 127.0.0.1:8787",
        )
    }
}

/// `[[forward]]`: one routing rule. An empty condition list matches anything; a rule matches
/// when every non-empty list contains the instance's value.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ForwardRule {
    /// The destination: a `[peers.NAME]` name.
    pub destination: String,
    /// Calling AE titles of the sending association (e.g. the modalities).
    #[serde(default)]
    pub calling_ae: Vec<String>,
    /// Called AE titles the sender used (when several AE titles route to this node).
    #[serde(default)]
    pub called_ae: Vec<String>,
    /// Modality (0008,0060) values, e.g. "CT", "MR" (compared ignoring case).
    #[serde(default)]
    pub modality: Vec<String>,
    /// SOP Class UIDs.
    #[serde(default)]
    pub sop_class: Vec<String>,
}

/// `[forwarding]`: how queued instances are sent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardingConfig {
    /// Times an instance is offered to a destination that answers with a failure status (or
    /// aborts on it) before it is given up; `dicomchain forward retry` re-queues given-up items.
    /// A destination that cannot be reached at all is retried without limit.
    #[serde(default = "default_forward_attempts")]
    pub max_attempts: u32,
    /// First wait before a retry, in milliseconds; doubled after each failure.
    #[serde(default = "default_forward_retry_initial")]
    pub retry_initial_ms: u64,
    /// Longest wait between retries, in seconds.
    #[serde(default = "default_forward_retry_max")]
    pub retry_max_secs: u64,
    /// Seconds an idle association to a destination stays open before it is released.
    #[serde(default = "default_forward_idle")]
    pub idle_release_secs: u64,
    /// Nice value (0-19) of the forwarding threads: forwarding uses the CPU that ingest leaves,
    /// so that modalities are acknowledged as fast as without it. 0 = same priority as ingest.
    #[serde(default = "default_forward_niceness")]
    pub niceness: i32,
    /// Forwarding waits while instances are being received, for at most this many seconds in a
    /// row; then it runs alongside ingest until its queue is empty. 0 = never wait.
    #[serde(default = "default_forward_yield")]
    pub yield_to_ingest_secs: u64,
}

impl Default for ForwardingConfig {
    fn default() -> Self {
        ForwardingConfig {
            max_attempts: default_forward_attempts(),
            retry_initial_ms: default_forward_retry_initial(),
            retry_max_secs: default_forward_retry_max(),
            idle_release_secs: default_forward_idle(),
            niceness: default_forward_niceness(),
            yield_to_ingest_secs: default_forward_yield(),
        }
    }
}

fn default_forward_attempts() -> u32 {
    5
}
fn default_forward_retry_initial() -> u64 {
    1000
}
fn default_forward_retry_max() -> u64 {
    60
}
fn default_forward_idle() -> u64 {
    5
}
fn default_forward_niceness() -> i32 {
    10
}
fn default_forward_yield() -> u64 {
    30
}

/// `[node]`: the DICOM listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// Our AE title; the called AE title of every association must equal it (see `check_called_ae`).
    #[serde(default = "default_ae_title")]
    pub ae_title: String,
    /// Address and port of the plain (unencrypted) DICOM listener; empty = none, for a node
    /// that speaks DICOM over TLS only (then `[node.tls] listen` is required).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Most associations served at once; a further association request is answered with
    /// A-ASSOCIATE-RJ (rejected-transient, local limit exceeded) so that the peer retries later.
    /// A connection counts only once its A-ASSOCIATE-RQ has been accepted; before that it is
    /// pending (see `max_pending_connections`).
    #[serde(default = "default_max_associations")]
    pub max_associations: usize,
    /// Most associations of one calling AE title at once (default: half of `max_associations`),
    /// so that one peer — or whoever uses its title — cannot hold every slot.
    #[serde(default)]
    pub max_associations_per_ae: Option<usize>,
    /// Most associations from one source address at once (default: three quarters of
    /// `max_associations`).
    #[serde(default)]
    pub max_associations_per_ip: Option<usize>,
    /// With `allow_unknown_peers`: most associations of all unknown calling AE titles together
    /// (default: half of `max_associations`); the rest stays for the configured peers.
    #[serde(default)]
    pub max_unknown_associations: Option<usize>,
    /// Most connections that have not yet sent an accepted A-ASSOCIATE-RQ (TLS handshake
    /// included). When full, the oldest pending connection of the source with the most of them
    /// is closed to make room: a source that connects and stays silent only evicts its own.
    #[serde(default = "default_max_pending_connections")]
    pub max_pending_connections: usize,
    /// Most pending connections from one source address (beyond it, that source's oldest
    /// pending connection is closed).
    #[serde(default = "default_max_pending_per_ip")]
    pub max_pending_per_ip: usize,
    /// New connections per second from one source address (a burst of twice as many is
    /// allowed); a connection over the rate is closed at once. 0 = no limit.
    #[serde(default = "default_max_connection_rate_per_ip")]
    pub max_connection_rate_per_ip: u32,
    /// An association idle (between messages, nothing running) this many seconds may be ended
    /// with A-ABORT when a request over one of the caps above needs its place: the one idle
    /// longest among those the cap counts, and a known peer's only for a known peer's request.
    /// Holding associations open and silent then keeps no one out. 0 = never.
    #[serde(default = "default_reclaim_idle_secs")]
    pub reclaim_idle_secs: u64,
    /// The maximum PDU length we announce. Strict: a larger PDU from a peer aborts the association.
    #[serde(default = "default_max_pdu_length")]
    pub max_pdu_length: u32,
    /// Refuse associations whose called AE title is not `ae_title`.
    #[serde(default = "default_true")]
    pub check_called_ae: bool,
    /// Seconds to wait for the next PDU before aborting an idle association.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// Seconds a single PDU read or write may take before the association is aborted.
    #[serde(default = "default_io_timeout")]
    pub io_timeout_secs: u64,
    /// ARTIM (PS3.8 §9.1.5): seconds a new connection may take, in all, to finish its TLS
    /// handshake and send its whole A-ASSOCIATE-RQ before it is closed (a peer trickling bytes
    /// gets no more time). Peers send their request within milliseconds of connecting.
    #[serde(default = "default_artim_timeout")]
    pub artim_timeout_secs: u64,
    /// Most bytes of incoming data sets held in memory across all associations at once, every
    /// copy counted: each data set's metadata three times (its buffer, the ledger's write batch,
    /// the memtable's copy), pixel data an S3 upload has not sent yet, and the ledger's own part
    /// (its memtables, 64 MiB, and two copies of the largest record; see `ingest_budget`). A
    /// C-STORE that cannot get its share within `io_timeout_secs` fails with A700; the
    /// association stays usable.
    #[serde(default = "default_max_bytes_in_flight")]
    pub max_bytes_in_flight: usize,
    /// On SIGINT/SIGTERM, seconds to let in-flight operations finish before aborting them.
    #[serde(default = "default_drain_timeout")]
    pub drain_timeout_secs: u64,
    /// Most bytes of one data set kept in memory: everything except the pixel data, which streams
    /// to the object store. A larger data set is refused with A700 (Error Comment naming this
    /// key) and the association stays usable. It is also the per-association cap: an association
    /// receives one data set at a time, so it holds at most three times this (see
    /// `max_bytes_in_flight`) plus S3 parts not yet sent.
    #[serde(default = "default_max_metadata")]
    pub max_metadata_bytes: usize,
    /// Most matches one C-FIND answers; a query with more ends with A700 after that many, with
    /// an Error Comment asking to narrow it.
    #[serde(default = "default_max_find_results")]
    pub max_find_results: usize,
    /// C-FIND matches Person Names ignoring case. The standard's matching is exact (PS3.4
    /// C.2.2.2.1); many viewers expect otherwise.
    #[serde(default)]
    pub find_case_insensitive_names: bool,
    /// C-MOVE/C-GET: the largest instance rebuilt and checked in memory before it is sent.
    /// Larger ones stream: sent while they are read from the object store, their last fragment
    /// held back until the whole data set has passed its check (a failed check aborts the
    /// association, so the peer never completes the instance).
    #[serde(default = "default_max_retrieve_buffer")]
    pub max_retrieve_buffer_bytes: u64,
    /// Log lines as text (default) or as one JSON object per line (for log shippers).
    #[serde(default)]
    pub log_format: LogFormat,
    /// Accept associations from calling AE titles that are not a `[peers.NAME]` (they may then
    /// do everything). Off by default: unknown AEs get A-ASSOCIATE-RJ.
    #[serde(default)]
    pub allow_unknown_peers: bool,
    /// `[node.tls]`: an optional second listener speaking DICOM over TLS.
    #[serde(default)]
    pub tls: TlsConfig,
}

/// `[node.tls]`: DICOM over TLS (PS3.15 B.1 / BCP 195) on its own port, beside the plain one.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Address and port of the TLS listener; empty = no TLS listener.
    #[serde(default)]
    pub listen: String,
    /// PEM file with our certificate chain (leaf first).
    #[serde(default)]
    pub cert: PathBuf,
    /// PEM file with the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub key: PathBuf,
    /// PEM file with the CA certificates that sign client certificates. When set, every client
    /// must present a certificate chaining to one of them (mutual TLS); empty = no client
    /// certificate asked for.
    #[serde(default)]
    pub client_ca: PathBuf,
}

impl TlsConfig {
    /// The TLS listener's address, if one is configured.
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        optional_addr(
            &self.listen,
            "node.tls.listen",
            "must be ADDRESS:PORT, e.g. 0.0.0.0:2762",
        )
    }
}

/// How `serve` writes its log (to stderr).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[ledger]`: the RocksDB ledger.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerConfig {
    /// RocksDB directory.
    #[serde(default = "default_ledger_path")]
    pub path: PathBuf,
    /// The Ed25519 key that signs checkpoints; created (mode 0600) on first start.
    #[serde(default = "default_signing_key_file")]
    pub signing_key_file: PathBuf,
    /// The log's identity: the origin line of every checkpoint and the signing key's name.
    #[serde(default = "default_origin")]
    pub origin: String,
    /// Seconds between signed checkpoints at most (one is signed only when the tree grew).
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval: u64,
    /// Directory where `export` leaves security events (integrity failures) for the node to
    /// record on the ledger; it must be writable by whoever runs `export`.
    #[serde(default = "default_event_spool")]
    pub event_spool: PathBuf,
}

/// Which object store backend holds the pixel data.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// Embedded default: a local directory.
    Fs,
    /// MinIO or any S3-compatible server.
    S3,
}

/// `[store]`: the object store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    #[serde(default = "default_backend")]
    pub backend: StoreBackend,
    /// Seconds any single object store operation may take before the C-STORE fails with A700.
    #[serde(default = "default_store_timeout")]
    pub timeout_secs: u64,
    #[serde(default)]
    pub fs: FsStoreConfig,
    #[serde(default)]
    pub s3: S3StoreConfig,
}

/// `[store.fs]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsStoreConfig {
    /// Directory that holds the pixel objects.
    #[serde(default = "default_fs_root")]
    pub root: PathBuf,
}

/// `[store.s3]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3StoreConfig {
    /// Base URL of the S3 server, `http://` or `https://`.
    #[serde(default = "default_s3_endpoint")]
    pub endpoint: String,
    #[serde(default = "default_s3_bucket")]
    pub bucket: String,
    #[serde(default = "default_s3_region")]
    pub region: String,
    /// Access key; or give `access_key_file`.
    #[serde(default)]
    pub access_key: String,
    #[serde(default)]
    pub access_key_file: Option<PathBuf>,
    /// Secret key; or give `secret_key_file`.
    #[serde(default)]
    pub secret_key: String,
    #[serde(default)]
    pub secret_key_file: Option<PathBuf>,
    /// Values larger than this go up as S3 multipart uploads of this part size (≥ 5 MiB).
    #[serde(default = "default_part_size")]
    pub part_size: u64,
    /// Times a request that failed in a way that may pass (unreachable server, broken
    /// connection, 5xx, SlowDown) is sent again, after 200 ms doubling, all within
    /// `store.timeout_secs`.
    #[serde(default = "default_s3_retries")]
    pub retries: u32,
}

/// `[peers.NAME]`: a known application entity.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    pub ae_title: String,
    pub host: String,
    pub port: u16,
    /// What this AE may ask for (`echo`, `store`, `find`, `move` — which also lets it receive
    /// C-MOVE sub-operations —, `get`); absent = all of them.
    #[serde(default)]
    pub permissions: Option<Vec<crate::acl::Permission>>,
    /// Addresses or CIDR networks this AE may connect from; empty = any.
    #[serde(default)]
    pub allowed_addresses: Vec<String>,
    /// This AE title may associate only over DICOM TLS (`[node.tls]`); a plain association
    /// with it is rejected.
    #[serde(default)]
    pub tls_required: bool,
    /// Client certificate names that may use this AE title: one of the certificate's DNS
    /// subject alternative names (or its subject CN, if it has no DNS SAN) must equal one of
    /// them (mutual TLS,
    /// `[node.tls] client_ca`). Non-empty implies `tls_required`. Empty = any certificate the
    /// client CA signed.
    #[serde(default)]
    pub tls_names: Vec<String>,
}

fn default_ae_title() -> String {
    "DICOMCHAIN".into()
}
fn default_listen() -> String {
    "0.0.0.0:11112".into()
}
fn default_max_associations() -> usize {
    64
}
fn default_max_pending_connections() -> usize {
    128
}
fn default_max_pending_per_ip() -> usize {
    16
}
fn default_max_connection_rate_per_ip() -> u32 {
    100
}
fn default_reclaim_idle_secs() -> u64 {
    30
}
fn default_max_pdu_length() -> u32 {
    65536
}
fn default_true() -> bool {
    true
}
fn default_idle_timeout() -> u64 {
    300
}
fn default_io_timeout() -> u64 {
    60
}
fn default_drain_timeout() -> u64 {
    30
}
fn default_artim_timeout() -> u64 {
    10
}
fn default_max_bytes_in_flight() -> usize {
    1024 * 1024 * 1024
}
fn default_max_metadata() -> usize {
    64 * 1024 * 1024
}
fn default_max_retrieve_buffer() -> u64 {
    64 * 1024 * 1024
}
fn default_max_find_results() -> usize {
    10_000
}
fn default_ledger_path() -> PathBuf {
    "var/ledger".into()
}
fn default_signing_key_file() -> PathBuf {
    "var/ledger-signing.key".into()
}
fn default_origin() -> String {
    "dicomchain/ledger".into()
}
fn default_checkpoint_interval() -> u64 {
    10
}
fn default_event_spool() -> PathBuf {
    "var/ledger-events".into()
}
fn default_backend() -> StoreBackend {
    StoreBackend::Fs
}
fn default_store_timeout() -> u64 {
    30
}
fn default_fs_root() -> PathBuf {
    "var/objects".into()
}
fn default_s3_endpoint() -> String {
    "http://127.0.0.1:9000".into()
}
fn default_s3_bucket() -> String {
    "dicomchain".into()
}
fn default_s3_region() -> String {
    "us-east-1".into()
}
fn default_s3_retries() -> u32 {
    3
}
fn default_part_size() -> u64 {
    16 * 1024 * 1024
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            ae_title: default_ae_title(),
            listen: default_listen(),
            max_associations: default_max_associations(),
            max_associations_per_ae: None,
            max_associations_per_ip: None,
            max_unknown_associations: None,
            max_pending_connections: default_max_pending_connections(),
            max_pending_per_ip: default_max_pending_per_ip(),
            max_connection_rate_per_ip: default_max_connection_rate_per_ip(),
            reclaim_idle_secs: default_reclaim_idle_secs(),
            max_pdu_length: default_max_pdu_length(),
            check_called_ae: true,
            idle_timeout_secs: default_idle_timeout(),
            io_timeout_secs: default_io_timeout(),
            drain_timeout_secs: default_drain_timeout(),
            artim_timeout_secs: default_artim_timeout(),
            max_bytes_in_flight: default_max_bytes_in_flight(),
            max_metadata_bytes: default_max_metadata(),
            max_find_results: default_max_find_results(),
            find_case_insensitive_names: false,
            max_retrieve_buffer_bytes: default_max_retrieve_buffer(),
            log_format: LogFormat::Text,
            allow_unknown_peers: false,
            tls: TlsConfig::default(),
        }
    }
}
impl Default for LedgerConfig {
    fn default() -> Self {
        LedgerConfig {
            path: default_ledger_path(),
            signing_key_file: default_signing_key_file(),
            origin: default_origin(),
            checkpoint_interval: default_checkpoint_interval(),
            event_spool: default_event_spool(),
        }
    }
}
impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            backend: default_backend(),
            timeout_secs: default_store_timeout(),
            fs: FsStoreConfig::default(),
            s3: S3StoreConfig::default(),
        }
    }
}
impl Default for FsStoreConfig {
    fn default() -> Self {
        FsStoreConfig {
            root: default_fs_root(),
        }
    }
}
impl Default for S3StoreConfig {
    fn default() -> Self {
        S3StoreConfig {
            endpoint: default_s3_endpoint(),
            bucket: default_s3_bucket(),
            region: default_s3_region(),
            access_key: String::new(),
            access_key_file: None,
            secret_key: String::new(),
            secret_key_file: None,
            part_size: default_part_size(),
            retries: default_s3_retries(),
        }
    }
}

impl StoreConfig {
    /// Bound on any single object store operation.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

impl NodeConfig {
    /// The most a data set's metadata buffer can hold: the limit is checked per PDU.
    pub(super) fn largest_metadata(&self) -> usize {
        self.max_metadata_bytes + self.max_pdu_length as usize
    }

    /// The ledger's part of `max_bytes_in_flight`: what it keeps after a C-STORE has ended
    /// (memtables not yet flushed, the write that took them past their bound, a large record a
    /// compaction moves).
    pub fn ledger_memory(&self) -> usize {
        crate::memory::MEMTABLE_BYTES
            + crate::memory::RECORD_COPIES_AFTER_STORE * self.largest_metadata()
    }

    /// The part of `max_bytes_in_flight` the data sets being received share.
    pub fn ingest_budget(&self) -> usize {
        self.max_bytes_in_flight
            .saturating_sub(self.ledger_memory())
    }

    /// The plain listener's address; `None` when it is off (`listen = ""`).
    pub fn listen_addr(&self) -> Result<Option<SocketAddr>, ConfigError> {
        if self.listen.is_empty() {
            return Ok(None);
        }
        self.listen.parse().map(Some).map_err(|e| {
            invalid(
                "node.listen",
                format!("`{}` is not an address:port ({e})", self.listen),
            )
        })
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
    pub fn io_timeout(&self) -> Duration {
        Duration::from_secs(self.io_timeout_secs)
    }
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }
    pub fn artim_timeout(&self) -> Duration {
        Duration::from_secs(self.artim_timeout_secs)
    }
}

impl S3StoreConfig {
    /// The access key, from the value or from `access_key_file` (trailing newline trimmed).
    pub fn resolved_access_key(&self) -> Result<String, ConfigError> {
        resolve_secret(
            "store.s3.access_key",
            &self.access_key,
            self.access_key_file.as_deref(),
        )
    }
    /// The secret key, from the value or from `secret_key_file` (trailing newline trimmed).
    pub fn resolved_secret_key(&self) -> Result<String, ConfigError> {
        resolve_secret(
            "store.s3.secret_key",
            &self.secret_key,
            self.secret_key_file.as_deref(),
        )
    }
}

fn resolve_secret(key: &str, value: &str, file: Option<&Path>) -> Result<String, ConfigError> {
    match file {
        Some(path) => std::fs::read_to_string(path)
            .map(|s| s.trim_end_matches(['\r', '\n']).to_string())
            .map_err(|source| ConfigError::SecretFile {
                key: format!("{key}_file"),
                path: path.to_path_buf(),
                source,
            }),
        None => Ok(value.to_string()),
    }
}
