#!/usr/bin/env python3
"""HiDream parity fixture: a tiny, randomly initialised HiDreamImageTransformer2DModel (diffusers
0.42) with its sparse MoE feed-forwards (4 routed experts, top 2 with no renormalisation, a
shared expert), the per-layer Llama wiring (`llama_layers` picks one Llama hidden state per
block, out of order here), and the inputs and output of one forward.

Writes tests/fixtures/parity/hidream/: the model as save_pretrained writes it, and
io.safetensors with `in.*` (hidden_states [2, 4, 8, 8], timesteps, encoder_hidden_states_t5,
encoder_hidden_states_llama3 [4 Llama layers, 2, 3, 10], pooled_embeds) and `out.sample`;
io_wide.safetensors the same for a wide [2, 4, 8, 12] latent (padded to max_resolution's 64
tokens with a key mask).

Run (PyTorch and diffusers from PyPI; CI never runs this):
    .venv/bin/python tools/make_hidream_fixtures.py
"""
import os
import shutil

import torch
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "parity")


def main():
    from diffusers import HiDreamImageTransformer2DModel

    torch.set_num_threads(2)
    out = os.path.join(ROOT, "hidream")
    shutil.rmtree(out, ignore_errors=True)
    model = HiDreamImageTransformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, caption_channels=[12, 10], text_emb_dim=14, num_routed_experts=4,
        num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(16, 16), llama_layers=[1, 3, 0, 2],
    )
    g = torch.Generator().manual_seed(17)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    inputs = {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=g),
        "timesteps": torch.tensor([900.0, 250.0]),
        "encoder_hidden_states_t5": torch.randn(2, 5, 12, generator=g),
        "encoder_hidden_states_llama3": torch.randn(4, 2, 3, 10, generator=g),
        "pooled_embeds": torch.randn(2, 14, generator=g),
    }
    with torch.no_grad():
        sample = model(**inputs, return_dict=False)[0]
    tensors = {f"in.{k}": v.contiguous() for k, v in inputs.items()}
    tensors["out.sample"] = sample.contiguous()
    save_file(tensors, os.path.join(out, "io.safetensors"))
    # A wide latent: padded to max_resolution's 64 tokens with a key mask, as diffusers does.
    inputs["hidden_states"] = torch.randn(2, 4, 8, 12, generator=g)
    with torch.no_grad():
        wide = model(**inputs, return_dict=False)[0]
    tensors = {f"in.{k}": v.contiguous() for k, v in inputs.items()}
    tensors["out.sample"] = wide.contiguous()
    save_file(tensors, os.path.join(out, "io_wide.safetensors"))
    print(f"hidream: {sum(p.numel() for p in model.parameters())} parameters, out {tuple(sample.shape)}")


if __name__ == "__main__":
    main()
