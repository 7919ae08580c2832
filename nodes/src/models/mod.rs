//! Model architectures, one file per diffusers/transformers class ([`pixart`], [`dit`], [`vae`],
//! [`t5`], [`clip`]), and the layers they share. Structs are named like the reference implementation's
//! modules so weight keys map one to one; every forward runs on the host's tensor engine through
//! the SDK.
//!
//! Loading: a model folder is `config.json` plus safetensors weights (sharded or not). A missing
//! folder, an unsupported class, or a missing or misshapen key is an error naming the file and the
//! key.

pub mod clip;
pub mod dit;
pub mod pixart;
pub mod t5;
pub mod vae;

use ditflow_plugin::linear_delta::LinearDeltas;
use ditflow_plugin::{Context, DType, Device, Error, Kind, Result, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A model folder's `config.json`.
pub struct Config {
    pub path: PathBuf,
    pub json: serde_json::Value,
}

impl Config {
    pub fn read(dir: &Path) -> Result<Config> {
        if !dir.is_dir() {
            return Err(Error(format!("{}: no such model folder", dir.display())));
        }
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error(format!("{}: {e}", path.display())))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error(format!("{}: not valid JSON: {e}", path.display())))?;
        if !json.is_object() {
            return Err(Error(format!("{}: expected a JSON object", path.display())));
        }
        Ok(Config { path, json })
    }

    /// `_class_name` (diffusers) or the first of `architectures` (transformers).
    pub fn class_name(&self) -> Option<&str> {
        self.json
            .get("_class_name")
            .and_then(|v| v.as_str())
            .or_else(|| {
                self.json
                    .get("architectures")
                    .and_then(|a| a.get(0))
                    .and_then(|v| v.as_str())
            })
    }

    fn bad(&self, key: &str, what: &str) -> Error {
        Error(format!("{}: \"{key}\" {what}", self.path.display()))
    }

    pub fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.json.get(key) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(v) => v
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| self.bad(key, "must be a non-negative integer")),
        }
    }

    pub fn usize(&self, key: &str) -> Result<usize> {
        match self.json.get(key) {
            None | Some(serde_json::Value::Null) => Err(self.bad(key, "is missing")),
            Some(_) => self.usize_or(key, 0),
        }
    }

    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.json.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(_) => self.usize_or(key, 0).map(Some),
        }
    }

    pub fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.json.get(key) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.bad(key, "must be a number")),
        }
    }

    pub fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.json.get(key) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.bad(key, "must be true or false")),
        }
    }

    pub fn str_or<'a>(&'a self, key: &str, default: &'a str) -> Result<&'a str> {
        match self.json.get(key) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(v) => v.as_str().ok_or_else(|| self.bad(key, "must be a string")),
        }
    }
}

/// A checkpoint's tensors, with errors naming the folder and the key.
pub struct Weights {
    pub dir: PathBuf,
    tensors: HashMap<String, Tensor>,
}

impl Weights {
    pub fn load(ctx: &Context, dir: &Path, device: Device) -> Result<Weights> {
        // Absolute, so the host does not resolve it against the graph's folder a second time.
        let abs = std::path::absolute(dir).map_err(|e| Error(format!("{}: {e}", dir.display())))?;
        let tensors = ctx.load_weights(&abs.to_string_lossy(), device)?;
        Ok(Weights {
            dir: dir.to_path_buf(),
            tensors,
        })
    }

    /// Tensor `key` with exactly `shape`, converted to f32.
    pub fn get(&self, key: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensors.get(key).ok_or_else(|| {
            Error(format!(
                "{}: weight '{key}' is missing from the checkpoint",
                self.dir.display()
            ))
        })?;
        if t.shape() != shape {
            return Err(Error(format!(
                "{}: weight '{key}' has shape {:?}, expected {shape:?}",
                self.dir.display(),
                t.shape()
            )));
        }
        if t.dtype() == DType::F32 {
            Ok(t.clone())
        } else {
            t.cast(DType::F32)
        }
    }

    pub fn has(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// A `Linear(in, out)` at `prefix` (`prefix.weight` `[out, in]`, `prefix.bias` `[out]` when
    /// `bias`).
    pub fn linear(&self, prefix: &str, input: usize, output: usize, bias: bool) -> Result<Linear> {
        Ok(Linear {
            name: prefix.to_string(),
            weight: self.get(&format!("{prefix}.weight"), &[output, input])?,
            bias: if bias {
                Some(self.get(&format!("{prefix}.bias"), &[output])?)
            } else {
                None
            },
        })
    }
}

/// `torch.nn.Linear`, named by its weight's key (the linear-delta site).
pub struct Linear {
    pub name: String,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// `x·Wᵀ + b`, then `activation` (fused).
    pub fn forward(&self, x: &Tensor, activation: &str) -> Result<Tensor> {
        x.linear(&self.weight, self.bias.as_ref(), activation)
    }

    /// [`Linear::forward`] with the patches' deltas on this layer (none: the same call).
    pub fn apply(&self, x: &Tensor, activation: &str, d: &LinearDeltas) -> Result<Tensor> {
        d.linear(&self.name, x, &self.weight, self.bias.as_ref(), activation)
    }
}

/// diffusers' `TimestepEmbedding` (linear_1, SiLU, linear_2).
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn load(w: &Weights, prefix: &str, input: usize, dim: usize) -> Result<TimestepEmbedding> {
        Ok(TimestepEmbedding {
            linear_1: w.linear(&format!("{prefix}.linear_1"), input, dim, true)?,
            linear_2: w.linear(&format!("{prefix}.linear_2"), dim, dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor, d: &LinearDeltas) -> Result<Tensor> {
        self.linear_2
            .apply(&self.linear_1.apply(x, "silu", d)?, "none", d)
    }
}

/// diffusers' `get_timestep_embedding`: `[N, dim]` sinusoids of `t`, with `flip_sin_to_cos`
/// putting cosines first. The arguments are rounded to f32 as PyTorch computes them, then sin and
/// cos are taken exactly.
pub fn timestep_sinusoids(
    t: &[f32],
    dim: usize,
    flip_sin_to_cos: bool,
    downscale_freq_shift: f32,
    device: Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|j| ((-(10000f32.ln()) * j as f32) / (half as f32 - downscale_freq_shift)).exp())
        .collect();
    let mut out = Vec::with_capacity(t.len() * dim);
    for &tv in t {
        let args: Vec<f64> = freqs.iter().map(|&f| (tv * f) as f64).collect();
        let (sin, cos): (Vec<f32>, Vec<f32>) = args
            .iter()
            .map(|a| (a.sin() as f32, a.cos() as f32))
            .unzip();
        if flip_sin_to_cos {
            out.extend(&cos);
            out.extend(&sin);
        } else {
            out.extend(&sin);
            out.extend(&cos);
        }
        out.resize(out.len() + dim % 2, 0.0);
    }
    Tensor::from_f32(Kind::Tensor, &[t.len(), dim], &out)?.to_device(device)
}

/// diffusers' `get_2d_sincos_pos_embed` for an `h × w` grid of patches: `[1, h·w, dim]`, token
/// `i·w + j` holding `[sin, cos](x_j·ω), [sin, cos](y_i·ω)`, with positions scaled by
/// `base_size / size / interpolation_scale` as diffusers does.
pub fn sincos_pos_embed_2d(
    dim: usize,
    h: usize,
    w: usize,
    base_size: usize,
    interpolation_scale: f64,
    device: Device,
) -> Result<Tensor> {
    if dim % 4 != 0 {
        return Err(Error(format!(
            "the hidden size {dim} must be a multiple of 4 for 2-D position embeddings"
        )));
    }
    let quarter = dim / 4;
    let omega: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / 10000f64.powf(k as f64 / quarter as f64))
        .collect();
    // PyTorch: arange(n, f32) / (n / base_size) / interpolation_scale, in f32.
    let coords = |n: usize| -> Vec<f64> {
        let step = (n as f64 / base_size as f64) as f32;
        (0..n)
            .map(|i| ((i as f32 / step) / interpolation_scale as f32) as f64)
            .collect()
    };
    let (xs, ys) = (coords(w), coords(h));
    let mut out = Vec::with_capacity(h * w * dim);
    for y in &ys {
        for x in &xs {
            for pos in [x, y] {
                out.extend(omega.iter().map(|o| (pos * o).sin() as f32));
                out.extend(omega.iter().map(|o| (pos * o).cos() as f32));
            }
        }
    }
    Tensor::from_f32(Kind::Tensor, &[1, h * w, dim], &out)?.to_device(device)
}

/// The 2-D position embedding of the last grid a model saw: sampling calls a model many times at
/// one size, so the sincos table is made once, not at every step.
#[derive(Default)]
pub struct PosEmbedCache(std::sync::Mutex<Option<((usize, usize), Tensor)>>);

impl PosEmbedCache {
    /// [`sincos_pos_embed_2d`] for an `h × w` grid, from the cache when the grid is the last one.
    pub fn get(
        &self,
        dim: usize,
        h: usize,
        w: usize,
        base_size: usize,
        interpolation_scale: f64,
        device: Device,
    ) -> Result<Tensor> {
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((size, t)) = last.as_ref() {
            if *size == (h, w) {
                return Ok(t.clone());
            }
        }
        let t = sincos_pos_embed_2d(dim, h, w, base_size, interpolation_scale, device)?;
        *last = Some(((h, w), t.clone()));
        Ok(t)
    }
}

/// diffusers' `Attention` with the default processor: q/k/v projections (fused into one GEMM
/// at load: q·k·v for self-attention, k·v for cross-attention), heads, an optional additive mask,
/// and `to_out.0`. The heads are read straight out of the fused projection.
pub struct Attention {
    /// Self-attention: `[3D, D]` (q, k, v stacked). Cross-attention: `to_q` `[D, D]`.
    pub to_q_or_qkv: Linear,
    /// Cross-attention only: `[2D, context]` (k, v stacked).
    pub to_kv: Option<Linear>,
    pub to_out: Linear,
    pub heads: usize,
    pub dim: usize,
}

/// Stacks linears along their output axis into one named `name`.
fn stack(name: String, parts: &[&Linear]) -> Result<Linear> {
    let ws: Vec<&Tensor> = parts.iter().map(|l| &l.weight).collect();
    let bias = if parts.iter().all(|l| l.bias.is_some()) {
        let bs: Vec<&Tensor> = parts.iter().filter_map(|l| l.bias.as_ref()).collect();
        Some(ditflow_plugin::ops::concat(&bs, 0)?)
    } else {
        None
    };
    Ok(Linear {
        name,
        weight: ditflow_plugin::ops::concat(&ws, 0)?,
        bias,
    })
}

impl Attention {
    /// `cross`: the keys and values come from a context (`forward` must be given one).
    pub fn load(
        w: &Weights,
        prefix: &str,
        dim: usize,
        context_dim: usize,
        heads: usize,
        bias: bool,
        cross: bool,
    ) -> Result<Attention> {
        let q = w.linear(&format!("{prefix}.to_q"), dim, dim, bias)?;
        let k = w.linear(&format!("{prefix}.to_k"), context_dim, dim, bias)?;
        let v = w.linear(&format!("{prefix}.to_v"), context_dim, dim, bias)?;
        if heads == 0 || dim % heads != 0 {
            return Err(Error(format!(
                "{}: {prefix}: {dim} channels do not split into {heads} heads",
                w.dir.display()
            )));
        }
        if !cross && context_dim != dim {
            return Err(Error(format!(
                "{}: {prefix}: self-attention with a context width {context_dim}",
                w.dir.display()
            )));
        }
        Ok(Attention {
            to_q_or_qkv: if cross {
                q
            } else {
                stack(format!("{prefix}.to_qkv"), &[&q, &k, &v])?
            },
            to_kv: if cross {
                Some(stack(format!("{prefix}.to_kv"), &[&k, &v])?)
            } else {
                None
            },
            to_out: w.linear(&format!("{prefix}.to_out.0"), dim, dim, true)?,
            heads,
            dim,
        })
    }

    /// Attention of `x` `[B, Lq, D]` over `context` (or itself) with an additive `mask`
    /// broadcasting to `[B, H, Lq, Lk]`.
    pub fn forward(
        &self,
        x: &Tensor,
        context: Option<&Tensor>,
        mask: Option<&Tensor>,
        deltas: &LinearDeltas,
    ) -> Result<Tensor> {
        match context {
            None if self.to_kv.is_none() => {
                let d = self.dim;
                let qkv = self.to_q_or_qkv.apply(x, "none", deltas)?;
                let o = ditflow_plugin::ops::attention_fused(
                    &qkv,
                    &qkv,
                    mask,
                    self.heads,
                    d / self.heads,
                    [0, d, 2 * d],
                    None,
                )?;
                self.to_out.apply(&o, "none", deltas)
            }
            Some(ctx) if self.to_kv.is_some() => {
                self.forward_kv(x, &self.context_kv(ctx, deltas)?, mask, deltas)
            }
            _ => Err(Error::new(
                "an attention layer was called with the wrong kind of context",
            )),
        }
    }

    /// Cross-attention's keys and values of a context, `[B, Lk, 2D]`: constant over sampling
    /// steps, so a sampler computes them once.
    pub fn context_kv(&self, context: &Tensor, deltas: &LinearDeltas) -> Result<Tensor> {
        let to_kv = self
            .to_kv
            .as_ref()
            .ok_or_else(|| Error::new("self-attention has no context"))?;
        to_kv.apply(context, "none", deltas)
    }

    /// Cross-attention of `x` over keys and values from [`Attention::context_kv`].
    pub fn forward_kv(
        &self,
        x: &Tensor,
        kv: &Tensor,
        mask: Option<&Tensor>,
        deltas: &LinearDeltas,
    ) -> Result<Tensor> {
        let d = self.dim;
        let q = self.to_q_or_qkv.apply(x, "none", deltas)?;
        let o = ditflow_plugin::ops::attention_fused(
            &q,
            kv,
            mask,
            self.heads,
            d / self.heads,
            [0, 0, d],
            None,
        )?;
        self.to_out.apply(&o, "none", deltas)
    }
}

/// diffusers' `FeedForward` with a GELU input projection (`ff.net.0.proj`, `ff.net.2`).
pub struct FeedForward {
    pub proj_in: Linear,
    pub proj_out: Linear,
    pub activation: &'static str,
}

impl FeedForward {
    pub fn load(
        w: &Weights,
        prefix: &str,
        dim: usize,
        mult: usize,
        activation_fn: &str,
    ) -> Result<FeedForward> {
        let activation = match activation_fn {
            "gelu-approximate" => "gelu_tanh",
            "gelu" => "gelu",
            other => {
                return Err(Error(format!(
                    "{}: activation_fn \"{other}\" is not supported",
                    w.dir.display()
                )))
            }
        };
        Ok(FeedForward {
            proj_in: w.linear(&format!("{prefix}.net.0.proj"), dim, dim * mult, true)?,
            proj_out: w.linear(&format!("{prefix}.net.2"), dim * mult, dim, true)?,
            activation,
        })
    }

    pub fn forward(&self, x: &Tensor, d: &LinearDeltas) -> Result<Tensor> {
        self.proj_out
            .apply(&self.proj_in.apply(x, self.activation, d)?, "none", d)
    }
}

/// `(B, H/p, W/p)` of latents `[B, in_channels, H, W]` whose sides are multiples of the patch
/// size `p`; an error naming `model` otherwise.
pub fn patch_grid(
    model: &str,
    x: &Tensor,
    in_channels: usize,
    patch: usize,
) -> Result<(usize, usize, usize)> {
    let s = x.shape();
    if s.len() != 4 || s[1] != in_channels || s[2] % patch != 0 || s[3] % patch != 0 {
        return Err(Error(format!(
            "{model}: hidden_states must be [B, {in_channels}, H, W] with H and W multiples of {patch}, got {s:?}"
        )));
    }
    Ok((s[0], s[2] / patch, s[3] / patch))
}

/// diffusers' `PatchEmbed` convolution: `[B, C, H, W]` → `[B, (H/p)·(W/p), D]` (no position
/// embedding; the caller adds it).
pub fn patchify(x: &Tensor, proj_w: &Tensor, proj_b: &Tensor, patch: usize) -> Result<Tensor> {
    let y = x.conv(proj_w, Some(proj_b), &[patch], &[0], 1)?;
    let s = y.shape().to_vec();
    y.reshape(&[s[0] as i64, s[1] as i64, -1])?
        .permute(&[0, 2, 1])
}

/// `[B, h·w, p·p·C]` → `[B, C, h·p, w·p]` (diffusers' `nhwpqc->nchpwq`).
pub fn unpatchify(x: &Tensor, h: usize, w: usize, patch: usize, channels: usize) -> Result<Tensor> {
    let b = x.shape()[0] as i64;
    let (h, w, p, c) = (h as i64, w as i64, patch as i64, channels as i64);
    x.reshape(&[b, h, w, p, p, c])?
        .permute(&[0, 5, 1, 3, 2, 4])?
        .reshape(&[b, c, h * p, w * p])
}

/// Splits `[B, n·D]` (or `[B, n, D]`) into `n` tensors `[B, 1, D]`: diffusers' `chunk(n)` of an
/// adaLN modulation, shaped to broadcast over tokens.
pub fn chunks(x: &Tensor, n: usize, d: usize) -> Result<Vec<Tensor>> {
    let b = x.shape()[0] as i64;
    x.reshape(&[b, n as i64, d as i64])?.split(1, &vec![1; n])
}

/// A padding mask `[B, L]` of 1 (keep) and 0 (drop) as diffusers' additive bias
/// `(1 - mask)·-10000`, shaped `[B, 1, 1, L]`.
pub fn mask_bias(mask: &Tensor) -> Result<Tensor> {
    let s = mask.shape().to_vec();
    if s.len() != 2 {
        return Err(Error(format!(
            "an attention mask must be [batch, tokens], got {s:?}"
        )));
    }
    mask.cast(DType::F32)?
        .affine(10000.0, -10000.0)?
        .reshape(&[s[0] as i64, 1, 1, s[1] as i64])
}

/// `torch.nn.Conv2d` with square kernels, symmetric padding and an optional stride.
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: usize,
}

impl Conv2d {
    /// Loads `prefix.weight` `[out, in, k, k]` (and `prefix.bias`).
    pub fn load(
        w: &Weights,
        prefix: &str,
        input: usize,
        output: usize,
        k: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Conv2d> {
        Ok(Conv2d {
            weight: w.get(&format!("{prefix}.weight"), &[output, input, k, k])?,
            bias: Some(w.get(&format!("{prefix}.bias"), &[output])?),
            stride,
            padding,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.conv(
            &self.weight,
            self.bias.as_ref(),
            &[self.stride],
            &[self.padding],
            1,
        )
    }
}

/// `torch.nn.GroupNorm` with its affine, and an activation fused after it.
pub struct GroupNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub groups: usize,
    pub eps: f32,
}

impl GroupNorm {
    pub fn load(
        w: &Weights,
        prefix: &str,
        channels: usize,
        groups: usize,
        eps: f32,
    ) -> Result<GroupNorm> {
        if groups == 0 || channels % groups != 0 {
            return Err(Error(format!(
                "{}: {prefix}: {channels} channels do not split into {groups} groups",
                w.dir.display()
            )));
        }
        Ok(GroupNorm {
            weight: w.get(&format!("{prefix}.weight"), &[channels])?,
            bias: w.get(&format!("{prefix}.bias"), &[channels])?,
            groups,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor, activation: &str) -> Result<Tensor> {
        x.group_norm(
            self.groups,
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            activation,
        )
    }
}
