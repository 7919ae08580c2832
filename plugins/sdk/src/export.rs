//! The export glue: turns [`Node`] implementations into `DfNodeDesc`s at registration, and the
//! `extern "C"` trampolines that call them with every panic caught.

use crate::abi::{self, DfContext, DfHostApi, DfNodeDesc, DfPortDesc, DfRegistrar};
use crate::schema::{NodeSchema, Port};
use crate::value::set_host;
use crate::{Context, Node, Result};
use std::any::Any;
use std::ffi::{c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Object-safe form of [`Node`].
trait ErasedNode: Send + Sync {
    fn execute(&self, ctx: &mut Context) -> Result<()>;
    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>>;
}

impl<T: Node> ErasedNode for T {
    fn execute(&self, ctx: &mut Context) -> Result<()> {
        Node::execute(self, ctx)
    }
    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        Node::fingerprint(self, ctx)
    }
}

/// One node type to register; made by [`export_plugin!`](crate::export_plugin).
pub struct NodeRegistration {
    schema: fn() -> NodeSchema,
    make: fn() -> Box<dyn ErasedNode>,
}

impl NodeRegistration {
    /// The registration of node type `T`.
    pub fn of<T: Node>() -> NodeRegistration {
        NodeRegistration {
            schema: T::schema,
            make: || Box::new(T::default()),
        }
    }
}

/// Exports a plugin: its name, version and node types.
///
/// ```ignore
/// export_plugin!(name: "my-plugin", version: env!("CARGO_PKG_VERSION"), nodes: [Add, Scale]);
/// ```
#[macro_export]
macro_rules! export_plugin {
    (name: $name:expr, version: $version:expr, nodes: [$($node:ty),* $(,)?] $(,)?) => {
        #[doc(hidden)]
        unsafe extern "C" fn __ditflow_plugin_register(
            host: *const $crate::abi::DfHostApi,
            reg: *mut $crate::abi::DfRegistrar,
        ) -> i32 {
            let nodes = [$($crate::NodeRegistration::of::<$node>()),*];
            // SAFETY: the host calls `register` with its live function table and registrar.
            unsafe { $crate::register_nodes(host, reg, &nodes) }
        }

        /// The plugin descriptor the ditflow host looks up.
        #[no_mangle]
        pub static ditflow_plugin_descriptor: $crate::abi::DfPluginDescriptor =
            $crate::abi::DfPluginDescriptor {
                magic: $crate::abi::DF_PLUGIN_MAGIC,
                abi_major: $crate::abi::DF_ABI_MAJOR,
                abi_minor: $crate::abi::DF_ABI_MINOR,
                size: ::std::mem::size_of::<$crate::abi::DfPluginDescriptor>() as u32,
                name: concat!($name, "\0").as_ptr() as *const ::std::ffi::c_char,
                version: concat!($version, "\0").as_ptr() as *const ::std::ffi::c_char,
                register_plugin: Some(__ditflow_plugin_register),
                // A Rust plugin's std cannot be unloaded safely: no DF_PLUGIN_UNLOADABLE.
                flags: 0,
                reserved: [::std::ptr::null(); 7],
            };
    };
}

/// The text of a panic payload (shared with the host, which catches panics the same way).
pub fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

fn cstring(s: &str) -> CString {
    CString::new(s.replace('\0', " ")).unwrap_or_default()
}

/// Owns the C strings behind one port's `DfPortDesc` for the duration of registration.
struct PortStrings {
    name: CString,
    type_expr: CString,
    doc: CString,
    default_json: Option<CString>,
    choices: Option<CString>,
}

impl PortStrings {
    fn new(port: &Port) -> PortStrings {
        PortStrings {
            name: cstring(&port.name),
            type_expr: cstring(&port.type_expr),
            doc: cstring(&port.doc),
            default_json: port.default_json.as_deref().map(cstring),
            choices: (!port.choices.is_empty()).then(|| cstring(&port.choices.join("|"))),
        }
    }

    fn desc(&self, port: &Port) -> DfPortDesc {
        DfPortDesc {
            name: self.name.as_ptr(),
            type_expr: self.type_expr.as_ptr(),
            doc: self.doc.as_ptr(),
            default_json: self
                .default_json
                .as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr()),
            min: port.min,
            max: port.max,
            choices: self
                .choices
                .as_ref()
                .map_or(std::ptr::null(), |s| s.as_ptr()),
            flags: if port.optional {
                abi::DF_PORT_OPTIONAL
            } else {
                0
            },
            _pad: 0,
            reserved: [std::ptr::null(); 2],
        }
    }
}

/// Registers `nodes` with the host. Called by the code [`export_plugin!`](crate::export_plugin)
/// generates.
///
/// # Safety
/// `host` and `reg` must be the pointers the host passed to the plugin's `register` function.
#[doc(hidden)]
pub unsafe fn register_nodes(
    host: *const DfHostApi,
    reg: *mut DfRegistrar,
    nodes: &[NodeRegistration],
) -> i32 {
    if host.is_null() {
        return abi::DF_ERROR;
    }
    set_host(host);
    let result = catch_unwind(AssertUnwindSafe(|| {
        let mut status = abi::DF_OK;
        for node in nodes {
            // SAFETY: forwarded from the caller.
            if unsafe { register_one(host, reg, node) } != abi::DF_OK {
                status = abi::DF_ERROR;
            }
        }
        status
    }));
    result.unwrap_or(abi::DF_ERROR)
}

unsafe fn register_one(
    host: *const DfHostApi,
    reg: *mut DfRegistrar,
    node: &NodeRegistration,
) -> i32 {
    let schema = (node.schema)();
    let type_name = cstring(&schema.type_name);
    let category = cstring(&schema.category);
    let version = schema.version.as_deref().map(cstring);
    let doc = cstring(&schema.doc);
    let in_strings: Vec<PortStrings> = schema.inputs.iter().map(PortStrings::new).collect();
    let out_strings: Vec<PortStrings> = schema.outputs.iter().map(PortStrings::new).collect();
    let inputs: Vec<DfPortDesc> = in_strings
        .iter()
        .zip(&schema.inputs)
        .map(|(s, p)| s.desc(p))
        .collect();
    let outputs: Vec<DfPortDesc> = out_strings
        .iter()
        .zip(&schema.outputs)
        .map(|(s, p)| s.desc(p))
        .collect();
    let user_data = Box::into_raw(Box::new((node.make)())) as *mut c_void;
    let desc = DfNodeDesc {
        size: std::mem::size_of::<DfNodeDesc>() as u32,
        flags: schema.flags,
        type_name: type_name.as_ptr(),
        category: category.as_ptr(),
        version: version.as_ref().map_or(std::ptr::null(), |v| v.as_ptr()),
        doc: doc.as_ptr(),
        inputs: inputs.as_ptr(),
        n_inputs: inputs.len(),
        outputs: outputs.as_ptr(),
        n_outputs: outputs.len(),
        user_data,
        execute: Some(execute_trampoline),
        fingerprint: Some(fingerprint_trampoline),
        drop_user_data: Some(drop_trampoline),
        reserved: [std::ptr::null(); 4],
    };
    // SAFETY: `desc` and every string it points to outlive this call; the host copies them.
    // On refusal the host still calls `drop_user_data`.
    unsafe { ((*host).register_node)(reg, &desc) }
}

fn report_error(host: *const DfHostApi, ctx: *mut DfContext, msg: &str) {
    let msg = cstring(msg);
    // SAFETY: `host` and `ctx` are the live pointers of the current callback.
    unsafe { ((*host).set_error)(ctx, msg.as_ptr()) }
}

/// Runs `f` on the node behind `user_data` with every panic caught.
unsafe fn call_node<R>(
    user_data: *mut c_void,
    host: *const DfHostApi,
    ctx: *mut DfContext,
    f: impl FnOnce(&dyn ErasedNode, &mut Context) -> Result<R>,
) -> Option<R> {
    if user_data.is_null() || host.is_null() || ctx.is_null() {
        return None;
    }
    set_host(host);
    // SAFETY: `user_data` is the `Box<Box<dyn ErasedNode>>` made in `register_one`.
    let node: &dyn ErasedNode = unsafe { &**(user_data as *const Box<dyn ErasedNode>) };
    let mut context = Context::new(ctx);
    match catch_unwind(AssertUnwindSafe(|| f(node, &mut context))) {
        Ok(Ok(r)) => Some(r),
        Ok(Err(e)) => {
            report_error(host, ctx, &e.0);
            None
        }
        Err(payload) => {
            report_error(
                host,
                ctx,
                &format!("panicked: {}", panic_message(payload.as_ref())),
            );
            None
        }
    }
}

unsafe extern "C" fn execute_trampoline(
    user_data: *mut c_void,
    host: *const DfHostApi,
    ctx: *mut DfContext,
) -> i32 {
    // SAFETY: forwarded host pointers.
    match unsafe { call_node(user_data, host, ctx, |n, c| n.execute(c)) } {
        Some(()) => abi::DF_OK,
        None => abi::DF_ERROR,
    }
}

unsafe extern "C" fn fingerprint_trampoline(
    user_data: *mut c_void,
    host: *const DfHostApi,
    ctx: *mut DfContext,
    out: *mut u64,
) -> i32 {
    // SAFETY: forwarded host pointers.
    match unsafe { call_node(user_data, host, ctx, |n, c| n.fingerprint(c)) } {
        Some(Some(fp)) if !out.is_null() => {
            // SAFETY: the host passes a valid out pointer.
            unsafe { *out = fp };
            abi::DF_OK
        }
        // No fingerprint: the host keys on the inputs alone.
        Some(_) => abi::DF_NO_FINGERPRINT,
        None => abi::DF_ERROR,
    }
}

unsafe extern "C" fn drop_trampoline(user_data: *mut c_void) {
    if user_data.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: made by `Box::into_raw` in `register_one`; the host drops it once.
        drop(unsafe { Box::from_raw(user_data as *mut Box<dyn ErasedNode>) });
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_messages_are_extracted() {
        let p = catch_unwind(|| panic!("boom {}", 1)).unwrap_err();
        assert_eq!(panic_message(p.as_ref()), "boom 1");
        let p = catch_unwind(|| panic!("static")).unwrap_err();
        assert_eq!(panic_message(p.as_ref()), "static");
    }
}
