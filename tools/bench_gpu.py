#!/usr/bin/env python3
"""GPU speed beside PyTorch on the same GPU, in bf16, random weights (issue 14's GPU figures):

- PixArt-Σ at its real size (hidden 1152, 28 layers, 16 heads of 72, 1024 image + 120 caption
  tokens), diffusers' PixArtTransformer2DModel in bf16 against ours from the same weights saved
  in bf16, run with --gpu-activations=bf16 --tensor-cores (target: ours <= 1.0x);
- a Flux double block (FluxTransformer2DModel with 1 double and 0 single blocks, hidden 3072,
  1024 image + 512 text tokens), likewise;
- attention at L = 4096 (24 heads of 128, bf16): PyTorch's flash SDPA against our tensor-core
  kernel through the kernels benchmark (target: within 1.3x).

Each side keeps its fastest of several forwards after a warm-up; ours times whole graph runs of
a session with the model loaded (reading the inputs, uploading them and writing the outputs
included). Run on the GPU machine by `tools/device_checks.sh run`, which passes the folder of
the benchmark binaries built here (BENCH_DIR) and of the plugins (PLUGINS_DIR).
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

BENCH_DIR = os.environ["BENCH_DIR"]
PLUGINS_DIR = os.environ["PLUGINS_DIR"]
DEV = "cuda"


def bench_binary(stem):
    names = [n for n in os.listdir(BENCH_DIR) if n.startswith(stem + "-") and "." not in n]
    if not names:
        sys.exit(f"no {stem} benchmark binary in {BENCH_DIR}")
    return os.path.join(BENCH_DIR, names[0])


def torch_best(model, inputs, reps=10):
    with torch.inference_mode():
        for _ in range(3):
            model(**inputs)
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(reps):
            s = time.perf_counter()
            model(**inputs)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - s)
    return best


def ours_best(folder, io, loader, reps=10):
    res = subprocess.run([bench_binary("pixart"), PLUGINS_DIR, folder, io, str(reps), loader, "--device=cuda",
                          "--gpu-activations=bf16", "--tensor-cores"], capture_output=True, text=True)
    if res.returncode != 0:
        print(res.stderr[-4000:])
        return None
    return [json.loads(l) for l in res.stdout.splitlines() if l.startswith("{")][0]["seconds"]


def model_case(title, model, inputs, loader, target):
    tmp = tempfile.mkdtemp(prefix="ditflow-bench-gpu-")
    model = model.eval().to(torch.bfloat16)
    model.save_pretrained(os.path.join(tmp, "model"), safe_serialization=True)
    io = os.path.join(tmp, "io.safetensors")
    save_file({f"in.{k}": v.contiguous().float() for k, v in inputs.items()}, io)
    model = model.to(DEV)
    dev_inputs = {k: (v.to(DEV, torch.bfloat16) if v.is_floating_point() and v.dim() >= 2 else v.to(DEV))
                  for k, v in inputs.items()}
    theirs = torch_best(model, dev_inputs)
    ours = ours_best(os.path.join(tmp, "model"), io, loader)
    print(f"{title}, bf16 on {torch.cuda.get_device_name()}:")
    print(f"  PyTorch  {theirs * 1e3:8.2f} ms  (torch {torch.__version__})")
    if ours is None:
        print("  ditflow  failed (stderr above)")
    else:
        print(f"  ditflow  {ours * 1e3:8.2f} ms  (--gpu-activations=bf16 --tensor-cores)")
        print(f"  ratio    {ours / theirs:8.2f}x  (ours / theirs, target <= {target})")


def attention_case():
    import torch.nn.functional as F

    q, k, v = (torch.randn(1, 24, 4096, 128, device=DEV, dtype=torch.bfloat16) for _ in range(3))
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        for _ in range(3):
            F.scaled_dot_product_attention(q, k, v)
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(20):
            s = time.perf_counter()
            F.scaled_dot_product_attention(q, k, v)
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - s)
    res = subprocess.run([bench_binary("kernels"), "attention_h24_d128_l4096", "--cuda-only", "--bf16",
                          "--tensor-cores"], capture_output=True, text=True)
    lines = [json.loads(l) for l in res.stdout.splitlines() if l.startswith("{")]
    print("Attention at L = 4096, 24 heads of 128, bf16:")
    print(f"  PyTorch  {best * 1e3:8.3f} ms  (flash SDPA)")
    if not lines:
        print("  ditflow  failed:", res.stderr[-4000:])
        return
    ours = lines[0]["seconds"]
    print(f"  ditflow  {ours * 1e3:8.3f} ms  (mma.sync kernel, {lines[0]['gflops']:.0f} GFLOP/s)")
    print(f"  ratio    {ours / best:8.2f}x  (ours / theirs, target <= 1.3)")


def main():
    torch.manual_seed(0)
    attention_case()
    from bench_pixart_sigma import pixart

    model, inputs, tokens = pixart(16, 72, 28, 4096, 64, 120)
    model_case(f"PixArt-Sigma real size (hidden 1152, 28 layers), {tokens} image + 120 caption tokens", model,
               inputs, "LoadDiffusionModel", 1.0)
    from bench_mmdit import flux_case
    from diffusers import FluxTransformer2DModel

    _, _, flux_inputs, loader = flux_case()
    flux = FluxTransformer2DModel(num_layers=1, num_single_layers=0, guidance_embeds=True)
    model_case("Flux double block (hidden 3072, 24 heads of 128), 1024 image + 512 text tokens", flux, flux_inputs,
               loader, 1.0)


if __name__ == "__main__":
    main()
