//! Elementwise kernels on the CPU: unary maths and activations, broadcasting binary arithmetic,
//! `x·a + b` with scalars, and the gated residual `x + gate ⊙ y` of adaLN blocks.

use super::{rows_per_task, simd, Activation};
use rayon::prelude::*;

/// A unary function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unary {
    Neg,
    Exp,
    Log,
    Sqrt,
    Rsqrt,
    Abs,
    Tanh,
    Sigmoid,
    Square,
    Sin,
    Cos,
    Act(Activation),
}

impl Unary {
    pub fn parse(name: &str) -> Option<Unary> {
        Some(match name {
            "neg" => Unary::Neg,
            "exp" => Unary::Exp,
            "log" => Unary::Log,
            "sqrt" => Unary::Sqrt,
            "rsqrt" => Unary::Rsqrt,
            "abs" => Unary::Abs,
            "tanh" => Unary::Tanh,
            "sigmoid" => Unary::Sigmoid,
            "square" => Unary::Square,
            "sin" => Unary::Sin,
            "cos" => Unary::Cos,
            other => Unary::Act(Activation::parse(other)?),
        })
    }

    fn scalar(self, x: f32) -> f32 {
        match self {
            Unary::Neg => -x,
            Unary::Exp => x.exp(),
            Unary::Log => x.ln(),
            Unary::Sqrt => x.sqrt(),
            Unary::Rsqrt => 1.0 / x.sqrt(),
            Unary::Abs => x.abs(),
            Unary::Tanh => x.tanh(),
            Unary::Sigmoid => 1.0 / (1.0 + (-x).exp()),
            Unary::Square => x * x,
            Unary::Sin => x.sin(),
            Unary::Cos => x.cos(),
            Unary::Act(_) => unreachable!("activations run vectorised"),
        }
    }
}

/// A broadcasting binary function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binary {
    Add,
    Sub,
    Mul,
    Div,
    Max,
    Min,
    Pow,
}

impl Binary {
    pub fn parse(name: &str) -> Option<Binary> {
        Some(match name {
            "add" => Binary::Add,
            "sub" => Binary::Sub,
            "mul" => Binary::Mul,
            "div" => Binary::Div,
            "maximum" => Binary::Max,
            "minimum" => Binary::Min,
            "pow" => Binary::Pow,
            _ => return None,
        })
    }

    #[inline]
    pub fn apply(self, a: f32, b: f32) -> f32 {
        match self {
            Binary::Add => a + b,
            Binary::Sub => a - b,
            Binary::Mul => a * b,
            Binary::Div => a / b,
            Binary::Max => a.max(b),
            Binary::Min => a.min(b),
            Binary::Pow => a.powf(b),
        }
    }
}

const MIN_WORK: usize = 32 * 1024;

/// `out = f(x)`.
pub fn unary(op: Unary, x: &[f32], out: &mut [f32]) {
    let chunk = MIN_WORK.max(x.len().div_ceil(4 * rayon::current_num_threads()));
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(o, x)| {
            o.copy_from_slice(x);
            match op {
                Unary::Act(a) => simd::activate(a, o),
                op => o.iter_mut().for_each(|v| *v = op.scalar(*v)),
            }
        });
}

/// `out = x·mul + add`.
pub fn affine(x: &[f32], mul: f32, add: f32, out: &mut [f32]) {
    let chunk = MIN_WORK.max(x.len().div_ceil(4 * rayon::current_num_threads()));
    out.par_chunks_mut(chunk)
        .zip(x.par_chunks(chunk))
        .for_each(|(o, x)| o.iter_mut().zip(x).for_each(|(o, x)| *o = x * mul + add));
}

/// Broadcasting `out = a ∘ b`. `shape` is the output's; `sa`/`sb` are the element strides of `a`
/// and `b` along each output axis (0 where broadcast).
pub fn binary(
    op: Binary,
    a: &[f32],
    sa: &[usize],
    b: &[f32],
    sb: &[usize],
    shape: &[usize],
    out: &mut [f32],
) {
    let n = out.len();
    if n == 0 {
        return;
    }
    if a.len() == n && b.len() == n {
        let chunk = MIN_WORK.max(n.div_ceil(4 * rayon::current_num_threads()));
        out.par_chunks_mut(chunk).enumerate().for_each(|(c, o)| {
            let s = c * chunk;
            for (i, o) in o.iter_mut().enumerate() {
                *o = op.apply(a[s + i], b[s + i]);
            }
        });
        return;
    }
    let rank = shape.len();
    let inner = shape[rank - 1];
    let (ia, ib) = (sa[rank - 1], sb[rank - 1]);
    let rows = n / inner;
    let chunk = rows_per_task(rows, inner, MIN_WORK);
    out.par_chunks_mut(chunk * inner)
        .enumerate()
        .for_each(|(c, oc)| {
            for (ri, orow) in oc.chunks_exact_mut(inner).enumerate() {
                let mut r = c * chunk + ri;
                let (mut oa, mut ob) = (0, 0);
                for ax in (0..rank - 1).rev() {
                    let i = r % shape[ax];
                    r /= shape[ax];
                    oa += i * sa[ax];
                    ob += i * sb[ax];
                }
                match (ia, ib) {
                    (1, 1) => orow
                        .iter_mut()
                        .zip(a[oa..oa + inner].iter().zip(&b[ob..ob + inner]))
                        .for_each(|(o, (x, y))| *o = op.apply(*x, *y)),
                    (1, 0) => {
                        let y = b[ob];
                        orow.iter_mut()
                            .zip(&a[oa..oa + inner])
                            .for_each(|(o, x)| *o = op.apply(*x, y))
                    }
                    (0, 1) => {
                        let x = a[oa];
                        orow.iter_mut()
                            .zip(&b[ob..ob + inner])
                            .for_each(|(o, y)| *o = op.apply(x, *y))
                    }
                    _ => {
                        for (j, o) in orow.iter_mut().enumerate() {
                            *o = op.apply(a[oa + j * ia], b[ob + j * ib]);
                        }
                    }
                }
            }
        });
}

/// `out = x + gate ⊙ y` over rows of `d`, with `gate` holding one row of `d` per contiguous group
/// of rows (adaLN's per-sample gate).
pub fn gated_residual(
    x: &[f32],
    y: &[f32],
    gate: &[f32],
    d: usize,
    groups: usize,
    out: &mut [f32],
) {
    let rows = x.len() / d.max(1);
    if rows == 0 {
        return;
    }
    let per_group = rows / groups.max(1);
    let chunk = rows_per_task(rows, d, MIN_WORK);
    out.par_chunks_mut(chunk * d)
        .enumerate()
        .for_each(|(c, oc)| {
            for (ri, orow) in oc.chunks_exact_mut(d).enumerate() {
                let r = c * chunk + ri;
                let g = &gate[(r / per_group) * d..][..d];
                let (xr, yr) = (&x[r * d..(r + 1) * d], &y[r * d..(r + 1) * d]);
                for j in 0..d {
                    orow[j] = xr[j] + g[j] * yr[j];
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::testing::{max_rel_err, Lcg};

    #[test]
    fn broadcasting_binary_matches_reference() {
        // Exact: one f32 operation per element.
        let mut rng = Lcg(1);
        let shape = [3, 4, 5];
        let a = rng.vec(60);
        let b = rng.vec(4); // broadcast as [1, 4, 1]
        let mut out = vec![0f32; 60];
        binary(
            Binary::Sub,
            &a,
            &[20, 5, 1],
            &b,
            &[0, 1, 0],
            &shape,
            &mut out,
        );
        for i in 0..60 {
            assert_eq!(out[i], a[i] - b[(i / 5) % 4]);
        }
        let c = rng.vec(5); // [5] as [1, 1, 5]
        binary(
            Binary::Mul,
            &a,
            &[20, 5, 1],
            &c,
            &[0, 0, 1],
            &shape,
            &mut out,
        );
        for i in 0..60 {
            assert_eq!(out[i], a[i] * c[i % 5]);
        }
    }

    #[test]
    fn unary_affine_and_gated_residual() {
        let mut rng = Lcg(2);
        let x: Vec<f32> = rng.vec(100).iter().map(|v| v + 1.5).collect();
        let mut out = vec![0f32; 100];
        unary(Unary::Rsqrt, &x, &mut out);
        let want: Vec<f64> = x.iter().map(|&v| 1.0 / (v as f64).sqrt()).collect();
        assert!(max_rel_err(&out, &want) < 1e-6);
        affine(&x, 2.0, -1.0, &mut out);
        assert_eq!(out[3], x[3] * 2.0 - 1.0);
        let (y, g) = (rng.vec(100), rng.vec(20));
        gated_residual(&x, &y, &g, 10, 2, &mut out);
        assert_eq!(out[57], x[57] + g[10 + 7] * y[57]);
    }
}
