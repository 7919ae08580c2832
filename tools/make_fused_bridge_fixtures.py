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
own attn2 module and the fusion part adds W_o·B. RoPE rotates the first `rope_dims` dims of each
head in interleaved pairs (Ovi's complex rotation) with angles position·10000^(−2j/rope_dims); the
video's token positions are its latent frame index, the audio's its token index times 0.5 (the
global token at 0), Ovi's scaled alignment.

Writes tests/fixtures/parity/bridged_towers_fused/: bridge/ (config.json, bridge.safetensors in
Ovi's names) and io.safetensors with out.video, out.audio. The towers' inputs are those of
tests/fixtures/parity/bridged_towers/ (run tools/make_bridged_towers_fixtures.py first).

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
ROPE_DIMS = 8
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


def rotate(x, positions):
    """Interleaved rotation of the first ROPE_DIMS dims of each head of x [B, H, L, D]."""
    j = torch.arange(0, ROPE_DIMS, 2, dtype=torch.float64) / ROPE_DIMS
    angle = positions.double()[:, None] * (1.0 / 10000.0 ** j)[None, :]
    rot = torch.polar(torch.ones_like(angle), angle)
    head = torch.view_as_complex(x[..., :ROPE_DIMS].double().reshape(*x.shape[:-1], -1, 2).contiguous())
    head = torch.view_as_real(head * rot).flatten(-2).to(x.dtype)
    return torch.cat([head, x[..., ROPE_DIMS:]], dim=-1)


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
    wan = WanTransformer3DModel.from_pretrained(os.path.join(ROOT, "wan")).eval()
    sa = StableAudioDiTModel.from_pretrained(os.path.join(ROOT, "stable_audio")).eval()
    vin = load_file(os.path.join(src, "video.safetensors"))
    ain = load_file(os.path.join(src, "audio.safetensors"))
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
              "video_heads": hv_, "audio_heads": ha_, "rope_dims": ROPE_DIMS, "rope_positions": "scaled",
              "video_position_scale": 1.0, "audio_position_scale": AUDIO_SCALE, "audio_prefix_tokens": 1}
    with open(os.path.join(out, "bridge", "config.json"), "w") as f:
        json.dump(config, f, indent=2)

    with torch.no_grad():
        hv, cv = wan_prelude(wan, vin["in.hidden_states"], vin["in.timestep"], vin["in.encoder_hidden_states"])
        rope = (ain["in.rotary_embedding_cos"], ain["in.rotary_embedding_sin"])
        ha, ca = audio_prelude(sa, ain["in.hidden_states"], ain["in.timestep"], ain["in.encoder_hidden_states"],
                               ain["in.global_hidden_states"], rope)
        frames = vin["in.hidden_states"].shape[2]
        per_frame = hv.shape[1] // frames
        pos_v = torch.arange(hv.shape[1]) // per_frame
        pos_a = (torch.arange(ha.shape[1]) - 1).clamp(min=0) * AUDIO_SCALE
        for i, (fv, fa) in enumerate(pairs):
            bv, ba = wan.blocks[i], sa.transformer_blocks[i]
            hv = wan_to_cross(bv, hv, cv[1], cv[0])
            ha = audio_to_cross(ba, ha, ca[1])
            v_sa, a_sa = hv, ha
            ha = audio_from_cross(ba, a_sa, ca[0], fa, v_sa, ha_, pos_a, pos_v)
            hv = wan_from_cross(bv, v_sa, cv[1], cv[2], fv, a_sa, hv_, pos_v, pos_a)
        video, audio = wan_head(wan, hv, cv), audio_head(sa, ha)
        alone = wan(vin["in.hidden_states"], vin["in.timestep"], vin["in.encoder_hidden_states"], return_dict=False)[0]
    save_file({"out.video": video.contiguous(), "out.audio": audio.contiguous()}, os.path.join(out, "io.safetensors"))
    print(f"bridged_towers_fused: video {tuple(video.shape)} differs from the tower alone by "
          f"{(video - alone).abs().max():.3f}, audio {tuple(audio.shape)}")


if __name__ == "__main__":
    main()
