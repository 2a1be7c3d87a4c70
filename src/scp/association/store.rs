//! C-STORE on an association: the data set's fragments fed to the ingest pipeline as they arrive,
//! and the response sent once both halves are durable (or the failure's status).

use super::requests::request_field;
use super::state::*;
use super::*;

impl Association {
    pub(super) async fn on_data_fragment(&mut self, pdv: Pdv<'_>) -> Result<(), Abort> {
        let out_of_sequence = || {
            Abort(
                AbortRQServiceProviderReason::UnexpectedPduParameter,
                "data fragment without a command".into(),
            )
        };
        match &mut self.state {
            State::Store(op) if op.context_id == pdv.presentation_context_id => {
                if let Some(incoming) = op.incoming.as_mut() {
                    if let Err(e) = incoming.feed(pdv.data).await {
                        warn!(error = %e, "C-STORE failed while receiving");
                        op.failure = Some(crate::scp::status::store_failure(&e));
                        if let Some(i) = op.incoming.take() {
                            i.abort().await;
                        }
                    }
                }
                if pdv.is_last {
                    if let State::Store(op) = std::mem::replace(&mut self.state, State::Idle) {
                        self.finish_store(*op).await?;
                    }
                }
                Ok(())
            }
            State::Identifier(req) if req.context_id == pdv.presentation_context_id => {
                req.bytes.extend_from_slice(pdv.data);
                if req.bytes.len() > MAX_IDENTIFIER_BYTES {
                    let reply = Reply {
                        command_field: request_field(&req.operation) | 0x8000,
                        message_id: req.message_id,
                        sop_class_uid: req.sop_class_uid.clone(),
                        sop_instance_uid: String::new(),
                        failure: Failure::new(status::OUT_OF_RESOURCES, "identifier too large"),
                    };
                    self.state = State::Discard {
                        context_id: req.context_id,
                        reply,
                    };
                }
                if pdv.is_last {
                    match std::mem::replace(&mut self.state, State::Idle) {
                        State::Identifier(req) => self.start(*req).await?,
                        State::Discard { context_id, reply } => {
                            self.send_reply(context_id, reply).await?
                        }
                        other => self.state = other,
                    }
                }
                Ok(())
            }
            State::Discard { context_id, .. } if *context_id == pdv.presentation_context_id => {
                if pdv.is_last {
                    if let State::Discard { context_id, reply } =
                        std::mem::replace(&mut self.state, State::Idle)
                    {
                        self.send_reply(context_id, reply).await?;
                    }
                }
                Ok(())
            }
            _ => Err(out_of_sequence()),
        }
    }

    pub(super) async fn finish_store(&mut self, op: StoreInProgress) -> Result<(), Abort> {
        let result = match (op.failure, op.incoming) {
            (Some(f), incoming) => {
                if let Some(i) = incoming {
                    i.abort().await;
                }
                Err(f)
            }
            (None, Some(incoming)) => match incoming.finish(&op.context).await {
                Ok(stored) => {
                    let m = crate::ops::metrics::global();
                    match stored.outcome {
                        StoreOutcome::Stored { .. } => m.instances_stored.fetch_add(1, Relaxed),
                        StoreOutcome::Duplicate { .. } => {
                            m.instances_duplicate.fetch_add(1, Relaxed)
                        }
                    };
                    match stored.outcome {
                        StoreOutcome::Stored { seq, version } => {
                            info!(
                                seq,
                                version,
                                bytes = stored.dataset_length,
                                "instance stored"
                            )
                        }
                        StoreOutcome::Duplicate { seq } => {
                            info!(seq, "identical instance received again")
                        }
                    }
                    Ok(())
                }
                Err(e) => {
                    warn!(error = %e, "C-STORE failed");
                    if matches!(e, crate::archive::ingest::IngestError::Store(_)) {
                        crate::ops::metrics::global()
                            .object_store_errors
                            .fetch_add(1, Relaxed);
                    }
                    Err(crate::scp::status::store_failure(&e))
                }
            },
            (None, None) => Err(Failure::new(status::OUT_OF_RESOURCES, "internal error")),
        };
        let mut rsp = CommandBuilder::new()
            .uid(tag::AFFECTED_SOP_CLASS_UID, &op.context.sop_class_uid)
            .u16(tag::COMMAND_FIELD, field::C_STORE_RSP)
            .u16(tag::MESSAGE_ID_BEING_RESPONDED_TO, op.message_id)
            .u16(tag::COMMAND_DATA_SET_TYPE, NO_DATA_SET)
            .uid(tag::AFFECTED_SOP_INSTANCE_UID, &op.context.sop_instance_uid);
        crate::ops::metrics::global().observe_store(op.started.elapsed());
        match result {
            Ok(()) => {
                self.stored += 1;
                rsp = rsp.u16(tag::STATUS, status::SUCCESS);
            }
            Err(f) => {
                self.failed += 1;
                crate::ops::metrics::global()
                    .instances_failed
                    .fetch_add(1, Relaxed);
                rsp = rsp.u16(tag::STATUS, f.status).text(
                    tag::ERROR_COMMENT,
                    &f.comment,
                    status::ERROR_COMMENT_MAX,
                );
            }
        }
        self.send_command(op.context_id, rsp.encode()).await?;
        debug!(message_id = op.message_id, "C-STORE response sent");
        Ok(())
    }
}
