#!/usr/bin/env python3
"""End-to-end fixtures for the SD3 and Flux text-to-image graphs: tiny, randomly initialised
StableDiffusion3Pipeline and FluxPipeline parts (diffusers 0.42, transformers), saved as folders
ditflow loads, and what each pipeline makes from ditflow's seeded noise.

Writes tests/fixtures/parity/{sd3,flux}_pipeline/:
- text_encoder*/: the CLIP and T5 encoders with a word-level tokenizer.json (CLIP's start and
  end tokens, T5's `</s>`) and a tokenizer_config.json naming the pad token (CLIP-L pads with
  its end token, CLIP-G with "!", T5 with `<pad>`, as the real tokenizers do);
- transformer/, vae/ (16 channels, no quant convs, shift and scaling factors), scheduler/;
- io.safetensors: `in.*` (the noise, its seed, steps, guidance) and `out.latent` (the final
  latent before decoding; Flux's unpacked to [1, 16, h, w]) and `out.image` ([h, w, 3] in [0, 1]);
- SD3's variants: io_slg, io_img2img (img2img and inpainting, from init.png and mask.png), and
  transformer_inpaint/ with io_inpaint_model (a 33-channel inpainting transformer).

Run (PyTorch, diffusers and transformers from PyPI; CI never runs this):
    .venv/bin/python tools/make_mmdit_pipeline_fixtures.py
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_parity_fixtures import philox_randn  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "parity")
PROMPT = "a red circle on a blue background"
WORDS = ["a", "red", "blue", "circle", "square", "on", "background", "green"]


def randomize(model, seed, scale):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and "norm" in name and p.dim() == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def clip_tokenizer(pad):
    """A word-level CLIP-like tokenizer: `<|startoftext|> words <|endoftext|>`, the end token
    the highest id (so transformers' legacy argmax pooling finds it), `pad` the pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = ["!", "<|unk|>"] + WORDS + ["<|startoftext|>", "<|endoftext|>"]
    ids = {w: i for i, w in enumerate(vocab)}
    tok = Tokenizer(models.WordLevel(vocab=ids, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", ids["<|startoftext|>"]), ("<|endoftext|>", ids["<|endoftext|>"])])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=77, pad_token=pad,
                                   bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|unk|>")
    return tok, fast, len(vocab), ids["<|endoftext|>"]


def t5_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "</s>", "<unk>"] + WORDS
    ids = {w: i for i, w in enumerate(vocab)}
    tok = Tokenizer(models.WordLevel(vocab=ids, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=512, pad_token="<pad>",
                                   eos_token="</s>", unk_token="<unk>")
    return tok, fast, len(vocab)


def save_encoder(out, model, tok, pad):
    model.save_pretrained(out, safe_serialization=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"pad_token": pad}, f)


def clip(hidden, layers, projection, eos_legacy, seed):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    pad = "<|endoftext|>" if eos_legacy else "!"
    tok, fast, vocab, eos = clip_tokenizer(pad)
    cfg = CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=2, max_position_embeddings=77, projection_dim=projection or hidden,
                         hidden_act="gelu", eos_token_id=2 if eos_legacy else eos, pad_token_id=1, bos_token_id=0)
    model = (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)
    return randomize(model, seed, 0.2), tok, fast, pad


def t5(d_model, seed):
    from transformers import T5Config, T5EncoderModel

    tok, fast, vocab = t5_tokenizer()
    model = T5EncoderModel(T5Config(vocab_size=vocab, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                                    num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                    feed_forward_proj="gated-gelu", dropout_rate=0.0))
    return randomize(model, seed, 0.2), tok, fast


def vae(seed):
    from diffusers import AutoencoderKL

    model = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        act_fn="silu", latent_channels=16, norm_num_groups=4, sample_size=16,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    )
    randomize(model, seed, 0.2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and p.dim() == 4:
                p.mul_(0.5)
    return model


def report(name, latent, image):
    mid = ((image > 0.02) & (image < 0.98)).float().mean().item()
    print(f"{name}: latent {tuple(latent.shape)} |max| {latent.abs().max():.3f}, "
          f"image {tuple(image.shape)} with {100 * mid:.0f}% of values unclamped")


def sd3(seed=100):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    out = os.path.join(ROOT, "sd3_pipeline")
    shutil.rmtree(out, ignore_errors=True)
    te1, tok1, fast1, pad1 = clip(16, 2, 8, True, seed)
    te2, tok2, fast2, pad2 = clip(24, 2, 12, False, seed + 1)
    te3, tok3, fast3 = t5(48, seed + 2)
    dit = randomize(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=20, out_channels=16,
        pos_embed_max_size=8), seed + 3, 0.15)
    ae = vae(seed + 4)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    save_encoder(os.path.join(out, "text_encoder"), te1, tok1, pad1)
    save_encoder(os.path.join(out, "text_encoder_2"), te2, tok2, pad2)
    save_encoder(os.path.join(out, "text_encoder_3"), te3, tok3, "<pad>")
    dit.save_pretrained(os.path.join(out, "transformer"), safe_serialization=True)
    ae.save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
    sched.save_pretrained(os.path.join(out, "scheduler"))
    pipe = StableDiffusion3Pipeline(transformer=dit, scheduler=sched, vae=ae, text_encoder=te1, tokenizer=fast1,
                                    text_encoder_2=te2, tokenizer_2=fast2, text_encoder_3=te3, tokenizer_3=fast3)
    noise_seed, steps, cfg, t5_tokens = 11, 4, 4.0, 16
    noise = philox_randn((1, 16, 8, 8), noise_seed)
    args = dict(prompt=PROMPT, negative_prompt="", num_inference_steps=steps, guidance_scale=cfg, height=16,
                width=16, latents=noise.clone(), max_sequence_length=t5_tokens)
    with torch.no_grad():
        latent = pipe(**args, output_type="latent").images
        image = pipe(**args, output_type="pt").images
    report("sd3_pipeline", latent, image)
    save_file({"in.noise": noise, "in.noise_seed": torch.tensor([noise_seed]), "in.steps": torch.tensor([steps]),
               "in.cfg": torch.tensor([cfg]), "in.t5_tokens": torch.tensor([t5_tokens]),
               "out.latent": latent.contiguous(), "out.image": image[0].permute(1, 2, 0).contiguous()},
              os.path.join(out, "io.safetensors"))
    # Skip-layer guidance (SD3.5's): block 1 left out of a third evaluation at steps 1 and 2.
    slg_args = dict(args, skip_guidance_layers=[1], skip_layer_guidance_scale=2.8,
                    skip_layer_guidance_start=0.1, skip_layer_guidance_stop=0.75)
    with torch.no_grad():
        latent = pipe(**slg_args, output_type="latent").images
        image = pipe(**slg_args, output_type="pt").images
    report("sd3_pipeline (skip-layer guidance)", latent, image)
    save_file({"out.latent": latent.contiguous(), "out.image": image[0].permute(1, 2, 0).contiguous()},
              os.path.join(out, "io_slg.safetensors"))
    sd3_img2img(out, pipe, noise_seed, steps, cfg, t5_tokens)


def test_picture():
    """The 16x16 test picture (sd3_pipeline/init.png) and its mask (mask.png, 255 = repaint)."""
    import numpy as np

    y, x = np.mgrid[0:16, 0:16]
    pixels = np.stack([(x * 16) % 256, (y * 16) % 256, ((x + y) * 8) % 256], axis=-1).astype(np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 2:10] = 255
    return pixels, mask


def sd3_img2img(out, pipe, noise_seed, steps, cfg, t5_tokens):
    """StableDiffusion3Img2ImgPipeline and StableDiffusion3InpaintPipeline on the same parts, from
    init.png (and mask.png, 1 = repaint), with ditflow's noise and the VAE's mean as the image
    latent (the pipelines' retrieve_latents switched to argmax, as VAEEncode takes the mean).
    Writes io_img2img.safetensors: out.img2img_latent / out.img2img_image (strength 0.6) and
    out.inpaint_latent / out.inpaint_image (strength 0.7; the image decoded from the latent as the
    text-to-image pipeline decodes, see below)."""
    import numpy as np
    from PIL import Image
    from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3InpaintPipeline
    from diffusers.pipelines.stable_diffusion_3 import (pipeline_stable_diffusion_3_img2img as m_img2img,
                                                         pipeline_stable_diffusion_3_inpaint as m_inpaint)

    pixels, mask = test_picture()
    Image.fromarray(pixels).save(os.path.join(out, "init.png"))
    Image.fromarray(mask).save(os.path.join(out, "mask.png"))
    noise = philox_randn((1, 16, 8, 8), noise_seed)
    for m in (m_img2img, m_inpaint):
        original = m.retrieve_latents
        m.retrieve_latents = lambda enc, generator=None, sample_mode="sample", original=original: original(
            enc, generator, sample_mode="argmax")
        m.randn_tensor = lambda shape, **_: noise.clone().reshape(shape)
    parts = dict(transformer=pipe.transformer, scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=pipe.text_encoder,
                 tokenizer=pipe.tokenizer, text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2,
                 text_encoder_3=pipe.text_encoder_3, tokenizer_3=pipe.tokenizer_3)
    args = dict(prompt=PROMPT, negative_prompt="", num_inference_steps=steps, guidance_scale=cfg,
                max_sequence_length=t5_tokens)
    image = Image.fromarray(pixels)
    tensors = {}
    with torch.no_grad():
        i2i = StableDiffusion3Img2ImgPipeline(**parts)
        for kind in ("latent", "pt"):
            r = i2i(**args, image=image, strength=0.6, output_type=kind).images
            tensors["out.img2img_" + ("latent" if kind == "latent" else "image")] = r if kind == "latent" else \
                r[0].permute(1, 2, 0)
        inp = StableDiffusion3InpaintPipeline(**parts)
        latent = inp(**args, image=image, mask_image=Image.fromarray(mask), strength=0.7, height=16, width=16,
                     output_type="latent").images
        tensors["out.inpaint_latent"] = latent
        # The inpainting pipeline decodes latent / scaling_factor without adding the VAE's
        # shift_factor back (unlike its text-to-image and img2img siblings); the reference image
        # is its latent decoded as those do.
        vae = pipe.vae
        decoded = vae.decode(latent / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
        tensors["out.inpaint_image"] = pipe.image_processor.postprocess(decoded, output_type="pt")[0].permute(1, 2, 0)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "io_img2img.safetensors"))
    print("sd3 img2img/inpaint: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in tensors.items()))
    sd3_inpaint_model(out, parts, args, image, mask)


def sd3_inpaint_model(out, parts, args, image, mask, seed=105):
    """A dedicated inpainting transformer (33 input channels: the latent, the mask at the
    latent's size and the masked image's latent) in StableDiffusion3InpaintPipeline at strength
    1, from the same noise, init.png and mask.png. Writes transformer_inpaint/ and
    io_inpaint_model.safetensors: out.latent and out.image (decoded as the text-to-image
    pipeline decodes, see sd3_img2img)."""
    from PIL import Image
    from diffusers import SD3Transformer2DModel, StableDiffusion3InpaintPipeline

    dit = randomize(SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=33, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=48, caption_projection_dim=16, pooled_projection_dim=20, out_channels=16,
        pos_embed_max_size=8), seed, 0.15)
    dit.save_pretrained(os.path.join(out, "transformer_inpaint"), safe_serialization=True)
    pipe = StableDiffusion3InpaintPipeline(**dict(parts, transformer=dit))
    with torch.no_grad():
        latent = pipe(**args, image=image, mask_image=Image.fromarray(mask), strength=1.0, height=16, width=16,
                      output_type="latent").images
        vae = pipe.vae
        decoded = vae.decode(latent / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
        image_out = pipe.image_processor.postprocess(decoded, output_type="pt")[0].permute(1, 2, 0)
    report("sd3_pipeline (inpainting model)", latent, image_out)
    save_file({"out.latent": latent.contiguous(), "out.image": image_out.contiguous()},
              os.path.join(out, "io_inpaint_model.safetensors"))


def flux(seed=200):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    out = os.path.join(ROOT, "flux_pipeline")
    shutil.rmtree(out, ignore_errors=True)
    te1, tok1, fast1, pad1 = clip(16, 2, None, True, seed)
    te2, tok2, fast2 = t5(24, seed + 1)
    dit = randomize(FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=24, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(2, 2, 4)),
        seed + 2, 0.15)
    ae = vae(seed + 3)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=256, max_image_seq_len=4096)
    save_encoder(os.path.join(out, "text_encoder"), te1, tok1, pad1)
    save_encoder(os.path.join(out, "text_encoder_2"), te2, tok2, "<pad>")
    dit.save_pretrained(os.path.join(out, "transformer"), safe_serialization=True)
    ae.save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
    sched.save_pretrained(os.path.join(out, "scheduler"))
    pipe = FluxPipeline(transformer=dit, scheduler=sched, vae=ae, text_encoder=te1, tokenizer=fast1,
                        text_encoder_2=te2, tokenizer_2=fast2)
    noise_seed, steps, guidance, t5_tokens = 12, 4, 3.5, 16
    noise = philox_randn((1, 16, 8, 8), noise_seed)
    packed = FluxPipeline._pack_latents(noise, 1, 16, 8, 8)
    args = dict(prompt=PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=16, width=16,
                latents=packed.clone(), max_sequence_length=t5_tokens)
    with torch.no_grad():
        latent = pipe(**args, output_type="latent").images
        image = pipe(**args, output_type="pt").images
    latent = FluxPipeline._unpack_latents(latent, 16, 16, 2)
    report("flux_pipeline", latent, image)
    save_file({"in.noise": noise, "in.noise_seed": torch.tensor([noise_seed]), "in.steps": torch.tensor([steps]),
               "in.guidance": torch.tensor([guidance]), "in.t5_tokens": torch.tensor([t5_tokens]),
               "out.latent": latent.contiguous(), "out.image": image[0].permute(1, 2, 0).contiguous()},
              os.path.join(out, "io.safetensors"))
    # True CFG (the pipeline's true_cfg_scale with a negative prompt, each evaluation with the
    # distilled guidance too): io_true_cfg.safetensors.
    true_args = dict(args, negative_prompt=TRUE_CFG_NEGATIVE, true_cfg_scale=2.0)
    flux_case(pipe, true_args, "flux_pipeline (true cfg 2)", os.path.join(out, "io_true_cfg.safetensors"))
    flux_fill(out, pipe, noise, t5_tokens, seed + 4)


def flux_case(pipe, args, name, path):
    """A Flux-family pipeline run twice on `args` (the latent, then the image): out.latent
    (unpacked) and out.image into `path`."""
    from diffusers import FluxPipeline

    with torch.no_grad():
        latent = pipe(**args, output_type="latent").images
        image = pipe(**args, output_type="pt").images
    latent = FluxPipeline._unpack_latents(latent, 16, 16, 2)
    report(name, latent, image)
    save_file({"out.latent": latent.contiguous(), "out.image": image[0].permute(1, 2, 0).contiguous()}, path)


def flux_fill(out, pipe, noise, t5_tokens, seed):
    """A Flux Fill transformer (FLUX.1-Fill's layout: in_channels = 2·64 + 4·f² with the mask
    folded f×f = 2×2 pixels per latent pixel for the tiny VAE) in FluxFillPipeline at strength 1,
    guidance 30, from the same noise and the test picture and mask (sd3_pipeline's init.png and
    mask.png), the masked image's latent the VAE's mean. Writes transformer_fill/ and
    io_fill.safetensors: out.latent (unpacked) and out.image."""
    from PIL import Image
    from diffusers import FluxFillPipeline, FluxTransformer2DModel
    from diffusers.pipelines.flux import pipeline_flux_fill as m_fill

    dit = randomize(FluxTransformer2DModel(
        patch_size=1, in_channels=144, out_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=16, guidance_embeds=True,
        axes_dims_rope=(2, 2, 4)), seed, 0.15)
    dit.save_pretrained(os.path.join(out, "transformer_fill"), safe_serialization=True)
    original = m_fill.retrieve_latents
    m_fill.retrieve_latents = lambda enc, generator=None, sample_mode="sample": original(
        enc, generator, sample_mode="argmax")
    m_fill.randn_tensor = lambda shape, **_: noise.clone().reshape(shape)
    fill = FluxFillPipeline(transformer=dit, scheduler=pipe.scheduler, vae=pipe.vae, text_encoder=pipe.text_encoder,
                            tokenizer=pipe.tokenizer, text_encoder_2=pipe.text_encoder_2,
                            tokenizer_2=pipe.tokenizer_2)
    pixels, mask = test_picture()
    args = dict(prompt=PROMPT, image=Image.fromarray(pixels), mask_image=Image.fromarray(mask), height=16,
                width=16, strength=1.0, num_inference_steps=4, guidance_scale=30.0, max_sequence_length=t5_tokens)
    flux_case(fill, args, "flux_pipeline (fill)", os.path.join(out, "io_fill.safetensors"))


TRUE_CFG_NEGATIVE = "a green square on a blue background"


def main():
    torch.set_num_threads(2)
    if sys.argv[1:] != ["flux"]:
        sd3()
    if sys.argv[1:] != ["sd3"]:
        flux()


if __name__ == "__main__":
    main()
