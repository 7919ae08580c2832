#!/usr/bin/env python3
"""Real-size weights kept as stored: resident memory beside the file sizes, and the forward's
error per quantized format.

1. Memory. A Wan transformer at Wan2.1-1.3B's widths (12 heads of 128, feed-forward 8960,
   UMT5's 4096-wide text) with LAYERS blocks (21: about 1.0B parameters, 2 GB in bf16), random
   weights, saved as a diffusers bf16 folder and as a city96-style Q8_0 GGUF (Wan's original
   names; the 2-D weights whose rows hold whole blocks in Q8_0, the rest F32). Each is loaded by
   LoadWan and run on a small latent by the forward benchmark (runtime/benches/pixart.rs), which
   prints its peak resident bytes and its resident bytes before the load. Printed: the rise as a
   multiple of the file's size (target <= 1.1; widening to f32 would be 2x for the bf16 file and
   about 3.8x for the Q8_0 one) and the forward's time; then the Q8_0 file under --max-memory at
   half its size: the peak, the bytes read back, the slowdown, and whether the output is the
   uncapped one bit for bit.
2. Accuracy. Two Wan blocks at the same widths, a small Flux (hidden 512: 1 double and 2
   single blocks, in BFL's layout as city96's Flux GGUFs hold it) and a small PixArt-Σ (hidden
   384, 4 layers, caption width 512, diffusers' names), each saved in f32 and as
   GGUFs in each format the `gguf` package can quantize (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0; it has no
   K-quant quantizer): the relative error of each forward against the f32 one (printed, not
   asserted).

Run (PyTorch, diffusers and gguf from PyPI; CI never runs this):
    .venv/bin/python tools/bench_memory.py          # PARTS=memory or PARTS=accuracy for one
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_mmdit import ENV, ROOT  # noqa: E402
from make_flux_fixtures import to_bfl  # noqa: E402
from make_gguf_fixtures import wan_original_key, write_gguf as write_gguf_file  # noqa: E402

LAYERS = int(os.environ.get("LAYERS", "21"))
GIB = 1 << 30


def wan(layers):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    model = WanTransformer3DModel(
        num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16, text_dim=4096,
        freq_dim=256, ffn_dim=8960, num_layers=layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    return model


def write_gguf(tensors, path, fmt, arch, config_of):
    """`tensors` (name -> torch tensor) as a city96-style GGUF of architecture `arch` in `fmt`
    (tools/make_gguf_fixtures.py's writer), with the config of model `config_of` beside it."""
    write_gguf_file({k: v.float().numpy() for k, v in tensors.items()}, path, fmt, arch)
    config_of.save_config(os.path.dirname(path))


def write_wan_gguf(model, path, fmt):
    """A diffusers Wan as a city96-style Wan GGUF (Wan's original names)."""
    write_gguf({wan_original_key(k): v for k, v in model.state_dict().items()}, path, fmt, "wan", model)


def ours(path, io, keep=None, reps=1, cap=None, loader="LoadWan"):
    """The forward benchmark's figures for the model at `path` loaded by `loader`; its outputs
    kept at `keep`; its mapped weights capped at `cap` bytes resident."""
    res = subprocess.run(["cargo", "bench", "-q", "-p", "ditflow", "--bench", "pixart", "--",
                          os.path.join(ROOT, "target", "release"), path, io, str(reps), loader]
                         + ([keep] if keep else []) + ([f"--max-memory={cap}"] if cap else []),
                         cwd=ROOT, env=ENV, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(res.stderr)
    return [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")][0]


def gguf_seconds(model_inputs, write, name, loader):
    """Our fastest forward (3 reps, twice) on `model_inputs` from the GGUF that `write(path)`
    writes as `name` in a fresh folder, loaded by `loader`; the folder is removed after."""
    tmp = tempfile.mkdtemp(prefix="ditflow-bench-gguf-")
    try:
        io = os.path.join(tmp, "io.safetensors")
        save_file({f"in.{k}": v.contiguous() for k, v in model_inputs.items()}, io)
        os.makedirs(os.path.join(tmp, "model"))
        path = os.path.join(tmp, "model", name)
        write(path)
        return min(ours(path, io, reps=3, loader=loader)["seconds"] for _ in range(2))
    finally:
        shutil.rmtree(tmp)


def inputs(tmp):
    torch.manual_seed(1)
    io = os.path.join(tmp, "io.safetensors")
    # 8x8 patches of one frame (64 video tokens) and 64 text tokens: the weights dominate.
    save_file({"in.hidden_states": torch.randn(1, 16, 1, 16, 16), "in.timestep": torch.tensor([500.0]),
               "in.encoder_hidden_states": torch.randn(1, 64, 4096)}, io)
    return io


def memory(tmp, io):
    model = wan(LAYERS)
    params = sum(p.numel() for p in model.parameters())
    bf16 = os.path.join(tmp, "bf16")
    model.to(torch.bfloat16).save_pretrained(bf16, safe_serialization=True)
    model.to(torch.float32)
    q8_dir = os.path.join(tmp, "q8")
    os.makedirs(q8_dir)
    q8 = os.path.join(q8_dir, "wan-Q8_0.gguf")
    write_wan_gguf(model, q8, "Q8_0")
    del model
    sizes = {"bf16": os.path.getsize(os.path.join(bf16, "diffusion_pytorch_model.safetensors")),
             "Q8_0": os.path.getsize(q8)}
    print(f"Wan2.1-1.3B widths, {LAYERS} blocks ({params / 1e9:.2f}B parameters), 64 video + 64 text tokens, "
          f"{ENV.get('RAYON_NUM_THREADS', '2')} threads:")
    outs = {}
    for name, path in [("bf16", bf16), ("Q8_0", q8)]:
        outs[name] = os.path.join(tmp, f"out-{name}.safetensors")
        r = ours(path, io, outs[name], reps=2)
        rise = r["peak_resident_bytes"] - r["baseline_resident_bytes"]
        print(f"  {name:5} file {sizes[name] / GIB:5.2f} GiB  peak RSS rise {rise / GIB:5.2f} GiB = "
              f"{rise / sizes[name]:.2f}x the file (target <= 1.1)  forward {r['seconds'] * 1e3:7.1f} ms")
        uncapped = r["seconds"]
    # The Q8_0 file again under --max-memory at half its size.
    cap = sizes["Q8_0"] // 2
    capped_out = os.path.join(tmp, "out-capped.safetensors")
    r = ours(q8, io, capped_out, reps=2, cap=cap)
    rise = r["peak_resident_bytes"] - r["baseline_resident_bytes"]
    same = open(capped_out, "rb").read() == open(outs["Q8_0"], "rb").read()
    print(f"  Q8_0 under --max-memory {cap / GIB:.2f} GiB: peak RSS rise {rise / GIB:5.2f} GiB, "
          f"{r['streamed_bytes'] / GIB:.2f} GiB read back over 3 forwards, forward {r['seconds'] * 1e3:7.1f} ms "
          f"({r['seconds'] / uncapped:.2f}x uncapped), output {'bit-identical' if same else 'DIFFERENT'}")
    shutil.rmtree(bf16)
    shutil.rmtree(q8_dir)


def flux():
    """A small Flux whose widths hold whole blocks (hidden 512, 4 heads of 128), and its inputs:
    256 image and 64 text tokens."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=128,
                                   num_attention_heads=4, joint_attention_dim=512, pooled_projection_dim=768,
                                   guidance_embeds=True).eval()
    li, lt, h = 256, 64, 16
    img_ids = torch.zeros(h, h, 3)
    img_ids[..., 1] = torch.arange(h)[:, None]
    img_ids[..., 2] = torch.arange(h)[None, :]
    inputs = {"hidden_states": torch.randn(1, li, 64), "encoder_hidden_states": torch.randn(1, lt, 512),
              "pooled_projections": torch.randn(1, 768), "timestep": torch.tensor([0.5]),
              "img_ids": img_ids.reshape(li, 3), "txt_ids": torch.zeros(lt, 3), "guidance": torch.tensor([3.5])}
    return model, inputs


def accuracy(tmp, wan_io):
    flux_model, flux_inputs = flux()
    flux_io = os.path.join(tmp, "flux_io.safetensors")
    save_file({f"in.{k}": v.contiguous() for k, v in flux_inputs.items()}, flux_io)
    from bench_pixart_sigma import pixart

    pixart_model, pixart_inputs, _ = pixart(6, 64, 4, 512, 32, 16)
    pixart_io = os.path.join(tmp, "pixart_io.safetensors")
    save_file({f"in.{k}": v.contiguous() for k, v in pixart_inputs.items()}, pixart_io)
    cases = [
        ("Wan at Wan2.1-1.3B widths, 2 blocks", wan(2), wan_io, "LoadWan", write_wan_gguf),
        ("Flux, hidden 512, 1 double + 2 single blocks", flux_model, flux_io, "LoadFlux",
         lambda m, path, fmt: write_gguf(to_bfl(m.state_dict()), path, fmt, "flux", m)),
        ("PixArt-Sigma, hidden 384, 4 layers, 256 image + 16 caption tokens", pixart_model.eval(), pixart_io,
         "LoadDiffusionModel", lambda m, path, fmt: write_gguf(m.state_dict(), path, fmt, "pixart", m)),
    ]
    out = os.path.join(tmp, "out.safetensors")
    for title, model, io, loader, writer in cases:
        f32 = os.path.join(tmp, "f32")
        model.save_pretrained(f32, safe_serialization=True)
        ours(f32, io, out, loader=loader)
        # Copied out: the next run rewrites the file in place.
        reference = {k: v.clone() for k, v in load_file(out).items()}
        shutil.rmtree(f32)
        print(f"{title}: the forward's relative error against f32, per GGUF format:")
        for fmt in ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0"]:
            folder = os.path.join(tmp, fmt)
            os.makedirs(folder)
            path = os.path.join(folder, f"model-{fmt}.gguf")
            writer(model, path, fmt)
            r = ours(path, io, out, loader=loader)
            got = load_file(out)
            err = max(float((got[k] - reference[k]).norm() / reference[k].norm()) for k in reference)
            print(f"  {fmt:5} {err:.2e}  (file {os.path.getsize(path) / 2**20:6.1f} MiB, "
                  f"forward {r['seconds'] * 1e3:6.1f} ms)")
            shutil.rmtree(folder)


def main():
    subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT, check=True, env=ENV)
    subprocess.run(["cargo", "bench", "-q", "-p", "ditflow", "--bench", "pixart", "--no-run"], cwd=ROOT, check=True,
                   env=ENV)
    tmp = tempfile.mkdtemp(prefix="ditflow-bench-memory-")
    try:
        io = inputs(tmp)
        parts = os.environ.get("PARTS", "memory,accuracy").split(",")
        if "memory" in parts:
            memory(tmp, io)
        if "accuracy" in parts:
            accuracy(tmp, io)
    finally:
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
