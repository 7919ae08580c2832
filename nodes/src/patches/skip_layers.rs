//! Skip-layer guidance's patch (SD3.5's `skip_guidance_layers`): blocks of a denoiser's first
//! stack left out, for the rows of the skip-layers branch only. `Sample` patches its model with
//! it and runs the conditional prompt once more in that branch; the other branches run every
//! block.

use ditflow_plugin::abi::{DF_CAP_RANGE_OVERRIDE, DF_PATCH_SKIPS_BLOCKS};
use ditflow_plugin::model::{Call, Continuation, PatchHooks, PatchSpec, BRANCH_SKIP_LAYERS};
use ditflow_plugin::prelude::*;

/// Leaves its blocks out for calls whose rows are all in the skip-layers branch.
struct SkipLayers;

impl PatchHooks for SkipLayers {
    fn range_override(
        &self,
        call: &Call,
        _stack: Option<usize>,
        first: usize,
        last: usize,
        hidden: &Tensor,
        cont: &mut Continuation,
    ) -> Result<Tensor> {
        if !call.branches.is_empty() && call.branches.iter().all(|&b| b == BRANCH_SKIP_LAYERS) {
            Ok(hidden.clone())
        } else {
            cont.run(hidden, first, last)
        }
    }
}

/// `model` with blocks `layers` of its first stack skipped in the skip-layers branch: one range
/// override per run of consecutive blocks.
pub fn skip_layers_model(ctx: &mut Context, model: &Value, layers: &[usize]) -> Result<Value> {
    let info = model.as_denoiser()?.info().clone();
    let Some(stack) = info.stacks.first() else {
        bail!("skip-layer guidance needs a denoiser with a block stack");
    };
    if info.capabilities & DF_CAP_RANGE_OVERRIDE == 0 {
        bail!("skip-layer guidance needs a denoiser that takes range overrides");
    }
    let mut layers = layers.to_vec();
    layers.sort_unstable();
    layers.dedup();
    if let Some(&bad) = layers.iter().find(|&&l| l >= stack.n_blocks) {
        bail!(
            "slg_layers: block {bad} is past the model's {} blocks (0..{})",
            stack.n_blocks,
            stack.n_blocks
        );
    }
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for l in layers {
        match runs.last_mut() {
            Some((_, last)) if *last + 1 == l => *last = l,
            _ => runs.push((l, l)),
        }
    }
    let mut patched = model.clone();
    for (first, last) in runs {
        let mut spec = PatchSpec::new(&format!("SkipLayers({first}..={last})"));
        spec.flags |= DF_PATCH_SKIPS_BLOCKS;
        spec.range_override = true;
        spec.stack = Some(0);
        spec.first = first;
        spec.last = Some(last);
        spec.digest = 0x5c1b_0000 ^ ((first as u64) << 20) ^ last as u64;
        patched = ctx.patch_model(&patched, &spec, SkipLayers)?;
    }
    Ok(patched)
}
