#!/usr/bin/env python3
"""Wan parity fixture: a tiny, randomly initialised WanTransformer3DModel (diffusers 0.42): 3-D
patches (1, 2, 2), 2 heads of 12 channels (so the RoPE split of the head dimension is 4 for the
frames, 4 for the rows, 4 for the columns), q/k RMS norms across the heads, the cross-attention
norm, and the inputs and output of one forward.

Writes tests/fixtures/parity/wan/: the model as save_pretrained writes it, and io.safetensors with
`in.*` (hidden_states [2, 4, 3, 8, 10]: two rows, 3 frames, a non-square picture; timestep
[900, 250]; encoder_hidden_states [2, 7, 16]) and `out.sample` [2, 4, 3, 8, 10]; and
tests/fixtures/parity/wan_t2/ the same with a 2-frame temporal patch (patch (2, 2, 2), 4 frames).

Writes tests/fixtures/parity/wan_vae/: a tiny AutoencoderKLWan (Wan2.1's layout: base 8, z 4,
stages (1, 2, 2, 2), temporal downsampling in the last two) and io.safetensors with `in.video`
[1, 3, 9, 16, 16] (9 frames: the first chunk alone, then two of four, so every cache rule runs),
`in.latent` [1, 4, 3, 2, 2], and `out.mean`, `out.logvar` (the encoding) and `out.decoded`.

Writes tests/fixtures/parity/wan/io_scenes.safetensors: the wan/ model's forward on one row cut
into two scenes (latent frames [1, 2], captions of [3, 4] tokens) with Mask²DiT's segment mask at
every cross-attention (video tokens of scene s attend only to scene s's caption tokens; a custom
WanAttnProcessor passes the boolean mask), `in.*` and `out.sample`.

Run (PyTorch and diffusers from PyPI; CI never runs this):
    .venv/bin/python tools/make_wan_fixtures.py
"""
import os
import shutil

import torch
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "parity")


def make(out, patch, frames, seed):
    from diffusers import WanTransformer3DModel

    shutil.rmtree(out, ignore_errors=True)
    model = WanTransformer3DModel(
        patch_size=patch, num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=32, ffn_dim=48, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32,
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    inputs = {
        "hidden_states": torch.randn(2, 4, frames, 8, 10, generator=g),
        "timestep": torch.tensor([900.0, 250.0]),
        "encoder_hidden_states": torch.randn(2, 7, 16, generator=g),
    }
    with torch.no_grad():
        sample = model(**inputs, return_dict=False)[0]
    tensors = {f"in.{k}": v.contiguous() for k, v in inputs.items()}
    tensors["out.sample"] = sample.contiguous()
    save_file(tensors, os.path.join(out, "io.safetensors"))
    print(f"{os.path.basename(out)}: {sum(p.numel() for p in model.parameters())} parameters, "
          f"out {tuple(sample.shape)} |max| {sample.abs().max():.3f}")


def vae(seed=25):
    from diffusers import AutoencoderKLWan

    out = os.path.join(ROOT, "wan_vae")
    shutil.rmtree(out, ignore_errors=True)
    model = AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                             temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=g) / fan_in ** 0.5)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    video = torch.rand(1, 3, 9, 16, 16, generator=g) * 2 - 1
    latent = torch.randn(1, 4, 3, 2, 2, generator=g)
    with torch.no_grad():
        dist = model.encode(video).latent_dist
        decoded = model.decode(latent).sample
    tensors = {"in.video": video, "in.latent": latent, "out.mean": dist.mean.contiguous(),
               "out.logvar": dist.logvar.contiguous(), "out.decoded": decoded.contiguous()}
    save_file(tensors, os.path.join(out, "io.safetensors"))
    print(f"wan_vae: mean {tuple(dist.mean.shape)} |max| {dist.mean.abs().max():.3f}, decoded "
          f"{tuple(decoded.shape)} with {100 * (decoded.abs() < 1).float().mean():.0f}% unclamped")


def scenes():
    from diffusers import WanTransformer3DModel
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor
    from safetensors.torch import load_file

    out = os.path.join(ROOT, "wan")
    model = WanTransformer3DModel.from_pretrained(out).eval()
    io = load_file(os.path.join(out, "io.safetensors"))
    x, t, text = io["in.hidden_states"][:1], io["in.timestep"][:1], io["in.encoder_hidden_states"][:1]
    frames, tokens = [1, 2], [3, 4]
    per_frame = (x.shape[3] // 2) * (x.shape[4] // 2)
    video = torch.tensor([s for s, n in enumerate(frames) for _ in range(n * per_frame)])
    caption = torch.tensor([s for s, n in enumerate(tokens) for _ in range(n)])
    mask = video[:, None] == caption[None, :]

    class SceneMask(WanAttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
            return super().__call__(attn, hidden_states, encoder_hidden_states, mask, rotary_emb)

    for block in model.blocks:
        block.attn2.set_processor(SceneMask())
    with torch.no_grad():
        sample = model(x, t, text, return_dict=False)[0]
    save_file({"in.hidden_states": x.contiguous(), "in.timestep": t.contiguous(),
               "in.encoder_hidden_states": text.contiguous(), "out.sample": sample.contiguous()},
              os.path.join(out, "io_scenes.safetensors"))
    print(f"wan scenes: out {tuple(sample.shape)} |max| {sample.abs().max():.3f}")


def main():
    torch.set_num_threads(2)
    make(os.path.join(ROOT, "wan"), (1, 2, 2), 3, 23)
    make(os.path.join(ROOT, "wan_t2"), (2, 2, 2), 4, 24)
    vae()
    scenes()


if __name__ == "__main__":
    main()
