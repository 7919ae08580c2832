//! The plugin host: the C ABI's host side ([`host_api`]) and library loading ([`loader`]).

pub mod host_api;
pub mod loader;

pub use loader::{libraries_in, load_plugin, search_path, LoadedPlugin, PluginError};
