#!/usr/bin/env python3
"""An all-in-one single-file SD3 checkpoint as Stability AI and ComfyUI ship them
(`sd3_medium_incl_clips_t5xxlfp8.safetensors`-style), made from the tiny models of
tests/fixtures/parity/sd3_pipeline/: the transformer in Stability AI's layout under
`model.diffusion_model.`, the VAE in the original (LDM) layout under `first_stage_model.`, and
the three text encoders in transformers' layout under `text_encoders.{clip_l,clip_g,t5xxl}.
transformer.`. The VAE mapping is checked to convert back exactly with diffusers'
`convert_ldm_vae_checkpoint`, the transformer's with `convert_sd3_transformer_checkpoint_to_diffusers`.

Writes tests/fixtures/parity/sd3_all_in_one/: sd3-tiny-all-in-one.safetensors and the
transformer's config.json beside it (the tiny model's heads cannot be inferred from its shapes).

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


if __name__ == "__main__":
    main()
