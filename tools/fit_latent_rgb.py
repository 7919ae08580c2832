#!/usr/bin/env python3
"""Fits a VAE's latent-to-RGB preview map, as ComfyUI's latent2rgb factors are made: a linear map
from one latent pixel (the model's latent space, i.e. (mean - shift_factor) * scaling_factor) to
the mean colour of the image block it decodes to, by least squares over encoded pictures.

`Sample` uses the map for its previews (`preview_every`, `preview_map`): each preview is the
current x0 estimate through this map, one RGB pixel per latent pixel, with no VAE decode.

Writes VAE_FOLDER/latent_rgb.json: {"weights": [[r, g, b] per latent channel], "bias": [r, g, b],
"rmse": ..., "fitted_on": ...}, colours in [0, 1].

Run (PyTorch and diffusers from PyPI; CI never runs this), for the bundled demo VAE on the demo's
own training pictures:
    .venv/bin/python tools/fit_latent_rgb.py models/demo/vae
"""
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_demo import draw  # noqa: E402


def main():
    from diffusers import AutoencoderKL

    folder = sys.argv[1] if len(sys.argv) > 1 else "models/demo/vae"
    vae = AutoencoderKL.from_pretrained(folder).float().eval()
    gen = torch.Generator().manual_seed(20261202)
    zs, rgbs = [], []
    with torch.no_grad():
        for _ in range(8):
            img, _ = draw(64, gen, "cpu")
            z = (vae.encode(img).latent_dist.mean - vae.config.shift_factor) * vae.config.scaling_factor
            f = img.shape[-1] // z.shape[-1]
            # The colour each latent pixel stands for: its block's mean, in [0, 1].
            rgb = F.avg_pool2d(img * 0.5 + 0.5, f)
            zs.append(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
            rgbs.append(rgb.permute(0, 2, 3, 1).reshape(-1, 3))
    z, rgb = torch.cat(zs).double(), torch.cat(rgbs).double()
    a = torch.cat([z, torch.ones(len(z), 1, dtype=z.dtype)], dim=1)
    sol = torch.linalg.lstsq(a, rgb).solution
    rmse = float((a @ sol - rgb).pow(2).mean().sqrt())
    out = {
        "weights": [[round(float(v), 6) for v in row] for row in sol[:-1]],
        "bias": [round(float(v), 6) for v in sol[-1]],
        "rmse": round(rmse, 5),
        "fitted_on": f"{len(z)} latent pixels of the demo's training pictures (tools/fit_latent_rgb.py)",
    }
    with open(os.path.join(folder, "latent_rgb.json"), "w") as fh:
        rows = ",\n".join("  " + json.dumps(r) for r in out["weights"])
        fh.write(f'{{\n "weights": [\n{rows}\n ],\n "bias": {json.dumps(out["bias"])},\n'
                 f' "rmse": {json.dumps(out["rmse"])},\n "fitted_on": {json.dumps(out["fitted_on"])}\n}}\n')
    print(f"{folder}/latent_rgb.json: rmse {rmse:.4f} over {len(z)} latent pixels")


if __name__ == "__main__":
    main()
