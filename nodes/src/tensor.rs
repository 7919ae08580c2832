//! Tensor nodes that neither read nor write files: `TensorStats` (summary statistics),
//! `LatentToTensor` and `TensorAs` (kind conversions) and `ConditioningPart` (a named part added
//! to a conditioning set), plus helpers shared with the other modules.

use ditflow_plugin::prelude::*;

/// Reads an Int input that sizes a tensor dimension and checks it lies in `1..=max`.
///
/// The host checks ranges of literal inputs only, so connected values are checked here.
pub(crate) fn dim_input(ctx: &Context, name: &str, max: usize) -> Result<usize> {
    let value: i64 = ctx.input(name)?;
    match usize::try_from(value) {
        Ok(v) if (1..=max).contains(&v) => Ok(v),
        _ => bail!("input '{name}' must be between 1 and {max}, got {value}"),
    }
}

/// Checks that a tensor's bytes are all readable here.
///
/// [`Tensor::bytes`] returns an empty slice (rather than an error) when the host cannot hand out
/// the data, which would otherwise look like an empty tensor.
pub(crate) fn check_cpu_data(tensor: &Tensor, what: &str) -> Result<()> {
    let want = tensor.numel() * tensor.dtype().size();
    let got = tensor.bytes().len();
    if got != want {
        bail!(
            "the {what} tensor's data is not readable ({got} bytes for a {} tensor of shape {:?}, \
             expected {want})",
            tensor.dtype().name(),
            tensor.shape()
        );
    }
    Ok(())
}

/// Summary statistics of a tensor's elements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub mean: f64,
    /// The population standard deviation (dividing by N).
    pub std: f64,
    pub min: f64,
    pub max: f64,
}

/// Mean, population standard deviation, min and max of `data`, accumulated in f64 (two passes, so
/// the deviation does not suffer from cancellation).
///
/// An empty slice and non-finite elements (NaN, ±inf) are errors; the latter counts them.
pub fn stats(data: &[f32]) -> Result<Stats> {
    if data.is_empty() {
        bail!("the tensor is empty: it has no statistics");
    }
    let non_finite = data.iter().filter(|v| !v.is_finite()).count();
    if non_finite > 0 {
        let nan = data.iter().filter(|v| v.is_nan()).count();
        bail!(
            "the tensor holds {non_finite} non-finite values of {} ({nan} NaN, {} infinite)",
            data.len(),
            non_finite - nan
        );
    }
    let n = data.len() as f64;
    let (mut sum, mut min, mut max) = (0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &v in data {
        let v = v as f64;
        sum += v;
        min = min.min(v);
        max = max.max(v);
    }
    let mean = sum / n;
    let var = data.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    Ok(Stats {
        mean,
        std: var.sqrt(),
        min,
        max,
    })
}

/// `TensorStats`: mean, standard deviation, min and max of an f32 tensor.
#[derive(Default)]
pub struct TensorStats;

impl Node for TensorStats {
    fn schema() -> NodeSchema {
        NodeSchema::new("TensorStats")
            .category("tensor")
            .doc(
                "Summary statistics of an f32 tensor, computed in f64 over all its elements. \
                 An empty tensor, another dtype, or NaN/infinite elements are errors.",
            )
            .input(Port::new("tensor", "Tensor").doc("The f32 tensor to summarise."))
            .output(Port::new("mean", "Float").doc("The mean of the elements."))
            .output(
                Port::new("std", "Float").doc("The population standard deviation (dividing by N)."),
            )
            .output(Port::new("min", "Float").doc("The smallest element."))
            .output(Port::new("max", "Float").doc("The largest element."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let tensor: Tensor = ctx.input("tensor")?;
        let data = tensor
            .as_f32()
            .map_err(|e| Error(format!("input 'tensor': {e}")))?;
        check_cpu_data(&tensor, "input")?;
        let s = stats(data)?;
        ctx.set_output("mean", s.mean)?;
        ctx.set_output("std", s.std)?;
        ctx.set_output("min", s.min)?;
        ctx.set_output("max", s.max)
    }
}

/// `LatentToTensor`: a latent as a plain tensor.
#[derive(Default)]
pub struct LatentToTensor;

impl Node for LatentToTensor {
    fn schema() -> NodeSchema {
        NodeSchema::new("LatentToTensor")
            .category("tensor")
            .doc(
                "Relabels a latent as a plain Tensor (same dtype, shape and data), so nodes that \
                 take a Tensor, such as TensorStats or SaveTensor, accept it.",
            )
            .input(Port::new("latent", "Latent").doc("The latent to convert."))
            .output(Port::new("tensor", "Tensor").doc("The same data as a Tensor."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let latent: Tensor = ctx.input("latent")?;
        check_cpu_data(&latent, "latent")?;
        ctx.set_output("tensor", latent.with_kind(Kind::Tensor)?)
    }
}

/// The kinds `TensorAs` gives.
const KINDS: [(&str, Kind); 6] = [
    ("Tensor", Kind::Tensor),
    ("Latent", Kind::Latent),
    ("Conditioning", Kind::Conditioning),
    ("Image", Kind::Image),
    ("Audio", Kind::Audio),
    ("Video", Kind::Video),
];

/// `TensorAs`: a tensor relabelled as another tensor kind.
#[derive(Default)]
pub struct TensorAs;

impl Node for TensorAs {
    fn schema() -> NodeSchema {
        NodeSchema::new("TensorAs")
            .category("tensor")
            .doc(
                "Relabels a tensor (same dtype, shape and data) as a Tensor, Latent, \
                 Conditioning, Image, Audio or Video, so saved tensors (LoadTensor) feed the \
                 nodes that take those kinds. An Audio or Video made this way has no rate.",
            )
            .input(Port::new("tensor", "Any").doc("Any tensor-like value."))
            .input(
                Port::new("kind", "String")
                    .choices(&[
                        "Tensor",
                        "Latent",
                        "Conditioning",
                        "Image",
                        "Audio",
                        "Video",
                    ])
                    .doc("The kind to give it."),
            )
            .output(Port::new("value", "Any").doc("The same data as that kind."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let t: Tensor = ctx.input("tensor")?;
        let kind: String = ctx.input("kind")?;
        let k = KINDS
            .iter()
            .find(|(n, _)| *n == kind)
            .map(|(_, k)| *k)
            .ok_or_else(|| Error(format!("kind '{kind}' is not a tensor kind")))?;
        ctx.set_output("value", t.with_kind(k)?)
    }
}

/// `ConditioningPart`: a conditioning set with one more named part.
#[derive(Default)]
pub struct ConditioningPart;

impl Node for ConditioningPart {
    fn schema() -> NodeSchema {
        NodeSchema::new("ConditioningPart")
            .category("conditioning")
            .doc(
                "Adds (or replaces) the part `name` of a conditioning set, e.g. \
                 encoder_hidden_states or global_hidden_states from saved tensors; without a \
                 conditioning it starts a new set.",
            )
            .input(
                Port::new("conditioning", "Conditioning")
                    .optional()
                    .doc("The set to extend."),
            )
            .input(
                Port::new("name", "String")
                    .default("encoder_hidden_states")
                    .doc("The part's name (a model forward's argument)."),
            )
            .input(Port::new("tensor", "Any").doc("The part: any tensor-like value."))
            .output(Port::new("conditioning", "Conditioning").doc("The set with the part."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let base: Option<Conditioning> = ctx.input_opt("conditioning")?;
        let name: String = ctx.input("name")?;
        if name.is_empty() {
            bail!("a conditioning part needs a name");
        }
        let t: Tensor = ctx.input("tensor")?;
        let mut c = base.unwrap_or_default();
        c.insert(&name, t);
        ctx.set_output("conditioning", c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_of_a_small_slice() {
        let s = stats(&[1.0, 2.0, 3.0, 4.0]).unwrap();
        assert_eq!(s.mean, 2.5);
        assert!((s.std - 1.25f64.sqrt()).abs() < 1e-12);
        assert_eq!((s.min, s.max), (1.0, 4.0));
    }

    #[test]
    fn stats_of_one_element() {
        let s = stats(&[-7.5]).unwrap();
        assert_eq!(
            s,
            Stats {
                mean: -7.5,
                std: 0.0,
                min: -7.5,
                max: -7.5
            }
        );
    }

    #[test]
    fn stats_accumulate_in_f64() {
        // 1e8 + small offsets: f32 accumulation would lose the offsets entirely.
        let data: Vec<f32> = (0..1000).map(|i| 1e8 + (i % 2) as f32 * 8.0).collect();
        let s = stats(&data).unwrap();
        assert_eq!(s.mean, 1e8 + 4.0);
        assert_eq!(s.std, 4.0);
    }

    #[test]
    fn stats_errors() {
        assert!(stats(&[]).unwrap_err().0.contains("empty"));
        let e = stats(&[1.0, f32::NAN, f32::INFINITY]).unwrap_err().0;
        assert!(e.contains("2 non-finite") && e.contains("1 NaN"), "{e}");
    }
}
