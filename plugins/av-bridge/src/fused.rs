//! Ovi's fused cross-attention as a bridge (`FusedCrossAttentionBridge`): no blocks of its own,
//! but key/value paths from each tower into the other's text cross-attention, in every paired
//! block. Run through block stepping by halves: both towers' paired blocks run up to their
//! cross-attention's input, each tower's hidden state there becomes the other's target, and the
//! rest of each block runs with an extra attention branch (an `attention_extra` patch on the
//! tower's cross-attention site) over the other's target, as Ovi's `single_fusion_block_forward`
//! does (the audio after its self-attention, the video after its self-attention).
//!
//! The bridge folder holds Ovi's fusion tensors under Ovi's names
//! (`video_model.blocks.{i}.cross_attn.k_fusion.weight`, `audio_model.blocks.{j}.cross_attn...`).

use ditflow_nn::bridge::{FusedKv, RopeTables};
use ditflow_nn::embeddings::rotary_tables_at_f32;
use ditflow_nn::{Config, Weights};
use ditflow_plugin::attention::{AttentionKind, AttentionSite};
use ditflow_plugin::files::fnv1a;
use ditflow_plugin::linear_delta::LinearDeltas;
use ditflow_plugin::model::{Call, PatchHooks, PatchSpec};
use ditflow_plugin::prelude::*;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// The fusion layers of one block pair: in the video tower's cross-attention (keys and values
/// from the audio) and in the audio tower's (from the video).
pub struct FusedPair {
    pub video: FusedKv,
    pub audio: FusedKv,
}

/// A fused bridge's layers and its towers' query heads.
pub struct Fused {
    pub pairs: Vec<FusedPair>,
    pub heads: (usize, usize),
    /// The rotated prefix of each head (Ovi: 44, the temporal band); 0 when not rotated.
    pub rope_dims: usize,
    /// `Some(axes)`: the video side rotates its whole head as Wan does, over the axes' widths
    /// (time, height, width: Ovi's 44, 42, 42), the time band at the frame positions, the
    /// others at each token's row and column (`video_rope: "wan"`); `None`: its first
    /// `rope_dims` at the frame positions (`"temporal"`).
    pub video_axes: Option<[usize; 3]>,
}

impl Fused {
    /// The pairs of `video_points` and `audio_points` from `dir`'s weights.
    pub fn load(
        cfg: &Config,
        dir: &Path,
        points: &[(usize, usize)],
        device: Device,
        ctx: &Context,
    ) -> Result<Fused> {
        let bad = |what: String| Error(format!("{}: {what}", cfg.path.display()));
        let need = |key: &str| -> Result<usize> {
            cfg.opt_usize(key)?
                .ok_or_else(|| bad(format!("a FusedCrossAttentionBridge needs {key}")))
        };
        let (dv, da) = (need("video_dim")?, need("audio_dim")?);
        let heads = (need("video_heads")?, need("audio_heads")?);
        for (what, d, h) in [("video", dv, heads.0), ("audio", da, heads.1)] {
            if h == 0 || !d.is_multiple_of(h) {
                return Err(bad(format!(
                    "{h} {what} heads do not divide the {what} width {d}"
                )));
            }
        }
        let rope_dims = cfg.usize_or("rope_dims", 0)?;
        let head_dims = (dv / heads.0, da / heads.1);
        if !rope_dims.is_multiple_of(2) || rope_dims > head_dims.0.min(head_dims.1) {
            return Err(bad(format!(
                "rope_dims {rope_dims} must be even and at most both towers' head widths \
                 ({}, {})",
                head_dims.0, head_dims.1
            )));
        }
        let video_axes = match cfg.str_or("video_rope", "temporal")? {
            "temporal" => None,
            "wan" => {
                let d = head_dims.0;
                if head_dims.1 != d {
                    return Err(bad(format!(
                        "video_rope \"wan\" rotates the keys made from the video in the audio's \
                         heads too, as Ovi's towers of one head width do: the heads are {d} and \
                         {} wide",
                        head_dims.1
                    )));
                }
                let hw = 2 * (d / 6);
                let axes = [d - 2 * hw, hw, hw];
                if rope_dims != axes[0] {
                    return Err(bad(format!(
                        "video_rope \"wan\" rotates the video's time band of {} dims against the \
                         audio's first rope_dims: set rope_dims to {} (got {rope_dims})",
                        axes[0], axes[0]
                    )));
                }
                Some(axes)
            }
            other => {
                return Err(bad(format!(
                    "video_rope \"{other}\" is not one of temporal, wan"
                )))
            }
        };
        let w = Weights::load(ctx, dir, device)?;
        let pairs = points
            .iter()
            .map(|&(v, a)| {
                Ok(FusedPair {
                    video: FusedKv::load(
                        &w,
                        &format!("video_model.blocks.{v}.cross_attn"),
                        da,
                        dv,
                    )?,
                    audio: FusedKv::load(
                        &w,
                        &format!("audio_model.blocks.{a}.cross_attn"),
                        dv,
                        da,
                    )?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Fused {
            pairs,
            heads,
            rope_dims,
            video_axes,
        })
    }
}

/// What a tower's cross-attention site of one block reads while that block's second half runs:
/// the other tower's hidden state after its self-attention, and the rotary tables of the
/// queries' and of the targets' positions.
struct Pending {
    block: usize,
    pair: usize,
    target: Tensor,
    rope: Option<(RopeTables, RopeTables)>,
}

/// The slot a tower's patch reads.
type Slot = Arc<Mutex<Option<Pending>>>;

/// Which tower a patch sits on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Video,
    Audio,
}

/// The patch on one tower: the fusion branch at the cross-attention site of the block whose
/// second half is running.
struct Injection {
    fused: Arc<Fused>,
    side: Side,
    slot: Slot,
}

impl PatchHooks for Injection {
    fn attention_extra(
        &self,
        _call: &Call,
        site: &AttentionSite,
        q: &Tensor,
    ) -> Result<Option<Tensor>> {
        if site.kind != AttentionKind::Cross {
            return Ok(None);
        }
        let slot = self
            .slot
            .lock()
            .map_err(|_| Error::new("fused cross-attention: a poisoned slot"))?;
        let Some(p) = slot.as_ref().filter(|p| p.block == site.block) else {
            return Ok(None);
        };
        let pair = &self.fused.pairs[p.pair];
        let (kv, heads) = match self.side {
            Side::Video => (&pair.video, self.fused.heads.0),
            Side::Audio => (&pair.audio, self.fused.heads.1),
        };
        let rope = p.rope.as_ref().map(|(a, b)| (a, b));
        kv.branch(q, &p.target, heads, rope, LinearDeltas::none())
            .map(Some)
    }
}

/// Two towers carrying the fused bridge's patches, and the slots the patches read.
pub struct FusedTowers {
    pub video: Value,
    pub audio: Value,
    slots: (Slot, Slot),
    fused: Arc<Fused>,
}

impl FusedTowers {
    /// `video` and `audio` with the injection patch each, for the bridge at `path`.
    pub fn new(
        ctx: &Context,
        fused: &Arc<Fused>,
        path: &Path,
        video: &Value,
        audio: &Value,
    ) -> Result<FusedTowers> {
        let slots = (Arc::new(Mutex::new(None)), Arc::new(Mutex::new(None)));
        let patch = |tower: &Value, side: Side, slot: &Slot| {
            let which = if side == Side::Video {
                "video"
            } else {
                "audio"
            };
            let mut spec = PatchSpec::new(&format!("fused cross-attention ({which} side)"));
            spec.attention_extra = true;
            spec.stack = Some(0);
            spec.digest = fnv1a(
                0xcbf2_9ce4_8422_2325,
                format!("{}:{which}", path.display()).as_bytes(),
            );
            ctx.patch_model(
                tower,
                &spec,
                Injection {
                    fused: fused.clone(),
                    side,
                    slot: slot.clone(),
                },
            )
            .map_err(|e| Error(format!("{}: the {which} tower: {}", path.display(), e.0)))
        };
        Ok(FusedTowers {
            video: patch(video, Side::Video, &slots.0)?,
            audio: patch(audio, Side::Audio, &slots.1)?,
            fused: fused.clone(),
            slots,
        })
    }

    /// The rotary tables (video's, audio's) of one call's token positions `rope` (video's,
    /// audio's) when given; `grid` is the video's token grid (frames, rows, columns).
    pub fn tables(
        &self,
        rope: Option<(&[f32], &[f32])>,
        grid: [usize; 3],
        device: Device,
    ) -> Result<Option<(RopeTables, RopeTables)>> {
        Ok(match (rope, self.fused.rope_dims) {
            (Some((pv, pa)), r) if r > 0 => {
                let video = match self.fused.video_axes {
                    None => rotary_tables_at_f32(r, pv, device)?,
                    Some(axes) => wan_tables(axes, pv, grid, device)?,
                };
                Some((video, rotary_tables_at_f32(r, pa, device)?))
            }
            _ => None,
        })
    }

    /// Arms the pair `pair` (video block `v`, audio block `a`) with each tower's hidden state
    /// after its self-attention, and the call's rotary `tables` ([`FusedTowers::tables`]).
    pub fn arm(
        &self,
        pair: usize,
        (v, a): (usize, usize),
        (hv, ha): (&Tensor, &Tensor),
        tables: Option<&(RopeTables, RopeTables)>,
    ) -> Result<()> {
        let set = |slot: &Slot, p: Option<Pending>| -> Result<()> {
            *slot
                .lock()
                .map_err(|_| Error::new("fused cross-attention: a poisoned slot"))? = p;
            Ok(())
        };
        set(
            &self.slots.0,
            Some(Pending {
                block: v,
                pair,
                target: ha.clone(),
                rope: tables.cloned(),
            }),
        )?;
        set(
            &self.slots.1,
            Some(Pending {
                block: a,
                pair,
                target: hv.clone(),
                rope: tables.map(|(tv, ta)| (ta.clone(), tv.clone())),
            }),
        )
    }

    /// Empties both slots.
    pub fn disarm(&self) {
        for slot in [&self.slots.0, &self.slots.1] {
            if let Ok(mut s) = slot.lock() {
                *s = None;
            }
        }
    }
}

/// Wan's 3-axis rotary tables for the video tokens of a `grid` (frames, rows, columns; frame
/// major): the time band at the tokens' positions `times`, the height and width bands at their
/// row and column.
fn wan_tables(
    axes: [usize; 3],
    times: &[f32],
    [f, h, w]: [usize; 3],
    device: Device,
) -> Result<RopeTables> {
    if times.len() != f * h * w {
        bail!(
            "fused cross-attention: {} video positions for a token grid of {f}x{h}x{w}",
            times.len()
        );
    }
    let ids: Vec<f32> = times
        .iter()
        .enumerate()
        .flat_map(|(n, &t)| [t, ((n / w) % h) as f32, (n % w) as f32])
        .collect();
    let ids = Tensor::from_f32(Kind::Tensor, &[times.len(), 3], &ids)?.to_device(device)?;
    ditflow_plugin::ops::rope_tables(&ids, &axes, 10000.0)
}
