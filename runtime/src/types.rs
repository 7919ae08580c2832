//! Port types: parsing type expressions (`Tensor<f32, 4>`, `List<Int>`), link compatibility, and
//! turning graph constants into typed values.

use crate::graph::ir::Const;
use crate::tensor::DType;
use crate::value::{TensorKind, Value};

/// The type of a port or graph input.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PortType {
    Int,
    Float,
    Bool,
    String,
    /// A tensor-like type with optional dtype and rank constraints.
    Tensor {
        kind: TensorKind,
        dtype: Option<DType>,
        rank: Option<usize>,
    },
    /// A Model; `Some(interface)` (`DF_INTERFACE_*`) for `Model<Denoiser>`,
    /// `Model<TextEncoder>` or `Model<Autoencoder>`, `None` for any Model.
    Model(Option<u32>),
    List(Box<PortType>),
    Any,
}

fn parse_dtype(s: &str) -> Option<DType> {
    Some(match s {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        "i64" => DType::I64,
        "i32" => DType::I32,
        "u8" => DType::U8,
        _ => return None,
    })
}

const KIND_NAMES: [(&str, TensorKind); 6] = [
    ("Tensor", TensorKind::Tensor),
    ("Latent", TensorKind::Latent),
    ("Conditioning", TensorKind::Conditioning),
    ("Image", TensorKind::Image),
    ("Audio", TensorKind::Audio),
    ("Video", TensorKind::Video),
];

/// The model interfaces a `Model<...>` type names.
pub const MODEL_INTERFACES: [(&str, u32); 3] = [
    ("Denoiser", ditflow_plugin::abi::DF_INTERFACE_DENOISER),
    (
        "TextEncoder",
        ditflow_plugin::abi::DF_INTERFACE_TEXT_ENCODER,
    ),
    ("Autoencoder", ditflow_plugin::abi::DF_INTERFACE_AUTOENCODER),
];

/// The type names a user can write.
pub const TYPE_NAMES: [&str; 14] = [
    "Int",
    "Float",
    "Bool",
    "String",
    "Tensor",
    "Latent",
    "Conditioning",
    "Image",
    "Audio",
    "Video",
    "Model",
    "List",
    "Any",
    "Tensor<f32, 4>",
];

impl PortType {
    /// Parses a type expression: `Int`, `Tensor<f32>`, `Tensor<f32, 4>`, `Tensor<*, 3>`,
    /// `Latent`, `List<Float>`, `Any`...
    pub fn parse(expr: &str) -> Result<PortType, String> {
        let e = expr.trim();
        let (head, args) = match e.find('<') {
            Some(i) if e.ends_with('>') => (e[..i].trim(), Some(&e[i + 1..e.len() - 1])),
            Some(_) => return Err(format!("malformed type '{expr}': missing '>'")),
            None => (e, None),
        };
        let simple = |t: PortType| match args {
            None => Ok(t),
            Some(_) => Err(format!("type '{head}' takes no parameters")),
        };
        match head {
            "Int" => simple(PortType::Int),
            "Float" => simple(PortType::Float),
            "Bool" => simple(PortType::Bool),
            "String" => simple(PortType::String),
            "Model" => match args.map(str::trim) {
                None => Ok(PortType::Model(None)),
                Some(name) => MODEL_INTERFACES
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|&(_, i)| PortType::Model(Some(i)))
                    .ok_or_else(|| {
                        format!(
                            "unknown model interface '{name}' (Denoiser, TextEncoder, Autoencoder){}",
                            crate::graph::diag::did_you_mean(
                                name,
                                MODEL_INTERFACES.iter().map(|(n, _)| *n)
                            )
                        )
                    }),
            },
            "Any" => simple(PortType::Any),
            "List" => match args {
                Some(inner) => Ok(PortType::List(Box::new(PortType::parse(inner)?))),
                None => Ok(PortType::List(Box::new(PortType::Any))),
            },
            _ => {
                let Some(&(_, kind)) = KIND_NAMES.iter().find(|(n, _)| *n == head) else {
                    let hint = crate::graph::diag::did_you_mean(head, TYPE_NAMES);
                    return Err(format!("unknown type '{head}'{hint}"));
                };
                let (mut dtype, mut rank) = (None, None);
                if let Some(args) = args {
                    let parts: Vec<&str> = args.split(',').map(str::trim).collect();
                    if parts.len() > 2 {
                        return Err(format!(
                            "'{expr}': a tensor type takes at most a dtype and a rank"
                        ));
                    }
                    if parts[0] != "*" {
                        dtype = Some(parse_dtype(parts[0]).ok_or_else(|| {
                            format!(
                                "'{expr}': unknown dtype '{}' (f32, f16, bf16, i64, i32, u8)",
                                parts[0]
                            )
                        })?);
                    }
                    if let Some(r) = parts.get(1) {
                        rank = Some(
                            r.parse()
                                .map_err(|_| format!("'{expr}': rank '{r}' is not a number"))?,
                        );
                    }
                }
                Ok(PortType::Tensor { kind, dtype, rank })
            }
        }
    }

    /// Whether a link from an output of type `from` may feed a port of this type.
    pub fn accepts(&self, from: &PortType) -> bool {
        match (self, from) {
            (PortType::Any, _) | (_, PortType::Any) => true,
            (PortType::Float, PortType::Int) => true,
            (
                PortType::Tensor {
                    kind: k1,
                    dtype: d1,
                    rank: r1,
                },
                PortType::Tensor {
                    kind: k2,
                    dtype: d2,
                    rank: r2,
                },
            ) => {
                k1 == k2
                    && (d1.is_none() || d2.is_none() || d1 == d2)
                    && (r1.is_none() || r2.is_none() || r1 == r2)
            }
            (PortType::List(a), PortType::List(b)) => a.accepts(b),
            // A plain Model may hold any interface: it is checked when the value arrives.
            (PortType::Model(want), PortType::Model(have)) => {
                want.is_none() || have.is_none() || want == have
            }
            (a, b) => a == b,
        }
    }

    /// Whether this type can hold a constant string (so `out.png` is text, not a link).
    pub fn takes_text(&self) -> bool {
        matches!(self, PortType::String | PortType::Any)
    }

    /// Whether a value of this type can be written as a constant in a graph.
    pub fn is_constant_type(&self) -> bool {
        match self {
            PortType::Int | PortType::Float | PortType::Bool | PortType::String | PortType::Any => {
                true
            }
            PortType::List(inner) => inner.is_constant_type(),
            _ => false,
        }
    }

    /// Converts a graph constant into a value of this type.
    pub fn value_from_const(&self, c: &Const) -> Result<Value, String> {
        let mismatch = || format!("expects {self}, got {}", c.describe());
        match (self, c) {
            (PortType::Int, Const::Int(i)) => Ok(Value::Int(*i)),
            (PortType::Float, Const::Int(i)) => Ok(Value::Float(*i as f64)),
            (PortType::Float, Const::Float(f)) => Ok(Value::Float(*f)),
            (PortType::Bool, Const::Bool(b)) => Ok(Value::Bool(*b)),
            (PortType::String, Const::String(s)) => Ok(Value::string(s)),
            (PortType::List(inner), Const::List(items)) => items
                .iter()
                .enumerate()
                .map(|(i, item)| {
                    inner
                        .value_from_const(item)
                        .map_err(|e| format!("item {i}: {e}"))
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Value::list),
            (PortType::Any, c) => any_from_const(c).ok_or_else(mismatch),
            _ if !self.is_constant_type() => Err(format!(
                "expects {self}, which must come from a link, got {}",
                c.describe()
            )),
            _ => Err(mismatch()),
        }
    }

    /// Parses command-line text (`--set name=value`) as a value of this type.
    pub fn value_from_text(&self, text: &str) -> Result<Value, String> {
        let bad = || format!("'{text}' is not a valid {self}");
        match self {
            PortType::Int => text.trim().parse().map(Value::Int).map_err(|_| bad()),
            PortType::Float => text.trim().parse().map(Value::Float).map_err(|_| bad()),
            PortType::Bool => match text.trim() {
                "true" | "1" | "yes" => Ok(Value::Bool(true)),
                "false" | "0" | "no" => Ok(Value::Bool(false)),
                _ => Err(bad()),
            },
            PortType::String | PortType::Any => Ok(Value::string(text)),
            _ => Err(format!("a {self} cannot be set from the command line")),
        }
    }

    /// Whether `value` is of this type (checked on node outputs at run time).
    pub fn matches_value(&self, value: &Value) -> bool {
        match (self, value) {
            (PortType::Any, _) => true,
            (PortType::Int, Value::Int(_)) => true,
            (PortType::Float, Value::Float(_)) => true,
            (PortType::Bool, Value::Bool(_)) => true,
            (PortType::String, Value::String(_)) => true,
            (PortType::Model(want), Value::Object(o)) => want.is_none_or(|i| i == o.interface()),
            (PortType::Tensor { kind, dtype, rank }, Value::Tensor(k, t)) => {
                kind == k
                    && dtype.is_none_or(|d| d == t.dtype())
                    && rank.is_none_or(|r| r == t.shape().len())
            }
            // A Conditioning may also be a set of named tensors: `[name, tensor]` pairs (see
            // the SDK's `conditioning` module).
            (
                PortType::Tensor {
                    kind: TensorKind::Conditioning,
                    dtype: None,
                    rank: None,
                },
                Value::List(items),
            ) => items.iter().all(|pair| {
                matches!(&**pair, Value::List(p) if p.len() == 2
                    && matches!(&*p[0], Value::String(_))
                    && matches!(&*p[1], Value::Tensor(..)))
            }),
            // Audio and Video carry their rate: `[tensor, rate]` (see the SDK's `media`
            // module); a bare tensor has none.
            (
                PortType::Tensor {
                    kind: kind @ (TensorKind::Audio | TensorKind::Video),
                    dtype: None,
                    rank: None,
                },
                Value::List(items),
            ) => {
                items.len() == 2
                    && matches!(&*items[0], Value::Tensor(k, _) if k == kind)
                    && matches!(&*items[1], Value::Float(_))
            }
            (PortType::List(inner), Value::List(items)) => {
                items.iter().all(|v| inner.matches_value(v))
            }
            _ => false,
        }
    }
}

fn any_from_const(c: &Const) -> Option<Value> {
    Some(match c {
        Const::Null => return None,
        Const::Bool(b) => Value::Bool(*b),
        Const::Int(i) => Value::Int(*i),
        Const::Float(f) => Value::Float(*f),
        Const::String(s) => Value::string(s),
        Const::List(items) => Value::list(
            items
                .iter()
                .map(any_from_const)
                .collect::<Option<Vec<_>>>()?,
        ),
    })
}

impl std::fmt::Display for PortType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortType::Int => f.write_str("Int"),
            PortType::Float => f.write_str("Float"),
            PortType::Bool => f.write_str("Bool"),
            PortType::String => f.write_str("String"),
            PortType::Model(None) => f.write_str("Model"),
            PortType::Model(Some(i)) => match MODEL_INTERFACES.iter().find(|(_, x)| x == i) {
                Some((name, _)) => write!(f, "Model<{name}>"),
                None => f.write_str("Model"),
            },
            PortType::Any => f.write_str("Any"),
            PortType::List(inner) => write!(f, "List<{inner}>"),
            PortType::Tensor { kind, dtype, rank } => {
                f.write_str(kind.name())?;
                match (dtype, rank) {
                    (None, None) => Ok(()),
                    (Some(d), None) => write!(f, "<{}>", d.name()),
                    (d, Some(r)) => write!(f, "<{}, {r}>", d.map_or("*", |d| d.name())),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print_round_trip() {
        for e in [
            "Int",
            "Tensor<f32, 4>",
            "Tensor<f32>",
            "Latent<*, 4>",
            "List<List<Float>>",
            "Image",
        ] {
            assert_eq!(PortType::parse(e).unwrap().to_string(), e);
        }
        assert!(PortType::parse("Tensr")
            .unwrap_err()
            .contains("did you mean 'Tensor'"));
        assert!(PortType::parse("Tensor<f33>").is_err());
        assert!(PortType::parse("Int<3>").is_err());
        assert!(PortType::parse("List<Int").is_err());
    }

    #[test]
    fn compatibility() {
        let t = |s: &str| PortType::parse(s).unwrap();
        assert!(t("Float").accepts(&t("Int")));
        assert!(!t("Int").accepts(&t("Float")));
        assert!(t("Tensor").accepts(&t("Tensor<f32, 4>")));
        assert!(!t("Tensor<f16>").accepts(&t("Tensor<f32>")));
        assert!(!t("Latent").accepts(&t("Image")));
        assert!(t("Any").accepts(&t("Model")));
        assert!(t("Model<Denoiser>").accepts(&t("Model<Denoiser>")));
        assert!(t("Model").accepts(&t("Model<Autoencoder>")));
        assert!(t("Model<Denoiser>").accepts(&t("Model")));
        assert!(!t("Model<Denoiser>").accepts(&t("Model<Autoencoder>")));
        assert_eq!(t("Model<TextEncoder>").to_string(), "Model<TextEncoder>");
        assert!(PortType::parse("Model<Vae>").is_err());
    }

    #[test]
    fn constants() {
        let t = |s: &str| PortType::parse(s).unwrap();
        assert_eq!(
            t("Float").value_from_const(&Const::Int(2)).unwrap(),
            Value::Float(2.0)
        );
        assert!(t("Int").value_from_const(&Const::Float(2.5)).is_err());
        assert!(t("Tensor")
            .value_from_const(&Const::Int(1))
            .unwrap_err()
            .contains("link"));
        let l = t("List<Int>").value_from_const(&Const::List(vec![Const::Int(1), Const::Int(2)]));
        assert!(l.is_ok());
        assert_eq!(t("Bool").value_from_text("yes").unwrap(), Value::Bool(true));
        assert!(t("Int").value_from_text("x").is_err());
    }

    #[test]
    fn audio_and_video_values_carry_their_rate_or_none() {
        let t = |s: &str| PortType::parse(s).unwrap();
        let tensor = |kind| {
            let zeros = crate::tensor::Tensor::zeros(DType::F32, &[2, 8]).unwrap();
            Value::Tensor(kind, zeros)
        };
        let audio = tensor(TensorKind::Audio);
        let with_rate = Value::list([audio.clone(), Value::Float(16000.0)]);
        assert!(t("Audio").matches_value(&audio));
        assert!(t("Audio").matches_value(&with_rate));
        assert!(!t("Video").matches_value(&with_rate));
        assert!(!t("Audio").matches_value(&Value::list([audio.clone(), Value::Int(3)])));
        assert!(!t("Audio").matches_value(&Value::list([audio.clone()])));
        let video = Value::list([tensor(TensorKind::Video), Value::Float(24.0)]);
        assert!(t("Video").matches_value(&video));
        assert!(!t("Audio").matches_value(&video));
    }
}
