#!/usr/bin/env python3
"""Trains ditflow's bundled text-to-sounding-video demo from scratch, on procedural clips.

The data: 2-second clips (16 frames of 16x16 at 8 fps, and mono audio at 8 kHz) of one coloured
shape (circle, square or triangle) bouncing on the floor of a box, with a tone at each bounce
whose pitch is set by the shape (circle G4, square C5, triangle G5). The bounce period (5 to 8
frames) and phase are random and named by no caption, so only the picture says when the bounces
happen: the audio tower hears of them through the bridge. The captions are disentangled: the
video's names colour and shape ("a red circle bouncing in a box"), the audio's the shape only
("the bounces of a circle"). Everything is drawn on the fly; nothing is downloaded. The model is
ours, under the project's licence.

The model, in the diffusers layouts ditflow loads, in models/sounding/:
  - audio_vae/          AutoencoderOobleck, 8 kHz mono <-> 8 x 125 latents (hop 128), trained
                        first (stage "vae"), its latent scale folded into its weights;
  - text_encoder/       T5EncoderModel (tiny) + a word-level tokenizer.json, for both captions;
  - video_transformer/  WanTransformer3DModel on the pixels themselves ([3, 16, 16, 16], patch
                        1x4x4: 256 tokens), a flow model;
  - audio_transformer/  StableAudioDiTModel over the audio latents (125 tokens + the global
                        token), a flow model;
  - projection_model/   StableAudioProjectionModel (seconds start/end conditioning);
  - bridge/             two dual cross-attention blocks (BridgeDiT's CrossDiTBlockAdaLN, as in
                        tools/make_bridge_fixtures.py) after video and audio blocks 1 and 3, with
                        RoPE on each token's time in seconds;
  - scheduler/          UniPCMultistepScheduler on flow sigmas (both towers).
The towers, projection, text encoder and bridge are trained jointly (stage "towers"), flow
matching with one sigma for both streams, the bridge dropped for 15% of the clips (so each tower
also works alone, and the bridge-off comparison of tests/sounding_video.rs is fair), each caption
dropped for 10% (classifier-free guidance). Weights are written in float16.

Run (PyTorch, diffusers, transformers, tokenizers; CPU is enough, about an hour on 2 cores):
    .venv/bin/python tools/train_sounding_video.py --stage vae --minutes 6
    .venv/bin/python tools/train_sounding_video.py --stage towers --minutes 50 --pool 4096
    .venv/bin/python tools/train_sounding_video.py --stage sample      # sync figures, preview
    .venv/bin/python tools/train_sounding_video.py --stage check       # ditflow's run against this
Deterministic given the seed and the thread count.
"""
import argparse
import copy
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from make_bridge_fixtures import DualCross  # noqa: E402

FPS, FRAMES, RES = 8, 16, 16
SR, SAMPLES, HOP = 8000, 16000, 128
LATENT = 8
MAX_TOKENS = 16
COLOURS = {"red": (0.9, 0.15, 0.1), "green": (0.15, 0.8, 0.25), "blue": (0.2, 0.35, 1.0),
           "yellow": (0.95, 0.85, 0.1), "white": (0.95, 0.95, 0.95), "purple": (0.65, 0.2, 0.85)}
SHAPES = {"circle": 392.0, "square": 523.25, "triangle": 783.99}
BACKGROUND = (0.08, 0.08, 0.1)
PERIODS = [5, 6, 7, 8]
SPECIALS = ["<pad>", "</s>", "<unk>"]
# Bridge RoPE positions: seconds x 8 (a video frame is one position).
POSITIONS_PER_SECOND = 8.0


def video_caption(colour, shape):
    return f"a {colour} {shape} bouncing in a box"


def audio_caption(shape):
    return f"the bounces of a {shape}"


def vocabulary():
    words = set("a bouncing in box the bounces of".split()) | set(COLOURS) | set(SHAPES)
    return SPECIALS + sorted(words)


def make_tokenizer(path):
    """A word-level tokenizer.json: lowercase, split on whitespace and punctuation, append </s>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tok.enable_padding(pad_id=0, pad_token="<pad>", length=MAX_TOKENS)
    tok.enable_truncation(MAX_TOKENS)
    tok.save(path)
    return tok


def clips(n, gen):
    """n clips: video [n, 3, F, H, W] and audio [n, 1, S], both in [-1, 1], the two captions, and
    each clip's bounce frames and shape."""
    names, shapes = list(COLOURS), list(SHAPES)
    colour = torch.randint(len(names), (n,), generator=gen)
    shape = torch.randint(len(shapes), (n,), generator=gen)
    period = torch.tensor(PERIODS)[torch.randint(len(PERIODS), (n,), generator=gen)]
    phase = (torch.rand(n, generator=gen) * period).floor()
    r = 2.6  # half-size in pixels
    x0 = r + 0.5 + torch.rand(n, generator=gen) * (RES - 2 * r - 1)
    t = torch.arange(FRAMES).float()
    height = 8.5 * torch.sin(math.pi * (t[None] - phase[:, None]) / period[:, None]).abs()
    cy = (RES - r - 0.5) - height  # [n, F]
    # 4x supersampled coverage for smooth motion.
    ss = 4
    grid = (torch.arange(RES * ss).float() + 0.5) / ss
    y, x = grid[None, None, :, None], grid[None, None, None, :]
    dx, dy = x - x0[:, None, None, None], y - cy[:, :, None, None]
    circle = dx ** 2 + dy ** 2 <= r ** 2
    square = (dx.abs() <= r * 0.88) & (dy.abs() <= r * 0.88)
    tri = (dy >= -r) & (dy <= r * 0.9) & (dx.abs() <= (dy + r) * 0.55)
    s = shape[:, None, None, None]
    mask = torch.where(s == 0, circle, torch.where(s == 1, square, tri)).float()
    mask = F.avg_pool2d(mask.reshape(n * FRAMES, 1, RES * ss, RES * ss), ss).reshape(n, 1, FRAMES, RES, RES)
    rgb = torch.tensor([COLOURS[c] for c in names])[colour][:, :, None, None, None]
    bg = torch.tensor(BACKGROUND)[None, :, None, None, None]
    video = bg * (1 - mask) + rgb * mask
    # A tone at each bounce: the frame where the shape touches the floor.
    ts = torch.arange(SAMPLES).float() / SR
    freq = torch.tensor([SHAPES[k] for k in shapes])[shape]
    audio = torch.zeros(n, SAMPLES)
    bounces = []
    for i in range(n):
        frames = [f for f in range(FRAMES) if (f - int(phase[i])) % int(period[i]) == 0]
        bounces.append(frames)
        for f in frames:
            tau = (ts - f / FPS).clamp(min=0)
            env = (1 - torch.exp(-tau / 0.003)) * torch.exp(-tau / 0.07) * (ts >= f / FPS)
            audio[i] += 0.5 * env * torch.sin(2 * math.pi * freq[i] * tau)
    vcaps = [video_caption(names[colour[i]], shapes[shape[i]]) for i in range(n)]
    acaps = [audio_caption(shapes[shape[i]]) for i in range(n)]
    return video * 2 - 1, audio[:, None], vcaps, acaps, bounces, [shapes[k] for k in shape.tolist()]


# ---------------------------------------------------------------------------------------------
# Stage 1: the audio VAE.


def vae_config():
    return dict(encoder_hidden_size=2 * LATENT, downsampling_ratios=[4, 4, 8], channel_multiples=[1, 2, 4],
                decoder_channels=16, decoder_input_channels=LATENT, audio_channels=1, sampling_rate=SR)


def spectral_convergence(a, b):
    """Multi-resolution spectral convergence, ||S_a - S_b|| / ||S_b|| of the STFT magnitudes."""
    loss = 0.0
    for n_fft in (128, 512):
        win = torch.hann_window(n_fft)
        sa = torch.stft(a.flatten(0, 1), n_fft, n_fft // 4, window=win, return_complex=True).abs()
        sb = torch.stft(b.flatten(0, 1), n_fft, n_fft // 4, window=win, return_complex=True).abs()
        loss = loss + (sa - sb).norm() / (sb.norm() + 1e-7)
    return loss


def train_vae(args):
    from diffusers import AutoencoderOobleck

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    vae = AutoencoderOobleck(**vae_config())
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, betas=(0.8, 0.99), weight_decay=0.0)
    t0, step, budget = time.time(), 0, args.minutes * 60
    crop = 32 * HOP
    while time.time() - t0 < budget:
        _, audio, *_ = clips(24, gen)
        start = torch.randint(0, (SAMPLES - crop) // HOP + 1, (1,), generator=gen).item() * HOP
        x = audio[:, :, start:start + crop]
        # The latent mean, with a little noise for a smooth decoder (the transformer's samples are
        # never exact); sampling the posterior at its initial width drowns the signal.
        z = vae.encode(x).latent_dist.mean
        z = z + 0.05 * z.detach().std() * torch.randn(z.shape, generator=gen)
        rec = vae.decode(z).sample
        # The waveform's squared error relative to its energy (the clips are mostly silence, so a
        # plain L1 or MSE is content with silence), and the multi-resolution spectra.
        loss = F.mse_loss(rec, x) / x.pow(2).mean().clamp(min=1e-6) + 0.2 * spectral_convergence(rec, x)
        frac = (time.time() - t0) / budget
        for g in opt.param_groups:
            g["lr"] = 1e-3 * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            print(f"vae step {step} loss {loss.item():.4f} l1 {F.l1_loss(rec, x).item():.4f} ({time.time() - t0:.0f}s)",
                  flush=True)
    vae.eval()
    with torch.no_grad():
        _, audio, *_ = clips(64, gen)
        z = vae.encode(audio).latent_dist.mean
        scale = float(1.0 / z.std())
        # Fold the scale into the weights: the encoder's mean channels grow by `scale`, the decoder's
        # first convolution shrinks by it, so the latents the transformer sees have unit variance.
        conv = vae.encoder.conv2
        conv.weight_g[:LATENT] *= scale
        conv.bias[:LATENT] *= scale
        vae.decoder.conv1.weight_g /= scale
        z = vae.encode(audio).latent_dist.mean
        rec = vae.decode(z).sample
        print(f"vae: {step} steps, latent scale {scale:.4f}, std now {z.std():.3f}, "
              f"reconstruction l1 {F.l1_loss(rec, audio):.4f}")
    vae.half().save_pretrained(os.path.join(args.out, "audio_vae"), safe_serialization=True)


# ---------------------------------------------------------------------------------------------
# Stage 2: text encoder, towers, projection and bridge.


def text_config():
    from transformers import T5Config

    return T5Config(vocab_size=len(vocabulary()), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, relative_attention_max_distance=16,
                    feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1)


def wan_config():
    return dict(patch_size=(1, 4, 4), num_attention_heads=2, attention_head_dim=48, in_channels=3, out_channels=3,
                text_dim=64, freq_dim=64, ffn_dim=256, num_layers=4, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64)


def sa_config():
    return dict(sample_size=SAMPLES // HOP, in_channels=LATENT, num_layers=4, attention_head_dim=32,
                num_attention_heads=2, num_key_value_attention_heads=1, out_channels=LATENT,
                cross_attention_dim=64, time_proj_dim=64, global_states_input_dim=128,
                cross_attention_input_dim=64)


def projection_config():
    return dict(text_encoder_dim=64, conditioning_dim=64, min_value=0, max_value=8)


DV, DA = 96, 64  # tower widths
POINTS = ([1, 3], [1, 3])


def bridge_config():
    return {"_class_name": "DualCrossAttentionBridge", "num_blocks": 2, "num_heads": 2,
            "num_input_channels_1": DV, "num_input_channels_2": DA, "num_qk_channels": 64, "num_v_channels": 64,
            "t_emb_dim_1": DV, "t_emb_dim_2": DA, "mlp_ratio": 2.0, "flag": "bicross",
            "video_points": POINTS[0], "audio_points": POINTS[1],
            "rope_positions": "seconds", "video_seconds_per_frame": 1.0 / FPS,
            "audio_seconds_per_token": HOP / SR, "audio_prefix_tokens": 1,
            "positions_per_second": POSITIONS_PER_SECOND}


def make_bridge():
    return [DualCross(c1=DV, c2=DA, e1=DV, e2=DA, qk=64, vc=64, heads=2, flag="bicross", ratio=2.0)
            for _ in range(2)]


def bridge_positions(n_video, n_audio):
    """Each token's RoPE position, as the bridge's rope_positions "seconds" places it: the time in
    seconds x POSITIONS_PER_SECOND (video: its frame's, frames major; audio: its latent frame's,
    the global token at 0), one float32 product per token as ditflow computes it."""
    per_frame = n_video // FRAMES
    pv = (torch.arange(n_video) // per_frame).float() * torch.tensor(1.0 / FPS * POSITIONS_PER_SECOND)
    pa = (torch.arange(n_audio) - 1).clamp(min=0).float() * torch.tensor(HOP / SR * POSITIONS_PER_SECOND)
    return pv, pa


def zero_init(blocks):
    """Zero-initialised outputs: every gate starts at 0, so the bridge starts as the identity."""
    with torch.no_grad():
        for b in blocks:
            for s in (b.s1, b.s2):
                s.mod.weight[2 * s.mod.out_features // 6:3 * s.mod.out_features // 6].zero_()
                s.mod.bias[2 * s.mod.out_features // 6:3 * s.mod.out_features // 6].zero_()
                s.mod.weight[5 * s.mod.out_features // 6:].zero_()
                s.mod.bias[5 * s.mod.out_features // 6:].zero_()


def towers_forward(wan, sa, blocks, xv, xa, t, text_v, text_a, glob, keep):
    """Both towers' predictions, the bridge blocks after POINTS; `keep` [B] (0/1) per clip."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed
    from make_bridged_towers_fixtures import audio_head, audio_prelude, wan_head, wan_prelude

    hv, cv = wan_prelude(wan, xv, t, text_v)
    rope = get_1d_rotary_pos_embed(sa.config.attention_head_dim // 2, xa.shape[2] + 1, use_real=True,
                                   repeat_interleave_real=False)
    ha, ca = audio_prelude(sa, xa, t, text_a, glob, rope)
    pos = bridge_positions(hv.shape[1], ha.shape[1])
    nv, na = 0, 0
    for blk, pv, pa in zip(blocks, *POINTS):
        for b in wan.blocks[nv:pv + 1]:
            hv = b(hv, cv[2], cv[1], cv[0])
        for b in sa.transformer_blocks[na:pa + 1]:
            ha = b(hidden_states=ha, encoder_hidden_states=ca[0], rotary_embedding=ca[1])
        nv, na = pv + 1, pa + 1
        if keep is not None:
            bv, ba = blk(hv, ha, cv[3], ca[2], positions=pos)
            k = keep[:, None, None]
            hv, ha = hv + k * (bv - hv), ha + k * (ba - ha)
    for b in wan.blocks[nv:]:
        hv = b(hv, cv[2], cv[1], cv[0])
    for b in sa.transformer_blocks[na:]:
        ha = b(hidden_states=ha, encoder_hidden_states=ca[0], rotary_embedding=ca[1])
    return wan_head(wan, hv, cv), audio_head(sa, ha)


def encode_text(te, tok, captions):
    """T5's last hidden state, padded positions zeroed: [B, MAX_TOKENS, 64]."""
    enc = tok.encode_batch(captions)
    ids = torch.tensor([e.ids for e in enc])
    mask = torch.tensor([e.attention_mask for e in enc])
    return te(input_ids=ids, attention_mask=mask).last_hidden_state * mask[..., None]


def audio_conditioning(proj, text, end=SAMPLES / SR):
    """StableAudioPipeline's conditioning: projected text plus the seconds tokens, and the global
    states (the two seconds embeddings side by side)."""
    b = text.shape[0]
    out = proj(text_hidden_states=text, start_seconds=torch.zeros(b), end_seconds=torch.full((b,), end))
    states = torch.cat([out.text_hidden_states, out.seconds_start_hidden_states, out.seconds_end_hidden_states], 1)
    glob = torch.cat([out.seconds_start_hidden_states, out.seconds_end_hidden_states], 2)
    return states, glob


def build(args):
    from diffusers import StableAudioDiTModel, WanTransformer3DModel
    from diffusers.pipelines.stable_audio.modeling_stable_audio import StableAudioProjectionModel
    from transformers import T5EncoderModel

    te = T5EncoderModel(text_config())
    wan = WanTransformer3DModel(**wan_config())
    sa = StableAudioDiTModel(**sa_config())
    with torch.no_grad():
        # Timesteps here are sigma x 1000: Fourier features at a matching scale.
        sa.time_proj.weight.mul_(1.0 / 1000.0)
    proj = StableAudioProjectionModel(**projection_config())
    blocks = make_bridge()
    return te, wan, sa, proj, blocks


def modules(te, wan, sa, proj, blocks):
    return [te, wan, sa, proj] + blocks


def train_towers(args):
    from diffusers import AutoencoderOobleck
    from tokenizers import Tokenizer

    torch.manual_seed(args.seed + 1)
    gen = torch.Generator().manual_seed(args.seed + 1)
    os.makedirs(os.path.join(args.out, "text_encoder"), exist_ok=True)
    tok = make_tokenizer(os.path.join(args.out, "text_encoder", "tokenizer.json"))
    tok = Tokenizer.from_file(os.path.join(args.out, "text_encoder", "tokenizer.json"))
    vae = AutoencoderOobleck.from_pretrained(os.path.join(args.out, "audio_vae")).float().eval()
    # A pool of clips, their audio encoded once.
    t0 = time.time()
    pool_v, pool_a, pool_vc, pool_ac = [], [], [], []
    with torch.no_grad():
        for _ in range(args.pool // 256):
            v, a, vc, ac, _, _ = clips(256, gen)
            pool_v.append(v.half())
            pool_a.append(vae.encode(a).latent_dist.mean)
            pool_vc += vc
            pool_ac += ac
    pool_v, pool_a = torch.cat(pool_v), torch.cat(pool_a)
    print(f"pool: {len(pool_vc)} clips, audio latents std {pool_a.std():.3f} ({time.time() - t0:.0f}s)", flush=True)

    te, wan, sa, proj, blocks = build(args)
    zero_init(blocks)
    nets = modules(te, wan, sa, proj, blocks)
    ema = [copy.deepcopy(m) for m in nets]
    params = [p for m in nets for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    t0, step, budget = time.time(), 0, args.minutes * 60
    while time.time() - t0 < budget:
        idx = torch.randint(len(pool_vc), (args.batch,), generator=gen)
        xv, xa = pool_v[idx].float(), pool_a[idx]
        vcaps = [pool_vc[i] for i in idx.tolist()]
        acaps = [pool_ac[i] for i in idx.tolist()]
        drop_v = torch.rand(args.batch, generator=gen) < 0.1
        drop_a = torch.rand(args.batch, generator=gen) < 0.1
        vcaps = ["" if d else c for c, d in zip(vcaps, drop_v.tolist())]
        keep = (torch.rand(args.batch, generator=gen) >= 0.15).float()
        text_v = encode_text(te, tok, vcaps)
        states, glob = audio_conditioning(proj, encode_text(te, tok, acaps))
        states = states * (~drop_a).float()[:, None, None]  # the pipeline's unconditional: all zeros
        sigma = torch.sigmoid(torch.randn(args.batch, generator=gen) * 1.0)
        nv, na = torch.randn(xv.shape, generator=gen), torch.randn(xa.shape, generator=gen)
        sv, sa_ = sigma[:, None, None, None, None], sigma[:, None, None]
        pv, pa = towers_forward(wan, sa, blocks, (1 - sv) * xv + sv * nv, (1 - sa_) * xa + sa_ * na, sigma * 1000,
                                text_v, states, glob, keep)
        lv, la = F.mse_loss(pv, nv - xv), F.mse_loss(pa, na - xa)
        loss = lv + la
        frac = (time.time() - t0) / budget
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 200) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.998, (1 + step) / (10 + step))
            for e, m in zip(ema, nets):
                for pe, pm in zip(e.parameters(), m.parameters()):
                    pe.lerp_(pm, 1 - decay)
        step += 1
        if step % 50 == 0:
            print(f"towers step {step} video {lv.item():.4f} audio {la.item():.4f} "
                  f"lr {opt.param_groups[0]['lr']:.2e} ({time.time() - t0:.0f}s)", flush=True)
    save_towers(args, *ema[:4], ema[4:])
    print(f"towers: {step} steps of batch {args.batch}")


def save_towers(args, te, wan, sa, proj, blocks):
    from diffusers import UniPCMultistepScheduler
    from safetensors.torch import save_file

    te.half().save_pretrained(os.path.join(args.out, "text_encoder"), safe_serialization=True)
    wan.half().save_pretrained(os.path.join(args.out, "video_transformer"), safe_serialization=True)
    sa.half().save_pretrained(os.path.join(args.out, "audio_transformer"), safe_serialization=True)
    proj.half().save_pretrained(os.path.join(args.out, "projection_model"), safe_serialization=True)
    os.makedirs(os.path.join(args.out, "bridge"), exist_ok=True)
    with open(os.path.join(args.out, "bridge", "config.json"), "w") as f:
        json.dump(bridge_config(), f, indent=2)
    weights = {}
    for i, blk in enumerate(blocks):
        weights.update({k: v.half() for k, v in blk.state(f"dual_dit_blocks.{i}").items()})
    save_file(weights, os.path.join(args.out, "bridge", "bridge.safetensors"))
    UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=2.0).save_pretrained(
        os.path.join(args.out, "scheduler"))


def load_towers(out):
    from diffusers import StableAudioDiTModel, WanTransformer3DModel
    from diffusers.pipelines.stable_audio.modeling_stable_audio import StableAudioProjectionModel
    from safetensors.torch import load_file
    from transformers import T5EncoderModel

    te = T5EncoderModel.from_pretrained(os.path.join(out, "text_encoder")).float().eval()
    wan = WanTransformer3DModel.from_pretrained(os.path.join(out, "video_transformer")).float().eval()
    sa = StableAudioDiTModel.from_pretrained(os.path.join(out, "audio_transformer")).float().eval()
    proj = StableAudioProjectionModel.from_pretrained(os.path.join(out, "projection_model")).float().eval()
    w = load_file(os.path.join(out, "bridge", "bridge.safetensors"))
    blocks = [blk.load(w, f"dual_dit_blocks.{i}").eval() for i, blk in enumerate(make_bridge())]
    return te, wan, sa, proj, blocks


# ---------------------------------------------------------------------------------------------
# Stage 3: sampling, the sync figures, a preview.


@torch.no_grad()
def sample(out, vprompts, aprompts, steps=20, cfg_v=3.0, cfg_a=3.0, seed=0, bridged=True, philox=False,
           isolation=1.0):
    """Lockstep sampling as graphs/text_to_sounding_video.yaml does it; with `philox`, one prompt
    from ditflow's seeded noise (the video's from seed, the audio's from seed + 1), so the two can
    be compared number for number. Returns frames [n, 3, F, H, W] in [0, 1], waveforms and the
    final audio latents."""
    from diffusers import AutoencoderOobleck, UniPCMultistepScheduler
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(os.path.join(out, "text_encoder", "tokenizer.json"))
    te, wan, sa, proj, blocks = load_towers(out)
    vae = AutoencoderOobleck.from_pretrained(os.path.join(out, "audio_vae")).float().eval()
    n = len(vprompts)
    text_v = encode_text(te, tok, vprompts + [""] * n)
    states, glob = audio_conditioning(proj, encode_text(te, tok, aprompts))
    states = torch.cat([states, torch.zeros_like(states)])
    glob = torch.cat([glob, glob])
    if philox:
        from make_parity_fixtures import philox_randn

        xv = philox_randn((n, 3, FRAMES, RES, RES), seed).float()
        xa = philox_randn((n, LATENT, SAMPLES // HOP), seed + 1).float()
    else:
        g = torch.Generator().manual_seed(seed)
        xv = torch.randn(n, 3, FRAMES, RES, RES, generator=g)
        xa = torch.randn(n, LATENT, SAMPLES // HOP, generator=g)
    sv = UniPCMultistepScheduler.from_pretrained(os.path.join(out, "scheduler"))
    sa_s = UniPCMultistepScheduler.from_pretrained(os.path.join(out, "scheduler"))
    sv.set_timesteps(steps)
    sa_s.set_timesteps(steps)
    keep = torch.full((2 * n,), 1.0 if bridged else 0.0)
    for t in sv.timesteps:
        args = (wan, sa, blocks, torch.cat([xv, xv]), torch.cat([xa, xa]), t.float().expand(2 * n), text_v, states, glob)
        pv, pa = towers_forward(*args, keep)
        if bridged and isolation:
            # Modality-isolation guidance: away from the prediction without the bridge.
            ov, oa = towers_forward(*args, torch.zeros_like(keep))
            pv, pa = pv + isolation * (pv - ov), pa + isolation * (pa - oa)
        pv = pv[n:] + cfg_v * (pv[:n] - pv[n:])
        pa = pa[n:] + cfg_a * (pa[:n] - pa[n:])
        xv = sv.step(pv, t, xv).prev_sample
        xa = sa_s.step(pa, t, xa).prev_sample
    audio = vae.decode(xa).sample
    return ((xv.clamp(-1, 1) + 1) / 2), audio, xa


def visual_bounces(video):
    """Frames where the shape touches the floor: local maxima of its vertical centroid within a
    pixel of the lowest it gets; video [3, F, H, W] in [0, 1]."""
    bg = torch.tensor(BACKGROUND)[:, None, None, None]
    w = (video - bg).abs().sum(0)  # [F, H, W]
    rows = torch.arange(RES).float()[None, :, None]
    y = (w * rows).sum((1, 2)) / w.sum((1, 2)).clamp(min=1e-6)
    out = []
    for f in range(FRAMES):
        left = y[f - 1] if f > 0 else -1e9
        right = y[f + 1] if f + 1 < FRAMES else -1e9
        if y[f] >= left and y[f] > right and y[f] > y.max() - 1.0:
            out.append(f)
    return out


def audio_onsets(audio):
    """Onset frames: where the 8 ms energy envelope rises through half its peak: audio [S]."""
    win = SR // 125
    e = audio[: len(audio) // win * win].reshape(-1, win).pow(2).mean(1).sqrt()
    thr = 0.35 * e.max()
    out, last = [], -1e9
    for i in range(len(e)):
        if e[i] >= thr and (i == 0 or thr > e[i - 1]) and (i - last) * win / SR > 0.3:
            out.append(round(i * win / SR * FPS))
            last = i
    return out


def f1(ref, hyp, tol=1):
    used, hits, lags = set(), 0, []
    for r in ref:
        best = None
        for j, h in enumerate(hyp):
            if j not in used and abs(h - r) <= tol and (best is None or abs(h - r) < abs(hyp[best] - r)):
                best = j
        if best is not None:
            used.add(best)
            hits += 1
            lags.append(hyp[best] - r)
    p = hits / max(len(hyp), 1)
    rcl = hits / max(len(ref), 1)
    return (2 * p * rcl / (p + rcl) if p + rcl else 0.0), lags


def pitch(audio):
    spec = torch.fft.rfft(audio * torch.hann_window(len(audio)))
    return float(spec.abs().argmax()) * SR / len(audio)


def evaluate(args):
    prompts = [("red", "circle"), ("green", "square"), ("blue", "triangle"), ("yellow", "circle"),
               ("white", "square"), ("purple", "triangle"), ("red", "square"), ("green", "triangle")]
    vp = [video_caption(c, s) for c, s in prompts]
    ap = [audio_caption(s) for _, s in prompts]
    for bridged in (True, False):
        video, audio, _ = sample(args.out, vp, ap, bridged=bridged)
        scores, lags, pitches = [], [], 0
        for i, (_, s) in enumerate(prompts):
            ref, hyp = visual_bounces(video[i]), audio_onsets(audio[i, 0])
            f, lg = f1(ref, hyp)
            scores.append(f)
            lags += lg
            p = pitch(audio[i, 0])
            near = min(SHAPES, key=lambda k: abs(math.log(SHAPES[k] / max(p, 1.0))))
            pitches += near == s
            print(f"  {'bridge' if bridged else 'alone '} {vp[i]!r}: bounces {ref} onsets {hyp} F1 {f:.2f} "
                  f"pitch {p:.0f} Hz ({near})")
        lags = sorted(abs(x) for x in lags)
        med = lags[len(lags) // 2] if lags else float("nan")
        print(f"{'bridge' if bridged else 'alone'}: mean F1 {sum(scores) / len(scores):.3f}, "
              f"median |lag| {med} frames, pitch {pitches}/8", flush=True)
        if bridged:
            from PIL import Image

            rows = [torch.cat(list(video[i].permute(1, 0, 2, 3)), dim=2) for i in range(4)]  # [3, H, F*W]
            img = torch.cat(rows, dim=1).permute(1, 2, 0).mul(255).byte().numpy()
            Image.fromarray(img).resize((img.shape[1] * 4, img.shape[0] * 4), Image.NEAREST).save(
                os.path.join(args.out, "preview.png"))


def check(args):
    """The demo graph run by ditflow (target/release/ditflow) against sample() from the same
    noise: the largest differences of the frames and the audio latent."""
    import subprocess
    import tempfile

    from safetensors.torch import load_file

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "graphs", "text_to_sounding_video.yaml")) as f:
        yaml = f.read()
    tmp = tempfile.mkdtemp()
    extra = (f"  tv: {{type: LatentToTensor, inputs: {{latent: sample.video_latent}}}}\n"
             f"  ta: {{type: LatentToTensor, inputs: {{latent: sample.audio_latent}}}}\n"
             f"  save_v: {{type: SaveTensor, inputs: {{tensor: tv.tensor, path: {tmp}/video.safetensors}}}}\n"
             f"  save_a: {{type: SaveTensor, inputs: {{tensor: ta.tensor, path: {tmp}/audio.safetensors}}}}\n")
    yaml = yaml.replace("outputs:\n", extra + "outputs:\n")
    graph = os.path.join(tmp, "graph.yaml")
    with open(graph, "w") as f:
        f.write(yaml)
    exe = os.path.join(root, args.ditflow)
    subprocess.run([exe, "run", graph, "--set", f"models={os.path.abspath(args.out)}", "--set", "seed=3",
                    "--out", tmp], check=True, capture_output=True)
    vp, ap = [video_caption("red", "circle")], [audio_caption("circle")]
    video, _, xa = sample(args.out, vp, ap, seed=3, philox=True)
    ours_v = next(iter(load_file(os.path.join(tmp, "video.safetensors")).values()))
    ours_a = next(iter(load_file(os.path.join(tmp, "audio.safetensors")).values()))
    dv = ((ours_v.clamp(-1, 1) + 1) / 2 - video).abs().max()
    da = (ours_a - xa).abs().max() / xa.abs().max()
    print(f"ditflow against this sampler: frames max |diff| {dv:.2e}, audio latent {da:.2e} relative")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["vae", "towers", "sample", "check"], required=True)
    ap.add_argument("--ditflow", default="target/release/ditflow", help="for --stage check")
    ap.add_argument("--out", default="models/sounding")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--pool", type=int, default=8192)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    if args.stage == "vae":
        train_vae(args)
    elif args.stage == "towers":
        train_towers(args)
    elif args.stage == "check":
        check(args)
    else:
        evaluate(args)


if __name__ == "__main__":
    main()
