//! Safe handles over host-owned values: [`Value`], [`Tensor`], and the conversions
//! ([`FromValue`], [`IntoValue`]) that let node code read and write plain Rust types.

use crate::abi::{self, DfHostApi, DfValue};
use crate::{Error, Result};
use std::ffi::{c_char, c_void, CString};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, Ordering};

static HOST: AtomicPtr<DfHostApi> = AtomicPtr::new(std::ptr::null_mut());

/// Records the host's function table; called by the export glue on every entry from the host.
pub(crate) fn set_host(host: *const DfHostApi) {
    if !host.is_null() {
        HOST.store(host as *mut DfHostApi, Ordering::Release);
    }
}

/// The host's function table. Only reachable after the host called into the plugin.
pub(crate) fn host() -> &'static DfHostApi {
    let ptr = HOST.load(Ordering::Acquire);
    assert!(
        !ptr.is_null(),
        "ditflow-plugin: the host API is used before the host called in"
    );
    // SAFETY: the host passes a pointer to its static function table, valid for the process.
    unsafe { &*ptr }
}

/// What a value is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Bool,
    Int,
    Float,
    String,
    Tensor,
    Latent,
    Conditioning,
    Image,
    Audio,
    Video,
    Model,
    List,
}

impl Kind {
    pub(crate) fn from_raw(raw: i32) -> Option<Kind> {
        Some(match raw {
            abi::DF_KIND_BOOL => Kind::Bool,
            abi::DF_KIND_INT => Kind::Int,
            abi::DF_KIND_FLOAT => Kind::Float,
            abi::DF_KIND_STRING => Kind::String,
            abi::DF_KIND_TENSOR => Kind::Tensor,
            abi::DF_KIND_LATENT => Kind::Latent,
            abi::DF_KIND_CONDITIONING => Kind::Conditioning,
            abi::DF_KIND_IMAGE => Kind::Image,
            abi::DF_KIND_AUDIO => Kind::Audio,
            abi::DF_KIND_VIDEO => Kind::Video,
            abi::DF_KIND_MODEL => Kind::Model,
            abi::DF_KIND_LIST => Kind::List,
            _ => return None,
        })
    }

    pub(crate) fn raw(self) -> i32 {
        match self {
            Kind::Bool => abi::DF_KIND_BOOL,
            Kind::Int => abi::DF_KIND_INT,
            Kind::Float => abi::DF_KIND_FLOAT,
            Kind::String => abi::DF_KIND_STRING,
            Kind::Tensor => abi::DF_KIND_TENSOR,
            Kind::Latent => abi::DF_KIND_LATENT,
            Kind::Conditioning => abi::DF_KIND_CONDITIONING,
            Kind::Image => abi::DF_KIND_IMAGE,
            Kind::Audio => abi::DF_KIND_AUDIO,
            Kind::Video => abi::DF_KIND_VIDEO,
            Kind::Model => abi::DF_KIND_MODEL,
            Kind::List => abi::DF_KIND_LIST,
        }
    }

    /// Whether values of this kind carry a tensor.
    pub fn is_tensor_like(self) -> bool {
        matches!(
            self,
            Kind::Tensor
                | Kind::Latent
                | Kind::Conditioning
                | Kind::Image
                | Kind::Audio
                | Kind::Video
        )
    }
}

/// Tensor element types: dense ones, and ggml's block formats (the last axis stored in blocks
/// of [`DType::block`] values, each block scaled: a quantized weight as GGUF stores it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    I64,
    I32,
    U8,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q4K,
    Q5K,
    Q6K,
}

/// Every dtype with its `DF_DTYPE_*` code and name.
const DTYPES: [(DType, i32, &str); 14] = [
    (DType::F32, abi::DF_DTYPE_F32, "f32"),
    (DType::F16, abi::DF_DTYPE_F16, "f16"),
    (DType::BF16, abi::DF_DTYPE_BF16, "bf16"),
    (DType::I64, abi::DF_DTYPE_I64, "i64"),
    (DType::I32, abi::DF_DTYPE_I32, "i32"),
    (DType::U8, abi::DF_DTYPE_U8, "u8"),
    (DType::Q8_0, abi::DF_DTYPE_Q8_0, "q8_0"),
    (DType::Q4_0, abi::DF_DTYPE_Q4_0, "q4_0"),
    (DType::Q4_1, abi::DF_DTYPE_Q4_1, "q4_1"),
    (DType::Q5_0, abi::DF_DTYPE_Q5_0, "q5_0"),
    (DType::Q5_1, abi::DF_DTYPE_Q5_1, "q5_1"),
    (DType::Q4K, abi::DF_DTYPE_Q4_K, "q4_k"),
    (DType::Q5K, abi::DF_DTYPE_Q5_K, "q5_k"),
    (DType::Q6K, abi::DF_DTYPE_Q6_K, "q6_k"),
];

impl DType {
    /// The dtype for a `DF_DTYPE_*` code.
    pub fn from_raw(raw: i32) -> Option<DType> {
        DTYPES.iter().find(|e| e.1 == raw).map(|e| e.0)
    }

    /// The `DF_DTYPE_*` code.
    pub fn raw(self) -> i32 {
        DTYPES.iter().find(|e| e.0 == self).map_or(0, |e| e.1)
    }

    /// `(values, bytes)` per storage block: `(1, element size)` for a dense dtype, ggml's block
    /// for a block format (32 values in 34 bytes for Q8_0, 256 in 210 for Q6_K...).
    pub fn block(self) -> (usize, usize) {
        match self {
            DType::F32 | DType::I32 => (1, 4),
            DType::F16 | DType::BF16 => (1, 2),
            DType::I64 => (1, 8),
            DType::U8 => (1, 1),
            DType::Q8_0 => (32, 34),
            DType::Q4_0 => (32, 18),
            DType::Q4_1 => (32, 20),
            DType::Q5_0 => (32, 22),
            DType::Q5_1 => (32, 24),
            DType::Q4K => (256, 144),
            DType::Q5K => (256, 176),
            DType::Q6K => (256, 210),
        }
    }

    /// Whether this is a block format (see [`DType::block`]).
    pub fn is_quantized(self) -> bool {
        self.block().0 > 1
    }

    /// Bytes per element of a dense dtype. A block format's values have no whole size: its
    /// storage is counted in bytes (1 here); [`DType::block`] gives the block's.
    pub fn size(self) -> usize {
        let (values, bytes) = self.block();
        if values == 1 {
            bytes
        } else {
            1
        }
    }

    /// The name used in type expressions and files (`f32`, `bf16`, `q8_0`...).
    pub fn name(self) -> &'static str {
        DTYPES.iter().find(|e| e.0 == self).map_or("?", |e| e.2)
    }
}

/// One reference to a host value. Cloning takes another reference; dropping releases it.
pub struct Value {
    ptr: NonNull<DfValue>,
}

// Host values are immutable and refcounted atomically by the host.
unsafe impl Send for Value {}
unsafe impl Sync for Value {}

impl Value {
    /// Takes ownership of a reference returned by the host; `None` for NULL.
    pub(crate) fn from_owned(ptr: *mut DfValue) -> Option<Value> {
        NonNull::new(ptr).map(|ptr| Value { ptr })
    }

    /// Takes a new reference to a borrowed value; `None` for NULL.
    pub(crate) fn from_borrowed(ptr: *const DfValue) -> Option<Value> {
        let ptr = NonNull::new(ptr as *mut DfValue)?;
        // SAFETY: the host guarantees `ptr` is a live value for the duration of the borrow.
        unsafe { (host().value_retain)(ptr.as_ptr()) };
        Some(Value { ptr })
    }

    /// Gives the reference to the host (for `set_output`, `value_list`).
    pub(crate) fn into_raw(self) -> *mut DfValue {
        let ptr = self.ptr.as_ptr();
        std::mem::forget(self);
        ptr
    }

    pub(crate) fn as_ptr(&self) -> *const DfValue {
        self.ptr.as_ptr()
    }

    /// The handle's identity: equal for the same value while it is alive (for per-run caches
    /// keyed on an input).
    pub fn id(&self) -> usize {
        self.ptr.as_ptr() as usize
    }

    /// What this value is.
    pub fn kind(&self) -> Kind {
        // SAFETY: `self` holds a reference, so the value is live.
        let raw = unsafe { (host().value_kind)(self.as_ptr()) };
        Kind::from_raw(raw).unwrap_or(Kind::Model)
    }

    pub fn bool(v: bool) -> Value {
        // SAFETY: plain constructor.
        Value::from_owned(unsafe { (host().value_bool)(v as i32) }).expect("host out of memory")
    }

    pub fn int(v: i64) -> Value {
        // SAFETY: plain constructor.
        Value::from_owned(unsafe { (host().value_int)(v) }).expect("host out of memory")
    }

    pub fn float(v: f64) -> Value {
        // SAFETY: plain constructor.
        Value::from_owned(unsafe { (host().value_float)(v) }).expect("host out of memory")
    }

    pub fn string(v: &str) -> Value {
        // SAFETY: `v` is valid UTF-8 for `len` bytes.
        Value::from_owned(unsafe { (host().value_string)(v.as_ptr() as *const c_char, v.len()) })
            .expect("host out of memory")
    }

    pub fn list(items: Vec<Value>) -> Value {
        let raw: Vec<*mut DfValue> = items.into_iter().map(Value::into_raw).collect();
        // SAFETY: the host takes ownership of every item.
        Value::from_owned(unsafe { (host().value_list)(raw.as_ptr(), raw.len()) })
            .expect("host out of memory")
    }

    pub fn as_bool(&self) -> Result<bool> {
        let mut out = 0i32;
        // SAFETY: live value, valid out pointer.
        let rc = unsafe { (host().value_get_bool)(self.as_ptr(), &mut out) };
        self.check(rc, "Bool").map(|_| out != 0)
    }

    pub fn as_int(&self) -> Result<i64> {
        let mut out = 0i64;
        // SAFETY: live value, valid out pointer.
        let rc = unsafe { (host().value_get_int)(self.as_ptr(), &mut out) };
        self.check(rc, "Int").map(|_| out)
    }

    pub fn as_float(&self) -> Result<f64> {
        let mut out = 0f64;
        // SAFETY: live value, valid out pointer.
        let rc = unsafe { (host().value_get_float)(self.as_ptr(), &mut out) };
        self.check(rc, "Float").map(|_| out)
    }

    /// Borrows a String value's text.
    pub fn as_str(&self) -> Result<&str> {
        let mut ptr: *const c_char = std::ptr::null();
        let mut len = 0usize;
        // SAFETY: live value, valid out pointers.
        let rc = unsafe { (host().value_get_string)(self.as_ptr(), &mut ptr, &mut len) };
        self.check(rc, "String")?;
        // SAFETY: the host hands out UTF-8 bytes that live as long as the value.
        let bytes = unsafe { std::slice::from_raw_parts(ptr as *const u8, len) };
        std::str::from_utf8(bytes).map_err(|e| Error(e.to_string()))
    }

    /// The items of a List value.
    pub fn as_list(&self) -> Result<Vec<Value>> {
        if self.kind() != Kind::List {
            return Err(self.mismatch("List"));
        }
        // SAFETY: live value.
        let n = unsafe { (host().value_list_len)(self.as_ptr()) };
        (0..n)
            .map(|i| {
                // SAFETY: `i < n`; the item is borrowed from the live list.
                let item = unsafe { (host().value_list_get)(self.as_ptr(), i) };
                Value::from_borrowed(item).ok_or_else(|| Error::new("list item missing"))
            })
            .collect()
    }

    /// The value as a tensor, when it is tensor-like.
    pub fn as_tensor(&self) -> Result<Tensor> {
        Tensor::from_value(self.clone())
    }

    /// The plugin object inside a Model value, when its tag matches.
    pub fn as_object<T: Object>(&self) -> Result<&T> {
        let tag = CString::new(T::TAG).map_err(|e| Error(e.to_string()))?;
        // SAFETY: live value; the host compares the tag and returns the pointer it was given.
        let ptr = unsafe { (host().value_object_get)(self.as_ptr(), tag.as_ptr()) };
        if ptr.is_null() {
            return Err(Error(format!("expected a model of type {}", T::TAG)));
        }
        // SAFETY: objects with tag `T::TAG` are only ever made from a `Box<T>` by `make_object`;
        // the value keeps it alive for as long as `self` is borrowed.
        Ok(unsafe { &*(ptr as *const T) })
    }

    fn check(&self, rc: i32, want: &str) -> Result<()> {
        if rc == abi::DF_OK {
            Ok(())
        } else {
            Err(self.mismatch(want))
        }
    }

    fn mismatch(&self, want: &str) -> Error {
        Error(format!("expected {want}, got {:?}", self.kind()))
    }
}

impl Clone for Value {
    fn clone(&self) -> Self {
        // SAFETY: live value.
        unsafe { (host().value_retain)(self.as_ptr()) };
        Value { ptr: self.ptr }
    }
}

impl Drop for Value {
    fn drop(&mut self) {
        // SAFETY: we own one reference.
        unsafe { (host().value_release)(self.ptr.as_ptr()) };
    }
}

impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Value({:?})", self.kind())
    }
}

/// A type whose boxed instances can live inside a Model value.
pub trait Object: Send + Sync + 'static {
    /// A tag naming the type, checked when the value is read back.
    const TAG: &'static str;
}

impl Value {
    /// `object` as a value outside any node's callback (a model's step state, say). Unlike
    /// [`crate::Context::make_object`] it does not keep the plugin loaded by itself: it is for
    /// values that live inside a call to one of the plugin's models.
    pub fn object<T: Object>(object: T) -> Result<Value> {
        let tag =
            std::ffi::CString::new(T::TAG).map_err(|_| Error::new("a tag with a NUL byte"))?;
        let raw = Box::into_raw(Box::new(object)) as *mut c_void;
        // SAFETY: the host takes ownership of `raw` and calls `drop_boxed_object::<T>` once; a
        // NULL context is allowed.
        let v = unsafe {
            (host().value_object)(
                std::ptr::null_mut(),
                tag.as_ptr(),
                raw,
                Some(drop_boxed_object::<T>),
            )
        };
        Value::from_owned(v).ok_or_else(|| Error::new("cannot make an object value"))
    }
}

pub(crate) unsafe extern "C" fn drop_boxed_object<T: Object>(object: *mut c_void) {
    if !object.is_null() {
        // Never unwind into the host.
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // SAFETY: `object` came from `Box::<T>::into_raw` in `Context::make_object`.
            drop(unsafe { Box::from_raw(object as *mut T) });
        }));
    }
}

/// A tensor-like value: Tensor, Latent, Conditioning, Image, Audio or Video.
#[derive(Clone, Debug)]
pub struct Tensor {
    value: Value,
    dtype: DType,
    shape: Vec<usize>,
}

impl Tensor {
    /// Wraps a tensor-like value (taking the handle).
    pub(crate) fn from_owned_value(value: Value) -> Result<Tensor> {
        Tensor::from_value(value)
    }

    /// The value handle behind the tensor.
    pub fn as_value(&self) -> &Value {
        &self.value
    }

    fn from_value(value: Value) -> Result<Tensor> {
        let mut dtype = 0i32;
        let mut shape: *const i64 = std::ptr::null();
        let mut rank = 0usize;
        // SAFETY: live value, valid out pointers.
        let rc = unsafe {
            (host().value_tensor_info)(value.as_ptr(), &mut dtype, &mut shape, &mut rank)
        };
        if rc != abi::DF_OK {
            return Err(value.mismatch("a tensor"));
        }
        let dims: &[i64] = if rank == 0 {
            &[]
        } else {
            // SAFETY: the host returns `rank` dims that live as long as the value.
            unsafe { std::slice::from_raw_parts(shape, rank) }
        };
        let dtype = DType::from_raw(dtype).ok_or_else(|| Error::new("unknown dtype"))?;
        let shape = dims.iter().map(|&d| d.max(0) as usize).collect();
        Ok(Tensor {
            value,
            dtype,
            shape,
        })
    }

    /// A new tensor of `kind` copying `data` (row-major bytes of `dtype`).
    pub fn from_bytes(kind: Kind, dtype: DType, shape: &[usize], data: &[u8]) -> Result<Tensor> {
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        // SAFETY: valid pointers and lengths; the host checks `nbytes` against the shape.
        let raw = unsafe {
            (host().value_tensor)(
                kind.raw(),
                dtype.raw(),
                dims.as_ptr(),
                dims.len(),
                data.as_ptr() as *const c_void,
                data.len(),
            )
        };
        let value = Value::from_owned(raw).ok_or_else(|| {
            Error(format!(
                "cannot make a {kind:?} of {} {shape:?} from {} bytes",
                dtype.name(),
                data.len()
            ))
        })?;
        Tensor::from_value(value)
    }

    /// A new f32 tensor of `kind`.
    pub fn from_f32(kind: Kind, shape: &[usize], data: &[f32]) -> Result<Tensor> {
        // SAFETY: any f32 slice is a valid byte slice of 4× the length.
        let bytes =
            unsafe { std::slice::from_raw_parts(data.as_ptr() as *const u8, data.len() * 4) };
        Tensor::from_bytes(kind, DType::F32, shape, bytes)
    }

    /// Standard-normal noise from the host's counter-based RNG: the same seed gives the same
    /// tensor everywhere.
    pub fn randn(kind: Kind, shape: &[usize], seed: u64) -> Result<Tensor> {
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        // SAFETY: valid pointers and lengths.
        let raw = unsafe {
            (host().tensor_randn)(
                kind.raw(),
                DType::F32.raw(),
                dims.as_ptr(),
                dims.len(),
                seed,
            )
        };
        let value = Value::from_owned(raw)
            .ok_or_else(|| Error(format!("cannot make noise of shape {shape:?}")))?;
        Tensor::from_value(value)
    }

    pub fn kind(&self) -> Kind {
        self.value.kind()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The row-major bytes, zero-copy.
    pub fn bytes(&self) -> &[u8] {
        let mut n = 0usize;
        // SAFETY: live tensor value; the data lives as long as the value.
        let ptr = unsafe { (host().value_tensor_data)(self.value.as_ptr(), &mut n) };
        if ptr.is_null() || n == 0 {
            return &[];
        }
        // SAFETY: the host returns `n` readable bytes.
        unsafe { std::slice::from_raw_parts(ptr as *const u8, n) }
    }

    /// The elements of an f32 tensor, zero-copy.
    pub fn as_f32(&self) -> Result<&[f32]> {
        if self.dtype != DType::F32 {
            bail_dtype(self.dtype, DType::F32)?;
        }
        let bytes = self.bytes();
        if bytes.is_empty() {
            return Ok(&[]);
        }
        if !(bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<f32>()) {
            return Err(Error::new("tensor data is not aligned for f32"));
        }
        // SAFETY: aligned, length is a multiple of 4 (checked by the host at creation).
        Ok(unsafe { std::slice::from_raw_parts(bytes.as_ptr() as *const f32, bytes.len() / 4) })
    }

    /// The same data as another kind (an Image from a Tensor, say); shares storage.
    pub fn with_kind(&self, kind: Kind) -> Result<Tensor> {
        if self.kind() == kind {
            return Ok(self.clone());
        }
        let shape: Vec<i64> = self.shape.iter().map(|&d| d as i64).collect();
        crate::ops::call(
            "reshape",
            &[Some(self)],
            &[("shape", crate::ops::Attr::Ints(&shape))],
            Some(kind),
        )?
        .pop()
        .ok_or_else(|| Error::new("reshape returned nothing"))
    }

    pub fn into_value(self) -> Value {
        self.value
    }
}

fn bail_dtype(got: DType, want: DType) -> Result<()> {
    Err(Error(format!(
        "expected a {} tensor, got {}",
        want.name(),
        got.name()
    )))
}

/// A Rust type an input can be read as.
pub trait FromValue: Sized {
    fn from_value(value: &Value) -> Result<Self>;
}

/// A Rust type an output can be set from.
pub trait IntoValue {
    fn into_value(self) -> Value;
}

impl FromValue for Value {
    fn from_value(value: &Value) -> Result<Self> {
        Ok(value.clone())
    }
}

impl FromValue for bool {
    fn from_value(value: &Value) -> Result<Self> {
        value.as_bool()
    }
}

impl FromValue for i64 {
    fn from_value(value: &Value) -> Result<Self> {
        value.as_int()
    }
}

impl FromValue for f64 {
    fn from_value(value: &Value) -> Result<Self> {
        value.as_float()
    }
}

impl FromValue for String {
    fn from_value(value: &Value) -> Result<Self> {
        value.as_str().map(str::to_string)
    }
}

impl FromValue for Tensor {
    fn from_value(value: &Value) -> Result<Self> {
        value.as_tensor()
    }
}

impl<T: FromValue> FromValue for Vec<T> {
    fn from_value(value: &Value) -> Result<Self> {
        value.as_list()?.iter().map(T::from_value).collect()
    }
}

impl IntoValue for Value {
    fn into_value(self) -> Value {
        self
    }
}

impl IntoValue for bool {
    fn into_value(self) -> Value {
        Value::bool(self)
    }
}

impl IntoValue for i64 {
    fn into_value(self) -> Value {
        Value::int(self)
    }
}

impl IntoValue for f64 {
    fn into_value(self) -> Value {
        Value::float(self)
    }
}

impl IntoValue for String {
    fn into_value(self) -> Value {
        Value::string(&self)
    }
}

impl IntoValue for &str {
    fn into_value(self) -> Value {
        Value::string(self)
    }
}

impl IntoValue for Tensor {
    fn into_value(self) -> Value {
        self.value
    }
}

impl<T: IntoValue> IntoValue for Vec<T> {
    fn into_value(self) -> Value {
        Value::list(self.into_iter().map(IntoValue::into_value).collect())
    }
}
