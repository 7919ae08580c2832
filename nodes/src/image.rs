//! Image file nodes: `SaveImage` writes 8-bit PNGs and `LoadImage` reads them; `PadImage` grows an
//! image for outpainting and `MaskImage` greys the region an inpainting model repaints. Images are
//! `[height, width, channels]` tensors: f32 in [0, 1] (or u8 for saving) with 1 (grey), 3 (RGB)
//! or 4 (RGBA) channels. Encoding, decoding and pixel conversion are plain functions
//! ([`encode_png`], [`decode_png`], [`unit_to_u8`]).

use crate::tensor::check_cpu_data;
use ditflow_plugin::files::{absolute, file_fingerprint, input_path, io_error, output_path};
use ditflow_plugin::prelude::*;
use std::borrow::Cow;
use std::io::{BufRead, Seek};

/// The most memory PNG decoding may allocate (a 16-bit RGBA 8192×8192 image fits).
const MAX_DECODE_BYTES: usize = 1 << 30;

/// A [0, 1] value as an 8-bit sample: clamped, scaled by 255 and rounded; NaN becomes 0.
pub fn unit_to_u8(v: f32) -> u8 {
    if v.is_nan() {
        0
    } else {
        (v.clamp(0.0, 1.0) * 255.0).round() as u8
    }
}

/// The height, width and channel count of an image tensor's shape: `[H, W, C]`, or `[1, H, W, C]`
/// (a batch of one), with `C` of 1, 3 or 4 and a non-zero size.
pub fn image_layout(shape: &[usize]) -> Result<(usize, usize, usize)> {
    let (h, w, c) = match *shape {
        [h, w, c] | [1, h, w, c] => (h, w, c),
        _ => bail!("expected an image of shape [height, width, channels], got {shape:?}"),
    };
    if !matches!(c, 1 | 3 | 4) {
        bail!(
            "cannot save an image with {c} channels as PNG: it needs 1 (grey), 3 (RGB) or 4 (RGBA)"
        );
    }
    if h == 0 || w == 0 {
        bail!("cannot save an empty image (shape {shape:?})");
    }
    Ok((h, w, c))
}

/// Encodes 8-bit samples (`[height, width, channels]` row-major, 1, 3 or 4 channels) as a PNG.
pub fn encode_png(width: usize, height: usize, channels: usize, data: &[u8]) -> Result<Vec<u8>> {
    let color = match channels {
        1 => png::ColorType::Grayscale,
        3 => png::ColorType::Rgb,
        4 => png::ColorType::Rgba,
        _ => bail!("cannot encode {channels} channels as PNG: it needs 1, 3 or 4"),
    };
    if data.len() != width * height * channels {
        bail!(
            "{} bytes do not make a {width}×{height} image of {channels} channels",
            data.len()
        );
    }
    let (Ok(w), Ok(h)) = (u32::try_from(width), u32::try_from(height)) else {
        bail!("a {width}×{height} image is too large for PNG");
    };
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, w, h);
    encoder.set_color(color);
    encoder.set_depth(png::BitDepth::Eight);
    let encode = |e: png::EncodingError| Error(format!("PNG encoding failed: {e}"));
    let mut writer = encoder.write_header().map_err(encode)?;
    writer.write_image_data(data).map_err(encode)?;
    writer.finish().map_err(encode)?;
    Ok(out)
}

/// A decoded image: `[height, width, channels]` row-major f32 samples in [0, 1].
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedImage {
    pub width: usize,
    pub height: usize,
    /// 1 (grey), 3 (RGB) or 4 (RGBA).
    pub channels: usize,
    pub data: Vec<f32>,
}

/// Decodes the first frame of a PNG into [0, 1] floats.
///
/// Palette and low-bit-depth images are expanded to 8 bits, a transparency chunk becomes an
/// alpha channel, 16-bit samples keep their precision, and grey with alpha becomes RGBA.
pub fn decode_png<R: BufRead + Seek>(reader: R) -> Result<DecodedImage> {
    let decode = |e: png::DecodingError| Error(format!("not a readable PNG: {e}"));
    let mut decoder = png::Decoder::new_with_limits(
        reader,
        png::Limits {
            bytes: MAX_DECODE_BYTES,
        },
    );
    decoder.set_transformations(png::Transformations::EXPAND);
    let mut reader = decoder.read_info().map_err(decode)?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| Error::new("the PNG is too large to decode"))?;
    let mut buf = vec![0u8; size];
    let info = reader.next_frame(&mut buf).map_err(decode)?;
    let (width, height) = (info.width as usize, info.height as usize);
    let samples = info.color_type.samples();
    let bytes_per_sample = match info.bit_depth {
        png::BitDepth::Eight => 1,
        png::BitDepth::Sixteen => 2,
        depth => bail!("unsupported PNG bit depth {depth:?} after expansion"),
    };
    let (grey_alpha, channels) = match info.color_type {
        png::ColorType::Grayscale => (false, 1),
        png::ColorType::Rgb => (false, 3),
        png::ColorType::Rgba => (false, 4),
        png::ColorType::GrayscaleAlpha => (true, 4),
        color => bail!("unsupported PNG colour type {color:?} after expansion"),
    };
    let row_bytes = width * samples * bytes_per_sample;
    if info.line_size < row_bytes || buf.len() < info.line_size * height {
        bail!("the PNG decoder returned a short frame");
    }
    let mut data = Vec::with_capacity(width * height * channels);
    for row in buf.chunks(info.line_size).take(height) {
        let row = &row[..row_bytes];
        let mut values = row.chunks_exact(bytes_per_sample).map(|s| match *s {
            [v] => v as f32 / 255.0,
            [hi, lo] => u16::from_be_bytes([hi, lo]) as f32 / 65535.0,
            _ => unreachable!("samples are one or two bytes"),
        });
        if grey_alpha {
            while let (Some(grey), Some(alpha)) = (values.next(), values.next()) {
                data.extend_from_slice(&[grey, grey, grey, alpha]);
            }
        } else {
            data.extend(values);
        }
    }
    Ok(DecodedImage {
        width,
        height,
        channels,
        data,
    })
}

/// Each pixel of a `[height, width, channels]` image as a `scale × scale` block.
pub fn upscale_nearest(
    samples: &[u8],
    width: usize,
    height: usize,
    channels: usize,
    scale: usize,
) -> Vec<u8> {
    let row = width * channels;
    let mut out = Vec::with_capacity(samples.len() * scale * scale);
    for y in 0..height {
        let src = &samples[y * row..(y + 1) * row];
        let mut line = Vec::with_capacity(row * scale);
        for px in src.chunks_exact(channels) {
            for _ in 0..scale {
                line.extend_from_slice(px);
            }
        }
        for _ in 0..scale {
            out.extend_from_slice(&line);
        }
    }
    out
}

/// `SaveImage`: an image to a PNG file.
#[derive(Default)]
pub struct SaveImage;

impl Node for SaveImage {
    fn schema() -> NodeSchema {
        NodeSchema::new("SaveImage")
            .category("image")
            .doc(
                "Writes an image as an 8-bit PNG: grey, RGB or RGBA for 1, 3 or 4 channels. \
                 f32 samples are clamped to [0, 1] and rounded to 0..255; u8 samples are written \
                 as they are. An existing file is replaced.",
            )
            .input(
                Port::new("image", "Image").doc(
                    "An f32 image in [0, 1] or a u8 image, of shape [height, width, channels].",
                ),
            )
            .input(
                Port::new("path", "String")
                    .default("image.png")
                    .doc("Where to write; a relative path goes under the run's output folder."),
            )
            .input(
                Port::new("scale", "Int")
                    .default(1i64)
                    .range(1.0, 16.0)
                    .doc("Writes each pixel as a scale×scale block (nearest-neighbour upscaling)."),
            )
            .output(Port::new("path", "String").doc("The absolute path of the file written."))
            .side_effects()
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let image: Tensor = ctx.input("image")?;
        let requested: String = ctx.input("path")?;
        let failed = |e: Error| Error(format!("cannot write {requested}: {e}"));
        let (height, width, channels) = image_layout(image.shape()).map_err(failed)?;
        check_cpu_data(&image, "image").map_err(failed)?;
        let samples: Cow<'_, [u8]> = match image.dtype() {
            DType::F32 => image.as_f32()?.iter().copied().map(unit_to_u8).collect(),
            DType::U8 => Cow::Borrowed(image.bytes()),
            other => {
                let e = format!(
                    "images are saved from f32 or u8 samples, not {}",
                    other.name()
                );
                return Err(failed(Error(e)));
            }
        };
        let scale = ctx.input::<i64>("scale")?.clamp(1, 16) as usize;
        let (samples, width, height) = if scale > 1 {
            (
                Cow::Owned(upscale_nearest(&samples, width, height, channels, scale)),
                width * scale,
                height * scale,
            )
        } else {
            (samples, width, height)
        };
        let png = encode_png(width, height, channels, &samples).map_err(failed)?;
        // Resolved only now, so a bad image does not leave an empty output folder behind.
        let path = output_path(ctx, "path")?;
        std::fs::write(&path, png).map_err(|e| io_error("cannot write", &path, &e))?;
        ctx.set_output("path", absolute(&path))
    }
}

/// `LoadImage`: a PNG file as an image.
#[derive(Default)]
pub struct LoadImage;

impl Node for LoadImage {
    fn schema() -> NodeSchema {
        NodeSchema::new("LoadImage")
            .category("image")
            .doc(
                "Reads a PNG file (grey, RGB, RGBA or palette; 1 to 16 bits) as an f32 image in \
                 [0, 1]: grey gives 1 channel, RGB 3, and anything with transparency 4 (RGBA). \
                 The result is cached until the file's size or modification time changes.",
            )
            .input(
                Port::new("path", "String")
                    .doc("The PNG file; a relative path is taken from the graph's folder."),
            )
            .output(
                Port::new("image", "Image")
                    .doc("An f32 image of shape [height, width, channels] in [0, 1]."),
            )
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let path = input_path(ctx, "path")?;
        let file = std::fs::File::open(&path).map_err(|e| io_error("cannot read", &path, &e))?;
        let image = decode_png(std::io::BufReader::new(file))
            .map_err(|e| Error(format!("cannot read {}: {e}", path.display())))?;
        let shape = [image.height, image.width, image.channels];
        let tensor = Tensor::from_f32(Kind::Image, &shape, &image.data)?;
        ctx.set_output("image", tensor)
    }

    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        file_fingerprint("cannot read", &input_path(ctx, "path")?).map(Some)
    }
}

/// `PadImage`: an image grown by borders, and the mask of what was added (outpainting).
#[derive(Default)]
pub struct PadImage;

impl Node for PadImage {
    fn schema() -> NodeSchema {
        NodeSchema::new("PadImage")
            .category("image")
            .doc(
                "Pads an image for outpainting: `left`, `top`, `right` and `bottom` pixels are \
                 added, filled with the nearest edge pixel, and the mask ([H, W, 1], 1 where \
                 pixels were added) says what to paint. Sample with the padded image as its \
                 init_latent (through VAEEncode), the mask and denoise 1 outpaints; `feather` \
                 pixels of the original next to the border are covered too, fading from 1 to 0 \
                 (Sample binarizes a mask at 0.5, as diffusers does, so about half of them are \
                 repainted).",
            )
            .input(Port::new("image", "Image").doc("An f32 image [height, width, channels] in [0, 1] (LoadImage)."))
            .input(Port::new("left", "Int").default(0i64).range(0.0, 8192.0).doc("Pixels added on the left."))
            .input(Port::new("top", "Int").default(0i64).range(0.0, 8192.0).doc("Pixels added at the top."))
            .input(Port::new("right", "Int").default(0i64).range(0.0, 8192.0).doc("Pixels added on the right."))
            .input(Port::new("bottom", "Int").default(0i64).range(0.0, 8192.0).doc("Pixels added at the bottom."))
            .input(Port::new("feather", "Int").default(0i64).range(0.0, 1024.0).doc("Pixels of the original, next to the added border, that the mask also covers, fading from 1 at the border to 0."))
            .output(Port::new("image", "Image").doc("The padded image."))
            .output(Port::new("mask", "Image").doc("[H, W, 1]: 1 where pixels were added."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let image: Tensor = ctx.input("image")?;
        let (h, w, c) = image_layout(image.shape())?;
        check_cpu_data(&image, "image")?;
        let src: Vec<f32> = match image.dtype() {
            DType::F32 => image.as_f32()?.to_vec(),
            DType::U8 => image
                .bytes()
                .iter()
                .map(|&v| f32::from(v) / 255.0)
                .collect(),
            other => bail!(
                "images are padded from f32 or u8 samples, not {}",
                other.name()
            ),
        };
        let pad = |name: &str| -> Result<usize> { Ok(ctx.input::<i64>(name)?.max(0) as usize) };
        let (l, t, r, b) = (pad("left")?, pad("top")?, pad("right")?, pad("bottom")?);
        let feather = pad("feather")?;
        let (hh, ww) = (h + t + b, w + l + r);
        if hh * ww > 1 << 28 {
            bail!("the padded image would be {ww}x{hh} pixels: too large");
        }
        let mut out = Vec::with_capacity(hh * ww * c);
        let mut mask = Vec::with_capacity(hh * ww);
        for y in 0..hh {
            let sy = y.saturating_sub(t).min(h - 1);
            for x in 0..ww {
                let sx = x.saturating_sub(l).min(w - 1);
                out.extend_from_slice(&src[(sy * w + sx) * c..(sy * w + sx + 1) * c]);
                let inside = y >= t && y < t + h && x >= l && x < l + w;
                let m = if !inside {
                    1.0
                } else if feather > 0 {
                    // Distance to the nearest added border, in pixels of the original.
                    let d = [
                        (l > 0).then(|| x - l),
                        (t > 0).then(|| y - t),
                        (r > 0).then(|| l + w - 1 - x),
                        (b > 0).then(|| t + h - 1 - y),
                    ]
                    .into_iter()
                    .flatten()
                    .min();
                    match d {
                        Some(d) if d < feather => 1.0 - (d + 1) as f32 / (feather + 1) as f32,
                        _ => 0.0,
                    }
                } else {
                    0.0
                };
                mask.push(m);
            }
        }
        ctx.set_output("image", Tensor::from_f32(Kind::Image, &[hh, ww, c], &out)?)?;
        ctx.set_output("mask", Tensor::from_f32(Kind::Image, &[hh, ww, 1], &mask)?)
    }
}

/// A mask pixel's value: the luminance of 3 or more channels (Rec. 601, as PIL's `convert("L")`
/// that diffusers' mask processor runs), else its first channel.
pub fn mask_value(pixel: &[f32]) -> f32 {
    if pixel.len() >= 3 {
        0.299 * pixel[0] + 0.587 * pixel[1] + 0.114 * pixel[2]
    } else {
        pixel[0]
    }
}

/// `MaskImage`: an image with the region a mask repaints set to grey, the masked image that
/// dedicated inpainting models take (through VAEEncode) beside the mask.
#[derive(Default)]
pub struct MaskImage;

impl Node for MaskImage {
    fn schema() -> NodeSchema {
        NodeSchema::new("MaskImage")
            .category("image")
            .doc(
                "Sets the pixels where the mask is ≥ 0.5 (its luminance, or its one channel) to \
                 grey, 0.5, which the VAE sees as 0: diffusers' `image * (mask < 0.5)` in [-1, 1]. \
                 VAEEncode of the result is a dedicated inpainting model's masked_latent.",
            )
            .input(
                Port::new("image", "Image")
                    .doc("An f32 image [height, width, channels] in [0, 1] (LoadImage)."),
            )
            .input(
                Port::new("mask", "Image")
                    .doc("An image of the same height and width: white repaints."),
            )
            .output(Port::new("image", "Image").doc("The image with the masked region grey."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let image: Tensor = ctx.input("image")?;
        let mask: Tensor = ctx.input("mask")?;
        let (h, w, c) = image_layout(image.shape())?;
        let (mh, mw, mc) = image_layout(mask.shape())?;
        if (mh, mw) != (h, w) {
            bail!(
                "the mask is {mw}x{mh} but the image is {w}x{h}: give a mask of the image's size"
            );
        }
        let unit = |t: &Tensor, what: &str| -> Result<Vec<f32>> {
            check_cpu_data(t, what)?;
            match t.dtype() {
                DType::F32 => Ok(t.as_f32()?.to_vec()),
                DType::U8 => Ok(t.bytes().iter().map(|&v| f32::from(v) / 255.0).collect()),
                other => bail!(
                    "the {what} must hold f32 or u8 samples, not {}",
                    other.name()
                ),
            }
        };
        let mut out = unit(&image, "image")?;
        let m = unit(&mask, "mask")?;
        for p in 0..h * w {
            if mask_value(&m[p * mc..(p + 1) * mc]) >= 0.5 {
                out[p * c..(p + 1) * c].fill(0.5);
            }
        }
        ctx.set_output("image", Tensor::from_f32(Kind::Image, &[h, w, c], &out)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_upscale_repeats_pixels() {
        // 2x1 RGB image, scale 2 -> 4x2.
        let img = [1, 2, 3, 4, 5, 6];
        let up = upscale_nearest(&img, 2, 1, 3, 2);
        assert_eq!(
            up,
            vec![1, 2, 3, 1, 2, 3, 4, 5, 6, 4, 5, 6, 1, 2, 3, 1, 2, 3, 4, 5, 6, 4, 5, 6]
        );
    }
    use std::io::Cursor;

    #[test]
    fn unit_to_u8_clamps_and_rounds() {
        assert_eq!(unit_to_u8(0.0), 0);
        assert_eq!(unit_to_u8(1.0), 255);
        assert_eq!(unit_to_u8(0.5), 128);
        assert_eq!(unit_to_u8(0.499 / 255.0), 0);
        assert_eq!(unit_to_u8(0.501 / 255.0), 1);
        assert_eq!(unit_to_u8(-3.0), 0);
        assert_eq!(unit_to_u8(7.0), 255);
        assert_eq!(unit_to_u8(f32::NAN), 0);
        assert_eq!(unit_to_u8(f32::INFINITY), 255);
        assert_eq!(unit_to_u8(f32::NEG_INFINITY), 0);
    }

    #[test]
    fn u8_survives_a_round_trip_through_unit() {
        for v in 0..=255u8 {
            assert_eq!(unit_to_u8(v as f32 / 255.0), v);
        }
    }

    #[test]
    fn layouts() {
        assert_eq!(image_layout(&[2, 3, 4]).unwrap(), (2, 3, 4));
        assert_eq!(image_layout(&[1, 2, 3, 1]).unwrap(), (2, 3, 1));
        assert!(image_layout(&[2, 2, 2, 3]).unwrap_err().0.contains("shape"));
        assert!(image_layout(&[4, 4]).unwrap_err().0.contains("shape"));
        assert!(image_layout(&[4, 4, 2])
            .unwrap_err()
            .0
            .contains("2 channels"));
        assert!(image_layout(&[0, 4, 3]).unwrap_err().0.contains("empty"));
    }

    #[test]
    fn png_round_trips_for_each_channel_count() {
        for channels in [1usize, 3, 4] {
            let (w, h) = (5, 3);
            let data: Vec<u8> = (0..w * h * channels)
                .map(|i| (i * 17 % 256) as u8)
                .collect();
            let png = encode_png(w, h, channels, &data).unwrap();
            assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
            let image = decode_png(Cursor::new(&png)).unwrap();
            assert_eq!(
                (image.width, image.height, image.channels),
                (w, h, channels)
            );
            let back: Vec<u8> = image.data.iter().map(|&v| unit_to_u8(v)).collect();
            assert_eq!(back, data);
        }
    }

    #[test]
    fn encode_checks_its_arguments() {
        assert!(encode_png(2, 2, 2, &[0; 8])
            .unwrap_err()
            .0
            .contains("2 channels"));
        assert!(encode_png(2, 2, 3, &[0; 11])
            .unwrap_err()
            .0
            .contains("11 bytes"));
    }

    fn encode_with(
        color: png::ColorType,
        depth: png::BitDepth,
        w: u32,
        h: u32,
        data: &[u8],
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, w, h);
        encoder.set_color(color);
        encoder.set_depth(depth);
        if color == png::ColorType::Indexed {
            encoder.set_palette(vec![255, 0, 0, 0, 0, 255]);
        }
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(data).unwrap();
        writer.finish().unwrap();
        out
    }

    #[test]
    fn decodes_sixteen_bit_grey() {
        let png = encode_with(
            png::ColorType::Grayscale,
            png::BitDepth::Sixteen,
            2,
            1,
            &[0xff, 0xff, 0x80, 0x00],
        );
        let image = decode_png(Cursor::new(&png)).unwrap();
        assert_eq!(image.channels, 1);
        assert_eq!(image.data, vec![1.0, 32768.0 / 65535.0]);
    }

    #[test]
    fn decodes_grey_alpha_as_rgba() {
        let png = encode_with(
            png::ColorType::GrayscaleAlpha,
            png::BitDepth::Eight,
            1,
            1,
            &[51, 255],
        );
        let image = decode_png(Cursor::new(&png)).unwrap();
        assert_eq!(image.channels, 4);
        assert_eq!(image.data, vec![0.2, 0.2, 0.2, 1.0]);
    }

    #[test]
    fn decodes_a_palette_as_rgb() {
        // Two pixels at 1 bit per index: 0b01 in the top bits of one byte.
        let png = encode_with(
            png::ColorType::Indexed,
            png::BitDepth::One,
            2,
            1,
            &[0b0100_0000],
        );
        let image = decode_png(Cursor::new(&png)).unwrap();
        assert_eq!((image.width, image.channels), (2, 3));
        assert_eq!(image.data, vec![1.0, 0.0, 0.0, 0.0, 0.0, 1.0]);
    }

    #[test]
    fn rejects_garbage() {
        let e = decode_png(Cursor::new(b"definitely not a png"))
            .unwrap_err()
            .0;
        assert!(e.contains("not a readable PNG"), "{e}");
    }
}
