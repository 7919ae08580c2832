//! Hint-image preprocessors for ControlNets: `ResizeImage` (stretch, crop to cover, or pad to
//! fit, with PIL's antialiased bilinear filter), `CannyEdges` (OpenCV's `cv2.Canny`: 8-bit grey,
//! 3×3 Sobel, L1 magnitude, non-maximum suppression, hysteresis) and `GrayscaleMap` (a
//! depth-like grey map: luminance, optionally blurred, stretched to [0, 1], optionally inverted).
//! The pixel maths are plain functions on `[height, width, channels]` f32 buffers.

use crate::image::unit_to_u8;
use ditflow_nn::image::{fit, Filter, Fit, Pixels};
use ditflow_plugin::prelude::*;

/// 8-bit grey as OpenCV's `cvtColor(RGB2GRAY)` computes it (fixed-point BT.601 weights); a grey
/// image is taken as is, and alpha is ignored.
pub fn grey_u8(p: &Pixels) -> Vec<u8> {
    let u8_of = |v: f32| unit_to_u8(v) as u32;
    (0..p.h * p.w)
        .map(|i| {
            let px = &p.data[i * p.c..(i + 1) * p.c];
            if p.c < 3 {
                return u8_of(px[0]) as u8;
            }
            let (r, g, b) = (u8_of(px[0]), u8_of(px[1]), u8_of(px[2]));
            ((r * 4899 + g * 9617 + b * 1868 + (1 << 13)) >> 14) as u8
        })
        .collect()
}

/// OpenCV's `cv2.Canny(grey, low, high)` (aperture 3, L1 gradient): 255 on edges, 0 elsewhere.
pub fn canny(grey: &[u8], w: usize, h: usize, low: f64, high: f64) -> Vec<u8> {
    let (low, high) = if low > high { (high, low) } else { (low, high) };
    let (low, high) = (low.floor() as i32, high.floor() as i32);
    // 3×3 Sobel with replicated borders.
    let px = |y: i64, x: i64| -> i32 {
        let y = y.clamp(0, h as i64 - 1) as usize;
        let x = x.clamp(0, w as i64 - 1) as usize;
        grey[y * w + x] as i32
    };
    let mut dx = vec![0i32; w * h];
    let mut dy = vec![0i32; w * h];
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            let i = y as usize * w + x as usize;
            dx[i] = (px(y - 1, x + 1) + 2 * px(y, x + 1) + px(y + 1, x + 1))
                - (px(y - 1, x - 1) + 2 * px(y, x - 1) + px(y + 1, x - 1));
            dy[i] = (px(y + 1, x - 1) + 2 * px(y + 1, x) + px(y + 1, x + 1))
                - (px(y - 1, x - 1) + 2 * px(y - 1, x) + px(y - 1, x + 1));
        }
    }
    let mag: Vec<i32> = dx.iter().zip(&dy).map(|(a, b)| a.abs() + b.abs()).collect();
    // Magnitudes outside the image are 0.
    let m = |y: i64, x: i64| -> i32 {
        if y < 0 || x < 0 || y >= h as i64 || x >= w as i64 {
            0
        } else {
            mag[y as usize * w + x as usize]
        }
    };
    // Non-maximum suppression, in OpenCV's fixed point: 0 not an edge, 1 weak, 2 strong.
    const SHIFT: i64 = 15;
    let tg22 = (0.414_213_562_373_095_f64 * (1i64 << SHIFT) as f64 + 0.5) as i64;
    let mut class = vec![0u8; w * h];
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            let i = y as usize * w + x as usize;
            let v = mag[i];
            if v <= low {
                continue;
            }
            let (gx, gy) = (dx[i] as i64, dy[i] as i64);
            let (ax, ay) = (gx.abs(), gy.abs() << SHIFT);
            let tg22x = ax * tg22;
            let is_max = if ay < tg22x {
                v > m(y, x - 1) && v >= m(y, x + 1)
            } else {
                let tg67x = tg22x + (ax << (SHIFT + 1));
                if ay > tg67x {
                    v > m(y - 1, x) && v >= m(y + 1, x)
                } else {
                    let s: i64 = if (gx ^ gy) < 0 { -1 } else { 1 };
                    v > m(y - 1, x - s) && v > m(y + 1, x + s)
                }
            };
            if is_max {
                class[i] = if v > high { 2 } else { 1 };
            }
        }
    }
    // Hysteresis: weak pixels 8-connected to strong ones are edges.
    let mut out = vec![0u8; w * h];
    let mut stack: Vec<usize> = (0..w * h).filter(|&i| class[i] == 2).collect();
    for &i in &stack {
        out[i] = 255;
    }
    while let Some(i) = stack.pop() {
        let (y, x) = ((i / w) as i64, (i % w) as i64);
        for (ny, nx) in [
            (y - 1, x - 1),
            (y - 1, x),
            (y - 1, x + 1),
            (y, x - 1),
            (y, x + 1),
            (y + 1, x - 1),
            (y + 1, x),
            (y + 1, x + 1),
        ] {
            if ny < 0 || nx < 0 || ny >= h as i64 || nx >= w as i64 {
                continue;
            }
            let j = ny as usize * w + nx as usize;
            if class[j] == 1 && out[j] == 0 {
                out[j] = 255;
                stack.push(j);
            }
        }
    }
    out
}

/// A depth-like grey map: BT.601 luminance, blurred by a Gaussian of `sigma` pixels (0: none),
/// stretched to [0, 1] (a flat image becomes 0), inverted when asked; 3 equal channels.
pub fn grayscale_map(p: &Pixels, sigma: f64, invert: bool) -> Pixels {
    let mut lum: Vec<f64> = (0..p.h * p.w)
        .map(|i| {
            let px = &p.data[i * p.c..(i + 1) * p.c];
            if p.c < 3 {
                px[0] as f64
            } else {
                0.299 * px[0] as f64 + 0.587 * px[1] as f64 + 0.114 * px[2] as f64
            }
        })
        .collect();
    if sigma > 0.0 {
        let r = (3.0 * sigma).ceil() as i64;
        let k: Vec<f64> = (-r..=r)
            .map(|d| (-(d * d) as f64 / (2.0 * sigma * sigma)).exp())
            .collect();
        let norm: f64 = k.iter().sum();
        let blur = |src: &[f64], horizontal: bool| -> Vec<f64> {
            let mut out = vec![0.0; src.len()];
            for y in 0..p.h as i64 {
                for x in 0..p.w as i64 {
                    let mut acc = 0.0;
                    for (t, kv) in k.iter().enumerate() {
                        let d = t as i64 - r;
                        let (sy, sx) = if horizontal {
                            (y, (x + d).clamp(0, p.w as i64 - 1))
                        } else {
                            ((y + d).clamp(0, p.h as i64 - 1), x)
                        };
                        acc += kv * src[sy as usize * p.w + sx as usize];
                    }
                    out[y as usize * p.w + x as usize] = acc / norm;
                }
            }
            out
        };
        lum = blur(&blur(&lum, true), false);
    }
    let (lo, hi) = lum
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let span = hi - lo;
    let data = lum
        .iter()
        .flat_map(|&v| {
            let mut u = if span > 0.0 { (v - lo) / span } else { 0.0 };
            if invert {
                u = 1.0 - u;
            }
            [u as f32; 3]
        })
        .collect();
    Pixels {
        h: p.h,
        w: p.w,
        c: 3,
        data,
    }
}

/// `ResizeImage`.
#[derive(Default)]
pub struct ResizeImage;

impl Node for ResizeImage {
    fn schema() -> NodeSchema {
        NodeSchema::new("ResizeImage")
            .category("image")
            .doc(
                "Resizes an image to width × height with PIL's antialiased bilinear filter: \
                 stretch (exactly that size), crop (cover the size, cut the centre) or pad \
                 (fit inside, black around). For hint images, which must have the picture's size.",
            )
            .input(Port::new("image", "Image").doc("[height, width, channels] in [0, 1]."))
            .input(
                Port::new("width", "Int")
                    .default(1024i64)
                    .range(1.0, 16384.0)
                    .doc("Pixels."),
            )
            .input(
                Port::new("height", "Int")
                    .default(1024i64)
                    .range(1.0, 16384.0)
                    .doc("Pixels."),
            )
            .input(
                Port::new("fit", "String")
                    .default("crop")
                    .choices(&["stretch", "crop", "pad"])
                    .doc("How the aspect ratio is kept."),
            )
            .output(Port::new("image", "Image").doc("The resized image, f32 in [0, 1]."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let p = Pixels::from_tensor(&ctx.input::<Tensor>("image")?)?;
        let (w, h) = (ctx.input::<i64>("width")?, ctx.input::<i64>("height")?);
        let mode = match ctx.input::<String>("fit")?.as_str() {
            "stretch" => Fit::Stretch,
            "pad" => Fit::Pad,
            _ => Fit::Crop,
        };
        ctx.set_output(
            "image",
            fit(&p, w as usize, h as usize, mode, Filter::Bilinear).into_tensor()?,
        )
    }
}

/// `CannyEdges`.
#[derive(Default)]
pub struct CannyEdges;

impl Node for CannyEdges {
    fn schema() -> NodeSchema {
        NodeSchema::new("CannyEdges")
            .category("image")
            .doc(
                "Canny edges as OpenCV's cv2.Canny(grey, low, high) finds them (the hint of \
                 Canny ControlNets): the image in 8-bit grey, a 3×3 Sobel gradient, its L1 \
                 magnitude thinned to local maxima, kept above high and, when connected to \
                 those, above low. White edges on black, 3 channels.",
            )
            .input(Port::new("image", "Image").doc("[height, width, channels] in [0, 1]."))
            .input(
                Port::new("low", "Float")
                    .default(100.0)
                    .range(0.0, 2040.0)
                    .doc("The lower threshold (gradient units of 8-bit grey)."),
            )
            .input(
                Port::new("high", "Float")
                    .default(200.0)
                    .range(0.0, 2040.0)
                    .doc("The upper threshold."),
            )
            .output(
                Port::new("image", "Image")
                    .doc("Edges: 1 on edges, 0 elsewhere, [height, width, 3]."),
            )
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let p = Pixels::from_tensor(&ctx.input::<Tensor>("image")?)?;
        let edges = canny(
            &grey_u8(&p),
            p.w,
            p.h,
            ctx.input("low")?,
            ctx.input("high")?,
        );
        let data = edges.iter().flat_map(|&e| [e as f32 / 255.0; 3]).collect();
        ctx.set_output(
            "image",
            Pixels {
                h: p.h,
                w: p.w,
                c: 3,
                data,
            }
            .into_tensor()?,
        )
    }
}

/// `GrayscaleMap`.
#[derive(Default)]
pub struct GrayscaleMap;

impl Node for GrayscaleMap {
    fn schema() -> NodeSchema {
        NodeSchema::new("GrayscaleMap")
            .category("image")
            .doc(
                "A depth-like grey map for depth ControlNets when no depth estimator is at \
                 hand: the image's luminance (BT.601), blurred by a Gaussian of blur pixels, \
                 stretched to [0, 1] and optionally inverted (bright = near). 3 equal channels.",
            )
            .input(Port::new("image", "Image").doc("[height, width, channels] in [0, 1]."))
            .input(
                Port::new("blur", "Float")
                    .default(2.0)
                    .range(0.0, 100.0)
                    .doc("The Gaussian's sigma in pixels; 0 for none."),
            )
            .input(
                Port::new("invert", "Bool")
                    .default(false)
                    .doc("Dark becomes bright."),
            )
            .output(Port::new("image", "Image").doc("[height, width, 3] in [0, 1]."))
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let p = Pixels::from_tensor(&ctx.input::<Tensor>("image")?)?;
        let out = grayscale_map(&p, ctx.input("blur")?, ctx.input("invert")?);
        ctx.set_output("image", out.into_tensor()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canny_finds_the_edge_of_a_square_and_nothing_in_flat_areas() {
        // A bright 8×8 square on black in a 16×16 image: edges only along its border.
        let (w, h) = (16, 16);
        let grey: Vec<u8> = (0..w * h)
            .map(|i| {
                if (4..12).contains(&(i / w)) && (4..12).contains(&(i % w)) {
                    200
                } else {
                    0
                }
            })
            .collect();
        let e = canny(&grey, w, h, 100.0, 200.0);
        for y in 0..h {
            for x in 0..w {
                let near = (3..=12).contains(&y) && (3..=12).contains(&x);
                let inside = (5..11).contains(&y) && (5..11).contains(&x);
                if !near || inside {
                    assert_eq!(e[y * w + x], 0, "({y}, {x})");
                }
            }
        }
        assert!(e.iter().filter(|&&v| v == 255).count() >= 28);
    }

    #[test]
    fn grey_matches_opencvs_fixed_point_weights() {
        let p = Pixels {
            h: 1,
            w: 2,
            c: 3,
            data: vec![1.0, 0.0, 0.0, 0.2, 0.6, 1.0],
        };
        // (255·4899 + 8192) >> 14 = 76; (51·4899 + 153·9617 + 255·1868 + 8192) >> 14 = 134.
        assert_eq!(grey_u8(&p), [76, 134]);
    }

    #[test]
    fn grayscale_map_stretches_and_inverts() {
        let p = Pixels {
            h: 1,
            w: 3,
            c: 1,
            data: vec![0.2, 0.4, 0.6],
        };
        let g = grayscale_map(&p, 0.0, false);
        let got: Vec<f32> = (0..3).map(|x| g.at(0, x, 0)).collect();
        for (a, b) in got.iter().zip([0.0, 0.5, 1.0]) {
            assert!((a - b).abs() < 1e-6);
        }
        let inv = grayscale_map(&p, 0.0, true);
        assert!((inv.at(0, 0, 1) - 1.0).abs() < 1e-6);
        // A blur keeps a flat image flat (and so all 0 after stretching).
        let flat = Pixels {
            data: vec![0.5; 3],
            ..p
        };
        assert!(grayscale_map(&flat, 1.5, false)
            .data
            .iter()
            .all(|&v| v == 0.0));
    }
}
