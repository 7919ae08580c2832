//! Model-protocol nodes for the tests: a Rust denoiser (the exact flow velocity of a Gaussian
//! mixture, the twin of the C example's), and patches that apply to any protocol denoiser from
//! this plugin, so the tests show patches and denoisers composing across three plugins.

use ditflow_plugin::attention::{AttentionKind, AttentionSite, Mask};
use ditflow_plugin::model::{
    Call, Continuation, Denoiser, DenoiserInfo, Event, Hooks, Inputs, PatchHooks, PatchSpec,
    Prediction,
};
use ditflow_plugin::prelude::*;
use ditflow_plugin::Object;

/// The mixture: equal weights, one mean per component for every channel, one std.
struct Gmm {
    channels: usize,
    means: Vec<f64>,
    std: f64,
}

impl Object for Gmm {
    const TAG: &'static str = "ditflow-testkit.gmm";
}

impl Denoiser for Gmm {
    fn describe(&self) -> DenoiserInfo {
        DenoiserInfo {
            prediction: Prediction::Flow,
            latent_layout: "BCHW".into(),
            latent_channels: self.channels,
            patch_size: 1,
            ..DenoiserInfo::default()
        }
    }

    fn forward(&self, call: &Call, inputs: &Inputs, _hooks: &Hooks) -> Result<Tensor> {
        let x = inputs.require("hidden_states")?;
        let shape = x.shape().to_vec();
        let xs = x.to_device(Device::Cpu)?;
        let xs = xs.as_f32()?;
        let rows = shape.first().copied().unwrap_or(0).max(1);
        let n = xs.len() / rows;
        let (t, s2) = (call.sigma, self.std * self.std);
        let a = 1.0 - t;
        let var = a * a * s2 + t * t;
        let mut out = vec![0f32; xs.len()];
        for (xr, yr) in xs.chunks(n).zip(out.chunks_mut(n)) {
            let logr: Vec<f64> = self
                .means
                .iter()
                .map(|&mu| {
                    -0.5 * xr.iter().map(|&x| (x as f64 - a * mu).powi(2)).sum::<f64>() / var
                })
                .collect();
            let best = logr.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let w: Vec<f64> = logr.iter().map(|l| (l - best).exp()).collect();
            let total: f64 = w.iter().sum();
            for (x, y) in xr.iter().zip(yr.iter_mut()) {
                let x = *x as f64;
                *y = self
                    .means
                    .iter()
                    .zip(&w)
                    .map(|(&mu, &wk)| wk / total * ((t - a * s2) * (x - a * mu) / var - mu))
                    .sum::<f64>() as f32;
            }
        }
        Tensor::from_f32(Kind::Tensor, &shape, &out)
    }
}

/// `RustGaussianDenoiser`: the Rust twin of the C example `GaussianMixtureDenoiser`.
#[derive(Default)]
pub struct RustGaussianDenoiser;

impl Node for RustGaussianDenoiser {
    fn schema() -> NodeSchema {
        NodeSchema::new("RustGaussianDenoiser")
            .category("testing")
            .doc("The exact flow velocity of an equal-weight Gaussian mixture (one mean per component).")
            .input(Port::new("channels", "Int").default(4i64).range(1.0, 64.0))
            .input(Port::new("means", "String").default("-1;1").doc("';'-separated means."))
            .input(Port::new("std", "Float").default(0.1).range(0.001, 100.0))
            .output(Port::new("model", "Model<Denoiser>"))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let means: String = ctx.input("means")?;
        let means = means
            .split(';')
            .map(|m| {
                m.trim()
                    .parse::<f64>()
                    .map_err(|_| Error(format!("input 'means': '{m}' is not a number")))
            })
            .collect::<Result<Vec<_>>>()?;
        let model = Gmm {
            channels: ctx.input::<i64>("channels")? as usize,
            means,
            std: ctx.input("std")?,
        };
        let v = ctx.make_denoiser(model)?;
        ctx.set_output("model", v)
    }
}

/// Multiplies the whole call's prediction: a whole-call range override.
struct Scale(f64);

impl PatchHooks for Scale {
    fn range_override(
        &self,
        _call: &Call,
        _stack: Option<usize>,
        first: usize,
        last: usize,
        hidden: &Tensor,
        cont: &mut Continuation,
    ) -> Result<Tensor> {
        cont.run(hidden, first, last)?.affine(self.0, 0.0)
    }
}

/// `ScalePrediction`: model → model whose prediction is multiplied by `factor`.
#[derive(Default)]
pub struct ScalePrediction;

impl Node for ScalePrediction {
    fn schema() -> NodeSchema {
        NodeSchema::new("ScalePrediction")
            .category("testing")
            .doc("Patches any denoiser so its prediction is multiplied by `factor` (a whole-call override).")
            .input(Port::new("model", "Model<Denoiser>"))
            .input(Port::new("factor", "Float").default(1.0))
            .output(Port::new("model", "Model<Denoiser>"))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let model: Value = ctx.input("model")?;
        let factor: f64 = ctx.input("factor")?;
        let mut spec = PatchSpec::new(&format!("ScalePrediction({factor})"));
        spec.range_override = true;
        spec.digest = factor.to_bits() | 1;
        let v = ctx.patch_model(&model, &spec, Scale(factor))?;
        ctx.set_output("model", v)
    }
}

/// A constant residual, which fails when asked for at step `fail_from` or later.
struct Constant(f32, Option<usize>);

impl PatchHooks for Constant {
    fn block_residual(
        &self,
        call: &Call,
        _stack: usize,
        block: usize,
        hidden: &Tensor,
    ) -> Result<Option<(Tensor, usize)>> {
        if self.1.is_some_and(|f| call.step_index >= f) {
            bail!(
                "the residual was computed for block {block} at step {}",
                call.step_index
            );
        }
        let s = hidden.shape();
        let n = s.iter().product::<usize>();
        Ok(Some((
            Tensor::from_f32(Kind::Tensor, s, &vec![self.0; n])?.to_device(hidden.device())?,
            0,
        )))
    }
}

/// `AddResidual`: adds `value` to every hidden-state entry after blocks `first..=last` of stack 0.
#[derive(Default)]
pub struct AddResidual;

impl Node for AddResidual {
    fn schema() -> NodeSchema {
        NodeSchema::new("AddResidual")
            .category("testing")
            .doc("A block-residual patch: adds a constant after the chosen blocks.")
            .input(Port::new("model", "Model<Denoiser>"))
            .input(Port::new("value", "Float").default(0.0))
            .input(Port::new("first", "Int").default(0i64).range(0.0, 1e6))
            .input(Port::new("last", "Int").default(-1i64).range(-1.0, 1e6))
            .input(Port::new("strength", "Float").default(1.0))
            .input(Port::new("start", "Float").default(0.0))
            .input(Port::new("end", "Float").default(1.0))
            .input(
                Port::new("branch", "String")
                    .default("all")
                    .choices(&["all", "cond", "uncond"]),
            )
            .input(
                Port::new("fresh", "Bool")
                    .default(false)
                    .doc("Declare DF_PATCH_NEEDS_FRESH."),
            )
            .input(
                Port::new("fail_from", "Int")
                    .default(-1i64)
                    .range(-1.0, 1e6)
                    .doc("Fail when computed at this step or later (-1: never)."),
            )
            .output(Port::new("model", "Model<Denoiser>"))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let model: Value = ctx.input("model")?;
        let value: f64 = ctx.input("value")?;
        let mut spec = PatchSpec::new(&format!("AddResidual({value})"));
        spec.block_residual = true;
        spec.stack = Some(0);
        spec.first = ctx.input::<i64>("first")? as usize;
        let last: i64 = ctx.input("last")?;
        spec.last = (last >= 0).then_some(last as usize);
        spec.strength = ctx.input("strength")?;
        spec.start = ctx.input("start")?;
        spec.end = ctx.input("end")?;
        let branch: String = ctx.input("branch")?;
        spec.branches = match branch.as_str() {
            "cond" => 1 << ditflow_plugin::model::BRANCH_COND,
            "uncond" => 1 << ditflow_plugin::model::BRANCH_UNCOND,
            _ => 0,
        };
        if ctx.input::<bool>("fresh")? {
            spec.flags |= ditflow_plugin::abi::DF_PATCH_NEEDS_FRESH;
        }
        let fail_from = usize::try_from(ctx.input::<i64>("fail_from")?).ok();
        let v = ctx.patch_model(&model, &spec, Constant(value as f32, fail_from))?;
        ctx.set_output("model", v)
    }
}

/// Fails (or panics) when step `at` begins.
struct FailAt {
    at: usize,
    panic: bool,
}

impl PatchHooks for FailAt {
    fn lifecycle(&self, event: Event, call: &Call) -> Result<()> {
        if event == Event::StepBegin && call.step_index == self.at {
            if self.panic {
                panic!("the test hook panics at step {}", self.at);
            }
            bail!("the test hook fails at step {}", self.at);
        }
        Ok(())
    }
}

/// `FailingHook`: a patch whose lifecycle hook fails at one step.
#[derive(Default)]
pub struct FailingHook;

impl Node for FailingHook {
    fn schema() -> NodeSchema {
        NodeSchema::new("FailingHook")
            .category("testing")
            .doc("Patches any denoiser with a hook that fails (or panics) when step `at` begins.")
            .input(Port::new("model", "Model<Denoiser>"))
            .input(Port::new("at", "Int").default(0i64).range(0.0, 1e6))
            .input(Port::new("panic", "Bool").default(false))
            .output(Port::new("model", "Model<Denoiser>"))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let model: Value = ctx.input("model")?;
        let mut spec = PatchSpec::new("FailingHook");
        spec.lifecycle = true;
        let hooks = FailAt {
            at: ctx.input::<i64>("at")? as usize,
            panic: ctx.input("panic")?,
        };
        let v = ctx.patch_model(&model, &spec, hooks)?;
        ctx.set_output("model", v)
    }
}

/// Hooks at every site that change nothing: the cost of the hook plumbing itself.
struct NoOp;

impl PatchHooks for NoOp {
    fn block_residual(
        &self,
        _call: &Call,
        _stack: usize,
        _block: usize,
        _hidden: &Tensor,
    ) -> Result<Option<(Tensor, usize)>> {
        Ok(None)
    }

    fn lifecycle(&self, _event: Event, _call: &Call) -> Result<()> {
        Ok(())
    }

    fn attention_edit(
        &self,
        _call: &Call,
        _site: &AttentionSite,
        _q: &Tensor,
        _k: &Tensor,
        _v: &Tensor,
    ) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        Ok(None)
    }

    fn attention_mask(&self, _call: &Call, _site: &AttentionSite) -> Result<Option<Mask>> {
        Ok(None)
    }

    fn attention_extra(
        &self,
        _call: &Call,
        _site: &AttentionSite,
        _q: &Tensor,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// `NoOpHooks`: a block residual after every block, a range override over the whole stack
/// (continuing at once), lifecycle hooks, and an attention edit, mask and extra branch at every
/// attention site, none of which changes anything.
#[derive(Default)]
pub struct NoOpHooks;

impl Node for NoOpHooks {
    fn schema() -> NodeSchema {
        NodeSchema::new("NoOpHooks")
            .category("testing")
            .doc(
                "Patches a denoiser with do-nothing hooks at every site (for overhead benchmarks).",
            )
            .input(Port::new("model", "Model<Denoiser>"))
            .input(Port::new("attention", "Bool").default(true).doc(
                "Also an attention edit, mask and extra branch at every attention site (the edit \
                 and the extra branch read q, k and v as tensors).",
            ))
            .output(Port::new("model", "Model<Denoiser>"))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let model: Value = ctx.input("model")?;
        let mut residual = PatchSpec::new("NoOpHooks.residual");
        residual.block_residual = true;
        residual.lifecycle = true;
        residual.stack = Some(0);
        let v = ctx.patch_model(&model, &residual, NoOp)?;
        let mut over = PatchSpec::new("NoOpHooks.override");
        over.range_override = true;
        over.stack = Some(0);
        let mut v = ctx.patch_model(&v, &over, NoOp)?;
        if ctx.input::<bool>("attention")? {
            let mut attention = PatchSpec::new("NoOpHooks.attention");
            attention.attention_edit = true;
            attention.attention_mask = true;
            attention.attention_extra = true;
            attention.stack = Some(0);
            v = ctx.patch_model(&v, &attention, NoOp)?;
        }
        ctx.set_output("model", v)
    }
}

/// The attention kind an input names.
fn attention_kind(ctx: &Context) -> Result<AttentionKind> {
    let kind: String = ctx.input("kind")?;
    Ok(match kind.as_str() {
        "cross" => AttentionKind::Cross,
        _ => AttentionKind::SelfAttention,
    })
}

fn kind_port() -> Port {
    Port::new("kind", "String")
        .default("self")
        .choices(&["self", "cross"])
}

/// Zeroes the queries or the keys at the attention sites of one kind: every logit is 0.
struct Zero {
    keys: bool,
    kind: AttentionKind,
}

impl PatchHooks for Zero {
    fn attention_edit(
        &self,
        _call: &Call,
        site: &AttentionSite,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Option<(Tensor, Tensor, Tensor)>> {
        if site.kind != self.kind {
            return Ok(None);
        }
        Ok(Some(if self.keys {
            (q.clone(), k.affine(0.0, 0.0)?, v.clone())
        } else {
            (q.affine(0.0, 0.0)?, k.clone(), v.clone())
        }))
    }
}

/// `ZeroLogits`: an attention edit zeroing q (or k) at every attention site of one kind.
#[derive(Default)]
pub struct ZeroLogits;

impl Node for ZeroLogits {
    fn schema() -> NodeSchema {
        NodeSchema::new("ZeroLogits")
            .category("testing")
            .doc("An attention edit that zeroes the queries (or the keys): uniform attention.")
            .input(Port::new("model", "Model<Denoiser>"))
            .input(Port::new("keys", "Bool").default(false))
            .input(kind_port())
            .output(Port::new("model", "Model<Denoiser>"))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let model: Value = ctx.input("model")?;
        let keys: bool = ctx.input("keys")?;
        let mut spec = PatchSpec::new(if keys { "ZeroKeys" } else { "ZeroQueries" });
        spec.attention_edit = true;
        spec.stack = Some(0);
        let hooks = Zero {
            keys,
            kind: attention_kind(ctx)?,
        };
        let v = ctx.patch_model(&model, &spec, hooks)?;
        ctx.set_output("model", v)
    }
}

/// Every row sees only its first `n` keys at the sites of one kind.
struct Lengths {
    n: i64,
    kind: AttentionKind,
}

impl PatchHooks for Lengths {
    fn attention_mask(&self, call: &Call, site: &AttentionSite) -> Result<Option<Mask>> {
        Ok((site.kind == self.kind).then(|| Mask::KeyLengths(vec![self.n; call.branches.len()])))
    }
}

/// `KeyLengthMask`: a structured mask keeping each row's first `length` keys.
#[derive(Default)]
pub struct KeyLengthMask;

impl Node for KeyLengthMask {
    fn schema() -> NodeSchema {
        NodeSchema::new("KeyLengthMask")
            .category("testing")
            .doc("A key-length attention mask at every attention site of one kind.")
            .input(Port::new("model", "Model<Denoiser>"))
            .input(Port::new("length", "Int").default(1i64).range(0.0, 1e6))
            .input(kind_port())
            .output(Port::new("model", "Model<Denoiser>"))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let model: Value = ctx.input("model")?;
        let mut spec = PatchSpec::new("KeyLengthMask");
        spec.attention_mask = true;
        spec.stack = Some(0);
        let hooks = Lengths {
            n: ctx.input("length")?,
            kind: attention_kind(ctx)?,
        };
        let v = ctx.patch_model(&model, &spec, hooks)?;
        ctx.set_output("model", v)
    }
}

/// Adds `value` to the attention output at the sites of one kind (an IP-Adapter's shape).
struct Extra {
    value: f32,
    kind: AttentionKind,
}

impl PatchHooks for Extra {
    fn attention_extra(
        &self,
        _call: &Call,
        site: &AttentionSite,
        q: &Tensor,
    ) -> Result<Option<Tensor>> {
        if site.kind != self.kind {
            return Ok(None);
        }
        Ok(Some(q.affine(0.0, self.value as f64)?))
    }
}

/// `ConstantAttention`: an extra attention branch adding a constant.
#[derive(Default)]
pub struct ConstantAttention;

impl Node for ConstantAttention {
    fn schema() -> NodeSchema {
        NodeSchema::new("ConstantAttention")
            .category("testing")
            .doc("An extra attention branch adding `value` to the attention output.")
            .input(Port::new("model", "Model<Denoiser>"))
            .input(Port::new("value", "Float").default(0.0))
            .input(Port::new("strength", "Float").default(1.0))
            .input(
                Port::new("branch", "String")
                    .default("all")
                    .choices(&["all", "cond", "uncond"]),
            )
            .input(kind_port())
            .output(Port::new("model", "Model<Denoiser>"))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let model: Value = ctx.input("model")?;
        let value: f64 = ctx.input("value")?;
        let mut spec = PatchSpec::new(&format!("ConstantAttention({value})"));
        spec.attention_extra = true;
        spec.stack = Some(0);
        spec.strength = ctx.input("strength")?;
        let branch: String = ctx.input("branch")?;
        spec.branches = match branch.as_str() {
            "cond" => 1 << ditflow_plugin::model::BRANCH_COND,
            "uncond" => 1 << ditflow_plugin::model::BRANCH_UNCOND,
            _ => 0,
        };
        let hooks = Extra {
            value: value as f32,
            kind: attention_kind(ctx)?,
        };
        let v = ctx.patch_model(&model, &spec, hooks)?;
        ctx.set_output("model", v)
    }
}

/// `SteppedForward`: one forward of a denoiser stepped block by block through the host, as a
/// bridge between two towers drives it: prepare, blocks `0..split`, (a change to the hidden
/// state), blocks `split..`, finish.
#[derive(Default)]
pub struct SteppedForward;

impl Node for SteppedForward {
    fn schema() -> NodeSchema {
        NodeSchema::new("SteppedForward")
            .category("testing")
            .doc("Steps a denoiser through two block ranges, adding `add` to the hidden state between them.")
            .input(Port::new("model", "Model<Denoiser>"))
            .input(Port::new("inputs", "String").doc("A safetensors file of `in.*` tensors."))
            .input(Port::new("split", "Int").default(1i64).range(1.0, 1e6))
            .input(Port::new("add", "Float").default(0.0))
            .output(Port::new("sample", "Tensor"))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let model: Value = ctx.input("model")?;
        let path: String = ctx.input("inputs")?;
        let path = ctx.input_path(&path)?;
        let all = ctx.load_weights(&path.to_string_lossy(), Device::Cpu)?;
        let named: Vec<(String, Tensor)> = all
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix("in.").map(|n| (n.to_string(), v)))
            .collect();
        let refs: Vec<(&str, &Tensor)> = named.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let d = model.as_denoiser()?;
        let n = d.info().stacks.first().map_or(0, |s| s.n_blocks);
        let split = (ctx.input::<i64>("split")? as usize)
            .min(n.saturating_sub(1))
            .max(1);
        let batch = refs
            .iter()
            .find(|(k, _)| *k == "hidden_states")
            .map_or(1, |(_, t)| t.shape()[0]);
        let call = Call::single(batch, 0.0);
        let state = d.prepare(&call, &refs)?;
        let mut state = d.run_blocks(&call, &state, 0, 0, split - 1)?;
        let add: f64 = ctx.input("add")?;
        if add != 0.0 {
            state.hidden = state.hidden.affine(1.0, add)?;
        }
        let state = d.run_blocks(&call, &state, 0, split, n - 1)?;
        let y = d.finish(&call, &state)?;
        ctx.set_output("sample", y.to_device(Device::Cpu)?)
    }
}

/// `NoOpBridge`: a bridge between two streams that adds nothing (for composition checks).
#[derive(Default)]
pub struct NoOpBridge;

impl Node for NoOpBridge {
    fn schema() -> NodeSchema {
        NodeSchema::new("NoOpBridge")
            .category("testing")
            .doc("A bridge patch between two streams that adds nothing.")
            .input(Port::new("model", "Model<Denoiser>"))
            .output(Port::new("model", "Model<Denoiser>"))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let model: Value = ctx.input("model")?;
        let mut spec = PatchSpec::new("NoOpBridge");
        spec.bridge = true;
        spec.stack = Some(0);
        let v = ctx.patch_model(&model, &spec, NoOp)?;
        ctx.set_output("model", v)
    }
}
