//! Bytes that several owners read without a copy: a memory-mapped model file, whose tensors the
//! quantized kernels and the token table use in place, or a buffer of the process's own.
//!
//! Copying a quantized model's tensors out of its map held both in memory at once while loading
//! (the peak resident size counts the map's touched pages and the copies); sharing the map keeps
//! one copy, as llama.cpp does.

use std::ops::Range;
use std::sync::Arc;

enum Buf {
    Mapped(memmap2::Mmap),
    Owned(Vec<u8>),
}

/// A range of a shared buffer.
#[derive(Clone)]
pub struct SharedBytes {
    buf: Arc<Buf>,
    start: usize,
    end: usize,
}

impl SharedBytes {
    pub fn mapped(m: memmap2::Mmap) -> Self {
        let end = m.len();
        SharedBytes { buf: Arc::new(Buf::Mapped(m)), start: 0, end }
    }

    pub fn owned(v: Vec<u8>) -> Self {
        let end = v.len();
        SharedBytes { buf: Arc::new(Buf::Owned(v)), start: 0, end }
    }

    /// The bytes `r` of this range (relative to its start), sharing the buffer; `None` when `r`
    /// reaches past its end.
    pub fn slice(&self, r: Range<usize>) -> Option<Self> {
        (r.start <= r.end && r.end <= self.len()).then(|| SharedBytes { buf: self.buf.clone(), start: self.start + r.start, end: self.start + r.end })
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    pub fn as_slice(&self) -> &[u8] {
        let all: &[u8] = match &*self.buf {
            Buf::Mapped(m) => m,
            Buf::Owned(v) => v,
        };
        &all[self.start..self.end]
    }
}

impl std::ops::Deref for SharedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_slice()
    }
}

impl std::fmt::Debug for SharedBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &*self.buf {
            Buf::Mapped(_) => "mapped",
            Buf::Owned(_) => "owned",
        };
        write!(f, "SharedBytes({kind}, {}..{})", self.start, self.end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_share_the_buffer_and_stay_in_bounds() {
        let b = SharedBytes::owned((0u8..10).collect());
        let s = b.slice(2..7).unwrap();
        assert_eq!(&*s, &[2, 3, 4, 5, 6]);
        assert_eq!(&*s.slice(1..3).unwrap(), &[3, 4]);
        assert!(s.slice(3..6).is_none());
        assert!(b.slice(0..11).is_none());
        assert!(std::ptr::eq(s.as_ptr(), b[2..].as_ptr()));
    }
}
