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
    their parity io files and peft's outputs at 1.0 and 0.6.

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


if __name__ == "__main__":
    main()
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    mmdit("flux", FluxTransformer2DModel, "flux_dev",
          ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
           "proj_mlp", "proj_out", "norm1.linear", "x_embedder", "context_embedder"], 21)
    mmdit("sd3", SD3Transformer2DModel, "sd3_5",
          ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_v_proj", "to_add_out", "ff.net.2",
           "linear_2"], 22)
