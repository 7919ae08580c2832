#!/usr/bin/env python3
"""Bridged-towers parity fixture: the tiny Wan transformer of tests/fixtures/parity/wan/ and the
tiny Stable Audio transformer of tests/fixtures/parity/stable_audio/ (diffusers 0.42), coupled by
two dual cross-attention bridge blocks (the PyTorch re-writing of BridgeDiT's CrossDiTBlockAdaLN in
tools/make_bridge_fixtures.py) as BridgeDiT's JointDiT_T2AV runs them: each tower's blocks are run
segment by segment (diffusers' own block modules, the embedding and head code of each model's
forward written out), bridge block i after video block v_i and audio block a_i, modulated by the
video tower's time embedding (before time_proj) and the audio tower's timestep embedding.

Writes tests/fixtures/parity/bridged_towers/: bridge/ (config.json, bridge.safetensors; video
points [0, 1], audio points [0, 1]), video.safetensors and audio.safetensors (each tower's in.*),
and io.safetensors with out.video and out.audio (bridged) and out.video_alone, out.audio_alone;
and sample.safetensors: a 4-step SampleAudioVideo run as BridgeDiT samples (both towers in
lockstep, the video on UniPC flow sigmas (shift 3), the audio on DPM-Solver++ with v-prediction,
classifier-free guidance per tower (3 and 2, each with its own negative), seeded Philox noise),
with `in.*` conditionings and `out.video_latent`, `out.audio_latent`, and the same with
modality-isolation guidance 0.5 (`out.video_latent_iso`, `out.audio_latent_iso`); the video
scheduler's config in video_scheduler/.

Run after tools/make_wan_fixtures.py and tools/make_stable_audio_fixtures.py (PyTorch and
diffusers from PyPI; CI never runs this):
    .venv/bin/python tools/make_bridged_towers_fixtures.py
"""
import json
import os
import shutil
import sys

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_bridge_fixtures import DualCross  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures", "parity")


def wan_prelude(m, x, t, text):
    rope = m.rope(x)
    h = m.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()
    temb, proj, text, _ = m.condition_embedder(t, text, None)
    return h, (rope, proj.unflatten(1, (6, -1)), text, temb, x.shape)


def wan_head(m, h, ctx):
    _, _, temb, shape = ctx[0], ctx[1], ctx[3], ctx[4]
    b, _, f, hh, ww = shape
    pt, ph, pw = m.config.patch_size
    shift, scale = (m.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
    h = (m.norm_out(h.float()) * (1 + scale) + shift).type_as(h)
    h = m.proj_out(h).reshape(b, f // pt, hh // ph, ww // pw, pt, ph, pw, -1)
    return h.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def audio_prelude(m, x, t, text, glob, rope):
    cross = m.cross_attention_proj(text)
    glob = m.global_proj(glob)
    time = m.timestep_proj(m.time_proj(t.to(m.dtype)))
    glob = glob + time.unsqueeze(1)
    h = m.preprocess_conv(x) + x
    h = m.proj_in(h.transpose(1, 2))
    return torch.cat([glob, h], dim=-2), (cross, rope, time)


def audio_head(m, h):
    h = m.proj_out(h).transpose(1, 2)[:, :, 1:]
    return m.postprocess_conv(h) + h


def main():
    from diffusers import StableAudioDiTModel, WanTransformer3DModel

    torch.set_num_threads(2)
    out = os.path.join(ROOT, "bridged_towers")
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(os.path.join(out, "bridge"))
    wan = WanTransformer3DModel.from_pretrained(os.path.join(ROOT, "wan")).eval()
    sa = StableAudioDiTModel.from_pretrained(os.path.join(ROOT, "stable_audio")).eval()
    wio = load_file(os.path.join(ROOT, "wan", "io.safetensors"))
    aio = load_file(os.path.join(ROOT, "stable_audio", "io.safetensors"))
    # One batch row each (the bridge pairs rows), at their own timesteps.
    vin = {k: v[:1].contiguous() for k, v in wio.items() if k.startswith("in.")}
    ain = {k: (v[:1] if k not in ("in.rotary_embedding_cos", "in.rotary_embedding_sin") else v).contiguous()
           for k, v in aio.items() if k.startswith("in.")}
    save_file(vin, os.path.join(out, "video.safetensors"))
    save_file(ain, os.path.join(out, "audio.safetensors"))
    dv, da = wan.config.num_attention_heads * wan.config.attention_head_dim, sa.inner_dim
    torch.manual_seed(51)
    blocks = [DualCross(c1=dv, c2=da, e1=dv, e2=da, qk=16, vc=16, heads=2, flag="bicross").eval() for _ in range(2)]
    with torch.no_grad():
        for blk in blocks:
            for p in blk.parameters():
                p.copy_(torch.randn(p.shape) * 0.2)
    points = ([0, 1], [0, 1])
    config = {"_class_name": "DualCrossAttentionBridge", "num_blocks": 2, "num_heads": 2,
              "num_input_channels_1": dv, "num_input_channels_2": da, "num_qk_channels": 16, "num_v_channels": 16,
              "t_emb_dim_1": dv, "t_emb_dim_2": da, "mlp_ratio": 4.0, "flag": "bicross",
              "video_points": points[0], "audio_points": points[1]}
    with open(os.path.join(out, "bridge", "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    weights = {}
    for i, blk in enumerate(blocks):
        weights.update(blk.state(f"dual_dit_blocks.{i}"))
    save_file(weights, os.path.join(out, "bridge", "bridge.safetensors"))

    def run(bridged):
        with torch.no_grad():
            hv, cv = wan_prelude(wan, vin["in.hidden_states"], vin["in.timestep"], vin["in.encoder_hidden_states"])
            rope = (ain["in.rotary_embedding_cos"], ain["in.rotary_embedding_sin"])
            ha, ca = audio_prelude(sa, ain["in.hidden_states"], ain["in.timestep"], ain["in.encoder_hidden_states"],
                                   ain["in.global_hidden_states"], rope)
            nv, na = 0, 0
            for blk, v, a in zip(blocks, *points):
                for b in wan.blocks[nv:v + 1]:
                    hv = b(hv, cv[2], cv[1], cv[0])
                for b in sa.transformer_blocks[na:a + 1]:
                    ha = b(hidden_states=ha, encoder_hidden_states=ca[0], rotary_embedding=ca[1])
                nv, na = v + 1, a + 1
                if bridged:
                    hv, ha = blk(hv, ha, cv[3], ca[2])
            for b in wan.blocks[nv:]:
                hv = b(hv, cv[2], cv[1], cv[0])
            for b in sa.transformer_blocks[na:]:
                ha = b(hidden_states=ha, encoder_hidden_states=ca[0], rotary_embedding=ca[1])
            return wan_head(wan, hv, cv), audio_head(sa, ha)

    video, audio = run(True)
    alone_v, alone_a = run(False)
    # The towers alone equal their own forwards (the prelude and head are written out right).
    with torch.no_grad():
        ref_v = wan(vin["in.hidden_states"], vin["in.timestep"], vin["in.encoder_hidden_states"], return_dict=False)[0]
    assert (alone_v - ref_v).abs().max() < 1e-5, (alone_v - ref_v).abs().max()
    tensors = {"out.video": video.contiguous(), "out.audio": audio.contiguous(),
               "out.video_alone": alone_v.contiguous(), "out.audio_alone": alone_a.contiguous()}
    save_file(tensors, os.path.join(out, "io.safetensors"))
    print(f"bridged_towers: video {tuple(video.shape)} differs from alone by {(video - alone_v).abs().max():.3f}, "
          f"audio {tuple(audio.shape)} by {(audio - alone_a).abs().max():.3f}")


def run_towers(wan, sa, blocks, points, v, a, bridged):
    """Both towers' predictions for inputs v = (x, t, text) and a = (x, t, text, global), the
    bridge after `points` when `bridged`."""
    with torch.no_grad():
        hv, cv = wan_prelude(wan, *v)
        head = sa.config.attention_head_dim // 2
        from diffusers.models.embeddings import get_1d_rotary_pos_embed

        rope = get_1d_rotary_pos_embed(head, a[0].shape[2] + 1, use_real=True, repeat_interleave_real=False)
        ha, ca = audio_prelude(sa, *a, rope)
        nv, na = 0, 0
        for blk, pv, pa in zip(blocks, *points):
            for b in wan.blocks[nv:pv + 1]:
                hv = b(hv, cv[2], cv[1], cv[0])
            for b in sa.transformer_blocks[na:pa + 1]:
                ha = b(hidden_states=ha, encoder_hidden_states=ca[0], rotary_embedding=ca[1])
            nv, na = pv + 1, pa + 1
            if bridged:
                hv, ha = blk(hv, ha, cv[3], ca[2])
        for b in wan.blocks[nv:]:
            hv = b(hv, cv[2], cv[1], cv[0])
        for b in sa.transformer_blocks[na:]:
            ha = b(hidden_states=ha, encoder_hidden_states=ca[0], rotary_embedding=ca[1])
        return wan_head(wan, hv, cv), audio_head(sa, ha)


def sample():
    from diffusers import DPMSolverMultistepScheduler, StableAudioDiTModel, UniPCMultistepScheduler
    from diffusers import WanTransformer3DModel
    from make_parity_fixtures import philox_randn

    out = os.path.join(ROOT, "bridged_towers")
    wan = WanTransformer3DModel.from_pretrained(os.path.join(ROOT, "wan")).eval()
    sa = StableAudioDiTModel.from_pretrained(os.path.join(ROOT, "stable_audio")).eval()
    bridge = load_file(os.path.join(out, "bridge", "bridge.safetensors"))
    with open(os.path.join(out, "bridge", "config.json")) as f:
        config = json.load(f)
    dv, da = config["num_input_channels_1"], config["num_input_channels_2"]
    blocks = []
    for i in range(config["num_blocks"]):
        blk = DualCross(c1=dv, c2=da, e1=dv, e2=da, qk=16, vc=16, heads=2, flag="bicross").eval()
        blocks.append(blk.load(bridge, f"dual_dit_blocks.{i}"))
    points = (config["video_points"], config["audio_points"])
    g = torch.Generator().manual_seed(61)
    conds = {"in.video_positive": torch.randn(1, 7, 16, generator=g), "in.video_negative": torch.randn(1, 7, 16, generator=g),
             "in.audio_positive": torch.randn(1, 5, 6, generator=g), "in.audio_negative": torch.randn(1, 5, 6, generator=g),
             "in.audio_global_positive": torch.randn(1, 1, 10, generator=g),
             "in.audio_global_negative": torch.randn(1, 1, 10, generator=g)}
    steps, seed, cfg_v, cfg_a = 4, 5, 3.0, 2.0
    tensors = dict(conds)
    for suffix, iso in (("", 0.0), ("_iso", 0.5)):
        sv = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
        sa_s = DPMSolverMultistepScheduler(prediction_type="v_prediction")
        sv.save_config(os.path.join(out, "video_scheduler"))
        sv.set_timesteps(steps)
        sa_s.set_timesteps(steps)
        xv = philox_randn((1, 4, 3, 8, 10), seed).float() * sv.init_noise_sigma
        xa = philox_randn((1, 4, 11), seed + 1).float() * sa_s.init_noise_sigma
        text_v = torch.cat([conds["in.video_positive"], conds["in.video_negative"]])
        text_a = torch.cat([conds["in.audio_positive"], conds["in.audio_negative"]])
        glob_a = torch.cat([conds["in.audio_global_positive"], conds["in.audio_global_negative"]])
        for tv, ta in zip(sv.timesteps, sa_s.timesteps):
            v = (torch.cat([xv] * 2), tv.float().expand(2), text_v)
            a = (torch.cat([xa] * 2), ta.float().expand(2), text_a, glob_a)
            pv, pa = run_towers(wan, sa, blocks, points, v, a, True)
            if iso:
                ov, oa = run_towers(wan, sa, blocks, points, v, a, False)
                pv, pa = pv + iso * (pv - ov), pa + iso * (pa - oa)
            pv = pv[1:] + cfg_v * (pv[:1] - pv[1:])
            pa = pa[1:] + cfg_a * (pa[:1] - pa[1:])
            xv = sv.step(pv, tv, xv).prev_sample
            xa = sa_s.step(pa, ta, xa).prev_sample
        tensors[f"out.video_latent{suffix}"] = xv.contiguous()
        tensors[f"out.audio_latent{suffix}"] = xa.contiguous()
        print(f"sample{suffix}: video |max| {xv.abs().max():.3f}, audio |max| {xa.abs().max():.3f}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out, "sample.safetensors"))


if __name__ == "__main__":
    main()
    sample()
