//! The one place where the errors of the services become DIMSE statuses: an ingest error for
//! C-STORE, a bad identifier or a query that could not finish for C-FIND.

use crate::archive::ingest::IngestError;
use crate::dimse::status::*;
use crate::query::matching::QueryError;
use crate::query::FindError;

/// The C-STORE status for an ingest error.
pub fn store_failure(e: &IngestError) -> Failure {
    let status = match e {
        IngestError::Split(_) | IngestError::Parse(_) | IngestError::Deflate(_) => {
            CANNOT_UNDERSTAND
        }
        IngestError::SopClassMismatch { .. } => DATA_SET_DOES_NOT_MATCH_SOP_CLASS,
        IngestError::MetadataTooLarge { .. }
        | IngestError::MemoryBudget { .. }
        | IngestError::Store(_)
        | IngestError::Ledger(_) => OUT_OF_RESOURCES,
    };
    let comment = match e {
        IngestError::Store(_) => "object store unavailable".to_string(),
        IngestError::Ledger(_) => "ledger unavailable".to_string(),
        // Short enough for the Error Comment (LO, 64 characters) to keep the key's name, which
        // tells the sender's administrator which limit was met.
        IngestError::MetadataTooLarge { .. } => {
            "non-pixel data larger than node.max_metadata_bytes".to_string()
        }
        IngestError::MemoryBudget { .. } => {
            "node.max_bytes_in_flight in use; try again later".to_string()
        }
        other => other.to_string(),
    };
    Failure::new(status, comment)
}

/// The C-FIND status for an identifier we cannot answer: a level or model mismatch is
/// "Identifier does not match SOP Class" (A900); a malformed identifier "Unable to process" (C000).
pub fn find_failure(e: &QueryError) -> Failure {
    let status = match e {
        QueryError::NoLevel | QueryError::BadLevel(_) | QueryError::NotInModel(_) => {
            DATA_SET_DOES_NOT_MATCH_SOP_CLASS
        }
        QueryError::Malformed(_) => CANNOT_UNDERSTAND,
    };
    Failure::new(status, e.to_string())
}

/// The final C-FIND status for a query that could not finish.
pub fn find_error(e: &FindError) -> Failure {
    match e {
        FindError::TooMany(_) => Failure::new(OUT_OF_RESOURCES, e.to_string()),
        FindError::Cancelled => Failure::new(CANCEL, ""),
        FindError::Ledger(_) => Failure::new(OUT_OF_RESOURCES, "ledger unavailable"),
        FindError::Record(_) => Failure::new(UNABLE_TO_PROCESS, "stored metadata unreadable"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::StoreError;

    #[test]
    fn resource_failures_are_a700_and_bad_data_is_c000() {
        let e = IngestError::Store(StoreError::NotFound { name: "x".into() });
        assert_eq!(store_failure(&e).status, OUT_OF_RESOURCES);
        let e = IngestError::Ledger(crate::ledger::LedgerError::Closed);
        assert_eq!(store_failure(&e).status, OUT_OF_RESOURCES);
        let e = IngestError::SopClassMismatch {
            command: "1".into(),
            dataset: "2".into(),
        };
        assert_eq!(store_failure(&e).status, DATA_SET_DOES_NOT_MATCH_SOP_CLASS);
        for e in [
            IngestError::MetadataTooLarge { max: 64 << 20 },
            IngestError::MemoryBudget { max: 1 << 30 },
        ] {
            let f = store_failure(&e);
            assert_eq!(f.status, OUT_OF_RESOURCES);
            assert!(f.comment.len() <= ERROR_COMMENT_MAX, "{}", f.comment);
        }
        let e = IngestError::Parse(crate::instance::ParseError::Missing("SOP Class UID"));
        let f = store_failure(&e);
        assert_eq!(f.status, CANNOT_UNDERSTAND);
        assert!(f.comment.contains("SOP Class UID"));
    }
}
