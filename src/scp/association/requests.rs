//! The requests an association dispatches: each command checked against the presentation context
//! and the calling AE's permissions, then answered (C-ECHO), fed to ingest (C-STORE), or started as
//! an operation that runs beside the association (C-FIND, C-MOVE, C-GET) and whose responses it
//! sends.

use super::state::*;
use super::*;
use crate::dicom::uids;

/// 0124 for an operation the calling AE may not ask for.
fn not_authorized(operation: &str) -> Failure {
    Failure::new(
        status::NOT_AUTHORIZED,
        format!("{operation} is not permitted to this calling AE title"),
    )
}

impl Association {
    pub(super) async fn dispatch(&mut self, context_id: u8, cmd: Command) -> Result<(), Abort> {
        let bad = |e: crate::dimse::command::CommandError| {
            Abort(
                AbortRQServiceProviderReason::InvalidPduParameter,
                e.to_string(),
            )
        };
        let command_field = cmd.command_field().map_err(bad)?;
        if command_field == field::C_CANCEL_RQ {
            // Nothing of ours is cancellable yet (C-STORE is not).
            return Ok(());
        }
        let message_id = cmd.message_id().map_err(bad)?;
        let has_data = cmd.has_data_set().map_err(bad)?;
        let sop_class_uid = cmd.string(tag::AFFECTED_SOP_CLASS_UID).unwrap_or_default();
        let sop_instance_uid = cmd
            .string(tag::AFFECTED_SOP_INSTANCE_UID)
            .unwrap_or_default();
        let pc = self
            .negotiated
            .context(context_id)
            .cloned()
            .ok_or_else(|| {
                Abort(
                    AbortRQServiceProviderReason::UnexpectedPduParameter,
                    "unknown context".into(),
                )
            })?;
        let reply_failure = |failure: Failure| Reply {
            command_field: command_field | 0x8000,
            message_id,
            sop_class_uid: sop_class_uid.clone(),
            sop_instance_uid: sop_instance_uid.clone(),
            failure,
        };
        match command_field {
            field::C_ECHO_RQ if !has_data && !self.allowed(Permission::Echo) => {
                let reply = reply_failure(not_authorized("C-ECHO"));
                self.send_reply(context_id, reply).await
            }
            field::C_ECHO_RQ if !has_data => {
                let rsp = CommandBuilder::new()
                    .uid(tag::AFFECTED_SOP_CLASS_UID, VERIFICATION)
                    .u16(tag::COMMAND_FIELD, field::C_ECHO_RSP)
                    .u16(tag::MESSAGE_ID_BEING_RESPONDED_TO, message_id)
                    .u16(tag::COMMAND_DATA_SET_TYPE, NO_DATA_SET)
                    .u16(tag::STATUS, status::SUCCESS)
                    .encode();
                self.send_command(context_id, rsp).await
            }
            field::C_FIND_RQ | field::C_MOVE_RQ | field::C_GET_RQ if has_data => {
                let operation = match command_field {
                    field::C_FIND_RQ => Operation::Find,
                    field::C_MOVE_RQ => Operation::Move {
                        destination: cmd.string(tag::MOVE_DESTINATION).unwrap_or_default(),
                    },
                    _ => Operation::Get,
                };
                let failure =
                    self.retrieval_refusal(&operation, &pc.abstract_syntax, &sop_class_uid);
                self.state = match failure {
                    Some(f) => State::Discard {
                        context_id,
                        reply: reply_failure(f),
                    },
                    None => State::Identifier(Box::new(IdentifierRequest {
                        operation,
                        context_id,
                        message_id,
                        sop_class_uid,
                        bytes: Vec::new(),
                    })),
                };
                Ok(())
            }
            field::C_STORE_RQ if has_data => {
                let failure =
                    self.store_refusal(&pc.abstract_syntax, &sop_class_uid, &sop_instance_uid);
                debug!(message_id, "C-STORE request");
                let incoming = failure
                    .is_none()
                    .then(|| self.ctx.pipeline.begin(&pc.transfer_syntax));
                self.state = State::Store(Box::new(StoreInProgress {
                    started: std::time::Instant::now(),
                    context_id,
                    message_id,
                    context: StoreContext {
                        calling_ae: self.negotiated.calling_ae.clone(),
                        called_ae: self.negotiated.called_ae.clone(),
                        sop_class_uid,
                        sop_instance_uid,
                    },
                    incoming,
                    failure,
                }));
                Ok(())
            }
            _ => {
                let reply = reply_failure(Failure::new(
                    status::UNRECOGNIZED_OPERATION,
                    "operation not supported",
                ));
                if has_data {
                    self.state = State::Discard { context_id, reply };
                    Ok(())
                } else {
                    self.send_reply(context_id, reply).await
                }
            }
        }
    }

    /// Why a C-FIND, C-MOVE or C-GET request is refused before its identifier is read: a SOP
    /// class that is not the context's or not one of the operation's, a C-MOVE without a
    /// destination, an operation or destination the ACL does not allow. `None`: go ahead.
    fn retrieval_refusal(
        &self,
        operation: &Operation,
        abstract_syntax: &str,
        sop_class_uid: &str,
    ) -> Option<Failure> {
        let (class_ok, not_ours) = match operation {
            Operation::Find => (
                matching::Model::of_sop_class(sop_class_uid).is_some(),
                "not a Query/Retrieve FIND SOP Class",
            ),
            Operation::Move { .. } => (
                [uids::PATIENT_ROOT_MOVE, uids::STUDY_ROOT_MOVE].contains(&sop_class_uid),
                "not a Query/Retrieve SOP Class for this operation",
            ),
            Operation::Get => (
                [uids::PATIENT_ROOT_GET, uids::STUDY_ROOT_GET].contains(&sop_class_uid),
                "not a Query/Retrieve SOP Class for this operation",
            ),
        };
        if abstract_syntax != sop_class_uid {
            Some(Failure::new(
                status::SOP_CLASS_NOT_SUPPORTED,
                "SOP Class differs from the presentation context",
            ))
        } else if !class_ok {
            Some(Failure::new(status::SOP_CLASS_NOT_SUPPORTED, not_ours))
        } else if matches!(operation, Operation::Move { destination } if destination.is_empty()) {
            Some(Failure::new(
                status::MOVE_DESTINATION_UNKNOWN,
                "command lacks Move Destination",
            ))
        } else if !self.allowed(operation.permission()) {
            Some(not_authorized(operation.name()))
        } else if matches!(operation, Operation::Move { destination }
            // An unknown destination is A801 (Move Destination unknown), from run_move.
            if self.ctx.services.peers.iter().any(|p| p.ae_title.trim() == destination.trim())
                && !self.ctx.acl.allows(destination, Permission::Move))
        {
            Some(Failure::new(
                status::NOT_AUTHORIZED,
                "the move destination may not receive instances by C-MOVE",
            ))
        } else {
            None
        }
    }

    /// Why a C-STORE request is refused before its data set is read (the data set is then read
    /// and discarded): a SOP class that is not the context's storage class, no SOP Instance UID,
    /// or no store permission. `None`: go ahead.
    fn store_refusal(
        &self,
        abstract_syntax: &str,
        sop_class_uid: &str,
        sop_instance_uid: &str,
    ) -> Option<Failure> {
        if abstract_syntax != sop_class_uid || !negotiate::is_storage_sop_class(abstract_syntax) {
            Some(Failure::new(
                status::SOP_CLASS_NOT_SUPPORTED,
                "SOP Class differs from the presentation context",
            ))
        } else if sop_instance_uid.is_empty() {
            Some(Failure::new(
                status::CANNOT_UNDERSTAND,
                "command lacks Affected SOP Instance UID",
            ))
        } else if !self.allowed(Permission::Store) {
            Some(not_authorized("C-STORE"))
        } else {
            None
        }
    }

    /// The audit record of a query or retrieval request, before it is answered.
    fn request_audit(&self, req: &IdentifierRequest) -> AuditRecord {
        AuditRecord {
            event_id: if req.operation != Operation::Find {
                trail::id::INSTANCES_TRANSFERRED
            } else {
                trail::id::QUERY
            },
            calling_ae: self.negotiated.calling_ae.clone(),
            peer: match &req.operation {
                Operation::Move { destination } => destination.trim().to_string(),
                _ => self.peer.clone(),
            },
            sop_class_uid: req.sop_class_uid.clone(),
            identifier_sha256: <sha2::Sha256 as sha2::Digest>::digest(&req.bytes).into(),
            detail: match &req.operation {
                Operation::Move { destination } => format!("C-MOVE to {}", destination.trim()),
                other => other.name().to_string(),
            },
            ..Default::default()
        }
    }

    /// Parses the identifier of a C-FIND, C-MOVE or C-GET and starts the operation beside the
    /// association, or answers with the failure status for a bad identifier.
    pub(super) async fn start(&mut self, req: IdentifierRequest) -> Result<(), Abort> {
        let transfer_syntax = self
            .negotiated
            .context(req.context_id)
            .map(|c| c.transfer_syntax.clone())
            .unwrap_or_default();
        let model = match req.operation {
            Operation::Find => matching::Model::of_sop_class(&req.sop_class_uid),
            _ => qr::retrieve_model(&req.sop_class_uid),
        };
        let matching = matching::MatchOptions {
            case_insensitive_names: self.ctx.node.find_case_insensitive_names,
            combined_datetime: self
                .negotiated
                .combined_datetime
                .contains(&req.sop_class_uid),
        };
        let retrieval = req.operation != Operation::Find;
        let mut audit = self.request_audit(&req);
        let parsed = parse_request(&req.bytes, &transfer_syntax, model, matching, retrieval);
        let (q, encoding) = match parsed {
            Ok(p) => p,
            Err(failure) => {
                info!(status = format!("{:04X}", failure.status), reason = %failure.comment, "request refused");
                audit.status = failure.status;
                audit.detail = format!("{} refused: {}", audit.detail, failure.comment);
                self.ctx.services.ledger.audit(audit);
                let reply = Reply {
                    command_field: request_field(&req.operation) | 0x8000,
                    message_id: req.message_id,
                    sop_class_uid: req.sop_class_uid,
                    sop_instance_uid: String::new(),
                    failure,
                };
                return self.send_reply(req.context_id, reply).await;
            }
        };
        audit.detail = format!("{} at {} level", audit.detail, q.level.name());
        let (tx, rx) = mpsc::channel(OP_QUEUE);
        let cancel = Arc::new(AtomicBool::new(false));
        let services = self.ctx.services.clone();
        let request = qr::Request {
            context_id: req.context_id,
            message_id: req.message_id,
            sop_class_uid: req.sop_class_uid.clone(),
            encoding,
            calling_ae: self.negotiated.calling_ae.clone(),
            peer: self.peer.clone(),
        };
        let mut replies = None;
        match req.operation.clone() {
            Operation::Find => {
                let opts = FindOptions {
                    matching,
                    max_results: self.ctx.node.max_find_results,
                    retrieve_ae: self.ctx.policy.ae_title.clone(),
                };
                let stop = cancel.clone();
                tokio::task::spawn_blocking(move || {
                    crate::scp::find::run_find(&services, &request, &q, &opts, &stop, &tx)
                });
            }
            Operation::Move { destination } => {
                tokio::spawn(crate::scp::retrieve_ops::run_move(
                    services,
                    request,
                    destination,
                    q,
                    cancel.clone(),
                    tx,
                ));
            }
            Operation::Get => {
                let contexts: Vec<(u8, String, String)> = self
                    .negotiated
                    .contexts
                    .iter()
                    .filter(|c| self.negotiated.scp_role.contains(&c.abstract_syntax))
                    .map(|c| (c.id, c.abstract_syntax.clone(), c.transfer_syntax.clone()))
                    .collect();
                let (rtx, rrx) = mpsc::channel(4);
                replies = Some(rtx);
                tokio::spawn(crate::scp::retrieve_ops::run_get(
                    services,
                    request,
                    q,
                    contexts,
                    cancel.clone(),
                    tx,
                    rrx,
                ));
            }
        }
        self.state = State::Running(Box::new(Running {
            audit: Some(audit),
            ledger: self.ctx.services.ledger.clone(),
            pending: 0,
            context_id: req.context_id,
            message_id: req.message_id,
            response_field: request_field(&req.operation) | 0x8000,
            sop_class_uid: req.sop_class_uid,
            out: rx,
            replies,
            cancel,
        }));
        Ok(())
    }

    /// A message from the running operation; `None` when it ended without its final response
    /// (a failure is answered for it).
    pub(super) async fn on_outgoing(&mut self, msg: Option<Outgoing>) -> Result<(), Abort> {
        let max = self.negotiated.peer_max_pdu;
        let Some(msg) = msg else {
            if let State::Running(r) = std::mem::replace(&mut self.state, State::Idle) {
                warn!("operation ended without a final response");
                let reply = Reply {
                    command_field: r.response_field,
                    message_id: r.message_id,
                    sop_class_uid: r.sop_class_uid.clone(),
                    sop_instance_uid: String::new(),
                    failure: Failure::new(status::UNABLE_TO_PROCESS, "internal error"),
                };
                return self.send_reply(r.context_id, reply).await;
            }
            return Ok(());
        };
        let sent = match msg {
            Outgoing::Message {
                context_id,
                command,
                data,
                last,
            } => {
                if last {
                    if let State::Running(r) = std::mem::replace(&mut self.state, State::Idle) {
                        self.audit_final(*r, &command);
                    }
                } else if let State::Running(r) = &mut self.state {
                    r.pending += 1;
                }
                match data {
                    Some(data) => self.conn.send_message(context_id, command, data, max).await,
                    None => self.conn.send_command(context_id, command).await,
                }
            }
            Outgoing::Command {
                context_id,
                command,
            } => self.conn.send_command(context_id, command).await,
            Outgoing::Data {
                context_id,
                bytes,
                last,
            } => self.conn.send_data(context_id, &bytes, last, max).await,
            Outgoing::Abort(why) => {
                return Err(Abort(AbortRQServiceProviderReason::ReasonNotSpecified, why));
            }
        };
        sent.map_err(|e| {
            Abort(
                AbortRQServiceProviderReason::ReasonNotSpecified,
                format!("cannot send: {e}"),
            )
        })
    }
}

pub(super) fn request_field(op: &Operation) -> u16 {
    match op {
        Operation::Find => field::C_FIND_RQ,
        Operation::Move { .. } => field::C_MOVE_RQ,
        Operation::Get => field::C_GET_RQ,
    }
}

/// The identifier of a query or retrieval parsed into a query in the context's encoding; a
/// retrieval must name what it retrieves ([`retrieval_keys`]). A failure is the status to answer.
fn parse_request(
    bytes: &[u8],
    transfer_syntax: &str,
    model: Option<matching::Model>,
    matching: matching::MatchOptions,
    retrieval: bool,
) -> Result<(matching::Query, Encoding), Failure> {
    match (Encoding::from_transfer_syntax(transfer_syntax), model) {
        (Some(enc), Some(model)) => dataset::parse(bytes, enc, false)
            .map_err(|e| Failure::new(status::CANNOT_UNDERSTAND, e.to_string()))
            .and_then(|elements| {
                matching::Query::parse(&elements, model, matching)
                    .map_err(|e| crate::scp::status::find_failure(&e))
            })
            .and_then(|q| {
                if retrieval {
                    retrieval_keys(&q)?;
                }
                Ok(q)
            })
            .map(|q| (q, enc)),
        _ => Err(Failure::new(
            status::CANNOT_UNDERSTAND,
            "unsupported transfer syntax",
        )),
    }
}

/// A C-MOVE or C-GET identifier must name what to retrieve: the unique key of its level, with a
/// value (PS3.4 C.4.2.2.1). A universal one would send the whole archive.
fn retrieval_keys(q: &matching::Query) -> Result<(), Failure> {
    let unique = matching::unique_key(q.level);
    let single = match q.key(unique).map(|k| &k.matcher) {
        Some(matching::Matcher::Uids(list)) => !list.is_empty(),
        // PatientID: single values (a list of them too), never wild cards.
        Some(matching::Matcher::Text(patterns)) => patterns.iter().all(|p| p.is_exact()),
        _ => false,
    };
    if single {
        Ok(())
    } else {
        Err(Failure::new(
            status::DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
            format!(
                "identifier lacks a single value for the unique key of the {} level",
                q.level.name()
            ),
        ))
    }
}
