//! `dicomchain echo|store|find|move|get`: a DICOM SCU for administrators without DCMTK at hand,
//! against a configured peer (`--peer NAME`) or `AE@host:port`, with findscu/movescu-like keys
//! (`-k QueryRetrieveLevel=STUDY -k PatientID=X`). Calls with our AE title as calling AE.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use dicom_core::dictionary::{DataDictionary, DataDictionaryEntry};
use dicom_core::{PrimitiveValue, Tag, VR};
use dicom_dictionary_std::StandardDataDictionary;
use dicom_encoding::TransferSyntaxIndex;
use dicom_object::mem::InMemElement;
use dicom_object::InMemDicomObject;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;

use crate::cli::import::parse_header;
use crate::config::Config;
use crate::dicom::uids;
use crate::dimse::command::{field, tag};
use crate::dimse::scu::Scu;

const TIMEOUT: Duration = Duration::from_secs(60);

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Scu(#[from] crate::dimse::scu::ScuError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the peer accepted no presentation context for {0}")]
    NoContext(String),
}

/// Who to talk to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub ae_title: String,
    pub host: String,
    pub port: u16,
}

impl Target {
    /// `AE@host:port`, or the name of a `[peers.NAME]` entry.
    pub fn resolve(cfg: &Config, spec: &str) -> Result<Target, ClientError> {
        if let Some(p) = cfg.peers.get(spec) {
            return Ok(Target {
                ae_title: p.ae_title.clone(),
                host: p.host.clone(),
                port: p.port,
            });
        }
        let bad = || {
            ClientError::Usage(format!(
                "{spec:?} is neither AE@host:port nor a [peers.NAME] name (known: {})",
                cfg.peers.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        };
        let (ae, addr) = spec.split_once('@').ok_or_else(bad)?;
        let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
        let port = port.parse().map_err(|_| bad())?;
        if !crate::config::valid_ae_title(ae) || host.is_empty() {
            return Err(bad());
        }
        Ok(Target {
            ae_title: ae.to_string(),
            host: host.to_string(),
            port,
        })
    }

    async fn connect(
        &self,
        cfg: &Config,
        proposals: &[(String, Vec<String>)],
    ) -> Result<Scu, ClientError> {
        Ok(Scu::connect(
            &self.host,
            self.port,
            &cfg.node.ae_title,
            &self.ae_title,
            proposals,
            cfg.node.max_pdu_length,
            TIMEOUT,
        )
        .await?)
    }
}

fn context_for(scu: &Scu, abstract_syntax: &str) -> Result<(u8, String), ClientError> {
    scu.contexts
        .iter()
        .find(|c| c.abstract_syntax == abstract_syntax)
        .map(|c| (c.id, c.transfer_syntax.clone()))
        .ok_or_else(|| ClientError::NoContext(abstract_syntax.to_string()))
}

/// C-ECHO; returns the status and the round-trip time.
pub async fn echo(cfg: &Config, target: &Target) -> Result<(u16, Duration), ClientError> {
    let started = Instant::now();
    let mut scu = target
        .connect(
            cfg,
            &[(
                uids::VERIFICATION.into(),
                vec![
                    uids::EXPLICIT_VR_LITTLE_ENDIAN.into(),
                    uids::IMPLICIT_VR_LITTLE_ENDIAN.into(),
                ],
            )],
        )
        .await?;
    let (ctx, _) = context_for(&scu, uids::VERIFICATION)?;
    let message_id = scu
        .request(ctx, field::C_ECHO_RQ, uids::VERIFICATION, None, |b| b)
        .await?;
    let (_, rsp, _) = scu.receive_message(TIMEOUT).await?;
    responds_to(&rsp, field::C_ECHO_RSP, message_id)?;
    let status = status_of(&rsp);
    scu.release(Duration::from_secs(10)).await;
    Ok((status, started.elapsed()))
}

/// One file's outcome of `store`.
pub struct Sent {
    pub path: PathBuf,
    /// The C-STORE status, or why the file was not sent.
    pub result: Result<u16, String>,
}

/// C-STORE of Part 10 files (folders walked), each data set exactly as in its file, over one
/// association (several when more than 64 SOP class/syntax pairs).
pub async fn store(
    cfg: &Config,
    target: &Target,
    paths: &[PathBuf],
) -> Result<Vec<Sent>, ClientError> {
    let (files, unreadable) = crate::cli::import::collect_files(paths);
    let mut out: Vec<Sent> = unreadable
        .into_iter()
        .map(|(path, why)| Sent {
            path,
            result: Err(why),
        })
        .collect();
    // Headers only now; each file is read when it is sent.
    let mut ready = Vec::new();
    for path in files {
        let head = std::fs::File::open(&path).and_then(|f| {
            use std::io::Read;
            let mut head = Vec::new();
            f.take(64 * 1024 + 132).read_to_end(&mut head)?;
            Ok(head)
        });
        match head
            .map_err(|e| format!("cannot read: {e}"))
            .and_then(|h| parse_header(&h))
        {
            Ok(h) => ready.push((path, h)),
            Err(why) => out.push(Sent {
                path,
                result: Err(why),
            }),
        }
    }
    let mut pairs: Vec<(String, Vec<String>)> = Vec::new();
    for (_, h) in &ready {
        let p = (h.sop_class_uid.clone(), vec![h.transfer_syntax.clone()]);
        if !pairs.contains(&p) {
            pairs.push(p);
        }
    }
    for chunk in pairs.chunks(64) {
        let mut scu = target.connect(cfg, chunk).await?;
        for (path, h) in ready.iter().filter(|(_, h)| {
            chunk
                .iter()
                .any(|(c, t)| *c == h.sop_class_uid && t[0] == h.transfer_syntax)
        }) {
            let ctx = scu
                .contexts
                .iter()
                .find(|c| {
                    c.abstract_syntax == h.sop_class_uid && c.transfer_syntax == h.transfer_syntax
                })
                .map(|c| c.id);
            let result = match ctx {
                None => Err(format!(
                    "the peer accepted no context for {} in {}",
                    h.sop_class_uid, h.transfer_syntax
                )),
                Some(id) => match std::fs::read(path) {
                    Err(e) => Err(format!("cannot read: {e}")),
                    Ok(mut bytes) => {
                        let data = bytes.split_off(h.dataset_offset.min(bytes.len()));
                        scu.store(
                            id,
                            &h.sop_class_uid,
                            &h.sop_instance_uid,
                            data,
                            None,
                            TIMEOUT,
                        )
                        .await
                        .map_err(|e| e.to_string())
                    }
                },
            };
            out.push(Sent {
                path: path.clone(),
                result,
            });
        }
        scu.release(Duration::from_secs(10)).await;
    }
    Ok(out)
}

/// Builds an identifier from `KEY=VALUE` (keyword or `gggg,eeee`; `KEY` alone = return key).
pub fn identifier(keys: &[String]) -> Result<InMemDicomObject, ClientError> {
    let mut obj = InMemDicomObject::new_empty();
    for k in keys {
        let (name, value) = k.split_once('=').unwrap_or((k.as_str(), ""));
        let tag: Tag = StandardDataDictionary
            .parse_tag(name.trim())
            .ok_or_else(|| ClientError::Usage(format!("-k {k}: unknown attribute {name:?}")))?;
        let vr = StandardDataDictionary
            .by_tag(tag)
            .map(|e| e.vr().relaxed())
            .unwrap_or(VR::LO);
        if vr == VR::SQ {
            return Err(ClientError::Usage(format!(
                "-k {k}: sequence keys are not supported here"
            )));
        }
        let bad = || ClientError::Usage(format!("-k {k}: {value:?} is not a number for {vr:?}"));
        let value = match (vr, value.is_empty()) {
            (_, true) => PrimitiveValue::Empty,
            (VR::US, _) => PrimitiveValue::from(value.parse::<u16>().map_err(|_| bad())?),
            (VR::SS, _) => PrimitiveValue::from(value.parse::<i16>().map_err(|_| bad())?),
            (VR::UL, _) => PrimitiveValue::from(value.parse::<u32>().map_err(|_| bad())?),
            (VR::SL, _) => PrimitiveValue::from(value.parse::<i32>().map_err(|_| bad())?),
            (VR::FL, _) => PrimitiveValue::from(value.parse::<f32>().map_err(|_| bad())?),
            (VR::FD, _) => PrimitiveValue::from(value.parse::<f64>().map_err(|_| bad())?),
            _ => PrimitiveValue::from(value),
        };
        obj.put(InMemElement::new(tag, vr, value));
    }
    Ok(obj)
}

fn encode(obj: &InMemDicomObject, ts: &str) -> Result<Vec<u8>, ClientError> {
    let ts = TransferSyntaxRegistry
        .get(ts)
        .ok_or_else(|| ClientError::Usage(format!("unknown transfer syntax {ts}")))?;
    let mut out = Vec::new();
    obj.write_dataset_with_ts(&mut out, ts)
        .map_err(|e| ClientError::Usage(format!("cannot encode the identifier: {e}")))?;
    Ok(out)
}

/// An association for one Q/R SOP class, its context and syntax, and the identifier of `keys`
/// encoded in that syntax.
async fn open_query(
    cfg: &Config,
    target: &Target,
    class: &str,
    keys: &[String],
) -> Result<(Scu, u8, String, Vec<u8>), ClientError> {
    let scu = target
        .connect(
            cfg,
            &[(
                class.into(),
                vec![
                    uids::EXPLICIT_VR_LITTLE_ENDIAN.into(),
                    uids::IMPLICIT_VR_LITTLE_ENDIAN.into(),
                ],
            )],
        )
        .await?;
    let (ctx, ts) = context_for(&scu, class)?;
    let id = encode(&identifier(keys)?, &ts)?;
    Ok((scu, ctx, ts, id))
}

/// The Status of a response (FFFF when it has none).
fn status_of(rsp: &crate::dimse::command::Command) -> u16 {
    rsp.u16(tag::STATUS, "Status")
        .ok()
        .flatten()
        .unwrap_or(0xFFFF)
}

/// The (remaining, completed, failed, warning) sub-operation counts of a C-MOVE/C-GET response.
fn counts_of(rsp: &crate::dimse::command::Command) -> [u16; 4] {
    let n = |t| rsp.u16(t, "count").ok().flatten().unwrap_or(0);
    [
        n(tag::REMAINING_SUBOPERATIONS),
        n(tag::COMPLETED_SUBOPERATIONS),
        n(tag::FAILED_SUBOPERATIONS),
        n(tag::WARNING_SUBOPERATIONS),
    ]
}

/// Checks that `rsp` is the `field` response to message `id`.
fn responds_to(
    rsp: &crate::dimse::command::Command,
    field: u16,
    id: u16,
) -> Result<(), ClientError> {
    let to = rsp
        .u16(tag::MESSAGE_ID_BEING_RESPONDED_TO, "id")
        .ok()
        .flatten();
    if rsp.command_field().ok() != Some(field) || to != Some(id) {
        return Err(ClientError::Scu(crate::dimse::scu::ScuError::Protocol(
            format!("expected the response {field:04X} to message {id}, got another message"),
        )));
    }
    Ok(())
}

/// One data set as `(gggg,eeee) Keyword = value` lines.
pub fn render(bytes: &[u8], ts: &str) -> String {
    let Some(ts) = TransferSyntaxRegistry.get(ts) else {
        return "(unknown transfer syntax)\n".into();
    };
    let Ok(obj) = InMemDicomObject::read_dataset_with_ts(bytes, ts) else {
        return "(unreadable data set)\n".into();
    };
    let mut out = String::new();
    for e in &obj {
        let t = e.header().tag;
        let name = StandardDataDictionary
            .by_tag(t)
            .map(|d| d.alias().to_string())
            .unwrap_or_default();
        let value = e
            .value()
            .to_str()
            .map(|v| v.trim_end_matches(['\0', ' ']).to_string())
            .unwrap_or_else(|_| "(sequence)".into());
        out += &format!("({:04X},{:04X}) {name} = {value}\n", t.group(), t.element());
    }
    out
}

/// The Q/R SOP class of an operation in a model.
fn qr_class(study_root: bool, op: u16) -> &'static str {
    match (study_root, op) {
        (false, field::C_FIND_RQ) => uids::PATIENT_ROOT_FIND,
        (false, field::C_MOVE_RQ) => uids::PATIENT_ROOT_MOVE,
        (true, field::C_FIND_RQ) => uids::STUDY_ROOT_FIND,
        _ => uids::STUDY_ROOT_MOVE,
    }
}

/// C-FIND: prints each match as it arrives; returns the number of matches and the final status.
pub async fn find(
    cfg: &Config,
    target: &Target,
    study_root: bool,
    keys: &[String],
    mut on_match: impl FnMut(&str),
) -> Result<(usize, u16), ClientError> {
    let class = qr_class(study_root, field::C_FIND_RQ);
    let (mut scu, ctx, ts, id) = open_query(cfg, target, class, keys).await?;
    let message_id = scu
        .request(ctx, field::C_FIND_RQ, class, Some(id), |b| {
            b.u16(tag::PRIORITY, 0)
        })
        .await?;
    let mut matches = 0;
    loop {
        let (_, rsp, data) = scu.receive_message(TIMEOUT).await?;
        responds_to(&rsp, field::C_FIND_RSP, message_id)?;
        let status = status_of(&rsp);
        if matches!(status, 0xFF00 | 0xFF01) {
            matches += 1;
            if let Some(d) = data {
                on_match(&render(&d, &ts));
            }
            continue;
        }
        scu.release(Duration::from_secs(10)).await;
        return Ok((matches, status));
    }
}

/// Storage classes a C-GET offers to receive, each in every syntax of [`GET_SYNTAXES`].
const GET_CLASSES: [&str; 20] = [
    "1.2.840.10008.5.1.4.1.1.2",     // CT
    "1.2.840.10008.5.1.4.1.1.2.1",   // Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4",     // MR
    "1.2.840.10008.5.1.4.1.1.4.1",   // Enhanced MR
    "1.2.840.10008.5.1.4.1.1.1",     // CR
    "1.2.840.10008.5.1.4.1.1.1.1",   // DX for presentation
    "1.2.840.10008.5.1.4.1.1.1.2",   // MG for presentation
    "1.2.840.10008.5.1.4.1.1.6.1",   // US
    "1.2.840.10008.5.1.4.1.1.3.1",   // US multi-frame
    "1.2.840.10008.5.1.4.1.1.7",     // Secondary Capture
    "1.2.840.10008.5.1.4.1.1.12.1",  // XA
    "1.2.840.10008.5.1.4.1.1.12.2",  // RF
    "1.2.840.10008.5.1.4.1.1.20",    // NM
    "1.2.840.10008.5.1.4.1.1.128",   // PET
    "1.2.840.10008.5.1.4.1.1.481.1", // RT Image
    "1.2.840.10008.5.1.4.1.1.481.2", // RT Dose
    "1.2.840.10008.5.1.4.1.1.481.3", // RT Structure Set
    "1.2.840.10008.5.1.4.1.1.88.22", // Enhanced SR
    "1.2.840.10008.5.1.4.1.1.104.1", // Encapsulated PDF
    "1.2.840.10008.5.1.4.1.1.66.4",  // Segmentation
];

/// Each its own context, so that an instance comes back in the syntax it is stored in.
const GET_SYNTAXES: [&str; 6] = [
    uids::EXPLICIT_VR_LITTLE_ENDIAN,
    "1.2.840.10008.1.2.4.50", // JPEG Baseline
    "1.2.840.10008.1.2.4.70", // JPEG Lossless SV1
    "1.2.840.10008.1.2.4.90", // JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91", // JPEG 2000
    "1.2.840.10008.1.2.5",    // RLE
];

/// C-GET into `out`: every instance the peer sends is written as `<SOP Instance UID>.dcm`, data
/// set bytes as received. Returns the final status, the counts and the files written.
pub async fn get(
    cfg: &Config,
    target: &Target,
    study_root: bool,
    keys: &[String],
    out: &std::path::Path,
) -> Result<(u16, [u16; 4], Vec<PathBuf>), ClientError> {
    let class = if study_root {
        uids::STUDY_ROOT_GET
    } else {
        uids::PATIENT_ROOT_GET
    };
    std::fs::create_dir_all(out)?;
    let mut proposals: Vec<(String, Vec<String>)> = vec![(
        class.into(),
        vec![
            uids::EXPLICIT_VR_LITTLE_ENDIAN.into(),
            uids::IMPLICIT_VR_LITTLE_ENDIAN.into(),
        ],
    )];
    for c in GET_CLASSES {
        proposals.push((
            c.into(),
            vec![
                uids::EXPLICIT_VR_LITTLE_ENDIAN.into(),
                uids::IMPLICIT_VR_LITTLE_ENDIAN.into(),
            ],
        ));
        for ts in &GET_SYNTAXES[1..] {
            proposals.push((c.into(), vec![ts.to_string()]));
        }
    }
    let roles: Vec<String> = GET_CLASSES.iter().map(|c| c.to_string()).collect();
    let mut scu = Scu::connect_with_roles(
        &target.host,
        target.port,
        &cfg.node.ae_title,
        &target.ae_title,
        &proposals,
        &roles,
        cfg.node.max_pdu_length,
        TIMEOUT,
    )
    .await?;
    let (ctx, ts) = context_for(&scu, class)?;
    let id = encode(&identifier(keys)?, &ts)?;
    let message_id = scu
        .request(ctx, field::C_GET_RQ, class, Some(id), |b| {
            b.u16(tag::PRIORITY, 0)
        })
        .await?;
    let mut written = Vec::new();
    loop {
        let (context_id, cmd, data) = scu.receive_message(Duration::from_secs(3600)).await?;
        if cmd.command_field().ok() == Some(field::C_STORE_RQ) {
            let syntax = scu
                .contexts
                .iter()
                .find(|c| c.id == context_id)
                .map(|c| c.transfer_syntax.clone())
                .unwrap_or_default();
            let class = cmd.string(tag::AFFECTED_SOP_CLASS_UID).unwrap_or_default();
            let uid = cmd
                .string(tag::AFFECTED_SOP_INSTANCE_UID)
                .unwrap_or_default();
            let safe: String = uid
                .chars()
                .filter(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            let context_class = scu
                .contexts
                .iter()
                .find(|c| c.id == context_id)
                .map(|c| c.abstract_syntax.clone());
            // A sub-operation we cannot keep faithfully is refused, not written half.
            let status = if safe.is_empty() || data.is_none() || syntax.is_empty() {
                0xC000
            } else if context_class.as_deref() != Some(class.as_str()) {
                0xA900
            } else {
                let path = out.join(format!("{safe}.dcm"));
                let mut bytes =
                    crate::dicom::part10::write(&class, &uid, &syntax, &target.ae_title);
                bytes.extend_from_slice(&data.unwrap_or_default());
                match std::fs::write(&path, bytes) {
                    Ok(()) => {
                        written.push(path);
                        0x0000
                    }
                    Err(_) => 0xA700,
                }
            };
            scu.store_response(context_id, &cmd, status).await?;
            continue;
        }
        responds_to(&cmd, field::C_GET_RSP, message_id)?;
        let status = status_of(&cmd);
        let counts = counts_of(&cmd);
        if status == 0xFF00 {
            continue;
        }
        scu.release(Duration::from_secs(10)).await;
        return Ok((status, counts, written));
    }
}

/// C-MOVE to `destination`; `on_pending` gets (remaining, completed, failed, warning).
pub async fn move_to(
    cfg: &Config,
    target: &Target,
    study_root: bool,
    destination: &str,
    keys: &[String],
    mut on_pending: impl FnMut([u16; 4]),
) -> Result<(u16, [u16; 4]), ClientError> {
    let class = qr_class(study_root, field::C_MOVE_RQ);
    let (mut scu, ctx, _, id) = open_query(cfg, target, class, keys).await?;
    let message_id = scu
        .request(ctx, field::C_MOVE_RQ, class, Some(id), |b| {
            b.u16(tag::PRIORITY, 0)
                .text(tag::MOVE_DESTINATION, destination, 16)
        })
        .await?;
    loop {
        let (_, rsp, _) = scu.receive_message(Duration::from_secs(3600)).await?;
        responds_to(&rsp, field::C_MOVE_RSP, message_id)?;
        let status = status_of(&rsp);
        let counts = counts_of(&rsp);
        if status == 0xFF00 {
            on_pending(counts);
            continue;
        }
        scu.release(Duration::from_secs(10)).await;
        return Ok((status, counts));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_come_from_peers_or_ae_at_host_port() {
        let mut cfg: Config =
            toml_config("[peers.pacs]\nae_title = \"PACS\"\nhost = \"10.0.0.5\"\nport = 104\n");
        cfg.node.ae_title = "ME".into();
        assert_eq!(
            Target::resolve(&cfg, "pacs").unwrap(),
            Target {
                ae_title: "PACS".into(),
                host: "10.0.0.5".into(),
                port: 104
            }
        );
        assert_eq!(
            Target::resolve(&cfg, "ORTHANC@127.0.0.1:4242")
                .unwrap()
                .port,
            4242
        );
        for bad in [
            "nope",
            "AE@host",
            "AE@host:x",
            "@h:1",
            "THIS_AE_TITLE_IS_TOO_LONG@h:1",
        ] {
            let e = Target::resolve(&cfg, bad).unwrap_err().to_string();
            assert!(e.contains("pacs"), "{bad}: {e}");
        }
    }

    fn toml_config(text: &str) -> Config {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, text).unwrap();
        Config::load(&p).unwrap()
    }

    #[test]
    fn identifiers_take_keywords_and_tags() {
        let keys: Vec<String> = [
            "QueryRetrieveLevel=STUDY",
            "PatientID=P1",
            "0020,000D",
            "StudyDate=20240101-",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let obj = identifier(&keys).unwrap();
        let bytes = encode(&obj, uids::EXPLICIT_VR_LITTLE_ENDIAN).unwrap();
        let text = render(&bytes, uids::EXPLICIT_VR_LITTLE_ENDIAN);
        assert!(
            text.contains("(0008,0052) QueryRetrieveLevel = STUDY"),
            "{text}"
        );
        assert!(text.contains("(0010,0020) PatientID = P1"), "{text}");
        assert!(text.contains("(0020,000D) StudyInstanceUID = \n"), "{text}");
        assert!(text.contains("StudyDate = 20240101-"), "{text}");
        assert!(identifier(&["NoSuchKeyword=1".to_string()]).is_err());
        let rows = identifier(&["Rows=512".to_string()]).unwrap();
        let text = render(
            &encode(&rows, uids::EXPLICIT_VR_LITTLE_ENDIAN).unwrap(),
            uids::EXPLICIT_VR_LITTLE_ENDIAN,
        );
        assert!(text.contains("(0028,0010) Rows = 512"), "{text}");
        assert!(identifier(&["Rows=many".to_string()]).is_err());
    }
}
