//! What every association task shares: the ingest pipeline, the negotiation policy, the node's
//! settings, what the query/retrieve services need, access control and admission.

use std::sync::Arc;

use super::qr::Services;
use super::rejections::Rejections;
use crate::archive::ingest::Pipeline;
use crate::config::NodeConfig;
use crate::dimse::admission::Admission;
use crate::dimse::negotiate::Policy;

/// What every association task shares.
pub struct NodeContext {
    pub pipeline: Pipeline,
    pub policy: Policy,
    pub node: NodeConfig,
    /// What C-FIND, C-MOVE and C-GET need (ledger, store, peers, event spool).
    pub services: Services,
    /// Who may associate and ask for what (changed at run time by grants and revocations).
    pub acl: Arc<crate::acl::LiveAcl>,
    /// The pending pool and the association slots.
    pub admission: Admission,
    /// Rejected associations, summed up per source for the audit trail.
    pub rejections: Rejections,
    /// Warnings about connections that misbehave before an association: one per source a
    /// minute, with how many were held back.
    pub warnings: crate::ops::throttle::Warnings,
}
