//! The plugin host: the C ABI's host side ([`host_api`], with the tensor engine's entry points in
//! `host_tensor`) and library loading ([`loader`]).

pub mod host_api;
mod host_tensor;
pub mod loader;

pub use loader::{libraries_in, load_plugin, search_path, LoadedPlugin, PluginError};
