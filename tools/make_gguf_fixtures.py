#!/usr/bin/env python3
"""GGUF fixtures written by the reference writer (the `gguf` package from PyPI, llama.cpp's own
Python library), for the runtime's GGUF reader and block dequantisation.

Writes tests/fixtures/gguf/:
- quants.gguf: one [4, 512] tensor per format ("w.<FORMAT>"): F32, F16 and BF16, and the block
  formats Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (quantized from a float tensor by gguf's quantize, which
  matches ggml's reference quantizer) and the K-quants Q4_K, Q5_K and Q6_K (random blocks with
  sane f16 scales: the package has no K-quant quantizer); metadata of every value type, with
  general.architecture "flux".
- quants.safetensors: each tensor as gguf's own `dequantize` gives it (float32), for a bit-exact
  comparison.
- flux/flux1-tiny-F32.gguf and flux/flux1-tiny-Q8_0.gguf: the tiny Flux of
  tests/fixtures/parity/flux_dev_single (Black Forest Labs' names with ComfyUI's prefix, as
  city96's Flux GGUFs keep them) as GGUF, architecture "flux": every tensor F32, and with the
  2-D weights whose rows hold whole Q8_0 blocks quantized (the rest F32, as city96's converter
  leaves what does not fit), with that folder's config.json beside them.
- sd3/sd3.5-tiny-F32.gguf: the tiny SD3.5 of tests/fixtures/parity/sd3_5_single (Stability AI's
  names), architecture "sd3", with its config.json.
- wan/wan-tiny-F32.gguf: the tiny Wan of tests/fixtures/parity/wan in Wan's original names (see
  wan()), architecture "wan", with its config.json.
- pixart/pixart-sigma-tiny-F32.gguf and pixart/pixart-sigma-tiny-Q8_0.gguf: the tiny PixArt-Σ of
  tests/fixtures/parity/pixart_sigma in diffusers' names, architecture "pixart" (no community
  GGUF layout exists for it), F32 and with the whole-block weights Q8_0, with its config.json.

Run (numpy, gguf and safetensors from PyPI; CI never runs this):
    .venv/bin/python tools/make_gguf_fixtures.py
"""
import os
import shutil

import numpy as np
from gguf import GGMLQuantizationType as Q, GGUFReader, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from gguf.quants import dequantize, quantize
from safetensors.numpy import save_file

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "gguf")
SHAPE = (4, 512)
QUANTIZED = [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
K_QUANTS = [Q.Q4_K, Q.Q5_K, Q.Q6_K]


def k_blocks(qtype, rng):
    """Random K-quant blocks [rows, bytes] with finite f16 super-block scales."""
    block, size = GGML_QUANT_SIZES[qtype]
    n = SHAPE[0] * SHAPE[1] // block
    raw = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.05, size=(n, 2)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q6_K:
        raw[:, size - 2:] = scales[:, :2]  # d is the last field
    else:
        raw[:, 0:4] = scales  # d, dmin lead the block
    return raw.reshape(SHAPE[0], -1)


def main():
    os.makedirs(ROOT, exist_ok=True)
    rng = np.random.default_rng(20261203)
    data = rng.standard_normal(SHAPE).astype(np.float32)
    data[0, :32] = 0.0  # a block of zeros (scale 0)
    tensors = {"w.F32": (data, None), "w.F16": (data.astype(np.float16), None)}
    tensors["w.BF16"] = (quantize(data, Q.BF16), Q.BF16)
    for q in QUANTIZED:
        tensors[f"w.{q.name}"] = (quantize(data, q), q)
    for q in K_QUANTS:
        tensors[f"w.{q.name}"] = (k_blocks(q, rng), q)
    path = os.path.join(ROOT, "quants.gguf")
    writer = GGUFWriter(path, "flux")
    writer.add_string("general.name", "ditflow gguf fixture")
    writer.add_uint32("fixture.u32", 7)
    writer.add_int64("fixture.i64", -3)
    writer.add_float32("fixture.f32", 0.5)
    writer.add_bool("fixture.bool", True)
    writer.add_array("fixture.array", [1, 2, 3])
    for name, (t, q) in tensors.items():
        writer.add_tensor(name, t, raw_dtype=q)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    # The reference: gguf's reader and dequantize on what was written.
    expected = {}
    for t in GGUFReader(path).tensors:
        values = dequantize(t.data, t.tensor_type)
        expected[t.name] = np.ascontiguousarray(values.reshape(SHAPE).astype(np.float32))
        print(f"{t.name}: {t.tensor_type.name}, {t.n_bytes} bytes, |max| {np.abs(expected[t.name]).max():.3f}")
    save_file(expected, os.path.join(ROOT, "quants.safetensors"))
    single_files()


def single_files():
    """The tiny single files as GGUF, each in its own folder with its config.json."""
    parity = os.path.join(os.path.dirname(ROOT), "parity")
    convert(os.path.join(parity, "flux_dev_single", "flux1-tiny.safetensors"), "flux", ("F32", "Q8_0"))
    convert(os.path.join(parity, "sd3_5_single", "sd3.5-tiny.safetensors"), "sd3", ("F32",))
    wan(parity)
    convert(os.path.join(parity, "pixart_sigma", "diffusion_pytorch_model.safetensors"), "pixart", ("F32", "Q8_0"),
            stem="pixart-sigma-tiny")


# diffusers' renames of Wan's original keys, undone in reverse order by wan_original_key (the
# norm2/norm3 swap is its own inverse).
WAN_RENAMES = [("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
               ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
               ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
               ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
               ("time_projection.1", "condition_embedder.time_proj"), ("cross_attn", "attn2"),
               ("self_attn", "attn1"), (".o.", ".to_out.0."), (".q.", ".to_q."), (".k.", ".to_k."),
               (".v.", ".to_v."), ("head.modulation", "scale_shift_table"), ("head.head", "proj_out"),
               ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2"), ("norm2", "norm__placeholder"),
               ("norm3", "norm2"), ("norm__placeholder", "norm3")]


def wan_original_key(key):
    """A diffusers WanTransformer3DModel key in Wan's original names (city96's GGUF layout)."""
    if key == "scale_shift_table":
        return "head.modulation"
    if key.endswith(".scale_shift_table"):
        return key.replace("scale_shift_table", "modulation")
    for orig, new in reversed(WAN_RENAMES):
        key = key.replace(new, orig)
    return key


def wan(parity):
    """The tiny Wan (tests/fixtures/parity/wan, diffusers' names) in Wan's original layout, as
    city96's Wan GGUFs hold it: the names mapped back through diffusers' own renames, checked to
    come back exactly through diffusers' convert_wan_transformer_to_diffusers. Writes wan/ (a
    single file, converted to wan-tiny-F32.gguf like the others)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from safetensors.numpy import load_file, save_file as save_np

    folder = os.path.join(parity, "wan")
    weights = load_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    single = {wan_original_key(k): v for k, v in weights.items()}
    import torch
    back = convert_wan_transformer_to_diffusers({k: torch.from_numpy(v) for k, v in single.items()})
    assert sorted(back) == sorted(weights), sorted(set(back) ^ set(weights))
    assert all(np.array_equal(back[k].numpy(), weights[k]) for k in weights)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "wan-tiny.safetensors")
        save_np(single, path)
        shutil.copy(os.path.join(folder, "config.json"), os.path.join(tmp, "config.json"))
        convert(path, "wan", ("F32",))


def convert(single, arch, formats, stem=None):
    """`single` as GGUF files of architecture `arch` in ROOT/arch/, one per format: F32, or
    Q8_0 for the 2-D weights whose rows hold whole blocks (the rest F32); named after `single`
    or `stem`."""
    from safetensors.numpy import load_file

    out = os.path.join(ROOT, arch)
    os.makedirs(out, exist_ok=True)
    weights = load_file(single)
    # The config the tiny model needs beside it (its shapes leave some settings open).
    shutil.copy(os.path.join(os.path.dirname(single), "config.json"), os.path.join(out, "config.json"))
    stem = stem or os.path.basename(single).removesuffix(".safetensors")
    for fmt in formats:
        quantized = write_gguf(weights, os.path.join(out, f"{stem}-{fmt}.gguf"), fmt, arch)
        print(f"{arch}/{stem}-{fmt}.gguf: {quantized} of {len(weights)} tensors quantized")


def write_gguf(tensors, path, fmt, arch):
    """`tensors` (name -> float array) as a GGUF of architecture `arch`, as city96's converter
    writes them: the 2-D weights whose rows hold whole blocks in `fmt` (none for F32), the rest
    F32. Returns how many were quantized."""
    qtype = Q[fmt]
    writer = GGUFWriter(path, arch)
    quantized = 0
    for name, t in tensors.items():
        t = np.ascontiguousarray(np.asarray(t, dtype=np.float32))
        if fmt != "F32" and t.ndim == 2 and t.shape[1] % 32 == 0:
            writer.add_tensor(name, quantize(t, qtype), raw_dtype=qtype)
            quantized += 1
        else:
            writer.add_tensor(name, t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return quantized


if __name__ == "__main__":
    main()
