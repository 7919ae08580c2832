//! The plan: a validated graph ready to run — nodes in topological order with resolved node types,
//! every input resolved to a constant value or an upstream output, and the static part of each
//! node's cache key.

use crate::registry::NodeType;
use crate::value::Value;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::PathBuf;
use std::sync::Arc;

/// Where a node input comes from.
#[derive(Debug, Clone)]
pub enum InputSource {
    /// A constant, a default or a graph input's value.
    Value(Arc<Value>),
    /// Output `port` of the plan node at index `node` (always an earlier index).
    Link { node: usize, port: usize },
    /// An optional input left unbound.
    Absent,
}

/// One node of a plan.
#[derive(Debug, Clone)]
pub struct PlanNode {
    pub id: Arc<str>,
    pub ty: Arc<NodeType>,
    /// One entry per input port of `ty`, in schema order.
    pub inputs: Vec<InputSource>,
    /// The cache key's static part: node type, plugin name and version, constant inputs.
    pub static_key: CacheKey,
}

/// A graph result.
#[derive(Debug, Clone)]
pub struct PlanOutput {
    pub name: String,
    pub node: usize,
    pub port: usize,
}

/// A validated, runnable graph.
#[derive(Debug, Clone)]
pub struct Plan {
    pub source: String,
    pub graph_dir: PathBuf,
    /// In topological order: links only point backwards.
    pub nodes: Vec<PlanNode>,
    pub outputs: Vec<PlanOutput>,
}

impl Plan {
    pub fn node_index(&self, id: &str) -> Option<usize> {
        self.nodes.iter().position(|n| &*n.id == id)
    }

    /// For each node, the nodes that consume its outputs.
    pub fn dependents(&self) -> Vec<Vec<usize>> {
        let mut deps = vec![Vec::new(); self.nodes.len()];
        for (i, n) in self.nodes.iter().enumerate() {
            for src in &n.inputs {
                if let InputSource::Link { node, .. } = src {
                    if !deps[*node].contains(&i) {
                        deps[*node].push(i);
                    }
                }
            }
        }
        deps
    }
}

/// A 128-bit cache key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(pub u128);

/// Builds a [`CacheKey`] from two independently seeded SipHash streams.
pub struct KeyHasher {
    a: DefaultHasher,
    b: DefaultHasher,
}

impl Default for KeyHasher {
    fn default() -> Self {
        let a = DefaultHasher::new();
        let mut b = DefaultHasher::new();
        0x0064_6974_666c_6f77_u64.hash(&mut b);
        KeyHasher { a, b }
    }
}

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.a.finish()
    }
    fn write(&mut self, bytes: &[u8]) {
        self.a.write(bytes);
        self.b.write(bytes);
    }
}

impl KeyHasher {
    pub fn key(&self) -> CacheKey {
        CacheKey(((self.a.finish() as u128) << 64) | self.b.finish() as u128)
    }
}

/// The static part of a node's key.
pub fn static_key(ty: &NodeType, inputs: &[InputSource]) -> CacheKey {
    let mut h = KeyHasher::default();
    (
        &ty.name,
        &ty.version,
        &ty.plugin.name,
        &ty.plugin.version,
        ty.plugin.build,
    )
        .hash(&mut h);
    for (i, src) in inputs.iter().enumerate() {
        i.hash(&mut h);
        match src {
            InputSource::Value(v) => {
                0u8.hash(&mut h);
                v.hash_into(&mut h);
            }
            // The upstream node's key is mixed in at run time.
            InputSource::Link { port, .. } => (1u8, port).hash(&mut h),
            InputSource::Absent => 2u8.hash(&mut h),
        }
    }
    h.key()
}
