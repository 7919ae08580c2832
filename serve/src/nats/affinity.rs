//! Model affinity: jobs are queued by the models they load, and workers take the jobs of the
//! models they hold first.
//!
//! A job's model key is a digest of what its loader nodes (node types of the `loaders`
//! category) are given: each loader's type and inputs, with graph inputs replaced by the job's
//! values (or their defaults) and links followed back through the nodes that compute them (a
//! path formatted from a folder, say). So two jobs that load the same files get the same key
//! whatever else differs (prompt, seed, steps), and a job that loads nothing gets `none`.
//!
//! Each key has its own subject and durable consumer ([`super::Nats::consumer`]). A worker
//! keeps the keys of the jobs it ran, most recent first, and asks their consumers first
//! ([`order`]). When none of them has work, it takes from the consumer with the most jobs
//! waiting, but only after it has been idle for a while (`steal_after`), so a worker that holds
//! that model can get there first. With affinity off, a worker always takes from the consumer
//! with the most jobs waiting.

use crate::store::Source;
use ditflow::graph::ir::{Const, GraphIr, InputExpr};
use ditflow::{Graph, Runtime};
use std::time::Duration;

/// FNV-1a, 64 bits: stable across builds and machines, so every server instance computes the
/// same key.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn constant(c: &Const) -> String {
    match c {
        Const::String(s) => format!("{s:?}"),
        other => format!("{other:?}"),
    }
}

/// The canonical text of a node's inputs, links followed to `depth`.
fn node_text(ir: &GraphIr, id: &str, args: &serde_json::Value, depth: usize) -> String {
    let Some(node) = ir.nodes.iter().find(|n| n.id == id) else {
        return format!("{id:?}");
    };
    if depth == 0 {
        return format!("{}(…)", node.type_name);
    }
    let mut inputs: Vec<(String, String)> = node
        .inputs
        .iter()
        .map(|b| (b.port.clone(), expr_text(ir, &b.value, args, depth - 1)))
        .collect();
    inputs.sort();
    let inner: Vec<String> = inputs.iter().map(|(p, v)| format!("{p}={v}")).collect();
    format!("{}({})", node.type_name, inner.join(","))
}

fn expr_text(ir: &GraphIr, e: &InputExpr, args: &serde_json::Value, depth: usize) -> String {
    match e {
        InputExpr::Const(c) => constant(c),
        InputExpr::GraphInput(name) => match args.get(name) {
            Some(serde_json::Value::String(s)) => format!("{s:?}"),
            Some(v) => v.to_string(),
            None => ir
                .inputs
                .iter()
                .find(|i| &i.name == name)
                .and_then(|i| i.default.as_ref())
                .map_or_else(|| format!("${name}"), |(c, _)| constant(c)),
        },
        InputExpr::Link { node, port } => {
            if ir.nodes.iter().any(|n| &n.id == node) {
                format!("{}.{port}", node_text(ir, node, args, depth))
            } else {
                format!("{:?}", format!("{node}.{port}"))
            }
        }
    }
}

/// The model key of `graph` run with `args` (a JSON object of graph inputs): 16 hex digits,
/// or `none` for a graph that loads no model.
pub fn model_key(graph: &Graph, runtime: &Runtime, args: &serde_json::Value) -> String {
    let ir = graph.ir();
    let registry = runtime.registry();
    let mut loaders: Vec<String> = ir
        .nodes
        .iter()
        .filter(|n| {
            registry
                .get(&n.type_name)
                .is_some_and(|t| t.category == "loaders")
        })
        .map(|n| node_text(ir, &n.id, args, 16))
        .collect();
    if loaders.is_empty() {
        return "none".into();
    }
    loaders.sort();
    format!("{:016x}", fnv1a(loaders.join("\n").as_bytes()))
}

/// [`model_key`] of a job's source, parsed against `base_dir`; `none` when it does not parse.
pub fn source_key(source: &Source, runtime: &Runtime, base_dir: &std::path::Path) -> String {
    crate::jobs::parse(source, base_dir)
        .map(|g| model_key(&g, runtime, &source.args))
        .unwrap_or_else(|_| "none".into())
}

/// One model key's jobs in the stream, as its consumer counts them.
#[derive(Debug, Clone, PartialEq)]
pub struct Waiting {
    pub key: String,
    /// Not delivered yet.
    pub new: u64,
    /// Delivered and not acknowledged: being run, or coming back from a worker that died.
    pub unacked: u64,
}

/// The model keys a worker asks for work, in order, given each key's jobs, the keys it ran
/// most recently first, and how long it has been idle. Keys with only unacknowledged jobs
/// (which are redelivered once their wait passes) are asked last, and only by an idle worker.
pub fn order(
    waiting: &[Waiting],
    recent: &[String],
    affinity: bool,
    idle: Duration,
    steal_after: Duration,
) -> Vec<String> {
    let idle_long = idle >= steal_after;
    let mut busiest: Vec<&Waiting> = waiting.iter().filter(|w| w.new > 0).collect();
    busiest.sort_by(|a, b| b.new.cmp(&a.new).then(a.key.cmp(&b.key)));
    let mut out: Vec<String> = Vec::new();
    if affinity {
        out.extend(
            recent
                .iter()
                .filter(|k| busiest.iter().any(|w| &w.key == *k))
                .cloned(),
        );
        if recent.is_empty() || idle_long {
            out.extend(
                busiest
                    .iter()
                    .filter(|w| !recent.contains(&w.key))
                    .map(|w| w.key.clone()),
            );
        }
    } else {
        out.extend(busiest.iter().map(|w| w.key.clone()));
    }
    if idle_long {
        let mut unacked: Vec<&Waiting> = waiting
            .iter()
            .filter(|w| w.new == 0 && w.unacked > 0)
            .collect();
        unacked.sort_by_key(|w| {
            (
                recent
                    .iter()
                    .position(|k| k == &w.key)
                    .unwrap_or(usize::MAX),
                w.key.clone(),
            )
        });
        out.extend(unacked.into_iter().map(|w| w.key.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(pairs: &[(&str, u64, u64)]) -> Vec<Waiting> {
        pairs
            .iter()
            .map(|(k, new, unacked)| Waiting {
                key: k.to_string(),
                new: *new,
                unacked: *unacked,
            })
            .collect()
    }

    #[test]
    fn a_worker_asks_for_its_own_models_first_and_steals_only_when_idle_long_enough() {
        let waiting = w(&[("a", 1, 0), ("b", 5, 2), ("c", 0, 0), ("d", 0, 1)]);
        let recent = vec!["a".to_string(), "c".to_string()];
        let s = Duration::from_secs(1);
        // Busy: only its own models (c has nothing waiting).
        assert_eq!(order(&waiting, &recent, true, Duration::ZERO, s), ["a"]);
        // Idle long enough: then the busiest of the others, then those with deliveries that
        // may come back (d's job's worker may have died).
        assert_eq!(order(&waiting, &recent, true, s, s), ["a", "b", "d"]);
        // A fresh worker takes anything, busiest first.
        assert_eq!(order(&waiting, &[], true, Duration::ZERO, s), ["b", "a"]);
        // Affinity off: busiest first, whatever it holds.
        assert_eq!(
            order(&waiting, &recent, false, Duration::ZERO, s),
            ["b", "a"]
        );
        assert_eq!(order(&waiting, &recent, false, s, s), ["b", "a", "d"]);
    }
}
