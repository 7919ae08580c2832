#!/usr/bin/env python3
"""Flux IP-Adapter fixtures: a tiny, randomly initialised CLIPVisionModelWithProjection
(transformers) with its CLIPImageProcessor, a random IP-Adapter in XLabs' file layout, and what
FluxPipeline makes with them (diffusers' load_ip_adapter, FluxIPAdapterAttnProcessor) from
ditflow's seeded noise, on the flux_pipeline fixture's transformer and encoders.

Writes tests/fixtures/parity/flux_ip_adapter/:
- image_encoder/ (config, weights, preprocessor_config.json), ip_adapter.safetensors
  (`ip_adapter_proj_model.*`, `double_blocks.0.processor.ip_adapter_double_stream_{k,v}_proj.*`),
  reference.png (32x32, so CLIP's resize and crop keep it as it is);
- io.safetensors: `in.noise`, `in.pixel_values` (the processor's output), `out.image_embeds`
  (the encoder's), and the final latent and image at IP-Adapter scale 0.7.

Run (PyTorch, diffusers and transformers from PyPI; CI never runs this):
    .venv/bin/python tools/make_ip_adapter_fixtures.py
"""
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_controlnet_fixtures import smooth_image  # noqa: E402
from make_mmdit_pipeline_fixtures import PROMPT, ROOT, clip, randomize, t5  # noqa: E402
from make_parity_fixtures import philox_randn  # noqa: E402


def main():
    from diffusers import FluxPipeline, FluxTransformer2DModel, AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from PIL import Image
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.set_num_threads(2)
    out = os.path.join(ROOT, "flux_ip_adapter")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    base = os.path.join(ROOT, "flux_pipeline")
    te1, _, fast1, _ = clip(16, 2, None, True, 200)
    te2, _, fast2 = t5(24, 201)
    dit = FluxTransformer2DModel.from_pretrained(os.path.join(base, "transformer")).eval()
    ae = AutoencoderKL.from_pretrained(os.path.join(base, "vae")).eval()
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(base, "scheduler"))
    vision = randomize(CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        patch_size=8, projection_dim=12, hidden_act="gelu")), 500, 0.2)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    vision.save_pretrained(os.path.join(out, "image_encoder"), safe_serialization=True)
    processor.save_pretrained(os.path.join(out, "image_encoder"))
    g = torch.Generator().manual_seed(501)
    d, cross, embed = dit.inner_dim, dit.config.joint_attention_dim, 12
    ip = {
        "ip_adapter_proj_model.proj.weight": torch.randn(4 * cross, embed, generator=g) * 0.3,
        "ip_adapter_proj_model.proj.bias": torch.randn(4 * cross, generator=g) * 0.1,
        "ip_adapter_proj_model.norm.weight": 1 + 0.1 * torch.randn(cross, generator=g),
        "ip_adapter_proj_model.norm.bias": 0.1 * torch.randn(cross, generator=g),
    }
    for i in range(len(dit.transformer_blocks)):
        for kv in ["k", "v"]:
            p = f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj"
            ip[f"{p}.weight"] = torch.randn(d, cross, generator=g) * 0.5
            ip[f"{p}.bias"] = torch.randn(d, generator=g) * 0.1
    save_file(ip, os.path.join(out, "ip_adapter.safetensors"))
    smooth_image(502, os.path.join(out, "reference_small.png"))
    # 32x32: CLIP's resize and centre crop keep it as it is.
    small = Image.open(os.path.join(out, "reference_small.png"))
    ref = small.resize((32, 32), Image.NEAREST)
    os.remove(os.path.join(out, "reference_small.png"))
    ref.save(os.path.join(out, "reference.png"))
    pixel_values = processor(ref, return_tensors="pt").pixel_values
    with torch.no_grad():
        image_embeds = vision(pixel_values).image_embeds
    pipe = FluxPipeline(transformer=dit, scheduler=sched, vae=ae, text_encoder=te1, tokenizer=fast1,
                        text_encoder_2=te2, tokenizer_2=fast2, image_encoder=vision, feature_extractor=processor)
    pipe.load_ip_adapter(out, weight_name="ip_adapter.safetensors")
    pipe.set_ip_adapter_scale(0.7)
    noise_seed, steps, guidance = 15, 4, 3.5
    noise = philox_randn((1, 16, 8, 8), noise_seed)
    packed = FluxPipeline._pack_latents(noise, 1, 16, 8, 8)
    args = dict(prompt=PROMPT, ip_adapter_image=ref, num_inference_steps=steps, guidance_scale=guidance,
                height=16, width=16, max_sequence_length=16)
    with torch.no_grad():
        latent = pipe(**args, latents=packed.clone(), output_type="latent").images
        image = pipe(**args, latents=packed.clone(), output_type="pt").images
    latent = FluxPipeline._unpack_latents(latent, 16, 16, 2)
    save_file({"in.noise": noise, "in.pixel_values": pixel_values.contiguous(),
               "out.image_embeds": image_embeds.contiguous(), "out.latent": latent.contiguous(),
               "out.image": image[0].permute(1, 2, 0).contiguous()}, os.path.join(out, "io.safetensors"))
    print(f"flux_ip_adapter: latent |max| {latent.abs().max():.3f}, image embeds {tuple(image_embeds.shape)}")


if __name__ == "__main__":
    main()
