//! Validation: graph IR plus registry become a [`Plan`], or every problem at once — unknown node
//! types and ports, missing inputs, type mismatches, dangling links, cycles, out-of-range
//! constants and bad `--set` arguments — each located in the graph's source.

use super::diag::{did_you_mean, Diagnostic, Diagnostics};
use super::ir::{GraphIr, InputExpr, Loc, NodeDecl};
use crate::exec::plan::{static_key, InputSource, Plan, PlanNode, PlanOutput};
use crate::registry::{NodeType, Registry};
use crate::types::PortType;
use crate::value::Value;
use petgraph::graph::{DiGraph, NodeIndex};
use std::collections::HashMap;
use std::sync::Arc;

/// A value for a graph input given from outside the document.
#[derive(Debug, Clone)]
pub enum ArgValue {
    /// Command-line text, parsed by the input's type (`--set seed=3`).
    Text(String),
    /// A typed value (the embedding API).
    Value(Value),
}

/// A resolved graph input.
struct ResolvedInput {
    ty: Option<PortType>,
    value: Option<Value>,
    loc: Loc,
    /// Where the value came from, for messages.
    origin: String,
}

struct Validator<'a> {
    ir: &'a GraphIr,
    registry: &'a Registry,
    diags: Vec<Diagnostic>,
}

impl<'a> Validator<'a> {
    fn error(&mut self, loc: Loc, msg: impl Into<String>) {
        self.diags
            .push(Diagnostic::new(self.ir.file_name(loc), loc, msg));
    }

    fn node_error(&mut self, loc: Loc, node: &str, msg: impl Into<String>) {
        self.diags
            .push(Diagnostic::at_node(self.ir.file_name(loc), loc, node, msg));
    }

    fn graph_inputs(&mut self, args: &[(String, ArgValue)]) -> HashMap<String, ResolvedInput> {
        let mut out = HashMap::new();
        for decl in &self.ir.inputs {
            let ty = match PortType::parse(&decl.type_expr) {
                Ok(t) => Some(t),
                Err(e) => {
                    self.error(decl.type_loc, format!("graph input '{}': {e}", decl.name));
                    None
                }
            };
            let mut resolved = ResolvedInput {
                ty: ty.clone(),
                value: None,
                loc: decl.loc,
                origin: String::new(),
            };
            if let (Some(ty), Some((c, loc))) = (&ty, &decl.default) {
                match ty.value_from_const(c) {
                    Ok(v) => {
                        resolved.value = Some(v);
                        resolved.origin = "its default".into();
                    }
                    Err(e) => self.error(*loc, format!("graph input '{}': default {e}", decl.name)),
                }
            }
            if out.insert(decl.name.clone(), resolved).is_some() {
                self.error(
                    decl.loc,
                    format!("graph input '{}' is declared twice", decl.name),
                );
            }
        }
        for (name, arg) in args {
            let Some(input) = out.get_mut(name) else {
                let hint = did_you_mean(name, self.ir.inputs.iter().map(|i| i.name.as_str()));
                self.error(
                    Loc::START,
                    format!("--set {name}: the graph has no input '{name}'{hint}"),
                );
                continue;
            };
            let Some(ty) = &input.ty else { continue };
            let parsed = match arg {
                ArgValue::Text(t) => ty.value_from_text(t),
                ArgValue::Value(v) if ty.matches_value(v) => Ok(v.clone()),
                ArgValue::Value(v) => Err(format!("expects {ty}, got {}", v.type_name())),
            };
            match parsed {
                Ok(v) => {
                    input.value = Some(v);
                    input.origin = format!("--set {name}");
                }
                Err(e) => {
                    let loc = input.loc;
                    self.error(
                        loc,
                        format!("--set {name}: {e} (graph input '{name}' is {ty})"),
                    );
                }
            }
        }
        out
    }

    /// Resolves node types, in source order; `None` where the type is unknown.
    fn node_types(&mut self) -> Vec<Option<Arc<NodeType>>> {
        let mut seen: HashMap<&str, Loc> = HashMap::new();
        let mut types = Vec::with_capacity(self.ir.nodes.len());
        for node in &self.ir.nodes {
            if let Some(first) = seen.insert(&node.id, node.loc) {
                self.node_error(
                    node.loc,
                    &node.id,
                    format!("node id is used twice (first at line {})", first.line),
                );
            }
            let ty = self.registry.get(&node.type_name).cloned();
            if ty.is_none() {
                let hint = did_you_mean(&node.type_name, self.registry.names());
                self.node_error(
                    node.type_loc,
                    &node.id,
                    format!("unknown node type '{}'{hint}", node.type_name),
                );
            }
            types.push(ty);
        }
        types
    }

    /// Resolves one node's inputs; `None` entries in `types` are skipped.
    fn node_inputs(
        &mut self,
        node: &NodeDecl,
        ty: &NodeType,
        index_of: &HashMap<&str, usize>,
        types: &[Option<Arc<NodeType>>],
        graph_inputs: &HashMap<String, ResolvedInput>,
    ) -> Vec<InputSource> {
        let mut sources: Vec<Option<InputSource>> = vec![None; ty.inputs.len()];
        for b in &node.inputs {
            let Some(pi) = ty.input_index(&b.port) else {
                let hint = did_you_mean(&b.port, ty.inputs.iter().map(|p| p.name.as_str()));
                let is_output = ty.output_index(&b.port).is_some();
                let extra = if is_output {
                    " ('{}' is an output)".replace("{}", &b.port)
                } else {
                    String::new()
                };
                self.node_error(
                    b.loc,
                    &node.id,
                    format!("{} has no input '{}'{hint}{extra}", ty.name, b.port),
                );
                continue;
            };
            let port = &ty.inputs[pi];
            // Bound, even if it fails to resolve below: no second "missing input" error.
            sources[pi] = Some(InputSource::Absent);
            let source = match &b.value {
                // On a port that takes text, `a.b` is a link only when node `a` has an output `b`:
                // `noise.png` is a file name even in a graph with a node called `noise`.
                InputExpr::Link {
                    node: src,
                    port: out,
                } if port.ty.takes_text() && !links_to_output(index_of, types, src, out) => {
                    Some(self.constant_text(node, b.value_loc, pi, ty, &format!("{src}.{out}")))
                }
                InputExpr::Link {
                    node: src,
                    port: out,
                } => match index_of.get(src.as_str()) {
                    None => {
                        let hint = did_you_mean(src, index_of.keys().copied());
                        self.node_error(
                            b.value_loc,
                            &node.id,
                            format!("input '{}' links to missing node '{src}'{hint}", b.port),
                        );
                        None
                    }
                    Some(&si) => {
                        let Some(src_ty) = &types[si] else { continue };

                        match src_ty.output_index(out) {
                            None => {
                                let hint = did_you_mean(
                                    out,
                                    src_ty.outputs.iter().map(|p| p.name.as_str()),
                                );
                                self.node_error(
                                    b.value_loc,
                                    &node.id,
                                    format!(
                                        "node '{src}' ({}) has no output '{out}'{hint}",
                                        src_ty.name
                                    ),
                                );
                                None
                            }
                            Some(oi) => {
                                let out_ty = &src_ty.outputs[oi].ty;
                                if port.ty.accepts(out_ty) {
                                    Some(InputSource::Link { node: si, port: oi })
                                } else {
                                    self.node_error(
                                        b.value_loc,
                                        &node.id,
                                        format!(
                                            "type mismatch: {src}.{out} is {out_ty} but input '{}' expects {}",
                                            b.port, port.ty
                                        ),
                                    );
                                    None
                                }
                            }
                        }
                    }
                },
                InputExpr::GraphInput(name) => match graph_inputs.get(name) {
                    None => {
                        let hint = did_you_mean(name, graph_inputs.keys().map(String::as_str));
                        self.node_error(
                            b.value_loc,
                            &node.id,
                            format!("unknown graph input '${name}'{hint}"),
                        );
                        None
                    }
                    Some(gi) => {
                        let Some(gty) = &gi.ty else { continue };
                        if !port.ty.accepts(gty) {
                            self.node_error(
                                b.value_loc,
                                &node.id,
                                format!("type mismatch: graph input '${name}' is {gty} but input '{}' expects {}", b.port, port.ty),
                            );
                            None
                        } else if let Some(v) = &gi.value {
                            let v = coerce(&port.ty, v);
                            match port.check_value(&v) {
                                Ok(()) => Some(InputSource::Value(Arc::new(v))),
                                Err(e) => {
                                    self.node_error(
                                        b.value_loc,
                                        &node.id,
                                        format!("${name} (from {}): {e}", gi.origin),
                                    );
                                    None
                                }
                            }
                        } else {
                            self.node_error(
                                b.value_loc,
                                &node.id,
                                format!("graph input '${name}' has no default and no value; pass --set {name}=..."),
                            );
                            None
                        }
                    }
                },
                InputExpr::Const(c) => match port.ty.value_from_const(c) {
                    Ok(v) => match port.check_value(&v) {
                        Ok(()) => Some(InputSource::Value(Arc::new(v))),
                        Err(e) => {
                            self.node_error(b.value_loc, &node.id, e);
                            None
                        }
                    },
                    Err(e) => {
                        self.node_error(b.value_loc, &node.id, format!("input '{}' {e}", b.port));
                        None
                    }
                },
            };
            if let Some(source) = source {
                sources[pi] = Some(source);
            }
        }
        let mut out = Vec::with_capacity(ty.inputs.len());
        for (pi, port) in ty.inputs.iter().enumerate() {
            out.push(match sources[pi].take() {
                Some(s) => s,
                None => match &port.default {
                    Some(d) => InputSource::Value(Arc::new(d.clone())),
                    None if port.optional => InputSource::Absent,
                    None => {
                        self.node_error(
                            node.loc,
                            &node.id,
                            format!(
                                "missing required input '{}' ({}) of {}",
                                port.name, port.ty, ty.name
                            ),
                        );
                        InputSource::Absent
                    }
                },
            });
        }
        out
    }

    /// `node.port`-shaped text on a String port whose node does not exist: a constant.
    fn constant_text(
        &mut self,
        node: &NodeDecl,
        loc: Loc,
        pi: usize,
        ty: &NodeType,
        text: &str,
    ) -> InputSource {
        let v = Value::string(text);
        match ty.inputs[pi].check_value(&v) {
            Ok(()) => InputSource::Value(Arc::new(v)),
            Err(e) => {
                self.node_error(loc, &node.id, e);
                InputSource::Absent
            }
        }
    }

    /// Reports every cycle among `edges` (source → consumer), naming its nodes.
    fn cycles(&mut self, edges: &[(usize, usize)]) -> Option<Vec<usize>> {
        let n = self.ir.nodes.len();
        let mut g: DiGraph<usize, ()> = DiGraph::with_capacity(n, edges.len());
        let idx: Vec<NodeIndex> = (0..n).map(|i| g.add_node(i)).collect();
        for &(a, b) in edges {
            g.update_edge(idx[a], idx[b], ());
        }
        match petgraph::algo::toposort(&g, None) {
            Ok(order) => Some(order.into_iter().map(|i| g[i]).collect()),
            Err(_) => {
                let mut sccs = petgraph::algo::tarjan_scc(&g);
                sccs.iter_mut().for_each(|c| c.sort_by_key(|i| g[*i]));
                sccs.sort_by_key(|c| g[c[0]]);
                for scc in sccs {
                    let self_loop = scc.len() == 1 && g.contains_edge(scc[0], scc[0]);
                    if scc.len() < 2 && !self_loop {
                        continue;
                    }
                    let path = cycle_path(&g, &scc);
                    let names: Vec<&str> = path
                        .iter()
                        .map(|&i| self.ir.nodes[g[i]].id.as_str())
                        .collect();
                    let first = &self.ir.nodes[g[path[0]]];
                    let msg = format!("cycle: {} -> {}", names.join(" -> "), names[0]);
                    self.node_error(first.loc, &first.id.clone(), msg);
                }
                None
            }
        }
    }
}

/// Whether node `src` exists, has a known type, and that type has output `out`.
fn links_to_output(
    index_of: &HashMap<&str, usize>,
    types: &[Option<Arc<NodeType>>],
    src: &str,
    out: &str,
) -> bool {
    index_of
        .get(src)
        .and_then(|&i| types[i].as_ref())
        .is_some_and(|t| t.output_index(out).is_some())
}

/// Follows edges inside one strongly connected component from its first node back to it.
fn cycle_path(g: &DiGraph<usize, ()>, scc: &[NodeIndex]) -> Vec<NodeIndex> {
    let start = scc[0];
    let mut prev: HashMap<NodeIndex, NodeIndex> = HashMap::new();
    let mut queue = std::collections::VecDeque::from([start]);
    while let Some(u) = queue.pop_front() {
        let mut next: Vec<NodeIndex> = g.neighbors(u).filter(|v| scc.contains(v)).collect();
        next.sort_by_key(|v| g[*v]);
        for v in next {
            if v == start {
                let mut path = vec![u];
                let mut cur = u;
                while cur != start {
                    cur = prev[&cur];
                    path.push(cur);
                }
                path.reverse();
                return path;
            }
            if let std::collections::hash_map::Entry::Vacant(e) = prev.entry(v) {
                e.insert(u);
                queue.push_back(v);
            }
        }
    }
    scc.to_vec()
}

/// Graph-input values flow into ports of compatible types: an Int into a Float port becomes a
/// Float.
fn coerce(ty: &PortType, v: &Value) -> Value {
    match (ty, v) {
        (PortType::Float, Value::Int(i)) => Value::Float(*i as f64),
        _ => v.clone(),
    }
}

/// Validates `ir` against `registry`, with graph-input values from `args`.
pub fn validate(
    ir: &GraphIr,
    registry: &Registry,
    args: &[(String, ArgValue)],
) -> Result<Plan, Diagnostics> {
    let mut v = Validator {
        ir,
        registry,
        diags: Vec::new(),
    };
    let graph_inputs = v.graph_inputs(args);
    let types = v.node_types();
    let index_of: HashMap<&str, usize> = ir
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.id.as_str(), i))
        .collect();
    let mut inputs: Vec<Vec<InputSource>> = Vec::with_capacity(ir.nodes.len());
    for (node, ty) in ir.nodes.iter().zip(&types) {
        inputs.push(match ty {
            Some(ty) => v.node_inputs(node, ty, &index_of, &types, &graph_inputs),
            None => Vec::new(),
        });
    }
    let edges: Vec<(usize, usize)> = inputs
        .iter()
        .enumerate()
        .flat_map(|(i, srcs)| {
            srcs.iter().filter_map(move |s| match s {
                InputSource::Link { node, .. } => Some((*node, i)),
                _ => None,
            })
        })
        .collect();
    let order = v.cycles(&edges);
    let mut outputs = Vec::new();
    for out in &ir.outputs {
        match index_of.get(out.node.as_str()) {
            None => {
                let hint = did_you_mean(&out.node, index_of.keys().copied());
                v.error(
                    out.value_loc,
                    format!(
                        "output '{}' refers to missing node '{}'{hint}",
                        out.name, out.node
                    ),
                );
            }
            Some(&ni) => {
                let Some(ty) = &types[ni] else { continue };
                match ty.output_index(&out.port) {
                    Some(port) => outputs.push((out.name.clone(), ni, port)),
                    None => {
                        let hint =
                            did_you_mean(&out.port, ty.outputs.iter().map(|p| p.name.as_str()));
                        v.error(
                            out.value_loc,
                            format!(
                                "output '{}': node '{}' ({}) has no output '{}'{hint}",
                                out.name, out.node, ty.name, out.port
                            ),
                        );
                    }
                }
            }
        }
    }
    let Some(order) = order.filter(|_| v.diags.is_empty()) else {
        return Err(Diagnostics(v.diags).sorted());
    };
    // Renumber into topological order; among ready nodes, source order wins (stable plans).
    let mut position = vec![0usize; order.len()];
    let order = stable_topo(ir.nodes.len(), &edges).unwrap_or(order);
    for (new, &old) in order.iter().enumerate() {
        position[old] = new;
    }
    let nodes = order
        .iter()
        .map(|&old| {
            let ty = types[old].clone().expect("validated");
            let srcs: Vec<InputSource> = inputs[old]
                .iter()
                .map(|s| match s {
                    InputSource::Link { node, port } => InputSource::Link {
                        node: position[*node],
                        port: *port,
                    },
                    other => other.clone(),
                })
                .collect();
            PlanNode {
                id: ir.nodes[old].id.as_str().into(),
                static_key: static_key(&ty, &srcs),
                ty,
                inputs: srcs,
            }
        })
        .collect();
    let outputs = outputs
        .into_iter()
        .map(|(name, node, port)| PlanOutput {
            name,
            node: position[node],
            port,
        })
        .collect();
    Ok(Plan {
        source: ir.source.clone(),
        graph_dir: ir.base_dir.clone(),
        nodes,
        outputs,
    })
}

/// Kahn's algorithm taking the lowest source index first.
fn stable_topo(n: usize, edges: &[(usize, usize)]) -> Option<Vec<usize>> {
    let mut indeg = vec![0usize; n];
    let mut out: Vec<Vec<usize>> = vec![Vec::new(); n];
    for &(a, b) in edges {
        out[a].push(b);
        indeg[b] += 1;
    }
    let mut ready: std::collections::BTreeSet<usize> = (0..n).filter(|&i| indeg[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &j in &out[i] {
            indeg[j] -= 1;
            if indeg[j] == 0 {
                ready.insert(j);
            }
        }
    }
    (order.len() == n).then_some(order)
}
