//! Execution: plans, the scheduler, the cache, events and the per-node context.

pub mod cache;
pub mod context;
pub mod events;
pub mod plan;
pub mod scheduler;
