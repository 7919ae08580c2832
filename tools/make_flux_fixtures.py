#!/usr/bin/env python3
"""Flux parity fixtures: tiny, randomly initialised FluxTransformer2DModel (diffusers), one with
the guidance embedding (dev) and one without (schnell), with the inputs and the output of one
forward, for ditflow's Flux parity test.

Writes tests/fixtures/parity/flux_{dev,schnell}/: the model as save_pretrained writes it, and
io.safetensors with `in.*` (hidden_states, encoder_hidden_states, pooled_projections, timestep,
img_ids, txt_ids, guidance) and `out.sample`. The image ids are FluxPipeline's
`_prepare_latent_image_ids` (0, row, column) for a 4x4 grid of packed latents; the text ids zeros.

Also writes tests/fixtures/parity/flux_dev_single/: the dev model as one BFL-layout file with
ComfyUI's `model.diffusion_model.` prefix (fused qkv and linear1, the final layer's shift and
scale in BFL's order), checked here to convert back exactly with diffusers'
`convert_flux_transformer_checkpoint_to_diffusers`, and the diffusers config beside it (a real
BFL file has none; the tiny model's RoPE axes cannot be inferred from its shapes).

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


def to_bfl(sd):
    """The inverse of diffusers' convert_flux_transformer_checkpoint_to_diffusers."""
    out = {}
    put = out.__setitem__
    ren = {"time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
           "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
           "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
           "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
           "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
           "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
           "context_embedder": "txt_in", "x_embedder": "img_in", "proj_out": "final_layer.linear"}
    for a, b in ren.items():
        for t in ("weight", "bias"):
            if f"{a}.{t}" in sd:
                put(f"{b}.{t}", sd[f"{a}.{t}"])
    n_double = len({k.split(".")[1] for k in sd if k.startswith("transformer_blocks.")})
    n_single = len({k.split(".")[1] for k in sd if k.startswith("single_transformer_blocks.")})
    for i in range(n_double):
        p, q = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for t in ("weight", "bias"):
            put(f"{q}img_mod.lin.{t}", sd[f"{p}norm1.linear.{t}"])
            put(f"{q}txt_mod.lin.{t}", sd[f"{p}norm1_context.linear.{t}"])
            put(f"{q}img_attn.qkv.{t}", torch.cat([sd[f"{p}attn.to_{x}.{t}"] for x in "qkv"]))
            put(f"{q}txt_attn.qkv.{t}", torch.cat([sd[f"{p}attn.add_{x}_proj.{t}"] for x in "qkv"]))
            put(f"{q}img_mlp.0.{t}", sd[f"{p}ff.net.0.proj.{t}"])
            put(f"{q}img_mlp.2.{t}", sd[f"{p}ff.net.2.{t}"])
            put(f"{q}txt_mlp.0.{t}", sd[f"{p}ff_context.net.0.proj.{t}"])
            put(f"{q}txt_mlp.2.{t}", sd[f"{p}ff_context.net.2.{t}"])
            put(f"{q}img_attn.proj.{t}", sd[f"{p}attn.to_out.0.{t}"])
            put(f"{q}txt_attn.proj.{t}", sd[f"{p}attn.to_add_out.{t}"])
        put(f"{q}img_attn.norm.query_norm.scale", sd[f"{p}attn.norm_q.weight"])
        put(f"{q}img_attn.norm.key_norm.scale", sd[f"{p}attn.norm_k.weight"])
        put(f"{q}txt_attn.norm.query_norm.scale", sd[f"{p}attn.norm_added_q.weight"])
        put(f"{q}txt_attn.norm.key_norm.scale", sd[f"{p}attn.norm_added_k.weight"])
    for i in range(n_single):
        p, q = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for t in ("weight", "bias"):
            put(f"{q}modulation.lin.{t}", sd[f"{p}norm.linear.{t}"])
            put(f"{q}linear1.{t}", torch.cat([sd[f"{p}attn.to_{x}.{t}"] for x in "qkv"] + [sd[f"{p}proj_mlp.{t}"]]))
            put(f"{q}linear2.{t}", sd[f"{p}proj_out.{t}"])
        put(f"{q}norm.query_norm.scale", sd[f"{p}attn.norm_q.weight"])
        put(f"{q}norm.key_norm.scale", sd[f"{p}attn.norm_k.weight"])
    for t in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{t}"].chunk(2, dim=0)
        put(f"final_layer.adaLN_modulation.1.{t}", torch.cat([shift, scale]))
    return out


def single_file():
    import json
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file

    src = os.path.join(ROOT, "flux_dev")
    out = os.path.join(ROOT, "flux_dev_single")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    sd = load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
    bfl = to_bfl(sd)
    # diffusers' converter gives the double blocks and the embeddings back exactly. It splits the
    # single blocks' linear1 at Flux's real width (3072), so those get real-width zeros here and
    # are left out of the check; their split is the concatenation above in reverse.
    probe = {k: v.clone() for k, v in bfl.items()}
    for k in [k for k in probe if k.startswith("single_blocks.") and ".linear1." in k]:
        probe[k] = torch.zeros((7 * 3072,) + tuple(probe[k].shape[1:]))
    conv = convert_flux_transformer_checkpoint_to_diffusers(probe)
    checked = 0
    for k, v in conv.items():
        if not k.startswith("single_transformer_blocks.") or ".attn.to_" not in k and "proj_mlp" not in k:
            assert torch.equal(v, sd[k]), k
            checked += 1
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in bfl.items()},
              os.path.join(out, "flux1-tiny.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    print(f"flux_dev_single: {len(bfl)} tensors; {checked} checked against diffusers' converter")


if __name__ == "__main__":
    main()
    single_file()
