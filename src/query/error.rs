//! Why a C-FIND (or the resolution of a C-MOVE or C-GET identifier) could not finish.

use crate::archive::retrieve::RetrieveError;
use crate::ledger::LedgerError;

#[derive(Debug, thiserror::Error)]
pub enum FindError {
    #[error("more than {0} matches; narrow the query")]
    TooMany(usize),
    #[error("query cancelled")]
    Cancelled,
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("stored metadata unreadable: {0}")]
    Record(String),
}

impl From<RetrieveError> for FindError {
    fn from(e: RetrieveError) -> Self {
        FindError::Record(e.to_string())
    }
}
