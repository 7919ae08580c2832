//! ComfyUI API-format prompts through `ditflow import-comfy` and `ditflow run`, on the model
//! families' tiny fixtures: Flux from a checkpoint or from separate UNET, dual-CLIP and VAE
//! loaders (the same picture either way); a Flux ControlNet through ControlNetApplyAdvanced
//! (strength 0 draws the picture without it, strength 1 another); SD3 from a checkpoint; the
//! demo model through CLIPLoader (the same picture as from its checkpoint).

mod common;

use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;

/// Imports `prompt` with checkpoint names relative to `models`, runs it, and returns the YAML
/// and the bytes of the image file `file` it wrote.
fn import_and_run(name: &str, prompt: &Value, models: &Path, file: &str) -> (String, Vec<u8>) {
    let dir = common::temp_dir(&format!("comfy-import-{name}"));
    let prompt_file = dir.join("prompt.json");
    std::fs::write(&prompt_file, prompt.to_string()).unwrap();
    let yaml_file = dir.join("graph.yaml");
    let o = Command::new(env!("CARGO_BIN_EXE_ditflow"))
        .arg("import-comfy")
        .arg(&prompt_file)
        .arg("--models")
        .arg(models)
        .arg("-o")
        .arg(&yaml_file)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = dir.join("out");
    let o = Command::new(env!("CARGO_BIN_EXE_ditflow"))
        .arg("run")
        .arg(&yaml_file)
        .arg("--out")
        .arg(&out)
        .env("DITFLOW_PLUGIN_PATH", common::plugin_dir())
        .output()
        .unwrap();
    let yaml = std::fs::read_to_string(&yaml_file).unwrap();
    assert!(
        o.status.success(),
        "{}\n{yaml}",
        String::from_utf8_lossy(&o.stderr)
    );
    (yaml, std::fs::read(out.join(file)).unwrap())
}

fn parity() -> std::path::PathBuf {
    common::repo().join("tests/fixtures/parity")
}

/// A Flux text-to-image prompt whose model, CLIP and VAE outputs are `model`, `clip` and `vae`
/// (links), with the nodes `loaders` that make them, and `extra` nodes; the sampler's
/// conditioning is `positive`/`negative`.
fn flux_prompt(
    loaders: Value,
    model: Value,
    clip: Value,
    vae: Value,
    positive: Value,
    negative: Value,
    size: u32,
) -> Value {
    let mut p = json!({
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": clip}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}},
        "10": {"class_type": "FluxGuidance", "inputs": {"guidance": 3.5, "conditioning": ["6", 0]}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": positive, "negative": negative, "latent_image": ["5", 0],
            "seed": 3, "steps": 3, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
            "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": vae}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "flux"}},
    });
    for (k, v) in loaders.as_object().unwrap() {
        p[k] = v.clone();
    }
    p
}

#[test]
fn a_flux_prompt_draws_the_same_picture_from_a_checkpoint_or_from_separate_loaders() {
    let file = "flux_00001_.png";
    let ckpt = flux_prompt(
        json!({"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "flux_pipeline"}}}),
        json!(["4", 0]),
        json!(["4", 1]),
        json!(["4", 2]),
        json!(["10", 0]),
        json!(["7", 0]),
        32,
    );
    let (yaml, from_ckpt) = import_and_run("flux-ckpt", &ckpt, &parity(), file);
    for ty in ["LoadFlux", "FluxTextEncode", "LoadVAE"] {
        assert!(yaml.contains(&format!("type: {ty},")), "{ty} in\n{yaml}");
    }
    // T5 named first, CLIP-L second: told apart by their configs.
    let separate = flux_prompt(
        json!({
            "11": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux_pipeline", "weight_dtype": "default"}},
            "12": {"class_type": "DualCLIPLoader", "inputs": {
                "clip_name1": "flux_pipeline/text_encoder_2", "clip_name2": "flux_pipeline/text_encoder",
                "type": "flux"}},
            "13": {"class_type": "VAELoader", "inputs": {"vae_name": "flux_pipeline/vae"}},
        }),
        json!(["11", 0]),
        json!(["12", 0]),
        json!(["13", 0]),
        json!(["10", 0]),
        json!(["7", 0]),
        32,
    );
    let (_, from_loaders) = import_and_run("flux-separate", &separate, &parity(), file);
    let (px, w, h) = common::png_pixels(&from_ckpt);
    assert_eq!((w, h), (32, 32));
    assert!(px.iter().any(|&v| v != px[0]), "not a blank picture");
    assert!(
        from_ckpt == from_loaders,
        "the two imports draw different pictures"
    );
}

#[test]
fn a_controlnet_on_the_conditioning_patches_the_sampler_s_model() {
    let file = "flux_00001_.png";
    let loaders = json!({
        "11": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux_controlnet", "weight_dtype": "default"}},
        "12": {"class_type": "DualCLIPLoader", "inputs": {
            "clip_name1": "flux_pipeline/text_encoder_2", "clip_name2": "flux_pipeline/text_encoder",
            "type": "flux"}},
        "13": {"class_type": "VAELoader", "inputs": {"vae_name": "flux_controlnet/vae"}},
        "14": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "flux_controlnet/controlnet"}},
        "15": {"class_type": "LoadImage", "inputs": {"image": "flux_controlnet/hint.png"}},
    });
    let with_strength = |strength: f64| {
        let mut l = loaders.clone();
        l["16"] = json!({"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["10", 0], "negative": ["7", 0], "control_net": ["14", 0],
            "image": ["15", 0], "vae": ["13", 0], "strength": strength,
            "start_percent": 0.0, "end_percent": 1.0}});
        flux_prompt(
            l,
            json!(["11", 0]),
            json!(["12", 0]),
            json!(["13", 0]),
            json!(["16", 0]),
            json!(["16", 1]),
            16,
        )
    };
    let plain = flux_prompt(
        loaders.clone(),
        json!(["11", 0]),
        json!(["12", 0]),
        json!(["13", 0]),
        json!(["10", 0]),
        json!(["7", 0]),
        16,
    );
    let (_, without) = import_and_run("cn-none", &plain, &parity(), file);
    let (yaml, zero) = import_and_run("cn-zero", &with_strength(0.0), &parity(), file);
    assert!(
        yaml.contains("type: ApplyFluxControlNet,") && yaml.contains("type: LoadFluxControlNet,"),
        "{yaml}"
    );
    let (_, full) = import_and_run("cn-full", &with_strength(1.0), &parity(), file);
    assert!(
        zero == without,
        "a ControlNet at strength 0 changes nothing"
    );
    assert!(
        full != without,
        "a ControlNet at strength 1 changes the picture"
    );
}

#[test]
fn an_sd3_checkpoint_imports_its_three_encoders_and_draws() {
    let p = json!({
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd3_pipeline"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["4", 1]}},
        "13": {"class_type": "ModelSamplingSD3", "inputs": {"shift": 3.0, "model": ["4", 0]}},
        "5": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["13", 0], "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0],
            "seed": 1, "steps": 3, "cfg": 4.0, "sampler_name": "euler", "scheduler": "sgm_uniform",
            "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "sd3"}},
    });
    let (yaml, png) = import_and_run("sd3-ckpt", &p, &parity(), "sd3_00001_.png");
    assert!(yaml.contains("type: LoadSD3,"), "{yaml}");
    assert!(
        yaml.contains("type: SD3TextEncode, inputs: {clip_l: n4_te.encoder, clip_g: n4_te2.encoder, t5: n4_te3.encoder"),
        "{yaml}"
    );
    assert_eq!(common::png_pixels(&png).1, 32);
}

#[test]
fn the_demo_through_clip_unet_and_vae_loaders_draws_its_checkpoint_s_picture() {
    let models = common::repo().join("models");
    let prompt = |loaders: Value, model: Value, clip: Value, vae: Value| {
        let mut p = json!({
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle on a blue background", "clip": clip}},
            "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}},
            "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "3": {"class_type": "KSampler", "inputs": {
                "model": model, "positive": ["6", 0], "negative": ["7", 0], "latent_image": ["5", 0],
                "seed": 5, "steps": 6, "cfg": 4.0, "sampler_name": "euler", "scheduler": "normal",
                "denoise": 1.0}},
            "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": vae}},
            "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "demo"}},
        });
        for (k, v) in loaders.as_object().unwrap() {
            p[k] = v.clone();
        }
        p
    };
    let ckpt = prompt(
        json!({"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "demo"}}}),
        json!(["4", 0]),
        json!(["4", 1]),
        json!(["4", 2]),
    );
    let separate = prompt(
        json!({
            "11": {"class_type": "UNETLoader", "inputs": {"unet_name": "demo", "weight_dtype": "default"}},
            "12": {"class_type": "CLIPLoader", "inputs": {"clip_name": "demo/text_encoder", "type": "stable_diffusion"}},
            "13": {"class_type": "VAELoader", "inputs": {"vae_name": "demo/vae"}},
        }),
        json!(["11", 0]),
        json!(["12", 0]),
        json!(["13", 0]),
    );
    let (_, a) = import_and_run("demo-ckpt", &ckpt, &models, "demo_00001_.png");
    let (yaml, b) = import_and_run("demo-separate", &separate, &models, "demo_00001_.png");
    assert!(yaml.contains("n12: {type: LoadTextEncoder"), "{yaml}");
    assert!(a == b, "CLIPLoader's picture differs from the checkpoint's");
}
