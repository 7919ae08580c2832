//! Tensors owned by the runtime: dtype, shape, device and refcounted storage.
//!
//! Plugins never own tensor memory: they hold refcounted handles through the C ABI and reach CPU
//! bytes zero-copy. Every tensor is dense and row-major; a reshape shares storage, every other
//! layout change makes a new tensor. CPU storage is 64-byte aligned, or a window into a
//! memory-mapped weights file; CUDA storage is a device buffer from the shared context. The ops
//! themselves are in [`ops`], which dispatches to the kernels of the tensor's device.

pub mod convert;
pub mod device;
pub mod op_call;
pub mod ops;
pub mod rng;
pub mod shape;

pub use device::Device;
pub use ditflow_plugin::DType;
use std::sync::Arc;

/// A 64-byte block: the unit of owned CPU storage, so that owned data is 64-byte aligned.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Block([u8; 64]);

/// CPU bytes: owned and aligned, or borrowed from a memory-mapped file kept alive here.
enum HostBuf {
    Owned {
        blocks: Vec<Block>,
        len: usize,
    },
    Mapped {
        map: Arc<memmap2::Mmap>,
        offset: usize,
        len: usize,
    },
}

/// Recycled CPU storage: large buffers freed by dropped tensors are kept (up to a byte budget)
/// and handed to new tensors of the same size, so op outputs do not pay for fresh pages (a page
/// fault per 4 KiB) on every call.
mod pool {
    use super::Block;
    use std::collections::HashMap;
    use std::sync::Mutex;

    /// Buffers smaller than this go straight back to the allocator.
    const MIN_BLOCKS: usize = 1024; // 64 KiB
    /// The most bytes kept in the pool.
    const MAX_BYTES: usize = 512 << 20;
    /// The most buffers kept of one size.
    const MAX_PER_SIZE: usize = 16;

    struct Pool {
        free: HashMap<usize, Vec<Vec<Block>>>,
        bytes: usize,
    }

    static POOL: Mutex<Option<Pool>> = Mutex::new(None);

    /// A buffer of exactly `blocks` blocks with unspecified (initialised) contents.
    pub(super) fn take(blocks: usize) -> Vec<Block> {
        if blocks >= MIN_BLOCKS {
            let mut guard = POOL.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(pool) = guard.as_mut() {
                if let Some(v) = pool.free.get_mut(&blocks).and_then(Vec::pop) {
                    pool.bytes -= blocks * 64;
                    return v;
                }
            }
        }
        vec![Block([0; 64]); blocks]
    }

    pub(super) fn give(v: Vec<Block>) {
        let blocks = v.len();
        if blocks < MIN_BLOCKS || blocks * 64 > MAX_BYTES / 4 {
            return;
        }
        let mut guard = POOL.lock().unwrap_or_else(|p| p.into_inner());
        let pool = guard.get_or_insert_with(|| Pool {
            free: HashMap::new(),
            bytes: 0,
        });
        let list = pool.free.entry(blocks).or_default();
        if list.len() < MAX_PER_SIZE && pool.bytes + blocks * 64 <= MAX_BYTES {
            pool.bytes += blocks * 64;
            list.push(v);
        }
    }
}

impl Drop for HostBuf {
    fn drop(&mut self) {
        if let HostBuf::Owned { blocks, .. } = self {
            pool::give(std::mem::take(blocks));
        }
    }
}

impl HostBuf {
    fn zeroed(len: usize) -> HostBuf {
        let mut blocks = pool::take(len.div_ceil(64));
        blocks.fill(Block([0; 64]));
        HostBuf::Owned { blocks, len }
    }

    /// Storage whose contents are unspecified (but initialised): for outputs every byte of
    /// which is written before it is read.
    fn for_overwrite(len: usize) -> HostBuf {
        HostBuf::Owned {
            blocks: pool::take(len.div_ceil(64)),
            len,
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            // SAFETY: `blocks` holds at least `len` initialised bytes.
            HostBuf::Owned { blocks, len } => unsafe {
                std::slice::from_raw_parts(blocks.as_ptr() as *const u8, *len)
            },
            HostBuf::Mapped { map, offset, len } => &map[*offset..*offset + *len],
        }
    }

    /// Mutable bytes of owned storage; `None` for a read-only mapping.
    fn bytes_mut(&mut self) -> Option<&mut [u8]> {
        match self {
            // SAFETY: as in `bytes`, with unique access.
            HostBuf::Owned { blocks, len } => Some(unsafe {
                std::slice::from_raw_parts_mut(blocks.as_mut_ptr() as *mut u8, *len)
            }),
            HostBuf::Mapped { .. } => None,
        }
    }
}

/// CPU storage: its bytes, and the GEMM's packed form of them once a linear layer has made it
/// (see [`Tensor::packed_weight`]), which lives and dies with the bytes.
struct Host {
    buf: HostBuf,
    packed: std::sync::OnceLock<crate::kernels::cpu::gemm::PackedB>,
}

impl Host {
    fn new(buf: HostBuf) -> Host {
        Host {
            buf,
            packed: std::sync::OnceLock::new(),
        }
    }
}

#[derive(Clone)]
enum Storage {
    Cpu(Arc<Host>),
    #[cfg(feature = "cuda")]
    Cuda(Arc<crate::kernels::cuda::DeviceBuf>),
}

/// A dense, row-major tensor on some device. Cloning is cheap (the data is shared).
#[derive(Clone)]
pub struct Tensor {
    dtype: DType,
    shape: Arc<[usize]>,
    /// The shape as the C ABI hands it out.
    dims: Arc<[i64]>,
    storage: Storage,
}

/// Why a tensor could not be made or read.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone)]
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
    #[error("expected a {expected} tensor, got {got}")]
    WrongDType {
        expected: &'static str,
        got: &'static str,
    },
    #[error("the tensor is on {0}; move it to the CPU first")]
    NotOnCpu(Device),
}

/// The largest tensor we agree to allocate, in bytes.
const MAX_BYTES: usize = isize::MAX as usize / 2;

impl Tensor {
    /// Bytes needed for `shape` of `dtype`, or `None` on overflow, or for a block format whose
    /// last axis is not whole blocks.
    pub fn nbytes_for(dtype: DType, shape: &[usize]) -> Option<usize> {
        let (values, bytes) = dtype.block();
        let last = shape.last().copied().unwrap_or(1);
        if !last.is_multiple_of(values) {
            return None;
        }
        let rows = shape[..shape.len().saturating_sub(1)]
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))?;
        rows.checked_mul(last / values)?
            .checked_mul(bytes)
            .filter(|&n| n <= MAX_BYTES)
    }

    /// A CPU tensor of zeros.
    pub fn zeros(dtype: DType, shape: &[usize]) -> Result<Tensor, TensorError> {
        let n =
            Self::nbytes_for(dtype, shape).ok_or_else(|| TensorError::TooLarge(shape.to_vec()))?;
        Ok(Tensor::from_host(dtype, shape, HostBuf::zeroed(n)))
    }

    /// A CPU tensor whose elements are unspecified: for an op's output that the kernel writes in
    /// full (recycled storage, not zeroed).
    pub fn for_overwrite(dtype: DType, shape: &[usize]) -> Result<Tensor, TensorError> {
        let n =
            Self::nbytes_for(dtype, shape).ok_or_else(|| TensorError::TooLarge(shape.to_vec()))?;
        Ok(Tensor::from_host(dtype, shape, HostBuf::for_overwrite(n)))
    }

    /// A CPU tensor copying `bytes` (row-major).
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
        let mut buf = HostBuf::zeroed(expected);
        buf.bytes_mut().expect("owned").copy_from_slice(bytes);
        Ok(Tensor::from_host(dtype, shape, buf))
    }

    /// A CPU tensor viewing `len` bytes at `offset` of a mapped file, zero-copy when the bytes
    /// are aligned for `dtype`, copied otherwise.
    pub fn from_mapped(
        dtype: DType,
        shape: &[usize],
        map: &Arc<memmap2::Mmap>,
        offset: usize,
        len: usize,
    ) -> Result<Tensor, TensorError> {
        let expected =
            Self::nbytes_for(dtype, shape).ok_or_else(|| TensorError::TooLarge(shape.to_vec()))?;
        let got = if offset.checked_add(len).is_some_and(|end| end <= map.len()) {
            len
        } else {
            0
        };
        if expected != len || got != len {
            return Err(TensorError::SizeMismatch {
                shape: shape.to_vec(),
                dtype: dtype.name(),
                expected,
                got,
            });
        }
        let bytes = &map[offset..offset + len];
        if !(bytes.as_ptr() as usize).is_multiple_of(dtype.size()) {
            return Tensor::from_bytes(dtype, shape, bytes);
        }
        Ok(Tensor::from_host(
            dtype,
            shape,
            HostBuf::Mapped {
                map: map.clone(),
                offset,
                len,
            },
        ))
    }

    /// An f32 CPU tensor from `values`.
    pub fn from_f32(shape: &[usize], values: &[f32]) -> Result<Tensor, TensorError> {
        Tensor::from_slice(shape, values)
    }

    /// A CPU tensor from typed elements.
    pub fn from_slice<T: convert::Element>(
        shape: &[usize],
        values: &[T],
    ) -> Result<Tensor, TensorError> {
        let mut t = Tensor::zeros(T::DTYPE, shape)?;
        if t.numel() != values.len() {
            return Err(TensorError::SizeMismatch {
                shape: shape.to_vec(),
                dtype: T::DTYPE.name(),
                expected: t.nbytes(),
                got: std::mem::size_of_val(values),
            });
        }
        t.as_mut_slice::<T>()?.copy_from_slice(values);
        Ok(t)
    }

    fn from_host(dtype: DType, shape: &[usize], buf: HostBuf) -> Tensor {
        Tensor {
            dtype,
            shape: shape.into(),
            dims: shape.iter().map(|&d| d as i64).collect(),
            storage: Storage::Cpu(Arc::new(Host::new(buf))),
        }
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn from_device_buf(
        dtype: DType,
        shape: &[usize],
        buf: crate::kernels::cuda::DeviceBuf,
    ) -> Tensor {
        Tensor {
            dtype,
            shape: shape.into(),
            dims: shape.iter().map(|&d| d as i64).collect(),
            storage: Storage::Cuda(Arc::new(buf)),
        }
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn device_buf(&self) -> Option<&crate::kernels::cuda::DeviceBuf> {
        match &self.storage {
            Storage::Cuda(b) => Some(b),
            Storage::Cpu(_) => None,
        }
    }

    /// The same data under another shape with the same element count (shares storage).
    pub fn reshaped(&self, shape: &[usize]) -> Result<Tensor, TensorError> {
        // A block format's rows must stay whole: the last axis is kept.
        let rows_kept = !self.dtype.is_quantized() || shape.last() == self.shape.last();
        if shape.iter().product::<usize>() != self.numel() || !rows_kept {
            return Err(TensorError::SizeMismatch {
                shape: shape.to_vec(),
                dtype: self.dtype.name(),
                expected: Self::nbytes_for(self.dtype, shape).unwrap_or(usize::MAX),
                got: self.nbytes(),
            });
        }
        Ok(Tensor {
            dtype: self.dtype,
            shape: shape.into(),
            dims: shape.iter().map(|&d| d as i64).collect(),
            storage: self.storage.clone(),
        })
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The shape as signed 64-bit dims (the C ABI's form).
    pub fn dims(&self) -> &[i64] {
        &self.dims
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn nbytes(&self) -> usize {
        Self::nbytes_for(self.dtype, &self.shape).unwrap_or(0)
    }

    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Cpu(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => Device::Cuda(b.ordinal()),
        }
    }

    /// True when the CPU bytes are a window into a memory-mapped file.
    pub fn is_mapped(&self) -> bool {
        matches!(&self.storage, Storage::Cpu(b) if matches!(b.buf, HostBuf::Mapped { .. }))
    }

    /// The mapped file and the byte range of a tensor that views one (see [`Tensor::is_mapped`]).
    pub(crate) fn mapped_range(&self) -> Option<(&Arc<memmap2::Mmap>, usize, usize)> {
        match &self.storage {
            Storage::Cpu(b) => match &b.buf {
                HostBuf::Mapped { map, offset, len } => Some((map, *offset, *len)),
                HostBuf::Owned { .. } => None,
            },
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => None,
        }
    }

    /// An address that identifies the storage (for identity hashing, never dereferenced).
    pub fn storage_id(&self) -> usize {
        match &self.storage {
            Storage::Cpu(b) => b.buf.bytes().as_ptr() as usize,
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => Arc::as_ptr(b) as usize,
        }
    }

    /// The raw row-major bytes of a CPU tensor.
    pub fn cpu_bytes(&self) -> Result<&[u8], TensorError> {
        match &self.storage {
            Storage::Cpu(b) => Ok(&b.buf.bytes()[..self.nbytes()]),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => Err(TensorError::NotOnCpu(self.device())),
        }
    }

    /// The packed GEMM form of this CPU tensor's bytes, made by `make` on the first call and
    /// kept with the storage: every tensor sharing it sees the same one, it is dropped with the
    /// storage, and forgotten if the bytes are ever written. `None` for CUDA storage, or when
    /// the kept form was made for another shape (`fits` says whether it serves).
    pub(crate) fn packed_weight(
        &self,
        fits: impl Fn(&crate::kernels::cpu::gemm::PackedB) -> bool,
        make: impl FnOnce() -> crate::kernels::cpu::gemm::PackedB,
    ) -> Option<&crate::kernels::cpu::gemm::PackedB> {
        match &self.storage {
            Storage::Cpu(b) => Some(b.packed.get_or_init(make)).filter(|p| fits(p)),
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => None,
        }
    }

    /// How many handles share this tensor's storage (1: this one alone).
    pub(crate) fn storage_refs(&self) -> usize {
        match &self.storage {
            Storage::Cpu(b) => Arc::strong_count(b),
            #[cfg(feature = "cuda")]
            Storage::Cuda(b) => Arc::strong_count(b),
        }
    }

    /// Whether a packed form of this tensor's bytes is kept (see [`Tensor::packed_weight`]).
    pub(crate) fn has_packed_weight(&self) -> bool {
        matches!(&self.storage, Storage::Cpu(b) if b.packed.get().is_some())
    }

    /// Typed elements of a CPU tensor.
    pub fn as_slice<T: convert::Element>(&self) -> Result<&[T], TensorError> {
        if self.dtype != T::DTYPE {
            return Err(TensorError::WrongDType {
                expected: T::DTYPE.name(),
                got: self.dtype.name(),
            });
        }
        let b = self.cpu_bytes()?;
        // SAFETY: the dtype matches `T`, and storage is aligned for it: owned storage is 64-byte
        // aligned and `from_mapped` copies misaligned windows.
        Ok(
            unsafe {
                std::slice::from_raw_parts(b.as_ptr() as *const T, b.len() / T::DTYPE.size())
            },
        )
    }

    /// Mutable typed elements of a CPU tensor; copies the data first if it is shared or mapped.
    pub fn as_mut_slice<T: convert::Element>(&mut self) -> Result<&mut [T], TensorError> {
        if self.dtype != T::DTYPE {
            return Err(TensorError::WrongDType {
                expected: T::DTYPE.name(),
                got: self.dtype.name(),
            });
        }
        let n = self.nbytes();
        let bytes = self.unique_host_bytes()?;
        // SAFETY: as in `as_slice`, with unique access.
        Ok(unsafe {
            std::slice::from_raw_parts_mut(bytes.as_mut_ptr() as *mut T, n / T::DTYPE.size())
        })
    }

    /// Mutable bytes of a CPU tensor, only when nothing else shares them (no copy): what a plugin
    /// writing a custom loop into a fresh tensor gets.
    pub fn unique_bytes_mut(&mut self) -> Option<&mut [u8]> {
        let n = self.nbytes();
        match &mut self.storage {
            Storage::Cpu(b) => {
                let host = Arc::get_mut(b)?;
                // The bytes may change: a packed form of them would be stale.
                host.packed.take();
                host.buf.bytes_mut().map(|s| &mut s[..n])
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(_) => None,
        }
    }

    /// Copy-on-write access to the bytes.
    fn unique_host_bytes(&mut self) -> Result<&mut [u8], TensorError> {
        let device = self.device();
        let n = self.nbytes();
        #[allow(irrefutable_let_patterns)]
        let Storage::Cpu(buf) = &mut self.storage
        else {
            return Err(TensorError::NotOnCpu(device));
        };
        let writable = Arc::get_mut(buf).is_some_and(|b| b.buf.bytes_mut().is_some());
        if !writable {
            let mut copy = HostBuf::zeroed(n);
            copy.bytes_mut().expect("owned")[..n].copy_from_slice(&buf.buf.bytes()[..n]);
            *buf = Arc::new(Host::new(copy));
        }
        let host = Arc::get_mut(buf).expect("unique after copy");
        host.packed.take();
        let bytes = host.buf.bytes_mut().expect("owned after copy");
        Ok(&mut bytes[..n])
    }

    /// The elements of an f32 CPU tensor (panics otherwise: for tests and internal code that
    /// checked the dtype).
    pub fn as_f32(&self) -> &[f32] {
        self.as_slice::<f32>().expect("an f32 CPU tensor")
    }

    /// Mutable f32 elements (panics unless an f32 CPU tensor; see [`Tensor::as_f32`]).
    pub fn as_f32_mut(&mut self) -> &mut [f32] {
        self.as_mut_slice::<f32>().expect("an f32 CPU tensor")
    }

    /// The elements converted to f32 in a new vector (any dtype, CPU or device).
    pub fn to_f32_vec(&self) -> Result<Vec<f32>, ops::OpError> {
        let cpu = self.to_device(Device::Cpu)?;
        Ok(convert::to_f32_vec(cpu.dtype, cpu.cpu_bytes()?))
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor<{}>{:?}@{}",
            self.dtype.name(),
            self.shape,
            self.device()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_is_aligned_and_copy_on_write() {
        let a = Tensor::from_f32(&[2, 3], &[1., 2., 3., 4., 5., 6.]).unwrap();
        assert_eq!(a.cpu_bytes().unwrap().as_ptr() as usize % 64, 0);
        let mut b = a.clone();
        b.as_f32_mut()[0] = 9.0;
        assert_eq!(a.as_f32()[0], 1.0);
        assert_eq!(b.as_f32()[0], 9.0);
    }

    #[test]
    fn size_mismatch_and_overflow_are_errors() {
        assert!(Tensor::from_bytes(DType::F32, &[2], &[0; 7]).is_err());
        assert!(Tensor::zeros(DType::F32, &[usize::MAX, 2]).is_err());
        assert!(Tensor::zeros(DType::F32, &[2])
            .unwrap()
            .as_slice::<i64>()
            .is_err());
    }

    #[test]
    fn reshape_shares_storage_and_unique_bytes_needs_sole_owner() {
        let mut a = Tensor::zeros(DType::F32, &[2, 3]).unwrap();
        assert!(a.unique_bytes_mut().is_some());
        let b = a.reshaped(&[3, 2]).unwrap();
        assert_eq!(a.storage_id(), b.storage_id());
        assert!(a.unique_bytes_mut().is_none());
        assert!(a.reshaped(&[4]).is_err());
    }
}
