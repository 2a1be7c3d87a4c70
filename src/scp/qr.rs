//! What the Query/Retrieve services share: the SOP classes, the [`Services`] they run on, the
//! [`Request`] they answer and the [`Outgoing`] messages they hand the association loop.
//!
//! Each operation runs as a task beside its association: C-FIND in [`super::find`], C-MOVE and
//! C-GET in [`super::retrieve_ops`] over the sub-operation driver of [`super::suboperations`].
//! The loop sends what they hand it, routes C-CANCEL to the shared flag and, for C-GET, the
//! requestor's C-STORE responses back to the task.

use std::path::PathBuf;
use std::sync::Arc;

use crate::archive::outbound::{Outbound, Requester};
use crate::config::PeerConfig;
use crate::dimse::command::{tag, CommandBuilder};
use crate::ledger::Ledger;
use crate::query::matching;
use crate::split::Encoding;
use crate::store::Store;

/// Command Data Set Type for "a data set follows" (any value but 0x0101, PS3.7 §E.2).
pub(super) const DATA_SET_PRESENT: u16 = 0x0001;

use crate::dicom::uids::{PATIENT_ROOT_GET, PATIENT_ROOT_MOVE, STUDY_ROOT_GET, STUDY_ROOT_MOVE};

/// The information model of a MOVE or GET SOP class.
pub fn retrieve_model(sop_class: &str) -> Option<matching::Model> {
    match sop_class {
        PATIENT_ROOT_MOVE | PATIENT_ROOT_GET => Some(matching::Model::PatientRoot),
        STUDY_ROOT_MOVE | STUDY_ROOT_GET => Some(matching::Model::StudyRoot),
        _ => None,
    }
}

/// What an operation asks the association loop to send.
pub enum Outgoing {
    /// A command with its whole data set, if any. `last`: the final response, the operation is
    /// over.
    Message {
        context_id: u8,
        command: Vec<u8>,
        data: Option<Vec<u8>>,
        last: bool,
    },
    /// A command whose data set follows in [`Outgoing::Data`] pieces (a streamed instance).
    Command { context_id: u8, command: Vec<u8> },
    /// A piece of a data set; `last` ends it.
    Data {
        context_id: u8,
        bytes: Vec<u8>,
        last: bool,
    },
    /// End the association with an A-ABORT: a streamed instance failed its check after part of
    /// it was sent, and only an abort keeps the requestor from completing it.
    Abort(String),
}

pub(super) fn message(
    context_id: u8,
    command: Vec<u8>,
    data: Option<Vec<u8>>,
    last: bool,
) -> Outgoing {
    Outgoing::Message {
        context_id,
        command,
        data,
        last,
    }
}

/// What the C-FIND, C-MOVE and C-GET tasks need from the node.
#[derive(Clone)]
pub struct Services {
    pub ledger: Ledger,
    pub store: Store,
    pub ae_title: String,
    pub max_pdu_length: u32,
    pub peers: Vec<PeerConfig>,
    pub event_spool: PathBuf,
    /// Instances larger than this stream: sent while they are read from the object store, the
    /// end held back until the whole data set has passed its check
    /// (`node.max_retrieve_buffer_bytes`).
    pub stream_above: u64,
    /// Access rules, checked again before every sub-operation (a revocation stops a retrieval
    /// in progress).
    pub acl: Arc<crate::acl::LiveAcl>,
}

impl Services {
    /// What sending checked instances needs of these services.
    pub fn outbound(&self) -> Outbound {
        Outbound {
            ledger: self.ledger.clone(),
            store: self.store.clone(),
            event_spool: self.event_spool.clone(),
            stream_above: self.stream_above,
            ae_title: self.ae_title.clone(),
            max_pdu_length: self.max_pdu_length,
        }
    }
}

impl From<Services> for Outbound {
    fn from(services: Services) -> Outbound {
        services.outbound()
    }
}

/// The request a retrieval answers.
pub struct Request {
    pub context_id: u8,
    pub message_id: u16,
    pub sop_class_uid: String,
    /// Encoding of the request's context, for the identifier of the final response.
    pub encoding: Encoding,
    pub calling_ae: String,
    /// The requesting association's peer address.
    pub peer: String,
}

impl Request {
    /// The association that sent this request, as `detector` names it in a security event.
    pub(super) fn requester(&self, detector: &'static str) -> Requester {
        Requester {
            detector,
            calling_ae: self.calling_ae.clone(),
            peer: self.peer.clone(),
        }
    }

    /// A response to this request: its SOP class, `command_field` and message ID.
    pub(super) fn response(&self, command_field: u16) -> CommandBuilder {
        CommandBuilder::new()
            .uid(tag::AFFECTED_SOP_CLASS_UID, &self.sop_class_uid)
            .u16(tag::COMMAND_FIELD, command_field)
            .u16(tag::MESSAGE_ID_BEING_RESPONDED_TO, self.message_id)
    }
}
