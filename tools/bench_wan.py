#!/usr/bin/env python3
"""Wan speed and memory at real width, ditflow beside diffusers in one run on 2 threads, each
keeping its fastest of a few forwards (PyTorch eager, under inference_mode), random weights:
two blocks of WanTransformer3DModel at Wan2.1-1.3B's widths (12 heads of 128, feed-forward
8960, UMT5's 4096-wide text), a 17-frame 240x416 clip's latent [1, 16, 5, 30, 52] (1950 video
tokens) and 512 text tokens. Timed in f32 and ditflow also from bf16 weights, with the peak
resident bytes, as tools/bench_mmdit.py does (its runner is reused), then ditflow from the same
weights as a Q8_0 GGUF (tools/bench_memory.py's writer).

Run (PyTorch and diffusers from PyPI; CI never runs this):
    .venv/bin/python tools/bench_wan.py
"""
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_mmdit import ENV, ROOT, THREADS, run_case  # noqa: E402


def wan_case():
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
        freq_dim=256, ffn_dim=8960, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    )
    inputs = {
        "hidden_states": torch.randn(1, 16, 5, 30, 52),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(1, 512, 4096),
    }
    return ("Wan2.1-1.3B widths, 2 blocks, latent [1, 16, 5, 30, 52] (1950 video tokens) + 512 text tokens",
            model, inputs, "LoadWan")


def main():
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True, env=ENV)
    subprocess.run(["cargo", "bench", "-q", "-p", "ditflow", "--bench", "pixart", "--no-run"], cwd=ROOT, check=True,
                   env=ENV)
    case = wan_case()
    best = run_case(case)
    # The same weights (run_case scaled them in place) as a city96-style Q8_0 GGUF, timed alone.
    from bench_memory import gguf_seconds, write_wan_gguf

    q8 = gguf_seconds(case[2], lambda path: write_wan_gguf(case[1], path, "Q8_0"), "wan-Q8_0.gguf", "LoadWan")
    print(f"  ditflow  {q8 * 1e3:8.1f} ms  (Q8_0 GGUF weights: {q8 / best['model']:.2f}x our f32, "
          f"{q8 / best['torch']:.2f}x PyTorch's f32)")

if __name__ == "__main__":
    main()
