#!/usr/bin/env python3
"""An all-in-one single-file SD3 checkpoint as Stability AI and ComfyUI ship them
(`sd3_medium_incl_clips_t5xxlfp8.safetensors`-style), made from the tiny models of
tests/fixtures/parity/sd3_pipeline/: the transformer in Stability AI's layout under
`model.diffusion_model.`, the VAE in the original (LDM) layout under `first_stage_model.`, and
the three text encoders in transformers' layout under `text_encoders.{clip_l,clip_g,t5xxl}.
transformer.`. The VAE mapping is checked to convert back exactly with diffusers'
`convert_ldm_vae_checkpoint`, the transformer's with `convert_sd3_transformer_checkpoint_to_diffusers`.

Writes tests/fixtures/parity/sd3_all_in_one/: sd3-tiny-all-in-one.safetensors and the
transformer's config.json beside it (the tiny model's heads cannot be inferred from its shapes),
and tests/fixtures/parity/inferable/ (see `inferable`): models whose configs can be.

Run (PyTorch and diffusers from PyPI; CI never runs this):
    .venv/bin/python tools/make_all_in_one_fixtures.py
"""
import json
import os
import re
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_sd3_fixtures import ROOT, to_sai  # noqa: E402


def vae_to_ldm(sd, n_up):
    """The inverse of diffusers' convert_ldm_vae_checkpoint."""
    out = {}
    for k, v in sd.items():
        k2 = k.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k2 = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", k2)
        k2 = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", k2)
        m = re.match(r"decoder\.up_blocks\.(\d+)\.(resnets|upsamplers)\.(\d+)\.(.*)", k2)
        if m:
            b = n_up - 1 - int(m.group(1))
            k2 = (f"decoder.up.{b}.block.{m.group(3)}.{m.group(4)}" if m.group(2) == "resnets"
                  else f"decoder.up.{b}.upsample.{m.group(4)}")
        k2 = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m.group(1)) + 1}.", k2)
        attn = "mid_block.attentions.0." in k2
        k2 = (k2.replace("mid_block.attentions.0.group_norm", "mid.attn_1.norm")
              .replace("mid_block.attentions.0.to_q", "mid.attn_1.q").replace("mid_block.attentions.0.to_k", "mid.attn_1.k")
              .replace("mid_block.attentions.0.to_v", "mid.attn_1.v")
              .replace("mid_block.attentions.0.to_out.0", "mid.attn_1.proj_out"))
        if attn and k2.endswith("weight") and v.dim() == 2:
            v = v[:, :, None, None]
        out[k2] = v
    return out


def main():
    from diffusers.loaders.single_file_utils import (convert_ldm_vae_checkpoint,
                                                     convert_sd3_transformer_checkpoint_to_diffusers)

    src = os.path.join(ROOT, "sd3_pipeline")
    out = os.path.join(ROOT, "sd3_all_in_one")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    tensors = {}
    dit = load_file(os.path.join(src, "transformer", "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(src, "transformer", "config.json")) as f:
        cfg = json.load(f)
    sai = to_sai(dit, cfg["num_layers"])
    back = convert_sd3_transformer_checkpoint_to_diffusers({f"model.diffusion_model.{k}": v.clone() for k, v in sai.items()})
    assert set(back) == set(dit) and all(torch.equal(back[k], dit[k]) for k in dit)
    tensors.update({f"model.diffusion_model.{k}": v for k, v in sai.items()})
    vae = load_file(os.path.join(src, "vae", "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(src, "vae", "config.json")) as f:
        vcfg = json.load(f)
    ldm = vae_to_ldm(vae, len(vcfg["up_block_types"]))
    back = convert_ldm_vae_checkpoint({f"first_stage_model.{k}": v.clone() for k, v in ldm.items()}, vcfg)
    assert set(back) == set(vae), set(back) ^ set(vae)
    for k, v in back.items():
        assert torch.equal(v.reshape(vae[k].shape), vae[k]), k
    tensors.update({f"first_stage_model.{k}": v for k, v in ldm.items()})
    for folder, name in [("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"), ("text_encoder_3", "t5xxl")]:
        te = load_file(os.path.join(src, folder, "model.safetensors"))
        tensors.update({f"text_encoders.{name}.transformer.{k}": v for k, v in te.items()})
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "sd3-tiny-all-in-one.safetensors"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    print(f"sd3_all_in_one: {len(tensors)} tensors; the VAE and transformer maps convert back exactly")


def inferable():
    """Tiny models whose configs the loaders can infer from the shapes (64-wide CLIP heads,
    32-group VAE norms, T5's default maximum distance), in single files without configs:
    tests/fixtures/parity/inferable/ holds vae_ldm.safetensors (a bare VAE in the LDM layout),
    encoders.safetensors (CLIP-L and T5 under text_encoders.{clip_l,t5xxl}.transformer.), and
    io files with transformers'/diffusers' outputs for Forward."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    out = os.path.join(ROOT, "inferable")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    g = torch.Generator().manual_seed(600)

    def randomize(m, scale=0.2):
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        return m.eval()

    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        block_out_channels=(32, 32), layers_per_block=1, latent_channels=16, norm_num_groups=32,
                        use_quant_conv=False, use_post_quant_conv=False)
    randomize(vae, 0.1)
    ldm = vae_to_ldm(vae.state_dict(), 2)
    save_file({k: v.contiguous() for k, v in ldm.items()}, os.path.join(out, "vae_ldm.safetensors"))
    latent = torch.randn(1, 16, 4, 4, generator=g)
    with torch.no_grad():
        decoded = vae.decode(latent).sample
    save_file({"in.latent": latent, "out.decoded": decoded.contiguous()}, os.path.join(out, "vae_io.safetensors"))
    clip = randomize(CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=20, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=1,
        max_position_embeddings=77, projection_dim=24, hidden_act="gelu", eos_token_id=2)))
    t5 = randomize(T5EncoderModel(T5Config(vocab_size=20, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                           relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                           dropout_rate=0.0)))
    ids = torch.tensor([[0, 5, 9, 19, 3, 3], [0, 7, 19, 3, 3, 3]])
    with torch.no_grad():
        c = clip(ids)
        t = t5(ids).last_hidden_state
    tensors = {f"text_encoders.clip_l.transformer.{k}": v for k, v in clip.state_dict().items()}
    tensors.update({f"text_encoders.t5xxl.transformer.{k}": v for k, v in t5.state_dict().items()
                    if k != "encoder.embed_tokens.weight"})
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "encoders.safetensors"))
    save_file({"in.input_ids": ids, "out.last_hidden_state": c.last_hidden_state.contiguous(),
               "out.text_embeds": c.text_embeds.contiguous()}, os.path.join(out, "clip_io.safetensors"))
    save_file({"in.input_ids": ids, "out.last_hidden_state": t.contiguous()}, os.path.join(out, "t5_io.safetensors"))
    print(f"inferable: {len(ldm)} VAE and {len(tensors)} encoder tensors")


if __name__ == "__main__":
    main()
    inferable()
