//! Signed checkpoints: C2SP `tlog-checkpoint` bodies in C2SP `signed-note` envelopes, with
//! Ed25519 (pure).
//!
//! A checkpoint body is three lines — origin, tree size in decimal, base64 root hash — each ending
//! in a newline. The note appends a blank line and one signature line
//! `— <key name> <base64(key ID ‖ signature)>`, where the key ID is the first four bytes of
//! SHA-256(key name ‖ 0x0A ‖ 0x01 ‖ public key) and the signature is Ed25519 over the body bytes.
//! Keys are written in the textual forms Go's `sumdb/note` and its ports read:
//! `PRIVATE+KEY+<name>+<hex id>+<base64(0x01 ‖ seed)>` and `<name>+<hex id>+<base64(0x01 ‖ key)>`.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::instance::Digest32;

/// The signature algorithm byte for Ed25519 (C2SP signed-note).
const ED25519: u8 = 0x01;

/// Problems with keys, notes and checkpoints.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NoteError {
    #[error("malformed key: {0}")]
    Key(&'static str),
    #[error("malformed note: {0}")]
    Note(&'static str),
    #[error("malformed checkpoint: {0}")]
    Checkpoint(&'static str),
    #[error("no valid signature by {0}")]
    Unverified(String),
}

/// A checkpoint's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Digest32,
}

impl Checkpoint {
    /// The C2SP tlog-checkpoint body.
    pub fn body(&self) -> String {
        format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.root)
        )
    }

    /// Parses a body (extension lines after the third are allowed and ignored).
    pub fn parse(body: &str) -> Result<Checkpoint, NoteError> {
        if !body.ends_with('\n') {
            return Err(NoteError::Checkpoint("body must end with a newline"));
        }
        let mut lines = body.split('\n');
        let origin = lines
            .next()
            .filter(|o| !o.is_empty())
            .ok_or(NoteError::Checkpoint("no origin"))?;
        let size = lines.next().ok_or(NoteError::Checkpoint("no tree size"))?;
        if size.is_empty()
            || size.len() > 20
            || !size.bytes().all(|b| b.is_ascii_digit())
            || (size.len() > 1 && size.starts_with('0'))
        {
            return Err(NoteError::Checkpoint("tree size is not a decimal number"));
        }
        let size = size
            .parse()
            .map_err(|_| NoteError::Checkpoint("tree size out of range"))?;
        let root = lines.next().ok_or(NoteError::Checkpoint("no root hash"))?;
        let root: Digest32 = B64
            .decode(root)
            .ok()
            .and_then(|v| v.try_into().ok())
            .ok_or(NoteError::Checkpoint("root hash is not 32 bytes of base64"))?;
        Ok(Checkpoint {
            origin: origin.to_string(),
            size,
            root,
        })
    }
}

/// Splits `<name>+<hex id>+<base64(0x01 ‖ 32 key bytes)>` (the form of both key texts after
/// any prefix). Base64 may contain '+': the key is everything after the second separator.
fn split_key(text: &str) -> Result<(&str, &str, [u8; 32]), NoteError> {
    let mut parts = text.splitn(3, '+');
    let (name, id, key) = match (parts.next(), parts.next(), parts.next()) {
        (Some(n), Some(i), Some(k)) => (n, i, k),
        _ => return Err(NoteError::Key("expected name+id+key")),
    };
    let raw = B64
        .decode(key)
        .map_err(|_| NoteError::Key("key is not base64"))?;
    match raw.split_first() {
        Some((&ED25519, k)) => {
            let k = k
                .try_into()
                .map_err(|_| NoteError::Key("Ed25519 key is not 32 bytes"))?;
            Ok((name, id, k))
        }
        _ => Err(NoteError::Key("not an Ed25519 key")),
    }
}

/// A key name must be non-empty and free of spaces and '+' (C2SP signed-note).
fn valid_name(name: &str) -> bool {
    !name.is_empty() && !name.contains(char::is_whitespace) && !name.contains('+')
}

/// The four-byte key ID of an Ed25519 key.
pub fn key_id(name: &str, public: &[u8; 32]) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([b'\n', ED25519]);
    h.update(public);
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

/// The node's signing key.
pub struct NoteSigner {
    name: String,
    key: SigningKey,
    id: [u8; 4],
}

impl NoteSigner {
    pub fn from_seed(name: &str, seed: [u8; 32]) -> Result<NoteSigner, NoteError> {
        if !valid_name(name) {
            return Err(NoteError::Key(
                "key name must be non-empty, without spaces or '+'",
            ));
        }
        let key = SigningKey::from_bytes(&seed);
        let id = key_id(name, key.verifying_key().as_bytes());
        Ok(NoteSigner {
            name: name.to_string(),
            key,
            id,
        })
    }

    /// A new key from the operating system's random source.
    pub fn generate(name: &str) -> Result<NoteSigner, NoteError> {
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(|_| NoteError::Key("no randomness available"))?;
        NoteSigner::from_seed(name, seed)
    }

    /// Parses `PRIVATE+KEY+<name>+<hex id>+<base64(0x01 ‖ seed)>`.
    pub fn parse(text: &str) -> Result<NoteSigner, NoteError> {
        let rest = text
            .trim()
            .strip_prefix("PRIVATE+KEY+")
            .ok_or(NoteError::Key("not a private key"))?;
        let (name, id, seed) = split_key(rest)?;
        let signer = NoteSigner::from_seed(name, seed)?;
        if hex::encode(signer.id) != id {
            return Err(NoteError::Key("key ID does not match the key"));
        }
        Ok(signer)
    }

    /// The private key in text form (for the key file).
    pub fn private_key_text(&self) -> String {
        let mut raw = vec![ED25519];
        raw.extend_from_slice(self.key.as_bytes());
        format!(
            "PRIVATE+KEY+{}+{}+{}",
            self.name,
            hex::encode(self.id),
            B64.encode(raw)
        )
    }

    /// The verifier key: `<name>+<hex id>+<base64(0x01 ‖ public key)>`.
    pub fn verifier_key(&self) -> String {
        let mut raw = vec![ED25519];
        raw.extend_from_slice(self.key.verifying_key().as_bytes());
        format!("{}+{}+{}", self.name, hex::encode(self.id), B64.encode(raw))
    }

    /// Signs a checkpoint: the whole note text.
    pub fn sign(&self, checkpoint: &Checkpoint) -> String {
        let body = checkpoint.body();
        let sig = self.key.sign(body.as_bytes());
        let mut blob = self.id.to_vec();
        blob.extend_from_slice(&sig.to_bytes());
        format!("{body}\n\u{2014} {} {}\n", self.name, B64.encode(blob))
    }
}

/// Loads the signing key from `path`, or creates it there (mode 0600, synced) when the file does
/// not exist. The key's name must be `origin`.
pub fn load_or_create_key(path: &Path, origin: &str) -> Result<NoteSigner, KeyFileError> {
    let at = || path.to_path_buf();
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let signer = NoteSigner::parse(&text)
                .map_err(|source| KeyFileError::Malformed { path: at(), source })?;
            if signer.name != origin {
                return Err(KeyFileError::WrongName {
                    path: at(),
                    name: signer.name,
                    origin: origin.to_string(),
                });
            }
            Ok(signer)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let signer = NoteSigner::generate(origin).map_err(KeyFileError::Generate)?;
            crate::util::perms::create_secret_file(path, &signer.private_key_text())
                .map_err(KeyFileError::Create)?;
            tracing::info!(path = %path.display(), verifier_key = %signer.verifier_key(), "created the checkpoint signing key");
            Ok(signer)
        }
        Err(source) => Err(KeyFileError::Read { path: at(), source }),
    }
}

/// Why the signing key file could not be loaded or created.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Malformed {
        path: PathBuf,
        #[source]
        source: NoteError,
    },
    #[error("{}: the key is named {name:?} but ledger.origin is {origin:?}", path.display())]
    WrongName {
        path: PathBuf,
        name: String,
        origin: String,
    },
    #[error("{0}")]
    Generate(#[source] NoteError),
    /// Creating the file (see `util::perms::create_secret_file`).
    #[error(transparent)]
    Create(#[from] crate::util::perms::FileError),
}

/// Verifies a note against a verifier key and returns its checkpoint.
pub fn verify(note: &str, verifier_key: &str) -> Result<Checkpoint, NoteError> {
    let (name, id, public) = split_key(verifier_key.trim())?;
    let expected_id = key_id(name, &public);
    if hex::encode(expected_id) != id {
        return Err(NoteError::Key("key ID does not match the key"));
    }
    let vk = VerifyingKey::from_bytes(&public)
        .map_err(|_| NoteError::Key("invalid Ed25519 public key"))?;
    // The body ends at the last blank line; signature lines follow it.
    let split = note
        .rfind("\n\n")
        .ok_or(NoteError::Note("no blank line before the signatures"))?;
    let (body, sigs) = (&note[..split + 1], &note[split + 2..]);
    if !sigs.ends_with('\n') {
        return Err(NoteError::Note("signatures must end with a newline"));
    }
    for line in sigs.lines() {
        let rest = line
            .strip_prefix("\u{2014} ")
            .ok_or(NoteError::Note("signature line must start with an em dash"))?;
        let (sig_name, blob) = rest
            .split_once(' ')
            .ok_or(NoteError::Note("signature line lacks a signature"))?;
        let blob = B64
            .decode(blob)
            .map_err(|_| NoteError::Note("signature is not base64"))?;
        if sig_name != name || blob.len() != 68 || blob[..4] != expected_id {
            continue;
        }
        let sig = ed25519_dalek::Signature::from_slice(&blob[4..])
            .map_err(|_| NoteError::Note("bad signature"))?;
        if vk.verify(body.as_bytes(), &sig).is_ok() {
            return Checkpoint::parse(body);
        }
        return Err(NoteError::Unverified(name.to_string()));
    }
    Err(NoteError::Unverified(name.to_string()))
}

/// Signing of checkpoints by the node.
pub struct Checkpointing {
    pub signer: NoteSigner,
    /// The checkpoint origin line: the log's identity.
    pub origin: String,
    /// At most one new checkpoint per interval, and only when the tree grew.
    pub interval: std::time::Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(size: u64) -> Checkpoint {
        Checkpoint {
            origin: "dicomchain.example/ledger".into(),
            size,
            root: [7; 32],
        }
    }

    #[test]
    fn our_notes_verify_with_an_independent_implementation() {
        let signer = NoteSigner::from_seed("dicomchain.example/ledger", [42; 32]).unwrap();
        let note = signer.sign(&checkpoint(1234));
        let vkey = signer.verifier_key();
        // Cloudflare's port of Go's sumdb/note reads our key and our signature.
        let verifier = signed_note::StandardVerifier::new(&vkey).unwrap();
        let parsed = signed_note::Note::from_bytes(note.as_bytes()).unwrap();
        let list = signed_note::VerifierList::new(vec![Box::new(verifier)]);
        let (ok, _) = parsed.verify(&list).unwrap();
        assert_eq!(ok.len(), 1);
        // And ours agrees.
        assert_eq!(verify(&note, &vkey).unwrap(), checkpoint(1234));
        // Keys round-trip through their text forms.
        let again = NoteSigner::parse(&signer.private_key_text()).unwrap();
        assert_eq!(again.verifier_key(), vkey);
        assert!(signed_note::StandardSigner::new(&signer.private_key_text()).is_ok());
    }

    #[test]
    fn we_verify_notes_signed_by_the_independent_implementation() {
        let ours = NoteSigner::from_seed("other.example/log", [9; 32]).unwrap();
        // Their signer, from the key text; their note, with their signature.
        let signer = signed_note::StandardSigner::new(&ours.private_key_text()).unwrap();
        let body = checkpoint(9).body();
        let mut note = signed_note::Note::new(body.as_bytes(), &[]).unwrap();
        note.add_sigs(&[&signer]).unwrap();
        let text = String::from_utf8(note.to_bytes()).unwrap();
        assert_eq!(verify(&text, &ours.verifier_key()).unwrap(), checkpoint(9));
    }

    #[test]
    fn tampering_is_detected() {
        let signer = NoteSigner::from_seed("log", [1; 32]).unwrap();
        let other = NoteSigner::from_seed("log", [2; 32]).unwrap();
        let note = signer.sign(&checkpoint(5));
        assert!(verify(&note, &signer.verifier_key()).is_ok());
        assert!(verify(&note.replace("\n5\n", "\n6\n"), &signer.verifier_key()).is_err());
        assert!(verify(&note, &other.verifier_key()).is_err());
        assert!(verify(&note[..note.len() - 1], &signer.verifier_key()).is_err());
        assert!(verify("", &signer.verifier_key()).is_err());
    }

    #[test]
    fn checkpoint_bodies_parse_strictly() {
        assert_eq!(Checkpoint::parse(&checkpoint(0).body()).unwrap().size, 0);
        for bad in [
            "",
            "o\n",
            "o\n01\nAAAA\n",
            "o\n1\nnot base64!\n",
            "o\n-1\n",
            "o\n1\nBwcH\n",
        ] {
            assert!(Checkpoint::parse(bad).is_err(), "{bad:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn the_note_parser_never_panics(text in "\\PC*") {
            let _ = verify(&text, "log+00000000+AQ==");
            let _ = Checkpoint::parse(&text);
        }
    }
}
