#!/usr/bin/env python3
"""Sampler parity fixtures: diffusers' schedulers run on a tiny sample with a cheap stand-in model,
for the Rust tests in nodes/src/samplers/tests.rs.

Writes tests/fixtures/samplers/:
  - NAME.safetensors, one per trajectory case below: the scheduler run for a few steps as a
    diffusers pipeline runs it (x = noise * init_noise_sigma; per step: scale_model_input, the
    model, step), in float64 where diffusers allows it, with the stand-in model
        out = 0.3 * x * cos(t / 300) + 0.1 * sin(x + t / 500)
    (x: the scaled model input, t: the timestep as a float). Tensors (float64):
        noise [1, 2, 3, 3], timesteps [n], sigmas [n + 1] (schedulers that have them),
        trajectory [n + 1, 1, 2, 3, 3] (the start, then the sample after each step).
    Metadata: "scheduler" (the diffusers class), "steps", "config.KEY" (each config field set,
    as JSON text), "sigmas_source" and "mu" (flow matching, DPM-Solver's mu), "init_noise_sigma".
    Heun's trajectories have one sample per model call (2 * steps - 1 of them). Stochastic
    schedulers (Euler ancestral, LCM, SDE DPM-Solver++) also hold step_noise [calls, 1, 2, 3, 3]:
    the fresh noise of each model call, ditflow's Philox stream k + 1 of seed NOISE_SEED
    (metadata "noise_seed"), replayed here and handed to diffusers' step.
  - tables.safetensors: timesteps and sigmas (float32, as diffusers keeps them; exact) for many
    step counts per configuration: for each case C, "C.steps" (int64 step counts), "C.lengths"
    (int64, the number of timesteps each count gives: usually the count), "C.timesteps" and
    "C.sigmas" (concatenated over the step counts; one more sigma than timesteps per count), and
    metadata "C.scheduler", "C.config.KEY", "C.mu", "C.sigmas_source".

Deterministic (fixed seed, CPU; the files are written with sorted header keys, so re-running
gives the same bytes). Run from the repository root (CI never runs this):
    .venv/bin/python tools/make_sampler_fixtures.py
"""
import json
import math
import os
import sys

import numpy as np
import torch
from diffusers import (
    DDIMInverseScheduler,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers import scheduling_euler_ancestral_discrete, scheduling_lcm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_parity_fixtures import philox_randn  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "samplers")
CLASSES = {
    "DDIMScheduler": DDIMScheduler,
    "EulerDiscreteScheduler": EulerDiscreteScheduler,
    "DPMSolverMultistepScheduler": DPMSolverMultistepScheduler,
    "FlowMatchEulerDiscreteScheduler": FlowMatchEulerDiscreteScheduler,
    "UniPCMultistepScheduler": UniPCMultistepScheduler,
    "EulerAncestralDiscreteScheduler": EulerAncestralDiscreteScheduler,
    "HeunDiscreteScheduler": HeunDiscreteScheduler,
    "FlowMatchHeunDiscreteScheduler": FlowMatchHeunDiscreteScheduler,
    "LCMScheduler": LCMScheduler,
    "DDIMInverseScheduler": DDIMInverseScheduler,
}
# The seed of the stochastic schedulers' step noise (ditflow's Philox streams 1, 2, ...).
NOISE_SEED = 20261202
SHAPE = (1, 2, 3, 3)

# Stable Diffusion's training schedule.
SD = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def save_file(tensors, path, metadata):
    """safetensors.torch.save_file, but with the header's keys sorted so the bytes are
    reproducible (the library's writer orders the metadata at random)."""
    dtypes = {torch.float64: "F64", torch.float32: "F32", torch.int64: "I64"}
    header, chunks, offset = {"__metadata__": dict(sorted(metadata.items()))}, [], 0
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        data = t.numpy().astype(t.numpy().dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": dtypes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        f.writelines(chunks)


def calculate_shift(image_seq_len, base_seq_len=256, max_seq_len=4096, base_shift=0.5, max_shift=1.15):
    """Flux's calculate_shift (diffusers.pipelines.flux.pipeline_flux)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


FLUX_MU_1024 = calculate_shift(1024)

# name: (class, config, steps, extra); extra: sigmas_source ("pipeline" = Flux's
# linspace(1, 1/n, n), "scheduler_default" = none passed, as SD3), mu, and custom_sigmas (the list
# given to set_timesteps, with its end: steps is one fewer).
TRAJECTORIES = {
    "ddim_leading_epsilon": ("DDIMScheduler", dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1), 10, {}),
    "ddim_trailing_v": ("DDIMScheduler", dict(clip_sample=False, timestep_spacing="trailing", prediction_type="v_prediction"), 7, {}),
    "ddim_defaults_clip": ("DDIMScheduler", {}, 10, {}),
    "ddim_linspace_sample_clip": ("DDIMScheduler", dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace", prediction_type="sample", clip_sample_range=1.5), 8, {}),
    "euler_leading_epsilon": ("EulerDiscreteScheduler", dict(SD, timestep_spacing="leading", steps_offset=1), 10, {}),
    "euler_linspace_epsilon": ("EulerDiscreteScheduler", dict(SD), 7, {}),
    "euler_karras_v": ("EulerDiscreteScheduler", dict(SD, use_karras_sigmas=True, prediction_type="v_prediction"), 10, {}),
    "euler_continuous_v_sigma_min": ("EulerDiscreteScheduler", dict(timestep_spacing="trailing", prediction_type="v_prediction", timestep_type="continuous", final_sigmas_type="sigma_min"), 7, {}),
    "dpmpp_2m_10": ("DPMSolverMultistepScheduler", dict(SD), 10, {}),
    "dpmpp_2m_20": ("DPMSolverMultistepScheduler", dict(SD), 20, {}),
    "dpmpp_2m_karras_10": ("DPMSolverMultistepScheduler", dict(SD, use_karras_sigmas=True), 10, {}),
    "dpmpp_2m_karras_20_v": ("DPMSolverMultistepScheduler", dict(SD, use_karras_sigmas=True, prediction_type="v_prediction"), 20, {}),
    "dpmpp_2m_heun_sigma_min": ("DPMSolverMultistepScheduler", dict(SD, solver_type="heun", final_sigmas_type="sigma_min", lower_order_final=False, timestep_spacing="trailing"), 8, {}),
    "dpmpp_3m_karras_12": ("DPMSolverMultistepScheduler", dict(SD, solver_order=3, use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1), 12, {}),
    "dpmpp_2m_flow_shift3": ("DPMSolverMultistepScheduler", dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"), 10, {}),
    "dpmpp_2m_flow_dynamic": ("DPMSolverMultistepScheduler", dict(use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True), 16, {"mu": FLUX_MU_1024}),
    "flow_static_shift3": ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0), 10, {"sigmas_source": "pipeline"}),
    "flow_dynamic_1024": ("FlowMatchEulerDiscreteScheduler", dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15), 20, {"sigmas_source": "pipeline", "mu": FLUX_MU_1024}),
    "flow_sd3_default_shift3": ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0), 7, {"sigmas_source": "scheduler_default"}),
    # UniPC: Wan's set-up (bh2 on flow sigmas, shift 5), and the other branches.
    "unipc_bh2_flow_shift5": ("UniPCMultistepScheduler", dict(use_flow_sigmas=True, flow_shift=5.0, prediction_type="flow_prediction"), 10, {}),
    "unipc_bh2_flow_dynamic": ("UniPCMultistepScheduler", dict(use_flow_sigmas=True, prediction_type="flow_prediction", use_dynamic_shifting=True), 12, {"mu": FLUX_MU_1024}),
    "unipc_bh1_sigma_min_epsilon": ("UniPCMultistepScheduler", dict(SD, solver_type="bh1", final_sigmas_type="sigma_min"), 8, {}),
    "unipc_3_karras_v": ("UniPCMultistepScheduler", dict(SD, solver_order=3, use_karras_sigmas=True, prediction_type="v_prediction"), 12, {}),
    "unipc_trailing_disable_corrector": ("UniPCMultistepScheduler", dict(SD, timestep_spacing="trailing", disable_corrector=[0, 3], lower_order_final=False, final_sigmas_type="sigma_min"), 7, {}),
    "unipc_3_leading_sample": ("UniPCMultistepScheduler", dict(solver_order=3, timestep_spacing="leading", steps_offset=1, prediction_type="sample"), 9, {}),
    # Ancestral and SDE samplers (fresh noise per step), Heun (two model calls per step), LCM.
    "euler_ancestral_epsilon": ("EulerAncestralDiscreteScheduler", dict(SD), 8, {}),
    "euler_ancestral_leading_v": ("EulerAncestralDiscreteScheduler", dict(SD, timestep_spacing="leading", steps_offset=1, prediction_type="v_prediction"), 10, {}),
    "dpmpp_2m_sde_karras": ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True), 10, {}),
    "dpmpp_2m_sde_heun_v": ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="sde-dpmsolver++", solver_type="heun", prediction_type="v_prediction", final_sigmas_type="sigma_min", lower_order_final=False), 8, {}),
    "dpmpp_3m_sde_karras": ("DPMSolverMultistepScheduler", dict(SD, algorithm_type="sde-dpmsolver++", solver_order=3, use_karras_sigmas=True), 12, {}),
    "heun_epsilon": ("HeunDiscreteScheduler", dict(SD), 6, {}),
    "heun_karras_v": ("HeunDiscreteScheduler", dict(SD, use_karras_sigmas=True, prediction_type="v_prediction"), 7, {}),
    "heun_trailing_sample_clip": ("HeunDiscreteScheduler", dict(timestep_spacing="trailing", prediction_type="sample", clip_sample=True, clip_sample_range=1.2), 5, {}),
    "flow_heun_shift3": ("FlowMatchHeunDiscreteScheduler", dict(shift=3.0), 6, {}),
    "lcm_4": ("LCMScheduler", {}, 4, {}),
    "lcm_6_v_clip": ("LCMScheduler", dict(prediction_type="v_prediction", clip_sample=True, original_inference_steps=30), 6, {}),
    # Started part-way (img2img): the multistep solvers restart their order count there.
    "dpmpp_2m_from_3": ("DPMSolverMultistepScheduler", dict(SD), 10, {"start": 3}),
    "dpmpp_3m_sde_from_2": ("DPMSolverMultistepScheduler", dict(SD, solver_order=3, algorithm_type="sde-dpmsolver++"), 9, {"start": 2}),
    "unipc_bh2_flow_from_4": ("UniPCMultistepScheduler", dict(use_flow_sigmas=True, flow_shift=5.0, prediction_type="flow_prediction"), 10, {"start": 4}),
    "unipc_3_from_2": ("UniPCMultistepScheduler", dict(SD, solver_order=3), 8, {"start": 2}),
    "euler_beta_v": ("EulerDiscreteScheduler", dict(SD, use_beta_sigmas=True, prediction_type="v_prediction"), 9, {}),
    "dpmpp_2m_exponential": ("DPMSolverMultistepScheduler", dict(SD, use_exponential_sigmas=True), 10, {}),
    # Custom sigmas (set_timesteps(sigmas=...), the list with its end; the steps are one fewer).
    "euler_custom_sigmas_epsilon": ("EulerDiscreteScheduler", dict(SD), 6, {"custom_sigmas": [14.6, 9.0, 4.5, 2.0, 0.8, 0.3, 0.0]}),
    "euler_custom_sigmas_v_end": ("EulerDiscreteScheduler", dict(SD, prediction_type="v_prediction"), 4, {"custom_sigmas": [10.0, 3.0, 1.0, 0.25, 0.05]}),
    # DDIM inversion, from the clean sample ("noise" here) up the noise levels.
    "ddim_inverse_leading_epsilon": ("DDIMInverseScheduler", dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1), 10, {}),
    "ddim_inverse_trailing_v": ("DDIMInverseScheduler", dict(SD, clip_sample=False, timestep_spacing="trailing", prediction_type="v_prediction"), 8, {}),
}

STEP_COUNTS = list(range(1, 21)) + [25, 30, 50, 100, 250]

# name: (class, config, extra) for the timestep/sigma tables.
TABLES = {
    "ddim_leading_sd": ("DDIMScheduler", dict(SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1), {}),
    "ddim_trailing": ("DDIMScheduler", dict(clip_sample=False, timestep_spacing="trailing"), {}),
    "ddim_linspace_cosine": ("DDIMScheduler", dict(clip_sample=False, beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace"), {}),
    "euler_linspace_sd": ("EulerDiscreteScheduler", dict(SD), {}),
    "euler_leading_sd": ("EulerDiscreteScheduler", dict(SD, timestep_spacing="leading", steps_offset=1), {}),
    "euler_karras_trailing": ("EulerDiscreteScheduler", dict(SD, timestep_spacing="trailing", use_karras_sigmas=True), {}),
    "dpm_linspace_sd": ("DPMSolverMultistepScheduler", dict(SD), {}),
    "dpm_karras_leading": ("DPMSolverMultistepScheduler", dict(SD, use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1), {}),
    "dpm_trailing_cosine_clipped": ("DPMSolverMultistepScheduler", dict(beta_schedule="squaredcos_cap_v2", lambda_min_clipped=-5.1, timestep_spacing="trailing", final_sigmas_type="sigma_min"), {}),
    "dpm_flow_shift3": ("DPMSolverMultistepScheduler", dict(use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction"), {}),
    "flow_static_shift3": ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0), {"sigmas_source": "pipeline"}),
    "flow_dynamic_1024": ("FlowMatchEulerDiscreteScheduler", dict(use_dynamic_shifting=True), {"sigmas_source": "pipeline", "mu": FLUX_MU_1024}),
    "flow_sd3_default_shift3": ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0), {"sigmas_source": "scheduler_default"}),
    "flow_terminal_linear": ("FlowMatchEulerDiscreteScheduler", dict(use_dynamic_shifting=True, time_shift_type="linear", shift_terminal=0.1), {"sigmas_source": "pipeline", "mu": 2.0}),
    "euler_exponential_sd": ("EulerDiscreteScheduler", dict(SD, use_exponential_sigmas=True), {}),
    "euler_beta_leading": ("EulerDiscreteScheduler", dict(SD, use_beta_sigmas=True, timestep_spacing="leading", steps_offset=1), {}),
    "heun_beta_sd": ("HeunDiscreteScheduler", dict(SD, use_beta_sigmas=True), {}),
    "dpm_exponential_sd": ("DPMSolverMultistepScheduler", dict(SD, use_exponential_sigmas=True), {}),
    "dpm_beta_sd": ("DPMSolverMultistepScheduler", dict(SD, use_beta_sigmas=True), {}),
    "unipc_linspace_sd": ("UniPCMultistepScheduler", dict(SD), {}),
    "unipc_leading_sd": ("UniPCMultistepScheduler", dict(SD, timestep_spacing="leading", steps_offset=1), {}),
    "unipc_karras_trailing": ("UniPCMultistepScheduler", dict(SD, use_karras_sigmas=True, timestep_spacing="trailing"), {}),
    "unipc_flow_shift5": ("UniPCMultistepScheduler", dict(use_flow_sigmas=True, flow_shift=5.0, prediction_type="flow_prediction"), {}),
    "unipc_flow_karras": ("UniPCMultistepScheduler", dict(use_flow_sigmas=True, use_karras_sigmas=True, prediction_type="flow_prediction", final_sigmas_type="sigma_min"), {}),
    "unipc_flow_terminal_linear": ("UniPCMultistepScheduler", dict(use_flow_sigmas=True, use_dynamic_shifting=True, time_shift_type="linear", shift_terminal=0.1, prediction_type="flow_prediction"), {"mu": 2.0}),
}


def make(cls_name, config, steps, extra):
    """The scheduler after set_timesteps, as the pipelines set it up."""
    sched = CLASSES[cls_name](**config)
    kwargs = {}
    if "mu" in extra:
        kwargs["mu"] = extra["mu"]
    if "custom_sigmas" in extra:
        sched.set_timesteps(sigmas=extra["custom_sigmas"])
    elif extra.get("sigmas_source") == "pipeline":
        kwargs["sigmas"] = np.linspace(1.0, 1 / steps, steps)
        sched.set_timesteps(**kwargs)
    else:
        sched.set_timesteps(steps, **kwargs)
    return sched


def stand_in_model(x, t):
    return 0.3 * x * math.cos(t / 300) + 0.1 * torch.sin(x + t / 500)


def metadata(cls_name, config, steps, extra, prefix=""):
    meta = {prefix + "scheduler": cls_name}
    if steps is not None:
        meta[prefix + "steps"] = str(steps)
    for k, v in config.items():
        meta[f"{prefix}config.{k}"] = json.dumps(v)
    for k, v in extra.items():
        meta[prefix + k] = repr(v) if isinstance(v, float) else str(v)
    return meta


def stochastic(cls_name, config):
    return cls_name in ("EulerAncestralDiscreteScheduler", "LCMScheduler") or \
        config.get("algorithm_type") == "sde-dpmsolver++"


def trajectory(name, cls_name, config, steps, extra, noise):
    sched = make(cls_name, config, steps, extra)
    timesteps = sched.timesteps
    # Sampling starts at the first step only if the first timestep is unique (see euler.rs).
    assert (timesteps == timesteps[0]).sum() == 1, name
    init = float(sched.init_noise_sigma) if hasattr(sched, "init_noise_sigma") else 1.0
    x = noise * init
    # The model calls skipped (image-to-image's cut), and the step noise of every call.
    offset = extra.get("start", 0) * getattr(sched, "order", 1)
    fresh = [philox_randn(SHAPE, NOISE_SEED, stream=i + 1).to(torch.float64) for i in range(len(timesteps))] \
        if stochastic(cls_name, config) else []
    if offset:
        # Part-way, as img2img pipelines run it: the begin index set, the schedule cut there,
        # the start sample given (here the noise itself).
        sched.set_begin_index(offset)
        timesteps = timesteps[offset:]
        x = noise.clone()
    traj = [x]
    at = [0]

    def replayed(shape, **_):
        # diffusers' own draw inside step(), replaced by this step's Philox stream.
        return fresh[at[0]].reshape(shape)

    for module in (scheduling_euler_ancestral_discrete, scheduling_lcm):
        module.randn_tensor = replayed
    for i, t in enumerate(timesteps, start=offset):
        at[0] = i
        inp = sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x
        out = stand_in_model(inp, float(t))
        if cls_name == "DPMSolverMultistepScheduler" and fresh:
            x = sched.step(out, t, x, variance_noise=fresh[i]).prev_sample
        else:
            x = sched.step(out, t, x).prev_sample
        assert x.dtype == torch.float64, (name, x.dtype)
        traj.append(x)
    tensors = {
        "noise": noise.contiguous(),
        "timesteps": timesteps.to(torch.float64).contiguous(),
        "trajectory": torch.stack(traj).contiguous(),
    }
    if fresh:
        tensors["step_noise"] = torch.stack(fresh).contiguous()
    if cls_name not in ("DDIMScheduler", "LCMScheduler", "DDIMInverseScheduler"):
        tensors["sigmas"] = sched.sigmas.to(torch.float64).contiguous()
    meta = metadata(cls_name, config, steps, extra)
    meta["init_noise_sigma"] = repr(init)
    meta["model"] = "0.3 * x * cos(t / 300) + 0.1 * sin(x + t / 500)"
    if fresh:
        meta["noise_seed"] = str(NOISE_SEED)
    save_file(tensors, os.path.join(ROOT, name + ".safetensors"), metadata=meta)
    print(f"{name}: {len(timesteps)} steps, |x| {float(x.abs().max()):.4f}")


def tables():
    tensors, meta = {}, {}
    for name, (cls_name, config, extra) in TABLES.items():
        ts, sigmas, lengths = [], [], []
        for n in STEP_COUNTS:
            sched = make(cls_name, config, n, extra)
            # Not always n: trailing spacing with lambda_min_clipped gives fewer.
            lengths.append(len(sched.timesteps))
            ts.append(sched.timesteps.to(torch.float32))
            if cls_name != "DDIMScheduler":
                assert len(sched.sigmas) == len(sched.timesteps) + 1, (name, n)
                sigmas.append(sched.sigmas.to(torch.float32))
        tensors[f"{name}.steps"] = torch.tensor(STEP_COUNTS, dtype=torch.int64)
        tensors[f"{name}.lengths"] = torch.tensor(lengths, dtype=torch.int64)
        tensors[f"{name}.timesteps"] = torch.cat(ts).contiguous()
        if sigmas:
            tensors[f"{name}.sigmas"] = torch.cat(sigmas).contiguous()
        meta.update(metadata(cls_name, config, None, extra, prefix=name + "."))
    meta["cases"] = ",".join(TABLES)
    save_file(tensors, os.path.join(ROOT, "tables.safetensors"), metadata=meta)
    print(f"tables: {len(TABLES)} configurations x {len(STEP_COUNTS)} step counts")


def main():
    os.makedirs(ROOT, exist_ok=True)
    # This script's files only (tools/make_guidance_fixtures.py writes here too).
    for f in list(TRAJECTORIES) + ["tables"]:
        path = os.path.join(ROOT, f + ".safetensors")
        if os.path.exists(path):
            os.remove(path)
    g = torch.Generator().manual_seed(20240607)
    noise = torch.randn(SHAPE, generator=g, dtype=torch.float64)
    for name, (cls_name, config, steps, extra) in TRAJECTORIES.items():
        trajectory(name, cls_name, config, steps, extra, noise)
    tables()
    total = sum(os.path.getsize(os.path.join(ROOT, f)) for f in os.listdir(ROOT))
    print(f"total {total / 1024:.1f} KiB in {ROOT}")


if __name__ == "__main__":
    main()
