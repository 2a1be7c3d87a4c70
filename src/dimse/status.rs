//! DIMSE status codes (PS3.7 Annex C, PS3.4 §B.2.3) and a failure with its Error Comment. Which
//! error becomes which status is decided in one place above the wire: `scp::status`.

pub const SUCCESS: u16 = 0x0000;
/// PS3.7 §C.5.12: the SOP class in the command is not the one of the presentation context.
pub const SOP_CLASS_NOT_SUPPORTED: u16 = 0x0122;
/// Failure: Processing failure (PS3.7 C.4) — used on the ledger when an instance never reached
/// a forward destination.
pub const PROCESSING_FAILURE: u16 = 0x0110;
/// PS3.7 §C.5.x (general status): Refused: Not Authorized — the calling AE may not ask for this
/// operation (or, for C-MOVE, the destination may not receive it).
pub const NOT_AUTHORIZED: u16 = 0x0124;
/// PS3.7 §C.5.14.
pub const UNRECOGNIZED_OPERATION: u16 = 0x0211;
/// PS3.4 §B.2.3: Refused: Out of Resources.
pub const OUT_OF_RESOURCES: u16 = 0xA700;
/// PS3.4 §B.2.3: Error: Data Set does not match SOP Class.
pub const DATA_SET_DOES_NOT_MATCH_SOP_CLASS: u16 = 0xA900;
/// PS3.4 §B.2.3: Error: Cannot understand (C000–CFFF).
pub const CANNOT_UNDERSTAND: u16 = 0xC000;

/// PS3.4 C.4.1.1.4: Matching is continuing.
pub const PENDING: u16 = 0xFF00;
/// PS3.4 C.4.1.1.4: Matching terminated due to Cancel request.
pub const CANCEL: u16 = 0xFE00;
/// PS3.4 C.4.1.1.4: Failed: Unable to process (C000–CFFF), used for internal failures.
pub const UNABLE_TO_PROCESS: u16 = 0xC001;

/// PS3.4 C.4.2.1.5: Sub-operations complete, one or more failures or warnings.
pub const SUBOPERATIONS_FAILED: u16 = 0xB000;
/// PS3.4 C.4.2.1.5: Refused: Move Destination unknown.
pub const MOVE_DESTINATION_UNKNOWN: u16 = 0xA801;
/// PS3.4 C.4.2.1.5: Refused: Out of resources, unable to perform sub-operations.
pub const UNABLE_TO_PERFORM_SUBOPERATIONS: u16 = 0xA702;

/// PS3.7 §C.4: Error Comment is LO, at most 64 characters.
pub const ERROR_COMMENT_MAX: usize = 64;

/// A failure status with its Error Comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub status: u16,
    pub comment: String,
}

impl Failure {
    pub fn new(status: u16, comment: impl Into<String>) -> Failure {
        Failure {
            status,
            comment: comment.into(),
        }
    }
}

/// Whether a C-STORE-RSP status means the peer kept the instance: success or a warning
/// (PS3.4 B.2.3: 0001, 0107, 0116, Bxxx).
pub fn store_kept(code: u16) -> bool {
    matches!(code, 0x0000 | 0x0001 | 0x0107 | 0x0116 | 0xB000..=0xBFFF)
}
