#!/usr/bin/env python3
"""Flux speed at real width: one double-stream block plus one single-stream block of
FluxTransformer2DModel (hidden 3072, 24 heads of 128), 1024 image tokens plus 512 text tokens,
ditflow's forward beside diffusers' in one run on 2 threads, each keeping its fastest of a few
forwards (PyTorch eager, under inference_mode), with random weights in f32.

Run (PyTorch and diffusers from PyPI; CI never runs this):
    .venv/bin/python tools/bench_flux.py
It builds what it needs with `cargo build --release` and `cargo bench --no-run`.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREADS = 2


def main():
    from diffusers import FluxTransformer2DModel

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    tmp = tempfile.mkdtemp(prefix="ditflow-bench-flux-")
    model.save_pretrained(os.path.join(tmp, "model"), safe_serialization=True)
    li, lt = 1024, 512
    h = w = 32
    img_ids = torch.zeros(h, w, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(w)[None, :]
    inputs = {
        "hidden_states": torch.randn(1, li, 64),
        "encoder_hidden_states": torch.randn(1, lt, 4096),
        "pooled_projections": torch.randn(1, 768),
        "timestep": torch.tensor([0.5]),
        "img_ids": img_ids.reshape(li, 3),
        "txt_ids": torch.zeros(lt, 3),
        "guidance": torch.tensor([3.5]),
    }
    save_file({f"in.{k}": v.contiguous() for k, v in inputs.items()}, os.path.join(tmp, "io.safetensors"))

    def torch_best(reps=3):
        with torch.inference_mode():
            model(**inputs)
            best = float("inf")
            for _ in range(reps):
                s = time.perf_counter()
                model(**inputs)
                best = min(best, time.perf_counter() - s)
        return best

    params = sum(p.numel() for p in model.parameters())
    env = dict(os.environ, RAYON_NUM_THREADS=str(THREADS))
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True, env=env)
    subprocess.run(["cargo", "bench", "-q", "-p", "ditflow", "--bench", "pixart", "--no-run"], cwd=ROOT, check=True, env=env)

    def ours_best(reps=3):
        res = subprocess.run(["cargo", "bench", "-q", "-p", "ditflow", "--bench", "pixart", "--",
                              os.path.join(ROOT, "target", "release"), os.path.join(tmp, "model"),
                              os.path.join(tmp, "io.safetensors"), str(reps), "LoadFlux"],
                             cwd=ROOT, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(res.stderr)
        return [json.loads(l) for l in res.stdout.splitlines() if l.startswith("{")][0]["seconds"]

    best_torch = best_ours = float("inf")
    for _ in range(int(os.environ.get("ROUNDS", "2"))):
        best_torch = min(best_torch, torch_best())
        best_ours = min(best_ours, ours_best())
    print(f"Flux, 1 double + 1 single block at hidden 3072 (24 heads of 128), {li} image + {lt} text tokens "
          f"({params / 1e6:.0f}M parameters), {THREADS} threads:")
    print(f"  ditflow  {best_ours * 1e3:8.1f} ms")
    print(f"  PyTorch  {best_torch * 1e3:8.1f} ms   (diffusers {__import__('diffusers').__version__}, torch {torch.__version__})")
    print(f"  ratio    {best_ours / best_torch:8.2f}x  (ours / theirs, target <= 0.9)")


if __name__ == "__main__":
    main()
