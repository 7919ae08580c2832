//! `ApplyLoRA`: a LoRA file as a linear-delta patch on any protocol denoiser that publishes its
//! linear layers. Two layouts are read:
//! - PEFT/diffusers: `[transformer.|base_model.model.]NAME.lora_A[.ADAPTER].weight` and
//!   `lora_B`, with alpha from the file's `lora_adapter_metadata` (diffusers), an
//!   `adapter_config.json` beside the file (PEFT's `save_pretrained`), or a `NAME.alpha` tensor;
//! - kohya: `lora_unet_NAME_WITH_UNDERSCORES.lora_down.weight`, `lora_up.weight` and `alpha`.
//!
//! The scale of a layer is `alpha / rank` (`alpha / √rank` with `use_rslora`), 1 when no alpha is
//! given. The weights are never touched: the model runs the delta beside each layer, or from a
//! merged copy kept per patch set when `merge` is set.

use ditflow_plugin::abi::DF_PATCH_MERGE;
use ditflow_plugin::files::{file_fingerprint, fnv1a, input_path};
use ditflow_plugin::model::{LinearDelta, LinearInfo, PatchHooks, PatchSpec};
use ditflow_plugin::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// A LoRA has no hooks besides its linear deltas; merged, it also holds a copy of every weight it
/// touches.
struct LoraHooks {
    merged_bytes: u64,
}

impl PatchHooks for LoraHooks {
    fn memory_estimate(&self, _info: &ditflow_plugin::model::DenoiserInfo) -> u64 {
        self.merged_bytes
    }
}

/// Bytes of f32 copies of the weights `deltas` touch (a fused weight once).
fn merged_bytes(deltas: &[LinearDelta], linears: &[LinearInfo]) -> u64 {
    let by_name: HashMap<&str, &LinearInfo> =
        linears.iter().map(|l| (l.name.as_str(), l)).collect();
    let mut weights = std::collections::BTreeSet::new();
    for d in deltas {
        if let Some(l) = by_name.get(d.target.as_str()) {
            let w = l
                .fused_into
                .as_ref()
                .map_or(l.name.as_str(), |(f, _)| f.as_str());
            weights.insert(w);
        }
    }
    weights
        .iter()
        .filter_map(|w| by_name.get(w))
        .map(|l| (l.out_features * l.in_features * 4) as u64)
        .sum()
}

/// The alpha settings of an adapter (PEFT's `LoraConfig` fields).
#[derive(Default, Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    pub lora_alpha: Option<f64>,
    pub r: Option<usize>,
    pub use_rslora: bool,
    /// Per-module alphas, by a suffix of the module name.
    pub alpha_pattern: Vec<(String, f64)>,
}

impl AdapterConfig {
    /// From PEFT's config JSON (`adapter_config.json`, or diffusers' `lora_adapter_metadata`).
    pub fn from_json(text: &str, what: &str) -> Result<AdapterConfig> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| Error(format!("{what}: not valid JSON: {e}")))?;
        let num = |k: &str| v.get(k).and_then(|x| x.as_f64());
        Ok(AdapterConfig {
            lora_alpha: num("lora_alpha"),
            r: num("r").map(|r| r as usize),
            use_rslora: v.get("use_rslora").and_then(|x| x.as_bool()) == Some(true),
            alpha_pattern: v
                .get("alpha_pattern")
                .and_then(|p| p.as_object())
                .map(|m| {
                    m.iter()
                        .filter_map(|(k, a)| Some((k.clone(), a.as_f64()?)))
                        .collect()
                })
                .unwrap_or_default(),
        })
    }

    /// The alpha of module `name`, when the config gives one.
    fn alpha(&self, name: &str) -> Option<f64> {
        self.alpha_pattern
            .iter()
            .find(|(p, _)| name == p || name.ends_with(&format!(".{p}")))
            .map(|(_, a)| *a)
            .or(self.lora_alpha)
    }
}

/// One layer's delta as read from the file.
#[derive(Default)]
struct Pair {
    down: Option<(String, Tensor)>,
    up: Option<(String, Tensor)>,
    alpha: Option<f64>,
}

/// Which part of a LoRA layer a key holds.
#[derive(Debug, PartialEq)]
enum Part {
    Down,
    Up,
    Alpha,
}

/// Splits a key into `(module, part)`, or `None` when it is not a LoRA key. Kohya modules keep
/// their underscores (`lora_unet_…`); PEFT modules come back without their prefix.
fn split_key(key: &str) -> Option<(String, Part)> {
    let strip_prefix = |m: &str| -> String {
        let mut m = m;
        for p in [
            "base_model.model.",
            "transformer.",
            "diffusion_model.",
            "model.",
        ] {
            if let Some(rest) = m.strip_prefix(p) {
                m = rest;
            }
        }
        m.to_string()
    };
    for (suffix, part) in [
        (".lora_down.weight", Part::Down),
        (".lora_up.weight", Part::Up),
        (".lora_A.weight", Part::Down),
        (".lora_B.weight", Part::Up),
        (".alpha", Part::Alpha),
    ] {
        if let Some(m) = key.strip_suffix(suffix) {
            return Some((strip_prefix(m), part));
        }
    }
    // PEFT with a named adapter: `NAME.lora_A.ADAPTER.weight`.
    let m = key.strip_suffix(".weight")?;
    let (m, _adapter) = m.rsplit_once('.')?;
    if let Some(m) = m.strip_suffix(".lora_A") {
        return Some((strip_prefix(m), Part::Down));
    }
    m.strip_suffix(".lora_B")
        .map(|m| (strip_prefix(m), Part::Up))
}

/// The closest of `names` to `key`, for messages.
fn closest<'a>(key: &str, names: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
    let mut scored: Vec<(usize, &str)> = names.map(|n| (edit_distance(key, n), n)).collect();
    scored.sort();
    scored.into_iter().take(3).map(|(_, n)| n).collect()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + (ca != cb) as usize)
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The adapter config of a LoRA file: its `lora_adapter_metadata`, else `adapter_config.json`
/// beside it, else none.
fn adapter_config(path: &Path) -> Result<AdapterConfig> {
    if let Some(meta) = safetensors_metadata(path)?.get("lora_adapter_metadata") {
        return AdapterConfig::from_json(
            meta,
            &format!("{}: lora_adapter_metadata", path.display()),
        );
    }
    let beside = path.with_file_name("adapter_config.json");
    match std::fs::read_to_string(&beside) {
        Ok(text) => AdapterConfig::from_json(&text, &beside.display().to_string()),
        Err(_) => Ok(AdapterConfig::default()),
    }
}

/// The `__metadata__` strings of a safetensors header.
fn safetensors_metadata(path: &Path) -> Result<BTreeMap<String, String>> {
    use std::io::Read;
    let bad = |what: String| Error(format!("{}: {what}", path.display()));
    let mut f = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let size = f.metadata().map_err(|e| bad(e.to_string()))?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| bad("truncated: not a safetensors file".into()))?;
    let n = u64::from_le_bytes(len);
    if n > size.saturating_sub(8) || n > 100 << 20 {
        return Err(bad(format!(
            "truncated or not a safetensors file: a header of {n} bytes in a file of {size}"
        )));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header)
        .map_err(|_| bad("truncated header".into()))?;
    let json: serde_json::Value = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("the safetensors header is not valid JSON: {e}")))?;
    Ok(json
        .get("__metadata__")
        .and_then(|m| m.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default())
}

/// The deltas of a LoRA's `tensors` on a model with `linears`, at unit strength.
pub fn lora_deltas(
    file: &str,
    tensors: HashMap<String, Tensor>,
    config: &AdapterConfig,
    linears: &[LinearInfo],
) -> Result<Vec<LinearDelta>> {
    let by_name: HashMap<&str, &LinearInfo> =
        linears.iter().map(|l| (l.name.as_str(), l)).collect();
    let kohya: HashMap<String, &str> = linears
        .iter()
        .flat_map(|l| {
            let u = l.name.replace('.', "_");
            [
                (format!("lora_unet_{u}"), l.name.as_str()),
                (format!("lora_transformer_{u}"), l.name.as_str()),
            ]
        })
        .collect();
    let mut pairs: BTreeMap<String, Pair> = BTreeMap::new();
    let mut keys: Vec<_> = tensors.into_iter().collect();
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    for (key, t) in keys {
        let Some((module, part)) = split_key(&key) else {
            bail!(
                "{file}: '{key}' is not a LoRA key (expected NAME.lora_A.weight / lora_B.weight, \
                 or lora_unet_NAME.lora_down.weight / lora_up.weight / alpha)"
            );
        };
        let name = match by_name.get(module.as_str()) {
            Some(l) => l.name.clone(),
            None => match kohya.get(module.as_str()) {
                Some(n) => n.to_string(),
                None => {
                    let near = if module.starts_with("lora_") {
                        closest(&module, kohya.keys().map(String::as_str))
                    } else {
                        closest(&module, linears.iter().map(|l| l.name.as_str()))
                    };
                    bail!(
                        "{file}: '{key}' matches no linear layer of the model{}",
                        if near.is_empty() {
                            " (it has none)".to_string()
                        } else {
                            format!("; the closest are {}", near.join(", "))
                        }
                    );
                }
            },
        };
        let pair = pairs.entry(name).or_default();
        match part {
            Part::Down => pair.down = Some((key, t)),
            Part::Up => pair.up = Some((key, t)),
            Part::Alpha => {
                let a = t.cast(DType::F32)?.to_device(Device::Cpu)?;
                pair.alpha = a.as_f32()?.first().map(|&a| a as f64);
            }
        }
    }
    let mut out = Vec::new();
    for (name, pair) in pairs {
        let (Some((dk, down)), Some((uk, up))) = (pair.down, pair.up) else {
            bail!("{file}: layer '{name}' has only one of its two LoRA matrices");
        };
        let (ds, us) = (down.shape().to_vec(), up.shape().to_vec());
        if ds.len() != 2 || us.len() != 2 || ds[0] != us[1] || ds[0] == 0 {
            bail!(
                "{file}: rank mismatch on '{name}': '{dk}' is {ds:?} and '{uk}' is {us:?} \
                 (expected [rank, in] and [out, rank])"
            );
        }
        let layer = by_name[name.as_str()];
        if ds[1] != layer.in_features || us[0] != layer.out_features {
            bail!(
                "{file}: '{dk}' and '{uk}' map {} to {} features, but the model's '{name}' maps \
                 {} to {}: the LoRA is for another model",
                ds[1],
                us[0],
                layer.in_features,
                layer.out_features
            );
        }
        let rank = ds[0] as f64;
        let alpha = pair.alpha.or_else(|| config.alpha(&name));
        let scale = match alpha {
            None => 1.0,
            Some(a) if config.use_rslora => a / rank.sqrt(),
            Some(a) => a / rank,
        };
        out.push(LinearDelta {
            target: name,
            down,
            up,
            scale,
        });
    }
    if out.is_empty() {
        bail!("{file}: no LoRA layers in the file");
    }
    Ok(out)
}

/// `ApplyLoRA`: model → model with a LoRA's linear deltas.
#[derive(Default)]
pub struct ApplyLoRA;

impl Node for ApplyLoRA {
    fn schema() -> NodeSchema {
        NodeSchema::new("ApplyLoRA")
            .category("patches")
            .doc(
                "Adds a LoRA (PEFT/diffusers or kohya layout, .safetensors) to any denoiser that \
                 publishes its linear layers. The base weights are shared and never changed: \
                 several LoRAs stack, and removing one is dropping its node. Alpha comes from \
                 the file's metadata, an adapter_config.json beside it, or per-layer alpha \
                 tensors; the scale is alpha/rank.",
            )
            .input(Port::new("model", "Model<Denoiser>"))
            .input(
                Port::new("path", "String")
                    .doc("The LoRA file; a relative path is taken from the graph's folder."),
            )
            .input(
                Port::new("strength", "Float")
                    .default(1.0)
                    .range(-10.0, 10.0)
                    .doc("Multiplies the delta; 0 gives the base model bit-exactly."),
            )
            .input(Port::new("merge", "Bool").default(false).doc(
                "Run from a merged copy of the patched weights (kept per patch set) instead of \
                 beside them: faster per step, one weight copy of memory.",
            ))
            .output(Port::new("model", "Model<Denoiser>"))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let model: Value = ctx.input("model")?;
        let path = input_path(ctx, "path")?;
        let strength: f64 = ctx.input("strength")?;
        let merge: bool = ctx.input("merge")?;
        let denoiser = model.as_denoiser()?;
        if denoiser.info().capabilities & ditflow_plugin::abi::DF_CAP_LINEAR_DELTA == 0 {
            bail!("input 'model': this denoiser has no linear-delta sites, so a LoRA cannot apply to it");
        }
        let linears = denoiser.info().linears.clone();
        let file = path.display().to_string();
        let config = adapter_config(&path)?;
        let tensors = ctx.load_weights(&path.to_string_lossy(), Device::Cpu)?;
        let deltas = lora_deltas(&file, tensors, &config, &linears)?;
        let stem = path
            .file_name()
            .map_or(file.clone(), |n| n.to_string_lossy().into_owned());
        let mut spec = PatchSpec::new(&format!("LoRA {stem}"));
        spec.strength = strength;
        let merged = if merge {
            merged_bytes(&deltas, &linears)
        } else {
            0
        };
        spec.linear_deltas = deltas;
        spec.memory_estimate = true;
        if merge {
            spec.flags |= DF_PATCH_MERGE;
        }
        let fp = file_fingerprint("cannot read", &path)?;
        spec.digest = fnv1a(fnv1a(fp, &strength.to_le_bytes()), &[merge as u8]) | 1;
        let v = ctx.patch_model(
            &model,
            &spec,
            LoraHooks {
                merged_bytes: merged,
            },
        )?;
        ctx.set_output("model", v)
    }

    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        let path = input_path(ctx, "path")?;
        Ok(Some(file_fingerprint("cannot read", &path)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_module_and_part() {
        let k = |s: &str| split_key(s);
        assert_eq!(
            k("transformer.transformer_blocks.0.attn1.to_q.lora_A.weight"),
            Some(("transformer_blocks.0.attn1.to_q".into(), Part::Down))
        );
        assert_eq!(
            k("base_model.model.proj_out.lora_B.default.weight"),
            Some(("proj_out".into(), Part::Up))
        );
        assert_eq!(
            k("lora_unet_transformer_blocks_0_ff_net_2.alpha"),
            Some((
                "lora_unet_transformer_blocks_0_ff_net_2".into(),
                Part::Alpha
            ))
        );
        assert_eq!(
            k("lora_unet_x.lora_up.weight"),
            Some(("lora_unet_x".into(), Part::Up))
        );
        assert_eq!(k("transformer.proj_out.weight"), None);
    }

    #[test]
    fn alpha_patterns_match_module_suffixes() {
        let c = AdapterConfig::from_json(
            r#"{"r": 4, "lora_alpha": 8, "alpha_pattern": {"attn2.to_k": 2}}"#,
            "t",
        )
        .unwrap();
        assert_eq!(c.alpha("transformer_blocks.1.attn2.to_k"), Some(2.0));
        assert_eq!(c.alpha("transformer_blocks.1.attn2.to_q"), Some(8.0));
        assert!(AdapterConfig::from_json("{", "t").is_err());
    }

    #[test]
    fn closest_names_come_first() {
        let names = [
            "transformer_blocks.0.attn1.to_q",
            "proj_out",
            "transformer_blocks.0.ff.net.2",
        ];
        assert_eq!(
            closest("transformer_blocks.0.attn1.to_z", names.into_iter())[0],
            "transformer_blocks.0.attn1.to_q"
        );
    }
}
