//! Pixel maths shared by the image preprocessors (hint images, CLIP's image processor): an
//! image's f32 pixels, PIL's separable resampling (bilinear and bicubic, antialiased when
//! shrinking) and fitting a picture to a size (stretch, crop to cover, pad to fit).

use ditflow_plugin::{bail, DType, Kind, Result, Tensor};

/// The height, width and channel count of an image tensor `[H, W, C]` (or `[1, H, W, C]`),
/// with 1, 3 or 4 channels.
fn image_layout(shape: &[usize]) -> Result<(usize, usize, usize)> {
    let (h, w, c) = match *shape {
        [h, w, c] | [1, h, w, c] => (h, w, c),
        _ => bail!("expected an image of shape [height, width, channels], got {shape:?}"),
    };
    if !matches!(c, 1 | 3 | 4) || h == 0 || w == 0 {
        bail!("expected an image of 1, 3 or 4 channels and a non-zero size, got {shape:?}");
    }
    Ok((h, w, c))
}

/// An image's pixels: `[h, w, c]` row-major f32.
#[derive(Debug, Clone, PartialEq)]
pub struct Pixels {
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Vec<f32>,
}

impl Pixels {
    /// From an Image tensor `[H, W, C]` (f32 in [0, 1], or u8).
    pub fn from_tensor(t: &Tensor) -> Result<Pixels> {
        let (h, w, c) = image_layout(t.shape())?;
        let unit = if t.dtype() == DType::U8 {
            1.0 / 255.0
        } else {
            1.0
        };
        let data = t
            .cast(DType::F32)?
            .to_f32_vec()?
            .into_iter()
            .map(|v| v * unit)
            .collect();
        Ok(Pixels { h, w, c, data })
    }

    pub fn into_tensor(self) -> Result<Tensor> {
        Tensor::from_f32(Kind::Image, &[self.h, self.w, self.c], &self.data)
    }

    pub fn at(&self, y: usize, x: usize, ch: usize) -> f32 {
        self.data[(y * self.w + x) * self.c + ch]
    }
}

/// PIL's resampling filters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Filter {
    /// The triangle filter (`Image.BILINEAR`).
    Bilinear,
    /// Keys' cubic with a = -0.5 (`Image.BICUBIC`).
    Bicubic,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        let x = x.abs();
        match self {
            Filter::Bilinear => (1.0 - x).max(0.0),
            Filter::Bicubic => {
                let a = -0.5;
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
        }
    }
}

/// PIL's resampling weights for one axis (`ImagingResample`): for each output sample, the first
/// input index and its normalised weights. The filter widens by the scale when shrinking, so
/// downscaling averages (antialiasing).
fn resample_weights(src: usize, dst: usize, filter: Filter) -> Vec<(usize, Vec<f64>)> {
    let scale = src as f64 / dst as f64;
    let widen = scale.max(1.0);
    let support = filter.support() * widen;
    (0..dst)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            let lo = ((center - support).floor().max(0.0)) as usize;
            let hi = ((center + support).ceil() as usize).min(src);
            let ws: Vec<f64> = (lo..hi)
                .map(|j| filter.weight((j as f64 + 0.5 - center) / widen))
                .collect();
            let total: f64 = ws.iter().sum();
            let ws = if total > 0.0 {
                ws.iter().map(|w| w / total).collect()
            } else {
                ws
            };
            (lo, ws)
        })
        .collect()
}

/// Resizes to `nw × nh` with PIL's `filter` (separable: rows, then columns).
pub fn resize(p: &Pixels, nw: usize, nh: usize, filter: Filter) -> Pixels {
    let (cols, rows) = (
        resample_weights(p.w, nw, filter),
        resample_weights(p.h, nh, filter),
    );
    let mut mid = vec![0f32; p.h * nw * p.c];
    for y in 0..p.h {
        for (x, (lo, ws)) in cols.iter().enumerate() {
            for ch in 0..p.c {
                let v: f64 = ws
                    .iter()
                    .enumerate()
                    .map(|(k, w)| w * p.at(y, lo + k, ch) as f64)
                    .sum();
                mid[(y * nw + x) * p.c + ch] = v as f32;
            }
        }
    }
    let mut out = vec![0f32; nh * nw * p.c];
    for (y, (lo, ws)) in rows.iter().enumerate() {
        for x in 0..nw {
            for ch in 0..p.c {
                let v: f64 = ws
                    .iter()
                    .enumerate()
                    .map(|(k, w)| w * mid[((lo + k) * nw + x) * p.c + ch] as f64)
                    .sum();
                out[(y * nw + x) * p.c + ch] = v as f32;
            }
        }
    }
    Pixels {
        h: nh,
        w: nw,
        c: p.c,
        data: out,
    }
}

/// How [`fit`] meets the target size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fit {
    /// Resize to exactly the size (the aspect may change).
    Stretch,
    /// Resize to cover the size, then cut the centre.
    Crop,
    /// Resize to fit inside the size, then pad with black around the centre.
    Pad,
}

/// `p` at `nw × nh` by `fit`, resampled with `filter`.
pub fn fit(p: &Pixels, nw: usize, nh: usize, fit: Fit, filter: Filter) -> Pixels {
    let (sx, sy) = (nw as f64 / p.w as f64, nh as f64 / p.h as f64);
    let s = match fit {
        Fit::Stretch => return resize(p, nw, nh, filter),
        Fit::Crop => sx.max(sy),
        Fit::Pad => sx.min(sy),
    };
    let (rw, rh) = (
        ((p.w as f64 * s).round() as usize).max(1),
        ((p.h as f64 * s).round() as usize).max(1),
    );
    let r = resize(p, rw, rh, filter);
    let mut out = vec![0f32; nh * nw * p.c];
    // Offsets of the resized picture in the output (negative: cut).
    let (ox, oy) = (
        (nw as i64 - rw as i64).div_euclid(2),
        (nh as i64 - rh as i64).div_euclid(2),
    );
    for y in 0..nh {
        for x in 0..nw {
            let (ry, rx) = (y as i64 - oy, x as i64 - ox);
            if ry < 0 || rx < 0 || ry >= rh as i64 || rx >= rw as i64 {
                continue;
            }
            for ch in 0..p.c {
                out[(y * nw + x) * p.c + ch] = r.at(ry as usize, rx as usize, ch);
            }
        }
    }
    Pixels {
        h: nh,
        w: nw,
        c: p.c,
        data: out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gradient(w: usize, h: usize) -> Pixels {
        let data = (0..h)
            .flat_map(|y| (0..w).map(move |x| (x as f32 + 0.5) / w as f32 + 0.0 * y as f32))
            .collect();
        Pixels { h, w, c: 1, data }
    }

    #[test]
    fn resizing_keeps_a_linear_ramp_linear_away_from_the_borders() {
        // A ramp in x sampled at pixel centres is reproduced exactly by a normalised triangle
        // filter whose taps are symmetric about the output sample (upscaling, and downscaling
        // by whole factors) wherever it does not reach the border. Tolerance 1e-6. (Other
        // factors are checked against PIL itself in tests/parity.rs.)
        for (w, nw) in [(16, 32), (32, 16), (32, 8), (10, 25)] {
            let r = resize(&gradient(w, 4), nw, 4, Filter::Bilinear);
            let support = (w as f64 / nw as f64).max(1.0);
            for x in 0..nw {
                let center = (x as f64 + 0.5) * w as f64 / nw as f64;
                if center - support < 0.0 || center + support > w as f64 {
                    continue;
                }
                let want = center / w as f64;
                for y in 0..4 {
                    assert!(
                        (r.at(y, x, 0) as f64 - want).abs() < 1e-6,
                        "{w}->{nw} at {x}"
                    );
                }
            }
        }
    }

    #[test]
    fn fit_modes_place_the_picture() {
        let p = Pixels {
            h: 2,
            w: 4,
            c: 1,
            data: vec![1.0; 8],
        };
        // Pad to 4×4: rows 1 and 2 are the picture, rows 0 and 3 black.
        let padded = fit(&p, 4, 4, Fit::Pad, Filter::Bilinear);
        let rows: Vec<f32> = (0..4).map(|y| padded.at(y, 1, 0)).collect();
        assert_eq!(rows, [0.0, 1.0, 1.0, 0.0]);
        // Crop to 2×2: all picture.
        assert!(fit(&p, 2, 2, Fit::Crop, Filter::Bilinear)
            .data
            .iter()
            .all(|&v| (v - 1.0).abs() < 1e-6));
        assert_eq!(fit(&p, 3, 5, Fit::Stretch, Filter::Bilinear).data.len(), 15);
    }

    #[test]
    fn bicubic_weights_are_keys_cubic_and_identity_at_scale_one() {
        // a = -0.5: 1 at 0, 0 at the integers, 0.5625 at ±0.5 and -0.0625 at ±1.5.
        let f = Filter::Bicubic;
        for (x, w) in [
            (0.0, 1.0),
            (1.0, 0.0),
            (2.0, 0.0),
            (0.5, 0.5625),
            (1.5, -0.0625),
        ] {
            assert!(
                (f.weight(x) - w).abs() < 1e-12 && (f.weight(-x) - w).abs() < 1e-12,
                "{x}"
            );
        }
        let p = Pixels {
            h: 3,
            w: 5,
            c: 1,
            data: (0..15).map(|v| v as f32 * 0.1).collect(),
        };
        assert_eq!(resize(&p, 5, 3, Filter::Bicubic), p);
    }
}
