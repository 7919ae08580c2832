//! [`ExecContext`]: everything one node execution sees — resolved inputs, the outputs it sets,
//! progress, cancellation and path resolution. Plugins reach it through `DfContext*`.

use crate::registry::NodeType;
use crate::value::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Receives `(step, total)` progress reports from a running node.
pub type ProgressFn<'a> = &'a (dyn Fn(u64, u64) + Sync);
/// Receives `(step, total, png)` previews from a running node.
pub type PreviewFn<'a> = &'a (dyn Fn(u64, u64, &[u8]) + Sync);

/// One execution of one node.
pub struct ExecContext<'a> {
    pub(crate) node_id: &'a str,
    pub(crate) node_type: &'a NodeType,
    pub(crate) inputs: &'a [Option<Arc<Value>>],
    pub(crate) outputs: Vec<Option<Arc<Value>>>,
    pub(crate) error: Option<String>,
    pub(crate) progress: ProgressFn<'a>,
    pub(crate) preview: PreviewFn<'a>,
    pub(crate) cancel: &'a AtomicBool,
    pub(crate) graph_dir: &'a Path,
    pub(crate) out_dir: &'a Path,
    /// Keeps the plugin library mapped while objects it made are alive.
    pub(crate) keep_alive: Option<Arc<dyn Send + Sync>>,
    /// The run's device (`--device`).
    pub(crate) device: crate::tensor::Device,
    /// Bytes of weights this execution loaded (`load_weights`) and no object has claimed yet:
    /// the next object it makes is charged them (see [`crate::value::Object::weight_bytes`]).
    pub(crate) weight_bytes: usize,
}

impl<'a> ExecContext<'a> {
    /// The node's id in the graph.
    pub fn node_id(&self) -> &str {
        self.node_id
    }

    /// The value bound to input `name`, if any.
    pub fn input(&self, name: &str) -> Option<&Arc<Value>> {
        let i = self.node_type.input_index(name)?;
        self.inputs.get(i)?.as_ref()
    }

    /// The input at position `i` of the schema.
    pub fn input_at(&self, i: usize) -> Option<&Arc<Value>> {
        self.inputs.get(i)?.as_ref()
    }

    /// Sets output `name`; an unknown name or a value of the wrong type is an error.
    pub fn set_output(&mut self, name: &str, value: impl Into<Arc<Value>>) -> Result<(), String> {
        let value = value.into();
        let i = self
            .node_type
            .output_index(name)
            .ok_or_else(|| format!("node type {} has no output '{name}'", self.node_type.name))?;
        let port = &self.node_type.outputs[i];
        if !port.ty.matches_value(&value) {
            return Err(format!(
                "output '{name}' is declared {} but the node set a {}",
                port.ty,
                value.type_name()
            ));
        }
        self.outputs[i] = Some(value);
        Ok(())
    }

    pub fn set_error(&mut self, msg: impl Into<String>) {
        self.error = Some(msg.into());
    }

    pub fn progress(&self, step: u64, total: u64) {
        (self.progress)(step, total)
    }

    /// Reports a preview (a PNG image) of the work at `step` of `total`.
    pub fn preview(&self, step: u64, total: u64, png: &[u8]) {
        (self.preview)(step, total, png)
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// The run's device.
    pub fn device(&self) -> crate::tensor::Device {
        self.device
    }

    /// A path to read: relative paths are taken from the graph's folder.
    pub fn resolve_input_path(&self, path: &str) -> PathBuf {
        let p = Path::new(path);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.graph_dir.join(p)
        }
    }

    /// A path to write: relative paths go under the run's output folder, created on demand.
    pub fn resolve_output_path(&self, path: &str) -> std::io::Result<PathBuf> {
        let p = Path::new(path);
        let full = if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.out_dir.join(p)
        };
        if let Some(parent) = full.parent() {
            std::fs::create_dir_all(parent)?;
        }
        Ok(full)
    }
}
