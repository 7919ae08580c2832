#!/usr/bin/env python3
"""Fused cross-attention bridge parity fixture (Ovi's key/value injection): the tiny Wan and
Stable Audio transformers of tests/fixtures/parity/{wan,stable_audio}/ (diffusers 0.42), fused in
every block pair as Ovi's FusionModel.single_fusion_block_forward runs its two towers
(github.com/character-ai/Ovi, ovi/modules/fusion.py), written here in pure PyTorch:

    a = a + SA_a(...)                  # each tower's self-attention half, diffusers' own code
    v = v + SA_v(...)
    a = a + cross_a(LN(a), text_a, target=v)  ; a = a + FFN_a(...)
    v = v + cross_v(LN(v), text_v, target=a_after_its_self_attention) ; v = v + FFN_v(...)

    cross(x, text, target) = o(Attn(q, k_text, v_text) + Attn(rope_src(q), rope_tgt(k_f), v_f))
      q   = the tower's cross-attention query (after its own q norm)
      y   = LayerNorm_affine(target)            (pre_attn_norm_fusion, eps 1e-6)
      k_f = RMSNorm(k_fusion(y))                (norm_k_fusion across heads, eps 1e-6)
      v_f = v_fusion(y)

The shared output projection o is linear, so o(A + B) = o(A) + W_o·B: the text part is diffusers'
own attn2 module and the fusion part adds W_o·B. RoPE is Ovi's, in interleaved pairs (its
complex rotation): the video side rotates its whole head with Wan's three bands (time, height,
width: 4, 4, 4 dims of the tiny head of 12, as 44, 42, 42 of Ovi's 128) at each token's latent
frame, row and column; the audio side rotates its first 4 dims (the time band's width) at its
token index times 0.5 (the global token at 0), Ovi's scaled alignment; band j of width n turns by
position·10000^(−2j/n).

Ovi's towers share their head width (128), so the video's 3-band tables also rotate the keys
made from the video in the audio tower's heads: the audio tower here is a tiny Stable Audio of its
own with the tiny Wan's head width (12).

Also a 4-step SampleAudioVideo run with the fused bridge in sample.safetensors (see sample()).

Writes tests/fixtures/parity/bridged_towers_fused/: bridge/ (config.json, bridge.safetensors in
Ovi's names), stable_audio/ (the audio tower), audio.safetensors (its in.*, no rotary tables:
the model computes them as StableAudioPipeline does) and io.safetensors with out.video,
out.audio. The video tower and its inputs are those of tests/fixtures/parity/wan and
bridged_towers/ (run tools/make_bridged_towers_fixtures.py first).

    .venv/bin/python tools/make_fused_bridge_fixtures.py
"""
import json
import os
import shutil
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_bridged_towers_fixtures import audio_head, audio_prelude, wan_head, wan_prelude  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "parity")
ROPE_DIMS = 4
AUDIO_SCALE = 0.5


class FusedKv(torch.nn.Module):
    """One tower's fusion layers in one block: keys and values from the other tower."""

    def __init__(self, target, width):
        super().__init__()
        self.pre_attn_norm_fusion = torch.nn.LayerNorm(target, eps=1e-6, elementwise_affine=True)
        self.k_fusion = torch.nn.Linear(target, width)
        self.v_fusion = torch.nn.Linear(target, width)
        self.norm_k_fusion = torch.nn.Parameter(torch.ones(width))

    def forward(self, q, target, heads, rope_q, rope_k):
        b = q.shape[0]
        y = self.pre_attn_norm_fusion(target)
        k = self.k_fusion(y)
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6) * self.norm_k_fusion
        v = self.v_fusion(y)
        split = lambda t: t.view(b, t.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        q, k = rotate(q, rope_q), rotate(k, rope_k)
        o = F.scaled_dot_product_attention(q, k, v)
        return o.transpose(1, 2).flatten(2)


def angles(positions, width):
    """[L, width/2] angles of one band: position·10000^(−2j/width)."""
    j = torch.arange(0, width, 2, dtype=torch.float64) / width
    return positions.double()[:, None] * (1.0 / 10000.0 ** j)[None, :]


def rotate(x, angle):
    """Interleaved rotation of the first 2·angle.shape[1] dims of each head of x [B, H, L, D]."""
    r = 2 * angle.shape[1]
    rot = torch.polar(torch.ones_like(angle), angle)
    head = torch.view_as_complex(x[..., :r].double().reshape(*x.shape[:-1], -1, 2).contiguous())
    head = torch.view_as_real(head * rot).flatten(-2).to(x.dtype)
    return torch.cat([head, x[..., r:]], dim=-1)


def wan_to_cross(blk, h, temb, rope):
    shift, scale, gate, _, _, _ = (blk.scale_shift_table + temb.float()).chunk(6, dim=1)
    x = (blk.norm1(h.float()) * (1 + scale) + shift).type_as(h)
    return (h.float() + blk.attn1(x, None, None, rope) * gate).type_as(h)


def wan_from_cross(blk, h, temb, text, fused, target, heads, rope_q, rope_k):
    _, _, _, c_shift, c_scale, c_gate = (blk.scale_shift_table + temb.float()).chunk(6, dim=1)
    x = blk.norm2(h.float()).type_as(h)
    a = blk.attn2(x, text, None, None)
    q = blk.attn2.norm_q(blk.attn2.to_q(x))
    a = a + F.linear(fused(q, target, heads, rope_q, rope_k), blk.attn2.to_out[0].weight)
    h = h + a
    x = (blk.norm3(h.float()) * (1 + c_scale) + c_shift).type_as(h)
    return (h.float() + blk.ffn(x).float() * c_gate).type_as(h)


def audio_to_cross(blk, h, rope):
    return blk.attn1(blk.norm1(h), rotary_emb=rope) + h


def audio_from_cross(blk, h, text, fused, target, heads, rope_q, rope_k):
    x = blk.norm2(h)
    a = blk.attn2(x, encoder_hidden_states=text)
    q = blk.attn2.to_q(x)
    a = a + F.linear(fused(q, target, heads, rope_q, rope_k), blk.attn2.to_out[0].weight)
    h = a + h
    return blk.ff(blk.norm3(h)) + h


def main():
    from diffusers import StableAudioDiTModel, WanTransformer3DModel

    torch.set_num_threads(2)
    src = os.path.join(ROOT, "bridged_towers")
    out = os.path.join(ROOT, "bridged_towers_fused")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "bridge"))
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    wan = WanTransformer3DModel.from_pretrained(os.path.join(ROOT, "wan")).eval()
    vin = load_file(os.path.join(src, "video.safetensors"))
    sa = StableAudioDiTModel(
        sample_size=16, in_channels=4, num_layers=2, attention_head_dim=wan.config.attention_head_dim,
        num_attention_heads=2, num_key_value_attention_heads=1, out_channels=4, cross_attention_dim=12,
        time_proj_dim=16, global_states_input_dim=10, cross_attention_input_dim=6,
    )
    g = torch.Generator().manual_seed(73)
    with torch.no_grad():
        for name, p in sa.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        sa.time_proj.weight.copy_(torch.randn(sa.time_proj.weight.shape, generator=g))
    sa.eval()
    sa.save_pretrained(os.path.join(out, "stable_audio"), safe_serialization=True)
    length = 11
    ain = {"in.hidden_states": torch.randn(1, 4, length, generator=g), "in.timestep": torch.tensor([0.6]),
           "in.encoder_hidden_states": torch.randn(1, 5, 6, generator=g),
           "in.global_hidden_states": torch.randn(1, 1, 10, generator=g)}
    save_file(ain, os.path.join(out, "audio.safetensors"))
    cos, sin = get_1d_rotary_pos_embed(sa.config.attention_head_dim // 2, length + 1, use_real=True,
                                       repeat_interleave_real=False)
    ain["in.rotary_embedding_cos"], ain["in.rotary_embedding_sin"] = cos, sin
    dv = wan.config.num_attention_heads * wan.config.attention_head_dim
    da = sa.inner_dim
    hv_, ha_ = wan.config.num_attention_heads, sa.config.num_attention_heads
    n = len(wan.blocks)
    assert n == len(sa.transformer_blocks)
    torch.manual_seed(71)
    pairs = [(FusedKv(da, dv).eval(), FusedKv(dv, da).eval()) for _ in range(n)]
    weights = {}
    with torch.no_grad():
        for i, (fv, fa) in enumerate(pairs):
            for tower, f in (("video_model", fv), ("audio_model", fa)):
                for name, p in f.named_parameters():
                    p.copy_(torch.randn(p.shape) * 0.3 + (1.0 if "norm" in name and "bias" not in name else 0.0))
                    key = f"{tower}.blocks.{i}.cross_attn.{name}"
                    weights[key + ("" if name.endswith(("weight", "bias")) else ".weight")] = p.detach().clone()
    save_file(weights, os.path.join(out, "bridge", "bridge.safetensors"))
    config = {"_class_name": "FusedCrossAttentionBridge", "num_blocks": n, "video_dim": dv, "audio_dim": da,
              "video_heads": hv_, "audio_heads": ha_, "rope_dims": ROPE_DIMS, "video_rope": "wan",
              "rope_positions": "scaled",
              "video_position_scale": 1.0, "audio_position_scale": AUDIO_SCALE, "audio_prefix_tokens": 1}
    with open(os.path.join(out, "bridge", "config.json"), "w") as f:
        json.dump(config, f, indent=2)

    with torch.no_grad():
        v_in = (vin["in.hidden_states"], vin["in.timestep"], vin["in.encoder_hidden_states"])
        a_in = (ain["in.hidden_states"], ain["in.timestep"], ain["in.encoder_hidden_states"],
                ain["in.global_hidden_states"])
        video, audio = run_fused(wan, sa, pairs, v_in, a_in)
        alone = wan(*v_in, return_dict=False)[0]
        audio_alone = sa(*a_in, rotary_embedding=(cos, sin), return_dict=False)[0]
    save_file({"out.video": video.contiguous(), "out.audio": audio.contiguous(),
               "out.audio_alone": audio_alone.contiguous()}, os.path.join(out, "io.safetensors"))
    print(f"bridged_towers_fused: video {tuple(video.shape)} differs from the tower alone by "
          f"{(video - alone).abs().max():.3f}, audio {tuple(audio.shape)}")


def run_fused(wan, sa, pairs, v, a):
    """Both towers' predictions for inputs v = (x, t, text) and a = (x, t, text, global), fused in
    every block pair."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    hv, cv = wan_prelude(wan, *v)
    rope = get_1d_rotary_pos_embed(sa.config.attention_head_dim // 2, a[0].shape[2] + 1, use_real=True,
                                   repeat_interleave_real=False)
    ha, ca = audio_prelude(sa, *a, rope)
    _, _, frames, rows, cols = v[0].shape
    rows, cols = rows // 2, cols // 2
    token = torch.arange(hv.shape[1])
    d = wan.config.attention_head_dim
    hw = 2 * (d // 6)
    assert d - 2 * hw == ROPE_DIMS
    pos_v = torch.cat([angles(token // (rows * cols), ROPE_DIMS), angles((token // cols) % rows, hw),
                       angles(token % cols, hw)], dim=1)
    pos_a = angles((torch.arange(ha.shape[1]) - 1).clamp(min=0) * AUDIO_SCALE, ROPE_DIMS)
    hv_, ha_ = wan.config.num_attention_heads, sa.config.num_attention_heads
    for i, (fv, fa) in enumerate(pairs):
        bv, ba = wan.blocks[i], sa.transformer_blocks[i]
        hv = wan_to_cross(bv, hv, cv[1], cv[0])
        ha = audio_to_cross(ba, ha, ca[1])
        v_sa, a_sa = hv, ha
        ha = audio_from_cross(ba, a_sa, ca[0], fa, v_sa, ha_, pos_a, pos_v)
        hv = wan_from_cross(bv, v_sa, cv[1], cv[2], fv, a_sa, hv_, pos_v, pos_a)
    return wan_head(wan, hv, cv), audio_head(sa, ha)


def sample():
    """A 4-step SampleAudioVideo run with the fused bridge, as tools/make_bridged_towers_fixtures.py
    samples with its dual cross-attention bridge (the same conditionings, schedulers, guidance and
    seed), plain and with modality-isolation guidance 0.5: sample.safetensors."""
    from diffusers import DPMSolverMultistepScheduler, StableAudioDiTModel, UniPCMultistepScheduler
    from diffusers import WanTransformer3DModel
    from diffusers.models.embeddings import get_1d_rotary_pos_embed
    from make_parity_fixtures import philox_randn

    out = os.path.join(ROOT, "bridged_towers_fused")
    conds = load_file(os.path.join(ROOT, "bridged_towers", "sample.safetensors"))
    conds = {k: v for k, v in conds.items() if k.startswith("in.")}
    wan = WanTransformer3DModel.from_pretrained(os.path.join(ROOT, "wan")).eval()
    sa = StableAudioDiTModel.from_pretrained(os.path.join(out, "stable_audio")).eval()
    weights = load_file(os.path.join(out, "bridge", "bridge.safetensors"))
    dv = wan.config.num_attention_heads * wan.config.attention_head_dim
    da = sa.inner_dim
    pairs = []
    for i in range(len(wan.blocks)):
        pair = (FusedKv(da, dv).eval(), FusedKv(dv, da).eval())
        for tower, f in zip(("video_model", "audio_model"), pair):
            state = {}
            for name, _ in f.named_parameters():
                key = f"{tower}.blocks.{i}.cross_attn.{name}"
                state[name] = weights[key + ("" if name.endswith(("weight", "bias")) else ".weight")]
            f.load_state_dict(state)
        pairs.append(pair)
    steps, seed, cfg_v, cfg_a = 4, 5, 3.0, 2.0
    tensors = dict(conds)
    for suffix, iso in (("", 0.0), ("_iso", 0.5)):
        sv = UniPCMultistepScheduler.from_pretrained(os.path.join(ROOT, "bridged_towers", "video_scheduler"))
        sa_s = DPMSolverMultistepScheduler(prediction_type="v_prediction")
        sv.set_timesteps(steps)
        sa_s.set_timesteps(steps)
        xv = philox_randn((1, 4, 3, 8, 10), seed).float() * sv.init_noise_sigma
        xa = philox_randn((1, 4, 11), seed + 1).float() * sa_s.init_noise_sigma
        text_v = torch.cat([conds["in.video_positive"], conds["in.video_negative"]])
        text_a = torch.cat([conds["in.audio_positive"], conds["in.audio_negative"]])
        glob_a = torch.cat([conds["in.audio_global_positive"], conds["in.audio_global_negative"]])
        for tv, ta in zip(sv.timesteps, sa_s.timesteps):
            v = (torch.cat([xv] * 2), tv.float().expand(2), text_v)
            a = (torch.cat([xa] * 2), ta.float().expand(2), text_a, glob_a)
            with torch.no_grad():
                pv, pa = run_fused(wan, sa, pairs, v, a)
                if iso:
                    ov = wan(*v, return_dict=False)[0]
                    rope = get_1d_rotary_pos_embed(sa.config.attention_head_dim // 2, xa.shape[2] + 1,
                                                   use_real=True, repeat_interleave_real=False)
                    oa = sa(*a, rotary_embedding=rope, return_dict=False)[0]
                    pv, pa = pv + iso * (pv - ov), pa + iso * (pa - oa)
            pv = pv[1:] + cfg_v * (pv[:1] - pv[1:])
            pa = pa[1:] + cfg_a * (pa[:1] - pa[1:])
            xv = sv.step(pv, tv, xv).prev_sample
            xa = sa_s.step(pa, ta, xa).prev_sample
        tensors[f"out.video_latent{suffix}"] = xv.contiguous()
        tensors[f"out.audio_latent{suffix}"] = xa.contiguous()
        print(f"fused sample{suffix}: video |max| {xv.abs().max():.3f}, audio |max| {xa.abs().max():.3f}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "sample.safetensors"))


if __name__ == "__main__":
    main()
    sample()
