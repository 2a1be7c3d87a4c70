//! A bounds-checked cursor over a byte slice, for the node's own big-endian binary records
//! (ledger entries, metadata records, index values). Every read either returns exactly the bytes
//! asked for or [`Truncated`]; callers turn that into their own error.

/// The input ended before the value being read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncated;

/// Reads big-endian integers and length-prefixed fields from the front of a slice.
pub struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Truncated> {
        let end = self.pos.checked_add(n).ok_or(Truncated)?;
        let s = self.bytes.get(self.pos..end).ok_or(Truncated)?;
        self.pos = end;
        Ok(s)
    }

    /// The next `N` bytes as an array.
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], Truncated> {
        Ok(self.take(N)?.try_into().expect("take returned N bytes"))
    }

    pub fn u8(&mut self) -> Result<u8, Truncated> {
        Ok(self.take(1)?[0])
    }

    pub fn u16(&mut self) -> Result<u16, Truncated> {
        self.array().map(u16::from_be_bytes)
    }

    pub fn u32(&mut self) -> Result<u32, Truncated> {
        self.array().map(u32::from_be_bytes)
    }

    pub fn u64(&mut self) -> Result<u64, Truncated> {
        self.array().map(u64::from_be_bytes)
    }

    /// A field prefixed with its length as a big-endian `u16`.
    pub fn bytes16(&mut self) -> Result<&'a [u8], Truncated> {
        let n = self.u16()? as usize;
        self.take(n)
    }

    /// A field prefixed with its length as a big-endian `u32`.
    pub fn bytes32(&mut self) -> Result<&'a [u8], Truncated> {
        let n = self.u32()? as usize;
        self.take(n)
    }

    /// The bytes not read yet.
    pub fn rest(&self) -> &'a [u8] {
        &self.bytes[self.pos..]
    }

    pub fn is_empty(&self) -> bool {
        self.pos == self.bytes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_in_order_and_stops_at_the_end() {
        let b = [0, 1, 0, 0, 0, 2, 0, 3, b'a', b'b', b'c', 9];
        let mut r = Reader::new(&b);
        assert_eq!(r.u16(), Ok(1));
        assert_eq!(r.u32(), Ok(2));
        assert_eq!(r.bytes16(), Ok(&b"abc"[..]));
        assert_eq!(r.rest(), &[9]);
        assert_eq!(r.u16(), Err(Truncated));
        assert_eq!(r.u8(), Ok(9));
        assert!(r.is_empty());
        assert_eq!(r.take(1), Err(Truncated));
    }

    #[test]
    fn a_huge_length_is_truncated_not_an_overflow() {
        let b = [0xff, 0xff, 0xff, 0xff, 1];
        let mut r = Reader::new(&b);
        assert_eq!(r.bytes32(), Err(Truncated));
        let mut r = Reader::new(&b);
        r.u8().unwrap();
        assert_eq!(r.take(usize::MAX), Err(Truncated));
    }
}
