//! The way an object's plaintext takes to its backend: hashed (its length and SHA-256, which the
//! ledger records as the pixel data's) and, when the store has a master key, sealed.
//!
//! One place for both, so that a backend can run them where it likes: the fs backend runs them
//! on its writer in the blocking pool, beside the reception of the next bytes, rather than on
//! the association's task (they are most of the CPU an instance costs).

use sha2::{Digest as _, Sha256};

use super::sealed::Sealer;
use crate::instance::Digest32;

/// Hashes plaintext and seals it (or passes it on as it is).
pub struct Coder {
    hash: Sha256,
    len: u64,
    sealer: Option<Sealer>,
}

impl Coder {
    pub fn new(sealer: Option<Sealer>) -> Coder {
        Coder {
            hash: Sha256::new(),
            len: 0,
            sealer,
        }
    }

    /// Whether the object is sealed: then what goes to the backend is what [`Coder::push`]
    /// appends to its output, otherwise the plaintext itself.
    pub fn seals(&self) -> bool {
        self.sealer.is_some()
    }

    /// Plaintext held back by the sealer (at most one chunk).
    pub fn buffered(&self) -> usize {
        self.sealer.as_ref().map_or(0, Sealer::buffered)
    }

    /// Hashes `plain`; when sealing, appends every sealed chunk known not to be the last to
    /// `out`.
    pub fn push(&mut self, plain: &[u8], out: &mut Vec<u8>) {
        self.hash.update(plain);
        self.len += plain.len() as u64;
        if let Some(s) = &mut self.sealer {
            s.push(plain, out);
        }
    }

    /// Seals the last chunk into `out` (nothing for a plaintext object) and returns the
    /// plaintext's length and SHA-256.
    pub fn finish(self, out: &mut Vec<u8>) -> (u64, Digest32) {
        if let Some(s) = self.sealer {
            s.finish(out);
        }
        (self.len, self.hash.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plaintext_coder_hashes_and_passes_the_bytes_on() {
        let mut c = Coder::new(None);
        let mut out = Vec::new();
        c.push(b"hello ", &mut out);
        c.push(b"world", &mut out);
        assert!(!c.seals() && out.is_empty());
        assert_eq!(
            c.finish(&mut out),
            (11, <[u8; 32]>::from(Sha256::digest(b"hello world")))
        );
        assert!(out.is_empty());
    }
}
