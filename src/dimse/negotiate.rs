//! Association negotiation policy (PS3.8 §9.3.2–9.3.3, PS3.7 Annex D.3.3): which presentation
//! contexts we accept, and whether we accept the association at all. Pure: A-ASSOCIATE-RQ in,
//! A-ASSOCIATE-AC or -RJ out.
//!
//! Abstract syntaxes: Verification and every Storage SOP Class of the standard, looked up in
//! dicom-dictionary-std (so a new edition of the dictionary widens what we accept without code
//! changes). Transfer syntaxes: every one the transfer syntax registry can at least parse —
//! native, deflated and all encapsulated ones (JPEG family, JPEG-LS, JPEG 2000, HTJ2K, RLE,
//! MPEG/HEVC). We never decode pixel data, so a codec is not needed to accept a syntax.

use dicom_core::dictionary::{UidDictionary, UidDictionaryEntry, UidType};
use dicom_dictionary_std::StandardSopClassDictionary;
use dicom_encoding::TransferSyntaxIndex;
use dicom_transfer_syntax_registry::TransferSyntaxRegistry;
use dicom_ul::pdu::{
    AssociationAC, AssociationRJ, AssociationRJResult, AssociationRJServiceUserReason,
    AssociationRJSource, AssociationRQ, PresentationContextResult, PresentationContextResultReason,
    UserVariableItem,
};

use crate::dicom::uids::{
    EXPLICIT_VR_BIG_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN, IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME, IMPLICIT_VR_LITTLE_ENDIAN, PATIENT_ROOT_FIND, PATIENT_ROOT_GET,
    PATIENT_ROOT_MOVE, STUDY_ROOT_FIND, STUDY_ROOT_GET, STUDY_ROOT_MOVE, VERIFICATION,
};

/// PS3.7 Annex A: the only application context name.
pub const APPLICATION_CONTEXT: &str = "1.2.840.10008.3.1.1.1";
/// PS3.8 §9.3.1: a requestor that sends no maximum length (or 0) has no limit; we cap our writes.
pub const PEER_UNLIMITED_CAP: u32 = 1024 * 1024;

fn trim(uid: &str) -> &str {
    uid.trim_end_matches(['\0', ' '])
}

/// Is `uid` a Storage SOP Class of the standard (PS3.4 Annex B), retired ones included?
pub fn is_storage_sop_class(uid: &str) -> bool {
    match StandardSopClassDictionary.by_uid(trim(uid)) {
        Some(entry) => {
            entry.r#type == UidType::SopClass
                && entry.alias().contains("Storage")
                && !entry.alias().starts_with("StorageCommitment")
                && entry.alias() != "MediaStorageDirectoryStorage"
        }
        None => false,
    }
}

/// Can we receive data sets in this transfer syntax? Any syntax whose data set encoding the
/// registry knows; pixel data is never decoded, so encapsulated syntaxes without a codec qualify.
pub fn is_accepted_transfer_syntax(uid: &str) -> bool {
    TransferSyntaxRegistry
        .get(trim(uid))
        .map(|ts| !ts.is_unsupported())
        .unwrap_or(false)
}

/// Query/Retrieve FIND SOP classes (PS3.4 C.6): Patient Root and Study Root.
pub const FIND_SOP_CLASSES: [&str; 2] = [PATIENT_ROOT_FIND, STUDY_ROOT_FIND];

/// Query/Retrieve MOVE and GET SOP classes (PS3.4 C.6).
pub const RETRIEVE_SOP_CLASSES: [&str; 4] = [
    PATIENT_ROOT_MOVE,
    STUDY_ROOT_MOVE,
    PATIENT_ROOT_GET,
    STUDY_ROOT_GET,
];

/// The uncompressed syntaxes: the only ones for messages without pixel data (C-ECHO, C-FIND).
const NATIVE_SYNTAXES: [&str; 3] = [
    IMPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
];

/// What an accepted association agreed on.
#[derive(Debug, Clone)]
pub struct Negotiated {
    pub calling_ae: String,
    pub called_ae: String,
    /// Accepted presentation contexts: (id, abstract syntax, transfer syntax).
    pub contexts: Vec<AcceptedContext>,
    /// Largest PDU the peer accepts from us.
    pub peer_max_pdu: u32,
    /// FIND SOP classes for which the requestor asked for, and we granted, combined date-time
    /// range matching (SOP Class Extended Negotiation, PS3.4 C.5.1.1 byte 2).
    pub combined_datetime: Vec<String>,
    /// Storage SOP classes for which the requestor takes the SCP role (SCP/SCU Role Selection,
    /// PS3.7 D.3.3.4): C-GET sends those to it over this association.
    pub scp_role: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedContext {
    pub id: u8,
    pub abstract_syntax: String,
    pub transfer_syntax: String,
}

impl Negotiated {
    pub fn context(&self, id: u8) -> Option<&AcceptedContext> {
        self.contexts.iter().find(|c| c.id == id)
    }
}

/// The node's side of the negotiation.
#[derive(Debug, Clone)]
pub struct Policy {
    pub ae_title: String,
    pub check_called_ae: bool,
    pub max_pdu_length: u32,
}

fn reject(reason: AssociationRJServiceUserReason) -> AssociationRJ {
    AssociationRJ {
        result: AssociationRJResult::Permanent,
        source: AssociationRJSource::ServiceUser(reason),
    }
}

/// Decides on an A-ASSOCIATE-RQ.
pub fn negotiate(
    policy: &Policy,
    rq: &AssociationRQ,
) -> Result<(AssociationAC, Negotiated), AssociationRJ> {
    check_request(policy, rq)?;
    let mut peer_max_pdu = PEER_UNLIMITED_CAP;
    for item in &rq.user_variables {
        if let UserVariableItem::MaxLength(len) = item {
            peer_max_pdu = if *len == 0 {
                PEER_UNLIMITED_CAP
            } else {
                (*len).min(PEER_UNLIMITED_CAP)
            };
        }
    }
    let (results, contexts) = presentation_contexts(rq);
    let (extended, combined_datetime, scp_role) = extended_negotiation(rq, &contexts);
    let ac = AssociationAC {
        protocol_version: 1,
        application_context_name: APPLICATION_CONTEXT.to_string(),
        calling_ae_title: rq.calling_ae_title.clone(),
        called_ae_title: rq.called_ae_title.clone(),
        presentation_contexts: results,
        user_variables: vec![
            UserVariableItem::MaxLength(policy.max_pdu_length),
            UserVariableItem::ImplementationClassUID(IMPLEMENTATION_CLASS_UID.to_string()),
            UserVariableItem::ImplementationVersionName(IMPLEMENTATION_VERSION_NAME.to_string()),
        ]
        .into_iter()
        .chain(extended)
        .collect(),
    };
    Ok((
        ac,
        Negotiated {
            calling_ae: rq.calling_ae_title.trim().to_string(),
            called_ae: rq.called_ae_title.trim().to_string(),
            contexts,
            peer_max_pdu,
            combined_datetime,
            scp_role,
        },
    ))
}

/// The checks of an A-ASSOCIATE-RQ as a whole: protocol version, application context, the AE
/// titles (PS3.5 §6.2, and the called title when `check_called_ae`).
fn check_request(policy: &Policy, rq: &AssociationRQ) -> Result<(), AssociationRJ> {
    if rq.protocol_version & 1 == 0 {
        // PS3.8 §9.3.2: bit 0 must be set (version 1).
        return Err(AssociationRJ {
            result: AssociationRJResult::Permanent,
            source: AssociationRJSource::ServiceProviderASCE(
                dicom_ul::pdu::AssociationRJServiceProviderASCEReason::ProtocolVersionNotSupported,
            ),
        });
    }
    if trim(&rq.application_context_name) != APPLICATION_CONTEXT {
        return Err(reject(
            AssociationRJServiceUserReason::ApplicationContextNameNotSupported,
        ));
    }
    // PS3.5 §6.2 (AE): at most 16 characters of the default repertoire, not all spaces, no
    // backslash and no control characters. A title outside it is refused before it can reach a
    // log line, the audit trail or the access rules.
    if !crate::config::valid_ae_title(&rq.calling_ae_title) {
        return Err(reject(
            AssociationRJServiceUserReason::CallingAETitleNotRecognized,
        ));
    }
    if !crate::config::valid_ae_title(&rq.called_ae_title) {
        return Err(reject(
            AssociationRJServiceUserReason::CalledAETitleNotRecognized,
        ));
    }
    if policy.check_called_ae && rq.called_ae_title.trim() != policy.ae_title.trim() {
        return Err(reject(
            AssociationRJServiceUserReason::CalledAETitleNotRecognized,
        ));
    }
    Ok(())
}

/// The answer to each proposed presentation context, and the accepted ones.
fn presentation_contexts(
    rq: &AssociationRQ,
) -> (Vec<PresentationContextResult>, Vec<AcceptedContext>) {
    let mut results = Vec::with_capacity(rq.presentation_contexts.len());
    let mut contexts = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for pc in &rq.presentation_contexts {
        // PS3.8 §9.3.2.2: context IDs are odd and unique; refuse the ones that are not, so a
        // PDV's context ID always names exactly one abstract syntax.
        if pc.id % 2 == 0 || !seen.insert(pc.id) {
            results.push(PresentationContextResult {
                id: pc.id,
                reason: PresentationContextResultReason::NoReason,
                transfer_syntax: IMPLICIT_VR_LITTLE_ENDIAN.to_string(),
            });
            continue;
        }
        let abstract_syntax = trim(&pc.abstract_syntax);
        let storage = is_storage_sop_class(abstract_syntax);
        let known = storage
            || abstract_syntax == VERIFICATION
            || FIND_SOP_CLASSES.contains(&abstract_syntax)
            || RETRIEVE_SOP_CLASSES.contains(&abstract_syntax);
        // PS3.8 §9.3.3.2: the acceptor picks one of the proposed syntaxes; we honour the
        // requestor's order, so a modality that prefers its compressed syntax keeps it.
        let chosen = pc.transfer_syntaxes.iter().map(|ts| trim(ts)).find(|ts| {
            if storage {
                is_accepted_transfer_syntax(ts)
            } else {
                NATIVE_SYNTAXES.contains(ts)
            }
        });
        let (reason, ts) = match (known, chosen) {
            (false, _) => (
                PresentationContextResultReason::AbstractSyntaxNotSupported,
                IMPLICIT_VR_LITTLE_ENDIAN,
            ),
            (true, None) => (
                PresentationContextResultReason::TransferSyntaxesNotSupported,
                IMPLICIT_VR_LITTLE_ENDIAN,
            ),
            (true, Some(ts)) => {
                contexts.push(AcceptedContext {
                    id: pc.id,
                    abstract_syntax: abstract_syntax.to_string(),
                    transfer_syntax: ts.to_string(),
                });
                (PresentationContextResultReason::Acceptance, ts)
            }
        };
        results.push(PresentationContextResult {
            id: pc.id,
            reason,
            transfer_syntax: ts.to_string(),
        });
    }
    (results, contexts)
}

/// The user items answered for the accepted contexts: SOP class extended negotiation of the FIND
/// classes and SCP role selection for C-GET; also the FIND classes granted combined date-time
/// matching and the storage classes the requestor takes the SCP role for.
fn extended_negotiation(
    rq: &AssociationRQ,
    contexts: &[AcceptedContext],
) -> (Vec<UserVariableItem>, Vec<String>, Vec<String>) {
    // Extended negotiation for the FIND classes we accepted: only combined date-time matching is
    // offered (relational queries, fuzzy names and timezone adjustment are refused: 0).
    let mut combined_datetime = Vec::new();
    let mut extended = Vec::new();
    for item in &rq.user_variables {
        if let UserVariableItem::SopClassExtendedNegotiationSubItem(uid, info) = item {
            let uid = trim(uid);
            if FIND_SOP_CLASSES.contains(&uid) && contexts.iter().any(|c| c.abstract_syntax == uid)
            {
                let combined = info.get(1).copied().unwrap_or(0) == 1;
                if combined {
                    combined_datetime.push(uid.to_string());
                }
                let granted = [0, u8::from(combined), 0, 0];
                extended.push(UserVariableItem::SopClassExtendedNegotiationSubItem(
                    uid.to_string(),
                    granted[..info.len().clamp(1, 4)].to_vec(),
                ));
            }
        }
    }
    // Role selection: a requestor that will receive C-GET sub-operations proposes the SCP role
    // for the storage classes; we accept it (dicom-ul's default negotiation accepts none).
    let mut scp_role = Vec::new();
    for item in &rq.user_variables {
        if let UserVariableItem::ScuScpRoleSelectionSubItem(uid, roles) = item {
            let uid = trim(uid);
            if is_storage_sop_class(uid) && contexts.iter().any(|c| c.abstract_syntax == uid) {
                if roles.scp {
                    scp_role.push(uid.to_string());
                }
                extended.push(UserVariableItem::ScuScpRoleSelectionSubItem(
                    uid.to_string(),
                    dicom_ul::pdu::RequestorRoles {
                        scu: roles.scu,
                        scp: roles.scp,
                    },
                ));
            }
        }
    }
    (extended, combined_datetime, scp_role)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dicom_ul::pdu::PresentationContextProposed;

    fn policy() -> Policy {
        Policy {
            ae_title: "DICOMCHAIN".into(),
            check_called_ae: true,
            max_pdu_length: 65536,
        }
    }

    fn rq(called: &str, pcs: Vec<(u8, &str, Vec<&str>)>) -> AssociationRQ {
        AssociationRQ {
            protocol_version: 1,
            calling_ae_title: "STORESCU".into(),
            called_ae_title: called.into(),
            application_context_name: APPLICATION_CONTEXT.into(),
            presentation_contexts: pcs
                .into_iter()
                .map(|(id, a, ts)| PresentationContextProposed {
                    id,
                    abstract_syntax: a.into(),
                    transfer_syntaxes: ts.into_iter().map(String::from).collect(),
                })
                .collect(),
            user_variables: vec![UserVariableItem::MaxLength(16384)],
        }
    }

    #[test]
    fn storage_classes_come_from_the_dictionary() {
        assert!(is_storage_sop_class("1.2.840.10008.5.1.4.1.1.2")); // CT
        assert!(is_storage_sop_class("1.2.840.10008.5.1.4.1.1.4\0")); // MR, padded
        assert!(is_storage_sop_class("1.2.840.10008.5.1.4.1.1.88.11")); // Basic Text SR
        assert!(is_storage_sop_class("1.2.840.10008.5.1.4.1.1.104.1")); // Encapsulated PDF
        assert!(is_storage_sop_class("1.2.840.10008.5.1.4.1.1.6")); // retired US
        assert!(!is_storage_sop_class("1.2.840.10008.1.20.1")); // Storage Commitment
        assert!(!is_storage_sop_class("1.2.840.10008.1.3.10")); // DICOMDIR
        assert!(!is_storage_sop_class("1.2.840.10008.5.1.4.1.2.2.1")); // Study Root FIND
        assert!(!is_storage_sop_class("1.2.3.4"));
    }

    #[test]
    fn transfer_syntaxes_include_every_encapsulated_one() {
        for ts in [
            "1.2.840.10008.1.2",
            "1.2.840.10008.1.2.1",
            "1.2.840.10008.1.2.2",
            "1.2.840.10008.1.2.1.99",
            "1.2.840.10008.1.2.4.50",
            "1.2.840.10008.1.2.4.57",
            "1.2.840.10008.1.2.4.70",
            "1.2.840.10008.1.2.4.80",
            "1.2.840.10008.1.2.4.81",
            "1.2.840.10008.1.2.4.90",
            "1.2.840.10008.1.2.4.91",
            "1.2.840.10008.1.2.4.201",
            "1.2.840.10008.1.2.4.203",
            "1.2.840.10008.1.2.5",
            "1.2.840.10008.1.2.4.100",
            "1.2.840.10008.1.2.4.102",
            "1.2.840.10008.1.2.4.107",
        ] {
            assert!(is_accepted_transfer_syntax(ts), "{ts}");
        }
        assert!(!is_accepted_transfer_syntax("1.2.3.4.5"));
    }

    #[test]
    fn accepts_known_contexts_and_refuses_others() {
        let (ac, neg) = negotiate(
            &policy(),
            &rq(
                "DICOMCHAIN",
                vec![
                    (1, VERIFICATION, vec!["1.2.840.10008.1.2"]),
                    (
                        3,
                        "1.2.840.10008.5.1.4.1.1.2",
                        vec!["1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.1"],
                    ),
                    (
                        5,
                        "1.2.840.10008.5.1.4.1.2.2.1",
                        vec!["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2"],
                    ),
                    (7, "1.2.840.10008.5.1.4.1.1.4", vec!["9.9.9"]),
                    // Modality Worklist FIND: not ours.
                    (9, "1.2.840.10008.5.1.4.31", vec!["1.2.840.10008.1.2"]),
                    (11, "1.2.840.10008.5.1.4.1.2.2.2", vec!["1.2.840.10008.1.2"]),
                ],
            ),
        )
        .unwrap();
        assert_eq!(neg.peer_max_pdu, 16384);
        assert_eq!(
            neg.context(3).unwrap().transfer_syntax,
            "1.2.840.10008.1.2.4.70"
        );
        // Query/Retrieve: native syntaxes only.
        assert_eq!(neg.context(5).unwrap().transfer_syntax, "1.2.840.10008.1.2");
        assert_eq!(
            neg.context(11).unwrap().transfer_syntax,
            "1.2.840.10008.1.2"
        );
        assert!(neg.context(7).is_none() && neg.context(9).is_none());
        let (_, dup) = negotiate(
            &policy(),
            &rq(
                "DICOMCHAIN",
                vec![
                    (1, VERIFICATION, vec!["1.2.840.10008.1.2"]),
                    (1, "1.2.840.10008.5.1.4.1.1.2", vec!["1.2.840.10008.1.2"]),
                    (2, "1.2.840.10008.5.1.4.1.1.2", vec!["1.2.840.10008.1.2"]),
                ],
            ),
        )
        .unwrap();
        assert_eq!(dup.contexts.len(), 1);
        assert_eq!(dup.context(1).unwrap().abstract_syntax, VERIFICATION);
        let reasons: Vec<_> = ac
            .presentation_contexts
            .iter()
            .map(|p| p.reason.clone())
            .collect();
        assert_eq!(
            reasons,
            vec![
                PresentationContextResultReason::Acceptance,
                PresentationContextResultReason::Acceptance,
                PresentationContextResultReason::Acceptance,
                PresentationContextResultReason::TransferSyntaxesNotSupported,
                PresentationContextResultReason::AbstractSyntaxNotSupported,
                PresentationContextResultReason::Acceptance,
            ]
        );
    }

    #[test]
    fn role_selection_and_extended_negotiation_are_answered() {
        let mut r = rq(
            "DICOMCHAIN",
            vec![
                (1, "1.2.840.10008.5.1.4.1.2.2.3", vec!["1.2.840.10008.1.2"]),
                (3, "1.2.840.10008.5.1.4.1.1.2", vec!["1.2.840.10008.1.2.1"]),
                (5, "1.2.840.10008.5.1.4.1.2.2.1", vec!["1.2.840.10008.1.2"]),
            ],
        );
        r.user_variables
            .push(UserVariableItem::ScuScpRoleSelectionSubItem(
                "1.2.840.10008.5.1.4.1.1.2".into(),
                dicom_ul::pdu::RequestorRoles {
                    scu: false,
                    scp: true,
                },
            ));
        // Role selection for a class without a context is ignored.
        r.user_variables
            .push(UserVariableItem::ScuScpRoleSelectionSubItem(
                "1.2.840.10008.5.1.4.1.1.4".into(),
                dicom_ul::pdu::RequestorRoles {
                    scu: false,
                    scp: true,
                },
            ));
        r.user_variables
            .push(UserVariableItem::SopClassExtendedNegotiationSubItem(
                "1.2.840.10008.5.1.4.1.2.2.1".into(),
                vec![1, 1, 1, 1],
            ));
        let (ac, neg) = negotiate(&policy(), &r).unwrap();
        assert_eq!(neg.scp_role, vec!["1.2.840.10008.5.1.4.1.1.2".to_string()]);
        assert_eq!(
            neg.combined_datetime,
            vec!["1.2.840.10008.5.1.4.1.2.2.1".to_string()]
        );
        // Only combined date-time matching is granted; relational, fuzzy and timezone are not.
        assert!(ac
            .user_variables
            .contains(&UserVariableItem::SopClassExtendedNegotiationSubItem(
                "1.2.840.10008.5.1.4.1.2.2.1".into(),
                vec![0, 1, 0, 0],
            )));
        assert!(ac
            .user_variables
            .contains(&UserVariableItem::ScuScpRoleSelectionSubItem(
                "1.2.840.10008.5.1.4.1.1.2".into(),
                dicom_ul::pdu::RequestorRoles {
                    scu: false,
                    scp: true
                },
            )));
    }

    #[test]
    fn wrong_called_ae_is_rejected_unless_the_check_is_off() {
        let r = rq("OTHER", vec![(1, VERIFICATION, vec!["1.2.840.10008.1.2"])]);
        let rj = negotiate(&policy(), &r).unwrap_err();
        assert_eq!(
            rj.source,
            AssociationRJSource::ServiceUser(
                AssociationRJServiceUserReason::CalledAETitleNotRecognized
            )
        );
        let mut p = policy();
        p.check_called_ae = false;
        assert!(negotiate(&p, &r).is_ok());
    }

    #[test]
    fn ae_titles_outside_ps3_5_are_rejected() {
        let calling = AssociationRJSource::ServiceUser(
            AssociationRJServiceUserReason::CallingAETitleNotRecognized,
        );
        let called = AssociationRJSource::ServiceUser(
            AssociationRJServiceUserReason::CalledAETitleNotRecognized,
        );
        let mut p = policy();
        p.check_called_ae = false;
        let titles = [
            "EVIL\nINFO fake",
            "A\rB",
            "ESC\u{1b}[2J",
            "BACK\\SLASH",
            "",
            "SEVENTEEN_CHARS_X",
            "CAF\u{e9}",
            "TAB\tX",
        ];
        for bad in titles {
            let mut r = rq(
                "DICOMCHAIN",
                vec![(1, VERIFICATION, vec!["1.2.840.10008.1.2"])],
            );
            r.calling_ae_title = bad.into();
            assert_eq!(negotiate(&p, &r).unwrap_err().source, calling, "{bad:?}");
            let mut r = rq(bad, vec![(1, VERIFICATION, vec!["1.2.840.10008.1.2"])]);
            r.calling_ae_title = "STORESCU".into();
            assert_eq!(negotiate(&p, &r).unwrap_err().source, called, "{bad:?}");
        }
        let r = rq(
            "DICOMCHAIN",
            vec![(1, VERIFICATION, vec!["1.2.840.10008.1.2"])],
        );
        assert!(negotiate(&p, &r).is_ok());
    }
}
