#!/usr/bin/env python3
"""Draws the README's figure of the sounding-video demo: for each clip ditflow wrote (an animated
PNG with its WAV beside it, from graphs/text_to_sounding_video.yaml), a strip of its frames and,
under it on the same time axis, the waveform, with a mark under each frame where the shape
touches the floor. Pillow and numpy only.

    for s in circle square triangle; do
      target/release/ditflow run graphs/text_to_sounding_video.yaml \\
        --set video_prompt="a red $s bouncing in a box" --set audio_prompt="the bounces of a $s" \\
        --set out=demo_$s.png
    done
    .venv/bin/python tools/plot_sounding_video.py out/demo_circle.png out/demo_square.png \\
        out/demo_triangle.png -o docs/sounding_video.png
"""
import argparse
import struct

import numpy as np
from PIL import Image, ImageDraw, ImageSequence


def frames_of(path):
    img = Image.open(path)
    return [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(img)]


def samples_of(path):
    """The first channel of a 32-bit float or 16-bit WAV (ditflow writes float ones, which the
    wave module cannot read): the RIFF chunks walked by hand."""
    data = open(path, "rb").read()
    pos, bits, channels, samples = 12, 16, 1, None
    while pos + 8 <= len(data):
        tag, size = data[pos:pos + 4], struct.unpack("<I", data[pos + 4:pos + 8])[0]
        body = data[pos + 8:pos + 8 + size]
        if tag == b"fmt ":
            channels, bits = struct.unpack("<H", body[2:4])[0], struct.unpack("<H", body[14:16])[0]
        elif tag == b"data":
            samples = body
        pos += 8 + size + (size & 1)
    kind = "<f4" if bits == 32 else "<i2"
    x = np.frombuffer(samples, dtype=kind).astype(np.float32)
    if bits != 32:
        x /= 32768.0
    return x[::channels]


def floor_frames(frames):
    """Frames where the shape is lowest (as tests/sounding_video.rs finds them)."""
    stack = np.stack(frames).astype(np.float32) / 255.0
    background = np.median(stack, axis=0)
    weight = np.abs(stack - background).sum(-1)
    rows = np.arange(stack.shape[1])[None, :, None]
    y = (weight * rows).sum((1, 2)) / np.maximum(weight.sum((1, 2)), 1e-6)
    out = []
    for f in range(len(y)):
        left = y[f - 1] if f > 0 else -np.inf
        right = y[f + 1] if f + 1 < len(y) else -np.inf
        if y[f] >= left and y[f] > right and y[f] > y.max() - 1.0 * stack.shape[1] / 16:
            out.append(f)
    return out


def panel(png, cell=48, wave_h=64):
    frames = frames_of(png)
    audio = samples_of(png[:-4] + ".wav")
    n = len(frames)
    width = n * cell
    img = Image.new("RGB", (width, cell + wave_h + 6), (255, 255, 255))
    for i, f in enumerate(frames):
        img.paste(Image.fromarray(f).resize((cell, cell), Image.NEAREST), (i * cell, 0))
    draw = ImageDraw.Draw(img)
    top = cell + 6
    mid = top + wave_h // 2
    draw.line([(0, mid), (width, mid)], fill=(200, 200, 200))
    for f in floor_frames(frames):
        x = f * cell  # frame f shows the time f / fps onwards
        draw.line([(x, top), (x, top + wave_h)], fill=(255, 170, 170))
    # The waveform's envelope per pixel column.
    per = len(audio) / width
    peak = max(float(np.abs(audio).max()), 1e-6)
    for x in range(width):
        chunk = audio[int(x * per):max(int((x + 1) * per), int(x * per) + 1)]
        lo, hi = float(chunk.min()) / peak, float(chunk.max()) / peak
        draw.line([(x, mid - hi * wave_h / 2), (x, mid - lo * wave_h / 2)], fill=(40, 60, 160))
    return img


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("clips", nargs="+", help="animated PNGs written by SaveVideo (their WAV beside them)")
    ap.add_argument("-o", "--out", required=True)
    args = ap.parse_args()
    panels = [panel(p) for p in args.clips]
    width = max(p.width for p in panels)
    out = Image.new("RGB", (width, sum(p.height + 8 for p in panels)), (255, 255, 255))
    y = 0
    for p in panels:
        out.paste(p, (0, y))
        y += p.height + 8
    out.save(args.out)
    print(f"wrote {args.out} ({out.width}x{out.height})")


if __name__ == "__main__":
    main()
