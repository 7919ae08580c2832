#!/usr/bin/env python3
"""SD3 parity fixtures (and the 16-channel VAE SD3 and Flux use): tiny, randomly initialised SD3Transformer2DModel (diffusers), one shaped
like SD3.0 (no q/k norm, no dual attention) and one like SD3.5 (RMS q/k norm, MMDiT-X dual
attention in the first block, and `skip_layers`), with the inputs and output of one forward.

Writes tests/fixtures/parity/sd3/ and sd3_5/: the model as save_pretrained writes it and
io.safetensors with `in.*` (hidden_states, encoder_hidden_states, pooled_projections, timestep;
sd3_5 also skip_layers) and `out.sample`. The position table is larger than the latent grid, so
the centre crop of `pos_embed_max_size` is exercised; the last block is `context_pre_only`.

Also writes tests/fixtures/parity/vae16/: an AutoencoderKL with 16 latent channels, no quant
convolutions, and shift and scaling factors (the SD3/Flux VAE's layout), with `in.image`,
`in.latent` and `out.mean`, `out.logvar`, `out.decoded`.

Also writes tests/fixtures/parity/sd3_5_single/: the SD3.5 model as one file in Stability AI's
layout (`joint_blocks.N.x_block.attn.qkv…`, ComfyUI's `model.diffusion_model.` prefix), checked
to convert back exactly with diffusers' `convert_sd3_transformer_checkpoint_to_diffusers`, and
its config beside it.

Also writes tests/fixtures/parity/sd3/io_scenes.safetensors: the sd3/ model's forward on one row
cut into two scenes (bands of token rows [1, 3] of the 4x4 token grid, captions of [2, 3] tokens)
with Mask²DiT's joint mask at every joint attention (image tokens attend to all image tokens and
to their scene's caption; caption tokens to their own caption and their scene's image tokens), a
boolean mask handed to scaled_dot_product_attention by a copy of JointAttnProcessor2_0.

Run (PyTorch and diffusers from PyPI; CI never runs this):
    .venv/bin/python tools/make_sd3_fixtures.py          # everything
    .venv/bin/python tools/make_sd3_fixtures.py scenes   # the scene fixture alone
"""
import os
import shutil

import torch
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "parity")


def main():
    from diffusers import SD3Transformer2DModel

    for name, extra, skip in [("sd3", {}, None),
                              ("sd3_5", {"qk_norm": "rms_norm", "dual_attention_layers": (0,)}, [1])]:
        out = os.path.join(ROOT, name)
        shutil.rmtree(out, ignore_errors=True)
        model = SD3Transformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
            num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
            pooled_projection_dim=10, out_channels=4, pos_embed_max_size=6, **extra,
        )
        g = torch.Generator().manual_seed(11 if skip is None else 12)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model.eval()
        model.save_pretrained(out, safe_serialization=True)
        inputs = {
            "hidden_states": torch.randn(2, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(2, 5, 12, generator=g),
            "pooled_projections": torch.randn(2, 10, generator=g),
            "timestep": torch.tensor([900.0, 250.0]),
        }
        kwargs = {}
        if skip is not None:
            inputs["skip_layers"] = torch.tensor(skip, dtype=torch.int64)
            kwargs["skip_layers"] = skip
        with torch.no_grad():
            sample = model(
                inputs["hidden_states"], encoder_hidden_states=inputs["encoder_hidden_states"],
                pooled_projections=inputs["pooled_projections"], timestep=inputs["timestep"],
                return_dict=False, **kwargs,
            )[0]
        tensors = {f"in.{k}": v.contiguous() for k, v in inputs.items()}
        tensors["out.sample"] = sample.contiguous()
        save_file(tensors, os.path.join(out, "io.safetensors"))
        print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters, out {tuple(sample.shape)}")


def vae16():
    from diffusers import AutoencoderKL

    out = os.path.join(ROOT, "vae16")
    shutil.rmtree(out, ignore_errors=True)
    model = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        act_fn="silu", latent_channels=16, norm_num_groups=4, sample_size=16,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    )
    g = torch.Generator().manual_seed(13)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            if name.endswith("weight") and p.dim() == 4:
                p.mul_(0.5)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    image = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    latent = torch.randn(1, 16, 8, 8, generator=g)
    with torch.no_grad():
        dist = model.encode(image).latent_dist
        decoded = model.decode(latent).sample
    save_file({"in.image": image, "in.latent": latent, "out.mean": dist.mean.contiguous(),
               "out.logvar": dist.logvar.contiguous(), "out.decoded": decoded.contiguous()},
              os.path.join(out, "io.safetensors"))
    print(f"vae16: {sum(p.numel() for p in model.parameters())} parameters")


def to_sai(sd, n):
    """The inverse of diffusers' convert_sd3_transformer_checkpoint_to_diffusers."""
    out = {}
    put = out.__setitem__
    ren = {"pos_embed.proj": "x_embedder.proj", "time_text_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
           "time_text_embed.timestep_embedder.linear_2": "t_embedder.mlp.2", "context_embedder": "context_embedder",
           "time_text_embed.text_embedder.linear_1": "y_embedder.mlp.0",
           "time_text_embed.text_embedder.linear_2": "y_embedder.mlp.2", "proj_out": "final_layer.linear"}
    put("pos_embed", sd["pos_embed.pos_embed"])
    for a, b in ren.items():
        for t in ("weight", "bias"):
            put(f"{b}.{t}", sd[f"{a}.{t}"])
    swap = lambda w: torch.cat(list(w.chunk(2, dim=0))[::-1])
    for i in range(n):
        p, x, c = f"transformer_blocks.{i}.", f"joint_blocks.{i}.x_block.", f"joint_blocks.{i}.context_block."
        last = i == n - 1
        for t in ("weight", "bias"):
            put(f"{x}attn.qkv.{t}", torch.cat([sd[f"{p}attn.to_{q}.{t}"] for q in "qkv"]))
            put(f"{c}attn.qkv.{t}", torch.cat([sd[f"{p}attn.add_{q}_proj.{t}"] for q in "qkv"]))
            put(f"{x}attn.proj.{t}", sd[f"{p}attn.to_out.0.{t}"])
            if not last:
                put(f"{c}attn.proj.{t}", sd[f"{p}attn.to_add_out.{t}"])
            put(f"{x}adaLN_modulation.1.{t}", sd[f"{p}norm1.linear.{t}"])
            m = sd[f"{p}norm1_context.linear.{t}"]
            put(f"{c}adaLN_modulation.1.{t}", swap(m) if last else m)
            put(f"{x}mlp.fc1.{t}", sd[f"{p}ff.net.0.proj.{t}"])
            put(f"{x}mlp.fc2.{t}", sd[f"{p}ff.net.2.{t}"])
            if not last:
                put(f"{c}mlp.fc1.{t}", sd[f"{p}ff_context.net.0.proj.{t}"])
                put(f"{c}mlp.fc2.{t}", sd[f"{p}ff_context.net.2.{t}"])
            if f"{p}attn2.to_q.{t}" in sd:
                put(f"{x}attn2.qkv.{t}", torch.cat([sd[f"{p}attn2.to_{q}.{t}"] for q in "qkv"]))
                put(f"{x}attn2.proj.{t}", sd[f"{p}attn2.to_out.0.{t}"])
        for a, b in [("norm_q", "attn.ln_q"), ("norm_k", "attn.ln_k")]:
            if f"{p}attn.{a}.weight" in sd:
                put(f"{x}{b}.weight", sd[f"{p}attn.{a}.weight"])
        for a, b in [("norm_added_q", "attn.ln_q"), ("norm_added_k", "attn.ln_k")]:
            if f"{p}attn.{a}.weight" in sd:
                put(f"{c}{b}.weight", sd[f"{p}attn.{a}.weight"])
        for a, b in [("norm_q", "attn2.ln_q"), ("norm_k", "attn2.ln_k")]:
            if f"{p}attn2.{a}.weight" in sd:
                put(f"{x}{b}.weight", sd[f"{p}attn2.{a}.weight"])
    for t in ("weight", "bias"):
        put(f"final_layer.adaLN_modulation.1.{t}", swap(sd[f"norm_out.linear.{t}"]))
    return out


def sd3_single():
    import json
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file

    src = os.path.join(ROOT, "sd3_5")
    out = os.path.join(ROOT, "sd3_5_single")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    sd = load_file(os.path.join(src, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    sai = to_sai(sd, cfg["num_layers"])
    back = convert_sd3_transformer_checkpoint_to_diffusers({f"model.diffusion_model.{k}": v.clone() for k, v in sai.items()})
    assert set(back) == set(sd), set(back) ^ set(sd)
    for k, v in back.items():
        assert torch.equal(v, sd[k]), k
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in sai.items()},
              os.path.join(out, "sd3.5-tiny.safetensors"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    print(f"sd3_5_single: {len(sai)} tensors, all {len(back)} equal after diffusers' converter")


def scenes():
    import torch.nn.functional as F
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import load_file

    out = os.path.join(ROOT, "sd3")
    model = SD3Transformer2DModel.from_pretrained(out).eval()
    io = load_file(os.path.join(out, "io.safetensors"))
    x, text = io["in.hidden_states"][:1], io["in.encoder_hidden_states"][:1]
    pooled, t = io["in.pooled_projections"][:1], io["in.timestep"][:1]
    rows, tokens = [1, 3], [2, 3]
    per_row = x.shape[3] // 2
    n = len(rows)
    image = torch.tensor([s for s, r in enumerate(rows) for _ in range(r * per_row)])
    caption = torch.tensor([n + s for s, c in enumerate(tokens) for _ in range(c)])
    ids = torch.cat([image, caption])
    a, b = ids[:, None], ids[None, :]
    mask = ((a < n) & (b < n)) | ((a < n) & (b == a + n)) | ((a >= n) & (b == a - n)) | ((a >= n) & (b == a))

    class SceneMask:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
            bsz, li = hidden_states.shape[0], hidden_states.shape[1]
            split = lambda y: y.view(bsz, -1, attn.heads, y.shape[-1] // attn.heads).transpose(1, 2)  # noqa: E731
            q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
            cq = split(attn.add_q_proj(encoder_hidden_states))
            ck = split(attn.add_k_proj(encoder_hidden_states))
            cv = split(attn.add_v_proj(encoder_hidden_states))
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)
            img, ctx = o[:, :li], o[:, li:]
            if not attn.context_pre_only:
                ctx = attn.to_add_out(ctx)
            return attn.to_out[0](img), ctx

    for block in model.transformer_blocks:
        assert block.attn.norm_q is None
        block.attn.set_processor(SceneMask())
    with torch.no_grad():
        sample = model(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=t, return_dict=False)[0]
    save_file({"in.hidden_states": x.contiguous(), "in.encoder_hidden_states": text.contiguous(),
               "in.pooled_projections": pooled.contiguous(), "in.timestep": t.contiguous(),
               "out.sample": sample.contiguous()}, os.path.join(out, "io_scenes.safetensors"))
    print(f"sd3 scenes: out {tuple(sample.shape)} |max| {sample.abs().max():.3f}")


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["scenes"]:
        scenes()
    else:
        main()
        vae16()
        sd3_single()
        scenes()
