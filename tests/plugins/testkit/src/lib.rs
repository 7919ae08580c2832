//! `ditflow-testkit`: a plugin used only by ditflow's own tests. Its nodes misbehave on purpose
//! (panic, fail), burn time (spin, sleep) so scheduling, cancellation and progress can be
//! observed, count their own executions to check caching, and pass a plugin-owned Model object
//! between nodes.

#![forbid(unsafe_code)]

mod protocol;

use ditflow_plugin::prelude::*;
use ditflow_plugin::Object;
use std::hint::black_box;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

/// The optional `x` input most nodes take: connecting anything to it orders the node after
/// another one without using the value.
fn x_port() -> Port {
    Port::new("x", "Any")
        .optional()
        .doc("Ignored; connect anything here to make this node run after another one.")
}

/// The `tag` input: ignored, so otherwise identical nodes get distinct cache keys.
fn tag_port() -> Port {
    Port::new("tag", "String")
        .default("")
        .doc("Ignored; give otherwise identical nodes different tags to tell them apart.")
}

/// Reads the `ms` input as a duration; negative values are an error.
fn duration_input(ctx: &Context) -> Result<(i64, Duration)> {
    let ms: i64 = ctx.input("ms")?;
    match u64::try_from(ms) {
        Ok(v) => Ok((ms, Duration::from_millis(v))),
        Err(_) => bail!("input 'ms' must not be negative, got {ms}"),
    }
}

/// Reports progress in tenths of `total`, only when a new tenth is reached.
struct Tenths {
    total: Duration,
    reported: u64,
}

impl Tenths {
    fn new(total: Duration) -> Tenths {
        Tenths { total, reported: 0 }
    }

    fn update(&mut self, ctx: &Context, elapsed: Duration) {
        let tenth = if self.total.is_zero() {
            10
        } else {
            (elapsed.as_nanos() * 10 / self.total.as_nanos()).min(10) as u64
        };
        if tenth > self.reported {
            self.reported = tenth;
            ctx.progress(tenth, 10);
        }
    }
}

/// `Panic`: panics with its message.
#[derive(Default)]
pub struct Panic;

impl Node for Panic {
    fn schema() -> NodeSchema {
        NodeSchema::new("Panic")
            .category("testing")
            .doc("Panics with the given message, to test that a plugin panic fails only its node.")
            .input(
                Port::new("message", "String")
                    .default("boom")
                    .doc("The panic message."),
            )
            .input(x_port())
            .output(Port::new("out", "Int").doc("Never set."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let message: String = ctx.input("message")?;
        panic!("{message}");
    }
}

/// `Fail`: returns its message as the node's error.
#[derive(Default)]
pub struct Fail;

impl Node for Fail {
    fn schema() -> NodeSchema {
        NodeSchema::new("Fail")
            .category("testing")
            .doc("Fails with the given message, to test how node errors are reported.")
            .input(
                Port::new("message", "String")
                    .default("failed on purpose")
                    .doc("The error message."),
            )
            .input(x_port())
            .output(Port::new("out", "Int").doc("Never set."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let message: String = ctx.input("message")?;
        Err(Error::new(message))
    }
}

/// Arithmetic iterations between two looks at the clock and the cancellation flag in `Spin`.
const SPIN_CHUNK: u64 = 1024;

/// `Spin`: keeps a CPU core busy for a while.
#[derive(Default)]
pub struct Spin;

impl Node for Spin {
    fn schema() -> NodeSchema {
        NodeSchema::new("Spin")
            .category("testing")
            .doc(
                "Busy-loops on the CPU for `ms` milliseconds, reporting progress every 10% and \
                 failing with \"cancelled\" as soon as the run is cancelled.",
            )
            .input(
                Port::new("ms", "Int")
                    .default(100i64)
                    .min(0.0)
                    .doc("How long to spin, in milliseconds."),
            )
            .input(x_port())
            .input(tag_port())
            .output(Port::new("out", "Int").doc("The number of loop iterations done."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let (_, total) = duration_input(ctx)?;
        let start = Instant::now();
        let mut progress = Tenths::new(total);
        let mut iterations: u64 = 0;
        let mut acc: u64 = 0x9e37_79b9_7f4a_7c15;
        loop {
            let elapsed = start.elapsed();
            progress.update(ctx, elapsed);
            if elapsed >= total {
                break;
            }
            ctx.check_cancelled()?;
            for i in 0..SPIN_CHUNK {
                acc = black_box(acc.rotate_left(5) ^ i).wrapping_mul(0x0000_0100_0000_01b3);
            }
            iterations += SPIN_CHUNK;
        }
        black_box(acc);
        ctx.set_output("out", i64::try_from(iterations).unwrap_or(i64::MAX))
    }
}

/// The slice `Sleep` sleeps between cancellation checks.
const SLEEP_SLICE: Duration = Duration::from_millis(5);

/// `Sleep`: waits without using the CPU.
#[derive(Default)]
pub struct Sleep;

impl Node for Sleep {
    fn schema() -> NodeSchema {
        NodeSchema::new("Sleep")
            .category("testing")
            .doc(
                "Sleeps for `ms` milliseconds in 5 ms slices, reporting progress every 10% and \
                 failing with \"cancelled\" as soon as the run is cancelled.",
            )
            .input(
                Port::new("ms", "Int")
                    .default(100i64)
                    .min(0.0)
                    .doc("How long to sleep, in milliseconds."),
            )
            .input(x_port())
            .input(tag_port())
            .output(Port::new("out", "Int").doc("The `ms` input."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let (ms, total) = duration_input(ctx)?;
        let start = Instant::now();
        let mut progress = Tenths::new(total);
        loop {
            ctx.check_cancelled()?;
            let elapsed = start.elapsed();
            progress.update(ctx, elapsed);
            let Some(left) = total.checked_sub(elapsed).filter(|d| !d.is_zero()) else {
                break;
            };
            std::thread::sleep(left.min(SLEEP_SLICE));
        }
        ctx.set_output("out", ms)
    }
}

/// Executions of `Counter` nodes in this process.
static COUNTER: AtomicI64 = AtomicI64::new(0);

/// `Counter`: counts its own executions.
#[derive(Default)]
pub struct Counter;

impl Node for Counter {
    fn schema() -> NodeSchema {
        NodeSchema::new("Counter")
            .category("testing")
            .doc(
                "Increments a process-wide counter and outputs its new value. Nondeterministic, \
                 so it is never cached: the output shows how often Counter nodes really ran.",
            )
            .input(x_port())
            .input(tag_port())
            .output(
                Port::new("count", "Int")
                    .doc("The counter after this execution (1 for the first in the process)."),
            )
            .nondeterministic()
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let count = COUNTER.fetch_add(1, Ordering::SeqCst) + 1;
        ctx.set_output("count", count)
    }
}

/// `Add1`: the cheapest useful deterministic node.
#[derive(Default)]
pub struct Add1;

impl Node for Add1 {
    fn schema() -> NodeSchema {
        NodeSchema::new("Add1")
            .category("testing")
            .doc(
                "Outputs x + 1 (wrapping at the 64-bit limit): a trivial, deterministic, \
                 cacheable node for overhead benchmarks and partial re-run tests.",
            )
            .input(
                Port::new("x", "Int")
                    .default(0i64)
                    .doc("The number to increment."),
            )
            .output(Port::new("y", "Int").doc("x + 1."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let x: i64 = ctx.input("x")?;
        ctx.set_output("y", x.wrapping_add(1))
    }
}

/// A plugin-owned model: multiplies by a constant.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScaleModel {
    pub scale: f64,
}

impl Object for ScaleModel {
    const TAG: &'static str = "testkit.ScaleModel";
}

/// `MakeModel`: wraps a [`ScaleModel`] in a Model value.
#[derive(Default)]
pub struct MakeModel;

impl Node for MakeModel {
    fn schema() -> NodeSchema {
        NodeSchema::new("MakeModel")
            .category("testing")
            .doc(
                "Makes a Model value owning a plugin object that multiplies by `scale`, to test \
                 that plugin objects cross node boundaries and are released.",
            )
            .input(
                Port::new("scale", "Float")
                    .default(2.0)
                    .doc("The model's factor."),
            )
            .output(Port::new("model", "Model").doc("A testkit.ScaleModel."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let scale: f64 = ctx.input("scale")?;
        let model = ctx.make_object(ScaleModel { scale })?;
        ctx.set_output("model", model)
    }
}

/// `ApplyModel`: runs a [`ScaleModel`].
#[derive(Default)]
pub struct ApplyModel;

impl Node for ApplyModel {
    fn schema() -> NodeSchema {
        NodeSchema::new("ApplyModel")
            .category("testing")
            .doc("Multiplies x by the factor of a model made by MakeModel.")
            .input(Port::new("model", "Model").doc("A testkit.ScaleModel from MakeModel."))
            .input(Port::new("x", "Float").doc("The number to scale."))
            .output(Port::new("y", "Float").doc("x times the model's scale."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let model: Value = ctx.input("model")?;
        let scale = model
            .as_object::<ScaleModel>()
            .map_err(|e| Error(format!("input 'model': {e}")))?
            .scale;
        let x: f64 = ctx.input("x")?;
        ctx.set_output("y", x * scale)
    }
}

/// `AdaLnBlock`: one adaLN feed-forward step through the SDK's tensor ops.
#[derive(Default)]
pub struct AdaLnBlock;

impl Node for AdaLnBlock {
    fn schema() -> NodeSchema {
        NodeSchema::new("AdaLnBlock")
            .category("testing")
            .doc(
                "Draws x [2, 8, 16], w [32, 16], shift and scale [2, 1, 16] and gate [2, 1, 32] \
                 from seeds seed..seed+4, writes a ramp bias [32] in place, then outputs \
                 x' = linear(layer_norm(x)·(1+scale)+shift, w, bias, gelu_tanh) and \
                 y = attention(x'ᵀ-heads) + gate ⊙ x': the SDK's ops end to end.",
            )
            .input(
                Port::new("seed", "Int")
                    .default(0i64)
                    .range(0.0, 1e9)
                    .doc("The first seed."),
            )
            .output(Port::new("y", "Tensor<f32, 3>").doc("The block's output [2, 8, 32]."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let seed: i64 = ctx.input("seed")?;
        let dev = ctx.device();
        let r = |shape: &[usize], k: u64| ditflow_plugin::ops::randn(shape, seed as u64 + k, dev);
        let (x, w, shift, scale, gate) = (
            r(&[2, 8, 16], 0)?,
            r(&[32, 16], 1)?,
            r(&[2, 1, 16], 2)?,
            r(&[2, 1, 16], 3)?,
            r(&[2, 1, 32], 4)?,
        );
        let mut bias = Tensor::zeros(Kind::Tensor, DType::F32, &[32])?;
        for (i, b) in bias.as_f32_mut()?.iter_mut().enumerate() {
            *b = i as f32 * 0.01;
        }
        let bias = bias.to_device(dev)?;
        let h = x
            .layer_norm(None, None, Some(&shift), Some(&scale), 1e-6)?
            .linear(&w, Some(&bias), "gelu_tanh")?;
        // Two heads of 16: [2, 8, 32] -> [2, 2, 8, 16].
        let heads = h.reshape(&[2, 8, 2, 16])?.permute(&[0, 2, 1, 3])?;
        let a = ditflow_plugin::ops::attention(&heads, &heads, &heads, None, None)?;
        let a = a.permute(&[0, 2, 1, 3])?.reshape(&[2, 8, 32])?;
        ctx.set_output("y", h.gated_residual(&a, &gate)?)
    }
}

export_plugin!(
    name: "ditflow-testkit",
    version: env!("CARGO_PKG_VERSION"),
    nodes: [
        Panic,
        Fail,
        Spin,
        Sleep,
        Counter,
        Add1,
        MakeModel,
        ApplyModel,
        AdaLnBlock,
        protocol::RustGaussianDenoiser,
        protocol::ScalePrediction,
        protocol::AddResidual,
        protocol::FailingHook,
        protocol::NoOpHooks,
        protocol::ZeroLogits,
        protocol::KeyLengthMask,
        protocol::ConstantAttention,
        protocol::SteppedForward,
        protocol::NoOpBridge,
    ],
);
