//! A bridge between two towers: a folder with `config.json` and safetensors. Its class is
//! - `DualCrossAttentionBridge` (BridgeDiT): bridge blocks of their own, with the blocks'
//!   widths, heads, `flag`, the tower blocks each bridge block follows (`video_points` and
//!   `audio_points`) and the RoPE alignment (`rope_positions`), in BridgeDiT's names
//!   (`dual_dit_blocks.{i}.attn.q_proj_1`, ...);
//! - `FusedCrossAttentionBridge` (Ovi): key/value paths into each tower's own cross-attention
//!   in the paired blocks ([`crate::fused`]).
//!
//! `LoadBridge` reads it; `BridgeBlock` runs block `i` of a dual cross-attention bridge on the
//! two streams' tokens and time embeddings, for checking it and for graphs that step towers by
//! hand; [`bridged_forward`] couples two towers through block stepping.

use crate::fused::{Fused, FusedTowers};
use ditflow_nn::bridge::{BridgeDims, DualCrossBlock, Exchange, Positions};
use ditflow_nn::{Config, Weights};
use ditflow_plugin::files::{input_path, model_fingerprint};
use ditflow_plugin::linear_delta::LinearDeltas;
use ditflow_plugin::model::{BlockPart, DenoiserRef};
use ditflow_plugin::prelude::*;
use ditflow_plugin::Object;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How a bridge exchanges between the towers.
pub enum Exchanges {
    /// Bridge blocks of their own (BridgeDiT's dual cross-attention blocks), block `i` after
    /// the tower blocks of point `i`.
    Blocks(Vec<DualCrossBlock>),
    /// Ovi's key/value injection into the cross-attentions of each point's tower blocks.
    Fused(Arc<Fused>),
}

/// A loaded bridge.
pub struct Bridge {
    pub exchanges: Exchanges,
    /// The tower blocks (video, audio) that exchange `i` follows (blocks) or sits in (fused).
    pub points: Vec<(usize, usize)>,
    /// Where the two streams' tokens sit for the blocks' RoPE.
    pub positions: Positions,
    pub path: PathBuf,
}

impl Object for Bridge {
    const TAG: &'static str = "ditflow-av-bridge.bridge";
}

impl Bridge {
    pub fn load(path: &Path, device: Device, ctx: &Context) -> Result<Bridge> {
        let cfg = Config::read(path)?;
        let bad = |what: String| Error(format!("{}: {what}", cfg.path.display()));
        match cfg.class_name() {
            Some("DualCrossAttentionBridge") => {}
            Some("FusedCrossAttentionBridge") => {
                return Bridge::load_fused(&cfg, path, device, ctx)
            }
            other => {
                return Err(bad(format!(
                    "class \"{}\" is not a DualCrossAttentionBridge or a \
                     FusedCrossAttentionBridge",
                    other.unwrap_or("")
                )))
            }
        }
        let n = cfg.usize_or("num_blocks", 4)?;
        let c1 = cfg.usize_or("num_input_channels_1", 1536)?;
        let c2 = cfg.usize_or("num_input_channels_2", 1536)?;
        let qk = cfg.usize_or("num_qk_channels", c1.min(c2))?;
        let dims = BridgeDims {
            heads: cfg.usize_or("num_heads", 12)?,
            channels: (c1, c2),
            emb: (
                cfg.usize_or("t_emb_dim_1", c1)?,
                cfg.usize_or("t_emb_dim_2", c2)?,
            ),
            qk,
            v: cfg.usize_or("num_v_channels", qk)?,
            mlp_ratio: cfg.f64_or("mlp_ratio", 4.0)?,
        };
        let exchange = Exchange::parse(cfg.str_or("flag", "bicross")?).map_err(|e| bad(e.0))?;
        let points =
            |key: &str| -> Result<Vec<usize>> { Ok(block_list(&cfg, key)?.unwrap_or_default()) };
        let (vp, ap) = (points("video_points")?, points("audio_points")?);
        if vp.len() != ap.len() || (!vp.is_empty() && vp.len() != n) {
            return Err(bad(format!(
                "{} video points and {} audio points for {n} bridge blocks: each block follows \
                 one block of each tower",
                vp.len(),
                ap.len()
            )));
        }
        let positions = rope_positions(&cfg).map_err(|e| bad(e.0))?;
        if exchange == Exchange::Additive && !matches!(positions, Positions::Scaled { .. }) {
            return Err(bad(
                "the additive exchange meets the streams at their token times: rope_positions \
                 must be scaled or seconds"
                    .into(),
            ));
        }
        let w = Weights::load(ctx, path, device)?;
        let blocks = (0..n)
            .map(|i| DualCrossBlock::load(&w, &format!("dual_dit_blocks.{i}"), dims, exchange))
            .collect::<Result<_>>()?;
        Ok(Bridge {
            exchanges: Exchanges::Blocks(blocks),
            points: vp.into_iter().zip(ap).collect(),
            positions,
            path: path.to_path_buf(),
        })
    }

    /// A `FusedCrossAttentionBridge`: `video_points` and `audio_points` pair the tower blocks
    /// (every block of towers of `num_blocks` when absent, as Ovi).
    fn load_fused(cfg: &Config, path: &Path, device: Device, ctx: &Context) -> Result<Bridge> {
        let bad = |what: String| Error(format!("{}: {what}", cfg.path.display()));
        let (vp, ap) = (
            block_list(cfg, "video_points")?,
            block_list(cfg, "audio_points")?,
        );
        let (vp, ap) = match (vp, ap, cfg.opt_usize("num_blocks")?) {
            (None, None, Some(n)) => ((0..n).collect(), (0..n).collect()),
            (Some(v), Some(a), _) if v.len() == a.len() && !v.is_empty() => (v, a),
            _ => {
                return Err(bad(
                    "a fused bridge pairs tower blocks: give video_points and audio_points of \
                     one length, or num_blocks for every block of both towers"
                        .into(),
                ))
            }
        };
        let points: Vec<(usize, usize)> = vp.into_iter().zip(ap).collect();
        let positions = rope_positions(cfg).map_err(|e| bad(e.0))?;
        let fused = Fused::load(cfg, path, &points, device, ctx)?;
        Ok(Bridge {
            exchanges: Exchanges::Fused(Arc::new(fused)),
            points,
            positions,
            path: path.to_path_buf(),
        })
    }

    /// The bridge's own blocks, or an error naming the file for a fused bridge.
    pub fn blocks(&self) -> Result<&[DualCrossBlock]> {
        match &self.exchanges {
            Exchanges::Blocks(b) => Ok(b),
            Exchanges::Fused(_) => Err(Error(format!(
                "{}: a fused cross-attention bridge has no blocks of its own (it runs inside the \
                 towers' cross-attention)",
                self.path.display()
            ))),
        }
    }
}

/// A list of block indices under `key`, `None` when absent.
fn block_list(cfg: &Config, key: &str) -> Result<Option<Vec<usize>>> {
    match cfg.json.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_array()
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|x| x as usize)).collect())
            .map(Some)
            .ok_or_else(|| {
                Error(format!(
                    "{}: {key} must be a list of block indices",
                    cfg.path.display()
                ))
            }),
    }
}

/// The config's RoPE alignment, `rope_positions`:
/// - `index` (the default; BridgeDiT): each stream's sequence index;
/// - `scaled` (Ovi): the video's frame index times `video_position_scale` (1), the audio's token
///   index times `audio_position_scale` (Ovi: 0.19676);
/// - `seconds` (LTX-2): each token's time, `video_seconds_per_frame` per video frame and
///   `audio_seconds_per_token` per audio token, times `positions_per_second` (1);
/// - `none`: no rotation.
///
/// With `scaled` and `seconds`, the first `audio_prefix_tokens` audio tokens (Stable Audio's
/// global token) sit at 0.
fn rope_positions(cfg: &Config) -> Result<Positions> {
    let prefix = cfg.usize_or("audio_prefix_tokens", 0)?;
    let mode = cfg.str_or("rope_positions", "index")?;
    let positive = |key: &str, v: f64| -> Result<f64> {
        if v.is_finite() && v > 0.0 {
            Ok(v)
        } else {
            Err(Error(format!("{key} must be a positive number, got {v}")))
        }
    };
    Ok(match mode {
        "index" => Positions::Index,
        "none" => Positions::Off,
        "scaled" => Positions::Scaled {
            first: positive(
                "video_position_scale",
                cfg.f64_or("video_position_scale", 1.0)?,
            )?,
            second: positive(
                "audio_position_scale",
                cfg.f64_or("audio_position_scale", 1.0)?,
            )?,
            second_prefix: prefix,
        },
        "seconds" => {
            let need = |key: &str| -> Result<f64> {
                match cfg.json.get(key).and_then(|v| v.as_f64()) {
                    Some(v) => positive(key, v),
                    None => Err(Error(format!(
                        "rope_positions \"seconds\" needs {key} (a number)"
                    ))),
                }
            };
            let per_second = positive(
                "positions_per_second",
                cfg.f64_or("positions_per_second", 1.0)?,
            )?;
            Positions::Scaled {
                first: need("video_seconds_per_frame")? * per_second,
                second: need("audio_seconds_per_token")? * per_second,
                second_prefix: prefix,
            }
        }
        other => {
            return Err(Error(format!(
                "rope_positions \"{other}\" is not one of index, scaled, seconds, none"
            )))
        }
    })
}

/// `LoadBridge`: a bridge folder.
#[derive(Default)]
pub struct LoadBridge;

impl Node for LoadBridge {
    fn schema() -> NodeSchema {
        NodeSchema::new("LoadBridge")
            .category("loaders")
            .doc(
                "Loads an audio-video bridge: a folder with config.json (DualCrossAttentionBridge: \
                 num_blocks, num_heads, the two streams' widths, flag bicross|a2v|v2a|joint|additive, rope_positions index|scaled|seconds|none, and the \
                 tower blocks each bridge block follows) and safetensors in BridgeDiT's names \
                 (dual_dit_blocks.{i}.attn.q_proj_1, ...). Cached until a file changes.",
            )
            .input(Port::new("path", "String").doc("The bridge folder; a relative path is taken from the graph's folder."))
            .output(Port::new("bridge", "Model").doc("The bridge."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let dir = input_path(ctx, "path")?;
        let bridge = Bridge::load(&dir, ctx.device(), ctx)?;
        let value = ctx.make_object(bridge)?;
        ctx.set_output("bridge", value)
    }

    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        model_fingerprint(&input_path(ctx, "path")?).map(Some)
    }
}

/// `BridgeBlock`: one bridge block on two streams.
#[derive(Default)]
pub struct BridgeBlock;

impl Node for BridgeBlock {
    fn schema() -> NodeSchema {
        NodeSchema::new("BridgeBlock")
            .category("audio-video")
            .doc(
                "Runs block `index` of a bridge on the two towers' tokens: each stream modulated \
                 by its time embedding, the exchange (bicross: each attends to the other), RoPE \
                 over each stream's own sequence index, and the gated MLPs.",
            )
            .input(Port::new("bridge", "Model").doc("From LoadBridge."))
            .input(
                Port::new("index", "Int")
                    .default(0i64)
                    .range(0.0, 1024.0)
                    .doc("The bridge block."),
            )
            .input(Port::new("video", "Tensor").doc("The first stream's tokens [B, N1, C1]."))
            .input(Port::new("audio", "Tensor").doc("The second stream's tokens [B, N2, C2]."))
            .input(
                Port::new("video_emb", "Tensor").doc("The first tower's time embedding [B, E1]."),
            )
            .input(
                Port::new("audio_emb", "Tensor").doc("The second tower's time embedding [B, E2]."),
            )
            .input(
                Port::new("rope", "Bool")
                    .default(true)
                    .doc("Rotate q and k (at each stream's sequence index, or the bridge's positions when frames is given)."),
            )
            .input(
                Port::new("frames", "Int")
                    .default(0i64)
                    .range(0.0, 1e6)
                    .doc("The video's latent frames: with it, the bridge's rope_positions place the tokens (0: sequence index)."),
            )
            .output(Port::new("video", "Tensor").doc("The first stream after the block."))
            .output(Port::new("audio", "Tensor").doc("The second stream after the block."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let bridge: Value = ctx.input("bridge")?;
        let b = bridge
            .as_object::<Bridge>()
            .map_err(|e| Error(format!("input 'bridge': {e} (load it with LoadBridge)")))?;
        let index: i64 = ctx.input("index")?;
        let blocks = b.blocks()?;
        let blk = usize::try_from(index)
            .ok()
            .and_then(|i| blocks.get(i))
            .ok_or_else(|| {
                Error(format!(
                    "{}: block {index} of a bridge of {} blocks",
                    b.path.display(),
                    blocks.len()
                ))
            })?;
        let device = ctx.device();
        let t = |name: &str| -> Result<Tensor> { ctx.input::<Tensor>(name)?.to_device(device) };
        let (video, audio) = (t("video")?, t("audio")?);
        let rope: bool = ctx.input("rope")?;
        let frames: i64 = ctx.input("frames")?;
        let positions = match (rope, frames) {
            (false, _) => Positions::Off,
            (true, 0) => Positions::Index,
            (true, _) => b.positions,
        };
        if blk.exchange == Exchange::Additive && !matches!(positions, Positions::Scaled { .. }) {
            bail!(
                "{}: the additive exchange meets the streams at their token times: give the \
                 video's frames",
                b.path.display()
            );
        }
        let p = positions.compute(video.shape()[1], frames.max(0) as usize, audio.shape()[1])?;
        let (v, a) = blk.forward(
            &video,
            &audio,
            &t("video_emb")?,
            &t("audio_emb")?,
            p.as_ref().map(|(a, b)| (a.as_slice(), b.as_slice())),
            LinearDeltas::none(),
        )?;
        ctx.set_output("video", v)?;
        ctx.set_output("audio", a)
    }
}

/// The named `in.*` tensors of a safetensors file, for a tower's forward.
fn tower_inputs(ctx: &Context, input: &str) -> Result<Vec<(String, Tensor)>> {
    let path = input_path(ctx, input)?;
    let all = ctx.load_weights(&path.to_string_lossy(), Device::Cpu)?;
    let mut named: Vec<(String, Tensor)> = all
        .into_iter()
        .filter_map(|(k, v)| k.strip_prefix("in.").map(|n| (n.to_string(), v)))
        .collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    if named.is_empty() {
        bail!("{}: no in.* tensors", path.display());
    }
    Ok(named)
}

/// A tower's named inputs.
pub type Named<'a> = [(&'a str, &'a Tensor)];

/// Two towers ready for a bridge: as given, and, for a fused bridge, each carrying its
/// injection patch.
pub struct Coupled {
    pub video: Value,
    pub audio: Value,
    fused: Option<FusedTowers>,
}

impl Coupled {
    pub fn new(ctx: &Context, bridge: &Bridge, video: &Value, audio: &Value) -> Result<Coupled> {
        let fused = match &bridge.exchanges {
            Exchanges::Blocks(_) => None,
            Exchanges::Fused(f) => Some(FusedTowers::new(ctx, f, &bridge.path, video, audio)?),
        };
        Ok(Coupled {
            video: video.clone(),
            audio: audio.clone(),
            fused,
        })
    }
}

/// Both towers' predictions for one call, coupled by the bridge through block stepping (each
/// bridge block after its tower blocks, or the fused exchange inside each paired block); with
/// `enabled` false the towers run alone (each still stepped, so the two results differ by the
/// bridge only).
pub fn bridged_forward(
    bridge: &Bridge,
    towers: &Coupled,
    calls: (&ditflow_plugin::model::Call, &ditflow_plugin::model::Call),
    inputs: (&Named, &Named),
    enabled: bool,
) -> Result<(Tensor, Tensor)> {
    let file = bridge.path.display();
    let fused = match (&towers.fused, enabled) {
        (Some(f), true) => Some(f),
        _ => None,
    };
    let (video, audio) = match fused {
        Some(f) => (&f.video, &f.audio),
        None => (&towers.video, &towers.audio),
    };
    let video = video
        .as_denoiser()
        .map_err(|e| Error(format!("the video tower: {e}")))?;
    let audio = audio
        .as_denoiser()
        .map_err(|e| Error(format!("the audio tower: {e}")))?;
    let need = if towers.fused.is_some() {
        ditflow_plugin::abi::DF_CAP_BLOCK_PARTS
    } else {
        ditflow_plugin::abi::DF_CAP_BLOCK_STEPPING
    };
    let blocks = |d: &DenoiserRef, which: &str| -> Result<usize> {
        let info = d.info();
        if info.capabilities & need == 0 {
            bail!(
                "{file}: the {which} tower cannot be stepped {}, which this bridge needs",
                if towers.fused.is_some() {
                    "block by block in halves (up to its cross-attention, then the rest)"
                } else {
                    "block by block"
                }
            );
        }
        match info.stacks.as_slice() {
            [s] => Ok(s.n_blocks),
            s => bail!(
                "{file}: the {which} tower has {} block stacks; a bridge couples towers of one",
                s.len()
            ),
        }
    };
    let (nv, na) = (blocks(&video, "video")?, blocks(&audio, "audio")?);
    let mut last = (None::<usize>, None::<usize>);
    for (i, &(v, a)) in bridge.points.iter().enumerate() {
        if v >= nv || a >= na || last.0.is_some_and(|p| v <= p) || last.1.is_some_and(|p| a <= p) {
            bail!(
                "{file}: bridge point {i} pairs video block {v} with audio block {a}, which do \
                 not fit towers of {nv} and {na} blocks in increasing order"
            );
        }
        last = (Some(v), Some(a));
    }
    if let Exchanges::Blocks(b) = &bridge.exchanges {
        if bridge.points.len() != b.len() {
            bail!(
                "{file}: the bridge gives no tower blocks to follow (video_points, audio_points)"
            );
        }
    }
    let (cv, ca) = calls;
    let mut sv = video.prepare(cv, inputs.0)?;
    let mut sa = audio.prepare(ca, inputs.1)?;
    // The video latent `[B, C, F, H, W]`: its frames place its tokens in time, and its token
    // grid (frames, rows, columns) sets a fused bridge's Wan-style RoPE.
    let grid = {
        let p = video.info().patch_size.max(1);
        let shape = inputs
            .0
            .iter()
            .find(|(k, _)| *k == "hidden_states")
            .map(|(_, t)| t.shape().to_vec())
            .unwrap_or_default();
        match shape.as_slice() {
            [_, _, f, h, w] => [*f, h / p, w / p],
            [_, _, f, ..] => [*f, 0, 0],
            _ => [0, 0, 0],
        }
    };
    let frames = grid[0];
    let rope = if enabled {
        bridge
            .positions
            .compute(sv.hidden.shape()[1], frames, sa.hidden.shape()[1])
            .map_err(|e| Error(format!("{file}: {}", e.0)))?
    } else {
        None
    };
    let rope = rope.as_ref().map(|(a, b)| (a.as_slice(), b.as_slice()));
    let tables = match fused {
        Some(f) => f.tables(rope, grid, sv.hidden.device())?,
        None => None,
    };
    let (mut next_v, mut next_a) = (0usize, 0usize);
    for (i, &(v, a)) in bridge.points.iter().enumerate() {
        if let Some(f) = fused {
            // Up to the paired blocks, their first halves, the exchange inside their second.
            if next_v < v {
                sv = video.run_blocks(cv, &sv, 0, next_v, v - 1)?;
            }
            if next_a < a {
                sa = audio.run_blocks(ca, &sa, 0, next_a, a - 1)?;
            }
            sv = video.run_block_part(cv, &sv, 0, v, BlockPart::ToCross)?;
            sa = audio.run_block_part(ca, &sa, 0, a, BlockPart::ToCross)?;
            f.arm(i, (v, a), (&sv.hidden, &sa.hidden), tables.as_ref())?;
            let rest = audio
                .run_block_part(ca, &sa, 0, a, BlockPart::FromCross)
                .and_then(|s| {
                    Ok((
                        s,
                        video.run_block_part(cv, &sv, 0, v, BlockPart::FromCross)?,
                    ))
                });
            f.disarm();
            (sa, sv) = rest?;
        } else {
            // Up to and through the blocks a bridge block follows, then the bridge block.
            if next_v <= v {
                sv = video.run_blocks(cv, &sv, 0, next_v, v)?;
            }
            if next_a <= a {
                sa = audio.run_blocks(ca, &sa, 0, next_a, a)?;
            }
            if let (Exchanges::Blocks(blocks), true) = (&bridge.exchanges, enabled) {
                let emb = |s: &ditflow_plugin::model::StepState, which: &str| {
                    s.embedding.clone().ok_or_else(|| {
                        Error(format!(
                            "{file}: the {which} tower's state carries no time embedding for the \
                             bridge"
                        ))
                    })
                };
                let (ev, ea) = (emb(&sv, "video")?, emb(&sa, "audio")?);
                let (hv, ha) = blocks[i].forward(
                    &sv.hidden,
                    &sa.hidden,
                    &ev,
                    &ea,
                    rope,
                    LinearDeltas::none(),
                )?;
                sv.hidden = hv;
                sa.hidden = ha;
            }
        }
        (next_v, next_a) = (v + 1, a + 1);
    }
    if next_v < nv {
        sv = video.run_blocks(cv, &sv, 0, next_v, nv - 1)?;
    }
    if next_a < na {
        sa = audio.run_blocks(ca, &sa, 0, next_a, na - 1)?;
    }
    Ok((video.finish(cv, &sv)?, audio.finish(ca, &sa)?))
}

/// `BridgedForward`: one forward of two towers coupled by a bridge.
#[derive(Default)]
pub struct BridgedForward;

impl Node for BridgedForward {
    fn schema() -> NodeSchema {
        NodeSchema::new("BridgedForward")
            .category("audio-video")
            .doc(
                "One forward of a video and an audio tower coupled by a bridge, through block \
                 stepping: each tower runs up to the block a bridge block follows, the bridge \
                 block exchanges their hidden states (modulated by each tower's time \
                 embedding), and so on, then each tower's head. Each tower's named inputs are \
                 the in.* tensors of its file. With enabled false the towers run alone.",
            )
            .input(
                Port::new("video", "Model<Denoiser>").doc("The video tower (stepping: LoadWan)."),
            )
            .input(
                Port::new("audio", "Model<Denoiser>")
                    .doc("The audio tower (stepping: LoadStableAudio)."),
            )
            .input(Port::new("bridge", "Model").doc("From LoadBridge."))
            .input(
                Port::new("video_inputs", "String")
                    .doc("A safetensors file of the video tower's in.* inputs."),
            )
            .input(
                Port::new("audio_inputs", "String")
                    .doc("A safetensors file of the audio tower's in.* inputs."),
            )
            .input(
                Port::new("enabled", "Bool")
                    .default(true)
                    .doc("Run the bridge (false: the towers alone)."),
            )
            .output(Port::new("video", "Tensor").doc("The video tower's prediction."))
            .output(Port::new("audio", "Tensor").doc("The audio tower's prediction."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let video: Value = ctx.input("video")?;
        let audio: Value = ctx.input("audio")?;
        let bridge: Value = ctx.input("bridge")?;
        let b = bridge
            .as_object::<Bridge>()
            .map_err(|e| Error(format!("input 'bridge': {e} (load it with LoadBridge)")))?;
        for (name, v) in [("video", &video), ("audio", &audio)] {
            v.as_denoiser()
                .map_err(|e| Error(format!("input '{name}': {e}")))?;
        }
        let towers = Coupled::new(ctx, b, &video, &audio)?;
        let vi = tower_inputs(ctx, "video_inputs")?;
        let ai = tower_inputs(ctx, "audio_inputs")?;
        let vr: Vec<(&str, &Tensor)> = vi.iter().map(|(k, t)| (k.as_str(), t)).collect();
        let ar: Vec<(&str, &Tensor)> = ai.iter().map(|(k, t)| (k.as_str(), t)).collect();
        let rows = |r: &[(&str, &Tensor)]| {
            r.iter()
                .find(|(k, _)| *k == "hidden_states")
                .map_or(1, |(_, t)| t.shape()[0])
        };
        let cv = ditflow_plugin::model::Call::single(rows(&vr), 0.0);
        let ca = ditflow_plugin::model::Call::single(rows(&ar), 0.0);
        let enabled: bool = ctx.input("enabled")?;
        let (v, a) = bridged_forward(b, &towers, (&cv, &ca), (&vr, &ar), enabled)?;
        ctx.set_output("video", v.to_device(Device::Cpu)?)?;
        ctx.set_output("audio", a.to_device(Device::Cpu)?)
    }
}
