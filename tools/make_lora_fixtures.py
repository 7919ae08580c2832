#!/usr/bin/env python3
"""LoRA parity fixtures: a tiny, randomly initialised PixArt (diffusers) with two random LoRA
adapters injected by peft, and the reference outputs of one forward with each combination.

Writes tests/fixtures/lora/:
  - transformer/: the base PixArtTransformer2DModel (save_pretrained);
  - a.safetensors: adapter "a" (r 4, alpha 8) in the diffusers layout (`transformer.NAME.lora_A.weight`)
    with its config in the `lora_adapter_metadata` header field, as diffusers writes it;
  - a_kohya.safetensors: the same weights in the kohya layout (`lora_unet_NAME.lora_down.weight`,
    `lora_up.weight`, `alpha`);
  - b/adapter_model.safetensors + b/adapter_config.json: adapter "b" (r 2, alpha 3, alpha_pattern
    attn2.to_k: 5) as peft's save_pretrained writes it (`base_model.model.NAME.lora_A.weight`);
  - io.safetensors: the inputs (`in.*`) and the outputs (`out.*`) of peft's model: base, a at
    1.0 and 0.6, b alone, and a (1.0) with b (0.6) as two adapters;
  - flux.safetensors / flux_io.safetensors and sd3.safetensors / sd3_io.safetensors: a random
    adapter (diffusers layout) on the Flux dev and SD3.5 parity fixtures, with the inputs of
    their parity io files and peft's outputs at 1.0 and 0.6;
  - {flux,sd3}_kohya.safetensors, {flux,sd3}_comfy.safetensors, {flux,sd3}_fused_io.safetensors:
    a LoRA on the original single-file layouts' fused weights (qkv, Flux's linear1) and renamed
    ones, in kohya's and ComfyUI's layouts, with the merged reference.

Run (PyTorch, diffusers and peft from PyPI; CI never runs this):
    .venv/bin/python tools/make_lora_fixtures.py
"""
import json
import os
import shutil

import torch
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "lora")


def main():
    from diffusers import PixArtTransformer2DModel
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(0)
    shutil.rmtree(ROOT, ignore_errors=True)
    os.makedirs(ROOT)
    model = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=16, sample_size=8, patch_size=2, caption_channels=12,
        interpolation_scale=1, use_additional_conditions=False,
    )
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.eval()
    model.save_pretrained(os.path.join(ROOT, "transformer"), safe_serialization=True)

    g = torch.Generator().manual_seed(2)
    inputs = {
        "hidden_states": torch.randn(2, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(2, 5, 12, generator=g),
        "timestep": torch.tensor([999.0, 37.0]),
        "encoder_attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.int64),
    }

    def forward():
        with torch.no_grad():
            return model(
                inputs["hidden_states"],
                encoder_hidden_states=inputs["encoder_hidden_states"],
                timestep=inputs["timestep"],
                encoder_attention_mask=inputs["encoder_attention_mask"],
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                return_dict=False,
            )[0]

    outputs = {"base": forward()}
    configs = {
        # Every linear kind: fused self-attention aliases, cross-attention, MLP, and the embedding
        # and output layers outside the blocks.
        "a": LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2",
                                        "linear_1", "proj_out"]),
        "b": LoraConfig(r=2, lora_alpha=3, init_lora_weights=False, alpha_pattern={"attn2.to_k": 5},
                        target_modules=["to_k", "to_v", "ff.net.2"]),
    }
    for name, cfg in configs.items():
        model = inject_adapter_in_model(cfg, model, adapter_name=name)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if f".{name}." in n and "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    # Each adapter's tensors as `NAME.lora_A.weight` / `NAME.lora_B.weight`; the files below add
    # each layout's prefix.
    state = {name: {} for name in configs}
    for k, v in model.state_dict().items():
        for name in configs:
            for part in ("lora_A", "lora_B"):
                tag = f".{part}.{name}.weight"
                if k.endswith(tag):
                    state[name][k[: -len(tag)] + f".{part}.weight"] = v.detach().clone()

    def set_adapters(names, weights):
        # What diffusers' set_adapters does on models that have it: activate the adapters and
        # scale each one's alpha/r by its weight.
        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.set_adapter(names)
                for n, w in zip(names, weights):
                    if n in m.scaling:
                        m.set_scale(n, w)

    meta = {"r": 4, "lora_alpha": 8, "use_rslora": False, "target_modules": configs["a"].target_modules}
    meta["target_modules"] = sorted(meta["target_modules"])
    save_file({f"transformer.{k}": v.contiguous() for k, v in state["a"].items()},
              os.path.join(ROOT, "a.safetensors"), metadata={"lora_adapter_metadata": json.dumps(meta)})
    kohya = {}
    for k, v in state["a"].items():
        module, part = k.rsplit(".lora_", 1)
        stem = "lora_unet_" + module.replace(".", "_")
        kohya[f"{stem}.lora_down.weight" if part.startswith("A") else f"{stem}.lora_up.weight"] = v.contiguous()
        kohya[f"{stem}.alpha"] = torch.tensor(8.0)
    save_file(kohya, os.path.join(ROOT, "a_kohya.safetensors"))
    os.makedirs(os.path.join(ROOT, "b"))
    save_file({f"base_model.model.{k}": v.contiguous() for k, v in state["b"].items()},
              os.path.join(ROOT, "b", "adapter_model.safetensors"))
    configs["b"].save_pretrained(os.path.join(ROOT, "b"))

    for key, names, weights in [("a_1", ["a"], [1.0]), ("a_06", ["a"], [0.6]), ("b", ["b"], [1.0]),
                                ("ab", ["a", "b"], [1.0, 0.6])]:
        set_adapters(names, weights)
        outputs[key] = forward()
    for k in list(outputs):
        print(f"{k}: max |out - base| = {(outputs[k] - outputs['base']).abs().max():.4f}")
    tensors = {f"in.{k}": v.contiguous() for k, v in inputs.items()}
    tensors.update({f"out.{k}": v.contiguous() for k, v in outputs.items()})
    save_file(tensors, os.path.join(ROOT, "io.safetensors"))
    print(f"lora fixtures: {len(state['a'])} + {len(state['b'])} LoRA tensors in {ROOT}")


def mmdit(name, cls, folder, targets, seed):
    """A random LoRA on one of the MMDiT parity fixtures, with peft's outputs at 1.0 and 0.6."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import load_file

    parity = os.path.join(os.path.dirname(ROOT), "parity", folder)
    model = cls.from_pretrained(parity).eval()
    io = {k[3:]: v for k, v in load_file(os.path.join(parity, "io.safetensors")).items() if k.startswith("in.")}
    kwargs = dict(io)
    if "skip_layers" in kwargs:
        kwargs["skip_layers"] = kwargs["skip_layers"].tolist()
    cfg = LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, target_modules=targets)
    model = inject_adapter_in_model(cfg, model, adapter_name="a")
    g = torch.Generator().manual_seed(seed)
    state = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".a." in n and "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for k, v in model.state_dict().items():
            for part in ("lora_A", "lora_B"):
                tag = f".{part}.a.weight"
                if k.endswith(tag):
                    state["transformer." + k[: -len(tag)] + f".{part}.weight"] = v.detach().clone().contiguous()
    meta = {"r": 4, "lora_alpha": 6, "use_rslora": False, "target_modules": sorted(targets)}
    save_file(state, os.path.join(ROOT, f"{name}.safetensors"), metadata={"lora_adapter_metadata": json.dumps(meta)})
    outputs = {}
    for key, w in [("a_1", 1.0), ("a_06", 0.6)]:
        for m in model.modules():
            if isinstance(m, LoraLayer):
                m.set_adapter(["a"])
                m.set_scale("a", w)
        with torch.no_grad():
            outputs[key] = model(**kwargs, return_dict=False)[0]
    tensors = {f"in.{k}": v.contiguous() for k, v in io.items()}
    tensors.update({f"out.{k}": v.contiguous() for k, v in outputs.items()})
    save_file(tensors, os.path.join(ROOT, f"{name}_io.safetensors"))
    print(f"{name}: {len(state)} LoRA tensors")


def fused_layout_lora(name, cls, folder, targets, seed, check_with=None, unchecked=()):
    """A random LoRA on MMDiT parity fixture `folder` in its original single-file layout (BFL's
    for Flux, Stability AI's for SD3), on fused weights (qkv; Flux's linear1 = q, k, v and the
    MLP input) and renamed ones. `targets` maps each original name to its diffusers modules in
    row order. Written twice: kohya's `lora_unet_NAME_WITH_UNDERSCORES.lora_down/lora_up/alpha`
    ({name}_kohya.safetensors) and ComfyUI's `diffusion_model.NAME.lora_A/lora_B/alpha`
    ({name}_comfy.safetensors). The reference ({name}_fused_io.safetensors, `out.fused`) merges
    each delta into the diffusers modules, its rows split in order as diffusers' converters split
    them; `check_with` (a pipeline class) checks that split against its own kohya conversion,
    loaded with peft, leaving out the layers in `unchecked`."""
    import copy

    from safetensors.torch import load_file

    parity = os.path.join(os.path.dirname(ROOT), "parity", folder)
    model = cls.from_pretrained(parity).eval()
    io = {k[3:]: v for k, v in load_file(os.path.join(parity, "io.safetensors")).items() if k.startswith("in.")}
    kwargs = dict(io)
    if "skip_layers" in kwargs:
        kwargs["skip_layers"] = kwargs["skip_layers"].tolist()
    modules = dict(model.named_modules())
    g = torch.Generator().manual_seed(seed)
    rank, alpha = 4, 6.0
    kohya, comfy = {}, {}
    for fused, parts in targets.items():
        o = sum(modules[p].weight.shape[0] for p in parts)
        i = modules[parts[0]].weight.shape[1]
        down = torch.randn(rank, i, generator=g) * 0.3
        up = torch.randn(o, rank, generator=g) * 0.3
        k = "lora_unet_" + fused.replace(".", "_")
        kohya[k + ".lora_down.weight"], kohya[k + ".lora_up.weight"] = down, up
        kohya[k + ".alpha"] = torch.tensor(alpha)
        c = "diffusion_model." + fused
        comfy[c + ".lora_A.weight"], comfy[c + ".lora_B.weight"] = down, up
        comfy[c + ".alpha"] = torch.tensor(alpha)
    save_file(kohya, os.path.join(ROOT, f"{name}_kohya.safetensors"))
    save_file(comfy, os.path.join(ROOT, f"{name}_comfy.safetensors"))

    def merged(skip=()):
        m = copy.deepcopy(model)
        mods = dict(m.named_modules())
        with torch.no_grad():
            for fused, parts in targets.items():
                if fused in skip:
                    continue
                k = "lora_unet_" + fused.replace(".", "_")
                delta = (alpha / rank) * kohya[k + ".lora_up.weight"] @ kohya[k + ".lora_down.weight"]
                row = 0
                for p in parts:
                    n = mods[p].weight.shape[0]
                    mods[p].weight += delta[row:row + n]
                    row += n
                assert row == delta.shape[0], fused
            return m(**kwargs, return_dict=False)[0]

    out = merged()
    note = ""
    if check_with is not None:
        subset = {k: v for k, v in kohya.items() if not any(u.replace(".", "_") + "." in k for u in unchecked)}
        tmp = os.path.join(ROOT, "_subset.safetensors")
        save_file(subset, tmp)
        converted = check_with.lora_state_dict(tmp)
        os.remove(tmp)
        state = converted[0] if isinstance(converted, tuple) else converted
        peft_model = copy.deepcopy(model)
        check_with.load_lora_into_transformer(state, network_alphas=None, transformer=peft_model, adapter_name="k")
        with torch.no_grad():
            a = peft_model(**kwargs, return_dict=False)[0]
        b = merged(skip=unchecked)
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err < 1e-5, f"{name}: the split differs from diffusers' converter: {err}"
        note = f"; the split agrees with diffusers' converter to {err:.1e}"
    tensors = {f"in.{k}": v.contiguous() for k, v in io.items()}
    tensors["out.fused"] = out.contiguous()
    save_file(tensors, os.path.join(ROOT, f"{name}_fused_io.safetensors"))
    print(f"{name} (original layouts): {len(targets)} layers{note}")


def flux_and_sd3_original_layouts():
    from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel

    def qkv(p, names):
        return [f"{p}.{n}" for n in names]

    flux = {
        "double_blocks.0.img_attn.qkv": qkv("transformer_blocks.0.attn", ["to_q", "to_k", "to_v"]),
        "double_blocks.1.txt_attn.qkv": qkv("transformer_blocks.1.attn", ["add_q_proj", "add_k_proj", "add_v_proj"]),
        "double_blocks.0.txt_attn.proj": ["transformer_blocks.0.attn.to_add_out"],
        "double_blocks.1.img_mlp.0": ["transformer_blocks.1.ff.net.0.proj"],
        "single_blocks.0.linear1": qkv("single_transformer_blocks.0", ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]),
        "single_blocks.1.linear2": ["single_transformer_blocks.1.proj_out"],
        "img_in": ["x_embedder"],
    }
    # diffusers' kohya converter hard-codes the real model's linear1 rows and renames img_in
    # without the `transformer.` prefix (so it is never loaded): those two are not checked.
    fused_layout_lora("flux", FluxTransformer2DModel, "flux_dev", flux, 23, check_with=FluxPipeline,
                      unchecked=("single_blocks.0.linear1", "img_in"))
    sd3 = {
        "joint_blocks.0.x_block.attn.qkv": qkv("transformer_blocks.0.attn", ["to_q", "to_k", "to_v"]),
        "joint_blocks.1.context_block.attn.qkv": qkv("transformer_blocks.1.attn", ["add_q_proj", "add_k_proj", "add_v_proj"]),
        "joint_blocks.0.x_block.attn2.qkv": qkv("transformer_blocks.0.attn2", ["to_q", "to_k", "to_v"]),
        "joint_blocks.0.context_block.mlp.fc2": ["transformer_blocks.0.ff_context.net.2"],
        "joint_blocks.2.x_block.adaLN_modulation.1": ["transformer_blocks.2.norm1.linear"],
        "y_embedder.mlp.0": ["time_text_embed.text_embedder.linear_1"],
    }
    fused_layout_lora("sd3", SD3Transformer2DModel, "sd3_5", sd3, 24)

if __name__ == "__main__":
    main()
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    mmdit("flux", FluxTransformer2DModel, "flux_dev",
          ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "proj_mlp", "proj_out", "norm1.linear", "x_embedder", "context_embedder"], 21)
    mmdit("sd3", SD3Transformer2DModel, "sd3_5",
          ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_v_proj", "to_add_out", "ff.net.2",
           "linear_2"], 22)
    flux_and_sd3_original_layouts()
