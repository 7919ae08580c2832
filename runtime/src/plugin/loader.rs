//! Loading plugin libraries: finding them on the search path, checking their descriptor and ABI
//! version, and turning the node types they register into registry entries whose calls go through
//! the C ABI with panics contained.

use super::host_api::host_api;
use crate::exec::context::ExecContext;
use crate::registry::{NodeImpl, NodeType, PluginInfo, PortSpec};
use crate::types::PortType;
use ditflow_plugin::abi::*;
use std::ffi::{c_char, c_void, CStr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a library was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PluginError {
    #[error("{path}: cannot load library: {reason}")]
    Load { path: String, reason: String },
    #[error("{path}: not a ditflow plugin (no `{DF_PLUGIN_SYMBOL}` symbol)")]
    NotAPlugin { path: String },
    #[error("{path}: malformed plugin descriptor: {reason}")]
    Malformed { path: String, reason: String },
    #[error(
        "{path}: plugin '{name}' was built for ABI {major}.{minor}, but this host speaks ABI \
         {DF_ABI_MAJOR}.{DF_ABI_MINOR} (the major must be {DF_ABI_MAJOR} and the minor at most {DF_ABI_MINOR})"
    )]
    IncompatibleAbi {
        path: String,
        name: String,
        major: u32,
        minor: u32,
    },
    #[error("{path}: plugin '{name}' failed to register its node types: {reason}")]
    Register {
        path: String,
        name: String,
        reason: String,
    },
}

impl PluginError {
    /// The library file the error is about.
    pub fn path(&self) -> &str {
        match self {
            PluginError::Load { path, .. }
            | PluginError::NotAPlugin { path }
            | PluginError::Malformed { path, .. }
            | PluginError::IncompatibleAbi { path, .. }
            | PluginError::Register { path, .. } => path,
        }
    }
}

/// A mapped library. Everything a plugin created holds an `Arc` to it, so it is unmapped only
/// after the last node type, object and value from it is gone.
pub struct LoadedLibrary {
    _lib: libloading::Library,
    pub path: PathBuf,
}

/// A loaded plugin: its identity, node types and the problems met while registering them.
pub struct LoadedPlugin {
    pub info: Arc<PluginInfo>,
    /// The mapped library, held by every node type and object it made.
    pub library: Arc<LoadedLibrary>,
    pub node_types: Vec<NodeType>,
    /// Node types the plugin tried to register but that were refused.
    pub warnings: Vec<String>,
}

/// Node types collected during one plugin's `register` call (the `DfRegistrar*`).
pub(crate) struct Registrar {
    info: Arc<PluginInfo>,
    library: Arc<LoadedLibrary>,
    pub(crate) types: Vec<NodeType>,
    pub(crate) errors: Vec<String>,
}

/// # Safety
/// `s` must be NULL or NUL-terminated.
unsafe fn opt_str(s: *const c_char) -> Result<Option<String>, String> {
    if s.is_null() {
        return Ok(None);
    }
    // SAFETY: per the contract.
    unsafe { CStr::from_ptr(s) }
        .to_str()
        .map(|s| Some(s.to_string()))
        .map_err(|_| "a string is not valid UTF-8".to_string())
}

/// A name a plugin may declare: an identifier of at most 128 bytes.
fn is_identifier(s: &str) -> bool {
    s.len() <= 128 && crate::graph::yaml::is_identifier(s)
}

/// Reads and checks one port description.
///
/// # Safety
/// `p` must point at a valid `DfPortDesc` whose strings are NUL-terminated.
unsafe fn read_port(p: &DfPortDesc, is_input: bool) -> Result<PortSpec, String> {
    // SAFETY: per the contract.
    let name = unsafe { opt_str(p.name) }?.ok_or("a port has no name")?;
    if !is_identifier(&name) {
        return Err(format!("port name {name:?} is not an identifier"));
    }
    // SAFETY: per the contract.
    let type_expr =
        unsafe { opt_str(p.type_expr) }?.ok_or_else(|| format!("port '{name}' has no type"))?;
    let ty = PortType::parse(&type_expr).map_err(|e| format!("port '{name}': {e}"))?;
    let mut spec = PortSpec::new(&name, ty);
    // SAFETY: per the contract.
    spec.doc = unsafe { opt_str(p.doc) }?.unwrap_or_default();
    spec.min = (!p.min.is_nan()).then_some(p.min);
    spec.max = (!p.max.is_nan()).then_some(p.max);
    spec.optional = p.flags & DF_PORT_OPTIONAL != 0;
    // SAFETY: per the contract.
    if let Some(choices) = unsafe { opt_str(p.choices) }? {
        spec.choices = choices.split('|').map(str::to_string).collect();
    }
    // SAFETY: per the contract.
    if let Some(json) = unsafe { opt_str(p.default_json) }? {
        if !is_input {
            return Err(format!("output '{name}' has a default"));
        }
        let parsed: serde_json::Value = serde_json::from_str(&json)
            .map_err(|e| format!("port '{name}': default {json:?} is not JSON: {e}"))?;
        let c = crate::graph::ir::Const::from_json(&parsed);
        let value = spec
            .ty
            .value_from_const(&c)
            .map_err(|e| format!("port '{name}': default {e}"))?;
        spec.check_value(&value)
            .map_err(|e| format!("port '{name}': default {e}"))?;
        spec.default = Some(value);
    }
    Ok(spec)
}

/// # Safety
/// `ptr` must point at `n` ports (or be NULL with `n == 0`).
unsafe fn read_ports(
    ptr: *const DfPortDesc,
    n: usize,
    is_input: bool,
) -> Result<Vec<PortSpec>, String> {
    if n == 0 {
        return Ok(Vec::new());
    }
    if ptr.is_null() || n > 4096 {
        return Err("port array is NULL or absurdly long".into());
    }
    // SAFETY: per the contract.
    let ports = unsafe { std::slice::from_raw_parts(ptr, n) };
    let mut out: Vec<PortSpec> = Vec::with_capacity(n);
    for p in ports {
        // SAFETY: per the contract.
        let spec = unsafe { read_port(p, is_input) }?;
        if out.iter().any(|o| o.name == spec.name) {
            return Err(format!("port '{}' is declared twice", spec.name));
        }
        out.push(spec);
    }
    Ok(out)
}

impl Registrar {
    /// Adds one node type from its C description. On refusal the type's `user_data` is dropped
    /// and the reason recorded.
    ///
    /// # Safety
    /// `desc` must be NULL or a valid `DfNodeDesc` for the duration of the call.
    pub(crate) unsafe fn add(&mut self, desc: *const DfNodeDesc) -> Result<(), ()> {
        // SAFETY: per the contract.
        let Some(d) = (unsafe { desc.as_ref() }) else {
            self.errors
                .push("register_node was called with NULL".into());
            return Err(());
        };
        // SAFETY: per the contract.
        let result = unsafe { self.read(d) };
        match result {
            Ok(ty) => {
                self.types.push(ty);
                Ok(())
            }
            Err(e) => {
                if let Some(drop_fn) = d.drop_user_data {
                    // SAFETY: the plugin's own cleanup for its own pointer.
                    unsafe { drop_fn(d.user_data) };
                }
                // SAFETY: per the contract.
                let name = unsafe { opt_str(d.type_name) }
                    .ok()
                    .flatten()
                    .unwrap_or_else(|| "?".into());
                self.errors.push(format!("node type '{name}' refused: {e}"));
                Err(())
            }
        }
    }

    /// # Safety
    /// `d` must be a valid `DfNodeDesc`.
    unsafe fn read(&self, d: &DfNodeDesc) -> Result<NodeType, String> {
        if (d.size as usize) < std::mem::size_of::<DfNodeDesc>() {
            return Err(format!(
                "descriptor size {} is smaller than {}",
                d.size,
                std::mem::size_of::<DfNodeDesc>()
            ));
        }
        // SAFETY: per the contract (all string fields are NULL or NUL-terminated).
        let name = unsafe { opt_str(d.type_name) }?.ok_or("no type name")?;
        if !is_identifier(&name) {
            return Err(format!("type name {name:?} is not an identifier"));
        }
        let execute = d.execute.ok_or("no execute function")?;
        // SAFETY: per the contract.
        let inputs = unsafe { read_ports(d.inputs, d.n_inputs, true) }?;
        // SAFETY: per the contract.
        let outputs = unsafe { read_ports(d.outputs, d.n_outputs, false) }?;
        let deterministic = d.flags & DF_NODE_DETERMINISTIC != 0;
        let side_effects = d.flags & DF_NODE_SIDE_EFFECTS != 0;
        Ok(NodeType {
            name,
            // SAFETY: per the contract.
            category: unsafe { opt_str(d.category) }?.unwrap_or_default(),
            // SAFETY: per the contract.
            version: unsafe { opt_str(d.version) }?.unwrap_or_else(|| self.info.version.clone()),
            // SAFETY: per the contract.
            doc: unsafe { opt_str(d.doc) }?.unwrap_or_default(),
            inputs,
            outputs,
            deterministic,
            cacheable: deterministic && !side_effects && d.flags & DF_NODE_CACHEABLE != 0,
            side_effects,
            plugin: self.info.clone(),
            imp: Arc::new(PluginNode {
                execute,
                fingerprint: d.fingerprint,
                drop_user_data: d.drop_user_data,
                user_data: d.user_data,
                library: self.library.clone(),
            }),
        })
    }
}

/// A node type implemented by a plugin library.
struct PluginNode {
    execute: DfExecuteFn,
    fingerprint: Option<DfFingerprintFn>,
    drop_user_data: Option<DfDropFn>,
    user_data: *mut c_void,
    /// Declared last: the library is released after `user_data` is dropped.
    library: Arc<LoadedLibrary>,
}

// The plugin's callbacks are required to be thread-safe (the SDK enforces `Send + Sync`).
unsafe impl Send for PluginNode {}
unsafe impl Sync for PluginNode {}

impl Drop for PluginNode {
    fn drop(&mut self) {
        if let Some(drop_fn) = self.drop_user_data {
            let ud = self.user_data;
            // SAFETY: the plugin's cleanup for its own pointer, called once.
            let _ = std::panic::catch_unwind(|| unsafe { drop_fn(ud) });
        }
    }
}

impl PluginNode {
    fn keep_alive(&self) -> Arc<dyn Send + Sync> {
        self.library.clone()
    }
}

impl NodeImpl for PluginNode {
    fn execute(&self, ctx: &mut ExecContext) -> Result<(), String> {
        ctx.keep_alive = Some(self.keep_alive());
        let raw = ctx as *mut ExecContext as *mut DfContext;
        // SAFETY: `raw` lives for the call; the plugin contract covers the rest.
        let rc = unsafe { (self.execute)(self.user_data, host_api(), raw) };
        match (rc, ctx.error.take()) {
            (DF_OK, None) => Ok(()),
            (_, Some(e)) => Err(e),
            (rc, None) => Err(format!("the node returned status {rc} without a message")),
        }
    }

    fn fingerprint(&self, ctx: &mut ExecContext) -> Result<Option<u64>, String> {
        let Some(f) = self.fingerprint else {
            return Ok(None);
        };
        ctx.keep_alive = Some(self.keep_alive());
        let raw = ctx as *mut ExecContext as *mut DfContext;
        let mut out = 0u64;
        // SAFETY: as in `execute`.
        let rc = unsafe { f(self.user_data, host_api(), raw, &mut out) };
        match (rc, ctx.error.take()) {
            (_, Some(e)) => Err(e),
            (DF_OK, None) => Ok(Some(out)),
            (DF_NO_FINGERPRINT, None) => Ok(None),
            (rc, None) => Err(format!(
                "fingerprint returned status {rc} without a message"
            )),
        }
    }
}

/// An error and its sources, joined with `: ` (libloading puts the system's reason in the source).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Opens a library (its initialisers run: that is what loading a plugin means).
fn open_library(path: &Path) -> Result<libloading::Library, libloading::Error> {
    // SAFETY: see above.
    unsafe { libloading::Library::new(path) }
}

/// Keeps an open library mapped for the life of the process (`RTLD_NODELETE`), for plugins that
/// do not declare `DF_PLUGIN_UNLOADABLE`.
///
/// A plugin written in Rust links its own copy of the standard library, which registers
/// per-thread destructors with `pthread_key_create` from inside the plugin's code and never
/// removes them. Unmapping such a library makes every host thread that ran plugin code crash
/// when it exits, in a destructor that is no longer there. So such a plugin, when replaced by a
/// reload, releases its handle, node types and values, and its code pages stay mapped.
fn pin_library(path: &Path) {
    #[cfg(unix)]
    {
        use libloading::os::unix::{Library, RTLD_NOW};
        #[cfg(any(target_os = "macos", target_os = "ios"))]
        const RTLD_NODELETE: std::os::raw::c_int = 0x80;
        #[cfg(not(any(target_os = "macos", target_os = "ios")))]
        const RTLD_NODELETE: std::os::raw::c_int = 0x1000;
        #[cfg(any(target_os = "macos", target_os = "ios"))]
        const RTLD_NOLOAD: std::os::raw::c_int = 0x10;
        #[cfg(not(any(target_os = "macos", target_os = "ios")))]
        const RTLD_NOLOAD: std::os::raw::c_int = 0x4;
        // Re-opening the loaded library with RTLD_NODELETE marks it; the extra handle is closed
        // at once, and the mark stays.
        // SAFETY: the library is already loaded: nothing runs.
        match unsafe { Library::open(Some(path), RTLD_NOW | RTLD_NOLOAD | RTLD_NODELETE) } {
            Ok(extra) => drop(extra),
            Err(e) => tracing::warn!("cannot pin {}: {e}", path.display()),
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// Loads one plugin library and collects its node types.
pub fn load_plugin(path: &Path) -> Result<LoadedPlugin, PluginError> {
    load_plugin_as(path, path)
}

/// A stamp of a library file's identity (size and modification time): a rebuilt library gets a
/// new one, which goes into its node types' cache keys.
pub fn build_stamp(path: &Path) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    if let Ok(meta) = std::fs::metadata(path) {
        meta.len().hash(&mut h);
        if let Ok(t) = meta.modified() {
            t.hash(&mut h);
        }
    }
    h.finish()
}

/// Loads the library file `path` as the plugin `origin` (the file a reload copied it from):
/// messages and the plugin's identity name `origin`.
pub fn load_plugin_as(path: &Path, origin: &Path) -> Result<LoadedPlugin, PluginError> {
    let shown = origin.display().to_string();
    let lib = open_library(path).map_err(|e| PluginError::Load {
        path: shown.clone(),
        reason: error_chain(&e),
    })?;
    // SAFETY: the symbol, if present, is a `DfPluginDescriptor` by the ABI contract; we check
    // its magic and size before trusting anything else in it.
    let desc_ptr: *const DfPluginDescriptor = unsafe {
        match lib.get::<*const DfPluginDescriptor>(DF_PLUGIN_SYMBOL.as_bytes()) {
            Ok(sym) => *sym,
            Err(_) => return Err(PluginError::NotAPlugin { path: shown }),
        }
    };
    let malformed = |reason: &str| PluginError::Malformed {
        path: shown.clone(),
        reason: reason.into(),
    };
    // SAFETY: the symbol's address is non-null and points into the loaded library.
    let Some(desc) = (unsafe { desc_ptr.as_ref() }) else {
        return Err(malformed("descriptor symbol is NULL"));
    };
    if desc.magic != DF_PLUGIN_MAGIC {
        return Err(malformed(&format!("bad magic 0x{:08x}", desc.magic)));
    }
    // SAFETY: magic checked; names are NUL-terminated per the ABI.
    let name = unsafe { opt_str(desc.name) }
        .map_err(|e| malformed(&e))?
        .ok_or_else(|| malformed("no name"))?;
    if desc.abi_major != DF_ABI_MAJOR || desc.abi_minor > DF_ABI_MINOR {
        return Err(PluginError::IncompatibleAbi {
            path: shown,
            name,
            major: desc.abi_major,
            minor: desc.abi_minor,
        });
    }
    if (desc.size as usize) < std::mem::size_of::<DfPluginDescriptor>() {
        return Err(malformed(&format!(
            "descriptor size {} is too small",
            desc.size
        )));
    }
    // SAFETY: as above.
    let version = unsafe { opt_str(desc.version) }
        .map_err(|e| malformed(&e))?
        .unwrap_or_else(|| "0.0.0".into());
    let unloadable = desc.abi_minor >= 2 && desc.flags & DF_PLUGIN_UNLOADABLE as usize != 0;
    if !unloadable {
        pin_library(path);
    }
    let register = desc
        .register_plugin
        .ok_or_else(|| malformed("no register function"))?;
    let info = Arc::new(PluginInfo {
        name: name.clone(),
        version,
        path: Some(origin.to_path_buf()),
        build: build_stamp(origin),
    });
    let library = Arc::new(LoadedLibrary {
        _lib: lib,
        path: path.to_path_buf(),
    });
    let mut registrar = Registrar {
        info: info.clone(),
        library,
        types: Vec::new(),
        errors: Vec::new(),
    };
    let reg_ptr = &mut registrar as *mut Registrar as *mut DfRegistrar;
    // SAFETY: the registrar outlives the call; the host API is static.
    let rc = unsafe { register(host_api(), reg_ptr) };
    if rc != DF_OK && registrar.types.is_empty() {
        let reason = if registrar.errors.is_empty() {
            format!("register returned status {rc}")
        } else {
            registrar.errors.join("; ")
        };
        return Err(PluginError::Register {
            path: shown,
            name,
            reason,
        });
    }
    Ok(LoadedPlugin {
        info,
        library: registrar.library,
        node_types: registrar.types,
        warnings: registrar.errors,
    })
}

/// File names that look like shared libraries on this platform.
pub fn is_library_file(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    matches!(ext, "so" | "dylib" | "dll")
}

/// The plugin folders to search: `--plugins` folders first, then `DITFLOW_PLUGIN_PATH`, then the
/// executable's own folder.
pub fn search_path(explicit: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = explicit.to_vec();
    if let Some(env) = std::env::var_os("DITFLOW_PLUGIN_PATH") {
        dirs.extend(std::env::split_paths(&env).filter(|p| !p.as_os_str().is_empty()));
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        dirs.push(dir);
    }
    let mut seen = std::collections::HashSet::new();
    dirs.retain(|d| seen.insert(d.canonicalize().unwrap_or_else(|_| d.clone())));
    dirs
}

/// The library files in `dir`, sorted by name so loading order is stable.
pub fn libraries_in(dir: &Path) -> Vec<PathBuf> {
    let mut libs: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && is_library_file(p))
            .collect(),
        Err(_) => Vec::new(),
    };
    libs.sort();
    libs
}
