//! Loading a model folder: its `config.json` ([`Config`], typed getters whose errors name the file
//! and the key) and its safetensors weights ([`Weights`], whose errors name the folder, the key
//! and the shape expected), sharded or not.

use crate::layers::Linear;
use ditflow_plugin::{Context, DType, Device, Error, Result, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// A model folder's `config.json`.
pub struct Config {
    pub path: PathBuf,
    pub json: serde_json::Value,
}

impl Config {
    /// The `config.json` of a model folder, or the config file `dir` itself names.
    pub fn read(dir: &Path) -> Result<Config> {
        let path = if dir.is_file() {
            dir.to_path_buf()
        } else if dir.is_dir() {
            dir.join("config.json")
        } else {
            return Err(Error(format!("{}: no such model folder", dir.display())));
        };
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
        Ok(Weights {
            dir: dir.to_path_buf(),
            tensors: read_tensors(ctx, dir, device)?,
        })
    }

    /// Weights from tensors already read (a single-file checkpoint converted to a model's key
    /// layout, say); `source` names them in errors.
    pub fn from_tensors(source: &Path, tensors: HashMap<String, Tensor>) -> Weights {
        Weights {
            dir: source.to_path_buf(),
            tensors,
        }
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

    /// [`Weights::get`] for a linear layer's weight: a bf16 or block-quantized (GGUF) weight
    /// stays as stored (the engine's linear reads it as it is, so such a checkpoint holds no
    /// f32 copy of its weights); other dtypes become f32.
    pub fn get_linear_weight(&self, key: &str, shape: &[usize]) -> Result<Tensor> {
        match self.tensors.get(key) {
            Some(t)
                if (t.dtype() == DType::BF16 || t.dtype().is_quantized()) && t.shape() == shape =>
            {
                Ok(t.clone())
            }
            _ => self.get(key, shape),
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
            weight: self.get_linear_weight(&format!("{prefix}.weight"), &[output, input])?,
            bias: if bias {
                Some(self.get(&format!("{prefix}.bias"), &[output])?)
            } else {
                None
            },
        })
    }
}

/// Every tensor of a safetensors file or model folder at `path`, on `device`.
pub fn read_tensors(ctx: &Context, path: &Path, device: Device) -> Result<HashMap<String, Tensor>> {
    // Absolute, so the host does not resolve it against the graph's folder a second time.
    let abs = std::path::absolute(path).map_err(|e| Error(format!("{}: {e}", path.display())))?;
    ctx.load_weights(&abs.to_string_lossy(), device)
}

/// A single-file checkpoint's keys without ComfyUI's `model.diffusion_model.` prefix.
pub fn strip_comfy_prefix(tensors: HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    tensors
        .into_iter()
        .map(|(k, v)| match k.strip_prefix("model.diffusion_model.") {
            Some(rest) => (rest.to_string(), v),
            None => (k, v),
        })
        .collect()
}

/// One more than the largest block index after `prefix` in `keys` (`prefix` `"blocks."`:
/// `blocks.0.…`, `blocks.7.…` → 8).
pub fn block_count(keys: &HashMap<String, Tensor>, prefix: &str) -> usize {
    keys.keys()
        .filter_map(|k| {
            k.strip_prefix(prefix)?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |n| n + 1)
}

/// The `config.json` beside a single-file checkpoint, when there is one.
pub fn config_beside(file: &Path) -> Result<Option<serde_json::Value>> {
    let beside = file.with_file_name("config.json");
    match std::fs::read_to_string(&beside) {
        Ok(text) => serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| Error(format!("{}: not valid JSON: {e}", beside.display()))),
        Err(_) => Ok(None),
    }
}

/// A model's config and weights from `path`: a diffusers folder as it is, or one checkpoint file
/// (`.safetensors` or `.gguf`, ComfyUI's prefix stripped) handed to `single`, which gives back
/// the tensors in the model's own names and their diffusers config.
pub fn open_model(
    ctx: &Context,
    path: &Path,
    device: Device,
    single: impl FnOnce(HashMap<String, Tensor>) -> Result<(HashMap<String, Tensor>, serde_json::Value)>,
) -> Result<(Config, Weights)> {
    if !path.is_file() {
        return Ok((Config::read(path)?, Weights::load(ctx, path, device)?));
    }
    let tensors = strip_comfy_prefix(read_tensors(ctx, path, device)?);
    let (tensors, json) = single(tensors)?;
    let cfg = Config {
        path: path.to_path_buf(),
        json,
    };
    Ok((cfg, Weights::from_tensors(path, tensors)))
}

/// The error for a file that is not `what` (`"a Flux checkpoint (no double_blocks keys)"`):
/// it names the file and what its keys look like.
pub fn not_a(path: &Path, what: &str, tensors: &HashMap<String, Tensor>) -> Error {
    let looks = describe_checkpoint(tensors.keys().map(String::as_str))
        .unwrap_or("no model this loader knows");
    Error(format!(
        "{}: not {what}: it looks like {looks}",
        path.display()
    ))
}

/// The shape of tensor `key` of converted weights `w` read from `file`, or an error naming both.
pub fn converted_shape(file: &Path, w: &HashMap<String, Tensor>, key: &str) -> Result<Vec<usize>> {
    w.get(key)
        .map(|t| t.shape().to_vec())
        .ok_or_else(|| Error(format!("{}: no '{key}' after conversion", file.display())))
}

/// What a checkpoint's keys look like, for a loader's message when it is given the wrong one:
/// `a Flux transformer (Black Forest Labs' layout)`, `an SD3 transformer`, ... or `None`.
pub fn describe_checkpoint<'a>(keys: impl IntoIterator<Item = &'a str>) -> Option<&'static str> {
    let keys: Vec<&str> = keys
        .into_iter()
        .map(|k| k.trim_start_matches("model.diffusion_model."))
        .collect();
    let any = |p: &str| keys.iter().any(|k| k.starts_with(p) || k.contains(p));
    Some(if any("double_blocks.") {
        "a Flux transformer (Black Forest Labs' layout)"
    } else if any("single_transformer_blocks.") {
        "a Flux transformer (diffusers' layout)"
    } else if any("joint_blocks.") {
        "an SD3 transformer (Stability AI's layout)"
    } else if any("context_embedder.") && any("pos_embed.pos_embed") {
        "an SD3 transformer (diffusers' layout)"
    } else if any("adaln_single.") {
        "a PixArt transformer"
    } else if any("patch_embedding.") && any("self_attn.") {
        "a Wan transformer (Wan's original layout)"
    } else if any("patch_embedding.") && any("condition_embedder.") {
        "a Wan transformer (diffusers' layout)"
    } else if any("input_blocks.") || any("down_blocks.0.attentions.") {
        "a UNet (Stable Diffusion 1.x/2.x/XL)"
    } else if any("encoder.down") || any("decoder.up") {
        "a VAE"
    } else if any("text_model.") || any("encoder.block.") {
        "a text encoder"
    } else if any("lora_") {
        "a LoRA"
    } else {
        return None;
    })
}

#[cfg(test)]
mod tests {
    use super::describe_checkpoint;

    #[test]
    fn checkpoints_are_told_apart_by_their_keys() {
        let d = |k: &[&str]| describe_checkpoint(k.iter().copied());
        assert_eq!(
            d(&["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"]),
            Some("a Flux transformer (Black Forest Labs' layout)")
        );
        assert_eq!(
            d(&["patch_embedding.weight", "blocks.0.self_attn.q.weight"]),
            Some("a Wan transformer (Wan's original layout)")
        );
        assert_eq!(
            d(&["joint_blocks.0.x_block.attn.qkv.weight"]),
            Some("an SD3 transformer (Stability AI's layout)")
        );
        assert_eq!(
            d(&["input_blocks.0.0.weight"]),
            Some("a UNet (Stable Diffusion 1.x/2.x/XL)")
        );
        assert_eq!(
            d(&["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"]),
            Some("a LoRA")
        );
        assert_eq!(d(&["something.else"]), None);
    }
}
