//! ditflow: an embeddable runtime for diffusion-transformer workflow graphs.
//!
//! The layers, in the order data flows: a front-end ([`graph::yaml`]) turns a document into
//! [`graph::ir`]; the [`registry`] holds node types gathered from [`plugin`]s; validation
//! ([`graph::validate`]) makes a typed [`exec::plan::Plan`] or reports every problem at once; the
//! [`exec`] scheduler runs plans on a worker pool with a cache keyed by input signature. The
//! embedding nouns are [`Runtime`], [`Graph`], [`Session`] and [`Value`].

pub mod exec;
pub mod graph;
pub mod kernels;
pub mod plugin;
pub mod registry;
pub mod runtime;
pub mod tensor;
pub mod types;
pub mod value;
pub mod watch;
pub mod weights;

pub use exec::events::{Event, Subscriber};
pub use exec::scheduler::{NodeFailure, RunOptions, RunReport};
pub use graph::diag::{Diagnostic, Diagnostics};
pub use graph::lua::LuaLimits;
pub use graph::validate::ArgValue;
pub use runtime::{Graph, GraphError, PluginRecord, PluginReload, Runtime, Session};
pub use value::Value;
pub use watch::{watch_graph, WatchOptions};
