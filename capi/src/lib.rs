//! The C embedding API (`include/ditflow.h`), built as `libditflow_c`: opaque handles over the
//! Rust API's nouns, status codes, a per-thread last-error message and event callbacks. Every
//! entry point catches panics, checks its pointers, and never lets an error cross as anything
//! but a status code.

use ditflow::{
    watch_graph, ArgValue, Event, Graph, GraphError, RunOptions, RunReport, Runtime, Session,
    Value, WatchOptions,
};
use std::cell::RefCell;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Status codes, as in the header.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok = 0,
    InvalidArgument = 1,
    Io = 2,
    InvalidGraph = 3,
    RunFailed = 4,
    Cancelled = 5,
    Plugin = 6,
    NotFound = 7,
    Type = 8,
    Panic = 9,
}

/// A failure: its status and message.
struct Failure(Status, String);

type Result<T> = std::result::Result<T, Failure>;

fn fail<T>(status: Status, msg: impl Into<String>) -> Result<T> {
    Err(Failure(status, msg.into()))
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(msg: &str) {
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

/// Runs `f`, turning errors and panics into a status and the last-error message.
fn guard(f: impl FnOnce() -> Result<()>) -> Status {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => {
            set_last_error("");
            Status::Ok
        }
        Ok(Err(Failure(status, msg))) => {
            set_last_error(&msg);
            status
        }
        Err(p) => {
            set_last_error(&format!("internal error: {}", panic_message(&*p)));
            Status::Panic
        }
    }
}

/// Like [`guard`] for functions returning a handle: NULL on failure.
fn guard_ptr<T>(f: impl FnOnce() -> Result<T>) -> *mut T {
    let mut out = ptr::null_mut();
    guard(|| {
        out = Box::into_raw(Box::new(f()?));
        Ok(())
    });
    out
}

/// # Safety
/// `s` is NULL or NUL-terminated.
unsafe fn text<'a>(s: *const c_char, what: &str) -> Result<&'a str> {
    if s.is_null() {
        return fail(Status::InvalidArgument, format!("{what} is NULL"));
    }
    // SAFETY: non-null and NUL-terminated by the caller's contract.
    unsafe { CStr::from_ptr(s) }
        .to_str()
        .or_else(|_| fail(Status::InvalidArgument, format!("{what} is not UTF-8")))
}

/// # Safety
/// `p` is NULL or a valid pointer to `T`.
unsafe fn handle<'a, T>(p: *const T, what: &str) -> Result<&'a T> {
    // SAFETY: the caller passes a handle from this library or NULL.
    unsafe { p.as_ref() }.map_or_else(
        || fail(Status::InvalidArgument, format!("{what} is NULL")),
        Ok,
    )
}

/// # Safety
/// `p` is NULL or a valid, unaliased pointer to `T`.
unsafe fn handle_mut<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T> {
    // SAFETY: as above.
    unsafe { p.as_mut() }.map_or_else(
        || fail(Status::InvalidArgument, format!("{what} is NULL")),
        Ok,
    )
}

/// Frees a boxed handle.
///
/// # Safety
/// `p` is NULL or came from `Box::into_raw` and is not used again.
unsafe fn free<T>(p: *mut T) {
    if !p.is_null() {
        let _ = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: by the caller's contract.
            drop(unsafe { Box::from_raw(p) })
        }));
    }
}

fn graph_error(e: GraphError) -> Failure {
    match e {
        GraphError::Io { .. } => Failure(Status::Io, e.to_string()),
        GraphError::Invalid(d) => Failure(Status::InvalidGraph, d.to_string()),
    }
}

pub struct DitflowRuntime {
    runtime: Arc<Runtime>,
    problems: CString,
}

pub struct DitflowGraph(Graph);

pub struct DitflowSession(Session);

#[derive(Default)]
pub struct DitflowArgs(Vec<(String, ArgValue)>);

pub struct DitflowCancel(Arc<AtomicBool>);

pub struct DitflowReport {
    report: RunReport,
    names: Vec<CString>,
    /// The outputs as handles, in the report's order.
    values: Vec<DitflowValue>,
    errors: CString,
}

pub struct DitflowValue {
    value: Arc<Value>,
    /// A String's text, NUL-terminated.
    text: Option<CString>,
}

/// The header's `ditflow_run_options_t`.
#[repr(C)]
pub struct RunOptionsC {
    pub size: u32,
    pub workers: u32,
    pub out_dir: *const c_char,
    pub on_event: Option<unsafe extern "C" fn(*const c_char, *mut c_void)>,
    pub user_data: *mut c_void,
    pub cancel: *const DitflowCancel,
}

/// The user's data pointer, handed back to their callback from worker threads as the header
/// documents.
#[derive(Clone, Copy)]
struct UserData(*mut c_void);
// SAFETY: the header tells callers the callback runs on worker threads with this pointer.
unsafe impl Send for UserData {}
unsafe impl Sync for UserData {}

/// # Safety
/// `opts` is NULL or points to a `ditflow_run_options_t` whose `size` bytes are readable.
unsafe fn run_options(opts: *const RunOptionsC) -> Result<RunOptions> {
    let mut run = RunOptions::default();
    // SAFETY: by the caller's contract.
    let Some(o) = (unsafe { opts.as_ref() }) else {
        return Ok(run);
    };
    if (o.size as usize) < std::mem::size_of::<RunOptionsC>() {
        return fail(
            Status::InvalidArgument,
            format!(
                "options.size is {}; set it to sizeof(ditflow_run_options_t)",
                o.size
            ),
        );
    }
    if o.workers > 0 {
        run.workers = o.workers as usize;
    }
    if !o.out_dir.is_null() {
        // SAFETY: non-null, NUL-terminated by contract.
        run.out_dir = PathBuf::from(unsafe { text(o.out_dir, "options.out_dir") }?);
    }
    // SAFETY: NULL or a cancel handle.
    if let Some(c) = unsafe { o.cancel.as_ref() } {
        run.cancel = c.0.clone();
    }
    if let Some(cb) = o.on_event {
        let user = UserData(o.user_data);
        run.subscribers.push(Arc::new(move |e: &Event| {
            let user = user;
            if let Ok(line) = CString::new(e.to_json_line()) {
                // SAFETY: the caller's callback, with their pointer, as documented.
                unsafe { cb(line.as_ptr(), user.0) };
            }
        }));
    }
    Ok(run)
}

fn args_of(args: *const DitflowArgs) -> Vec<(String, ArgValue)> {
    // SAFETY: NULL or an args handle.
    unsafe { args.as_ref() }
        .map(|a| a.0.clone())
        .unwrap_or_default()
}

#[no_mangle]
pub extern "C" fn ditflow_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

#[no_mangle]
pub extern "C" fn ditflow_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

#[no_mangle]
pub extern "C" fn ditflow_set_max_memory(bytes: usize) {
    ditflow::weights::residency::set_cap(Some(bytes).filter(|&b| b > 0));
}

#[no_mangle]
pub extern "C" fn ditflow_set_max_vram(bytes: usize) {
    ditflow::weights::vram::set_cap(Some(bytes).filter(|&b| b > 0));
}

#[no_mangle]
pub extern "C" fn ditflow_set_tensor_cores(on: c_int) {
    ditflow::kernels::set_tensor_cores(on != 0);
}

/// # Safety
/// `dtype` is NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn ditflow_set_gpu_activations(dtype: *const c_char) -> Status {
    guard(|| {
        // SAFETY: per the contract.
        let name = unsafe { text(dtype, "dtype") }?;
        ditflow::kernels::parse_gpu_activations(name)
            .and_then(ditflow::kernels::set_gpu_activations)
            .or_else(|e| fail(Status::InvalidArgument, e))
    })
}

#[no_mangle]
pub extern "C" fn ditflow_weights_streamed_bytes() -> u64 {
    ditflow::weights::residency::streamed_bytes()
}

// ---- Runtime -----------------------------------------------------------------------------------

#[no_mangle]
pub extern "C" fn ditflow_runtime_new() -> *mut DitflowRuntime {
    guard_ptr(|| {
        Ok(DitflowRuntime {
            runtime: Arc::new(Runtime::new()),
            problems: CString::default(),
        })
    })
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_runtime_load_plugin_dir(
    rt: *mut DitflowRuntime,
    dir: *const c_char,
) -> Status {
    guard(|| {
        // SAFETY: by the header's contract.
        let (rt, dir) = unsafe { (handle(rt, "runtime")?, text(dir, "dir")?) };
        if !Path::new(dir).is_dir() {
            return fail(Status::Io, format!("{dir}: not a folder"));
        }
        rt.runtime.load_plugin_dir(Path::new(dir));
        Ok(())
    })
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_runtime_load_plugin(
    rt: *mut DitflowRuntime,
    path: *const c_char,
) -> Status {
    guard(|| {
        // SAFETY: by the header's contract.
        let (rt, path) = unsafe { (handle(rt, "runtime")?, text(path, "path")?) };
        rt.runtime
            .load_plugin_file(Path::new(path))
            .map(|_| ())
            .map_err(|e| Failure(Status::Plugin, e.to_string()))
    })
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_runtime_node_type_count(rt: *const DitflowRuntime) -> usize {
    // SAFETY: by the header's contract.
    unsafe { rt.as_ref() }.map_or(0, |rt| rt.runtime.registry().len())
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_runtime_problems(rt: *mut DitflowRuntime) -> *const c_char {
    // SAFETY: by the header's contract.
    let Some(rt) = (unsafe { rt.as_mut() }) else {
        return c"".as_ptr();
    };
    rt.problems =
        CString::new(rt.runtime.problems().join("\n").replace('\0', " ")).unwrap_or_default();
    rt.problems.as_ptr()
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_runtime_free(rt: *mut DitflowRuntime) {
    // SAFETY: by the header's contract.
    unsafe { free(rt) }
}

// ---- Graphs ------------------------------------------------------------------------------------

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_graph_from_file(path: *const c_char) -> *mut DitflowGraph {
    guard_ptr(|| {
        // SAFETY: by the header's contract.
        let path = unsafe { text(path, "path") }?;
        Graph::from_file(Path::new(path))
            .map(DitflowGraph)
            .map_err(graph_error)
    })
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_graph_from_yaml(
    yaml: *const c_char,
    name: *const c_char,
    base_dir: *const c_char,
) -> *mut DitflowGraph {
    guard_ptr(|| {
        // SAFETY: by the header's contract.
        let (yaml, name, base) = unsafe {
            (
                text(yaml, "text")?,
                text(name, "name")?,
                text(base_dir, "base_dir")?,
            )
        };
        Graph::from_yaml(yaml, name, Path::new(base))
            .map(DitflowGraph)
            .map_err(graph_error)
    })
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_graph_from_lua(
    lua: *const c_char,
    name: *const c_char,
    base_dir: *const c_char,
) -> *mut DitflowGraph {
    guard_ptr(|| {
        // SAFETY: by the header's contract.
        let (lua, name, base) = unsafe {
            (
                text(lua, "text")?,
                text(name, "name")?,
                text(base_dir, "base_dir")?,
            )
        };
        Graph::from_lua(lua, name, Path::new(base), &Default::default())
            .map(DitflowGraph)
            .map_err(graph_error)
    })
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_graph_free(graph: *mut DitflowGraph) {
    // SAFETY: by the header's contract.
    unsafe { free(graph) }
}

// ---- Graph inputs ------------------------------------------------------------------------------

#[no_mangle]
pub extern "C" fn ditflow_args_new() -> *mut DitflowArgs {
    guard_ptr(|| Ok(DitflowArgs::default()))
}

/// # Safety
/// `args` and `name` as in the header.
unsafe fn set_arg(args: *mut DitflowArgs, name: *const c_char, value: ArgValue) -> Status {
    // SAFETY: forwarded.
    unsafe { set_arg_with(args, name, || Ok(value)) }
}

/// [`set_arg`] with a value that may fail to convert (a C string that is NULL or not UTF-8).
///
/// # Safety
/// `args` and `name` as in the header.
unsafe fn set_arg_with(
    args: *mut DitflowArgs,
    name: *const c_char,
    value: impl FnOnce() -> Result<ArgValue>,
) -> Status {
    guard(|| {
        // SAFETY: by the header's contract.
        let (args, name) = unsafe { (handle_mut(args, "args")?, text(name, "name")?) };
        let value = value()?;
        args.0.retain(|(n, _)| n != name);
        args.0.push((name.to_string(), value));
        Ok(())
    })
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_args_set_int(
    args: *mut DitflowArgs,
    name: *const c_char,
    v: i64,
) -> Status {
    // SAFETY: forwarded.
    unsafe { set_arg(args, name, ArgValue::Value(Value::Int(v))) }
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_args_set_float(
    args: *mut DitflowArgs,
    name: *const c_char,
    v: f64,
) -> Status {
    // SAFETY: forwarded.
    unsafe { set_arg(args, name, ArgValue::Value(Value::Float(v))) }
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_args_set_bool(
    args: *mut DitflowArgs,
    name: *const c_char,
    v: c_int,
) -> Status {
    // SAFETY: forwarded.
    unsafe { set_arg(args, name, ArgValue::Value(Value::Bool(v != 0))) }
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_args_set_string(
    args: *mut DitflowArgs,
    name: *const c_char,
    v: *const c_char,
) -> Status {
    // SAFETY: by the header's contract.
    unsafe {
        set_arg_with(args, name, || {
            text(v, "value").map(|v| ArgValue::Value(Value::string(v)))
        })
    }
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_args_set_text(
    args: *mut DitflowArgs,
    name: *const c_char,
    v: *const c_char,
) -> Status {
    // SAFETY: by the header's contract.
    unsafe {
        set_arg_with(args, name, || {
            text(v, "text").map(|v| ArgValue::Text(v.to_string()))
        })
    }
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_args_free(args: *mut DitflowArgs) {
    // SAFETY: by the header's contract.
    unsafe { free(args) }
}

// ---- Cancellation ------------------------------------------------------------------------------

#[no_mangle]
pub extern "C" fn ditflow_cancel_new() -> *mut DitflowCancel {
    guard_ptr(|| Ok(DitflowCancel(Arc::new(AtomicBool::new(false)))))
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_cancel_trigger(cancel: *mut DitflowCancel) {
    // SAFETY: by the header's contract.
    if let Some(c) = unsafe { cancel.as_ref() } {
        c.0.store(true, Ordering::SeqCst);
    }
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_cancel_free(cancel: *mut DitflowCancel) {
    // SAFETY: by the header's contract.
    unsafe { free(cancel) }
}

// ---- Sessions ----------------------------------------------------------------------------------

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_session_new(rt: *const DitflowRuntime) -> *mut DitflowSession {
    guard_ptr(|| {
        // SAFETY: by the header's contract.
        let rt = unsafe { handle(rt, "runtime") }?;
        Ok(DitflowSession(Session::new(rt.runtime.clone())))
    })
}

fn report_handle(report: RunReport) -> DitflowReport {
    let names = report
        .outputs
        .iter()
        .map(|(n, _)| CString::new(n.as_str()).unwrap_or_default())
        .collect();
    let values = report
        .outputs
        .iter()
        .map(|(_, v)| DitflowValue {
            text: match &**v {
                Value::String(s) => CString::new(s.as_str()).ok(),
                _ => None,
            },
            value: v.clone(),
        })
        .collect();
    let mut errors: Vec<String> = report
        .failed
        .iter()
        .map(|f| format!("node '{}' ({}): {}", f.node, f.node_type, f.error))
        .collect();
    if !report.skipped.is_empty() {
        let names: Vec<&str> = report.skipped.iter().map(|s| &**s).collect();
        errors.push(format!("not run: {}", names.join(", ")));
    }
    DitflowReport {
        report,
        names,
        values,
        errors: CString::new(errors.join("\n").replace('\0', " ")).unwrap_or_default(),
    }
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_session_run(
    session: *mut DitflowSession,
    graph: *const DitflowGraph,
    args: *const DitflowArgs,
    options: *const RunOptionsC,
    report: *mut *mut DitflowReport,
) -> Status {
    if !report.is_null() {
        // SAFETY: non-null out pointer from the caller.
        unsafe { *report = ptr::null_mut() };
    }
    let mut produced: *mut DitflowReport = ptr::null_mut();
    let mut outcome = Status::Ok;
    let status = guard(|| {
        // SAFETY: by the header's contract.
        let (session, graph) = unsafe { (handle(session, "session")?, handle(graph, "graph")?) };
        if report.is_null() {
            return fail(Status::InvalidArgument, "report is NULL");
        }
        // SAFETY: by the header's contract.
        let run = unsafe { run_options(options) }?;
        let result = session
            .0
            .run(&graph.0, &args_of(args), &run)
            .map_err(|d| Failure(Status::InvalidGraph, d.to_string()))?;
        let h = report_handle(result);
        let message = h.errors.to_string_lossy().into_owned();
        outcome = if h.report.cancelled {
            Status::Cancelled
        } else if h.report.ok() {
            Status::Ok
        } else {
            Status::RunFailed
        };
        produced = Box::into_raw(Box::new(h));
        if outcome != Status::Ok {
            return fail(
                outcome,
                if outcome == Status::Cancelled {
                    "the run was cancelled".into()
                } else {
                    message
                },
            );
        }
        Ok(())
    });
    if !produced.is_null() {
        // SAFETY: checked non-null above.
        unsafe { *report = produced };
    }
    status
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_session_watch(
    session: *mut DitflowSession,
    path: *const c_char,
    args: *const DitflowArgs,
    options: *const RunOptionsC,
) -> Status {
    guard(|| {
        // SAFETY: by the header's contract.
        let (session, path) = unsafe { (handle(session, "session")?, text(path, "path")?) };
        // SAFETY: by the header's contract.
        let run = unsafe { run_options(options) }?;
        let opts = WatchOptions {
            stop: run.cancel.clone(),
            ..WatchOptions::default()
        };
        watch_graph(&session.0, Path::new(path), &args_of(args), &run, &opts)
            .map_err(|e| Failure(Status::Io, e))
    })
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_session_free(session: *mut DitflowSession) {
    // SAFETY: by the header's contract.
    unsafe { free(session) }
}

// ---- Reports -----------------------------------------------------------------------------------

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_report_ok(report: *const DitflowReport) -> c_int {
    // SAFETY: by the header's contract.
    unsafe { report.as_ref() }.is_some_and(|r| r.report.ok()) as c_int
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_report_errors(report: *const DitflowReport) -> *const c_char {
    // SAFETY: by the header's contract.
    unsafe { report.as_ref() }.map_or(c"".as_ptr(), |r| r.errors.as_ptr())
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_report_executed_count(report: *const DitflowReport) -> usize {
    // SAFETY: by the header's contract.
    unsafe { report.as_ref() }.map_or(0, |r| r.report.executed.len())
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_report_cached_count(report: *const DitflowReport) -> usize {
    // SAFETY: by the header's contract.
    unsafe { report.as_ref() }.map_or(0, |r| r.report.cached.len())
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_report_output_count(report: *const DitflowReport) -> usize {
    // SAFETY: by the header's contract.
    unsafe { report.as_ref() }.map_or(0, |r| r.values.len())
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_report_output_name(
    report: *const DitflowReport,
    index: usize,
) -> *const c_char {
    // SAFETY: by the header's contract.
    unsafe { report.as_ref() }
        .and_then(|r| r.names.get(index))
        .map_or(ptr::null(), |n| n.as_ptr())
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_report_output(
    report: *const DitflowReport,
    name: *const c_char,
) -> *const DitflowValue {
    let mut found = ptr::null();
    guard(|| {
        // SAFETY: by the header's contract.
        let (r, name) = unsafe { (handle(report, "report")?, text(name, "name")?) };
        match r.report.outputs.iter().position(|(n, _)| n == name) {
            Some(i) => {
                found = &r.values[i] as *const DitflowValue;
                Ok(())
            }
            None => fail(
                Status::NotFound,
                format!("the graph has no output '{name}'"),
            ),
        }
    });
    found
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_report_free(report: *mut DitflowReport) {
    // SAFETY: by the header's contract.
    unsafe { free(report) }
}

// ---- Values ------------------------------------------------------------------------------------

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_value_get_type(value: *const DitflowValue) -> c_int {
    // SAFETY: by the header's contract.
    let Some(v) = (unsafe { value.as_ref() }) else {
        return -1;
    };
    match &*v.value {
        Value::Bool(_) => 0,
        Value::Int(_) => 1,
        Value::Float(_) => 2,
        Value::String(_) => 3,
        Value::Tensor(..) => 4,
        Value::Object(_) => 5,
        Value::List(_) => 6,
    }
}

/// Reads a value through `f`, writing the result to `out`.
///
/// # Safety
/// `value` and `out` as in the header.
unsafe fn get<T>(
    value: *const DitflowValue,
    out: *mut T,
    f: impl FnOnce(&DitflowValue) -> Result<T>,
) -> Status {
    guard(|| {
        // SAFETY: by the header's contract.
        let v = unsafe { handle(value, "value") }?;
        if out.is_null() {
            return fail(Status::InvalidArgument, "out is NULL");
        }
        let x = f(v)?;
        // SAFETY: non-null out pointer from the caller.
        unsafe { out.write(x) };
        Ok(())
    })
}

fn type_error<T>(v: &Value, want: &str) -> Result<T> {
    fail(
        Status::Type,
        format!("the value is a {}, not a {want}", v.type_name()),
    )
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_value_get_bool(
    value: *const DitflowValue,
    out: *mut c_int,
) -> Status {
    // SAFETY: forwarded.
    unsafe {
        get(value, out, |v| match &*v.value {
            Value::Bool(b) => Ok(*b as c_int),
            other => type_error(other, "Bool"),
        })
    }
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_value_get_int(
    value: *const DitflowValue,
    out: *mut i64,
) -> Status {
    // SAFETY: forwarded.
    unsafe {
        get(value, out, |v| match &*v.value {
            Value::Int(i) => Ok(*i),
            other => type_error(other, "Int"),
        })
    }
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_value_get_float(
    value: *const DitflowValue,
    out: *mut f64,
) -> Status {
    // SAFETY: forwarded.
    unsafe {
        get(value, out, |v| match &*v.value {
            Value::Float(f) => Ok(*f),
            Value::Int(i) => Ok(*i as f64),
            other => type_error(other, "Float"),
        })
    }
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_value_get_string(
    value: *const DitflowValue,
    out: *mut *const c_char,
    len: *mut usize,
) -> Status {
    // SAFETY: forwarded.
    unsafe {
        get(value, out, |v| match (&*v.value, &v.text) {
            (Value::String(s), Some(c)) => {
                if !len.is_null() {
                    len.write(s.as_str().len());
                }
                Ok(c.as_ptr())
            }
            (Value::String(_), None) => fail(Status::Type, "the string holds a NUL byte"),
            (other, _) => type_error(other, "String"),
        })
    }
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_value_tensor_shape(
    value: *const DitflowValue,
    dims: *mut i64,
    max: usize,
    ndim: *mut usize,
) -> Status {
    // SAFETY: forwarded.
    unsafe {
        get(value, ndim, |v| match &*v.value {
            Value::Tensor(_, t) => {
                let shape = t.shape();
                if !dims.is_null() {
                    for (i, d) in shape.iter().take(max).enumerate() {
                        dims.add(i).write(*d as i64);
                    }
                }
                Ok(shape.len())
            }
            other => type_error(other, "Tensor"),
        })
    }
}

/// # Safety
/// See the header.
#[no_mangle]
pub unsafe extern "C" fn ditflow_value_tensor_f32(
    value: *const DitflowValue,
    out: *mut f32,
    capacity: usize,
    count: *mut usize,
) -> Status {
    // SAFETY: forwarded.
    unsafe {
        get(value, count, |v| match &*v.value {
            Value::Tensor(_, t) => {
                let data = t
                    .to_f32_vec()
                    .map_err(|e| Failure(Status::InvalidArgument, e.to_string()))?;
                if data.len() > capacity || out.is_null() {
                    return fail(
                        Status::InvalidArgument,
                        format!(
                            "the tensor has {} elements; the buffer holds {capacity}",
                            data.len()
                        ),
                    );
                }
                ptr::copy_nonoverlapping(data.as_ptr(), out, data.len());
                Ok(data.len())
            }
            other => type_error(other, "Tensor"),
        })
    }
}
