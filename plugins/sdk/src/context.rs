//! [`Context`]: a node's safe view of one execution — inputs, outputs, progress, cancellation,
//! paths, and making Model values.

use crate::abi::{self, DfContext};
use crate::value::{drop_boxed_object, host, FromValue, IntoValue, Object, Value};
use crate::{Error, Result};
use std::ffi::{c_void, CString};
use std::path::PathBuf;

/// One execution of a node, handed to [`crate::Node::execute`].
pub struct Context {
    raw: *mut DfContext,
}

impl Context {
    /// Wraps the host's context pointer for the duration of one callback.
    pub(crate) fn new(raw: *mut DfContext) -> Context {
        Context { raw }
    }

    /// The host's context pointer.
    pub(crate) fn raw(&self) -> *mut DfContext {
        self.raw
    }

    fn cstr(s: &str) -> Result<CString> {
        CString::new(s).map_err(|_| Error(format!("name contains a NUL byte: {s:?}")))
    }

    /// The value connected to input `name`, or `None` when it is absent (optional inputs).
    pub fn input_value(&self, name: &str) -> Result<Option<Value>> {
        let name = Self::cstr(name)?;
        // SAFETY: `raw` is live for the callback; the returned value is borrowed.
        let ptr = unsafe { (host().input)(self.raw, name.as_ptr()) };
        Ok(Value::from_borrowed(ptr))
    }

    /// Reads input `name` as `T`. Inputs with defaults always have a value.
    pub fn input<T: FromValue>(&self, name: &str) -> Result<T> {
        let value = self
            .input_value(name)?
            .ok_or_else(|| Error(format!("input '{name}' has no value")))?;
        T::from_value(&value).map_err(|e| Error(format!("input '{name}': {e}")))
    }

    /// Reads an optional input as `T`.
    pub fn input_opt<T: FromValue>(&self, name: &str) -> Result<Option<T>> {
        match self.input_value(name)? {
            None => Ok(None),
            Some(v) => T::from_value(&v)
                .map(Some)
                .map_err(|e| Error(format!("input '{name}': {e}"))),
        }
    }

    /// Sets output `name`.
    pub fn set_output(&mut self, name: &str, value: impl IntoValue) -> Result<()> {
        let cname = Self::cstr(name)?;
        let raw = value.into_value().into_raw();
        // SAFETY: `raw` is an owned reference handed to the host.
        let rc = unsafe { (host().set_output)(self.raw, cname.as_ptr(), raw) };
        if rc == abi::DF_OK {
            Ok(())
        } else {
            Err(Error(format!("cannot set output '{name}'")))
        }
    }

    /// Reports progress: `step` of `total` done.
    pub fn progress(&self, step: u64, total: u64) {
        // SAFETY: `raw` is live for the callback.
        unsafe { (host().progress)(self.raw, step, total) }
    }

    /// Reports a preview of the work at `step` of `total`: a PNG image (subscribers get a
    /// `node_preview` event).
    pub fn preview(&self, step: u64, total: u64, png: &[u8]) {
        // SAFETY: `raw` is live for the callback; the host copies the bytes.
        unsafe { (host().preview)(self.raw, step, total, png.as_ptr(), png.len() as u64) }
    }

    /// Whether the run was cancelled; long loops should check this and return early.
    pub fn is_cancelled(&self) -> bool {
        // SAFETY: `raw` is live for the callback.
        unsafe { (host().is_cancelled)(self.raw) != 0 }
    }

    /// Returns an error if the run was cancelled.
    pub fn check_cancelled(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::new("cancelled"))
        } else {
            Ok(())
        }
    }

    /// Writes an info log line attributed to this node.
    pub fn log(&self, msg: &str) {
        if let Ok(msg) = CString::new(msg.replace('\0', " ")) {
            // SAFETY: `raw` is live for the callback.
            unsafe { (host().log)(self.raw, abi::DF_LOG_INFO, msg.as_ptr()) }
        }
    }

    fn resolve(
        &self,
        path: &str,
        f: unsafe extern "C" fn(*mut DfContext, *const std::ffi::c_char) -> *mut abi::DfValue,
    ) -> Result<PathBuf> {
        let cpath = Self::cstr(path)?;
        // SAFETY: `raw` is live for the callback; the result is an owned String value.
        let value = Value::from_owned(unsafe { f(self.raw, cpath.as_ptr()) })
            .ok_or_else(|| Error(format!("cannot resolve path {path:?}")))?;
        Ok(PathBuf::from(value.as_str()?))
    }

    /// A path to read, resolved against the graph file's folder.
    pub fn input_path(&self, path: &str) -> Result<PathBuf> {
        self.resolve(path, host().resolve_input_path)
    }

    /// A path to write, resolved against the run's output folder (created on demand).
    pub fn output_path(&self, path: &str) -> Result<PathBuf> {
        self.resolve(path, host().resolve_output_path)
    }

    /// Wraps `object` in a Model value. The plugin stays loaded until the value is dropped.
    pub fn make_object<T: Object>(&self, object: T) -> Result<Value> {
        let tag = Self::cstr(T::TAG)?;
        let raw = Box::into_raw(Box::new(object)) as *mut c_void;
        // SAFETY: the host takes ownership of `raw` and calls `drop_boxed_object::<T>` once.
        let value = unsafe {
            (host().value_object)(self.raw, tag.as_ptr(), raw, Some(drop_boxed_object::<T>))
        };
        Value::from_owned(value).ok_or_else(|| Error::new("cannot make a model value"))
    }
}
