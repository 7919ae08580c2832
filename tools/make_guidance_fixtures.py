#!/usr/bin/env python3
"""Guidance fixtures: diffusers' own guiders (diffusers.guiders, 0.42) run over a few steps of
random conditional and unconditional predictions of two batch rows.

- cfg_rescale: ClassifierFreeGuidance(guidance_scale=5, guidance_rescale=0.7, start=0.2,
  stop=0.8) over 6 steps (the interval guides steps 1 to 3; the others give the conditional
  prediction, rescaled onto itself);
- apg: AdaptiveProjectedGuidance(guidance_scale=6, momentum=-0.5, rescale (norm cap) 2.0, eta=0.3)
  over 5 steps;
- apg_plain: the same without momentum or cap, eta 0, guidance_rescale 0.5.

Each file of tests/fixtures/samplers/guidance_*.safetensors holds `cond.{i}`, `uncond.{i}` and
`pred.{i}` per step, float64, and the settings in its metadata.

    .venv/bin/python tools/make_guidance_fixtures.py
"""
import os

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "samplers")


def run(name, guider, steps, meta, momentum=None):
    from diffusers.guiders.adaptive_projected_guidance import MomentumBuffer

    g = torch.Generator().manual_seed(sum(map(ord, name)))
    tensors = {}
    for i in range(steps):
        guider.set_state(step=i, num_inference_steps=steps, timestep=torch.tensor(1000.0 - 100 * i))
        if i == 0 and momentum is not None:
            guider.momentum_buffer = MomentumBuffer(momentum)
        cond = torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
        uncond = cond + 0.8 * torch.randn(2, 4, 3, 5, generator=g, dtype=torch.float64)
        pred = guider.forward(cond, uncond).pred
        tensors[f"cond.{i}"], tensors[f"uncond.{i}"], tensors[f"pred.{i}"] = cond, uncond, pred.contiguous()
    meta = {k: str(v) for k, v in meta.items()}
    meta["steps"] = str(steps)
    save_file(tensors, os.path.join(OUT, f"guidance_{name}.safetensors"), metadata=meta)
    print(f"guidance_{name}: {steps} steps")


def main():
    from diffusers.guiders import AdaptiveProjectedGuidance, ClassifierFreeGuidance

    run("cfg_rescale", ClassifierFreeGuidance(guidance_scale=5.0, guidance_rescale=0.7, start=0.2, stop=0.8), 6,
        {"method": "cfg", "scale": 5.0, "rescale": 0.7, "start": 0.2, "stop": 0.8})
    run("apg", AdaptiveProjectedGuidance(guidance_scale=6.0, adaptive_projected_guidance_momentum=-0.5,
                                         adaptive_projected_guidance_rescale=2.0, eta=0.3), 5,
        {"method": "apg", "scale": 6.0, "momentum": -0.5, "norm_threshold": 2.0, "eta": 0.3, "rescale": 0.0,
         "start": 0.0, "stop": 1.0}, momentum=-0.5)
    run("apg_plain", AdaptiveProjectedGuidance(guidance_scale=4.0, adaptive_projected_guidance_rescale=0.0, eta=0.0,
                                               guidance_rescale=0.5), 3,
        {"method": "apg", "scale": 4.0, "norm_threshold": 0.0, "eta": 0.0, "rescale": 0.5, "start": 0.0,
         "stop": 1.0})


if __name__ == "__main__":
    main()
