#!/usr/bin/env python3
"""The bridges' overhead at real width: one SampleAudioVideo step of two Wan2.1-1.3B blocks and
two Stable Audio Open blocks coupled by one BridgeDiT-width dual cross-attention block (hidden
1536 on both sides, 12 heads), and by Ovi's fused cross-attention in both block pairs (keys and
values from the other tower in each tower's cross-attention; RoPE on the time band at each
token's seconds), on a 17-frame 240x416 clip's latent (1950 video tokens) and 5.4 s of audio (116
latent frames plus the global token), against the same step of the two towers alone, in one
process (cargo bench --bench av_bridge). Random weights: only the timing matters.

Run (PyTorch and diffusers from PyPI, to write the models; CI never runs this):
    .venv/bin/python tools/bench_av_bridge.py
"""
import json
import os
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, RAYON_NUM_THREADS="2")


def main():
    from diffusers import StableAudioDiTModel, WanTransformer3DModel

    torch.manual_seed(0)
    tmp = tempfile.mkdtemp(prefix="ditflow-bench-av-")
    wan = WanTransformer3DModel(num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=2)
    sa = StableAudioDiTModel(num_layers=2)  # Stable Audio Open's widths
    for m in (wan, sa):
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(0.5)
    wan.save_pretrained(os.path.join(tmp, "video"), safe_serialization=True)
    sa.save_pretrained(os.path.join(tmp, "audio"), safe_serialization=True)
    d = 1536
    bridge = {}
    for n in (1, 2):
        pre = "dual_dit_blocks.0"
        shapes = {f"adaln_modulation_{n}.1": (6 * d, d), f"attn.q_proj_{n}": (d, d), f"attn.k_proj_{n}": (d, d),
                  f"attn.v_proj_{n}": (d, d), f"attn.o_proj_{n}": (d, d), f"mlp_{n}.fc1": (4 * d, d),
                  f"mlp_{n}.fc2": (d, 4 * d)}
        for name, (o, i) in shapes.items():
            bridge[f"{pre}.{name}.weight"] = torch.randn(o, i) * i ** -0.5
            bridge[f"{pre}.{name}.bias"] = torch.zeros(o)
    os.makedirs(os.path.join(tmp, "bridge"))
    save_file(bridge, os.path.join(tmp, "bridge", "bridge.safetensors"))
    with open(os.path.join(tmp, "bridge", "config.json"), "w") as f:
        json.dump({"_class_name": "DualCrossAttentionBridge", "num_blocks": 1, "num_heads": 12,
                   "num_input_channels_1": d, "num_input_channels_2": d, "num_qk_channels": d, "num_v_channels": d,
                   "t_emb_dim_1": d, "t_emb_dim_2": d, "flag": "bicross", "video_points": [0], "audio_points": [0]}, f)
    fused = {}
    for tower in ("video_model", "audio_model"):
        for i in range(2):
            pre = f"{tower}.blocks.{i}.cross_attn"
            for name in ("k_fusion", "v_fusion"):
                fused[f"{pre}.{name}.weight"] = torch.randn(d, d) * d ** -0.5
                fused[f"{pre}.{name}.bias"] = torch.zeros(d)
            fused[f"{pre}.pre_attn_norm_fusion.weight"] = torch.ones(d)
            fused[f"{pre}.pre_attn_norm_fusion.bias"] = torch.zeros(d)
            fused[f"{pre}.norm_k_fusion.weight"] = torch.ones(d)
    os.makedirs(os.path.join(tmp, "fused"))
    save_file(fused, os.path.join(tmp, "fused", "bridge.safetensors"))
    with open(os.path.join(tmp, "fused", "config.json"), "w") as f:
        json.dump({"_class_name": "FusedCrossAttentionBridge", "num_blocks": 2, "video_dim": d, "audio_dim": d,
                   "video_heads": 12, "audio_heads": 24, "rope_dims": 44, "rope_positions": "seconds",
                   "video_seconds_per_frame": 0.25, "audio_seconds_per_token": 2048 / 44100,
                   "audio_prefix_tokens": 1, "positions_per_second": 8.0}, f)
    save_file({"video_text": torch.randn(1, 512, 4096), "audio_text": torch.randn(1, 128, 768),
               "audio_global": torch.randn(1, 1, 1536), "video_latent": torch.zeros(1, 16, 5, 30, 52),
               "audio_latent": torch.zeros(1, 64, 116)}, os.path.join(tmp, "inputs.safetensors"))
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True, env=ENV)
    res = subprocess.run(["cargo", "bench", "-q", "-p", "ditflow", "--bench", "av_bridge", "--",
                          os.path.join(ROOT, "target", "release"), tmp, os.environ.get("REPS", "3")],
                         cwd=ROOT, env=ENV, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(res.stderr)
    r = [json.loads(l) for l in res.stdout.splitlines() if l.startswith("{")][0]
    print("One audio-video step (2 Wan2.1-1.3B blocks, 1950 video tokens; 2 Stable Audio Open blocks, 117 audio "
          "tokens; 2 threads):")
    print(f"  towers alone   {r['alone_seconds'] * 1e3:8.1f} ms")
    print(f"  with a bridge  {r['bridged_seconds'] * 1e3:8.1f} ms  (one dual cross-attention block at width 1536: "
          f"+{100 * r['overhead']:.1f}%)")
    print(f"  fused (Ovi)    {r['fused_seconds'] * 1e3:8.1f} ms  (key/value injection in both block pairs: "
          f"+{100 * r['fused_overhead']:.1f}%)")


if __name__ == "__main__":
    main()
