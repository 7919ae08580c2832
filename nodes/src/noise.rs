//! Noise nodes: `RandomNoise` makes seeded standard-normal latents with the host's counter-based
//! RNG, and `NoiseToImage` maps a latent's first channels to an RGB image to look at it. The
//! pixel mapping is a plain function ([`latent_rows_to_rgb`]).

use crate::tensor::{check_cpu_data, dim_input};
use ditflow_plugin::prelude::*;

/// The most elements `RandomNoise` makes (4 GiB of f32): larger requests are an error rather than
/// an allocation that could take the whole machine's memory.
const MAX_NOISE_ELEMENTS: usize = 1 << 30;

/// `RandomNoise`: a seeded standard-normal latent.
#[derive(Default)]
pub struct RandomNoise;

impl Node for RandomNoise {
    fn schema() -> NodeSchema {
        NodeSchema::new("RandomNoise")
            .category("noise")
            .doc(
                "Standard-normal noise of shape [batch, channels, height, width], drawn from the \
                 host's counter-based RNG: the same seed gives the same tensor, bit for bit, on \
                 every device and every run, so it is cached like any deterministic node.",
            )
            .input(
                Port::new("seed", "Int").default(0i64).doc(
                    "The noise seed; negative seeds are taken as their 64-bit two's complement.",
                ),
            )
            .input(
                Port::new("width", "Int")
                    .default(64i64)
                    .range(1.0, 4096.0)
                    .doc("Width in latent pixels."),
            )
            .input(
                Port::new("height", "Int")
                    .default(64i64)
                    .range(1.0, 4096.0)
                    .doc("Height in latent pixels."),
            )
            .input(
                Port::new("channels", "Int")
                    .default(4i64)
                    .range(1.0, 64.0)
                    .doc("Latent channels."),
            )
            .input(
                Port::new("batch", "Int")
                    .default(1i64)
                    .range(1.0, 64.0)
                    .doc("How many samples."),
            )
            .output(Port::new("noise", "Latent").doc(
                "An f32 latent of shape [batch, channels, height, width], N(0, 1) per element.",
            ))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let seed: i64 = ctx.input("seed")?;
        let width = dim_input(ctx, "width", 4096)?;
        let height = dim_input(ctx, "height", 4096)?;
        let channels = dim_input(ctx, "channels", 64)?;
        let batch = dim_input(ctx, "batch", 64)?;
        let shape = [batch, channels, height, width];
        if shape.iter().product::<usize>() > MAX_NOISE_ELEMENTS {
            bail!(
                "noise of shape {shape:?} would hold more than {MAX_NOISE_ELEMENTS} elements; \
                 make it smaller"
            );
        }
        let noise = Tensor::randn(Kind::Latent, &shape, seed as u64)?;
        ctx.set_output("noise", noise)
    }
}

/// Rows per progress step and cancellation check in `NoiseToImage`.
const ROW_BLOCK: usize = 32;

/// One latent sample: `[channels, height, width]` row-major f32 values.
#[derive(Debug, Clone, Copy)]
pub struct Sample<'a> {
    pub data: &'a [f32],
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

/// Writes rows `rows` of an RGB image (`[H, W, 3]` row-major; `out` holds exactly those rows)
/// from one latent sample with at least one channel.
///
/// Channels 0, 1, 2 become red, green, blue (with fewer than three channels the last one is
/// repeated); each value maps through `clamp(offset + scale * x, 0, 1)`, NaN to 0.
pub fn latent_rows_to_rgb(
    sample: Sample<'_>,
    rows: std::ops::Range<usize>,
    scale: f32,
    offset: f32,
    out: &mut [f32],
) {
    let Sample {
        data,
        channels,
        height,
        width,
    } = sample;
    assert!(channels >= 1 && data.len() == channels * height * width);
    assert!(rows.end <= height && out.len() == rows.len() * width * 3);
    let plane = height * width;
    for (rgb, channel) in (0..3).map(|c| (c, c.min(channels - 1))) {
        let src = &data[channel * plane..(channel + 1) * plane];
        for (r, y) in rows.clone().enumerate() {
            let src_row = &src[y * width..(y + 1) * width];
            let dst_row = &mut out[r * width * 3..(r + 1) * width * 3];
            for (x, &v) in src_row.iter().enumerate() {
                dst_row[x * 3 + rgb] = unit(offset + scale * v);
            }
        }
    }
}

/// Clamps to [0, 1], mapping NaN to 0.
fn unit(v: f32) -> f32 {
    if v.is_nan() {
        0.0
    } else {
        v.clamp(0.0, 1.0)
    }
}

/// `NoiseToImage`: a viewable RGB image of a latent.
#[derive(Default)]
pub struct NoiseToImage;

impl Node for NoiseToImage {
    fn schema() -> NodeSchema {
        NodeSchema::new("NoiseToImage")
            .category("image")
            .doc(
                "Visualises a latent: takes the first sample of the batch and maps channels 0, 1 \
                 and 2 to red, green and blue (repeating the last channel when there are fewer \
                 than three) through clamp(offset + scale * x, 0, 1).",
            )
            .input(
                Port::new("latent", "Latent")
                    .doc("An f32 latent of shape [batch, channels, height, width] (or [channels, height, width])."),
            )
            .input(Port::new("scale", "Float").default(0.25).doc("Multiplies each latent value."))
            .input(Port::new("offset", "Float").default(0.5).doc("Added after scaling; 0.5 puts zero at mid-grey."))
            .output(Port::new("image", "Image").doc("An f32 RGB image of shape [height, width, 3] in [0, 1]."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let latent: Tensor = ctx.input("latent")?;
        let scale: f64 = ctx.input("scale")?;
        let offset: f64 = ctx.input("offset")?;
        let (channels, height, width) = match *latent.shape() {
            [_, c, h, w] | [c, h, w] => (c, h, w),
            ref shape => {
                bail!("expected a latent of shape [batch, channels, height, width], got {shape:?}")
            }
        };
        if latent.numel() == 0 {
            bail!("the latent is empty (shape {:?})", latent.shape());
        }
        let data = latent
            .as_f32()
            .map_err(|e| Error(format!("input 'latent': {e}")))?;
        check_cpu_data(&latent, "latent")?;
        let sample = Sample {
            data: &data[..channels * height * width],
            channels,
            height,
            width,
        };

        let mut image = vec![0f32; height * width * 3];
        let blocks = height.div_ceil(ROW_BLOCK) as u64;
        for (block, out) in image.chunks_mut(ROW_BLOCK * width * 3).enumerate() {
            ctx.check_cancelled()?;
            let start = block * ROW_BLOCK;
            let rows = start..(start + ROW_BLOCK).min(height);
            let (scale, offset) = (scale as f32, offset as f32);
            latent_rows_to_rgb(sample, rows, scale, offset, out);
            ctx.progress(block as u64 + 1, blocks);
        }
        let image = Tensor::from_f32(Kind::Image, &[height, width, 3], &image)?;
        ctx.set_output("image", image)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(data: &[f32], channels: usize, height: usize, width: usize) -> Sample<'_> {
        Sample {
            data,
            channels,
            height,
            width,
        }
    }

    #[test]
    fn maps_three_channels() {
        // C=3, H=1, W=2: red = [0, 2], green = [-2, 0.5], blue = [10, NaN].
        let data = [0.0, 2.0, -2.0, 0.5, 10.0, f32::NAN];
        let mut out = [9.0f32; 6];
        latent_rows_to_rgb(sample(&data, 3, 1, 2), 0..1, 0.25, 0.5, &mut out);
        assert_eq!(out, [0.5, 0.0, 1.0, 1.0, 0.625, 0.0]);
    }

    #[test]
    fn writes_only_the_requested_rows() {
        let data = [0.0, 1.0, 2.0, 3.0]; // C=1, H=2, W=2
        let mut out = [0f32; 6];
        latent_rows_to_rgb(sample(&data, 1, 2, 2), 1..2, 0.25, 0.0, &mut out);
        assert_eq!(out, [0.5, 0.5, 0.5, 0.75, 0.75, 0.75]);
    }

    #[test]
    fn repeats_the_last_channel() {
        let data = [0.0, 1.0]; // C=2, H=1, W=1
        let mut out = [0f32; 3];
        latent_rows_to_rgb(sample(&data, 2, 1, 1), 0..1, 0.5, 0.0, &mut out);
        assert_eq!(out, [0.0, 0.5, 0.5]);
    }

    #[test]
    fn ignores_extra_channels() {
        let data = [0.125, 0.25, 0.5, 0.875]; // C=4, H=1, W=1
        let mut out = [0f32; 3];
        latent_rows_to_rgb(sample(&data, 4, 1, 1), 0..1, 1.0, 0.0, &mut out);
        assert_eq!(out, [0.125, 0.25, 0.5]);
    }
}
