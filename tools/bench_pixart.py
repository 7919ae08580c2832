#!/usr/bin/env python3
"""PixArt speed: ditflow's forward beside diffusers' PixArtTransformer2DModel, in one run on 2
threads, and the wall time and peak RSS of a full 20-step demo generation.

The config is hidden 384 (6 heads of 64), 12 layers, a 32x32 latent with patch 2 (256 tokens),
and 16 caption tokens of width 64, with random weights (speed does not depend on them). Both
sides run the same weights on the same inputs in f32 on the CPU; each keeps its fastest of
several forwards (PyTorch eager, under inference_mode).

Run (PyTorch and diffusers from PyPI; CI never runs this):
    .venv/bin/python tools/bench_pixart.py
It builds what it needs with `cargo build --release` and `cargo bench --no-run`. With
BASELINE_PLUGINS=DIR (a folder holding another build of the plugins, such as the one
tools/bench_protocol_overhead.sh keeps), that build is timed in the same rounds too.
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
    from diffusers import PixArtTransformer2DModel

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(
        num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=8, num_layers=12,
        cross_attention_dim=384, sample_size=32, patch_size=2, caption_channels=64,
        use_additional_conditions=False, interpolation_scale=1,
    ).eval()
    tmp = tempfile.mkdtemp(prefix="ditflow-bench-pixart-")
    model.save_pretrained(os.path.join(tmp, "model"), safe_serialization=True)
    x = torch.randn(1, 4, 32, 32)
    enc = torch.randn(1, 16, 64)
    t = torch.tensor([500.0])
    save_file({"in.hidden_states": x, "in.encoder_hidden_states": enc, "in.timestep": t}, os.path.join(tmp, "io.safetensors"))
    def fwd():
        return model(x, encoder_hidden_states=enc, timestep=t, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample

    def torch_best():
        with torch.inference_mode():
            fwd()
            best = float("inf")
            for _ in range(10):
                s = time.perf_counter()
                fwd()
                best = min(best, time.perf_counter() - s)
        return best

    params = sum(p.numel() for p in model.parameters())
    env = dict(os.environ, RAYON_NUM_THREADS=str(THREADS))
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True, env=env)
    subprocess.run(["cargo", "bench", "-q", "-p", "ditflow", "--bench", "pixart", "--no-run"], cwd=ROOT, check=True, env=env)

    def ours_best(plugins=os.path.join(ROOT, "target", "release")):
        res = subprocess.run(["cargo", "bench", "-q", "-p", "ditflow", "--bench", "pixart", "--",
                              plugins, os.path.join(tmp, "model"),
                              os.path.join(tmp, "io.safetensors"), "10"],
                             cwd=ROOT, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(res.stderr)
        return [json.loads(l) for l in res.stdout.splitlines() if l.startswith("{")][0]["seconds"]

    # Alternating rounds, each side keeping its best, so a slow spell of the shared machine does
    # not fall on one side only.
    baseline = os.environ.get("BASELINE_PLUGINS")
    best_torch = best_ours = best_base = float("inf")
    for _ in range(int(os.environ.get("ROUNDS", "3"))):
        best_torch = min(best_torch, torch_best())
        best_ours = min(best_ours, ours_best())
        if baseline:
            best_base = min(best_base, ours_best(baseline))
    ours = {"seconds": best_ours}
    print(f"PixArt forward, hidden 384, 12 layers, 256 tokens + 16 caption tokens ({params / 1e6:.1f}M parameters), {THREADS} threads:")
    print(f"  ditflow  {ours['seconds'] * 1e3:8.1f} ms")
    print(f"  PyTorch  {best_torch * 1e3:8.1f} ms   (diffusers {__import__('diffusers').__version__}, torch {torch.__version__})")
    print(f"  ratio    {ours['seconds'] / best_torch:8.2f}x  (ours / theirs, target <= 0.9)")
    if baseline:
        print(f"  baseline {best_base * 1e3:8.1f} ms   ({baseline}: ratio {best_base / best_torch:.2f}x)")

    demo = os.path.join(ROOT, "models", "demo")
    if os.path.isdir(demo):
        s = time.perf_counter()
        r = subprocess.run(["/usr/bin/time", "-f", "maxrss_kb %M", os.path.join(ROOT, "target", "release", "ditflow"), "run",
                            "graphs/text_to_image.yaml", "--set", "prompt=a large red circle in the center on a blue background",
                            "--out", tmp], cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - s
        if r.returncode != 0:
            sys.exit(r.stderr)
        rss_kb = int([l for l in r.stderr.splitlines() if l.startswith("maxrss_kb")][-1].split()[1])
        print(f"Demo generation, 20 steps with guidance: {wall:.2f} s wall (process start to PNG), peak RSS {rss_kb / 1024:.0f} MB (target < 1024 MB)")
    else:
        print("models/demo is missing: no demo timing")


if __name__ == "__main__":
    main()
