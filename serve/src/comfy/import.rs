//! ComfyUI API-format prompts (`{"3": {"class_type": "KSampler", "inputs": {...}}}`) as ditflow
//! graph documents.
//!
//! Each ComfyUI node becomes one or more of ours, and each of its outputs one of their ports; a
//! link `["4", 0]` becomes `node.port`. A checkpoint name is a diffusers folder (relative to the
//! models folder): `CheckpointLoaderSimple` loads its `text_encoder`, `transformer` (or `unet`)
//! and `vae`, and the sampler reads its `scheduler/scheduler_config.json`. `EmptyLatentImage`
//! takes the latent channels and downscale factor of the VAE of the checkpoint its sampler
//! uses. Sampler and scheduler names are ComfyUI's, mapped onto `Sample`'s (a flow-matching
//! checkpoint's `euler` is `flow_euler`). A class without a mapping is an error naming the node
//! and the class; every error is reported, not only the first.
//!
//! The model family comes from the transformer's `config.json`: a Flux or SD3 transformer is
//! loaded by `LoadFlux` or `LoadSD3`, and `CLIPTextEncode` on its checkpoint's CLIP (or on a
//! `DualCLIPLoader`'s) becomes `FluxTextEncode` or `SD3TextEncode` on its encoders, told apart
//! by their configs. ComfyUI attaches a ControlNet to the conditioning
//! (`ControlNetApplyAdvanced`); ditflow patches the model, so the ControlNets on a sampler's
//! positive conditioning become `ApplyFluxControlNet`/`ApplySD3ControlNet` on its model, and the
//! conditioning passes through.

use serde_json::Value as Json;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The ComfyUI classes that map onto ditflow nodes.
pub const MAPPED_CLASSES: &[&str] = &[
    "CheckpointLoaderSimple",
    "UNETLoader",
    "VAELoader",
    "CLIPTextEncode",
    "EmptyLatentImage",
    "EmptySD3LatentImage",
    "KSampler",
    "KSamplerAdvanced",
    "LoraLoader",
    "VAEDecode",
    "VAEEncode",
    "LoadImage",
    "SaveImage",
    "FluxGuidance",
    "ModelSamplingSD3",
    "ModelSamplingFlux",
    "CLIPLoader",
    "DualCLIPLoader",
    "ControlNetLoader",
    "ControlNetApplyAdvanced",
];

/// A diffusers folder's `config.json` (a missing or unreadable one is `null`).
fn config(dir: &Path) -> Json {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Json::Null)
}

/// The denoiser families the importer tells apart.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Family {
    /// PixArt and DiT (`LoadDiffusionModel`).
    Dit,
    Flux,
    Sd3,
}

impl Family {
    /// The family of the transformer in `dir`.
    fn of(dir: &Path) -> Family {
        match config(dir)["_class_name"].as_str() {
            Some("FluxTransformer2DModel") => Family::Flux,
            Some("SD3Transformer2DModel") => Family::Sd3,
            _ => Family::Dit,
        }
    }

    fn loader(self) -> &'static str {
        match self {
            Family::Dit => "LoadDiffusionModel",
            Family::Flux => "LoadFlux",
            Family::Sd3 => "LoadSD3",
        }
    }
}

/// A checkpoint's transformer folder: `transformer/`, or `unet/`.
fn unet_dir(dir: &Path) -> PathBuf {
    if dir.join("transformer").is_dir() {
        dir.join("transformer")
    } else {
        dir.join("unet")
    }
}

/// A text encoder folder: whether it is a T5, and its width (a CLIP's hidden size).
fn encoder_kind(dir: &Path) -> (bool, i64) {
    let c = config(dir);
    let t5 = c["model_type"].as_str().is_some_and(|t| t.contains("t5"));
    let width = c["hidden_size"]
        .as_i64()
        .or_else(|| c["d_model"].as_i64())
        .unwrap_or(0);
    (t5, width)
}

/// A problem with one node of the prompt (or the prompt itself, `node` `None`).
#[derive(Debug, Clone, PartialEq)]
pub struct ImportError {
    pub node: Option<String>,
    pub class_type: Option<String>,
    pub message: String,
}

impl std::fmt::Display for ImportError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.node, &self.class_type) {
            (Some(n), Some(c)) => write!(f, "node \"{n}\" ({c}): {}", self.message),
            (Some(n), None) => write!(f, "node \"{n}\": {}", self.message),
            _ => f.write_str(&self.message),
        }
    }
}

/// A prompt as a graph: the YAML document, and the images its save nodes write.
#[derive(Debug, Clone)]
pub struct Imported {
    pub yaml: String,
    /// `(ComfyUI node id, file name)` of each SaveImage.
    pub images: Vec<(String, String)>,
}

/// One of our nodes: its id, type and inputs (`port: YAML text`).
struct Ours {
    id: String,
    ty: &'static str,
    inputs: Vec<(String, String)>,
}

/// A constant as a YAML input value (`{value: ...}`, so no string is read as a link).
fn constant(v: &Json) -> String {
    format!("{{value: {v}}}")
}

/// The diffusers folders of a checkpoint, and what its configs say.
#[derive(Debug, Clone)]
struct Checkpoint {
    dir: PathBuf,
    latent_channels: i64,
    downscale: i64,
    flow: bool,
}

impl Checkpoint {
    fn read(dir: PathBuf) -> Checkpoint {
        let json = |p: PathBuf| -> Option<Json> {
            serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
        };
        let vae = json(dir.join("vae/config.json"));
        let latent_channels = vae
            .as_ref()
            .and_then(|v| v["latent_channels"].as_i64())
            .unwrap_or(4);
        let downscale = vae
            .as_ref()
            .and_then(|v| v["block_out_channels"].as_array().map(|b| b.len()))
            .map_or(8, |n| 1i64 << n.saturating_sub(1));
        let flow = json(dir.join("scheduler/scheduler_config.json"))
            .and_then(|s| {
                s["_class_name"]
                    .as_str()
                    .map(|c| c.starts_with("FlowMatch"))
            })
            // Without a scheduler config: Flux and SD3 are flow-matching models.
            .unwrap_or_else(|| {
                Family::of(&unet_dir(&dir)) != Family::Dit || Family::of(&dir) != Family::Dit
            });
        Checkpoint {
            dir,
            latent_channels,
            downscale,
            flow,
        }
    }
}

/// ComfyUI's sampler name as `Sample`'s.
fn sampler(name: &str, flow: bool) -> Option<&'static str> {
    Some(match (name, flow) {
        ("euler", true) => "flow_euler",
        ("heun", true) => "flow_heun",
        ("euler", false) => "euler",
        ("heun", false) => "heun",
        ("euler_ancestral", _) => "euler_ancestral",
        ("dpmpp_2m", _) => "dpmpp_2m",
        ("dpmpp_2m_sde", _) => "dpmpp_2m_sde",
        ("ddim", _) => "ddim",
        ("lcm", _) => "lcm",
        ("uni_pc" | "uni_pc_bh2", _) => "unipc",
        _ => return None,
    })
}

/// ComfyUI's scheduler name as `Sample`'s spacing.
fn spacing(name: &str) -> Option<&'static str> {
    Some(match name {
        "normal" | "simple" | "sgm_uniform" | "ddim_uniform" => "default",
        "karras" => "karras",
        "exponential" => "exponential",
        "beta" => "beta",
        _ => return None,
    })
}

struct Importer<'a> {
    prompt: &'a serde_json::Map<String, Json>,
    models_dir: &'a Path,
    errors: Vec<ImportError>,
}

impl<'a> Importer<'a> {
    fn class(&self, id: &str) -> Option<&'a str> {
        self.prompt.get(id)?["class_type"].as_str()
    }

    fn input(&self, id: &str, name: &str) -> Option<&'a Json> {
        self.prompt.get(id)?["inputs"].get(name)
    }

    fn err(&mut self, id: &str, msg: impl Into<String>) {
        let class_type = self.class(id).map(String::from);
        self.errors.push(ImportError {
            node: Some(id.to_string()),
            class_type,
            message: msg.into(),
        });
    }

    /// The node id a link input points at (`["4", 0]`), and the output index.
    fn link(&self, id: &str, name: &str) -> Option<(&'a str, u64)> {
        let v = self.input(id, name)?.as_array()?;
        match v.as_slice() {
            [Json::String(src), idx] => Some((src.as_str(), idx.as_u64()?)),
            _ => None,
        }
    }

    /// The checkpoint a model link comes from, through the nodes that pass a model on.
    fn checkpoint_of(&self, id: &str, input: &str, depth: usize) -> Option<Checkpoint> {
        let (src, _) = self.link(id, input)?;
        match self.class(src)? {
            "CheckpointLoaderSimple" => {
                let name = self.input(src, "ckpt_name")?.as_str()?;
                Some(Checkpoint::read(self.models_dir.join(name)))
            }
            "UNETLoader" => {
                let name = self.input(src, "unet_name")?.as_str()?;
                Some(Checkpoint::read(self.models_dir.join(name)))
            }
            "ModelSamplingSD3" | "ModelSamplingFlux" | "LoraLoader" if depth < 32 => {
                self.checkpoint_of(src, "model", depth + 1)
            }
            _ => None,
        }
    }

    /// Our `node.port` for output `idx` of node `src`, through the nodes that pass a value on
    /// (FluxGuidance's conditioning, ModelSampling's model: their settings go to the sampler).
    fn resolve(&self, src: &str, idx: u64, depth: usize) -> Option<String> {
        let class = self.class(src)?;
        let through = match (class, idx) {
            ("FluxGuidance", _) => "conditioning",
            ("ModelSamplingSD3" | "ModelSamplingFlux", _) => "model",
            // A LoRA on the text encoder is not applied: its CLIP output is its input.
            ("LoraLoader", 1) => "clip",
            // Its ControlNet patches the sampler's model instead (see `controlnets_of`).
            ("ControlNetApplyAdvanced", 0) => "positive",
            ("ControlNetApplyAdvanced", 1) => "negative",
            _ => return output_port(class, src, idx),
        };
        if depth >= 32 {
            return None;
        }
        let (s, i) = self.link(src, through)?;
        self.resolve(s, i, depth + 1)
    }

    /// The node a CLIP input comes from, through LoRAs (whose CLIP output is their input).
    fn clip_origin(&self, id: &str, input: &str, depth: usize) -> Option<&'a str> {
        let (src, idx) = self.link(id, input)?;
        match (self.class(src)?, idx) {
            ("LoraLoader", 1) if depth < 32 => self.clip_origin(src, "clip", depth + 1),
            _ => Some(src),
        }
    }

    /// The ControlNetApplyAdvanced nodes on sampler `id`'s positive conditioning, the one
    /// nearest the text encoder first.
    fn controlnets_of(&self, id: &str) -> Vec<&'a str> {
        let mut out = Vec::new();
        let mut at = self.link(id, "positive");
        while let Some((src, _)) = at {
            if out.len() > 32 {
                break;
            }
            at = match self.class(src) {
                Some("FluxGuidance") => self.link(src, "conditioning"),
                Some("ControlNetApplyAdvanced") => {
                    out.push(src);
                    self.link(src, "positive")
                }
                _ => None,
            };
        }
        out.reverse();
        out
    }

    /// The KSampler whose latent_image is node `latent`.
    fn sampler_of_latent(&self, latent: &str) -> Option<&'a str> {
        self.prompt.iter().find_map(|(id, _)| {
            (matches!(self.class(id), Some("KSampler" | "KSamplerAdvanced"))
                && self.link(id, "latent_image").map(|l| l.0) == Some(latent))
            .then_some(id.as_str())
        })
    }
}

/// The id of our node for ComfyUI node `id` (suffixed where one becomes several).
fn our_id(id: &str, suffix: &str) -> String {
    let clean: String = id
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if suffix.is_empty() {
        format!("n{clean}")
    } else {
        format!("n{clean}_{suffix}")
    }
}

/// Our `node.port` for output `index` of ComfyUI node `id`, or `None` when it has no such output.
fn output_port(class: &str, id: &str, index: u64) -> Option<String> {
    let (suffix, port) = match (class, index) {
        ("CheckpointLoaderSimple", 0) => ("dit", "model"),
        ("CheckpointLoaderSimple", 1) => ("te", "encoder"),
        ("CheckpointLoaderSimple", 2) => ("vae", "vae"),
        ("UNETLoader", 0) => ("", "model"),
        ("VAELoader", 0) => ("", "vae"),
        ("CLIPTextEncode", 0) => ("", "conditioning"),
        ("EmptyLatentImage" | "EmptySD3LatentImage", 0) => ("", "latent"),
        ("KSampler" | "KSamplerAdvanced", 0) => ("", "latent"),
        ("LoraLoader", 0) => ("", "model"),
        ("VAEDecode", 0) => ("", "image"),
        ("VAEEncode", 0) => ("", "latent"),
        ("LoadImage", 0) => ("", "image"),
        ("CLIPLoader", 0) => ("", "encoder"),
        ("ControlNetLoader", 0) => ("", "controlnet"),
        _ => return None,
    };
    Some(format!("{}.{port}", our_id(id, suffix)))
}

/// Input `name` of ComfyUI node `id`, a link, as our `node.port`; an error when absent or
/// dangling.
fn linked_at(im: &mut Importer, id: &str, name: &str) -> Option<String> {
    let Some((src, idx)) = im.link(id, name) else {
        im.err(
            id,
            format!("input '{name}' must be a link [node_id, output]"),
        );
        return None;
    };
    let Some(src_class) = im.class(src) else {
        im.err(
            id,
            format!("input '{name}' links to node \"{src}\", which is not in the prompt"),
        );
        return None;
    };
    let port = im.resolve(src, idx, 0);
    if port.is_none() {
        im.err(
            id,
            format!("input '{name}': {src_class} \"{src}\" has no output {idx} ditflow maps"),
        );
    }
    port
}

/// Imports `prompt`; checkpoint and VAE names are relative to `models_dir`, and `LoadImage`'s
/// image names to `inputs_dir` (where `/upload/image` puts them).
pub fn import(
    prompt: &Json,
    models_dir: &Path,
    inputs_dir: &Path,
) -> Result<Imported, Vec<ImportError>> {
    let Some(map) = prompt.as_object().filter(|m| !m.is_empty()) else {
        return Err(vec![ImportError {
            node: None,
            class_type: None,
            message: "a prompt is an object of nodes by id: {\"3\": {\"class_type\": ..., \
                      \"inputs\": {...}}}"
                .into(),
        }]);
    };
    let mut im = Importer {
        prompt: map,
        models_dir,
        errors: Vec::new(),
    };
    let mut nodes: Vec<Ours> = Vec::new();
    let mut images = Vec::new();
    // ComfyUI's ids are strings of numbers: in numeric order where they are numbers.
    let mut ids: Vec<&String> = map.keys().collect();
    ids.sort_by_key(|k| (k.parse::<u64>().unwrap_or(u64::MAX), k.to_string()));
    for id in ids {
        let id = id.as_str();
        let Some(class) = im.class(id) else {
            im.err(id, "no class_type");
            continue;
        };
        if !MAPPED_CLASSES.contains(&class) {
            im.err(
                id,
                format!(
                    "class '{class}' has no ditflow equivalent yet (mapped: {})",
                    MAPPED_CLASSES.join(", ")
                ),
            );
            continue;
        }
        let linked = |im: &mut Importer, name: &str| linked_at(im, id, name);
        let value = |im: &mut Importer, name: &str| -> Option<Json> {
            let v = im.input(id, name).cloned();
            if v.is_none() {
                im.err(id, format!("input '{name}' is missing"));
            }
            v
        };
        let path_of = |name: &Json| -> Json {
            Json::String(
                models_dir
                    .join(name.as_str().unwrap_or(""))
                    .to_string_lossy()
                    .into(),
            )
        };
        let mut node = |suffix: &str, ty: &'static str, inputs: Vec<(&str, String)>| {
            nodes.push(Ours {
                id: our_id(id, suffix),
                ty,
                inputs: inputs
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            })
        };
        match class {
            "CheckpointLoaderSimple" => {
                let Some(name) = value(&mut im, "ckpt_name") else {
                    continue;
                };
                let dir = models_dir.join(name.as_str().unwrap_or(""));
                if !dir.is_dir() {
                    im.err(
                        id,
                        format!(
                            "checkpoint '{}' is not a diffusers folder under {}",
                            name.as_str().unwrap_or(""),
                            models_dir.display()
                        ),
                    );
                    continue;
                }
                let sub = |s: &str| constant(&Json::String(dir.join(s).to_string_lossy().into()));
                let unet = unet_dir(&dir);
                let family = Family::of(&unet);
                node("te", "LoadTextEncoder", vec![("path", sub("text_encoder"))]);
                if family != Family::Dit {
                    node(
                        "te2",
                        "LoadTextEncoder",
                        vec![("path", sub("text_encoder_2"))],
                    );
                }
                if family == Family::Sd3 && dir.join("text_encoder_3").is_dir() {
                    node(
                        "te3",
                        "LoadTextEncoder",
                        vec![("path", sub("text_encoder_3"))],
                    );
                }
                let unet = constant(&Json::String(unet.to_string_lossy().into()));
                node("dit", family.loader(), vec![("path", unet)]);
                node("vae", "LoadVAE", vec![("path", sub("vae"))]);
            }
            "UNETLoader" => {
                let Some(name) = value(&mut im, "unet_name") else {
                    continue;
                };
                let dir = models_dir.join(name.as_str().unwrap_or(""));
                let unet = if dir.join("transformer").is_dir() {
                    dir.join("transformer")
                } else {
                    dir
                };
                node(
                    "",
                    Family::of(&unet).loader(),
                    vec![(
                        "path",
                        constant(&Json::String(unet.to_string_lossy().into())),
                    )],
                );
            }
            "VAELoader" => {
                let Some(name) = value(&mut im, "vae_name") else {
                    continue;
                };
                node("", "LoadVAE", vec![("path", constant(&path_of(&name)))]);
            }
            "CLIPTextEncode" => {
                let Some(text) = value(&mut im, "text") else {
                    continue;
                };
                let text = constant(&text);
                let origin = im.clip_origin(id, "clip", 0);
                match origin.and_then(|o| text_encoders(&im, o)) {
                    Some(Encoders::Flux { clip, t5 }) => node(
                        "",
                        "FluxTextEncode",
                        vec![("clip", clip), ("t5", t5), ("text", text)],
                    ),
                    Some(Encoders::Sd3 { clip_l, clip_g, t5 }) => {
                        let mut inputs = vec![("clip_l", clip_l), ("clip_g", clip_g)];
                        if let Some(t5) = t5 {
                            inputs.push(("t5", t5));
                        }
                        inputs.push(("text", text));
                        node("", "SD3TextEncode", inputs);
                    }
                    Some(Encoders::Unknown(msg)) => im.err(id, msg),
                    None => {
                        let Some(clip) = linked(&mut im, "clip") else {
                            continue;
                        };
                        node("", "TextEncode", vec![("encoder", clip), ("text", text)]);
                    }
                }
            }
            "CLIPLoader" => {
                let Some(name) = value(&mut im, "clip_name") else {
                    continue;
                };
                node(
                    "",
                    "LoadTextEncoder",
                    vec![("path", constant(&path_of(&name)))],
                );
            }
            "DualCLIPLoader" => {
                let (Some(a), Some(b)) =
                    (value(&mut im, "clip_name1"), value(&mut im, "clip_name2"))
                else {
                    continue;
                };
                node(
                    "c1",
                    "LoadTextEncoder",
                    vec![("path", constant(&path_of(&a)))],
                );
                node(
                    "c2",
                    "LoadTextEncoder",
                    vec![("path", constant(&path_of(&b)))],
                );
            }
            "ControlNetLoader" => {
                let Some(name) = value(&mut im, "control_net_name") else {
                    continue;
                };
                let dir = models_dir.join(name.as_str().unwrap_or(""));
                let Some((load, _)) = controlnet_family(&dir) else {
                    im.err(
                        id,
                        format!(
                            "'{}' is not a diffusers Flux or SD3 ControlNet folder (its \
                             config.json names FluxControlNetModel or SD3ControlNetModel)",
                            dir.display()
                        ),
                    );
                    continue;
                };
                node("", load, vec![("path", constant(&path_of(&name)))]);
            }
            // Imported with the sampler whose positive conditioning it is on.
            "ControlNetApplyAdvanced" => continue,
            // They pass their input on (`Importer::resolve`); their settings go to the sampler.
            "FluxGuidance" | "ModelSamplingSD3" | "ModelSamplingFlux" => continue,
            "EmptyLatentImage" | "EmptySD3LatentImage" => {
                let (Some(w), Some(h)) = (value(&mut im, "width"), value(&mut im, "height")) else {
                    continue;
                };
                let batch = im.input(id, "batch_size").cloned().unwrap_or(Json::from(1));
                let ckpt = im
                    .sampler_of_latent(id)
                    .and_then(|s| im.checkpoint_of(s, "model", 0));
                let (channels, downscale) = match (&ckpt, class) {
                    (Some(c), _) => (c.latent_channels, c.downscale),
                    (None, "EmptySD3LatentImage") => (16, 8),
                    (None, _) => (4, 8),
                };
                node(
                    "",
                    "EmptyLatent",
                    vec![
                        ("width", constant(&w)),
                        ("height", constant(&h)),
                        ("batch", constant(&batch)),
                        ("channels", constant(&Json::from(channels))),
                        ("downscale", constant(&Json::from(downscale))),
                    ],
                );
            }
            "LoraLoader" => {
                let (Some(model), Some(name)) =
                    (linked(&mut im, "model"), value(&mut im, "lora_name"))
                else {
                    continue;
                };
                let strength = im
                    .input(id, "strength_model")
                    .cloned()
                    .unwrap_or(Json::from(1.0));
                node(
                    "",
                    "ApplyLoRA",
                    vec![
                        ("model", model),
                        ("path", constant(&path_of(&name))),
                        ("strength", constant(&strength)),
                    ],
                );
            }
            "KSampler" | "KSamplerAdvanced" => {
                if class == "KSamplerAdvanced" {
                    // What Sample runs: noise added, every step, no leftover noise.
                    let text = |n: &str| im.input(id, n).and_then(Json::as_str).map(String::from);
                    let int = |n: &str| im.input(id, n).and_then(Json::as_i64);
                    let steps = int("steps").unwrap_or(20);
                    let plain = text("add_noise").as_deref() != Some("disable")
                        && int("start_at_step").unwrap_or(0) == 0
                        && int("end_at_step").unwrap_or(10000) >= steps
                        && text("return_with_leftover_noise").as_deref() != Some("enable");
                    if !plain {
                        im.err(
                            id,
                            "KSamplerAdvanced with start/end steps, leftover noise or no added noise has no ditflow equivalent yet",
                        );
                        continue;
                    }
                }
                let ckpt = im.checkpoint_of(id, "model", 0);
                let flow = ckpt.as_ref().is_some_and(|c| c.flow);
                let model = linked(&mut im, "model");
                let pos = linked(&mut im, "positive");
                let neg = linked(&mut im, "negative");
                let latent = linked(&mut im, "latent_image");
                let name = im
                    .input(id, "sampler_name")
                    .and_then(Json::as_str)
                    .unwrap_or("euler");
                let Some(samp) = sampler(name, flow) else {
                    im.err(
                        id,
                        format!("sampler_name '{name}' has no ditflow sampler yet"),
                    );
                    continue;
                };
                let sched = im
                    .input(id, "scheduler")
                    .and_then(Json::as_str)
                    .unwrap_or("normal");
                let Some(space) = spacing(sched) else {
                    im.err(
                        id,
                        format!("scheduler '{sched}' has no ditflow spacing yet"),
                    );
                    continue;
                };
                let (Some(mut model), Some(pos), Some(latent)) = (model, pos, latent) else {
                    continue;
                };
                // ComfyUI's ControlNets ride on the conditioning; ours patch the model.
                for cn in im.controlnets_of(id) {
                    let Some((apply, cn_inputs)) = controlnet_patch(&mut im, cn, &model) else {
                        continue;
                    };
                    let suffix = format!("controlnet{}", our_id(cn, ""));
                    model = format!("{}.model", our_id(id, &suffix));
                    node(&suffix, apply, cn_inputs);
                }
                let mut inputs = vec![("model", model), ("positive", pos)];

                if let Some(neg) = neg {
                    inputs.push(("negative", neg));
                }
                // From an encoded image (VAEEncode) with denoise < 1: image-to-image.
                let from_image =
                    im.link(id, "latent_image").and_then(|(s, _)| im.class(s)) == Some("VAEEncode");
                inputs.push((if from_image { "init_latent" } else { "latent" }, latent));
                let seed = if class == "KSamplerAdvanced" {
                    "noise_seed"
                } else {
                    "seed"
                };
                for (ours, theirs) in [
                    ("seed", seed),
                    ("steps", "steps"),
                    ("cfg", "cfg"),
                    ("denoise", "denoise"),
                ] {
                    if let Some(v) = im.input(id, theirs) {
                        inputs.push((ours, constant(v)));
                    }
                }
                inputs.push(("sampler", constant(&Json::from(samp))));
                if space != "default" {
                    inputs.push(("spacing", constant(&Json::from(space))));
                }
                if let Some(c) = &ckpt {
                    let cfg = c.dir.join("scheduler/scheduler_config.json");
                    if cfg.is_file() {
                        inputs.push((
                            "scheduler_config",
                            constant(&Json::String(cfg.to_string_lossy().into())),
                        ));
                    }
                }
                if let Some(shift) = model_shift(&im, id) {
                    inputs.push(("shift", constant(&shift)));
                }
                if let Some(g) = flux_guidance(&im, id) {
                    inputs.push(("guidance", constant(&g)));
                }
                node("", "Sample", inputs);
            }
            "VAEDecode" => {
                let (Some(latent), Some(vae)) =
                    (linked(&mut im, "samples"), linked(&mut im, "vae"))
                else {
                    continue;
                };
                node("", "VAEDecode", vec![("vae", vae), ("latent", latent)]);
            }
            "VAEEncode" => {
                let (Some(image), Some(vae)) = (linked(&mut im, "pixels"), linked(&mut im, "vae"))
                else {
                    continue;
                };
                node("", "VAEEncode", vec![("vae", vae), ("image", image)]);
            }
            "LoadImage" => {
                let Some(name) = value(&mut im, "image") else {
                    continue;
                };
                let n = name.as_str().unwrap_or("");
                if !crate::http::safe_relative(n) {
                    im.err(id, format!("image '{n}' is not a plain file name"));
                    continue;
                }
                let file = inputs_dir.join(n);
                node(
                    "",
                    "LoadImage",
                    vec![(
                        "path",
                        constant(&Json::String(file.to_string_lossy().into())),
                    )],
                );
            }
            "SaveImage" => {
                let Some(image) = linked(&mut im, "images") else {
                    continue;
                };
                let prefix = im
                    .input(id, "filename_prefix")
                    .and_then(Json::as_str)
                    .unwrap_or("ComfyUI");
                if !crate::http::safe_relative(prefix) {
                    im.err(
                        id,
                        format!("filename_prefix '{prefix}' is not a plain relative name"),
                    );
                    continue;
                }
                let file = format!("{prefix}_00001_.png");
                images.push((id.to_string(), file.clone()));
                node(
                    "",
                    "SaveImage",
                    vec![("image", image), ("path", constant(&Json::String(file)))],
                );
            }
            _ => unreachable!("every mapped class is handled"),
        }
    }
    if images.is_empty() && im.errors.is_empty() {
        im.errors.push(ImportError {
            node: None,
            class_type: None,
            message: "the prompt has no output (SaveImage)".into(),
        });
    }
    if !im.errors.is_empty() {
        return Err(im.errors);
    }
    let mut yaml = String::from(
        "version: 1\ndescription: imported from a ComfyUI API-format prompt\nnodes:\n",
    );
    for n in &nodes {
        let inputs: Vec<String> = n.inputs.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        let _ = writeln!(
            yaml,
            "  {}: {{type: {}, inputs: {{{}}}}}",
            n.id,
            n.ty,
            inputs.join(", ")
        );
    }
    yaml.push_str("outputs:\n");
    let mut outs = BTreeMap::new();
    for (id, _) in &images {
        outs.insert(our_id(id, ""), format!("{}.path", our_id(id, "")));
    }
    for (name, link) in outs {
        let _ = writeln!(yaml, "  {name}: {link}");
    }
    Ok(Imported { yaml, images })
}

/// The shift of a ModelSamplingSD3/Flux on KSampler `id`'s model input.
fn model_shift(im: &Importer, id: &str) -> Option<Json> {
    let (src, _) = im.link(id, "model")?;
    match im.class(src)? {
        "ModelSamplingSD3" => im.input(src, "shift").cloned(),
        "ModelSamplingFlux" => im.input(src, "max_shift").cloned(),
        _ => None,
    }
}

/// The guidance of a FluxGuidance on KSampler `id`'s positive conditioning.
fn flux_guidance(im: &Importer, id: &str) -> Option<Json> {
    let (src, _) = im.link(id, "positive")?;
    (im.class(src)? == "FluxGuidance")
        .then(|| im.input(src, "guidance").cloned())
        .flatten()
}

/// The text encoders a CLIP output stands for, when they need a family's own encode node.
enum Encoders {
    Flux {
        clip: String,
        t5: String,
    },
    Sd3 {
        clip_l: String,
        clip_g: String,
        t5: Option<String>,
    },
    /// Encoders the importer cannot pair: why.
    Unknown(String),
}

/// The encoders of CLIP source `src`: a Flux or SD3 checkpoint's, or a DualCLIPLoader's (told
/// apart by their configs: the T5, and of two CLIPs the narrower is CLIP-L); `None` for one
/// encoder, which `TextEncode` takes.
fn text_encoders(im: &Importer, src: &str) -> Option<Encoders> {
    let port = |suffix: &str| format!("{}.encoder", our_id(src, suffix));
    match im.class(src)? {
        "CheckpointLoaderSimple" => {
            let dir = im.models_dir.join(im.input(src, "ckpt_name")?.as_str()?);
            match Family::of(&unet_dir(&dir)) {
                Family::Dit => None,
                Family::Flux => Some(Encoders::Flux {
                    clip: port("te"),
                    t5: port("te2"),
                }),
                Family::Sd3 => Some(Encoders::Sd3 {
                    clip_l: port("te"),
                    clip_g: port("te2"),
                    t5: dir.join("text_encoder_3").is_dir().then(|| port("te3")),
                }),
            }
        }
        "DualCLIPLoader" => {
            let kind = |n: &str| {
                im.input(src, n)
                    .and_then(Json::as_str)
                    .map(|name| encoder_kind(&im.models_dir.join(name)))
                    .unwrap_or((false, 0))
            };
            let (k1, k2) = (kind("clip_name1"), kind("clip_name2"));
            let (c1, c2) = (port("c1"), port("c2"));
            let ty = im.input(src, "type").and_then(Json::as_str).unwrap_or("");
            Some(match (k1.0, k2.0) {
                (true, false) => Encoders::Flux { clip: c2, t5: c1 },
                (false, true) => Encoders::Flux { clip: c1, t5: c2 },
                (false, false) if k1.1 <= k2.1 => Encoders::Sd3 {
                    clip_l: c1,
                    clip_g: c2,
                    t5: None,
                },
                (false, false) => Encoders::Sd3 {
                    clip_l: c2,
                    clip_g: c1,
                    t5: None,
                },
                (true, true) => Encoders::Unknown(format!(
                    "DualCLIPLoader \"{src}\" (type '{ty}') loads two T5 encoders: ditflow pairs \
                     a CLIP-L with a T5 (Flux) or a CLIP-L with a CLIP-G (SD3)"
                )),
            })
        }
        _ => None,
    }
}

/// The node that loads the ControlNet in `dir`, and the one that applies it.
fn controlnet_family(dir: &Path) -> Option<(&'static str, &'static str)> {
    match config(dir)["_class_name"].as_str()? {
        "FluxControlNetModel" => Some(("LoadFluxControlNet", "ApplyFluxControlNet")),
        "SD3ControlNetModel" => Some(("LoadSD3ControlNet", "ApplySD3ControlNet")),
        _ => None,
    }
}

/// ControlNetApplyAdvanced `cn` as a patch of `model`: the node type and its inputs.
fn controlnet_patch(
    im: &mut Importer,
    cn: &str,
    model: &str,
) -> Option<(&'static str, Vec<(&'static str, String)>)> {
    let apply = im
        .link(cn, "control_net")
        .map(|(s, _)| s)
        .filter(|l| im.class(l) == Some("ControlNetLoader"))
        .and_then(|l| im.input(l, "control_net_name")?.as_str())
        .and_then(|name| controlnet_family(&im.models_dir.join(name)))
        .map(|(_, apply)| apply);
    let controlnet = linked_at(im, cn, "control_net")?;
    let image = linked_at(im, cn, "image")?;
    let Some(apply) = apply else {
        im.err(cn, "input 'control_net' must come from a ControlNetLoader");
        return None;
    };
    let mut inputs = vec![
        ("model", model.to_string()),
        ("controlnet", controlnet),
        ("image", image),
    ];
    if im.input(cn, "vae").is_some() {
        inputs.push(("vae", linked_at(im, cn, "vae")?));
    } else if apply == "ApplySD3ControlNet" {
        im.err(
            cn,
            "an SD3 ControlNet needs the 'vae' input (the VAE that encodes the hint image)",
        );
        return None;
    }
    for (ours, theirs) in [
        ("strength", "strength"),
        ("start", "start_percent"),
        ("end", "end_percent"),
    ] {
        if let Some(v) = im.input(cn, theirs) {
            inputs.push((ours, constant(v)));
        }
    }
    Some((apply, inputs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unmapped_class_and_a_dangling_link_are_errors_naming_the_node() {
        let prompt = serde_json::json!({
            "1": {"class_type": "FancyUpscaler", "inputs": {}},
            "2": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 0]}},
        });
        let errs = import(&prompt, Path::new("."), Path::new(".")).unwrap_err();
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert!(
            text[0].starts_with(
                "node \"1\" (FancyUpscaler): class 'FancyUpscaler' has no ditflow equivalent"
            ),
            "{text:?}"
        );
        assert!(text.iter().any(|t| t.contains("node \"2\" (VAEDecode): input 'samples' links to node \"9\", which is not in the prompt")), "{text:?}");
        assert!(import(&serde_json::json!([]), Path::new("."), Path::new(".")).is_err());
    }

    #[test]
    fn names_map_onto_samples_and_strings_stay_constants() {
        assert_eq!(sampler("euler", true), Some("flow_euler"));
        assert_eq!(sampler("euler", false), Some("euler"));
        assert_eq!(sampler("uni_pc", false), Some("unipc"));
        assert_eq!(sampler("restart", false), None);
        assert_eq!(spacing("karras"), Some("karras"));
        assert_eq!(constant(&Json::from("a.b")), "{value: \"a.b\"}");
    }

    /// A folder under a fresh temporary models folder with `config` as its config.json.
    fn folder(models: &Path, name: &str, config: Json) {
        std::fs::create_dir_all(models.join(name)).unwrap();
        std::fs::write(models.join(name).join("config.json"), config.to_string()).unwrap();
    }

    #[test]
    fn dual_clips_pair_by_their_configs_and_controlnets_need_their_loader() {
        let models = std::env::temp_dir().join(format!("ditflow-import-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&models);
        folder(
            &models,
            "g",
            serde_json::json!({"model_type": "clip_text_model", "hidden_size": 1280}),
        );
        folder(
            &models,
            "l",
            serde_json::json!({"model_type": "clip_text_model", "hidden_size": 768}),
        );
        folder(
            &models,
            "t5",
            serde_json::json!({"model_type": "t5", "d_model": 4096}),
        );
        folder(
            &models,
            "cn",
            serde_json::json!({"_class_name": "ControlNetModel"}),
        );
        let prompt = |a: &str, b: &str| {
            serde_json::json!({
                "1": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": a, "clip_name2": b, "type": "sd3"}},
                "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["1", 0]}},
                "3": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "cn"}},
            })
        };
        // CLIP-G named first: the narrower one is CLIP-L.
        let errs = import(&prompt("g", "l"), &models, &models).unwrap_err();
        let text: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
        assert!(
            text.iter()
                .any(|t| t.contains("node \"3\" (ControlNetLoader)")
                    && t.contains("not a diffusers Flux or SD3 ControlNet folder")),
            "{text:?}"
        );
        let mut ok = prompt("g", "l");
        ok.as_object_mut().unwrap().remove("3");
        ok["4"] = serde_json::json!({"class_type": "SaveImage", "inputs": {"images": ["2", 0]}});
        // SaveImage on a conditioning is our validator's business, not the importer's.
        let yaml = import(&ok, &models, &models)
            .map(|i| i.yaml)
            .unwrap_or_default();
        assert!(
            yaml.contains(
                "type: SD3TextEncode, inputs: {clip_l: n1_c2.encoder, clip_g: n1_c1.encoder"
            ),
            "{yaml}"
        );
        let errs = import(&prompt("t5", "t5"), &models, &models).unwrap_err();
        assert!(
            errs.iter()
                .any(|e| e.to_string().contains("two T5 encoders")),
            "{errs:?}"
        );
        let _ = std::fs::remove_dir_all(&models);
    }
}
