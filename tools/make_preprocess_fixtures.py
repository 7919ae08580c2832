#!/usr/bin/env python3
"""Preprocessor fixtures: a 48x40 test picture (shapes, a gradient and noise) as a PNG, with what
OpenCV and PIL make of it, for ditflow's CannyEdges and ResizeImage.

Writes tests/fixtures/preprocess/:
- picture.png (RGB, 8 bits);
- io.safetensors: `out.canny_100_200` and `out.canny_50_120` (cv2.Canny on cv2's grey, 0/255
  as f32), `out.resize_{w}x{h}` (PIL's Image.resize(BILINEAR) of each channel in float mode 'F',
  [h, w, 3] in [0, 1]) for 32x24 (down), 80x64 (up) and 30x50 (mixed).

Run (opencv-python-headless and Pillow from PyPI; CI never runs this):
    .venv/bin/python tools/make_preprocess_fixtures.py
"""
import os

import cv2
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "preprocess")


def picture():
    h, w = 40, 48
    rng = np.random.default_rng(5)
    img = np.zeros((h, w, 3), np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    img[..., 0] = xx / w
    img[..., 1] = 0.3
    img[((yy - 20) ** 2 + (xx - 14) ** 2) < 80] = [0.9, 0.8, 0.1]
    img[8:30, 28:42] = [0.1, 0.2, 0.9]
    img += rng.normal(0, 0.03, img.shape)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def main():
    os.makedirs(ROOT, exist_ok=True)
    u8 = picture()
    Image.fromarray(u8).save(os.path.join(ROOT, "picture.png"))
    grey = cv2.cvtColor(u8, cv2.COLOR_RGB2GRAY)
    out = {}
    for lo, hi in [(100, 200), (50, 120)]:
        out[f"out.canny_{lo}_{hi}"] = torch.from_numpy(cv2.Canny(grey, lo, hi).astype(np.float32))
    f = u8.astype(np.float32) / 255
    for w, h in [(32, 24), (80, 64), (30, 50)]:
        chans = [np.asarray(Image.fromarray(f[..., c], mode="F").resize((w, h), Image.BILINEAR)) for c in range(3)]
        out[f"out.resize_{w}x{h}"] = torch.from_numpy(np.stack(chans, -1).astype(np.float32))
    save_file({k: v.contiguous() for k, v in out.items()}, os.path.join(ROOT, "io.safetensors"))
    print({k: tuple(v.shape) for k, v in out.items()}, "edges:", int((out["out.canny_100_200"] > 0).sum()))


if __name__ == "__main__":
    main()
