#!/usr/bin/env python3
"""Parity fixtures: tiny, randomly initialised diffusers/transformers models with their reference
outputs, for ditflow's model-parity tests.

For each model class this writes tests/fixtures/parity/NAME/ with
  - the model as `save_pretrained` writes it (config.json + safetensors, the real key layout);
  - io.safetensors: the inputs (`in.*`) of one forward and the reference outputs (`out.*`),
    computed in float32 on the CPU.

The models are tiny (a few thousand parameters) so the fixtures stay small and the tests fast; the
key names and the code paths are the real ones. Deterministic: fixed seeds.

Run (PyTorch, diffusers and transformers from PyPI; CI never runs this):
    .venv/bin/python tools/make_parity_fixtures.py
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "parity")


def save(name, model, inputs, outputs):
    out = os.path.join(ROOT, name)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, safe_serialization=True)
    tensors = {f"in.{k}": v.contiguous() for k, v in inputs.items()}
    tensors.update({f"out.{k}": v.detach().contiguous() for k, v in outputs.items()})
    save_file(tensors, os.path.join(out, "io.safetensors"))
    n = sum(p.numel() for p in model.parameters())
    print(f"{name}: {n} parameters, outputs {[tuple(v.shape) for v in outputs.values()]}")


def randomize(model, seed):
    """Random weights everywhere (diffusers zero-initialises some layers, which would hide bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval()


def pixart(name, use_additional_conditions, seed):
    from diffusers import PixArtTransformer2DModel

    model = randomize(
        PixArtTransformer2DModel(
            # hidden 24: the size embeddings take hidden/3 channels each (resolution has two).
            num_attention_heads=3,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            cross_attention_dim=24,
            attention_bias=True,
            sample_size=8,
            patch_size=2,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            interpolation_scale=1 if use_additional_conditions else 2,
            use_additional_conditions=use_additional_conditions,
            caption_channels=12,
        ),
        seed,
    )
    g = torch.Generator().manual_seed(seed + 1)
    b = 2
    inputs = {
        "hidden_states": torch.randn(b, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(b, 5, 12, generator=g),
        "timestep": torch.tensor([999.0, 37.0]),
        "encoder_attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.int64),
    }
    kwargs = {}
    if use_additional_conditions:
        inputs["resolution"] = torch.tensor([[64.0, 64.0], [64.0, 64.0]])
        inputs["aspect_ratio"] = torch.tensor([[1.0], [1.0]])
        kwargs["added_cond_kwargs"] = {"resolution": inputs["resolution"], "aspect_ratio": inputs["aspect_ratio"]}
    else:
        kwargs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    with torch.no_grad():
        out = model(
            inputs["hidden_states"],
            encoder_hidden_states=inputs["encoder_hidden_states"],
            timestep=inputs["timestep"],
            encoder_attention_mask=inputs["encoder_attention_mask"],
            **kwargs,
        ).sample
    save(name, model, inputs, {"sample": out})


def dit(seed):
    from diffusers import DiTTransformer2DModel

    model = randomize(
        DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=2,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=10,
        ),
        seed,
    )
    g = torch.Generator().manual_seed(seed + 1)
    inputs = {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=g),
        "timestep": torch.tensor([999.0, 12.0]),
        "class_labels": torch.tensor([3, 10], dtype=torch.int64),  # 10 = the null class
    }
    with torch.no_grad():
        out = model(inputs["hidden_states"], timestep=inputs["timestep"], class_labels=inputs["class_labels"]).sample
    save("dit", model, inputs, {"sample": out})


def vae(seed):
    from diffusers import AutoencoderKL

    model = randomize(
        AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16),
            layers_per_block=1,
            act_fn="silu",
            latent_channels=4,
            norm_num_groups=4,
            sample_size=16,
            scaling_factor=0.5,
            shift_factor=0.1,
        ),
        seed,
    )
    # Keep activations in a sane range through the random convolutions.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 4:
                p.mul_(0.5)
    g = torch.Generator().manual_seed(seed + 1)
    image = torch.rand(1, 3, 16, 16, generator=g) * 2 - 1
    latent = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        dist = model.encode(image).latent_dist
        decoded = model.decode(latent).sample
        # Tiled decode, diffusers' algorithm, with tiles of 4 latents overlapping by a quarter.
        model.use_tiling = True
        model.tile_sample_min_size = 8
        model.tile_latent_min_size = 4
        model.tile_overlap_factor = 0.25
        tiled = model.tiled_decode(latent).sample
    inputs = {"image": image, "latent": latent, "tile_size": torch.tensor([4]), "tile_overlap": torch.tensor([0.25])}
    save("vae", model, inputs,
         {"mean": dist.mean, "logvar": dist.logvar, "decoded": decoded, "tiled": tiled})


def t5(seed):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                   relative_attention_num_buckets=8, relative_attention_max_distance=20,
                   feed_forward_proj="gated-gelu", dropout_rate=0.0)
    model = randomize(T5EncoderModel(cfg), seed)
    ids = torch.tensor([[5, 17, 3, 44, 9, 1, 0, 0, 0, 0, 0, 0], [7, 7, 2, 31, 12, 40, 22, 8, 19, 33, 4, 1]])
    mask = (torch.arange(12)[None, :] < torch.tensor([[6], [12]])).long()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    save("t5", model, {"input_ids": ids, "attention_mask": mask}, {"last_hidden_state": out})


def umt5(seed):
    """UMT5EncoderModel (Wan's text encoder): T5 with a relative position bias in every block."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = UMT5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=3, num_heads=2,
                     relative_attention_num_buckets=8, relative_attention_max_distance=20,
                     feed_forward_proj="gated-gelu", dropout_rate=0.0)
    model = randomize(UMT5EncoderModel(cfg), seed)
    ids = torch.tensor([[5, 17, 3, 44, 9, 1, 0, 0, 0, 0, 0, 0], [7, 7, 2, 31, 12, 40, 22, 8, 19, 33, 4, 1]])
    mask = (torch.arange(12)[None, :] < torch.tensor([[6], [12]])).long()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    save("umt5", model, {"input_ids": ids, "attention_mask": mask}, {"last_hidden_state": out})


def clip(name, with_projection, eos_token_id, seed):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=12, projection_dim=8, hidden_act="quick_gelu",
                         eos_token_id=eos_token_id, bos_token_id=0, pad_token_id=1)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    model = randomize(cls(cfg), seed)
    # The end-of-text token (id 2 for the legacy rule, else eos_token_id) is not the largest id.
    eos = eos_token_id
    ids = torch.tensor([[0, 17, 33, eos, 1, 1, 1, 1], [0, 41, 5, 9, 12, 50, 7, eos]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0, 0], [1] * 8])
    with torch.no_grad():
        o = model(input_ids=ids, attention_mask=mask)
    outs = {"last_hidden_state": o.last_hidden_state}
    if with_projection:
        outs["text_embeds"] = o.text_embeds
    else:
        outs["pooler_output"] = o.pooler_output
    save(name, model, {"input_ids": ids, "attention_mask": mask}, outs)


def philox_randn(shape, seed, stream=0):
    """ditflow's seeded noise (runtime/src/tensor/rng.rs): Philox4x32-10 on counter i // 4 (words
    0-1) and the stream (words 2-3), with Box-Muller in float64 on word pairs, so the pipeline
    fixture starts from the same noise (stream 0) and stochastic samplers add the same step noise
    (stream k + 1 at step k)."""
    import numpy as np

    n = int(np.prod(shape))
    blocks = (n + 3) // 4
    ctr = np.arange(blocks, dtype=np.uint64)
    s0, s1 = np.uint64(stream & 0xFFFFFFFF), np.uint64((stream >> 32) & 0xFFFFFFFF)
    c = [(ctr & 0xFFFFFFFF).astype(np.uint64), (ctr >> 32).astype(np.uint64), np.full(blocks, s0, np.uint64),
         np.full(blocks, s1, np.uint64)]
    k0, k1 = np.uint64(seed & 0xFFFFFFFF), np.uint64((seed >> 32) & 0xFFFFFFFF)
    mask = np.uint64(0xFFFFFFFF)
    for r in range(10):
        if r > 0:
            k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
        p0 = np.uint64(0xD2511F53) * c[0]
        p1 = np.uint64(0xCD9E8D57) * c[2]
        hi0, lo0 = p0 >> np.uint64(32), p0 & mask
        hi1, lo1 = p1 >> np.uint64(32), p1 & mask
        c = [(hi1 ^ c[1] ^ k0) & mask, lo1, (hi0 ^ c[3] ^ k1) & mask, lo0]
    words = np.stack(c, axis=1).astype(np.float64)
    u = (words + 1.0) / 4294967296.0
    out = np.empty((blocks, 4))
    for pair in range(2):
        rr = np.sqrt(-2.0 * np.log(u[:, 2 * pair]))
        th = 2 * np.pi * u[:, 2 * pair + 1]
        out[:, 2 * pair], out[:, 2 * pair + 1] = rr * np.cos(th), rr * np.sin(th)
    return torch.from_numpy(out.reshape(-1)[:n].astype(np.float32).reshape(shape))


def pipeline(seed):
    """PixArtSigmaPipeline on tiny T5 + PixArt + VAE, from ditflow's noise: tokens to image."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    out = os.path.join(ROOT, "pipeline")
    shutil.rmtree(out, ignore_errors=True)
    words = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "on", "background"]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    te = randomize(T5EncoderModel(T5Config(vocab_size=len(words), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                           relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                           feed_forward_proj="gated-gelu", dropout_rate=0.0)), seed)
    dit = randomize(PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                             num_layers=2, cross_attention_dim=16, sample_size=8, patch_size=2,
                                             caption_channels=16, interpolation_scale=1, use_additional_conditions=False), seed + 1)
    with torch.no_grad():
        for p in dit.parameters():
            p.mul_(0.5)
    vae = randomize(AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                                  block_out_channels=(8, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
                                  sample_size=16, scaling_factor=0.7), seed + 2)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("weight") and p.dim() == 4:
                p.mul_(0.5)
    sched = DPMSolverMultistepScheduler()
    te.save_pretrained(os.path.join(out, "text_encoder"), safe_serialization=True)
    tok.save(os.path.join(out, "text_encoder", "tokenizer.json"))
    dit.save_pretrained(os.path.join(out, "transformer"), safe_serialization=True)
    vae.save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
    sched.save_pretrained(os.path.join(out, "scheduler"))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    pipe = PixArtSigmaPipeline(tokenizer=fast, text_encoder=te, vae=vae, transformer=dit, scheduler=sched)
    noise_seed, steps, cfg = 7, 6, 3.0
    noise = philox_randn((1, 4, 8, 8), noise_seed)
    with torch.no_grad():
        image = pipe(prompt="a red circle on a blue background", negative_prompt="", num_inference_steps=steps,
                     guidance_scale=cfg, height=16, width=16, latents=noise.clone(), output_type="pt",
                     clean_caption=False, use_resolution_binning=False, max_sequence_length=12).images
    # The same with EulerDiscreteScheduler (scaled model inputs, sigma-space updates).
    from diffusers import EulerDiscreteScheduler

    euler = EulerDiscreteScheduler.from_config(sched.config)
    euler.save_pretrained(os.path.join(out, "scheduler_euler"))
    pipe.scheduler = euler
    with torch.no_grad():
        image_euler = pipe(prompt="a red circle on a blue background", negative_prompt="", num_inference_steps=steps,
                           guidance_scale=cfg, height=16, width=16, latents=noise.clone(), output_type="pt",
                           clean_caption=False, use_resolution_binning=False, max_sequence_length=12).images
    tensors = {"in.noise": noise, "in.noise_seed": torch.tensor([noise_seed]), "in.steps": torch.tensor([steps]),
               "in.cfg": torch.tensor([cfg]), "out.image": image[0].permute(1, 2, 0).contiguous(),
               "out.image_euler": image_euler[0].permute(1, 2, 0).contiguous()}
    save_file(tensors, os.path.join(out, "io.safetensors"))
    print(f"pipeline: image {tuple(image.shape)}")


def pipeline_parts():
    """What pipeline() saved: (its folder, the fast tokenizer, T5, PixArt, the VAE)."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast, T5EncoderModel

    out = os.path.join(ROOT, "pipeline")
    tok = Tokenizer.from_file(os.path.join(out, "text_encoder", "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    te = T5EncoderModel.from_pretrained(os.path.join(out, "text_encoder"))
    dit = PixArtTransformer2DModel.from_pretrained(os.path.join(out, "transformer"))
    vae = AutoencoderKL.from_pretrained(os.path.join(out, "vae"))
    return out, fast, te, dit, vae


def pipeline_samplers():
    """The pipeline fixture's saved models under the stochastic and two-call samplers: Euler
    ancestral (its step noise replayed from ditflow's Philox stream k + 1 at step k) and Heun, in
    PixArtSigmaPipeline from the same starting noise. Writes pipeline/io_samplers.safetensors
    (out.image_euler_ancestral, out.image_heun) and the two scheduler configs; reads what
    pipeline() wrote, so it can run alone: make_parity_fixtures.py pipeline_samplers."""
    from diffusers import EulerAncestralDiscreteScheduler, HeunDiscreteScheduler, PixArtSigmaPipeline
    from diffusers.schedulers import scheduling_euler_ancestral_discrete

    out, fast, te, dit, vae = pipeline_parts()
    noise_seed, steps, cfg = 7, 6, 3.0
    noise = philox_randn((1, 4, 8, 8), noise_seed)
    calls = [0]

    def replayed(shape, **_):
        calls[0] += 1
        return philox_randn(tuple(shape), noise_seed, stream=calls[0])

    scheduling_euler_ancestral_discrete.randn_tensor = replayed
    images = {}
    for name, cls in [("euler_ancestral", EulerAncestralDiscreteScheduler), ("heun", HeunDiscreteScheduler)]:
        sched = cls.from_pretrained(os.path.join(out, "scheduler"))
        sched.save_pretrained(os.path.join(out, f"scheduler_{name}"))
        pipe = PixArtSigmaPipeline(tokenizer=fast, text_encoder=te, vae=vae, transformer=dit, scheduler=sched)
        calls[0] = 0
        with torch.no_grad():
            image = pipe(prompt="a red circle on a blue background", negative_prompt="", num_inference_steps=steps,
                         guidance_scale=cfg, height=16, width=16, latents=noise.clone(), output_type="pt",
                         clean_caption=False, use_resolution_binning=False, max_sequence_length=12).images
        images[f"out.image_{name}"] = image[0].permute(1, 2, 0).contiguous()
        print(f"pipeline ({name}): {calls[0]} noise draws")
    images["out.image_img2img"] = pipeline_img2img(out, fast, te, dit, vae, noise, steps, cfg)
    save_file(images, os.path.join(out, "io_samplers.safetensors"))


# Custom sigmas for the Euler pipeline run: σ per step, then the final 0.
CUSTOM_SIGMAS = [14.6, 8.0, 4.0, 2.0, 1.0, 0.4, 0.0]


def pipeline_custom_sigmas():
    """The pipeline fixture's models under EulerDiscreteScheduler (scheduler_euler/) with custom
    sigmas (PixArtSigmaPipeline's sigmas=CUSTOM_SIGMAS), from the same noise. Writes
    pipeline/io_custom_sigmas.safetensors (out.image); reads what pipeline() wrote, so it can run
    alone: make_parity_fixtures.py pipeline_custom_sigmas."""
    from diffusers import EulerDiscreteScheduler, PixArtSigmaPipeline

    out, fast, te, dit, vae = pipeline_parts()
    sched = EulerDiscreteScheduler.from_pretrained(os.path.join(out, "scheduler_euler"))
    pipe = PixArtSigmaPipeline(tokenizer=fast, text_encoder=te, vae=vae, transformer=dit, scheduler=sched)
    noise = philox_randn((1, 4, 8, 8), 7)
    with torch.no_grad():
        image = pipe(prompt="a red circle on a blue background", negative_prompt="", sigmas=CUSTOM_SIGMAS,
                     guidance_scale=3.0, height=16, width=16, latents=noise.clone(), output_type="pt",
                     clean_caption=False, use_resolution_binning=False, max_sequence_length=12).images
    save_file({"out.image": image[0].permute(1, 2, 0).contiguous()},
              os.path.join(out, "io_custom_sigmas.safetensors"))
    print(f"pipeline (euler, custom sigmas {CUSTOM_SIGMAS})")


def pipeline_img2img(out, fast, te, dit, vae, noise, steps, cfg, strength=0.6):
    """Image-to-image on the PixArt pipeline's parts with its DPM-Solver++ as diffusers' img2img
    pipelines do it (PixArt has no img2img pipeline of its own): the schedule cut at
    t_start = int(n - min(n * strength, n)) with the scheduler's begin index set there (so the
    multistep solver restarts its order count), and the start add_noise(x0, noise, t) with x0 the
    VAE's mean of sd3_pipeline/init.png times the scaling factor. Runs PixArtSigmaPipeline itself
    with its timesteps so cut and those latents."""
    import numpy as np
    from PIL import Image
    from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_sigma as m

    pixels = np.asarray(Image.open(os.path.join(ROOT, "sd3_pipeline", "init.png")).convert("RGB"))
    img = torch.from_numpy(pixels).float().permute(2, 0, 1)[None] / 255.0 * 2 - 1
    with torch.no_grad():
        x0 = vae.encode(img).latent_dist.mean * vae.config.scaling_factor
    sched = DPMSolverMultistepScheduler.from_pretrained(os.path.join(out, "scheduler"))
    sched.set_timesteps(steps)
    t_start = int(max(steps - min(steps * strength, steps), 0))
    start = sched.timesteps[t_start:t_start + 1]
    latents = sched.add_noise(x0, noise, start)
    original = m.retrieve_timesteps

    def cut(scheduler, num_inference_steps=None, device=None, timesteps=None, sigmas=None, **kw):
        ts, n = original(scheduler, num_inference_steps, device, timesteps, sigmas, **kw)
        scheduler.set_begin_index(t_start * scheduler.order)
        return ts[t_start * scheduler.order:], n - t_start

    m.retrieve_timesteps = cut
    try:
        sched = DPMSolverMultistepScheduler.from_pretrained(os.path.join(out, "scheduler"))
        pipe = PixArtSigmaPipeline(tokenizer=fast, text_encoder=te, vae=vae, transformer=dit, scheduler=sched)
        with torch.no_grad():
            image = pipe(prompt="a red circle on a blue background", negative_prompt="", num_inference_steps=steps,
                         guidance_scale=cfg, height=16, width=16, latents=latents.clone(), output_type="pt",
                         clean_caption=False, use_resolution_binning=False, max_sequence_length=12).images
    finally:
        m.retrieve_timesteps = original
    print(f"pipeline (img2img, DPM-Solver++ from step {t_start} of {steps})")
    return image[0].permute(1, 2, 0).contiguous()


def main():
    torch.set_num_threads(2)
    os.makedirs(ROOT, exist_ok=True)
    if sys.argv[1:] == ["pipeline_samplers"]:
        pipeline_samplers()
        return
    if sys.argv[1:] == ["pipeline_custom_sigmas"]:
        pipeline_custom_sigmas()
        return
    pixart("pixart_alpha", True, 10)
    pixart("pixart_sigma", False, 20)
    dit(30)
    vae(40)
    t5(50)
    umt5(51)
    pipeline(60)
    clip("clip", False, 2, 70)
    clip("clip_projection", True, 49, 80)
    pipeline_samplers()
    pipeline_custom_sigmas()


if __name__ == "__main__":
    main()
