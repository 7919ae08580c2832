//! Feature caches: `FirstBlockCache`, `TeaCache` and `TaylorSeer`, each a range override over a
//! denoiser's whole first block stack, so they work on every protocol denoiser that offers range
//! overrides, whichever plugin made it.
//!
//! At each step a cache either runs the stack's blocks through the continuation or reuses what it
//! learned at the steps it ran: the residual `stack output − stack input` (FirstBlockCache and
//! TeaCache), or a Taylor forecast of it (TaylorSeer). The atomic rule holds by construction:
//! injections inside the range (block residuals) run only inside the continuation, so a reused
//! residual holds them once. Patches that need their injections fresh at every step
//! (`DF_PATCH_NEEDS_FRESH`) are refused when composed with a cache over their blocks.
//!
//! State is kept per run id and guidance-branch set, and dropped when a new run begins. Each run's
//! summary (stack evaluations computed and reused) is logged when the run ends.

use ditflow_plugin::abi::{DF_CAP_RANGE_OVERRIDE, DF_PATCH_SKIPS_BLOCKS};
use ditflow_plugin::model::{Call, Continuation, Event, PatchHooks, PatchSpec};
use ditflow_plugin::prelude::*;
use std::collections::HashMap;
use std::sync::Mutex;

/// How a cache decides and what it reuses.
#[derive(Debug, Clone, PartialEq)]
pub enum Method {
    /// Run the first block; reuse the rest's residual while the first block's residual changed
    /// by less than `threshold` (relative L1) since the last step that ran everything.
    FirstBlock { threshold: f64 },
    /// Accumulate the rescaled relative L1 change of the stack input, `poly(Δ)`; reuse the
    /// residual while the sum stays below `threshold`. `coefficients` are highest power first.
    Tea {
        threshold: f64,
        coefficients: Vec<f64>,
    },
    /// Run the first `warmup` steps and every `interval`-th after; in between, forecast the
    /// residual from its finite differences up to `order` (a Taylor series in steps).
    Taylor {
        interval: usize,
        order: usize,
        warmup: usize,
    },
}

impl Method {
    fn name(&self) -> &'static str {
        match self {
            Method::FirstBlock { .. } => "FirstBlockCache",
            Method::Tea { .. } => "TeaCache",
            Method::Taylor { .. } => "TaylorSeer",
        }
    }
}

/// What one guidance-branch set remembers between steps.
#[derive(Default)]
struct BranchState {
    /// FirstBlockCache: the first block's residual at the last step that ran everything.
    first_residual: Option<Tensor>,
    /// The residual of the blocks after the first (FirstBlockCache) or of the whole stack.
    residual: Option<Tensor>,
    /// TeaCache: the stack input at the previous step, and the accumulated change.
    prev_input: Option<Tensor>,
    accumulated: f64,
    /// TaylorSeer: the residual's finite differences at the last computed step, and that step.
    derivatives: Vec<Tensor>,
    computed_at: Option<usize>,
}

#[derive(Default)]
struct State {
    run_id: u64,
    branches: HashMap<u32, BranchState>,
    computed: usize,
    reused: usize,
}

/// The patch's hooks.
pub struct Cache {
    method: Method,
    state: Mutex<State>,
}

/// `mean |a − b| / mean |b|`.
fn relative_l1(a: &Tensor, b: &Tensor) -> Result<f64> {
    let mean_abs = |t: &Tensor| -> Result<f64> {
        let m = t.unary("abs")?.reduce("mean", &[], false)?;
        let m = m.to_device(Device::Cpu)?;
        Ok(m.as_f32()?.first().copied().unwrap_or(0.0) as f64)
    };
    let den = mean_abs(b)?;
    Ok(mean_abs(&a.sub(b)?)? / den.max(1e-12))
}

/// `Σ c_i x^(n−i)` (numpy's `poly1d`, highest power first).
pub fn poly(coefficients: &[f64], x: f64) -> f64 {
    coefficients.iter().fold(0.0, |acc, c| acc * x + c)
}

impl Cache {
    pub fn new(method: Method) -> Cache {
        Cache {
            method,
            state: Mutex::new(State::default()),
        }
    }

    /// The stack from `hidden`, through the continuation or from what was cached, and whether
    /// the blocks ran.
    fn step(
        &self,
        st: &mut BranchState,
        call: &Call,
        first: usize,
        last: usize,
        hidden: &Tensor,
        cont: &mut Continuation,
    ) -> Result<(Tensor, bool)> {
        let last_step = call.step_index + 1 >= call.num_steps;
        let fresh_start = call.step_index == 0;
        match &self.method {
            Method::FirstBlock { threshold } => {
                let h1 = cont.run(hidden, first, first)?;
                if first == last {
                    return Ok((h1, true));
                }
                let r1 = h1.sub(hidden)?;
                if let (Some(prev), Some(rest), false) =
                    (&st.first_residual, &st.residual, fresh_start)
                {
                    if relative_l1(&r1, prev)? < *threshold {
                        return Ok((h1.add(rest)?, false));
                    }
                }
                let out = cont.run(&h1, first + 1, last)?;
                st.residual = Some(out.sub(&h1)?);
                st.first_residual = Some(r1);
                Ok((out, true))
            }
            Method::Tea {
                threshold,
                coefficients,
            } => {
                let change = match &st.prev_input {
                    Some(prev) if !fresh_start => relative_l1(hidden, prev)?,
                    _ => f64::INFINITY,
                };
                st.prev_input = Some(hidden.clone());
                if change.is_finite() && !last_step {
                    st.accumulated += poly(coefficients, change).abs();
                    if st.accumulated < *threshold {
                        if let Some(r) = &st.residual {
                            return Ok((hidden.add(r)?, false));
                        }
                    }
                }
                st.accumulated = 0.0;
                let out = cont.run(hidden, first, last)?;
                st.residual = Some(out.sub(hidden)?);
                Ok((out, true))
            }
            Method::Taylor {
                interval,
                order,
                warmup,
            } => {
                let k = call.step_index;
                let run = fresh_start
                    || st.computed_at.is_none()
                    || k < *warmup
                    || last_step
                    || (k - warmup.min(&k)).is_multiple_of((*interval).max(1));
                if !run {
                    if let Some(at) = st.computed_at {
                        let m = (k - at) as f64;
                        let mut r = st.derivatives[0].clone();
                        let mut coef = 1.0;
                        for (i, d) in st.derivatives.iter().enumerate().skip(1) {
                            coef *= m / i as f64;
                            r = r.add(&d.affine(coef, 0.0)?)?;
                        }
                        return Ok((hidden.add(&r)?, false));
                    }
                }
                let out = cont.run(hidden, first, last)?;
                let r = out.sub(hidden)?;
                let mut derivatives = vec![r];
                if let Some(at) = st.computed_at.filter(|_| !fresh_start) {
                    let gap = (k - at).max(1) as f64;
                    for i in 0..(*order).min(st.derivatives.len()) {
                        let d = derivatives[i]
                            .sub(&st.derivatives[i])?
                            .affine(1.0 / gap, 0.0)?;
                        derivatives.push(d);
                    }
                }
                st.derivatives = derivatives;
                st.computed_at = Some(k);
                Ok((out, true))
            }
        }
    }
}

impl PatchHooks for Cache {
    fn range_override(
        &self,
        call: &Call,
        _stack: Option<usize>,
        first: usize,
        last: usize,
        hidden: &Tensor,
        cont: &mut Continuation,
    ) -> Result<Tensor> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.run_id != call.run_id || call.run_id == 0 {
            *state = State {
                run_id: call.run_id,
                ..State::default()
            };
        }
        let key = call.branch_mask();
        let mut st = state.branches.remove(&key).unwrap_or_default();
        let r = self.step(&mut st, call, first, last, hidden, cont);
        state.branches.insert(key, st);
        let (out, ran) = r?;
        if ran {
            state.computed += 1;
        } else {
            state.reused += 1;
        }
        Ok(out)
    }

    fn lifecycle(&self, event: Event, call: &Call) -> Result<()> {
        if event == Event::RunEnd {
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if state.run_id == call.run_id {
                ditflow_plugin::log_info(&format!(
                    "{}: {} block-stack evaluations computed, {} reused",
                    self.method.name(),
                    state.computed,
                    state.reused
                ));
            }
        }
        Ok(())
    }
}

/// A cache patch over the model's first block stack.
fn cache_model(ctx: &mut Context, method: Method, digest: u64) -> Result<()> {
    let model: Value = ctx.input("model")?;
    let info = model.as_denoiser()?.info().clone();
    if info.capabilities & DF_CAP_RANGE_OVERRIDE == 0 || info.stacks.is_empty() {
        bail!(
            "input 'model': {} needs a denoiser with a block stack and range overrides",
            method.name()
        );
    }
    let mut spec = PatchSpec::new(method.name());
    spec.flags |= DF_PATCH_SKIPS_BLOCKS;
    spec.range_override = true;
    spec.lifecycle = true;
    spec.stack = Some(0);
    spec.digest = digest | 1;
    // Outermost: a cache wraps every other override over the same blocks.
    spec.order = i32::MIN / 2;
    let v = ctx.patch_model(&model, &spec, Cache::new(method))?;
    ctx.set_output("model", v)
}

fn digest_of(parts: &[f64]) -> u64 {
    parts.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, p| {
        ditflow_plugin::files::fnv1a(h, &p.to_le_bytes())
    })
}

/// `FirstBlockCache`.
#[derive(Default)]
pub struct FirstBlockCache;

impl Node for FirstBlockCache {
    fn schema() -> NodeSchema {
        NodeSchema::new("FirstBlockCache")
            .category("patches")
            .doc(
                "Caches the block stack's residual: each step runs the first block, and when its \
                 residual changed by less than `threshold` (relative L1) since the last step that \
                 ran every block, reuses the other blocks' residual from then. The first and \
                 changing steps run in full. Works on any denoiser with range overrides.",
            )
            .input(Port::new("model", "Model<Denoiser>"))
            .input(
                Port::new("threshold", "Float")
                    .default(0.08)
                    .range(0.0, 10.0)
                    .doc("0 never reuses; larger reuses more (0.05-0.15 is typical)."),
            )
            .output(Port::new("model", "Model<Denoiser>"))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let threshold: f64 = ctx.input("threshold")?;
        cache_model(
            ctx,
            Method::FirstBlock { threshold },
            digest_of(&[1.0, threshold]),
        )
    }
}

/// Parses `"a;b;c"` into numbers.
fn parse_list(s: &str) -> Result<Vec<f64>> {
    s.split(';')
        .filter(|p| !p.trim().is_empty())
        .map(|p| {
            p.trim()
                .parse::<f64>()
                .map_err(|_| Error(format!("input 'coefficients': '{p}' is not a number")))
        })
        .collect()
}

/// `TeaCache`.
#[derive(Default)]
pub struct TeaCache;

impl Node for TeaCache {
    fn schema() -> NodeSchema {
        NodeSchema::new("TeaCache")
            .category("patches")
            .doc(
                "Timestep-aware caching: accumulates the rescaled relative L1 change of the block \
                 stack's input from step to step, poly(change) with the given coefficients, and \
                 while the sum stays below `threshold` reuses the stack's last residual; when it \
                 passes, the blocks run and the sum restarts. The first and last steps always \
                 run. Works on any denoiser with range overrides.",
            )
            .input(Port::new("model", "Model<Denoiser>"))
            .input(
                Port::new("threshold", "Float")
                    .default(0.3)
                    .range(0.0, 100.0)
                    .doc("0 never reuses; larger reuses more."),
            )
            .input(Port::new("coefficients", "String").default("1;0").doc(
                "The rescaling polynomial, ';'-separated, highest power first. The default \
                 is the identity; fit one per model by regressing the stack's output change \
                 on its input change.",
            ))
            .output(Port::new("model", "Model<Denoiser>"))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let threshold: f64 = ctx.input("threshold")?;
        let text: String = ctx.input("coefficients")?;
        let coefficients = parse_list(&text)?;
        if coefficients.is_empty() {
            bail!("input 'coefficients': give at least one number");
        }
        let mut d = vec![2.0, threshold];
        d.extend(&coefficients);
        cache_model(
            ctx,
            Method::Tea {
                threshold,
                coefficients,
            },
            digest_of(&d),
        )
    }
}

/// `TaylorSeer`.
#[derive(Default)]
pub struct TaylorSeer;

impl Node for TaylorSeer {
    fn schema() -> NodeSchema {
        NodeSchema::new("TaylorSeer")
            .category("patches")
            .doc(
                "Forecasts the block stack's residual: runs the first `warmup` steps and every \
                 `interval`-th step after (and the last), and in between predicts the residual by \
                 a Taylor series of the given order from its finite differences over the steps \
                 that ran. Works on any denoiser with range overrides.",
            )
            .input(Port::new("model", "Model<Denoiser>"))
            .input(
                Port::new("interval", "Int")
                    .default(3i64)
                    .range(1.0, 1000.0)
                    .doc("Run every this many steps (1 runs all)."),
            )
            .input(
                Port::new("order", "Int")
                    .default(1i64)
                    .range(0.0, 4.0)
                    .doc("0 reuses the residual; 1 extrapolates linearly; 2 quadratically."),
            )
            .input(
                Port::new("warmup", "Int")
                    .default(3i64)
                    .range(1.0, 1000.0)
                    .doc("Steps that always run first."),
            )
            .output(Port::new("model", "Model<Denoiser>"))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let interval = ctx.input::<i64>("interval")? as usize;
        let order = ctx.input::<i64>("order")? as usize;
        let warmup = ctx.input::<i64>("warmup")? as usize;
        cache_model(
            ctx,
            Method::Taylor {
                interval,
                order,
                warmup,
            },
            digest_of(&[3.0, interval as f64, order as f64, warmup as f64]),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poly_is_highest_power_first() {
        assert_eq!(poly(&[2.0, -1.0, 3.0], 2.0), 2.0 * 4.0 - 2.0 + 3.0);
        assert_eq!(poly(&[1.0, 0.0], 0.25), 0.25);
    }

    #[test]
    fn coefficient_lists_parse_or_name_the_bad_entry() {
        assert_eq!(parse_list("1; -2.5;0").unwrap(), vec![1.0, -2.5, 0.0]);
        let e = parse_list("1;x").unwrap_err();
        assert!(e.0.contains("'x'"), "{}", e.0);
    }
}
