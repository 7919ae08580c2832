#!/usr/bin/env python3
"""MMDiT speed and memory at real width, ditflow beside diffusers in one run on 2 threads, each
keeping its fastest of a few forwards (PyTorch eager, under inference_mode), random weights:

- Flux: one double-stream plus one single-stream block of FluxTransformer2DModel (hidden 3072,
  24 heads of 128), 1024 image plus 512 text tokens;
- SD3.5: one joint block of SD3Transformer2DModel at hidden 1536 (24 heads of 64, q/k RMS
  norms, as SD3.5 Medium), a 64x64 latent (1024 image tokens) plus 333 text tokens.

Each is timed in f32 (the peer's dtype), and ditflow also from the same weights saved in bf16,
with the peak resident bytes of both: ditflow keeps bf16 linear weights as they are. On a CPU with
AVX-512, ditflow's f32 run is repeated with its kernels capped at AVX2 (DITFLOW_SIMD=avx2).

Run (PyTorch and diffusers from PyPI; CI never runs this):
    .venv/bin/python tools/bench_mmdit.py [flux] [sd3]
It builds what it needs with `cargo build --release` and `cargo bench --no-run`.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREADS = 2
ENV = dict(os.environ, RAYON_NUM_THREADS=str(THREADS))


def flux_case():
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True)
    li, lt, h = 1024, 512, 32
    img_ids = torch.zeros(h, h, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(h)[None, :]
    inputs = {
        "hidden_states": torch.randn(1, li, 64),
        "encoder_hidden_states": torch.randn(1, lt, 4096),
        "pooled_projections": torch.randn(1, 768),
        "timestep": torch.tensor([0.5]),
        "img_ids": img_ids.reshape(li, 3),
        "txt_ids": torch.zeros(lt, 3),
        "guidance": torch.tensor([3.5]),
    }
    return ("Flux, 1 double + 1 single block at hidden 3072 (24 heads of 128), 1024 image + 512 text tokens",
            model, inputs, "LoadFlux")


def sd3_case():
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(
        sample_size=64, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=96, qk_norm="rms_norm",
    )
    inputs = {
        "hidden_states": torch.randn(1, 16, 64, 64),
        "encoder_hidden_states": torch.randn(1, 333, 4096),
        "pooled_projections": torch.randn(1, 2048),
        "timestep": torch.tensor([500.0]),
    }
    return ("SD3.5, 1 joint block at hidden 1536 (24 heads of 64, q/k RMS norms), 1024 image + 333 text tokens",
            model, inputs, "LoadSD3")


def run_case(case, target=0.9, torch_kwargs=None):
    """Times `case` (title, model, inputs, loader) on both sides and prints the figures against
    the ratio `target`; `torch_kwargs` go to the PyTorch forward only. Returns the best times."""
    title, model, inputs, loader = case
    torch_kwargs = torch_kwargs or {}
    model = model.eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    tmp = tempfile.mkdtemp(prefix="ditflow-bench-mmdit-")
    model.save_pretrained(os.path.join(tmp, "model"), safe_serialization=True)
    model.to(torch.bfloat16).save_pretrained(os.path.join(tmp, "model_bf16"), safe_serialization=True)
    model.to(torch.float32)
    save_file({f"in.{k}": v.contiguous() for k, v in inputs.items()}, os.path.join(tmp, "io.safetensors"))

    def torch_best(reps=3):
        with torch.inference_mode():
            model(**inputs, **torch_kwargs)
            best = float("inf")
            for _ in range(reps):
                s = time.perf_counter()
                model(**inputs, **torch_kwargs)
                best = min(best, time.perf_counter() - s)
        return best

    def ours(folder, reps=3, env=ENV):
        res = subprocess.run(["cargo", "bench", "-q", "-p", "ditflow", "--bench", "pixart", "--",
                              os.path.join(ROOT, "target", "release"), os.path.join(tmp, folder),
                              os.path.join(tmp, "io.safetensors"), str(reps), loader],
                             cwd=ROOT, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(res.stderr)
        return [json.loads(l) for l in res.stdout.splitlines() if l.startswith("{")][0]

    avx512 = "avx512f" in open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else False
    best = {"torch": float("inf"), "model": float("inf"), "model_bf16": float("inf"), "avx2": float("inf")}
    peak = {}
    for _ in range(int(os.environ.get("ROUNDS", "2"))):
        best["torch"] = min(best["torch"], torch_best())
        for folder in ["model", "model_bf16"]:
            r = ours(folder)
            best[folder] = min(best[folder], r["seconds"])
            peak[folder] = r["peak_resident_bytes"]
        if avx512:
            best["avx2"] = min(best["avx2"], ours("model", env=dict(ENV, DITFLOW_SIMD="avx2"))["seconds"])
    params = sum(p.numel() for p in model.parameters())
    gib = 1 << 30
    print(f"{title} ({params / 1e6:.0f}M parameters), {THREADS} threads:")
    print(f"  ditflow  {best['model'] * 1e3:8.1f} ms  (f32)")
    print(f"  PyTorch  {best['torch'] * 1e3:8.1f} ms  (f32; diffusers {__import__('diffusers').__version__}, "
          f"torch {torch.__version__})")
    print(f"  ratio    {best['model'] / best['torch']:8.2f}x  (ours / theirs, target <= {target})")
    print(f"  ditflow  {best['model_bf16'] * 1e3:8.1f} ms  (bf16 weights)")
    if avx512:
        print(f"  ditflow  {best['avx2'] * 1e3:8.1f} ms  (f32, kernels capped at AVX2: ratio "
              f"{best['avx2'] / best['torch']:.2f}x)")
    print(f"  weights: {params * 4 / gib:.2f} GiB in f32, {params * 2 / gib:.2f} GiB in bf16; ditflow's peak "
          f"resident: {peak['model'] / gib:.2f} GiB from the f32 checkpoint, {peak['model_bf16'] / gib:.2f} GiB "
          f"from the bf16 one")
    shutil.rmtree(tmp)
    return best


def main():
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True, env=ENV)
    subprocess.run(["cargo", "bench", "-q", "-p", "ditflow", "--bench", "pixart", "--no-run"], cwd=ROOT, check=True,
                   env=ENV)
    wanted = sys.argv[1:] or ["flux", "sd3"]
    for name, case in [("flux", flux_case), ("sd3", sd3_case)]:
        if name in wanted:
            run_case(case())


if __name__ == "__main__":
    main()
