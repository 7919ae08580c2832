//! Flux IP-Adapter as a patch (`FluxIPAdapterAttnProcessor`'s maths): the CLIP image
//! embedding projected to a few tokens (`ImageProjection`: a linear layer, then a layer norm per
//! token), and in each double-stream block an extra attention of the image queries (after their
//! norm, before RoPE) over keys and values made from those tokens by the block's `to_k_ip` and
//! `to_v_ip`, times the scale, added to the image stream after the block. Through the protocol's
//! extra-branch hook, so it stacks with LoRA, ControlNets and other adapters.
//!
//! `ApplyFluxIPAdapter` reads the XLabs/diffusers file (`ip_adapter_proj_model.*` or
//! `image_proj.*`, and `double_blocks.N.processor.ip_adapter_double_stream_{k,v}_proj.*` or
//! `ip_adapter.N.to_{k,v}_ip.*`), as `FluxIPAdapterMixin.load_ip_adapter` reads it.

use crate::denoiser::FluxModel;
use ditflow_nn::controlnet::tensor_digest;
use ditflow_nn::{split_heads, Linear};
use ditflow_plugin::attention::AttentionSite;
use ditflow_plugin::files::{file_fingerprint, fnv1a, input_path};
use ditflow_plugin::linear_delta::LinearDeltas;
use ditflow_plugin::model::{Call, PatchHooks, PatchSpec};
use ditflow_plugin::prelude::*;
use std::collections::HashMap;
use std::path::Path;

/// An IP-Adapter's image tokens and its per-block key and value projections.
struct IpAdapter {
    /// `[1, tokens, cross_dim]`.
    tokens: Tensor,
    /// Per double block: `to_k_ip`, `to_v_ip`.
    kv: Vec<(Linear, Linear)>,
    heads: usize,
}

/// The file's tensors by diffusers' names: `image_proj.*` and `ip_adapter.N.to_{k,v}_ip.*`.
fn read_ip_adapter(ctx: &Context, path: &Path, device: Device) -> Result<HashMap<String, Tensor>> {
    let raw = ditflow_nn::read_tensors(ctx, path, device)?;
    let mut out = HashMap::new();
    for (key, t) in raw {
        let rest = |p: &str| key.strip_prefix(p).map(str::to_string);
        let name = if let Some(r) = rest("ip_adapter_proj_model.").or(rest("image_proj.")) {
            format!("image_proj.{r}")
        } else if let Some(r) = rest("double_blocks.").or(rest("ip_adapter.")) {
            format!(
                "ip_adapter.{}",
                r.replace("processor.", "")
                    .replace("ip_adapter_double_stream_k_proj", "to_k_ip")
                    .replace("ip_adapter_double_stream_v_proj", "to_v_ip")
            )
        } else {
            continue;
        };
        out.insert(name, t.cast(DType::F32)?);
    }
    if out.is_empty() {
        bail!(
            "{}: no IP-Adapter keys (expected ip_adapter_proj_model.* or image_proj.*, and \
             double_blocks.N.processor.* or ip_adapter.N.*)",
            path.display()
        );
    }
    Ok(out)
}

impl IpAdapter {
    /// The adapter of `file` for a Flux model of `blocks` double blocks, `heads` heads and
    /// width `dim`, with the tokens of `image_embeds` `[1, P]`.
    fn load(
        file: &Path,
        w: &HashMap<String, Tensor>,
        image_embeds: &Tensor,
        (blocks, heads, dim): (usize, usize, usize),
    ) -> Result<IpAdapter> {
        let get = |k: &str| {
            w.get(k)
                .cloned()
                .ok_or_else(|| Error(format!("{}: the IP-Adapter has no '{k}'", file.display())))
        };
        let proj = Linear {
            name: "image_proj.proj".into(),
            weight: get("image_proj.proj.weight")?,
            bias: Some(get("image_proj.proj.bias")?),
        };
        let (rows, embed) = (proj.weight.shape()[0], proj.weight.shape()[1]);
        // diffusers' ImageProjection: 4 tokens, or 16 for a 65536-row projection.
        let n_tokens = if rows == 65536 { 16 } else { 4 };
        let cross = rows / n_tokens;
        let es = image_embeds.shape();
        if es.len() != 2 || es[1] != embed {
            bail!(
                "{}: the IP-Adapter projects {embed}-wide image embeddings; image_embeds is {es:?}",
                file.display()
            );
        }
        let norm = (get("image_proj.norm.weight")?, get("image_proj.norm.bias")?);
        let tokens = proj
            .forward(&image_embeds.cast(DType::F32)?, "none")?
            .reshape(&[es[0] as i64, n_tokens as i64, cross as i64])?
            .layer_norm(Some(&norm.0), Some(&norm.1), None, None, 1e-5)?;
        let kv = (0..blocks)
            .map(|i| {
                let lin = |part: &str| -> Result<Linear> {
                    let p = format!("ip_adapter.{i}.{part}");
                    let weight = get(&format!("{p}.weight"))?;
                    if weight.shape() != [dim, cross] {
                        bail!(
                            "{}: '{p}.weight' is {:?}; the model's block {i} needs [{dim}, {cross}]",
                            file.display(),
                            weight.shape()
                        );
                    }
                    Ok(Linear {
                        name: p.clone(),
                        weight,
                        bias: Some(get(&format!("{p}.bias"))?),
                    })
                };
                Ok((lin("to_k_ip")?, lin("to_v_ip")?))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(IpAdapter { tokens, kv, heads })
    }
}

impl PatchHooks for IpAdapter {
    fn attention_extra(
        &self,
        _call: &Call,
        site: &AttentionSite,
        q: &Tensor,
    ) -> Result<Option<Tensor>> {
        let Some((to_k, to_v)) = self.kv.get(site.block).filter(|_| site.stack == 0) else {
            return Ok(None);
        };
        let rows = q.shape()[0];
        let device = q.device();
        let tokens = self.tokens.to_device(device)?;
        let tokens = if tokens.shape()[0] == rows {
            tokens
        } else {
            ditflow_plugin::ops::concat(&vec![&tokens; rows], 0)?
        };
        let dl = LinearDeltas::none();
        let k = split_heads(&to_k.apply(&tokens, "none", dl)?, self.heads)?;
        let v = split_heads(&to_v.apply(&tokens, "none", dl)?, self.heads)?;
        let qh = split_heads(q, self.heads)?;
        let o = ditflow_plugin::ops::attention(&qh, &k, &v, None, None)?;
        let s = q.shape();
        Ok(Some(o.permute(&[0, 2, 1, 3])?.reshape(&[
            s[0] as i64,
            s[1] as i64,
            s[2] as i64,
        ])?))
    }
}

/// `ApplyFluxIPAdapter`: model → model with an IP-Adapter.
#[derive(Default)]
pub struct ApplyFluxIPAdapter;

impl Node for ApplyFluxIPAdapter {
    fn schema() -> NodeSchema {
        NodeSchema::new("ApplyFluxIPAdapter")
            .category("patches")
            .doc(
                "Adds a Flux IP-Adapter (XLabs' ip_adapter.safetensors, as diffusers loads it) \
                 to a Flux denoiser loaded by LoadFlux: the image embedding (CLIPVisionEncode's \
                 image_embeds) becomes a few tokens, and every double block's image queries \
                 attend to them too, times scale (FluxIPAdapterAttnProcessor). Stacks with \
                 other patches and adapters. With true CFG (cfg > 1) the negative rows see the \
                 same image (diffusers gives them a black image's).",
            )
            .input(
                Port::new("model", "Model<Denoiser>")
                    .doc("A Flux denoiser from LoadFlux (possibly patched)."),
            )
            .input(Port::new("path", "String").doc("The IP-Adapter .safetensors file."))
            .input(
                Port::new("image_embeds", "Tensor")
                    .doc("[1, P] CLIP image embeddings (CLIPVisionEncode)."),
            )
            .input(
                Port::new("scale", "Float")
                    .default(1.0)
                    .range(-10.0, 10.0)
                    .doc("The adapter's scale (set_ip_adapter_scale)."),
            )
            .output(Port::new("model", "Model<Denoiser>").doc("The model with the adapter."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let model: Value = ctx.input("model")?;
        let path = input_path(ctx, "path")?;
        let embeds: Tensor = ctx.input("image_embeds")?;
        let scale: f64 = ctx.input("scale")?;
        let flux = &model
            .as_object::<FluxModel>()
            .map_err(|e| {
                Error(format!(
                    "input 'model': {e}: a Flux IP-Adapter needs a Flux model loaded by LoadFlux"
                ))
            })?
            .flux;
        let w = read_ip_adapter(ctx, &path, ctx.device())?;
        let adapter = IpAdapter::load(
            &path,
            &w,
            &embeds,
            (flux.double.len(), flux.heads, flux.dim),
        )?;
        let name = ditflow_nn::controlnet::file_label(&path);
        let mut spec = PatchSpec::new(&format!("FluxIPAdapter({name})"));
        spec.strength = scale;
        spec.stack = Some(0);
        spec.attention_extra = true;
        spec.required_capabilities = ditflow_plugin::abi::DF_CAP_ATTENTION_EXTRA;
        spec.digest = fnv1a(
            file_fingerprint("cannot read", &path)? ^ tensor_digest(&embeds)?,
            &scale.to_le_bytes(),
        ) | 1;
        let v = ctx.patch_model(&model, &spec, adapter)?;
        ctx.set_output("model", v)
    }

    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        file_fingerprint("cannot read", &input_path(ctx, "path")?).map(Some)
    }
}
