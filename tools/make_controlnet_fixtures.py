#!/usr/bin/env python3
"""ControlNet pipeline fixtures: tiny, randomly initialised SD3 and Flux ControlNets (diffusers
0.42) on tiny transformers, run by StableDiffusion3ControlNetPipeline and FluxControlNetPipeline
from ditflow's seeded noise.

Writes tests/fixtures/parity/sd3_controlnet/:
- transformer/ (4 joint blocks), controlnet_a/ (2 blocks: residuals every 2 base blocks),
  controlnet_b/ (2 blocks), vae/ (16 channels; its encoder's log-variance pinned at -30, so the
  pipeline's `latent_dist.sample()` is its mean to 3e-7 and ditflow's mean-encoded hint matches);
- hint_a.png, hint_b.png: the hint images (16x16);
- io.safetensors: `in.noise`, `in.hint_a`/`in.hint_b` (the PNGs in [0, 1]), and the final latent
  and image of two runs: `single` (controlnet_a at 0.8) and `multi` (SD3MultiControlNetModel of
  a at 0.7 over [0, 0.5] and b at 1.2 over [0.25, 1]).
Writes tests/fixtures/parity/flux_controlnet/:
- transformer/ (2 double, 4 single blocks), controlnet/ (1 double, 2 single), controlnet_union/
  (1 and 1, 3 control modes), vae/ (pinned as above), hint.png;
- io.safetensors: `in.noise`, `in.hint`, and the final latent (unpacked) and image of `plain`
  (controlnet at 0.8, guidance 3.5) and `union` (mode 1 at 1.1 over [0.25, 0.75]).
Writes tests/fixtures/parity/flux_controlnet_xlabs/ (an XLabs-style ControlNet: an input hint
block on the image itself, and residuals repeated over the double blocks):
- transformer/ (4 double, 1 single block), controlnet/ (2 double, 0 single, 16-channel hint
  block, patch size 2), vae/ (16 channels, 8x downscale), hint.png (64x64);
- io.safetensors: `in.noise`, `in.hint`, and the final latent and image of `xlabs` (at 0.9,
  guidance 3.5).
The text encoders, tokenizers and scheduler are those of tests/fixtures/parity/sd3_pipeline/
and flux_pipeline/
(made by tools/make_mmdit_pipeline_fixtures.py with the same seeds, so they are rebuilt here
identically rather than saved twice).

Run (PyTorch, diffusers and transformers from PyPI; CI never runs this):
    .venv/bin/python tools/make_controlnet_fixtures.py [sd3] [flux] [xlabs]
"""
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_mmdit_pipeline_fixtures import PROMPT, ROOT, clip, randomize, t5, vae  # noqa: E402
from make_parity_fixtures import philox_randn  # noqa: E402


def smooth_image(seed, path, size=16):
    """A [size, size, 3] picture in [0, 1] with some structure (a blurred random field),
    quantised to 8 bits and written to `path` as a PNG (what LoadImage reads)."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, size // 2, size // 2, generator=g)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    u8 = (x[0].permute(1, 2, 0) * 255).round().clamp(0, 255).to(torch.uint8)
    Image.fromarray(u8.numpy()).save(path)
    return (u8.float() / 255).contiguous()


def sd3(seed=300):
    from diffusers import (FlowMatchEulerDiscreteScheduler, SD3ControlNetModel, SD3MultiControlNetModel,
                           SD3Transformer2DModel, StableDiffusion3ControlNetPipeline)

    out = os.path.join(ROOT, "sd3_controlnet")
    shutil.rmtree(out, ignore_errors=True)
    # The sd3_pipeline fixture's encoders (same constructors and seeds).
    te1, _, fast1, _ = clip(16, 2, 8, True, 100)
    te2, _, fast2, _ = clip(24, 2, 12, False, 101)
    te3, _, fast3 = t5(48, 102)
    shape = dict(sample_size=8, patch_size=2, in_channels=16, attention_head_dim=8, num_attention_heads=2,
                 joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=20, out_channels=16,
                 pos_embed_max_size=8)
    dit = randomize(SD3Transformer2DModel(num_layers=4, **shape), seed, 0.15)
    cn_a = randomize(SD3ControlNetModel(num_layers=2, **shape), seed + 1, 0.15)
    # Both of 2 blocks: SD3MultiControlNetModel zips the nets' residual lists, so nets of
    # different depths would be cut to the shortest (ditflow maps each by its own depth).
    cn_b = randomize(SD3ControlNetModel(num_layers=2, **shape), seed + 2, 0.15)
    ae = vae(seed + 3)
    with torch.no_grad():
        ae.encoder.conv_out.weight[16:] = 0
        ae.encoder.conv_out.bias[16:] = -30
    dit.save_pretrained(os.path.join(out, "transformer"), safe_serialization=True)
    cn_a.save_pretrained(os.path.join(out, "controlnet_a"), safe_serialization=True)
    cn_b.save_pretrained(os.path.join(out, "controlnet_b"), safe_serialization=True)
    ae.save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    hint_a = smooth_image(seed + 4, os.path.join(out, "hint_a.png"))
    hint_b = smooth_image(seed + 5, os.path.join(out, "hint_b.png"))
    as_input = lambda h: (h.permute(2, 0, 1)[None] * 2 - 1).contiguous()  # noqa: E731
    noise_seed, steps, cfg = 13, 4, 4.0
    noise = philox_randn((1, 16, 8, 8), noise_seed)
    tensors = {"in.noise": noise, "in.hint_a": hint_a, "in.hint_b": hint_b}
    runs = {
        "single": dict(controlnet=cn_a, control_image=as_input(hint_a), controlnet_conditioning_scale=0.8),
        "multi": dict(controlnet=SD3MultiControlNetModel([cn_a, cn_b]),
                      control_image=[as_input(hint_a), as_input(hint_b)],
                      controlnet_conditioning_scale=[0.7, 1.2], control_guidance_start=[0.0, 0.25],
                      control_guidance_end=[0.5, 1.0]),
    }
    for name, run in runs.items():
        pipe = StableDiffusion3ControlNetPipeline(
            transformer=dit, scheduler=sched, vae=ae, text_encoder=te1, tokenizer=fast1, text_encoder_2=te2,
            tokenizer_2=fast2, text_encoder_3=te3, tokenizer_3=fast3, controlnet=run.pop("controlnet"))
        args = dict(prompt=PROMPT, negative_prompt="", num_inference_steps=steps, guidance_scale=cfg, height=16,
                    width=16, max_sequence_length=16, **run)
        with torch.no_grad():
            latent = pipe(**args, latents=noise.clone(), output_type="latent").images
            image = pipe(**args, latents=noise.clone(), output_type="pt").images
        tensors[f"out.latent_{name}"] = latent.contiguous()
        tensors[f"out.image_{name}"] = image[0].permute(1, 2, 0).contiguous()
        print(f"sd3_controlnet {name}: latent |max| {latent.abs().max():.3f}")
    save_file(tensors, os.path.join(out, "io.safetensors"))


def flux(seed=400):
    from diffusers import (FlowMatchEulerDiscreteScheduler, FluxControlNetModel, FluxControlNetPipeline,
                           FluxTransformer2DModel)

    out = os.path.join(ROOT, "flux_controlnet")
    shutil.rmtree(out, ignore_errors=True)
    # The flux_pipeline fixture's encoders (same constructors and seeds).
    te1, _, fast1, _ = clip(16, 2, None, True, 200)
    te2, _, fast2 = t5(24, 201)
    shape = dict(patch_size=1, in_channels=64, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                 pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    dit = randomize(FluxTransformer2DModel(num_layers=2, num_single_layers=4, **shape), seed, 0.15)
    plain = randomize(FluxControlNetModel(num_layers=1, num_single_layers=2, **shape), seed + 1, 0.15)
    union = randomize(FluxControlNetModel(num_layers=1, num_single_layers=1, num_mode=3, **shape), seed + 2, 0.15)
    ae = vae(seed + 3)
    with torch.no_grad():
        ae.encoder.conv_out.weight[16:] = 0
        ae.encoder.conv_out.bias[16:] = -30
        # Distinct modes, so that the test tells them apart clearly.
        union.controlnet_mode_embedder.weight.mul_(8)
    dit.save_pretrained(os.path.join(out, "transformer"), safe_serialization=True)
    plain.save_pretrained(os.path.join(out, "controlnet"), safe_serialization=True)
    union.save_pretrained(os.path.join(out, "controlnet_union"), safe_serialization=True)
    ae.save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    hint = smooth_image(seed + 4, os.path.join(out, "hint.png"))
    control = (hint.permute(2, 0, 1)[None] * 2 - 1).contiguous()
    noise_seed, steps, guidance = 14, 4, 3.5
    noise = philox_randn((1, 16, 8, 8), noise_seed)
    packed = FluxControlNetPipeline._pack_latents(noise, 1, 16, 8, 8)
    tensors = {"in.noise": noise, "in.hint": hint}
    runs = {
        "plain": dict(controlnet=plain, controlnet_conditioning_scale=0.8),
        "union": dict(controlnet=union, control_mode=1, controlnet_conditioning_scale=1.1,
                      control_guidance_start=0.25, control_guidance_end=0.75),
    }
    for name, run in runs.items():
        pipe = FluxControlNetPipeline(transformer=dit, scheduler=sched, vae=ae, text_encoder=te1, tokenizer=fast1,
                                      text_encoder_2=te2, tokenizer_2=fast2, controlnet=run.pop("controlnet"))
        args = dict(prompt=PROMPT, control_image=control, num_inference_steps=steps, guidance_scale=guidance,
                    height=16, width=16, max_sequence_length=16, **run)
        with torch.no_grad():
            latent = pipe(**args, latents=packed.clone(), output_type="latent").images
            image = pipe(**args, latents=packed.clone(), output_type="pt").images
        latent = FluxControlNetPipeline._unpack_latents(latent, 16, 16, 2)
        tensors[f"out.latent_{name}"] = latent.contiguous()
        tensors[f"out.image_{name}"] = image[0].permute(1, 2, 0).contiguous()
        print(f"flux_controlnet {name}: latent |max| {latent.abs().max():.3f}")
    save_file(tensors, os.path.join(out, "io.safetensors"))


def flux_xlabs(seed=500):
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxControlNetModel,
                           FluxControlNetPipeline, FluxTransformer2DModel)

    out = os.path.join(ROOT, "flux_controlnet_xlabs")
    shutil.rmtree(out, ignore_errors=True)
    te1, _, fast1, _ = clip(16, 2, None, True, 200)
    te2, _, fast2 = t5(24, 201)
    shape = dict(in_channels=64, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=24,
                 pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4))
    dit = randomize(FluxTransformer2DModel(num_layers=4, num_single_layers=1, patch_size=1, **shape), seed, 0.15)
    # XLabs' layout as diffusers converts it: a hint block making 16 channels, packed in 2x2
    # patches (patch_size 2) into the 64 of controlnet_x_embedder; two double blocks whose
    # residuals repeat over the base's four (0, 1, 0, 1), where interval_control would give 0, 0, 1, 1.
    cn = randomize(FluxControlNetModel(num_layers=2, num_single_layers=0, patch_size=2,
                                       conditioning_embedding_channels=16, **shape), seed + 1, 0.15)
    # An 8x VAE (four levels), as the hint block's 8x downscale needs.
    ae = randomize(AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        act_fn="silu", latent_channels=16, norm_num_groups=4, sample_size=64,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    ), seed + 2, 0.2)
    with torch.no_grad():
        for name, p in ae.named_parameters():
            if name.endswith("weight") and p.dim() == 4:
                p.mul_(0.5)
    dit.save_pretrained(os.path.join(out, "transformer"), safe_serialization=True)
    cn.save_pretrained(os.path.join(out, "controlnet"), safe_serialization=True)
    ae.save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    hint = smooth_image(seed + 3, os.path.join(out, "hint.png"), 64)
    control = (hint.permute(2, 0, 1)[None] * 2 - 1).contiguous()
    noise_seed, steps, guidance = 15, 4, 3.5
    noise = philox_randn((1, 16, 8, 8), noise_seed)
    packed = FluxControlNetPipeline._pack_latents(noise, 1, 16, 8, 8)
    tensors = {"in.noise": noise, "in.hint": hint}
    pipe = FluxControlNetPipeline(transformer=dit, scheduler=sched, vae=ae, text_encoder=te1, tokenizer=fast1,
                                  text_encoder_2=te2, tokenizer_2=fast2, controlnet=cn)
    args = dict(prompt=PROMPT, control_image=control, num_inference_steps=steps, guidance_scale=guidance,
                height=64, width=64, max_sequence_length=16, controlnet_conditioning_scale=0.9)
    with torch.no_grad():
        latent = pipe(**args, latents=packed.clone(), output_type="latent").images
        image = pipe(**args, latents=packed.clone(), output_type="pt").images
    latent = FluxControlNetPipeline._unpack_latents(latent, 64, 64, 8)
    tensors["out.latent_xlabs"] = latent.contiguous()
    tensors["out.image_xlabs"] = image[0].permute(1, 2, 0).contiguous()
    print(f"flux_controlnet_xlabs: latent |max| {latent.abs().max():.3f}")
    save_file(tensors, os.path.join(out, "io.safetensors"))


def main():
    torch.set_num_threads(2)
    wanted = sys.argv[1:] or ["sd3", "flux", "xlabs"]
    for name, make in [("sd3", sd3), ("flux", flux), ("xlabs", flux_xlabs)]:
        if name in wanted:
            make()


if __name__ == "__main__":
    main()
