//! Graphviz output for a graph (`ditflow dot`): one box per node, one edge per link, graph inputs
//! and outputs as ellipses.

use super::ir::{GraphIr, InputExpr};

fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// The graph in DOT. Works on unvalidated IR, so a broken graph can still be looked at.
pub fn to_dot(ir: &GraphIr) -> String {
    let mut out = String::from(
        "digraph ditflow {\n  rankdir=LR;\n  node [shape=box, fontname=\"Helvetica\"];\n",
    );
    for input in &ir.inputs {
        out.push_str(&format!(
            "  {} [shape=ellipse, label={}];\n",
            quote(&format!("${}", input.name)),
            quote(&format!("${}: {}", input.name, input.type_expr))
        ));
    }
    let ids: std::collections::HashSet<&str> = ir.nodes.iter().map(|n| n.id.as_str()).collect();
    for node in &ir.nodes {
        out.push_str(&format!(
            "  {} [label={}];\n",
            quote(&node.id),
            quote(&format!("{}\\n{}", node.id, node.type_name))
        ));
    }
    for node in &ir.nodes {
        for b in &node.inputs {
            match &b.value {
                InputExpr::Link { node: src, port } if ids.contains(src.as_str()) => {
                    out.push_str(&format!(
                        "  {} -> {} [label={}];\n",
                        quote(src),
                        quote(&node.id),
                        quote(&format!("{port} → {}", b.port))
                    ))
                }
                InputExpr::GraphInput(name) => out.push_str(&format!(
                    "  {} -> {} [label={}];\n",
                    quote(&format!("${name}")),
                    quote(&node.id),
                    quote(&b.port)
                )),
                _ => {}
            }
        }
    }
    for o in &ir.outputs {
        let id = format!("out:{}", o.name);
        out.push_str(&format!(
            "  {} [shape=ellipse, label={}];\n",
            quote(&id),
            quote(&o.name)
        ));
        out.push_str(&format!(
            "  {} -> {} [label={}];\n",
            quote(&o.node),
            quote(&id),
            quote(&o.port)
        ));
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::yaml::parse_graph;

    #[test]
    fn links_and_inputs_become_edges() {
        let ir = parse_graph(
            "version: 1\ninputs: {s: {type: Int}}\nnodes:\n  a: {type: Int, inputs: {value: $s}}\n  b: {type: Math, inputs: {a: a.value}}\noutputs: {r: b.result}\n",
            "g.yaml",
            std::path::Path::new("."),
        )
        .unwrap();
        let dot = to_dot(&ir);
        assert!(
            dot.contains("\"a\" -> \"b\" [label=\"value → a\"]"),
            "{dot}"
        );
        assert!(dot.contains("\"$s\" -> \"a\""), "{dot}");
        assert!(dot.contains("\"b\" -> \"out:r\""), "{dot}");
    }
}
