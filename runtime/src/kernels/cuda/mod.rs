//! The CUDA backend: one context, one stream and one cuBLAS handle per device, shared by every
//! plugin; kernels from `kernels.cu`, compiled at run time by NVRTC for the device's compute
//! capability and cached on disk.
//!
//! cudarc loads libcuda, libnvrtc and libcublas dynamically and panics when one is missing, so
//! every entry point probes first and catches panics: a machine without CUDA gets an error
//! message, never a crash.

mod blaslt;
pub mod ops;
mod staging;

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};

/// The kernel sources.
pub const KERNELS_CU: &str = include_str!("kernels.cu");

/// Every `extern "C"` kernel in [`KERNELS_CU`].
pub const KERNEL_NAMES: &[&str] = &[
    "cast",
    "dequantize",
    "randn",
    "bias_act",
    "bias_act_bf16",
    "bias_act_f16",
    "layer_norm",
    "layer_norm_bf16",
    "layer_norm_f16",
    "rms_norm",
    "rms_norm_bf16",
    "rms_norm_f16",
    "group_norm",
    "softmax",
    "softmax_bf16",
    "softmax_f16",
    "attention",
    "attention_bf16",
    "attention_f16",
    "attention_wide",
    "attention_wide_bf16",
    "attention_wide_f16",
    "attention_mma64",
    "attention_mma128",
    "attention_mma64_bf16",
    "attention_mma128_bf16",
    "attention_mma64_f16",
    "attention_mma128_f16",
    "rope",
    "rope_bf16",
    "rope_f16",
    "unary",
    "unary_bf16",
    "unary_f16",
    "affine",
    "affine_bf16",
    "affine_f16",
    "binary",
    "binary_bf16",
    "binary_bf16_f32",
    "binary_f16",
    "binary_f16_f32",
    "gated_residual",
    "gated_residual_bf16",
    "gated_residual_f16",
    "reduce",
    "permute",
    "copy_rows",
    "slice",
    "upsample2d",
    "embedding",
    "topk_rows",
    "index_add_rows",
    "im2col",
];

/// A device allocation holding a tensor's bytes.
pub struct DeviceBuf {
    slice: CudaSlice<u8>,
    ordinal: usize,
    /// Bytes charged to the device's loaded weights under the VRAM cap
    /// ([`crate::weights::vram`]), returned when the buffer goes.
    vram_charge: usize,
}

impl Drop for DeviceBuf {
    fn drop(&mut self) {
        if self.vram_charge > 0 {
            crate::weights::vram::uncharge(self.ordinal, self.vram_charge);
        }
    }
}

impl DeviceBuf {
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The raw device address (the backend uses one stream and no event tracking, so the
    /// guard cudarc returns has nothing to do).
    pub fn ptr(&self, stream: &Arc<CudaStream>) -> u64 {
        let (p, _guard) = self.slice.device_ptr(stream);
        p
    }

    pub fn len(&self) -> usize {
        self.slice.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slice.len() == 0
    }
}

/// One device's context, stream, BLAS handle and kernels.
pub struct Backend {
    /// cuBLASLt, made on first use (`None` where it cannot be used).
    lt: OnceLock<Option<blaslt::Lt>>,
    /// Host weights staged on this device under the VRAM cap.
    pub(crate) staging: Mutex<staging::Staging>,
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub blas: cudarc::cublas::CudaBlas,
    _module: Arc<CudaModule>,
    funcs: HashMap<&'static str, CudaFunction>,
    pub ordinal: usize,
    pub name: String,
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    ditflow_plugin::panic_message(&*p)
}

/// Probes the three libraries without letting cudarc panic.
pub fn probe_libraries() -> Result<(), String> {
    // SAFETY: the probes only try to dlopen candidate names.
    let present = catch_unwind(|| unsafe {
        [
            (
                "libcuda (the NVIDIA driver)",
                cudarc::driver::sys::is_culib_present(),
            ),
            ("libnvrtc", cudarc::nvrtc::sys::is_culib_present()),
            ("libcublas", cudarc::cublas::sys::is_culib_present()),
        ]
    })
    .map_err(panic_text)?;
    match present.iter().find(|(_, ok)| !ok) {
        Some((name, _)) => Err(format!("{name} was not found (is it on LD_LIBRARY_PATH?)")),
        None => Ok(()),
    }
}

/// Compiles the kernels for `arch` (e.g. `compute_80`) to PTX, through the on-disk cache.
pub fn compile_kernels(arch: &'static str) -> Result<String, String> {
    probe_nvrtc()?;
    let key = {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        KERNELS_CU.hash(&mut h);
        arch.hash(&mut h);
        h.finish()
    };
    let cache = cache_dir().map(|d| d.join(format!("kernels-{arch}-{key:016x}.ptx")));
    if let Some(ptx) = cache.as_ref().and_then(|p| std::fs::read_to_string(p).ok()) {
        return Ok(ptx);
    }
    let opts = cudarc::nvrtc::CompileOptions {
        arch: Some(arch),
        options: vec!["--std=c++14".into()],
        ..Default::default()
    };
    let ptx = catch_unwind(|| cudarc::nvrtc::compile_ptx_with_opts(KERNELS_CU, opts))
        .map_err(panic_text)?
        .map_err(|e| match e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                format!(
                    "NVRTC failed to compile the kernels for {arch}:\n{}",
                    log.to_string_lossy()
                )
            }
            other => format!("NVRTC failed for {arch}: {other:?}"),
        })?
        .to_src();
    if let Some(p) = cache {
        let _ = std::fs::create_dir_all(p.parent().expect("cache file has a folder"));
        let _ = std::fs::write(&p, &ptx);
    }
    Ok(ptx)
}

fn probe_nvrtc() -> Result<(), String> {
    // SAFETY: only tries to dlopen candidate names.
    match catch_unwind(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }) {
        Ok(true) => Ok(()),
        _ => Err("libnvrtc was not found (is it on LD_LIBRARY_PATH?)".into()),
    }
}

fn cache_dir() -> Option<std::path::PathBuf> {
    if let Some(d) = std::env::var_os("DITFLOW_CACHE_DIR") {
        return Some(std::path::PathBuf::from(d));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))?;
    Some(base.join("ditflow").join("ptx"))
}

/// Keeps memory freed by dropped tensors in the device's default pool instead of returning it to
/// the driver at every synchronisation (cudarc leaves the release threshold at 0), so repeated
/// forwards reuse allocations. Best effort: a device without memory pools is left as it is.
fn keep_freed_memory_pooled(ctx: &CudaContext) {
    use cudarc::driver::{result, sys};
    // SAFETY: plain driver calls on the context's device; the attribute value is a u64.
    let _ = catch_unwind(AssertUnwindSafe(|| unsafe {
        if let Ok(pool) = result::device::get_default_mem_pool(ctx.cu_device()) {
            let mut threshold: u64 = u64::MAX;
            let _ = result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut threshold as *mut u64 as *mut std::ffi::c_void,
            );
        }
    }));
}

type Slot = Result<Arc<Backend>, String>;

impl Backend {
    /// The backend of device `ordinal`, created on first use; an error says why CUDA cannot be
    /// used (and is remembered, so the probe runs once).
    pub fn get(ordinal: usize) -> Result<Arc<Backend>, String> {
        static BACKENDS: OnceLock<Mutex<HashMap<usize, Slot>>> = OnceLock::new();
        let map = BACKENDS.get_or_init(Default::default);
        let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(ordinal)
            .or_insert_with(|| {
                catch_unwind(AssertUnwindSafe(|| Backend::create(ordinal)))
                    .unwrap_or_else(|p| Err(panic_text(p)))
                    .map(Arc::new)
            })
            .clone()
    }

    fn create(ordinal: usize) -> Result<Backend, String> {
        probe_libraries()?;
        let count =
            CudaContext::device_count().map_err(|e| format!("no usable CUDA device ({e})"))?;
        if ordinal >= count.max(0) as usize {
            return Err(format!("there are {count} CUDA devices"));
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| format!("cannot open the device: {e}"))?;
        // The ops run on one stream; staged weights' uploads ahead of use (the only other
        // stream) order themselves with their own events, so cudarc's tracking is not needed.
        // SAFETY: called before any allocation.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        keep_freed_memory_pooled(&ctx);
        let (major, minor) = ctx.compute_capability().map_err(|e| e.to_string())?;
        let arch: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
        let ptx = compile_kernels(arch)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
            .map_err(|e| format!("loading the kernels: {e}"))?;
        let funcs = KERNEL_NAMES
            .iter()
            .map(|&n| {
                module
                    .load_function(n)
                    .map(|f| (n, f))
                    .map_err(|e| format!("kernel {n}: {e}"))
            })
            .collect::<Result<_, _>>()?;
        let blas =
            cudarc::cublas::CudaBlas::new(stream.clone()).map_err(|e| format!("cuBLAS: {e}"))?;
        let name = ctx.name().unwrap_or_else(|_| "CUDA device".into());
        Ok(Backend {
            staging: Mutex::default(),
            lt: OnceLock::new(),
            ctx,
            stream,
            blas,
            _module: module,
            funcs,
            ordinal,
            name,
        })
    }

    /// cuBLASLt for fused linear epilogues, or `None` where it cannot be used.
    pub(crate) fn lt(&self) -> Option<&blaslt::Lt> {
        self.lt.get_or_init(|| blaslt::Lt::new(self)).as_ref()
    }

    /// Kernel `name` (every one in [`KERNEL_NAMES`] is loaded with the module).
    pub(crate) fn func(&self, name: &str) -> Result<&CudaFunction, String> {
        self.funcs
            .get(name)
            .ok_or_else(|| format!("no kernel {name} in the module"))
    }

    /// A new uninitialised buffer of `bytes` (at least 1 byte, so every tensor has an address).
    pub(crate) fn alloc(&self, bytes: usize) -> Result<DeviceBuf, String> {
        // SAFETY: every op writes its whole output before it is read.
        let slice = unsafe { self.stream.alloc::<u8>(bytes.max(1)) }
            .map_err(|e| format!("out of device memory? {e}"))?;
        Ok(DeviceBuf {
            slice,
            ordinal: self.ordinal,
            vram_charge: 0,
        })
    }

    pub(crate) fn upload(&self, bytes: &[u8]) -> Result<DeviceBuf, String> {
        let mut buf = self.alloc(bytes.len())?;
        if !bytes.is_empty() {
            self.stream
                .memcpy_htod(bytes, &mut buf.slice)
                .map_err(|e| e.to_string())?;
        }
        Ok(buf)
    }

    pub(crate) fn download(&self, buf: &DeviceBuf, len: usize) -> Result<Vec<u8>, String> {
        let mut out = vec![0u8; len];
        if len > 0 {
            let view = buf.slice.slice(..len);
            self.stream
                .memcpy_dtoh(&view, &mut out)
                .map_err(|e| e.to_string())?;
        }
        Ok(out)
    }
}
