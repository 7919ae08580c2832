//! Graphs: the IR, the YAML front-end, diagnostics, validation into a plan, and Graphviz output.

pub mod diag;
pub mod dot;
pub mod ir;
pub mod validate;
pub mod yaml;
