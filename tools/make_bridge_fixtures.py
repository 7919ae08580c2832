#!/usr/bin/env python3
"""Bridge parity fixtures: BridgeDiT's dual cross-attention block (`CrossDiTBlockAdaLN` in
bridgedit/models/dit/dit_dual_stream_clean.py of github.com/guankaisi/BridgeDiT), re-written here
in plain PyTorch from that public code (its flash-attn calls as explicit softmax attention with
the same d^-1/2 scale), with random weights, and its outputs on random streams.

The block, per stream s in (1, 2): (shift, scale, gate) x 2 = Linear(SiLU(emb_s)).chunk(6);
h = LN(x)(1 + scale) + shift (LayerNorm eps 1e-6, no affine); q, k, v projections; RoPE with
get_1d_rotary_pos_embed(head_dim, N_s, use_real=True) (interleaved pairs, float32 frequencies)
over each stream's own sequence index; then bicross: O_1 = attn(q_1, k_2, v_2), O_2 = attn(q_2,
k_1, v_1) (a2v: O_2 is stream 2's self-attention); x += gate * o_proj(O); x += gate2 *
fc2(GELU_tanh(fc1(LN(x)(1 + scale2) + shift2))).

Writes tests/fixtures/parity/bridge/ (bicross, 2 blocks), bridge_a2v/ (1 block) and
bridge_seconds/ (bicross, 1 block, RoPE at each token's time in seconds, LTX-2's alignment: the
15 video tokens as 5 frames of 0.25 s, the 7 audio tokens 0.2 s apart after a global token at 0,
4 positions per second), and bridge_joint/ (joint attention: each stream over both) and
bridge_additive/ (no attention: each token takes the other stream's values interpolated to its
time) at those positions: model/ with
config.json (DualCrossAttentionBridge) and bridge.safetensors (dual_dit_blocks.{i}.*), and io.safetensors (in.video
[2, 15, 24], in.audio [2, 7, 16], in.video_emb [2, 24], in.audio_emb [2, 16]; out.video_{i},
out.audio_{i} for block i).

Run (PyTorch and diffusers from PyPI; CI never runs this):
    .venv/bin/python tools/make_bridge_fixtures.py
"""
import json
import math
import os
import shutil

import torch
import torch.nn as nn
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "parity")


def rope_tables(dim, n):
    """Tables for positions 0..n-1 (an int) or the given positions (a float tensor)."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    return get_1d_rotary_pos_embed(dim, n, use_real=True)  # repeat-interleaved [n, dim]


def rotate(x, cos, sin):
    # Interleaved pairs (2i, 2i+1), as diffusers' apply_rotary_emb with use_real_unbind_dim=-1.
    re, im = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rot = torch.stack([-im, re], dim=-1).flatten(3)
    return x * cos[None, None] + rot * sin[None, None]


def resample_weights(src, dst):
    """Weights [len(dst), len(src)] carrying values at positions src to positions dst: tokens
    sharing a position averaged, then linear interpolation between the distinct positions (held
    at the ends), in float64."""
    src, dst = src.double(), dst.double()
    distinct = torch.unique(src)  # sorted
    w = torch.zeros(len(dst), len(src), dtype=torch.float64)
    for i, x in enumerate(dst):
        j = int((distinct <= x).sum())
        if j == 0:
            parts = [(0, 1.0)]
        elif j == len(distinct):
            parts = [(j - 1, 1.0)]
        else:
            a, b = distinct[j - 1], distinct[j]
            t = float((x - a) / (b - a))
            parts = [(j - 1, 1.0 - t), (j, t)]
        for g, weight in parts:
            members = src == distinct[g]
            w[i, members] += weight / int(members.sum())
    return w.float()


def attention(q, k, v):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return s.softmax(-1) @ v


class Side(nn.Module):
    def __init__(self, c, e, qk, vc, ratio):
        super().__init__()
        self.mod = nn.Linear(e, 6 * c)
        self.q, self.k, self.v, self.o = nn.Linear(c, qk), nn.Linear(c, qk), nn.Linear(c, vc), nn.Linear(vc, c)
        self.fc1, self.fc2 = nn.Linear(c, int(c * ratio)), nn.Linear(int(c * ratio), c)


class DualCross(nn.Module):
    def __init__(self, c1, c2, e1, e2, qk, vc, heads, flag, ratio=4.0):
        super().__init__()
        self.s1, self.s2 = Side(c1, e1, qk, vc, ratio), Side(c2, e2, qk, vc, ratio)
        self.heads, self.flag = heads, flag

    def layers(self, prefix):
        """Each linear layer with its name in BridgeDiT's checkpoints."""
        for n, s in ((1, self.s1), (2, self.s2)):
            for ours, theirs in [("mod", f"adaln_modulation_{n}.1"), ("q", f"attn.q_proj_{n}"),
                                 ("k", f"attn.k_proj_{n}"), ("v", f"attn.v_proj_{n}"), ("o", f"attn.o_proj_{n}"),
                                 ("fc1", f"mlp_{n}.fc1"), ("fc2", f"mlp_{n}.fc2")]:
                yield f"{prefix}.{theirs}", getattr(s, ours)

    def state(self, prefix):
        out = {}
        for name, layer in self.layers(prefix):
            out[f"{name}.weight"] = layer.weight.detach().clone().contiguous()
            out[f"{name}.bias"] = layer.bias.detach().clone().contiguous()
        return out

    def load(self, weights, prefix):
        """Copies the layers' weights from a checkpoint in BridgeDiT's names (as float32)."""
        with torch.no_grad():
            for name, layer in self.layers(prefix):
                layer.weight.copy_(weights[f"{name}.weight"].float())
                layer.bias.copy_(weights[f"{name}.bias"].float())
        return self

    def forward(self, x1, x2, e1, e2, positions=None):
        """`positions`: each stream's RoPE positions (float tensors), else the sequence index."""
        def split(t):
            b, n, c = t.shape
            return t.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)

        def merge(t):
            b, h, n, d = t.shape
            return t.transpose(1, 2).reshape(b, n, h * d)

        m1 = self.s1.mod(nn.functional.silu(e1)).chunk(6, dim=1)
        m2 = self.s2.mod(nn.functional.silu(e2)).chunk(6, dim=1)
        ln = lambda x: nn.functional.layer_norm(x, x.shape[-1:], eps=1e-6)
        mod = lambda x, shift, scale: ln(x) * (1 + scale[:, None]) + shift[:, None]
        h1, h2 = mod(x1, m1[0], m1[1]), mod(x2, m2[0], m2[1])
        q1, k1, v1 = (split(f(h1)) for f in (self.s1.q, self.s1.k, self.s1.v))
        q2, k2, v2 = (split(f(h2)) for f in (self.s2.q, self.s2.k, self.s2.v))
        d = q1.shape[-1]
        p1, p2 = positions if positions is not None else (x1.shape[1], x2.shape[1])
        c1, n1 = rope_tables(d, p1)
        c2, n2 = rope_tables(d, p2)
        q1, k1 = rotate(q1, c1, n1), rotate(k1, c1, n1)
        q2, k2 = rotate(q2, c2, n2), rotate(k2, c2, n2)
        if self.flag == "joint":
            k, v = torch.cat([k1, k2], dim=2), torch.cat([v1, v2], dim=2)
            o1, o2 = attention(q1, k, v), attention(q2, k, v)
        elif self.flag == "additive":
            # No attention: each token takes the other stream's values at its own time.
            w12, w21 = resample_weights(p2, p1), resample_weights(p1, p2)
            o1, o2 = split(w12 @ merge(v2)), split(w21 @ merge(v1))
        else:
            o1 = attention(q1, k2, v2) if self.flag in ("bicross", "a2v") else attention(q1, k1, v1)
            o2 = attention(q2, k1, v1) if self.flag in ("bicross", "v2a") else attention(q2, k2, v2)
        x1 = x1 + m1[2][:, None] * self.s1.o(merge(o1))
        x2 = x2 + m2[2][:, None] * self.s2.o(merge(o2))
        gelu = lambda t: nn.functional.gelu(t, approximate="tanh")
        x1 = x1 + m1[5][:, None] * self.s1.fc2(gelu(self.s1.fc1(mod(x1, m1[3], m1[4]))))
        x2 = x2 + m2[5][:, None] * self.s2.fc2(gelu(self.s2.fc1(mod(x2, m2[3], m2[4]))))
        return x1, x2


def seconds_positions(n1, frames, n2, first, second, prefix):
    """The bridge's rope_positions "seconds"/"scaled": frame(n) * first for the first stream
    (frames major), max(n - prefix, 0) * second for the second, one float32 product each."""
    pv = (torch.arange(n1) // (n1 // frames)).float() * torch.tensor(first, dtype=torch.float32)
    pa = (torch.arange(n2) - prefix).clamp(min=0).float() * torch.tensor(second, dtype=torch.float32)
    return pv, pa


def make(name, flag, blocks, seed, rope=None):
    out = os.path.join(ROOT, name)
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "model"))
    torch.manual_seed(seed)
    dims = dict(c1=24, c2=16, e1=24, e2=16, qk=16, vc=16, heads=2)
    nets = [DualCross(**dims, flag=flag).eval() for _ in range(blocks)]
    with torch.no_grad():
        for net in nets:
            for p in net.parameters():
                p.copy_(torch.randn(p.shape) * 0.3)
    config = {"_class_name": "DualCrossAttentionBridge", "num_blocks": blocks, "num_heads": 2,
              "num_input_channels_1": 24, "num_input_channels_2": 16, "num_qk_channels": 16, "num_v_channels": 16,
              "t_emb_dim_1": 24, "t_emb_dim_2": 16, "mlp_ratio": 4.0, "flag": flag,
              "video_points": [1, 3][:blocks], "audio_points": [0, 2][:blocks]}
    positions = None
    if rope is not None:
        # 15 video tokens as 5 frames of 3, 7 audio tokens after one global token.
        config.update(rope)
        pps = rope["positions_per_second"]
        positions = seconds_positions(15, 5, 7, rope["video_seconds_per_frame"] * pps,
                                      rope["audio_seconds_per_token"] * pps, rope["audio_prefix_tokens"])
    with open(os.path.join(out, "model", "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    weights = {}
    for i, net in enumerate(nets):
        weights.update(net.state(f"dual_dit_blocks.{i}"))
    if flag == "additive":  # attends to nothing: a checkpoint need not hold q and k
        weights = {k: v for k, v in weights.items() if ".q_proj_" not in k and ".k_proj_" not in k}
    save_file(weights, os.path.join(out, "model", "bridge.safetensors"))
    inputs = {"video": torch.randn(2, 15, 24), "audio": torch.randn(2, 7, 16),
              "video_emb": torch.randn(2, 24), "audio_emb": torch.randn(2, 16)}
    tensors = {f"in.{k}": v for k, v in inputs.items()}
    with torch.no_grad():
        for i, net in enumerate(nets):
            v, a = net(inputs["video"], inputs["audio"], inputs["video_emb"], inputs["audio_emb"], positions)
            tensors[f"out.video_{i}"], tensors[f"out.audio_{i}"] = v.contiguous(), a.contiguous()
    save_file(tensors, os.path.join(out, "io.safetensors"))
    print(f"{name}: {blocks} block(s), |video| {tensors['out.video_0'].abs().max():.3f}")


def main():
    torch.set_num_threads(2)
    make("bridge", "bicross", 2, 41)
    make("bridge_a2v", "a2v", 1, 42)
    seconds = {"rope_positions": "seconds", "video_seconds_per_frame": 0.25, "audio_seconds_per_token": 0.2,
               "audio_prefix_tokens": 1, "positions_per_second": 4.0}
    make("bridge_seconds", "bicross", 1, 43, seconds)
    make("bridge_joint", "joint", 1, 44, seconds)
    make("bridge_additive", "additive", 1, 45, seconds)


if __name__ == "__main__":
    main()
