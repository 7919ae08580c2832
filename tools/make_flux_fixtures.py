#!/usr/bin/env python3
"""Flux parity fixtures: tiny, randomly initialised FluxTransformer2DModel (diffusers), one with
the guidance embedding (dev) and one without (schnell), with the inputs and the output of one
forward, for ditflow's Flux parity test.

Writes tests/fixtures/parity/flux_{dev,schnell}/: the model as save_pretrained writes it, and
io.safetensors with `in.*` (hidden_states, encoder_hidden_states, pooled_projections, timestep,
img_ids, txt_ids, guidance) and `out.sample`. The image ids are FluxPipeline's
`_prepare_latent_image_ids` (0, row, column) for a 4x4 grid of packed latents; the text ids zeros.

Run (PyTorch and diffusers from PyPI; CI never runs this):
    .venv/bin/python tools/make_flux_fixtures.py
"""
import os
import shutil

import torch
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "parity")


def main():
    from diffusers import FluxTransformer2DModel

    for name, guidance in [("dev", True), ("schnell", False)]:
        out = os.path.join(ROOT, f"flux_{name}")
        shutil.rmtree(out, ignore_errors=True)
        model = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10,
            guidance_embeds=guidance, axes_dims_rope=(2, 2, 4),
        )
        g = torch.Generator().manual_seed(7 if guidance else 8)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model.eval()
        model.save_pretrained(out, safe_serialization=True)
        h = w = 4
        img_ids = torch.zeros(h, w, 3)
        img_ids[..., 1] = torch.arange(h)[:, None]
        img_ids[..., 2] = torch.arange(w)[None, :]
        inputs = {
            "hidden_states": torch.randn(2, h * w, 16, generator=g),
            "encoder_hidden_states": torch.randn(2, 5, 12, generator=g),
            "pooled_projections": torch.randn(2, 10, generator=g),
            "timestep": torch.tensor([0.9, 0.3]),
            "img_ids": img_ids.reshape(h * w, 3),
            "txt_ids": torch.zeros(5, 3),
        }
        if guidance:
            inputs["guidance"] = torch.tensor([3.5, 3.5])
        with torch.no_grad():
            sample = model(**inputs, return_dict=False)[0]
        tensors = {f"in.{k}": v.contiguous() for k, v in inputs.items()}
        tensors["out.sample"] = sample.contiguous()
        save_file(tensors, os.path.join(out, "io.safetensors"))
        print(f"flux {name}: {sum(p.numel() for p in model.parameters())} parameters, out {tuple(sample.shape)}")


if __name__ == "__main__":
    main()
