//! Graphs: the IR, the YAML and Lua front-ends, diagnostics, validation into a plan, and Graphviz output.

pub mod diag;
pub mod dot;
pub mod ir;
pub mod lua;
pub mod lua_node;
pub mod validate;
pub mod yaml;
