//! The plugin host: the C ABI's host side ([`host_api`], with the tensor engine's entry points in
//! `host_tensor`) and library loading ([`loader`]).

mod half_activations;
pub mod host_api;
mod host_tensor;
pub mod loader;
pub mod model;

pub use loader::{
    build_stamp, is_library_file, libraries_in, load_plugin, load_plugin_as, search_path,
    LoadedLibrary, LoadedPlugin, PluginError,
};
