//! `ditflow-plugin`: the stable C ABI between the ditflow host and its plugins, and a safe Rust SDK
//! over it.
//!
//! A Rust plugin implements [`Node`] for each node type and calls [`export_plugin!`] once:
//!
//! ```ignore
//! use ditflow_plugin::prelude::*;
//!
//! #[derive(Default)]
//! struct Double;
//!
//! impl Node for Double {
//!     fn schema() -> NodeSchema {
//!         NodeSchema::new("Double")
//!             .category("math")
//!             .doc("Multiplies a number by two.")
//!             .input(Port::new("x", "Float").doc("the number"))
//!             .output(Port::new("y", "Float"))
//!     }
//!     fn execute(&self, ctx: &mut Context) -> Result<()> {
//!         let x: f64 = ctx.input("x")?;
//!         ctx.set_output("y", x * 2.0)
//!     }
//! }
//!
//! export_plugin!(name: "my-plugin", version: "0.1.0", nodes: [Double]);
//! ```
//!
//! Plugin code never needs `unsafe`: the SDK owns every FFI call, and every entry point catches
//! panics and turns them into the node's error. The raw ABI lives in [`abi`], mirrored for C in
//! `include/ditflow_plugin.h`.

pub mod abi;
pub mod attention;
pub mod conditioning;
mod context;
pub mod encoder_api;
mod export;
pub mod files;
pub mod linear_delta;
pub mod media;
pub mod model;
pub mod ops;
mod schema;
mod value;

pub use conditioning::Conditioning;
pub use context::Context;
pub use export::{panic_message, register_nodes, NodeRegistration};
pub use media::{Audio, Video};
pub use ops::Device;
pub use schema::{NodeSchema, Port};
pub use value::{DType, FromValue, IntoValue, Kind, Object, Tensor, Value};

/// A node error: the message becomes the node's failure in the host's report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl Error {
    pub fn new(msg: impl Into<String>) -> Self {
        Error(msg.into())
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<String> for Error {
    fn from(s: String) -> Self {
        Error(s)
    }
}

impl From<&str> for Error {
    fn from(s: &str) -> Self {
        Error(s.to_string())
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error(e.to_string())
    }
}

/// The result type of node code.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Returns early from a node with a formatted error.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::Error(format!($($arg)*))) };
}

/// A node type implemented in Rust.
///
/// The host creates one instance per node type (through `Default`) when the plugin is loaded and
/// calls [`Node::execute`] from worker threads, possibly concurrently: keep per-run state in locals.
pub trait Node: Default + Send + Sync + 'static {
    /// The node type's ports, flags and documentation.
    fn schema() -> NodeSchema;

    /// Runs the node: read inputs from `ctx`, set every output.
    fn execute(&self, ctx: &mut Context) -> Result<()>;

    /// An optional fingerprint over the resolved inputs, mixed into the cache key (for example a
    /// file's size and modification time, so an edited file is read again).
    fn fingerprint(&self, _ctx: &mut Context) -> Result<Option<u64>> {
        Ok(None)
    }
}

/// Writes an info log line outside any node's callback (from a hook, say).
pub fn log_info(msg: &str) {
    if let Ok(msg) = std::ffi::CString::new(msg.replace('\0', " ")) {
        // SAFETY: the host accepts a NULL context; the message is NUL-terminated.
        unsafe { (value::host().log)(std::ptr::null_mut(), abi::DF_LOG_INFO, msg.as_ptr()) }
    }
}

/// Everything a plugin usually needs.
pub mod prelude {
    pub use crate::{
        bail, export_plugin, Conditioning, Context, DType, Device, Error, Kind, Node, NodeSchema,
        Port, Result, Tensor, Value,
    };
}
