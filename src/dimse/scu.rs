//! The node as association requestor (SCU): C-STORE sub-operations of a C-MOVE go to the move
//! destination over an association we open (PS3.4 C.4.2.3). TCP_NODELAY is set on the socket.

use std::time::Duration;

use dicom_ul::pdu::{
    AbortRQServiceProviderReason, AssociationRQ, PDataValueType, Pdu, PresentationContextProposed,
    PresentationContextResultReason, UserVariableItem,
};
use tokio::net::TcpStream;

use super::command::{field, store_rq, tag, Command, CommandBuilder, NO_DATA_SET};
use super::connection::{ConnError, Connection};
use super::negotiate::{APPLICATION_CONTEXT, PEER_UNLIMITED_CAP};
use crate::dicom::uids::{IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME};

#[derive(Debug, thiserror::Error)]
pub enum ScuError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("association rejected by {0}")]
    Rejected(String),
    #[error("{0}")]
    Protocol(String),
    #[error(transparent)]
    Conn(#[from] ConnError),
}

/// The status of the C-STORE-RSP to `message_id`; anything else is a protocol error.
fn store_status(rsp: &Command, message_id: u16) -> Result<u16, ScuError> {
    let responds_to = rsp
        .u16(tag::MESSAGE_ID_BEING_RESPONDED_TO, "id")
        .ok()
        .flatten();
    if rsp.command_field().ok() != Some(field::C_STORE_RSP) || responds_to != Some(message_id) {
        return Err(ScuError::Protocol(
            "unexpected response to C-STORE-RQ".into(),
        ));
    }
    rsp.u16(tag::STATUS, "Status")
        .ok()
        .flatten()
        .ok_or_else(|| ScuError::Protocol("C-STORE-RSP without status".into()))
}

/// Why a streamed instance could not be completed by its rebuild task.
#[derive(Debug, Clone)]
pub struct CheckFailure {
    /// It failed its ledger check (else: it could not be read, say the store is down).
    pub integrity: bool,
    pub why: String,
}

impl std::fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.why)
    }
}

/// Why a streamed C-STORE did not complete.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The instance could not be completed mid-way (failed its check, or its rebuild stopped);
    /// the association was left mid-data-set, so the caller must abort it.
    #[error("instance could not be completed: {0}")]
    Check(CheckFailure),
    #[error(transparent)]
    Peer(ScuError),
}

/// An accepted presentation context of our association.
#[derive(Debug, Clone)]
pub struct Context {
    pub id: u8,
    pub abstract_syntax: String,
    pub transfer_syntax: String,
}

/// An open association to a peer.
pub struct Scu {
    conn: Connection,
    pub contexts: Vec<Context>,
    /// PDVs received but not yet consumed by [`Scu::receive_message`].
    pending: std::collections::VecDeque<dicom_ul::pdu::PDataValue>,
    peer_max_pdu: u32,
    next_message_id: u16,
}

impl Scu {
    /// Opens an association proposing one presentation context per (abstract syntax, transfer
    /// syntaxes) in `proposals`, in order (at most 128).
    pub async fn connect(
        host: &str,
        port: u16,
        calling_ae: &str,
        called_ae: &str,
        proposals: &[(String, Vec<String>)],
        max_pdu: u32,
        timeout: Duration,
    ) -> Result<Scu, ScuError> {
        Scu::connect_with_roles(
            host,
            port,
            calling_ae,
            called_ae,
            proposals,
            &[],
            max_pdu,
            timeout,
        )
        .await
    }

    /// [`Scu::connect`], proposing the SCP role for `scp_roles` (SOP classes whose C-STORE
    /// requests we will receive: a C-GET's sub-operations, PS3.7 D.3.3.4).
    #[allow(clippy::too_many_arguments)]
    pub async fn connect_with_roles(
        host: &str,
        port: u16,
        calling_ae: &str,
        called_ae: &str,
        proposals: &[(String, Vec<String>)],
        scp_roles: &[String],
        max_pdu: u32,
        timeout: Duration,
    ) -> Result<Scu, ScuError> {
        let addr = format!("{host}:{port}");
        let socket = match tokio::time::timeout(timeout, TcpStream::connect(&addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(ScuError::Connect { addr, source }),
            Err(_) => {
                return Err(ScuError::Connect {
                    addr,
                    source: std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"),
                })
            }
        };
        socket
            .set_nodelay(true)
            .map_err(|source| ScuError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let mut conn = Connection::new(socket, max_pdu, timeout);
        let presentation_contexts: Vec<PresentationContextProposed> = proposals
            .iter()
            .take(128)
            .enumerate()
            .map(|(i, (abs, ts))| PresentationContextProposed {
                id: (2 * i + 1) as u8,
                abstract_syntax: abs.clone(),
                transfer_syntaxes: ts.clone(),
            })
            .collect();
        let rq = AssociationRQ {
            protocol_version: 1,
            calling_ae_title: calling_ae.to_string(),
            called_ae_title: called_ae.to_string(),
            application_context_name: APPLICATION_CONTEXT.to_string(),
            presentation_contexts: presentation_contexts.clone(),
            user_variables: [
                UserVariableItem::MaxLength(max_pdu),
                UserVariableItem::ImplementationClassUID(IMPLEMENTATION_CLASS_UID.to_string()),
                UserVariableItem::ImplementationVersionName(
                    IMPLEMENTATION_VERSION_NAME.to_string(),
                ),
            ]
            .into_iter()
            .chain(scp_roles.iter().map(|uid| {
                UserVariableItem::ScuScpRoleSelectionSubItem(
                    uid.clone(),
                    dicom_ul::pdu::RequestorRoles {
                        scu: false,
                        scp: true,
                    },
                )
            }))
            .collect(),
        };
        conn.send(&Pdu::AssociationRQ(rq)).await?;
        let ac = match conn.receive(timeout).await? {
            Pdu::AssociationAC(ac) => ac,
            Pdu::AssociationRJ(rj) => {
                return Err(ScuError::Rejected(format!("{called_ae} ({:?})", rj.source)))
            }
            other => {
                return Err(ScuError::Protocol(format!(
                    "unexpected answer to A-ASSOCIATE-RQ: {other:?}"
                )))
            }
        };
        let mut peer_max_pdu = PEER_UNLIMITED_CAP;
        for item in &ac.user_variables {
            if let UserVariableItem::MaxLength(len) = item {
                peer_max_pdu = if *len == 0 {
                    PEER_UNLIMITED_CAP
                } else {
                    (*len).min(PEER_UNLIMITED_CAP)
                };
            }
        }
        let contexts = ac
            .presentation_contexts
            .iter()
            .filter(|r| r.reason == PresentationContextResultReason::Acceptance)
            .filter_map(|r| {
                let proposed = presentation_contexts.iter().find(|p| p.id == r.id)?;
                Some(Context {
                    id: r.id,
                    abstract_syntax: proposed.abstract_syntax.clone(),
                    transfer_syntax: r.transfer_syntax.trim_end_matches(['\0', ' ']).to_string(),
                })
            })
            .collect();
        Ok(Scu {
            conn,
            contexts,
            pending: Default::default(),
            peer_max_pdu,
            next_message_id: 1,
        })
    }

    /// Sends one C-STORE-RQ with its data set and waits for the C-STORE-RSP; returns its status.
    pub async fn store(
        &mut self,
        context_id: u8,
        sop_class_uid: &str,
        sop_instance_uid: &str,
        data: Vec<u8>,
        move_originator: Option<(&str, u16)>,
        timeout: Duration,
    ) -> Result<u16, ScuError> {
        let message_id = self.next_message_id;
        self.next_message_id = self.next_message_id.wrapping_add(1).max(1);
        let rq = store_rq(sop_class_uid, sop_instance_uid, message_id, move_originator);
        self.conn
            .send_message(context_id, rq, data, self.peer_max_pdu)
            .await?;
        let rsp = self.receive_command(timeout).await?;
        store_status(&rsp, message_id)
    }

    /// Sends one C-STORE-RQ whose data set arrives as chunks on `chunks` (a large instance
    /// streaming out of the object store). The last chunk is held back until `verified` says
    /// the rebuilt data set matched the ledger; if it did not, the association is aborted so
    /// the destination never completes the data set, and the check's error is returned.
    #[allow(clippy::too_many_arguments)]
    pub async fn store_streamed(
        &mut self,
        context_id: u8,
        sop_class_uid: &str,
        sop_instance_uid: &str,
        chunks: &mut tokio::sync::mpsc::Receiver<Vec<u8>>,
        verified: tokio::sync::oneshot::Receiver<Result<(), CheckFailure>>,
        move_originator: Option<(&str, u16)>,
        timeout: Duration,
    ) -> Result<u16, StreamError> {
        let message_id = self.next_message_id;
        self.next_message_id = self.next_message_id.wrapping_add(1).max(1);
        let rq = store_rq(sop_class_uid, sop_instance_uid, message_id, move_originator);
        let peer = |e: ConnError| StreamError::Peer(ScuError::Conn(e));
        self.conn.send_command(context_id, rq).await.map_err(peer)?;
        let mut held: Option<Vec<u8>> = None;
        while let Some(chunk) = chunks.recv().await {
            if let Some(prev) = held.replace(chunk) {
                self.conn
                    .send_data(context_id, &prev, false, self.peer_max_pdu)
                    .await
                    .map_err(peer)?;
            }
        }
        match verified.await {
            Ok(Ok(())) => {
                let last = held.unwrap_or_default();
                self.conn
                    .send_data(context_id, &last, true, self.peer_max_pdu)
                    .await
                    .map_err(peer)?;
            }
            Ok(Err(why)) => return Err(StreamError::Check(why)),
            Err(_) => {
                return Err(StreamError::Check(CheckFailure {
                    integrity: false,
                    why: "rebuild task ended".into(),
                }))
            }
        }
        let rsp = self
            .receive_command(timeout)
            .await
            .map_err(StreamError::Peer)?;
        store_status(&rsp, message_id).map_err(StreamError::Peer)
    }

    /// Sends a request: a command (`build` adds its fields to the Affected SOP Class UID,
    /// Command Field, Message ID and Data Set Type) and its data set, if any. Returns its message
    /// ID.
    pub async fn request(
        &mut self,
        context_id: u8,
        command_field: u16,
        sop_class_uid: &str,
        data: Option<Vec<u8>>,
        build: impl FnOnce(CommandBuilder) -> CommandBuilder,
    ) -> Result<u16, ScuError> {
        let message_id = self.next_message_id;
        self.next_message_id = self.next_message_id.wrapping_add(1).max(1);
        let rq = build(
            CommandBuilder::new()
                .uid(tag::AFFECTED_SOP_CLASS_UID, sop_class_uid)
                .u16(tag::COMMAND_FIELD, command_field)
                .u16(tag::MESSAGE_ID, message_id)
                .u16(
                    tag::COMMAND_DATA_SET_TYPE,
                    if data.is_some() { 0x0001 } else { NO_DATA_SET },
                ),
        )
        .encode();
        match data {
            Some(d) => {
                self.conn
                    .send_message(context_id, rq, d, self.peer_max_pdu)
                    .await?
            }
            None => self.conn.send_command(context_id, rq).await?,
        }
        Ok(message_id)
    }

    /// Receives the next message: its command, the context it came on, and its data set if
    /// the command announces one.
    pub async fn receive_message(
        &mut self,
        timeout: Duration,
    ) -> Result<(u8, Command, Option<Vec<u8>>), ScuError> {
        /// Largest data set received into memory (a C-GET'd instance).
        const MAX_DATA: usize = 2 << 30;
        let mut command = Vec::new();
        let mut data = Vec::new();
        let mut cmd: Option<(u8, Command)> = None;
        loop {
            // PDVs of one P-DATA-TF may end one message and begin the next: those wait here.
            let pdv = match self.pending.pop_front() {
                Some(p) => p,
                None => match self.conn.receive(timeout).await? {
                    Pdu::PData { data: pdvs } => {
                        self.pending.extend(pdvs);
                        continue;
                    }
                    Pdu::AbortRQ { .. } => return Err(ScuError::Protocol("peer aborted".into())),
                    other => return Err(ScuError::Protocol(format!("unexpected PDU {other:?}"))),
                },
            };
            match (&cmd, pdv.value_type) {
                (None, PDataValueType::Command) => {
                    command.extend_from_slice(&pdv.data);
                    if command.len() > 64 * 1024 {
                        return Err(ScuError::Protocol("command too large".into()));
                    }
                    if pdv.is_last {
                        let c = Command::decode(&command)
                            .map_err(|e| ScuError::Protocol(format!("bad command: {e}")))?;
                        if !c.has_data_set().unwrap_or(false) {
                            return Ok((pdv.presentation_context_id, c, None));
                        }
                        cmd = Some((pdv.presentation_context_id, c));
                    }
                }
                (Some((ctx, _)), PDataValueType::Data) if *ctx == pdv.presentation_context_id => {
                    data.extend_from_slice(&pdv.data);
                    if data.len() > MAX_DATA {
                        return Err(ScuError::Protocol("data set larger than 2 GiB".into()));
                    }
                    if pdv.is_last {
                        let (ctx, c) = cmd.take().expect("a command precedes its data set");
                        return Ok((ctx, c, Some(std::mem::take(&mut data))));
                    }
                }
                _ => {
                    return Err(ScuError::Protocol(
                        "data set and command fragments out of order".into(),
                    ))
                }
            }
        }
    }

    /// Answers a C-STORE-RQ the peer sent us (a C-GET sub-operation).
    pub async fn store_response(
        &mut self,
        context_id: u8,
        rq: &Command,
        status: u16,
    ) -> Result<(), ScuError> {
        let rsp = CommandBuilder::new()
            .uid(
                tag::AFFECTED_SOP_CLASS_UID,
                &rq.string(tag::AFFECTED_SOP_CLASS_UID).unwrap_or_default(),
            )
            .u16(tag::COMMAND_FIELD, field::C_STORE_RSP)
            .u16(
                tag::MESSAGE_ID_BEING_RESPONDED_TO,
                rq.message_id().unwrap_or(0),
            )
            .u16(tag::COMMAND_DATA_SET_TYPE, NO_DATA_SET)
            .uid(
                tag::AFFECTED_SOP_INSTANCE_UID,
                &rq.string(tag::AFFECTED_SOP_INSTANCE_UID)
                    .unwrap_or_default(),
            )
            .u16(tag::STATUS, status)
            .encode();
        Ok(self.conn.send_command(context_id, rsp).await?)
    }

    async fn receive_command(&mut self, timeout: Duration) -> Result<Command, ScuError> {
        let mut bytes = Vec::new();
        loop {
            match self.conn.receive(timeout).await? {
                Pdu::PData { data } => {
                    for pdv in data {
                        if pdv.value_type != PDataValueType::Command {
                            return Err(ScuError::Protocol(
                                "data set where a response was due".into(),
                            ));
                        }
                        bytes.extend_from_slice(&pdv.data);
                        if bytes.len() > 64 * 1024 {
                            return Err(ScuError::Protocol("response command too large".into()));
                        }
                        if pdv.is_last {
                            return Command::decode(&bytes)
                                .map_err(|e| ScuError::Protocol(format!("bad response: {e}")));
                        }
                    }
                }
                Pdu::AbortRQ { .. } => return Err(ScuError::Protocol("peer aborted".into())),
                other => {
                    return Err(ScuError::Protocol(format!("unexpected PDU {other:?}")));
                }
            }
        }
    }

    /// A-RELEASE, waiting briefly for the reply.
    pub async fn release(mut self, timeout: Duration) {
        if self.conn.send(&Pdu::ReleaseRQ).await.is_ok() {
            let _ = self.conn.receive(timeout).await;
        }
        self.conn.close().await;
    }

    pub async fn abort(self) {
        self.conn
            .abort(AbortRQServiceProviderReason::ReasonNotSpecified)
            .await;
    }
}
