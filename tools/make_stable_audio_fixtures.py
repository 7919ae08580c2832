#!/usr/bin/env python3
"""Stable Audio parity fixture: a tiny, randomly initialised StableAudioDiTModel (diffusers 0.42)
with grouped-query cross-attention (4 query heads sharing 2 key/value heads), the partial
half-split RoPE and the prepended global token, and the inputs and output of one forward.

Writes tests/fixtures/parity/stable_audio/: the model as save_pretrained writes it, and
- io.safetensors: `in.*` (hidden_states [2, 4, 11], timestep [2], encoder_hidden_states
  [2, 5, 6], global_hidden_states [2, 1, 10], and the rotary tables StableAudioPipeline builds,
  rotary_embedding_cos/sin [12, 4]) and `out.sample`;
- io_no_rotary.safetensors: the same without the tables, whose output (computed with the
  pipeline's tables) ditflow must reproduce by building the tables itself.

Writes tests/fixtures/parity/oobleck/: a tiny AutoencoderOobleck (weight-normalised convolutions,
Snake activations, strides 2 and 4) and io.safetensors with `in.audio` [2, 2, 64] and `in.latent`
[2, 4, 8], and `out.mean`, `out.std` (the latent distribution's) and `out.decoded`.

Writes tests/fixtures/parity/stable_audio_projection/: a random StableAudioProjectionModel (text
width 12 projected to 10, seconds in [0, 47]) in model/, and io.safetensors with `in.text`
[1, 5, 12] (a prompt's real tokens) and, as StableAudioPipeline assembles them for seconds 1.5 to
9.25 with the prompt padded to 8 tokens (the padding's projections zeroed by the attention mask),
`out.encoder_hidden_states` [1, 10, 10] and `out.global_hidden_states` [1, 1, 20].

Run (PyTorch and diffusers from PyPI; CI never runs this):
    .venv/bin/python tools/make_stable_audio_fixtures.py
"""
import os
import shutil

import torch
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "parity")


def main():
    from diffusers import StableAudioDiTModel
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    torch.set_num_threads(2)
    out = os.path.join(ROOT, "stable_audio")
    shutil.rmtree(out, ignore_errors=True)
    model = StableAudioDiTModel(
        sample_size=16, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        num_key_value_attention_heads=2, out_channels=4, cross_attention_dim=12, time_proj_dim=16,
        global_states_input_dim=10, cross_attention_input_dim=6,
    )
    g = torch.Generator().manual_seed(31)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        # Gaussian Fourier frequencies are N(0, 1) in the model; the buffer is saved with it.
        model.time_proj.weight.copy_(torch.randn(model.time_proj.weight.shape, generator=g))
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    length = 11
    # As StableAudioPipeline: rotary_embed_dim = head_dim // 2, over the audio plus the global token.
    cos, sin = get_1d_rotary_pos_embed(model.config.attention_head_dim // 2, length + 1, use_real=True,
                                       repeat_interleave_real=False)
    inputs = {
        "hidden_states": torch.randn(2, 4, length, generator=g),
        "timestep": torch.tensor([0.3, 0.9]),
        "encoder_hidden_states": torch.randn(2, 5, 6, generator=g),
        "global_hidden_states": torch.randn(2, 1, 10, generator=g),
    }
    with torch.no_grad():
        sample = model(**inputs, rotary_embedding=(cos, sin), return_dict=False)[0]
    tensors = {f"in.{k}": v.contiguous() for k, v in inputs.items()}
    tensors["out.sample"] = sample.contiguous()
    save_file(tensors, os.path.join(out, "io_no_rotary.safetensors"))
    tensors["in.rotary_embedding_cos"] = cos.contiguous()
    tensors["in.rotary_embedding_sin"] = sin.contiguous()
    save_file(tensors, os.path.join(out, "io.safetensors"))
    print(f"stable_audio: {sum(p.numel() for p in model.parameters())} parameters, out {tuple(sample.shape)} "
          f"|max| {sample.abs().max():.3f}")



def oobleck():
    from diffusers import AutoencoderOobleck

    out = os.path.join(ROOT, "oobleck")
    shutil.rmtree(out, ignore_errors=True)
    vae = AutoencoderOobleck(encoder_hidden_size=8, downsampling_ratios=[2, 4], channel_multiples=[1, 2],
                             decoder_channels=6, decoder_input_channels=4, audio_channels=2, sampling_rate=8000)
    g = torch.Generator().manual_seed(37)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("alpha") or name.endswith("beta"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)  # logarithms
            elif name.endswith("weight_g"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    vae.eval()
    vae.save_pretrained(out, safe_serialization=True)
    audio = torch.randn(2, 2, 64, generator=g) * 0.5
    latent = torch.randn(2, 4, 8, generator=g)
    with torch.no_grad():
        dist = vae.encode(audio).latent_dist
        decoded = vae.decode(latent).sample
    tensors = {"in.audio": audio, "in.latent": latent, "out.mean": dist.mean.contiguous(),
               "out.std": dist.std.contiguous(), "out.decoded": decoded.contiguous()}
    save_file(tensors, os.path.join(out, "io.safetensors"))
    print(f"oobleck: mean {tuple(dist.mean.shape)}, decoded {tuple(decoded.shape)} |max| {decoded.abs().max():.3f}")


def projection():
    from diffusers.pipelines.stable_audio.modeling_stable_audio import StableAudioProjectionModel

    out = os.path.join(ROOT, "stable_audio_projection")
    shutil.rmtree(out, ignore_errors=True)
    g = torch.Generator().manual_seed(37)
    proj = StableAudioProjectionModel(text_encoder_dim=12, conditioning_dim=10, min_value=0, max_value=47)
    with torch.no_grad():
        for p in proj.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    proj.eval().save_pretrained(os.path.join(out, "model"), safe_serialization=True)
    text = torch.randn(1, 5, 12, generator=g)
    # The pipeline's padded prompt: 3 padding tokens with whatever T5 gave them, masked out.
    padded = torch.cat([text, torch.randn(1, 3, 12, generator=g)], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    with torch.no_grad():
        states = proj(text_hidden_states=padded).text_hidden_states * mask.unsqueeze(-1)
        sec = proj(start_seconds=torch.tensor([1.5]), end_seconds=torch.tensor([9.25]))
        start, end = sec.seconds_start_hidden_states, sec.seconds_end_hidden_states
    tensors = {"in.text": text, "out.encoder_hidden_states": torch.cat([states, start, end], dim=1),
               "out.global_hidden_states": torch.cat([start, end], dim=2)}
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "io.safetensors"))
    print(f"stable_audio_projection: states {tuple(tensors['out.encoder_hidden_states'].shape)}")


if __name__ == "__main__":
    main()
    oobleck()
    projection()
