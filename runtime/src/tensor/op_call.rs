//! Ops by name, with typed attributes: the form in which plugins (Rust or C) call the engine
//! through the host API. New ops need no ABI change, only a new name here.
//!
//! Every op's inputs, outputs and attributes are listed in [`OPS`]; unknown ops and unknown or
//! mistyped attributes are errors that name the op.

use super::ops::{self, invalid, Binary, OpError, Reduce, Unary, Upsample};
use super::{DType, Device, Tensor};
use crate::kernels::cpu::Activation;

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    Int(i64),
    Float(f64),
    Ints(Vec<i64>),
    Str(String),
}

/// Named attributes of one call.
#[derive(Clone, Debug, Default)]
pub struct Attrs(pub Vec<(String, Attr)>);

impl Attrs {
    fn get(&self, name: &str) -> Option<&Attr> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, a)| a)
    }

    fn int(&self, op: &'static str, name: &str, default: Option<i64>) -> Result<i64, OpError> {
        match self.get(name) {
            Some(Attr::Int(v)) => Ok(*v),
            Some(other) => Err(invalid(
                op,
                format!("attribute '{name}' must be an int, got {other:?}"),
            )),
            None => default.ok_or_else(|| invalid(op, format!("missing attribute '{name}'"))),
        }
    }

    fn usize(
        &self,
        op: &'static str,
        name: &str,
        default: Option<usize>,
    ) -> Result<usize, OpError> {
        let v = self.int(op, name, default.map(|d| d as i64))?;
        usize::try_from(v)
            .map_err(|_| invalid(op, format!("attribute '{name}' must be >= 0, got {v}")))
    }

    fn float(&self, op: &'static str, name: &str, default: Option<f64>) -> Result<f64, OpError> {
        match self.get(name) {
            Some(Attr::Float(v)) => Ok(*v),
            Some(Attr::Int(v)) => Ok(*v as f64),
            Some(other) => Err(invalid(
                op,
                format!("attribute '{name}' must be a float, got {other:?}"),
            )),
            None => default.ok_or_else(|| invalid(op, format!("missing attribute '{name}'"))),
        }
    }

    fn ints(
        &self,
        op: &'static str,
        name: &str,
        default: Option<Vec<i64>>,
    ) -> Result<Vec<i64>, OpError> {
        match self.get(name) {
            Some(Attr::Ints(v)) => Ok(v.clone()),
            Some(Attr::Int(v)) => Ok(vec![*v]),
            Some(other) => Err(invalid(
                op,
                format!("attribute '{name}' must be a list of ints, got {other:?}"),
            )),
            None => default.ok_or_else(|| invalid(op, format!("missing attribute '{name}'"))),
        }
    }

    fn usizes(&self, op: &'static str, name: &str) -> Result<Vec<usize>, OpError> {
        self.ints(op, name, Some(Vec::new()))?
            .into_iter()
            .map(|v| {
                usize::try_from(v)
                    .map_err(|_| invalid(op, format!("attribute '{name}' must be >= 0")))
            })
            .collect()
    }

    fn str<'a>(
        &'a self,
        op: &'static str,
        name: &str,
        default: &'a str,
    ) -> Result<&'a str, OpError> {
        match self.get(name) {
            Some(Attr::Str(s)) => Ok(s),
            Some(other) => Err(invalid(
                op,
                format!("attribute '{name}' must be a string, got {other:?}"),
            )),
            None => Ok(default),
        }
    }
}

/// One op's signature: inputs (a trailing `?` marks optional ones) and attributes.
pub struct OpSig {
    pub name: &'static str,
    pub inputs: &'static [&'static str],
    pub attrs: &'static [&'static str],
    pub doc: &'static str,
}

/// Every op callable by name.
pub const OPS: &[OpSig] = &[
    OpSig {
        name: "cast",
        inputs: &["x"],
        attrs: &["dtype"],
        doc: "convert to dtype (f32, f16, bf16, i64, i32, u8)",
    },
    OpSig {
        name: "to_device",
        inputs: &["x"],
        attrs: &["device"],
        doc: "copy to cpu or cuda:N",
    },
    OpSig {
        name: "randn",
        inputs: &[],
        attrs: &["shape", "seed", "stream", "device"],
        doc:
            "seeded standard-normal f32 noise (Philox), from one of the seed's streams (0 default)",
    },
    OpSig {
        name: "matmul",
        inputs: &["a", "b"],
        attrs: &["trans_a", "trans_b"],
        doc: "batched op(a)·op(b) over the last two axes",
    },
    OpSig {
        name: "linear",
        inputs: &["x", "weight", "bias?"],
        attrs: &["activation"],
        doc: "x·wᵀ + bias, then an activation",
    },
    OpSig {
        name: "linear_split",
        inputs: &["x", "weight", "bias?"],
        attrs: &["activation", "parts"],
        doc: "linear, with its output columns as `parts` separate tensors (several outputs)",
    },
    OpSig {
        name: "conv",
        inputs: &["x", "weight", "bias?"],
        attrs: &["stride", "padding", "dilation", "groups"],
        doc: "1-, 2- or 3-D convolution",
    },
    OpSig {
        name: "layer_norm",
        inputs: &["x", "weight?", "bias?", "shift?", "scale?"],
        attrs: &["eps"],
        doc: "layer norm, then ·(1+scale)+shift (adaLN)",
    },
    OpSig {
        name: "rms_norm",
        inputs: &["x", "weight?"],
        attrs: &["eps"],
        doc: "RMS norm over the last axis",
    },
    OpSig {
        name: "group_norm",
        inputs: &["x", "weight?", "bias?"],
        attrs: &["groups", "eps", "activation"],
        doc: "group norm, affine, activation",
    },
    OpSig {
        name: "softmax",
        inputs: &["x"],
        attrs: &["axis"],
        doc: "softmax along an axis",
    },
    OpSig {
        name: "attention",
        inputs: &["q", "k", "v", "mask?"],
        attrs: &["scale"],
        doc: "blockwise scaled-dot-product attention",
    },
    OpSig {
        name: "attention_fused",
        inputs: &["q_src", "kv_src", "mask?", "v_src?"],
        attrs: &[
            "heads", "head_dim", "q_offset", "k_offset", "v_offset", "scale",
        ],
        doc: "multi-head attention reading heads from [B, L, C] projections, writing [B, L, H·D]",
    },
    OpSig {
        name: "rope_tables",
        inputs: &["positions"],
        attrs: &["dims", "theta"],
        doc: "RoPE cos and sin tables for 1-3 axes",
    },
    OpSig {
        name: "rope",
        inputs: &["x", "cos", "sin"],
        attrs: &["interleaved", "heads"],
        doc: "rotary position embedding (of `heads` heads side by side in x's last axis)",
    },
    OpSig {
        name: "unary",
        inputs: &["x"],
        attrs: &["fn"],
        doc: "neg exp log sqrt rsqrt abs tanh sigmoid square sin cos gelu gelu_tanh silu relu",
    },
    OpSig {
        name: "activation",
        inputs: &["x"],
        attrs: &["fn"],
        doc: "gelu, gelu_tanh, silu or relu",
    },
    OpSig {
        name: "binary",
        inputs: &["a", "b"],
        attrs: &["fn"],
        doc: "add sub mul div maximum minimum pow, broadcasting",
    },
    OpSig {
        name: "affine",
        inputs: &["x"],
        attrs: &["mul", "add"],
        doc: "x·mul + add",
    },
    OpSig {
        name: "gated_residual",
        inputs: &["x", "y", "gate"],
        attrs: &[],
        doc: "x + gate ⊙ y (adaLN)",
    },
    OpSig {
        name: "reduce",
        inputs: &["x"],
        attrs: &["fn", "axes", "keepdim"],
        doc: "sum, mean, max or min over axes",
    },
    OpSig {
        name: "reshape",
        inputs: &["x"],
        attrs: &["shape"],
        doc: "same data, new shape (one -1 allowed)",
    },
    OpSig {
        name: "permute",
        inputs: &["x"],
        attrs: &["perm"],
        doc: "reorder axes",
    },
    OpSig {
        name: "concat",
        inputs: &["xs..."],
        attrs: &["axis"],
        doc: "join along an axis",
    },
    OpSig {
        name: "split",
        inputs: &["x"],
        attrs: &["axis", "sizes"],
        doc: "split along an axis (several outputs)",
    },
    OpSig {
        name: "slice",
        inputs: &["x"],
        attrs: &["axis", "start", "end", "step"],
        doc: "x[start:end:step] along an axis",
    },
    OpSig {
        name: "upsample",
        inputs: &["x"],
        attrs: &["size", "mode", "align_corners"],
        doc: "nearest or bilinear resize of [.., H, W]",
    },
    OpSig {
        name: "embedding",
        inputs: &["table", "ids"],
        attrs: &[],
        doc: "gather rows of a table",
    },
    OpSig {
        name: "topk",
        inputs: &["x"],
        attrs: &["k"],
        doc: "the k largest along the last axis, descending: values and i64 indices (two outputs)",
    },
    OpSig {
        name: "index_add",
        inputs: &["x", "index", "src"],
        attrs: &[],
        doc: "x [M, D] with the rows of src [R, D] added at rows index [R]",
    },
];

fn parse_dtype(op: &'static str, s: &str) -> Result<DType, OpError> {
    Ok(match s {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        "i64" => DType::I64,
        "i32" => DType::I32,
        "u8" => DType::U8,
        other => return Err(invalid(op, format!("unknown dtype '{other}'"))),
    })
}

fn parse_device(op: &'static str, s: &str) -> Result<Device, OpError> {
    match s.parse::<super::device::DeviceRequest>() {
        Ok(super::device::DeviceRequest::Exactly(d)) => Ok(d),
        Ok(super::device::DeviceRequest::Auto) => {
            Device::resolve(super::device::DeviceRequest::Auto)
                .map(|(d, _)| d)
                .map_err(OpError::Device)
        }
        Err(e) => Err(invalid(op, e)),
    }
}

/// Per-op call counts and time, gathered when `DITFLOW_PROFILE` is set (see [`profile`]).
pub mod profile {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};

    static ON: OnceLock<bool> = OnceLock::new();
    static TABLE: Mutex<Option<HashMap<&'static str, (u64, f64)>>> = Mutex::new(None);

    pub fn enabled() -> bool {
        *ON.get_or_init(|| std::env::var_os("DITFLOW_PROFILE").is_some())
    }

    pub(super) fn record(op: &'static str, seconds: f64) {
        let mut t = TABLE.lock().unwrap_or_else(|p| p.into_inner());
        let e = t.get_or_insert_with(HashMap::new).entry(op).or_default();
        e.0 += 1;
        e.1 += seconds;
    }

    /// Forgets what was gathered so far (a benchmark's warm-up).
    pub fn reset() {
        *TABLE.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// `(op, calls, seconds)`, slowest first.
    pub fn report() -> Vec<(&'static str, u64, f64)> {
        let t = TABLE.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = t.iter().flatten().map(|(k, (n, s))| (*k, *n, *s)).collect();
        v.sort_by(|a, b| b.2.total_cmp(&a.2));
        v
    }
}

/// Runs op `name` on `inputs` (None for an absent optional input).
pub fn call(name: &str, inputs: &[Option<&Tensor>], attrs: &Attrs) -> Result<Vec<Tensor>, OpError> {
    if !profile::enabled() {
        return call_op(name, inputs, attrs);
    }
    let t = std::time::Instant::now();
    let r = call_op(name, inputs, attrs);
    if let Some(sig) = OPS.iter().find(|s| s.name == name) {
        profile::record(sig.name, t.elapsed().as_secs_f64());
    }
    r
}

fn call_op(name: &str, inputs: &[Option<&Tensor>], attrs: &Attrs) -> Result<Vec<Tensor>, OpError> {
    let sig = OPS
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| OpError::Invalid {
            op: "call",
            msg: format!("unknown op '{name}'"),
        })?;
    let op = sig.name;
    for (n, _) in &attrs.0 {
        if !sig.attrs.contains(&n.as_str()) {
            return Err(invalid(
                op,
                format!("unknown attribute '{n}' (expected one of {:?})", sig.attrs),
            ));
        }
    }
    let variadic = sig.inputs.first().is_some_and(|i| i.ends_with("..."));
    if !variadic {
        if inputs.len() > sig.inputs.len() {
            return Err(invalid(
                op,
                format!(
                    "takes at most {} inputs, got {}",
                    sig.inputs.len(),
                    inputs.len()
                ),
            ));
        }
        for (i, spec) in sig.inputs.iter().enumerate() {
            if !spec.ends_with('?') && inputs.get(i).copied().flatten().is_none() {
                return Err(invalid(op, format!("input '{spec}' is required")));
            }
        }
    }
    let input = |i: usize| inputs.get(i).copied().flatten();
    let req = |i: usize| input(i).expect("checked above");
    let activation = |attr: &str| -> Result<Activation, OpError> {
        let s = attrs.str(op, attr, "none")?;
        Activation::parse(s).ok_or_else(|| invalid(op, format!("unknown activation '{s}'")))
    };
    let one = |t: Tensor| Ok(vec![t]);
    match op {
        "cast" => one(ops::cast(
            req(0),
            parse_dtype(op, attrs.str(op, "dtype", "f32")?)?,
        )?),
        "to_device" => one(req(0).to_device(parse_device(op, attrs.str(op, "device", "cpu")?)?)?),
        "randn" => {
            let shape = attrs.usizes(op, "shape")?;
            let seed = attrs.int(op, "seed", Some(0))? as u64;
            let stream = attrs.int(op, "stream", Some(0))? as u64;
            one(ops::randn_stream(
                &shape,
                seed,
                stream,
                parse_device(op, attrs.str(op, "device", "cpu")?)?,
            )?)
        }
        "matmul" => one(ops::matmul(
            req(0),
            req(1),
            attrs.int(op, "trans_a", Some(0))? != 0,
            attrs.int(op, "trans_b", Some(0))? != 0,
        )?),
        "linear" => one(ops::linear(
            req(0),
            req(1),
            input(2),
            activation("activation")?,
        )?),
        "linear_split" => ops::linear_split(
            req(0),
            req(1),
            input(2),
            activation("activation")?,
            attrs.usize(op, "parts", None)?,
        ),
        "conv" => one(ops::conv(
            req(0),
            req(1),
            input(2),
            &attrs.usizes(op, "stride")?,
            &attrs.usizes(op, "padding")?,
            &attrs.usizes(op, "dilation")?,
            attrs.usize(op, "groups", Some(1))?,
        )?),
        "layer_norm" => one(ops::layer_norm(
            req(0),
            ops::LayerNorm {
                weight: input(1),
                bias: input(2),
                shift: input(3),
                scale: input(4),
                eps: attrs.float(op, "eps", Some(1e-5))? as f32,
            },
        )?),
        "rms_norm" => one(ops::rms_norm(
            req(0),
            input(1),
            attrs.float(op, "eps", Some(1e-6))? as f32,
        )?),
        "group_norm" => one(ops::group_norm(
            req(0),
            attrs.usize(op, "groups", None)?,
            input(1),
            input(2),
            attrs.float(op, "eps", Some(1e-5))? as f32,
            activation("activation")?,
        )?),
        "softmax" => one(ops::softmax(req(0), attrs.int(op, "axis", Some(-1))?)?),
        "attention" => {
            let scale = attrs
                .get("scale")
                .map(|_| attrs.float(op, "scale", None))
                .transpose()?;
            one(ops::attention(
                req(0),
                req(1),
                req(2),
                input(3),
                scale.map(|s| s as f32),
            )?)
        }
        "attention_fused" => {
            let scale = attrs
                .get("scale")
                .map(|_| attrs.float(op, "scale", None))
                .transpose()?;
            let offsets = [
                attrs.usize(op, "q_offset", Some(0))?,
                attrs.usize(op, "k_offset", Some(0))?,
                attrs.usize(op, "v_offset", None)?,
            ];
            one(ops::attention_fused(
                req(0),
                req(1),
                input(3),
                input(2),
                attrs.usize(op, "heads", None)?,
                attrs.usize(op, "head_dim", None)?,
                offsets,
                scale.map(|s| s as f32),
            )?)
        }
        "rope_tables" => {
            let dims = attrs.usizes(op, "dims")?;
            let (c, s) = ops::rope_tables(
                req(0),
                &dims,
                attrs.float(op, "theta", Some(10000.0))?,
                req(0).device(),
            )?;
            Ok(vec![c, s])
        }
        "rope" => {
            let heads = attrs.int(op, "heads", Some(1))?;
            if heads < 1 {
                return Err(invalid(
                    op,
                    format!("heads must be at least 1, got {heads}"),
                ));
            }
            one(ops::rope_heads(
                req(0),
                req(1),
                req(2),
                attrs.int(op, "interleaved", Some(1))? != 0,
                heads as usize,
            )?)
        }
        "unary" | "activation" => {
            let f = attrs.str(op, "fn", "")?;
            let u =
                Unary::parse(f).ok_or_else(|| invalid(op, format!("unknown function '{f}'")))?;
            if op == "activation" && !matches!(u, Unary::Act(_)) {
                return Err(invalid(op, format!("'{f}' is not an activation")));
            }
            one(ops::unary(req(0), u)?)
        }
        "binary" => {
            let f = attrs.str(op, "fn", "")?;
            let b =
                Binary::parse(f).ok_or_else(|| invalid(op, format!("unknown function '{f}'")))?;
            one(ops::binary(req(0), req(1), b)?)
        }
        "affine" => one(ops::affine(
            req(0),
            attrs.float(op, "mul", Some(1.0))? as f32,
            attrs.float(op, "add", Some(0.0))? as f32,
        )?),
        "gated_residual" => one(ops::gated_residual(req(0), req(1), req(2))?),
        "reduce" => {
            let f = attrs.str(op, "fn", "sum")?;
            let r =
                Reduce::parse(f).ok_or_else(|| invalid(op, format!("unknown reduction '{f}'")))?;
            one(ops::reduce(
                req(0),
                &attrs.ints(op, "axes", Some(Vec::new()))?,
                attrs.int(op, "keepdim", Some(0))? != 0,
                r,
            )?)
        }
        "reshape" => one(ops::reshape(req(0), &attrs.ints(op, "shape", None)?)?),
        "permute" => one(ops::permute(req(0), &attrs.usizes(op, "perm")?)?),
        "concat" => {
            let xs = inputs
                .iter()
                .map(|t| t.ok_or_else(|| invalid(op, "a NULL input")))
                .collect::<Result<Vec<_>, _>>()?;
            one(ops::concat(&xs, attrs.int(op, "axis", Some(0))?)?)
        }
        "split" => ops::split(
            req(0),
            attrs.int(op, "axis", Some(0))?,
            &attrs.usizes(op, "sizes")?,
        ),
        "slice" => one(ops::slice(
            req(0),
            attrs.int(op, "axis", Some(0))?,
            attrs.int(op, "start", Some(0))?,
            attrs.int(op, "end", Some(i64::MAX))?,
            attrs.usize(op, "step", Some(1))?,
        )?),
        "upsample" => {
            let size = attrs.usizes(op, "size")?;
            let [h, w] = size[..] else {
                return Err(invalid(op, "attribute 'size' must be [height, width]"));
            };
            let mode = match attrs.str(op, "mode", "nearest")? {
                "nearest" => Upsample::Nearest,
                "bilinear" => Upsample::Bilinear {
                    align_corners: attrs.int(op, "align_corners", Some(0))? != 0,
                },
                other => return Err(invalid(op, format!("unknown mode '{other}'"))),
            };
            one(ops::upsample2d(req(0), (h, w), mode)?)
        }
        "embedding" => one(ops::embedding(req(0), req(1))?),
        "topk" => ops::topk(req(0), attrs.usize(op, "k", None)?),
        "index_add" => one(ops::index_add(req(0), req(1), req(2))?),
        _ => unreachable!("every op in OPS is handled"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_by_name_and_rejects_bad_attributes() {
        let x = Tensor::from_f32(&[2, 3], &[1., 2., 3., 4., 5., 6.]).unwrap();
        let out = call(
            "reduce",
            &[Some(&x)],
            &Attrs(vec![
                ("axes".into(), Attr::Ints(vec![1])),
                ("fn".into(), Attr::Str("sum".into())),
            ]),
        )
        .unwrap();
        assert_eq!(out[0].as_f32(), &[6.0, 15.0]);
        let err = call(
            "reduce",
            &[Some(&x)],
            &Attrs(vec![("axis".into(), Attr::Int(1))]),
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("unknown attribute 'axis'"),
            "{err}"
        );
        assert!(call("nope", &[], &Attrs::default())
            .unwrap_err()
            .to_string()
            .contains("unknown op 'nope'"));
        assert!(call("linear", &[Some(&x)], &Attrs::default())
            .unwrap_err()
            .to_string()
            .contains("'weight' is required"));
        let parts = call(
            "split",
            &[Some(&x)],
            &Attrs(vec![
                ("axis".into(), Attr::Int(1)),
                ("sizes".into(), Attr::Ints(vec![1, 2])),
            ]),
        )
        .unwrap();
        assert_eq!(parts[1].as_f32(), &[2., 3., 5., 6.]);
    }
}
