#!/usr/bin/env python3
"""Kernel benchmark: ditflow's CPU kernels beside PyTorch's, measured in one run on 2 threads.

Measures f32 GEMM (1024, 2048 and the DiT shapes 256x384x1536 and 256x1536x384), attention with
6 heads of 64 at L = 256, 1024 and 4096 (PyTorch: scaled_dot_product_attention), and layer norm
plus adaLN modulation (PyTorch: layer_norm, then `* (1 + scale) + shift`), then the weights-loading
memory benchmark. Prints one table with the ratios. The two sides run in alternating rounds
(ROUNDS, default 3) and each keeps its best time, so a slow spell of the shared machine does not
fall on one side only.

Usage (PyTorch from PyPI in a virtual environment; CI never runs this):

    python3 -m venv .venv && .venv/bin/pip install torch
    .venv/bin/python tools/bench_kernels.py

It builds and runs `cargo bench -p ditflow --bench kernels` and `--bench weights` itself.
"""
import json
import os
import subprocess
import sys
import time

THREADS = 2


def timeit(fn, budget=1.0):
    """The fastest of enough repetitions of fn() to fill about `budget` seconds (the minimum is the
    least noisy estimate on a shared machine; the Rust side uses the same rule)."""
    fn()
    t = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t, 1e-6)
    reps = min(max(int(budget / one), 3), 200)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def torch_numbers():
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    out = {}
    with torch.inference_mode():
        for m, k, n in [(1024, 1024, 1024), (2048, 2048, 2048), (256, 384, 1536), (256, 1536, 384)]:
            a, b = torch.randn(m, k), torch.randn(k, n)
            s = timeit(lambda: a @ b)
            out[f"gemm_{m}x{k}x{n}"] = {"seconds": s, "gflops": 2 * m * n * k / s / 1e9}
        for l in [256, 1024, 4096]:
            q, k, v = (torch.randn(1, 6, l, 64) for _ in range(3))
            out[f"attention_h6_d64_l{l}"] = {"seconds": timeit(lambda: F.scaled_dot_product_attention(q, k, v))}
        x = torch.randn(2, 1024, 1152)
        shift, scale = torch.randn(2, 1, 1152), torch.randn(2, 1, 1152)

        def ln_mod():
            return F.layer_norm(x, (1152,), eps=1e-6) * (1 + scale) + shift

        out["layernorm_modulate_b2_l1024_d1152"] = {"seconds": timeit(ln_mod)}
    return out, torch.__version__


def cargo_bench(name):
    env = dict(os.environ, RAYON_NUM_THREADS=str(THREADS))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run(
        ["cargo", "bench", "-q", "-p", "ditflow", "--bench", name],
        cwd=root, env=env, capture_output=True, text=True,
    )
    if res.returncode != 0:
        sys.exit(f"cargo bench --bench {name} failed:\n{res.stderr}")
    return [json.loads(l) for l in res.stdout.splitlines() if l.startswith("{")]


def best(a, b):
    """Merges two result dicts, keeping the faster measurement of each benchmark."""
    if a is None:
        return b
    return {k: (b[k] if b[k]["seconds"] < v["seconds"] else v) if k in b else v for k, v in a.items()}


def main():
    theirs = ours = None
    for _ in range(int(os.environ.get("ROUNDS", "3"))):
        t, version = torch_numbers()
        theirs = best(theirs, t)
        ours = best(ours, {r["bench"]: r for r in cargo_bench("kernels") if r["device"] == "cpu"})
    print(f"CPU kernels, {THREADS} threads: ditflow vs PyTorch {version}")
    print(f"{'benchmark':38} {'ditflow':>14} {'pytorch':>14} {'ratio':>8}")
    for name, t in theirs.items():
        o = ours.get(name)
        if o is None:
            continue
        if "gflops" in t:
            ratio = o["gflops"] / t["gflops"]
            print(f"{name:38} {o['gflops']:>9.1f} GF/s {t['gflops']:>9.1f} GF/s {ratio:>7.2f}x  (ours/theirs GFLOP/s, target >= 0.9)")
        else:
            ratio = o["seconds"] / t["seconds"]
            print(f"{name:38} {o['seconds'] * 1e3:>11.3f} ms {t['seconds'] * 1e3:>11.3f} ms {ratio:>7.2f}x  (ours/theirs time, target <= 1)")
    for r in cargo_bench("weights"):
        print(
            f"weights: {r['file_gb']:.3f} GB f32 safetensors, peak RSS rise {r['peak_rss_rise_gb']:.3f} GB "
            f"after reading every element (target <= 1.1), open {r['open_s'] * 1e3:.1f} ms, zero-copy {r['zero_copy']}"
        )


if __name__ == "__main__":
    main()
