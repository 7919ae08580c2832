//! Guidance: how a sampling step combines the model's conditional and unconditional predictions,
//! as diffusers' guiders do (`diffusers.guiders`):
//! - classifier-free guidance, `u + s·(c − u)` (`ClassifierFreeGuidance`);
//! - adaptive projected guidance (APG, Sadat et al. 2024, `AdaptiveProjectedGuidance`): the
//!   difference `c − u`, optionally averaged with momentum over the steps and capped in norm, is
//!   split into its parts parallel and orthogonal to `c`; the parallel part (which oversaturates)
//!   is scaled by `eta`: `u + s·(d⊥ + eta·d∥)`;
//! - CFG rescale (`guidance_rescale`, Lin et al. 2023, `rescale_noise_cfg`): the guided prediction
//!   rescaled to the conditional one's standard deviation, mixed by the factor;
//! - a guidance interval: guidance only on steps `⌊start·n⌋ ≤ i < ⌊stop·n⌋` of `n`; outside it the
//!   conditional prediction alone (and the sampling node skips the unconditional evaluation).
//!
//! Every norm, dot product and standard deviation is taken per batch row over all its elements,
//! in f64 (diffusers computes APG's projection in float64 too).

use crate::{fail, Result};

/// How the two predictions combine inside the interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    /// Classifier-free guidance.
    Cfg,
    /// Adaptive projected guidance.
    Apg {
        /// The weight of the difference's part parallel to the conditional prediction (1: CFG).
        eta: f64,
        /// Caps the difference's norm per row at this value (diffusers'
        /// `adaptive_projected_guidance_rescale`, 15); 0: no cap.
        norm_threshold: f64,
        /// The running average's momentum (`adaptive_projected_guidance_momentum`, diffusers'
        /// examples use −0.5); `None`: no averaging.
        momentum: Option<f64>,
    },
}

/// A guidance setting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuidanceConfig {
    pub scale: f64,
    pub method: Method,
    /// CFG rescale's mixing factor in [0, 1] (0: off).
    pub rescale: f64,
    /// The guided steps' fractions `[start, stop)` of the schedule.
    pub start: f64,
    pub stop: f64,
}

impl GuidanceConfig {
    /// Plain classifier-free guidance at `scale` on every step.
    pub fn cfg(scale: f64) -> GuidanceConfig {
        GuidanceConfig {
            scale,
            method: Method::Cfg,
            rescale: 0.0,
            start: 0.0,
            stop: 1.0,
        }
    }

    /// Refuses settings out of range, naming the setting.
    pub fn validate(&self) -> Result<()> {
        let unit = |name: &str, v: f64| -> Result<()> {
            if !(0.0..=1.0).contains(&v) {
                fail!("{name} must be in [0, 1], got {v}");
            }
            Ok(())
        };
        if !self.scale.is_finite() {
            fail!("the guidance scale must be a number, got {}", self.scale);
        }
        unit("guidance_rescale", self.rescale)?;
        unit("guidance_start", self.start)?;
        unit("guidance_stop", self.stop)?;
        if self.start > self.stop {
            fail!(
                "guidance_start {} is after guidance_stop {}",
                self.start,
                self.stop
            );
        }
        if let Method::Apg {
            eta,
            norm_threshold,
            momentum,
        } = self.method
        {
            if !eta.is_finite() || norm_threshold.is_nan() || norm_threshold < 0.0 {
                fail!("APG needs a finite eta and a norm threshold ≥ 0, got {eta} and {norm_threshold}");
            }
            if momentum.is_some_and(|m| !m.is_finite()) {
                fail!("APG's momentum must be a number");
            }
        }
        Ok(())
    }

    /// Whether step `i` of `n` is guided: inside the interval and at a scale other than 1.
    pub fn active(&self, i: usize, n: usize) -> bool {
        let (first, end) = (
            (self.start * n as f64) as usize,
            (self.stop * n as f64) as usize,
        );
        first <= i && i < end && self.scale != 1.0
    }

    /// Whether this is plain CFG on every step (the sampling node keeps its tensor path).
    pub fn is_plain(&self) -> bool {
        self.method == Method::Cfg && self.rescale == 0.0 && self.start == 0.0 && self.stop == 1.0
    }
}

/// Guidance over a run: the setting and APG's running average.
pub struct Guidance {
    pub config: GuidanceConfig,
    average: Option<Vec<f64>>,
}

impl Guidance {
    pub fn new(config: GuidanceConfig) -> Guidance {
        Guidance {
            config,
            average: None,
        }
    }

    /// The prediction of step `i` of `n` from the conditional `cond` and (inside the interval)
    /// unconditional `uncond` predictions of `rows` batch rows, laid out row after row.
    pub fn combine(
        &mut self,
        i: usize,
        n: usize,
        cond: &[f64],
        uncond: Option<&[f64]>,
        rows: usize,
    ) -> Result<Vec<f64>> {
        if rows == 0 || !cond.len().is_multiple_of(rows) {
            fail!(
                "guidance: {} values do not split into {rows} rows",
                cond.len()
            );
        }
        let c = &self.config;
        let mut pred = match (c.active(i, n), uncond) {
            (false, _) => cond.to_vec(),
            (true, None) => fail!("guidance at step {i} needs the unconditional prediction"),
            (true, Some(u)) => {
                if u.len() != cond.len() {
                    fail!(
                        "guidance: {} conditional and {} unconditional values",
                        cond.len(),
                        u.len()
                    );
                }
                let diff: Vec<f64> = cond.iter().zip(u).map(|(a, b)| a - b).collect();
                match c.method {
                    Method::Cfg => u.iter().zip(&diff).map(|(u, d)| u + c.scale * d).collect(),
                    Method::Apg {
                        eta,
                        norm_threshold,
                        momentum,
                    } => {
                        let diff = match momentum {
                            None => diff,
                            Some(m) => {
                                let avg = match self.average.take() {
                                    Some(a) if a.len() == diff.len() && i > 0 => {
                                        diff.iter().zip(&a).map(|(d, a)| d + m * a).collect()
                                    }
                                    _ => diff,
                                };
                                self.average = Some(avg.clone());
                                avg
                            }
                        };
                        let update = projected(&diff, cond, rows, eta, norm_threshold);
                        u.iter()
                            .zip(&update)
                            .map(|(u, d)| u + c.scale * d)
                            .collect()
                    }
                }
            }
        };
        if c.rescale > 0.0 {
            rescale(&mut pred, cond, rows, c.rescale);
        }
        Ok(pred)
    }
}

/// APG's update per row: the difference capped at `threshold` in norm, its part parallel to
/// `cond` weighted by `eta`.
fn projected(diff: &[f64], cond: &[f64], rows: usize, eta: f64, threshold: f64) -> Vec<f64> {
    let len = diff.len() / rows;
    let mut out = Vec::with_capacity(diff.len());
    for (d, c) in diff.chunks(len).zip(cond.chunks(len)) {
        let norm = d.iter().map(|x| x * x).sum::<f64>().sqrt();
        let cap = if threshold > 0.0 {
            (threshold / norm).min(1.0)
        } else {
            1.0
        };
        let c_norm = c.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-12);
        let dot: f64 = d.iter().zip(c).map(|(d, c)| d * cap * c / c_norm).sum();
        for (d, c) in d.iter().zip(c) {
            let parallel = dot * c / c_norm;
            let orthogonal = d * cap - parallel;
            out.push(orthogonal + eta * parallel);
        }
    }
    out
}

/// CFG rescale per row: `pred` mixed with itself rescaled to `cond`'s standard deviation.
fn rescale(pred: &mut [f64], cond: &[f64], rows: usize, factor: f64) {
    let len = pred.len() / rows;
    let std = |v: &[f64]| -> f64 {
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var =
            v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (v.len() as f64 - 1.0).max(1.0);
        var.sqrt()
    };
    for (p, c) in pred.chunks_mut(len).zip(cond.chunks(len)) {
        // A constant row has nothing to rescale (diffusers would divide by zero).
        let spread = std(p);
        if spread == 0.0 || !spread.is_finite() {
            continue;
        }
        let ratio = std(c) / spread;
        for x in p.iter_mut() {
            *x = factor * (*x * ratio) + (1.0 - factor) * *x;
        }
    }
}
