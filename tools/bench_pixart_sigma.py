#!/usr/bin/env python3
"""PixArt-Σ at its real size on the CPU, ditflow beside diffusers' PixArtTransformer2DModel in
one run on 2 threads (PyTorch eager under inference_mode; each side keeps its fastest forward),
random weights: hidden 1152 (16 heads of 72), 28 layers, caption width 4096 with 120 caption
tokens, a 64x64 latent with patch 2 (1024 image tokens). Timed in f32 (target: ours <= 0.85x
PyTorch's time) and ours also from the weights saved in bf16 (target: within 1.15x of our f32),
with the peak resident bytes, then ours from the same weights as a Q8_0 GGUF in diffusers'
names (tools/bench_memory.py's writer).

Then the growth of cost with tokens on both sides: the smaller config of tools/bench_pixart.py
(hidden 384, 12 layers) at 256 and at 4096 image tokens.

Run (PyTorch and diffusers from PyPI; CI never runs this):
    .venv/bin/python tools/bench_pixart_sigma.py [real] [small]
"""
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_mmdit import ENV, ROOT, THREADS, run_case  # noqa: E402

NO_CONDITIONS = {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def pixart(heads, head_dim, layers, caption, sample, caption_tokens):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8, num_layers=layers,
        cross_attention_dim=heads * head_dim, sample_size=sample, patch_size=2, caption_channels=caption,
        use_additional_conditions=False, interpolation_scale=max(1, sample // 64),
    )
    inputs = {
        "hidden_states": torch.randn(1, 4, sample, sample),
        "encoder_hidden_states": torch.randn(1, caption_tokens, caption),
        "timestep": torch.tensor([500.0]),
    }
    tokens = (sample // 2) ** 2
    return model, inputs, tokens


def q8_0(model, inputs):
    """Our fastest forward from `model`'s weights (as run_case left them) as a Q8_0 GGUF."""
    from bench_memory import gguf_seconds, write_gguf

    return gguf_seconds(inputs, lambda path: write_gguf(model.state_dict(), path, "Q8_0", "pixart", model),
                        "pixart-sigma-Q8_0.gguf", "LoadDiffusionModel")


def main():
    torch.set_num_threads(THREADS)
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True, env=ENV)
    subprocess.run(["cargo", "bench", "-q", "-p", "ditflow", "--bench", "pixart", "--no-run"], cwd=ROOT, check=True,
                   env=ENV)
    wanted = sys.argv[1:] or ["real", "small"]
    if "real" in wanted:
        model, inputs, tokens = pixart(16, 72, 28, 4096, 64, 120)
        best = run_case((f"PixArt-Sigma real size (hidden 1152, 28 layers), {tokens} image + 120 caption tokens",
                         model, inputs, "LoadDiffusionModel"), target=0.85, torch_kwargs=NO_CONDITIONS)
        print(f"  bf16 weights / f32: {best['model_bf16'] / best['model']:.2f}x (target <= 1.15)")
        q8 = q8_0(model, inputs)
        print(f"  ditflow  {q8 * 1e3:8.1f} ms  (Q8_0 GGUF weights: {q8 / best['model']:.2f}x our f32, "
              f"{q8 / best['torch']:.2f}x PyTorch's f32)")
    if "small" in wanted:
        for sample in [32, 128]:
            model, inputs, tokens = pixart(6, 64, 12, 64, sample, 16)
            run_case((f"PixArt small config (hidden 384, 12 layers), {tokens} image + 16 caption tokens",
                      model, inputs, "LoadDiffusionModel"), target=0.85, torch_kwargs=NO_CONDITIONS)


if __name__ == "__main__":
    main()
