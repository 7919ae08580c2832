//! Bridge blocks that couple two towers' hidden states: BridgeDiT's dual cross-attention block
//! (`CrossDiTBlockAdaLN`, Guan et al. 2025). Each stream is modulated by its own time embedding
//! (adaLN: SiLU then a linear to six chunks), LayerNormed without affine, projected to q, k and
//! v with RoPE at each token's [`Positions`] (the sequence index, as BridgeDiT; a scaled index,
//! as Ovi; or the token's time in seconds, as LTX-2), and then, by `exchange`:
//! - `Bidirectional` ("bicross"): stream 1 attends to stream 2 and stream 2 to stream 1;
//! - `ToFirst` ("a2v"): stream 1 attends to stream 2, stream 2 to itself;
//! - `ToSecond` ("v2a"): stream 2 attends to stream 1, stream 1 to itself;
//! - `Joint` ("joint"): each stream attends to both streams' tokens together;
//! - `Additive` ("additive"): no attention; each token takes the other stream's values at its
//!   own time, linearly interpolated between the other stream's token times (tokens at one time,
//!   such as a video frame's, averaged), so the positions must be token times;
//!
//! each output projected back and added under its gate, then a GELU-tanh MLP under the second
//! modulation. Zero-initialised output projections make a fresh bridge the identity.
//!
//! Ovi's fused cross-attention ([`FusedKv`]) has no block of its own: it adds key/value paths
//! from the other tower to a tower's own text cross-attention, sharing its queries and output
//! projection.

use crate::embeddings::rotary_tables_at_f32;
use crate::heads::{attend_heads, split_heads};
use crate::layers::{chunks, Linear};
use crate::weights::Weights;
use ditflow_plugin::linear_delta::LinearDeltas;
use ditflow_plugin::ops::concat;
use ditflow_plugin::{Error, Result, Tensor};

/// Who attends to whom in a dual cross-attention block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exchange {
    Bidirectional,
    ToFirst,
    ToSecond,
    Joint,
    Additive,
}

impl Exchange {
    /// BridgeDiT's `flag`: `bicross`, `a2v` or `v2a`.
    pub fn parse(flag: &str) -> Result<Exchange> {
        Ok(match flag {
            "bicross" => Exchange::Bidirectional,
            "a2v" => Exchange::ToFirst,
            "v2a" => Exchange::ToSecond,
            "joint" => Exchange::Joint,
            "additive" => Exchange::Additive,
            other => {
                return Err(Error(format!(
                    "bridge flag \"{other}\" is not one of bicross, a2v, v2a, joint, additive"
                )))
            }
        })
    }
}

/// Where each stream's tokens sit for the bridge's RoPE.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Positions {
    /// No rotation.
    Off,
    /// Each stream's own sequence index (BridgeDiT).
    Index,
    /// Token times on a common scale: the first stream's token `n` of a clip of `F` frames
    /// (tokens frame-major, `N1 / F` per frame) sits at `frame(n) · first`; the second stream's
    /// token `n` at `max(n − second_prefix, 0) · second` (prefix tokens, such as Stable Audio's
    /// global token, at 0). Ovi's scaled index is `first` 1, `second` 0.19676; LTX-2's seconds
    /// are each stream's seconds per frame or token times positions per second.
    Scaled {
        first: f64,
        second: f64,
        second_prefix: usize,
    },
}

impl Positions {
    /// The two streams' positions for `n1` and `n2` tokens, the first stream spanning `frames`
    /// frames; `None` when off.
    pub fn compute(
        &self,
        n1: usize,
        frames: usize,
        n2: usize,
    ) -> Result<Option<(Vec<f32>, Vec<f32>)>> {
        Ok(match *self {
            Positions::Off => None,
            Positions::Index => Some((
                (0..n1).map(|i| i as f32).collect(),
                (0..n2).map(|i| i as f32).collect(),
            )),
            Positions::Scaled {
                first,
                second,
                second_prefix,
            } => {
                if frames == 0 || !n1.is_multiple_of(frames) {
                    return Err(Error(format!(
                        "bridge: {n1} video tokens do not split into {frames} frames"
                    )));
                }
                let per_frame = n1 / frames;
                let (a, b) = (first as f32, second as f32);
                Some((
                    (0..n1).map(|i| (i / per_frame) as f32 * a).collect(),
                    (0..n2)
                        .map(|i| i.saturating_sub(second_prefix) as f32 * b)
                        .collect(),
                ))
            }
        })
    }
}

/// One stream's side of the block.
pub struct BridgeSide {
    /// SiLU then `[E → 6·C]`: shift, scale, gate of the attention, then of the MLP.
    pub modulation: Linear,
    /// Absent for the additive exchange, which attends to nothing.
    pub q: Option<Linear>,
    pub k: Option<Linear>,
    pub v: Linear,
    pub o: Linear,
    pub fc1: Linear,
    pub fc2: Linear,
    pub channels: usize,
}

/// The widths of a dual cross-attention block.
#[derive(Clone, Copy, Debug)]
pub struct BridgeDims {
    pub heads: usize,
    /// Stream widths.
    pub channels: (usize, usize),
    /// Time-embedding widths.
    pub emb: (usize, usize),
    pub qk: usize,
    pub v: usize,
    pub mlp_ratio: f64,
}

/// BridgeDiT's `CrossDiTBlockAdaLN`.
pub struct DualCrossBlock {
    pub first: BridgeSide,
    pub second: BridgeSide,
    pub heads: usize,
    pub exchange: Exchange,
}

impl DualCrossBlock {
    /// Loads `{prefix}.attn.{q,k,v,o}_proj_{1,2}`, `{prefix}.mlp_{1,2}.fc{1,2}` and
    /// `{prefix}.adaln_modulation_{1,2}.1` (BridgeDiT's names).
    pub fn load(
        w: &Weights,
        prefix: &str,
        d: BridgeDims,
        exchange: Exchange,
    ) -> Result<DualCrossBlock> {
        if d.heads == 0 || !d.qk.is_multiple_of(d.heads) || !d.v.is_multiple_of(d.heads) {
            return Err(Error(format!(
                "{}: {} heads do not divide q/k width {} and v width {}",
                w.dir.display(),
                d.heads,
                d.qk,
                d.v
            )));
        }
        let attends = exchange != Exchange::Additive;
        let side = |n: usize, c: usize, e: usize| -> Result<BridgeSide> {
            let hidden = (c as f64 * d.mlp_ratio) as usize;
            let a = format!("{prefix}.attn");
            Ok(BridgeSide {
                modulation: w.linear(
                    &format!("{prefix}.adaln_modulation_{n}.1"),
                    e,
                    6 * c,
                    true,
                )?,
                q: attends
                    .then(|| w.linear(&format!("{a}.q_proj_{n}"), c, d.qk, true))
                    .transpose()?,
                k: attends
                    .then(|| w.linear(&format!("{a}.k_proj_{n}"), c, d.qk, true))
                    .transpose()?,
                v: w.linear(&format!("{a}.v_proj_{n}"), c, d.v, true)?,
                o: w.linear(&format!("{a}.o_proj_{n}"), d.v, c, true)?,
                fc1: w.linear(&format!("{prefix}.mlp_{n}.fc1"), c, hidden, true)?,
                fc2: w.linear(&format!("{prefix}.mlp_{n}.fc2"), hidden, c, true)?,
                channels: c,
            })
        };
        Ok(DualCrossBlock {
            first: side(1, d.channels.0, d.emb.0)?,
            second: side(2, d.channels.1, d.emb.1)?,
            heads: d.heads,
            exchange,
        })
    }

    pub fn linears(&self) -> Vec<&Linear> {
        [&self.first, &self.second]
            .into_iter()
            .flat_map(|s| {
                [Some(&s.modulation), s.q.as_ref(), s.k.as_ref(), Some(&s.v)]
                    .into_iter()
                    .chain([Some(&s.o), Some(&s.fc1), Some(&s.fc2)])
                    .flatten()
            })
            .collect()
    }

    /// The block on `x1` `[B, N1, C1]` and `x2` `[B, N2, C2]` with time embeddings `e1`
    /// `[B, E1]` and `e2` `[B, E2]`; q and k rotated at each stream's positions (`rope`, one
    /// per token; see [`Positions::compute`]) when given.
    pub fn forward(
        &self,
        x1: &Tensor,
        x2: &Tensor,
        e1: &Tensor,
        e2: &Tensor,
        rope: Option<(&[f32], &[f32])>,
        dl: &LinearDeltas,
    ) -> Result<(Tensor, Tensor)> {
        let (s1, s2) = (&self.first, &self.second);
        for (what, x, c) in [("first", x1, s1.channels), ("second", x2, s2.channels)] {
            let s = x.shape();
            if s.len() != 3 || s[2] != c || s[0] != x1.shape()[0] {
                return Err(Error(format!(
                    "bridge: the {what} stream must be [B, N, {c}], got {s:?}"
                )));
            }
        }
        let m1 = chunks(
            &s1.modulation.apply(&e1.unary("silu")?, "none", dl)?,
            6,
            s1.channels,
        )?;
        let m2 = chunks(
            &s2.modulation.apply(&e2.unary("silu")?, "none", dl)?,
            6,
            s2.channels,
        )?;
        let h1 = x1.layer_norm(None, None, Some(&m1[0]), Some(&m1[1]), 1e-6)?;
        let h2 = x2.layer_norm(None, None, Some(&m2[0]), Some(&m2[1]), 1e-6)?;
        if let Some((p1, p2)) = rope {
            if p1.len() != x1.shape()[1] || p2.len() != x2.shape()[1] {
                return Err(Error(format!(
                    "bridge: {} and {} positions for streams of {} and {} tokens",
                    p1.len(),
                    p2.len(),
                    x1.shape()[1],
                    x2.shape()[1]
                )));
            }
        }
        let (o1, o2) = if self.exchange == Exchange::Additive {
            let (p1, p2) = rope.ok_or_else(|| {
                Error(
                    "bridge: the additive exchange meets the streams at their token times: give \
                     the bridge rope_positions scaled or seconds"
                        .into(),
                )
            })?;
            let v1 = s1.v.apply(&h1, "none", dl)?;
            let v2 = s2.v.apply(&h2, "none", dl)?;
            (resample(&v2, p2, p1)?, resample(&v1, p1, p2)?)
        } else {
            self.attend(s1, s2, &h1, &h2, rope, dl)?
        };
        let x1 = x1.gated_residual(&s1.o.apply(&o1, "none", dl)?, &m1[2])?;
        let x2 = x2.gated_residual(&s2.o.apply(&o2, "none", dl)?, &m2[2])?;
        let mlp = |side: &BridgeSide, x: &Tensor, m: &[Tensor]| -> Result<Tensor> {
            let h = x.layer_norm(None, None, Some(&m[3]), Some(&m[4]), 1e-6)?;
            let f = side
                .fc2
                .apply(&side.fc1.apply(&h, "gelu_tanh", dl)?, "none", dl)?;
            x.gated_residual(&f, &m[5])
        };
        Ok((mlp(s1, &x1, &m1)?, mlp(s2, &x2, &m2)?))
    }

    /// The attention exchanges' outputs `[B, N, v]` for the modulated streams.
    fn attend(
        &self,
        s1: &BridgeSide,
        s2: &BridgeSide,
        h1: &Tensor,
        h2: &Tensor,
        rope: Option<(&[f32], &[f32])>,
        dl: &LinearDeltas,
    ) -> Result<(Tensor, Tensor)> {
        let heads = |side: &BridgeSide, h: &Tensor| -> Result<[Tensor; 3]> {
            fn need(l: &Option<Linear>) -> Result<&Linear> {
                l.as_ref()
                    .ok_or_else(|| Error("bridge: an attention exchange without q/k".into()))
            }
            Ok([
                split_heads(&need(&side.q)?.apply(h, "none", dl)?, self.heads)?,
                split_heads(&need(&side.k)?.apply(h, "none", dl)?, self.heads)?,
                split_heads(&side.v.apply(h, "none", dl)?, self.heads)?,
            ])
        };
        let [mut q1, mut k1, v1] = heads(s1, h1)?;
        let [mut q2, mut k2, v2] = heads(s2, h2)?;
        if let Some((p1, p2)) = rope {
            let dh = q1.shape()[3];
            let device = q1.device();
            let (c1, n1) = rotary_tables_at_f32(dh, p1, device)?;
            let (c2, n2) = rotary_tables_at_f32(dh, p2, device)?;
            q1 = q1.rope(&c1, &n1, true)?;
            k1 = k1.rope(&c1, &n1, true)?;
            q2 = q2.rope(&c2, &n2, true)?;
            k2 = k2.rope(&c2, &n2, true)?;
        }
        let attend = |q: &Tensor, k: &Tensor, v: &Tensor| -> Result<Tensor> {
            let o = ditflow_plugin::ops::attention(q, k, v, None, None)?;
            let s = o.shape().to_vec();
            o.permute(&[0, 2, 1, 3])?
                .reshape(&[s[0] as i64, s[2] as i64, (s[1] * s[3]) as i64])
        };
        Ok(match self.exchange {
            Exchange::Bidirectional => (attend(&q1, &k2, &v2)?, attend(&q2, &k1, &v1)?),
            Exchange::ToFirst => (attend(&q1, &k2, &v2)?, attend(&q2, &k2, &v2)?),
            Exchange::ToSecond => (attend(&q1, &k1, &v1)?, attend(&q2, &k1, &v1)?),
            Exchange::Joint => {
                let k = concat(&[&k1, &k2], 2)?;
                let v = concat(&[&v1, &v2], 2)?;
                (attend(&q1, &k, &v)?, attend(&q2, &k, &v)?)
            }
            Exchange::Additive => unreachable!("the additive exchange attends to nothing"),
        })
    }
}

/// Ovi's key/value injection into one tower's text cross-attention (`FusionModel`'s
/// `k_fusion`, `v_fusion`, `pre_attn_norm_fusion` and `norm_k_fusion` of a block's
/// `cross_attn`): the other tower's hidden state after its self-attention is LayerNormed (with
/// affine), projected to keys (then RMSNormed across the heads) and values of this tower's
/// query width, and attended by this tower's cross-attention queries. The branch's output is
/// added to the text attention's before the shared output projection; there is no gate.
pub struct FusedKv {
    pub norm: (Tensor, Tensor),
    pub k: Linear,
    pub v: Linear,
    pub norm_k: Tensor,
}

/// Rotary tables `(cos, sin)` `[L, R/2]` of one stream's positions.
pub type RopeTables = (Tensor, Tensor);

/// Ovi's epsilon for the fusion norms (`WanLayerNorm`, `WanRMSNorm`).
const FUSION_EPS: f32 = 1e-6;

impl FusedKv {
    /// `{prefix}.pre_attn_norm_fusion`, `{prefix}.k_fusion`, `{prefix}.v_fusion` and
    /// `{prefix}.norm_k_fusion` for targets of `target` channels and queries of `width`.
    pub fn load(w: &Weights, prefix: &str, target: usize, width: usize) -> Result<FusedKv> {
        Ok(FusedKv {
            norm: (
                w.get(&format!("{prefix}.pre_attn_norm_fusion.weight"), &[target])?,
                w.get(&format!("{prefix}.pre_attn_norm_fusion.bias"), &[target])?,
            ),
            k: w.linear(&format!("{prefix}.k_fusion"), target, width, true)?,
            v: w.linear(&format!("{prefix}.v_fusion"), target, width, true)?,
            norm_k: w.get(&format!("{prefix}.norm_k_fusion.weight"), &[width])?,
        })
    }

    /// The branch for cross-attention queries `q` `[B, Lq, H·D]` (after the tower's own q norm)
    /// over the other tower's `target` `[B, Lt, C]`: `[B, Lq, H·D]`. With `rope`, the tables of
    /// the queries' and of the targets' positions rotate the first dimensions of each head
    /// (interleaved pairs, as Ovi's complex rotation).
    pub fn branch(
        &self,
        q: &Tensor,
        target: &Tensor,
        heads: usize,
        rope: Option<(&RopeTables, &RopeTables)>,
        dl: &LinearDeltas,
    ) -> Result<Tensor> {
        let (qs, ts) = (q.shape(), target.shape());
        if qs.len() != 3 || ts.len() != 3 || qs[0] != ts[0] || ts[2] != self.norm.0.shape()[0] {
            return Err(Error(format!(
                "fused cross-attention: queries {qs:?} and targets {ts:?} (targets of {} \
                 channels, one row each per query row)",
                self.norm.0.shape()[0]
            )));
        }
        let y = target.layer_norm(
            Some(&self.norm.0),
            Some(&self.norm.1),
            None,
            None,
            FUSION_EPS,
        )?;
        let k = self
            .k
            .apply(&y, "none", dl)?
            .rms_norm(Some(&self.norm_k), FUSION_EPS)?;
        let v = self.v.apply(&y, "none", dl)?;
        if k.shape()[2] != qs[2] {
            return Err(Error(format!(
                "fused cross-attention: keys of {} channels for queries of {}",
                k.shape()[2],
                qs[2]
            )));
        }
        let (mut q, mut k) = (split_heads(q, heads)?, split_heads(&k, heads)?);
        // The two sides turn by tables of their own positions, so they rotate here.
        if let Some(((cq, sq), (ck, sk))) = rope {
            q = q.rope(cq, sq, true)?;
            k = k.rope(ck, sk, true)?;
        }
        attend_heads(&q, &k, &split_heads(&v, heads)?, None)
    }
}

/// The weights `[to.len(), from.len()]` that carry values at positions `from` to positions
/// `to`: tokens sharing a position are averaged, then interpolated linearly between the
/// distinct positions (held at the ends), in f64.
pub fn resample_weights(from: &[f32], to: &[f32]) -> Vec<f32> {
    let mut distinct: Vec<f32> = from.to_vec();
    distinct.sort_by(f32::total_cmp);
    distinct.dedup();
    let count = |p: f32| from.iter().filter(|&&q| q == p).count() as f64;
    let mut w = vec![0f32; to.len() * from.len()];
    for (i, &x) in to.iter().enumerate() {
        let j = distinct.partition_point(|&u| u <= x);
        let parts: [(usize, f64); 2] = if j == 0 {
            [(0, 1.0), (0, 0.0)]
        } else if j == distinct.len() {
            [(j - 1, 1.0), (j - 1, 0.0)]
        } else {
            let (a, b) = (f64::from(distinct[j - 1]), f64::from(distinct[j]));
            let t = (f64::from(x) - a) / (b - a);
            [(j - 1, 1.0 - t), (j, t)]
        };
        for (g, weight) in parts {
            if weight == 0.0 {
                continue;
            }
            let u = distinct[g];
            let n = count(u);
            for (k, &p) in from.iter().enumerate() {
                if p == u {
                    w[i * from.len() + k] += (weight / n) as f32;
                }
            }
        }
    }
    w
}

/// Values `v` `[B, N, C]` at positions `from` resampled to positions `to`: `[B, to.len(), C]`.
fn resample(v: &Tensor, from: &[f32], to: &[f32]) -> Result<Tensor> {
    let w = Tensor::from_f32(
        ditflow_plugin::Kind::Tensor,
        &[to.len(), from.len()],
        &resample_weights(from, to),
    )?
    .to_device(v.device())?;
    let map = Linear {
        name: "bridge.resample".into(),
        weight: w,
        bias: None,
    };
    map.forward(&v.permute(&[0, 2, 1])?, "none")?
        .permute(&[0, 2, 1])
}
