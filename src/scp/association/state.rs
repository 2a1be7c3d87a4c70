//! An association's state: what it is doing between two PDUs (reading a command, a data set, an
//! identifier; running an operation), and the association itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use dicom_ul::pdu::AbortRQServiceProviderReason;
use tokio::sync::mpsc;

use crate::acl::Permission;
use crate::archive::ingest::{Incoming, StoreContext};
use crate::dimse::admission::Slot;
use crate::dimse::command::Command;
use crate::dimse::connection::{ConnError, Connection, Received};
use crate::dimse::negotiate::Negotiated;
use crate::dimse::status::{self, Failure};
use crate::ledger::trail::AuditRecord;
use crate::scp::context::NodeContext;
use crate::scp::qr::Outgoing;

/// Most bytes of command fragments we collect for one command set.
pub(super) const MAX_COMMAND_BYTES: usize = 64 * 1024;
/// Most bytes of a C-FIND identifier.
pub(super) const MAX_IDENTIFIER_BYTES: usize = 1024 * 1024;
/// Messages a running operation may have ready before the association sends them.
pub(super) const OP_QUEUE: usize = 16;
/// While an operation runs, the requestor may stay silent as long as it takes.
pub(super) const OP_WAIT: Duration = Duration::from_secs(24 * 3600);

pub(super) enum State {
    /// Between messages.
    Idle,
    /// Collecting command fragments.
    Command { context_id: u8, bytes: Vec<u8> },
    /// Receiving the data set of a C-STORE.
    Store(Box<StoreInProgress>),
    /// Reading and dropping a data set we will answer with a failure.
    Discard { context_id: u8, reply: Reply },
    /// Collecting the identifier of a C-FIND, C-MOVE or C-GET.
    Identifier(Box<IdentifierRequest>),
    /// A C-FIND, C-MOVE or C-GET running beside the association (see [`qr`]).
    Running(Box<Running>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Operation {
    Find,
    Move { destination: String },
    Get,
}

impl Operation {
    pub(super) fn permission(&self) -> Permission {
        match self {
            Operation::Find => Permission::Find,
            Operation::Move { .. } => Permission::Move,
            Operation::Get => Permission::Get,
        }
    }

    pub(super) fn name(&self) -> &'static str {
        match self {
            Operation::Find => "C-FIND",
            Operation::Move { .. } => "C-MOVE",
            Operation::Get => "C-GET",
        }
    }
}

pub(super) struct Running {
    /// The audit record written when the final response goes out (status and count filled in),
    /// or, if the operation ends without one, when this is dropped.
    pub(super) audit: Option<AuditRecord>,
    pub(super) ledger: crate::ledger::Ledger,
    /// Pending responses sent so far (C-FIND matches).
    pub(super) pending: u64,
    pub(super) context_id: u8,
    pub(super) message_id: u16,
    /// The response command field, for a failure if the task ends without its final response.
    pub(super) response_field: u16,
    pub(super) sop_class_uid: String,
    pub(super) out: mpsc::Receiver<Outgoing>,
    /// C-GET: the requestor's C-STORE responses go back to the task.
    pub(super) replies: Option<mpsc::Sender<Command>>,
    pub(super) cancel: Arc<AtomicBool>,
}

impl Drop for Running {
    /// However the association ends (release, abort, drain timeout), the operation stops, and
    /// it is on the audit trail even without its final response.
    fn drop(&mut self) {
        self.cancel.store(true, Ordering::Relaxed);
        if let Some(mut audit) = self.audit.take() {
            audit.status = status::UNABLE_TO_PROCESS;
            audit.count = self.pending;
            audit.detail = format!(
                "{}: ended before its final response (association aborted, closed or shut down; {} pending responses sent)",
                audit.detail, self.pending
            );
            self.ledger.audit(audit);
        }
    }
}

/// What woke the association loop.
pub(super) enum Next {
    Pdu(Result<Received, ConnError>),
    Out(Option<Outgoing>),
    Shutdown,
    /// Admission ended it while idle to make room (see `admission::Admission::admit`).
    Reclaimed,
}

/// A response to send once a discarded data set has been read.
pub(super) struct Reply {
    pub(super) command_field: u16,
    pub(super) message_id: u16,
    pub(super) sop_class_uid: String,
    pub(super) sop_instance_uid: String,
    pub(super) failure: Failure,
}

/// Ends the association with an A-ABORT.
pub(super) struct Abort(pub(super) AbortRQServiceProviderReason, pub(super) String);

pub(super) struct Association {
    pub(super) conn: Connection,
    pub(super) ctx: Arc<NodeContext>,
    /// Its place under the association caps: told whether it is idle, and may be reclaimed.
    pub(super) slot: Slot,
    /// The peer's address, for the audit trail.
    pub(super) peer: String,
    pub(super) negotiated: Negotiated,
    pub(super) state: State,
    pub(super) stored: u64,
    pub(super) failed: u64,
}

pub(super) struct IdentifierRequest {
    pub(super) operation: Operation,
    pub(super) context_id: u8,
    pub(super) message_id: u16,
    pub(super) sop_class_uid: String,
    pub(super) bytes: Vec<u8>,
}

pub(super) struct StoreInProgress {
    pub(super) started: std::time::Instant,
    pub(super) context_id: u8,
    pub(super) message_id: u16,
    pub(super) context: StoreContext,
    pub(super) incoming: Option<Incoming>,
    pub(super) failure: Option<Failure>,
}
