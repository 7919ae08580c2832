//! Typed values that flow along graph links: scalars, strings, tensor-like values, plugin objects
//! (Models) and lists. Values are immutable and cheap to clone; plugins see them as refcounted
//! `DfValue` handles.

use crate::tensor::Tensor;
use std::ffi::c_void;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

/// What a tensor-like value means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TensorKind {
    Tensor,
    Latent,
    Conditioning,
    Image,
    Audio,
    Video,
}

impl TensorKind {
    pub fn name(self) -> &'static str {
        match self {
            TensorKind::Tensor => "Tensor",
            TensorKind::Latent => "Latent",
            TensorKind::Conditioning => "Conditioning",
            TensorKind::Image => "Image",
            TensorKind::Audio => "Audio",
            TensorKind::Video => "Video",
        }
    }
}

/// A UTF-8 string stored with a trailing NUL, so plugins can borrow it as a C string.
#[derive(Clone)]
pub struct Text(Arc<str>);

impl Text {
    pub fn new(s: &str) -> Text {
        let mut owned = String::with_capacity(s.len() + 1);
        owned.push_str(s);
        owned.push('\0');
        Text(owned.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0[..self.0.len() - 1]
    }

    /// The bytes including the trailing NUL.
    pub fn as_c_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

/// An opaque object made by a plugin (a loaded model, say). Dropping the last reference calls the
/// plugin's drop function, then releases the plugin library.
///
/// A Model that speaks the model protocol also has an interface (`DF_INTERFACE_*` and its
/// function table). A patched model is an `Object` of its own over the same base: it has no drop
/// function, holds the base in `base`, and carries the patch list (ordered) and its digest.
pub struct Object {
    pub(crate) tag: String,
    pub(crate) ptr: *mut c_void,
    pub(crate) drop_fn: Option<ditflow_plugin::abi::DfObjectDropFn>,
    /// `DF_INTERFACE_*`, or 0 for a plain object.
    pub(crate) interface: u32,
    /// The interface's function table (owned by the plugin; lives as long as the base object).
    pub(crate) api: *const c_void,
    /// The unpatched model this one patches.
    pub(crate) base: Option<Arc<Object>>,
    /// The patches, in the order hooks run (order key, then insertion).
    pub(crate) patches: Vec<Arc<crate::plugin::model::Patch>>,
    /// Identifies the base plus the patch list.
    pub(crate) digest: u64,
    /// Bytes of the weights the node that made this object loaded for it (0 for a patched
    /// model, which shares its base's): what a session's cache charges it against the memory
    /// cap.
    pub(crate) weight_bytes: usize,
    /// Keeps the library that owns `drop_fn` mapped; declared last so it drops last.
    pub(crate) _keep_alive: Option<Arc<dyn Send + Sync>>,
}

// The plugin promises its objects are usable from any thread (the SDK requires `Send + Sync`).
unsafe impl Send for Object {}
unsafe impl Sync for Object {}

impl Drop for Object {
    fn drop(&mut self) {
        if let Some(drop_fn) = self.drop_fn {
            // SAFETY: the plugin gave us `ptr` with this drop function; it is called once.
            unsafe { drop_fn(self.ptr) }
        }
    }
}

impl Object {
    /// A plain object (no interface, no patches).
    pub(crate) fn new(
        tag: String,
        ptr: *mut c_void,
        drop_fn: Option<ditflow_plugin::abi::DfObjectDropFn>,
        keep_alive: Option<Arc<dyn Send + Sync>>,
    ) -> Object {
        Object {
            tag,
            ptr,
            drop_fn,
            interface: 0,
            api: std::ptr::null(),
            base: None,
            patches: Vec::new(),
            digest: ptr as u64,
            weight_bytes: 0,
            _keep_alive: keep_alive,
        }
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// `DF_INTERFACE_*`, or 0.
    pub fn interface(&self) -> u32 {
        self.interface
    }

    /// How many patches the model carries.
    pub fn patch_count(&self) -> usize {
        self.patches.len()
    }

    /// The digest of the base and its patches.
    pub fn digest(&self) -> u64 {
        self.digest
    }
}

/// A value on a graph link.
#[derive(Clone)]
pub enum Value {
    Bool(bool),
    Int(i64),
    Float(f64),
    String(Text),
    Tensor(TensorKind, Tensor),
    Object(Arc<Object>),
    /// Items are individually refcounted so plugins can borrow them as handles.
    List(Arc<[Arc<Value>]>),
}

impl Value {
    pub fn string(s: &str) -> Value {
        Value::String(Text::new(s))
    }

    pub fn list(items: impl IntoIterator<Item = Value>) -> Value {
        Value::List(items.into_iter().map(Arc::new).collect())
    }

    /// The type name users see in messages.
    pub fn type_name(&self) -> String {
        match self {
            Value::Bool(_) => "Bool".into(),
            Value::Int(_) => "Int".into(),
            Value::Float(_) => "Float".into(),
            Value::String(_) => "String".into(),
            Value::Tensor(kind, t) => {
                format!("{}<{}, {}>", kind.name(), t.dtype().name(), t.shape().len())
            }
            Value::Object(_) => "Model".into(),
            Value::List(_) => "List".into(),
        }
    }

    /// Bytes held, for the cache's accounting (shared data is counted in full).
    pub fn byte_size(&self) -> usize {
        let own = std::mem::size_of::<Value>();
        match self {
            Value::String(s) => own + s.as_c_bytes().len(),
            Value::Tensor(_, t) => own + t.nbytes(),
            Value::List(items) => own + items.iter().map(|v| v.byte_size()).sum::<usize>(),
            _ => own,
        }
    }

    /// Bytes of model weights the value holds: each unpatched model's [`Object::weight_bytes`]
    /// (a patched model shares its base's), summed over lists.
    pub fn model_bytes(&self) -> usize {
        match self {
            Value::Object(o) if o.base.is_none() => o.weight_bytes,
            Value::List(items) => items.iter().map(|v| v.model_bytes()).sum(),
            _ => 0,
        }
    }

    /// Feeds a stable description of the value into `h` (for cache keys). Tensors and objects
    /// hash by identity: they only reach keys through upstream node keys, not as constants.
    pub fn hash_into(&self, h: &mut impl Hasher) {
        match self {
            Value::Bool(b) => (0u8, b).hash(h),
            Value::Int(i) => (1u8, i).hash(h),
            Value::Float(f) => (2u8, f.to_bits()).hash(h),
            Value::String(s) => (3u8, s.as_str()).hash(h),
            Value::Tensor(kind, t) => (4u8, kind, t.storage_id(), t.shape()).hash(h),
            Value::Object(o) => (5u8, o.digest).hash(h),
            Value::List(items) => {
                (6u8, items.len()).hash(h);
                items.iter().for_each(|v| v.hash_into(h));
            }
        }
    }

    /// A JSON rendering for reports and events (tensors are summarised).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        match self {
            Value::Bool(b) => json!(b),
            Value::Int(i) => json!(i),
            Value::Float(f) => json!(f),
            Value::String(s) => json!(s.as_str()),
            Value::Tensor(kind, t) => {
                json!({"kind": kind.name(), "dtype": t.dtype().name(), "shape": t.shape()})
            }
            Value::Object(o) => json!({"kind": "Model", "tag": o.tag()}),
            Value::List(items) => {
                serde_json::Value::Array(items.iter().map(|v| v.to_json()).collect())
            }
        }
    }
}

impl std::fmt::Debug for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(i) => write!(f, "{i}"),
            Value::Float(x) => write!(f, "{x}"),
            Value::String(s) => write!(f, "{:?}", s.as_str()),
            Value::Tensor(kind, t) => write!(f, "{}{:?}", kind.name(), t),
            Value::Object(o) => write!(f, "Model({})", o.tag()),
            Value::List(items) => f.debug_list().entries(items.iter()).finish(),
        }
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::String(s) => f.write_str(s.as_str()),
            other => write!(f, "{}", other.to_json()),
        }
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Value) -> bool {
        match (self, other) {
            (Value::Bool(a), Value::Bool(b)) => a == b,
            (Value::Int(a), Value::Int(b)) => a == b,
            (Value::Float(a), Value::Float(b)) => a.to_bits() == b.to_bits(),
            (Value::String(a), Value::String(b)) => a.as_str() == b.as_str(),
            (Value::Tensor(ka, a), Value::Tensor(kb, b)) => {
                ka == kb
                    && a.dtype() == b.dtype()
                    && a.shape() == b.shape()
                    && a.device() == b.device()
                    && (a.storage_id() == b.storage_id()
                        || (a.cpu_bytes().is_ok() && a.cpu_bytes() == b.cpu_bytes()))
            }
            (Value::Object(a), Value::Object(b)) => Arc::ptr_eq(a, b),
            (Value::List(a), Value::List(b)) => a == b,
            _ => false,
        }
    }
}
