//! Tensors owned by the runtime: dtype, shape and refcounted, 64-byte-aligned CPU storage.
//!
//! Plugins never own tensor memory: they hold refcounted handles through the C ABI and read the
//! bytes zero-copy. This module is the storage layer only; ops live with the kernels.

pub mod rng;

pub use ditflow_plugin::DType;
use std::sync::Arc;

/// A 64-byte block: the unit of tensor storage, so every tensor's data is 64-byte aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Block([u8; 64]);

/// Immutable, aligned bytes.
struct Storage {
    blocks: Vec<Block>,
    len: usize,
}

impl Storage {
    fn zeroed(len: usize) -> Storage {
        Storage {
            blocks: vec![Block([0; 64]); len.div_ceil(64)],
            len,
        }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `blocks` holds at least `len` initialised bytes.
        unsafe { std::slice::from_raw_parts(self.blocks.as_ptr() as *const u8, self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `self` is borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.blocks.as_mut_ptr() as *mut u8, self.len) }
    }
}

/// A dense, row-major CPU tensor. Cloning is cheap (the data is shared).
#[derive(Clone)]
pub struct Tensor {
    dtype: DType,
    shape: Arc<[usize]>,
    /// The shape as the C ABI hands it out.
    dims: Arc<[i64]>,
    data: Arc<Storage>,
}

/// Why a tensor could not be made.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TensorError {
    #[error("shape {shape:?} of {dtype} needs {expected} bytes, got {got}")]
    SizeMismatch {
        shape: Vec<usize>,
        dtype: &'static str,
        expected: usize,
        got: usize,
    },
    #[error("shape {0:?} is too large")]
    TooLarge(Vec<usize>),
}

impl Tensor {
    /// Bytes needed for `shape` of `dtype`, or `None` on overflow.
    pub fn nbytes_for(dtype: DType, shape: &[usize]) -> Option<usize> {
        shape
            .iter()
            .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
    }

    /// A tensor of zeros.
    pub fn zeros(dtype: DType, shape: &[usize]) -> Result<Tensor, TensorError> {
        let n = Self::nbytes_for(dtype, shape)
            .filter(|&n| n <= isize::MAX as usize / 2)
            .ok_or_else(|| TensorError::TooLarge(shape.to_vec()))?;
        Ok(Tensor::from_storage(dtype, shape, Storage::zeroed(n)))
    }

    /// A tensor copying `bytes` (row-major).
    pub fn from_bytes(dtype: DType, shape: &[usize], bytes: &[u8]) -> Result<Tensor, TensorError> {
        let expected =
            Self::nbytes_for(dtype, shape).ok_or_else(|| TensorError::TooLarge(shape.to_vec()))?;
        if expected != bytes.len() {
            return Err(TensorError::SizeMismatch {
                shape: shape.to_vec(),
                dtype: dtype.name(),
                expected,
                got: bytes.len(),
            });
        }
        let mut storage = Storage::zeroed(expected);
        storage.bytes_mut().copy_from_slice(bytes);
        Ok(Tensor::from_storage(dtype, shape, storage))
    }

    /// An f32 tensor from `values`.
    pub fn from_f32(shape: &[usize], values: &[f32]) -> Result<Tensor, TensorError> {
        let mut t = Tensor::zeros(DType::F32, shape)?;
        if t.numel() != values.len() {
            return Err(TensorError::SizeMismatch {
                shape: shape.to_vec(),
                dtype: "f32",
                expected: t.nbytes(),
                got: values.len() * 4,
            });
        }
        t.as_f32_mut().copy_from_slice(values);
        Ok(t)
    }

    fn from_storage(dtype: DType, shape: &[usize], storage: Storage) -> Tensor {
        Tensor {
            dtype,
            shape: shape.into(),
            dims: shape.iter().map(|&d| d as i64).collect(),
            data: Arc::new(storage),
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The shape as signed 64-bit dims (the C ABI's form).
    pub fn dims(&self) -> &[i64] {
        &self.dims
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn nbytes(&self) -> usize {
        self.data.len
    }

    /// The raw row-major bytes.
    pub fn bytes(&self) -> &[u8] {
        self.data.bytes()
    }

    /// The elements of an f32 tensor (panics on another dtype: a programming error).
    pub fn as_f32(&self) -> &[f32] {
        assert_eq!(
            self.dtype,
            DType::F32,
            "as_f32 on a {} tensor",
            self.dtype.name()
        );
        let b = self.bytes();
        // SAFETY: storage is 64-byte aligned and holds `len / 4` f32s.
        unsafe { std::slice::from_raw_parts(b.as_ptr() as *const f32, b.len() / 4) }
    }

    /// Mutable f32 elements; copies the data first if it is shared.
    pub fn as_f32_mut(&mut self) -> &mut [f32] {
        assert_eq!(
            self.dtype,
            DType::F32,
            "as_f32_mut on a {} tensor",
            self.dtype.name()
        );
        let storage = unique_storage(&mut self.data);
        let b = storage.bytes_mut();
        // SAFETY: as in `as_f32`, with unique access.
        unsafe { std::slice::from_raw_parts_mut(b.as_mut_ptr() as *mut f32, b.len() / 4) }
    }
}

/// Copy-on-write: unique access to `data`, copying it first if it is shared.
fn unique_storage(data: &mut Arc<Storage>) -> &mut Storage {
    if Arc::get_mut(data).is_none() {
        let mut copy = Storage::zeroed(data.len);
        copy.bytes_mut().copy_from_slice(data.bytes());
        *data = Arc::new(copy);
    }
    Arc::get_mut(data).expect("unique after copy")
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor<{}>{:?}", self.dtype.name(), self.shape)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_is_aligned_and_copy_on_write() {
        let a = Tensor::from_f32(&[2, 3], &[1., 2., 3., 4., 5., 6.]).unwrap();
        assert_eq!(a.bytes().as_ptr() as usize % 64, 0);
        let mut b = a.clone();
        b.as_f32_mut()[0] = 9.0;
        assert_eq!(a.as_f32()[0], 1.0);
        assert_eq!(b.as_f32()[0], 9.0);
    }

    #[test]
    fn size_mismatch_and_overflow_are_errors() {
        assert!(Tensor::from_bytes(DType::F32, &[2], &[0; 7]).is_err());
        assert!(Tensor::zeros(DType::F32, &[usize::MAX, 2]).is_err());
    }
}
