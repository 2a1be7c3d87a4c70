//! Encryption at rest of pixel objects (pure: no I/O besides the master key file).
//!
//! Every object is sealed with AES-256-GCM under its own data key, in
//! chunks, so it can be read as a stream (and a range maps to whole chunks):
//!
//! ```text
//! header (16 bytes, authenticated as the AAD of every chunk):
//!   "DCPXL2" · u8 format = 2 · u8 algorithm = 1 (AES-256-GCM) · u32 chunk size (BE) · [4] zero
//! chunk i (i = 0, 1, …): AES-256-GCM(plaintext bytes [i·size, (i+1)·size)) · 16-byte tag
//!   nonce = u8 last (1 on the final chunk, else 0) · [3] zero · u64 i (BE)
//! ```
//!
//! Every chunk but the last holds exactly `size` plaintext bytes; the last holds 0..=size and is
//! sealed with the `last` flag, so a truncated, reordered or extended object fails to open.
//!
//! Keys: the node master key (32 random bytes, `[security] master_key_file`) is the HKDF-SHA256
//! input key material. An object's data key is HKDF(salt = its 32-byte random *object salt*,
//! info = "dicomchain pixel object v2 aes-256-gcm"); its name is
//! hex(HMAC-SHA256(name key, instance key ‖ object salt)) with the name key =
//! HKDF(info = "dicomchain object name v2"). The object salt lives only in the ledger's `keys`
//! column family, never in the bucket: without it (and the master key) an object can be neither
//! decrypted nor linked to its instance, and deleting it shreds the object (erasure).

use std::path::Path;

use ring::{aead, hkdf, hmac, rand::SecureRandom};

use crate::instance::{Digest32, ObjectKey};

const MAGIC: &[u8; 6] = b"DCPXL2";
/// The object format, in every object's header.
pub const FORMAT: u8 = 2;
const ALGORITHM_AES_256_GCM: u8 = 1;
pub const HEADER_LEN: usize = 16;
const TAG_LEN: usize = 16;
/// Plaintext bytes per chunk: large enough that the tag costs 0.02 %, small enough to buffer.
pub const CHUNK: usize = 64 * 1024;
const DATA_KEY_INFO: &[u8] = b"dicomchain pixel object v2 aes-256-gcm";
const NAME_KEY_INFO: &[u8] = b"dicomchain object name v2";

/// Why an object could not be opened: it was altered, truncated, or sealed under another key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct SealError(pub &'static str);

/// The node master key.
pub struct MasterKey {
    key: [u8; 32],
    name_key: hmac::Key,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    pub fn from_bytes(key: [u8; 32]) -> MasterKey {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, &[]).extract(&key);
        let name_key = prk
            .expand(&[NAME_KEY_INFO], hmac::HMAC_SHA256)
            .expect("32 bytes is a valid HKDF-SHA256 output length")
            .into();
        MasterKey { key, name_key }
    }

    /// Reads the key file (64 hex digits), or creates it with a new random key (mode 0600)
    /// when it does not exist.
    pub fn load_or_create(path: &Path) -> Result<MasterKey, String> {
        match MasterKey::load(path) {
            Ok(Some(k)) => Ok(k),
            Ok(None) => {
                let mut key = [0u8; 32];
                random(&mut key);
                match crate::util::perms::create_secret_file(path, &hex::encode(key)) {
                    Ok(()) => {
                        tracing::info!(file = %path.display(), "created the object master key (keep a backup: without it no pixel object can be read)");
                        Ok(MasterKey::from_bytes(key))
                    }
                    // Another process created it meanwhile: use theirs.
                    Err(_) if path.exists() => MasterKey::load(path)?
                        .ok_or_else(|| format!("{}: vanished", path.display())),
                    Err(e) => Err(e.to_string()),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Reads the key file; `None` when it does not exist.
    pub fn load(path: &Path) -> Result<Option<MasterKey>, String> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let bytes = hex::decode(text.trim())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| {
                format!(
                    "{}: not a master key (expected 64 hex digits)",
                    path.display()
                )
            })?;
        Ok(Some(MasterKey::from_bytes(bytes)))
    }

    /// A value that identifies this key without revealing it (kept on the ledger, so a node
    /// started with the wrong key file refuses to run instead of sealing under a new key).
    pub fn check_value(&self) -> [u8; 32] {
        hmac::sign(&self.name_key, b"dicomchain master key check v2")
            .as_ref()
            .try_into()
            .expect("HMAC-SHA256 is 32 bytes")
    }

    fn data_key(&self, salt: &[u8; 32]) -> aead::LessSafeKey {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, salt).extract(&self.key);
        let okm = prk
            .expand(&[DATA_KEY_INFO], &aead::AES_256_GCM)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        aead::LessSafeKey::new(aead::UnboundKey::from(okm))
    }

    /// The opaque name of an object: nobody without the master key can link it to the instance
    /// key, or guess it from the instance.
    pub fn object_name(&self, instance_key: &Digest32, object: &ObjectKey) -> String {
        let mut ctx = hmac::Context::with_key(&self.name_key);
        ctx.update(instance_key);
        ctx.update(&object.salt);
        hex::encode(ctx.sign().as_ref())
    }

    /// A new object's key record, its sealer, and the header to write first.
    pub fn sealer(&self) -> (ObjectKey, Sealer) {
        let mut salt = [0u8; 32];
        random(&mut salt);
        let object = ObjectKey { salt };
        let sealer = Sealer {
            key: self.data_key(&salt),
            header: header(CHUNK as u32),
            buf: Vec::with_capacity(CHUNK + TAG_LEN),
            counter: 0,
        };
        (object, sealer)
    }

    pub fn opener(&self, object: &ObjectKey) -> Opener {
        Opener {
            key: self.data_key(&object.salt),
            header: Vec::with_capacity(HEADER_LEN),
            chunk: 0,
            buf: Vec::new(),
            counter: 0,
        }
    }
}

fn random(out: &mut [u8]) {
    ring::rand::SystemRandom::new()
        .fill(out)
        .expect("the operating system's random number generator failed");
}

fn header(chunk: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..6].copy_from_slice(MAGIC);
    h[6] = FORMAT;
    h[7] = ALGORITHM_AES_256_GCM;
    h[8..12].copy_from_slice(&chunk.to_be_bytes());
    h
}

fn parse_header(h: &[u8]) -> Result<usize, SealError> {
    if &h[..6] != MAGIC || h[6] != FORMAT {
        return Err(SealError("not a sealed pixel object (header)"));
    }
    if h[7] != ALGORITHM_AES_256_GCM {
        return Err(SealError("sealed with an unknown algorithm"));
    }
    if h[12..] != [0; 4] {
        return Err(SealError("header reserved bytes are not zero"));
    }
    let chunk = u32::from_be_bytes(h[8..12].try_into().expect("4 bytes")) as usize;
    if !(1024..=16 * 1024 * 1024).contains(&chunk) {
        return Err(SealError("header chunk size out of range"));
    }
    Ok(chunk)
}

fn nonce(counter: u64, last: bool) -> aead::Nonce {
    let mut n = [0u8; 12];
    n[0] = last as u8;
    n[4..].copy_from_slice(&counter.to_be_bytes());
    aead::Nonce::assume_unique_for_key(n)
}

/// Seals a stream of plaintext into the chunked format. Holds at most one chunk.
pub struct Sealer {
    key: aead::LessSafeKey,
    header: [u8; HEADER_LEN],
    buf: Vec<u8>,
    counter: u64,
}

impl Sealer {
    /// The bytes every sealed object starts with.
    pub fn header(&self) -> [u8; HEADER_LEN] {
        self.header
    }

    /// Plaintext held back (at most one chunk) until it is known whether more follows.
    pub fn buffered(&self) -> usize {
        self.buf.capacity()
    }

    /// Takes plaintext; appends to `out` every chunk known not to be the last.
    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<u8>) {
        while !data.is_empty() {
            if self.buf.len() == CHUNK {
                self.seal(false, out);
            }
            let n = (CHUNK - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
    }

    /// Seals what is left as the final chunk (possibly empty).
    pub fn finish(mut self, out: &mut Vec<u8>) {
        self.seal(true, out);
    }

    fn seal(&mut self, last: bool, out: &mut Vec<u8>) {
        self.key
            .seal_in_place_append_tag(
                nonce(self.counter, last),
                aead::Aad::from(&self.header),
                &mut self.buf,
            )
            .expect("a chunk is far below the AES-GCM length limit");
        out.extend_from_slice(&self.buf);
        self.buf.clear();
        self.counter += 1;
    }
}

/// Opens a sealed stream, fed in pieces of any size. Holds at most one chunk.
pub struct Opener {
    key: aead::LessSafeKey,
    header: Vec<u8>,
    /// Plaintext chunk size, once the header is read.
    chunk: usize,
    buf: Vec<u8>,
    counter: u64,
}

impl Opener {
    /// Takes sealed bytes; returns the plaintext of every chunk known not to be the last.
    pub fn push(&mut self, mut data: &[u8]) -> Result<Vec<u8>, SealError> {
        if self.header.len() < HEADER_LEN {
            let n = (HEADER_LEN - self.header.len()).min(data.len());
            self.header.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.header.len() < HEADER_LEN {
                return Ok(Vec::new());
            }
            self.chunk = parse_header(&self.header)?;
            self.buf.reserve(self.chunk + TAG_LEN);
        }
        let sealed = self.chunk + TAG_LEN;
        let mut out = Vec::new();
        while !data.is_empty() {
            // A full chunk followed by more bytes is not the last one.
            if self.buf.len() == sealed {
                self.open(false, &mut out)?;
            }
            let n = (sealed - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
        }
        Ok(out)
    }

    /// The plaintext of the final chunk; fails if the object ended early.
    pub fn finish(mut self) -> Result<Vec<u8>, SealError> {
        if self.header.len() < HEADER_LEN {
            return Err(SealError("sealed object is shorter than its header"));
        }
        let mut out = Vec::new();
        self.open(true, &mut out)?;
        Ok(out)
    }

    fn open(&mut self, last: bool, out: &mut Vec<u8>) -> Result<(), SealError> {
        let header: [u8; HEADER_LEN] = self.header[..].try_into().expect("header is complete");
        let plain = self
            .key
            .open_in_place(
                nonce(self.counter, last),
                aead::Aad::from(&header),
                &mut self.buf,
            )
            .map_err(|_| {
                SealError("sealed object fails authentication (altered, truncated or wrong key)")
            })?;
        if !last && plain.len() != self.chunk {
            return Err(SealError("sealed object has a short chunk before its end"));
        }
        out.extend_from_slice(plain);
        self.buf.clear();
        self.counter += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn master(b: u8) -> MasterKey {
        MasterKey::from_bytes([b; 32])
    }

    fn seal(m: &MasterKey, plain: &[u8], piece: usize) -> (ObjectKey, Vec<u8>) {
        let (k, mut s) = m.sealer();
        let mut out = s.header().to_vec();
        for p in plain.chunks(piece.max(1)) {
            s.push(p, &mut out);
        }
        s.finish(&mut out);
        (k, out)
    }

    fn open(
        m: &MasterKey,
        k: &ObjectKey,
        sealed: &[u8],
        piece: usize,
    ) -> Result<Vec<u8>, SealError> {
        let mut o = m.opener(k);
        let mut out = Vec::new();
        for p in sealed.chunks(piece.max(1)) {
            out.extend(o.push(p)?);
        }
        out.extend(o.finish()?);
        Ok(out)
    }

    fn sample(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[test]
    fn round_trips_at_every_boundary_and_piece_size() {
        let m = master(7);
        for n in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 3 * CHUNK + 17] {
            let plain = sample(n);
            for piece in [1usize << 20, 7, CHUNK, CHUNK + TAG_LEN + 1] {
                if piece < 100 && n > 2 * CHUNK {
                    continue;
                }
                let (k, sealed) = seal(&m, &plain, piece);
                let chunks = n.div_ceil(CHUNK).max(1);
                assert_eq!(sealed.len(), HEADER_LEN + n + chunks * TAG_LEN, "n={n}");
                for rpiece in [1usize << 20, 13, CHUNK + TAG_LEN] {
                    if rpiece < 100 && n > 2 * CHUNK {
                        continue;
                    }
                    assert_eq!(open(&m, &k, &sealed, rpiece).unwrap(), plain, "n={n}");
                }
            }
        }
    }

    #[test]
    fn holds_no_plaintext_and_each_object_has_its_own_key() {
        let m = master(1);
        let plain = vec![0x42u8; 3 * CHUNK];
        let (k1, s1) = seal(&m, &plain, 4096);
        let (k2, s2) = seal(&m, &plain, 4096);
        assert_ne!(k1, k2);
        assert_ne!(s1[HEADER_LEN..], s2[HEADER_LEN..]);
        assert!(!s1.windows(64).any(|w| w.iter().all(|&b| b == 0x42)));
        // Another object's key, another master key: nothing opens.
        assert!(open(&m, &k2, &s1, 1 << 20).is_err());
        assert!(open(&master(2), &k1, &s1, 1 << 20).is_err());
    }

    #[test]
    fn every_alteration_fails_to_open() {
        let m = master(3);
        let plain = sample(2 * CHUNK + 100);
        let (k, sealed) = seal(&m, &plain, 1 << 20);
        let sealed_chunk = CHUNK + TAG_LEN;
        let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
        for at in [
            0,
            7,
            9,
            HEADER_LEN,
            HEADER_LEN + CHUNK + 3,
            sealed.len() - 1,
        ] {
            let mut s = sealed.clone();
            s[at] ^= 1;
            cases.push(("flipped byte", s));
        }
        // Truncated at a chunk boundary (the rest looks complete), or inside a chunk.
        cases.push((
            "truncated at chunk",
            sealed[..HEADER_LEN + 2 * sealed_chunk].to_vec(),
        ));
        cases.push(("truncated", sealed[..sealed.len() - 5].to_vec()));
        cases.push(("header only", sealed[..HEADER_LEN].to_vec()));
        cases.push(("short header", sealed[..5].to_vec()));
        // Chunks swapped.
        let mut swapped = sealed[..HEADER_LEN].to_vec();
        swapped
            .extend_from_slice(&sealed[HEADER_LEN + sealed_chunk..HEADER_LEN + 2 * sealed_chunk]);
        swapped.extend_from_slice(&sealed[HEADER_LEN..HEADER_LEN + sealed_chunk]);
        swapped.extend_from_slice(&sealed[HEADER_LEN + 2 * sealed_chunk..]);
        cases.push(("swapped", swapped));
        let mut extended = sealed.clone();
        extended.extend_from_slice(&sealed[HEADER_LEN..HEADER_LEN + sealed_chunk]);
        cases.push(("extended", extended));
        for (what, s) in cases {
            assert!(open(&m, &k, &s, 1 << 20).is_err(), "{what} opened");
            assert!(open(&m, &k, &s, 999).is_err(), "{what} opened in pieces");
        }
        assert_eq!(open(&m, &k, &sealed, 999).unwrap(), plain);
    }

    #[test]
    fn names_are_keyed_and_per_object() {
        let m = master(5);
        let (k1, _) = m.sealer();
        let (k2, _) = m.sealer();
        let key = [9u8; 32];
        let n1 = m.object_name(&key, &k1);
        assert_eq!(n1.len(), 64);
        assert_eq!(n1, m.object_name(&key, &k1));
        assert_ne!(n1, m.object_name(&key, &k2));
        assert_ne!(n1, master(6).object_name(&key, &k1));
    }

    #[test]
    fn key_records_and_files() {
        let (k, _) = master(1).sealer();
        assert_eq!(ObjectKey::decode(&k.encode()).unwrap(), k);
        assert!(ObjectKey::decode(&[2; 10]).is_err());
        assert!(ObjectKey::decode(&[9; 33]).is_err());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/master.key");
        assert!(MasterKey::load(&path).unwrap().is_none());
        let a = MasterKey::load_or_create(&path).unwrap();
        let b = MasterKey::load_or_create(&path).unwrap();
        assert_eq!(a.key, b.key);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::write(&path, "not hex").unwrap();
        let e = MasterKey::load(&path).unwrap_err();
        assert!(e.contains("master.key") && e.contains("64 hex"), "{e}");
    }
}
