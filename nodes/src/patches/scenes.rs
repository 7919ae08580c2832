//! `SceneCaptions`: one video in several scenes, each following its own caption (Mask²DiT's
//! segment mask). The scenes' captions are encoded one after another into one conditioning, and
//! the patch puts a structured segment mask on the model's attention sites:
//! - cross-attention (Wan): the video tokens of scene s attend only to scene s's caption tokens,
//!   while the video's self-attention stays over all frames;
//! - joint attention (MMDiT, one sequence of both streams): the text of scene s attends to its
//!   own text and its scene's video, and the video of scene s to its scene's text and to all the
//!   video, Mask²DiT's own form. On an image model (a `[B, C, H, W]` latent) the scenes are
//!   bands of token rows, top to bottom: regional captions.
//!
//! So the scenes stay one continuous video. `EncodeScenes` encodes the list of scene prompts into
//! that conditioning and gives each scene's caption length.

use ditflow_plugin::attention::{AttentionKind, AttentionSite, Mask};
use ditflow_plugin::files::fnv1a;
use ditflow_plugin::model::{Call, Inputs, PatchHooks, PatchSpec};
use ditflow_plugin::prelude::*;
use std::sync::Mutex;

/// The segment ids of one call: each video token's scene and each caption token's scene.
#[derive(Clone, Debug, PartialEq)]
pub struct SceneSegments {
    pub video: Vec<i64>,
    pub text: Vec<i64>,
}

/// The segments of a video of `frames` latent frames with `per_frame` tokens each, cut into
/// scenes of `scene_frames` latent frames, whose captions have `scene_tokens` tokens each and
/// fill `text_len` tokens together.
pub fn scene_segments(
    frames: usize,
    per_frame: usize,
    text_len: usize,
    scene_frames: &[usize],
    scene_tokens: &[usize],
) -> Result<SceneSegments> {
    if scene_frames.is_empty() || scene_frames.len() != scene_tokens.len() {
        bail!(
            "{} scene lengths and {} caption lengths: give one of each per scene",
            scene_frames.len(),
            scene_tokens.len()
        );
    }
    let total: usize = scene_frames.iter().sum();
    if total != frames {
        bail!(
            "the scenes last {total} latent frames ({scene_frames:?}) but the video has {frames}: \
             their durations must add up to the video's"
        );
    }
    let tokens: usize = scene_tokens.iter().sum();
    if tokens != text_len {
        bail!(
            "the scenes' captions have {tokens} tokens ({scene_tokens:?}) but the conditioning \
             has {text_len}: encode the scenes' captions one after another, each to its length"
        );
    }
    let spread = |counts: &[usize], each: usize| -> Vec<i64> {
        counts
            .iter()
            .enumerate()
            .flat_map(|(s, &n)| std::iter::repeat_n(s as i64, n * each))
            .collect()
    };
    Ok(SceneSegments {
        video: spread(scene_frames, per_frame),
        text: spread(scene_tokens, 1),
    })
}

/// The patch: the scenes, and the segments of the current call (from its inputs).
struct Scenes {
    frames: Vec<usize>,
    tokens: Vec<usize>,
    patch: usize,
    /// The joint sequence's order: the video (image) stream first, then the text (SD3), or
    /// the text first (Flux).
    video_first: bool,
    segments: Mutex<Option<SceneSegments>>,
}

impl PatchHooks for Scenes {
    fn call_inputs(&self, _call: &Call, inputs: &Inputs) -> Result<()> {
        let x = inputs.require("hidden_states")?;
        let s = x.shape();
        // A video's scenes are runs of latent frames; an image's, bands of token rows.
        let (frames, per_frame) = match s.len() {
            5 => (s[2], (s[3] / self.patch) * (s[4] / self.patch)),
            4 => (s[2] / self.patch, s[3] / self.patch),
            _ => bail!(
                "SceneCaptions needs a video latent [B, C, frames, H, W] or an image latent \
                 [B, C, H, W], got {s:?}"
            ),
        };
        let text = inputs.require("encoder_hidden_states")?;
        let segs = scene_segments(
            frames,
            per_frame,
            text.shape().get(1).copied().unwrap_or(0),
            &self.frames,
            &self.tokens,
        )?;
        *self.segments.lock().unwrap_or_else(|p| p.into_inner()) = Some(segs);
        Ok(())
    }

    fn attention_mask(&self, _call: &Call, site: &AttentionSite) -> Result<Option<Mask>> {
        let segs = self.segments.lock().unwrap_or_else(|p| p.into_inner());
        let Some(s) = segs.as_ref() else {
            return Ok(None);
        };
        let n = self.frames.len();
        Ok(match site.kind {
            AttentionKind::Cross => Some(Mask::Segments {
                q: s.video.clone(),
                k: s.text.clone(),
                n,
                allow: (0..n * n).map(|i| i / n == i % n).collect(),
            }),
            AttentionKind::Joint => Some(joint_mask(s, n, self.video_first)),
            AttentionKind::SelfAttention => None,
        })
    }
}

/// Mask²DiT's mask over one joint sequence of `n` scenes: segment `s` is scene s's video,
/// segment `n + s` its text. Video attends to all video and to its scene's text; text to its
/// own text and its scene's video.
pub fn joint_mask(s: &SceneSegments, n: usize, video_first: bool) -> Mask {
    let text: Vec<i64> = s.text.iter().map(|&t| t + n as i64).collect();
    let ids = if video_first {
        [s.video.as_slice(), &text].concat()
    } else {
        [text.as_slice(), &s.video].concat()
    };
    let allow = (0..4 * n * n)
        .map(|i| {
            let (a, b) = (i / (2 * n), i % (2 * n));
            match (a < n, b < n) {
                (true, true) => true,
                (true, false) => b - n == a,
                (false, true) => a - n == b,
                (false, false) => a == b,
            }
        })
        .collect();
    Mask::Segments {
        q: ids.clone(),
        k: ids,
        n: 2 * n,
        allow,
    }
}

fn counts(ctx: &Context, name: &str) -> Result<Vec<usize>> {
    let v: Value = ctx.input(name)?;
    v.as_list()?
        .iter()
        .map(|x| {
            let n = x.as_int()?;
            usize::try_from(n)
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| Error(format!("input '{name}': {n} is not a positive count")))
        })
        .collect()
}

/// `EncodeScenes`: a list of scene prompts as one conditioning.
#[derive(Default)]
pub struct EncodeScenes;

impl Node for EncodeScenes {
    fn schema() -> NodeSchema {
        NodeSchema::new("EncodeScenes")
            .category("conditioning")
            .doc(
                "Encodes each scene's prompt (as TextEncode does) and lays the captions one \
                 after another in one conditioning, for SceneCaptions: its tokens output gives \
                 each caption's length. An empty prompt list is refused.",
            )
            .input(Port::new("encoder", "Model<TextEncoder>").doc("From LoadTextEncoder."))
            .input(Port::new("prompts", "List<String>").doc("The scenes' prompts, in order."))
            .input(
                Port::new("max_tokens", "Int")
                    .default(120i64)
                    .range(1.0, 4096.0)
                    .doc("Tokens kept at most per prompt."),
            )
            .input(
                Port::new("pad_to", "Int")
                    .default(0i64)
                    .range(0.0, 4096.0)
                    .doc("Zero-pad each caption to this many tokens (0: its real tokens)."),
            )
            .output(Port::new("conditioning", "Conditioning").doc("The captions, scene by scene."))
            .output(Port::new("tokens", "List<Int>").doc("Each caption's length in tokens."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let enc: Value = ctx.input("encoder")?;
        let prompts: Value = ctx.input("prompts")?;
        let prompts: Vec<String> = prompts
            .as_list()?
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_str()
                    .map(str::to_string)
                    .map_err(|_| Error(format!("input 'prompts': item {i} is not a String")))
            })
            .collect::<Result<_>>()?;
        if prompts.is_empty() {
            bail!("input 'prompts': give at least one scene's prompt");
        }
        let max = ctx.input::<i64>("max_tokens")?.max(1) as usize;
        let pad = ctx.input::<i64>("pad_to")?.max(0) as usize;
        let captions = prompts
            .iter()
            .map(|p| crate::pipeline::encode_text(&enc, p, max, pad))
            .collect::<Result<Vec<_>>>()?;
        let tokens: Vec<Value> = captions
            .iter()
            .map(|c| Value::int(c.shape()[1] as i64))
            .collect();
        let all = ditflow_plugin::ops::concat(&captions.iter().collect::<Vec<_>>(), 1)?;
        ctx.set_output("conditioning", all.with_kind(Kind::Conditioning)?)?;
        ctx.set_output("tokens", Value::list(tokens))
    }
}

/// `SceneCaptions`: model → model whose scenes follow their own captions.
#[derive(Default)]
pub struct SceneCaptions;

impl Node for SceneCaptions {
    fn schema() -> NodeSchema {
        NodeSchema::new("SceneCaptions")
            .category("patches")
            .doc(
                "Cuts a video into scenes that follow their own captions (Mask²DiT's segment \
                 mask): encode the scenes' captions one after another into one conditioning. On \
                 a cross-attention model (Wan) the video tokens of scene s attend only to scene \
                 s's caption tokens, while the video's self-attention spans all frames; on a \
                 joint-attention model (SD3) the text of scene s attends to its own text and \
                 its scene's video, and the video to its scene's text and all the video. On an \
                 image model the scenes are bands of token rows, top to bottom. The scenes' \
                 latent frames (or token rows) must add up to the latent's, and their caption \
                 lengths to the conditioning's.",
            )
            .input(
                Port::new("model", "Model<Denoiser>")
                    .doc("A denoiser with cross- or joint-attention sites (LoadWan, LoadSD3)."),
            )
            .input(
                Port::new("frames", "List<Int>")
                    .doc("Each scene's length in latent frames (an image: token rows), in order."),
            )
            .input(
                Port::new("tokens", "List<Int>")
                    .doc("Each scene's caption length in tokens, in order."),
            )
            .output(Port::new("model", "Model<Denoiser>").doc("The model with the scene mask."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let model: Value = ctx.input("model")?;
        let frames = counts(ctx, "frames")?;
        let tokens = counts(ctx, "tokens")?;
        if frames.len() != tokens.len() || frames.is_empty() {
            bail!(
                "{} scene lengths and {} caption lengths: give one of each per scene",
                frames.len(),
                tokens.len()
            );
        }
        let info = model
            .as_denoiser()
            .map_err(|e| Error(format!("input 'model': {e}")))?
            .info()
            .clone();
        let patch = info.patch_size.max(1);
        let video_first = info.streams.first().is_none_or(|s| s.name != "text");
        // The mask goes to the cross-attention sites of the first stack that has attention sites.
        let stack = info
            .stacks
            .iter()
            .position(|s| s.sites & ditflow_plugin::abi::DF_SITE_ATTN != 0)
            .ok_or_else(|| {
                Error::new(
                    "input 'model': this denoiser offers no attention sites for a scene mask",
                )
            })?;
        let mut spec = PatchSpec::new(&format!("SceneCaptions({} scenes)", frames.len()));
        spec.attention_mask = true;
        spec.call_inputs = true;
        spec.stack = Some(stack);
        spec.required_capabilities = ditflow_plugin::abi::DF_CAP_ATTENTION_MASK;
        spec.digest = frames
            .iter()
            .chain(&[usize::MAX])
            .chain(&tokens)
            .fold(0x005c_e9e5_u64, |h, n| fnv1a(h, &n.to_le_bytes()))
            | 1;
        let hooks = Scenes {
            frames,
            tokens,
            patch,
            video_first,
            segments: Mutex::new(None),
        };
        let v = ctx.patch_model(&model, &spec, hooks)?;
        ctx.set_output("model", v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_follow_the_scenes_and_their_durations_must_add_up() {
        let s = scene_segments(3, 2, 5, &[1, 2], &[2, 3]).unwrap();
        assert_eq!(s.video, [0, 0, 1, 1, 1, 1]);
        assert_eq!(s.text, [0, 0, 1, 1, 1]);
        let e = scene_segments(4, 2, 5, &[1, 2], &[2, 3]).unwrap_err();
        assert!(e.0.contains("add up"), "{}", e.0);
        let e = scene_segments(3, 2, 6, &[1, 2], &[2, 3]).unwrap_err();
        assert!(e.0.contains("6"), "{}", e.0);
    }

    #[test]
    fn the_joint_mask_is_mask2dit_s() {
        // Two scenes: video tokens [0, 1, 1], text tokens [0, 1]; image first.
        let s = SceneSegments {
            video: vec![0, 1, 1],
            text: vec![0, 1],
        };
        let Mask::Segments { q, k, n, allow } = joint_mask(&s, 2, true) else {
            panic!("a segment mask")
        };
        assert_eq!(q, [0, 1, 1, 2, 3]);
        assert_eq!(q, k);
        assert_eq!(n, 4);
        let sees = |a: usize, b: usize| allow[a * 4 + b];
        // Video of scene 0 sees all video and its own text only.
        assert!(sees(0, 0) && sees(0, 1) && sees(0, 2) && !sees(0, 3));
        // Text of scene 1 sees its own text and its scene's video only.
        assert!(!sees(3, 0) && sees(3, 1) && !sees(3, 2) && sees(3, 3));
        let Mask::Segments { q, .. } = joint_mask(&s, 2, false) else {
            panic!("a segment mask")
        };
        assert_eq!(q, [2, 3, 0, 1, 1]);
    }
}
