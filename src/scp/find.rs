//! C-FIND as SCP: the query runs on a blocking thread (RocksDB reads) and every match streams
//! out as a pending response (PS3.4 C.4.1).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use tokio::sync::mpsc;
use tracing::info;

use super::qr::{message, Outgoing, Request, Services, DATA_SET_PRESENT};
use crate::dimse::command::{field, tag, NO_DATA_SET};
use crate::dimse::status;
use crate::query::{self, matching, FindError, FindOptions};

/// C-FIND on a blocking thread (RocksDB reads): each match is a pending response.
pub fn run_find(
    services: &Services,
    req: &Request,
    q: &matching::Query,
    opts: &FindOptions,
    cancel: &AtomicBool,
    out: &mpsc::Sender<Outgoing>,
) {
    let started = Instant::now();
    let mut sent = 0usize;
    let result = query::run(
        &services.ledger,
        q,
        opts,
        req.encoding,
        cancel,
        |identifier| {
            if cancel.load(Ordering::Relaxed) {
                return false;
            }
            sent += 1;
            let command = req
                .response(field::C_FIND_RSP)
                .u16(tag::COMMAND_DATA_SET_TYPE, DATA_SET_PRESENT)
                .u16(tag::STATUS, status::PENDING)
                .encode();
            out.blocking_send(message(req.context_id, command, Some(identifier), false))
                .is_ok()
        },
    );
    let (code, comment) = match &result {
        Ok(_) if cancel.load(Ordering::Relaxed) => (status::CANCEL, None),
        Ok(_) => (status::SUCCESS, None),
        Err(FindError::Cancelled) => (status::CANCEL, None),
        Err(e) => {
            let f = super::status::find_error(e);
            (f.status, Some(f.comment))
        }
    };
    info!(
        level = q.level.name(),
        matches = sent,
        status = format!("{code:04X}"),
        ms = started.elapsed().as_millis() as u64,
        "C-FIND answered"
    );
    let mut rsp = req
        .response(field::C_FIND_RSP)
        .u16(tag::COMMAND_DATA_SET_TYPE, NO_DATA_SET)
        .u16(tag::STATUS, code);
    if let Some(c) = comment {
        rsp = rsp.text(tag::ERROR_COMMENT, &c, status::ERROR_COMMENT_MAX);
    }
    let _ = out.blocking_send(message(req.context_id, rsp.encode(), None, true));
}
