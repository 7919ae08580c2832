#!/usr/bin/env python3
"""Trains ditflow's bundled demo text-to-image model from scratch, on procedurally drawn images.

The data: 64x64 pictures of one shape (circle, square or triangle) of one colour, small or large,
at one of five places, on a plain background of another colour, captioned like
"a large red circle on the left on a blue background". Everything is drawn on the fly; no dataset
is downloaded. The model is ours, under the project's licence.

The model, in the diffusers/transformers layouts ditflow loads:
  - vae/           AutoencoderKL, 64x64x3 <-> 16x16x4 latents (trained first, stage "vae");
  - text_encoder/  T5EncoderModel (tiny, trained jointly with the transformer) + tokenizer.json
                   (a word-level tokenizer over the caption vocabulary);
  - transformer/   PixArtTransformer2DModel, patch 2 over the 16x16 latents: 64 tokens;
  - scheduler/     FlowMatchEulerDiscreteScheduler config: the transformer predicts the flow
                   velocity (noise - data) at sigma, fed sigma * 1000 as its timestep.
Weights are written in float16 (about 16 MB in all) to models/demo/.

Run (PyTorch, diffusers, transformers, tokenizers; a GPU makes it minutes instead of hours):
    python tools/train_demo.py --stage vae --minutes 3 --out models/demo
    python tools/train_demo.py --stage dit --minutes 9 --out models/demo
    python tools/train_demo.py --stage sample --out models/demo     # previews in models/demo/preview.png
Deterministic given the seed and the device.
"""
import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

COLORS = {
    "red": (0.85, 0.1, 0.1),
    "green": (0.1, 0.7, 0.2),
    "blue": (0.15, 0.25, 0.9),
    "yellow": (0.95, 0.85, 0.1),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
    "orange": (0.95, 0.5, 0.05),
    "purple": (0.55, 0.15, 0.7),
}
SHAPES = ["circle", "square", "triangle"]
SIZES = {"small": 0.17, "large": 0.32}
PLACES = {"in the center": (0.5, 0.5), "on the left": (0.27, 0.5), "on the right": (0.73, 0.5),
          "at the top": (0.5, 0.27), "at the bottom": (0.5, 0.73)}
RES = 64
MAX_TOKENS = 16

SPECIALS = ["<pad>", "</s>", "<unk>"]


def vocabulary():
    words = set("a on the background".split())
    for c in COLORS:
        words.add(c)
    words.update(SHAPES)
    words.update(SIZES)
    for p in PLACES:
        words.update(p.split())
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


def draw(n, gen, device):
    """A batch of images [n, 3, 64, 64] in [-1, 1] and their captions."""
    names = list(COLORS)
    rgb = torch.tensor([COLORS[c] for c in names], device=device)
    fg = torch.randint(len(names), (n,), generator=gen, device=device)
    bg = (fg + torch.randint(1, len(names), (n,), generator=gen, device=device)) % len(names)
    shape = torch.randint(3, (n,), generator=gen, device=device)
    size_names = list(SIZES)
    size = torch.randint(2, (n,), generator=gen, device=device)
    place_names = list(PLACES)
    place = torch.randint(len(place_names), (n,), generator=gen, device=device)
    r = torch.tensor([SIZES[s] for s in size_names], device=device)[size]
    centers = torch.tensor([PLACES[p] for p in place_names], device=device)[place]
    # Small random jitter of the position keeps the model from memorising pixels.
    jitter = (torch.rand(n, 2, generator=gen, device=device) - 0.5) * 0.06
    cx, cy = (centers[:, 0] + jitter[:, 0])[:, None, None], (centers[:, 1] + jitter[:, 1])[:, None, None]
    r = r[:, None, None]
    coords = (torch.arange(RES, device=device).float() + 0.5) / RES
    y, x = coords[None, :, None], coords[None, None, :]
    circle = (x - cx) ** 2 + (y - cy) ** 2 <= r ** 2
    square = ((x - cx).abs() <= r * 0.85) & ((y - cy).abs() <= r * 0.85)
    top = cy - r
    tri = (y >= top) & (y <= cy + r * 0.8) & ((x - cx).abs() <= (y - top) * 0.6)
    s = shape[:, None, None]
    mask = torch.where(s == 0, circle, torch.where(s == 1, square, tri)).float()[:, None]
    img = rgb[bg][:, :, None, None] * (1 - mask) + rgb[fg][:, :, None, None] * mask
    captions = [
        f"a {size_names[size[i]]} {names[fg[i]]} {SHAPES[shape[i]]} {place_names[place[i]]} on a {names[bg[i]]} background"
        for i in range(n)
    ]
    return img * 2 - 1, captions


def vae_config():
    return dict(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 64, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16,
        sample_size=RES, scaling_factor=1.0, shift_factor=0.0,
    )


def train_vae(args, device):
    from diffusers import AutoencoderKL

    torch.manual_seed(args.seed)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    vae = AutoencoderKL(**vae_config()).to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    t0, step = time.time(), 0
    while time.time() - t0 < args.minutes * 60:
        img, _ = draw(64, gen, device)
        post = vae.encode(img).latent_dist
        z = post.sample(generator=gen)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / (4 * 16 * 16)
        loss = F.mse_loss(rec, img) + 0.5 * F.l1_loss(rec, img) + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 200 == 0:
            print(f"vae step {step} loss {loss.item():.4f} kl {kl.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    # Latent statistics, so the transformer sees unit-variance latents.
    with torch.no_grad():
        img, _ = draw(512, gen, device)
        z = vae.encode(img).latent_dist.mean
        vae.register_to_config(scaling_factor=float(1.0 / z.std()), shift_factor=float(z.mean()))
    vae.half().save_pretrained(os.path.join(args.out, "vae"), safe_serialization=True)
    print(f"vae: {step} steps, scaling {vae.config.scaling_factor:.4f} shift {vae.config.shift_factor:.4f}")


def text_config():
    from transformers import T5Config

    return T5Config(vocab_size=len(vocabulary()), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
                    relative_attention_num_buckets=8, relative_attention_max_distance=16,
                    feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1)


def transformer_config():
    return dict(num_attention_heads=4, attention_head_dim=64, in_channels=4, out_channels=4, num_layers=6,
                cross_attention_dim=256, sample_size=16, patch_size=2, caption_channels=64,
                activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
                norm_elementwise_affine=False, norm_eps=1e-6, interpolation_scale=1, use_additional_conditions=False)


def train_dit(args, device):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, PixArtTransformer2DModel
    from transformers import T5EncoderModel

    torch.manual_seed(args.seed + 1)
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)
    tok = make_tokenizer(os.path.join(args.out, "tokenizer.json"))
    vae = AutoencoderKL.from_pretrained(os.path.join(args.out, "vae")).float().to(device).eval()
    te = T5EncoderModel(text_config()).to(device)
    dit = PixArtTransformer2DModel(**transformer_config()).to(device)
    ema = PixArtTransformer2DModel(**transformer_config()).to(device)
    ema.load_state_dict(dit.state_dict())
    ema_te = T5EncoderModel(text_config()).to(device)
    ema_te.load_state_dict(te.state_dict())
    params = list(dit.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    sf, sh = vae.config.scaling_factor, vae.config.shift_factor
    t0, step = time.time(), 0
    budget = args.minutes * 60
    while time.time() - t0 < budget:
        img, caps = draw(args.batch, gen, device)
        drop = torch.rand(args.batch, generator=gen, device=device) < 0.1
        caps = ["" if d else c for c, d in zip(caps, drop.tolist())]
        enc = tok.encode_batch(caps)
        ids = torch.tensor([e.ids for e in enc], device=device)
        mask = torch.tensor([e.attention_mask for e in enc], device=device)
        with torch.no_grad():
            x0 = (vae.encode(img).latent_dist.sample(generator=gen) - sh) * sf
        noise = torch.randn(x0.shape, generator=gen, device=device)
        # Logit-normal sigmas (SD3), more weight mid-trajectory.
        sigma = torch.sigmoid(torch.randn(args.batch, generator=gen, device=device))[:, None, None, None]
        xt = (1 - sigma) * x0 + sigma * noise
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            cond = te(input_ids=ids, attention_mask=mask).last_hidden_state
            v = dit(xt, encoder_hidden_states=cond, timestep=sigma.flatten() * 1000,
                    encoder_attention_mask=mask, added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        loss = F.mse_loss(v.float(), noise - x0)
        # Warm-up then cosine decay over the time budget.
        frac = (time.time() - t0) / budget
        for g in opt.param_groups:
            g["lr"] = args.lr * min(1.0, (step + 1) / 300) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            decay = min(0.999, (1 + step) / (10 + step))
            for e, p in zip(list(ema.parameters()) + list(ema_te.parameters()), params):
                e.lerp_(p, 1 - decay)
        step += 1
        if step % 500 == 0:
            print(f"dit step {step} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e} ({time.time() - t0:.0f}s)", flush=True)
    ema.half().save_pretrained(os.path.join(args.out, "transformer"), safe_serialization=True)
    ema_te.half().save_pretrained(os.path.join(args.out, "text_encoder"), safe_serialization=True)
    os.replace(os.path.join(args.out, "tokenizer.json"), os.path.join(args.out, "text_encoder", "tokenizer.json"))
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    sched.save_pretrained(os.path.join(args.out, "scheduler"))
    print(f"dit: {step} steps of batch {args.batch}")


@torch.no_grad()
def sample(args, device, prompts, steps=20, cfg=4.0, seed=0):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, PixArtTransformer2DModel
    from tokenizers import Tokenizer
    from transformers import T5EncoderModel

    tok = Tokenizer.from_file(os.path.join(args.out, "text_encoder", "tokenizer.json"))
    vae = AutoencoderKL.from_pretrained(os.path.join(args.out, "vae")).float().to(device)
    te = T5EncoderModel.from_pretrained(os.path.join(args.out, "text_encoder")).float().to(device)
    dit = PixArtTransformer2DModel.from_pretrained(os.path.join(args.out, "transformer")).float().to(device)
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(args.out, "scheduler"))
    n = len(prompts)
    enc = tok.encode_batch(prompts + [""] * n)
    ids = torch.tensor([e.ids for e in enc], device=device)
    mask = torch.tensor([e.attention_mask for e in enc], device=device)
    cond = te(input_ids=ids, attention_mask=mask).last_hidden_state
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(n, 4, 16, 16, generator=g, device=device)
    sched.set_timesteps(sigmas=[1 - i / steps for i in range(steps)], device=device)
    for t in sched.timesteps:
        v = dit(torch.cat([x, x]), encoder_hidden_states=cond, timestep=t.expand(2 * n), encoder_attention_mask=mask,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        vc, vu = v.chunk(2)
        x = sched.step(vu + cfg * (vc - vu), t, x).prev_sample
    img = vae.decode(x / vae.config.scaling_factor + vae.config.shift_factor).sample
    return ((img.clamp(-1, 1) + 1) / 2).cpu()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", choices=["vae", "dit", "sample"], required=True)
    ap.add_argument("--out", default="models/demo")
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    os.makedirs(args.out, exist_ok=True)
    if args.stage == "vae":
        train_vae(args, device)
    elif args.stage == "dit":
        train_dit(args, device)
    else:
        prompts = ["a large red circle in the center on a blue background",
                   "a large yellow square in the center on a black background",
                   "a small white triangle on the left on a green background",
                   "a large purple circle at the top on a orange background"]
        imgs = sample(args, device, prompts)
        from PIL import Image
        grid = torch.cat(list(imgs), dim=2).permute(1, 2, 0).mul(255).byte().numpy()
        Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(
            os.path.join(args.out, "preview.png"))
        print("wrote preview.png")


if __name__ == "__main__":
    main()
