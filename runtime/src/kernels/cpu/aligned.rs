//! Cache-line-aligned f32 buffers for packed GEMM panels and per-thread scratch.
//!
//! A `Vec<f32>` large enough to be memory-mapped by the allocator starts 16 bytes past a page
//! boundary, so every 16-float (64-byte) vector load from it straddles two cache lines. Panels
//! in these buffers start on a line, and since every panel row is 16 floats, so does every row.

/// One cache line of floats.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([f32; 16]);

const LINE: usize = 16;

/// A growable f32 buffer whose start is 64-byte aligned.
#[derive(Default)]
pub struct AlignedBuf {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedBuf {
    pub const fn new() -> AlignedBuf {
        AlignedBuf {
            lines: Vec::new(),
            len: 0,
        }
    }

    /// `len` zeros.
    pub fn zeroed(len: usize) -> AlignedBuf {
        let mut buf = AlignedBuf::new();
        buf.grow(len);
        buf
    }

    /// Makes the buffer at least `len` floats long (new floats are zero; existing ones kept).
    pub fn grow(&mut self, len: usize) {
        if len > self.len {
            self.lines.resize(len.div_ceil(LINE), Line([0.0; LINE]));
            self.len = len;
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn as_ptr(&self) -> *const f32 {
        self.lines.as_ptr() as *const f32
    }

    pub fn as_mut_ptr(&mut self) -> *mut f32 {
        self.lines.as_mut_ptr() as *mut f32
    }

    pub fn as_slice(&self) -> &[f32] {
        // SAFETY: `lines` holds at least `len` initialised floats.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as in `as_slice`, with unique access.
        unsafe { std::slice::from_raw_parts_mut(self.as_mut_ptr(), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_on_a_cache_line_and_keeps_its_contents_as_it_grows() {
        let mut b = AlignedBuf::zeroed(5);
        assert_eq!(b.as_ptr() as usize % 64, 0);
        b.as_mut_slice().copy_from_slice(&[1.0, 2.0, 3.0, 4.0, 5.0]);
        b.grow(100_000);
        assert_eq!(b.as_ptr() as usize % 64, 0);
        assert_eq!(b.len(), 100_000);
        assert_eq!(&b.as_slice()[..6], &[1.0, 2.0, 3.0, 4.0, 5.0, 0.0]);
        b.grow(3);
        assert_eq!(b.len(), 100_000);
    }
}
