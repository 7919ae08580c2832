//! Shape arithmetic shared by the op dispatcher: broadcasting, axis normalisation, `-1` in
//! reshapes, and splitting a shape into `[outer, dim, inner]` around one axis.

/// The broadcast shape of `a` and `b` (NumPy's rules), or `None` if they do not broadcast.
pub fn broadcast(a: &[usize], b: &[usize]) -> Option<Vec<usize>> {
    let rank = a.len().max(b.len());
    (0..rank)
        .map(|i| {
            let da = if i + a.len() >= rank {
                a[i + a.len() - rank]
            } else {
                1
            };
            let db = if i + b.len() >= rank {
                b[i + b.len() - rank]
            } else {
                1
            };
            match (da, db) {
                (x, y) if x == y => Some(x),
                (1, y) => Some(y),
                (x, 1) => Some(x),
                _ => None,
            }
        })
        .collect()
}

/// Element strides of `shape` (row-major) seen through the broadcast `out` shape: 0 on axes
/// where `shape` has 1 or is missing.
pub fn broadcast_strides(shape: &[usize], out: &[usize]) -> Vec<usize> {
    let own = super::super::kernels::cpu::layout::strides(shape);
    let pad = out.len() - shape.len();
    (0..out.len())
        .map(|i| {
            if i < pad || shape[i - pad] == 1 {
                0
            } else {
                own[i - pad]
            }
        })
        .collect()
}

/// Normalises a possibly negative axis for `rank`.
pub fn axis(axis: i64, rank: usize) -> Option<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    (0..r).contains(&a).then_some(a as usize)
}

/// `[outer, dim, inner]` around `axis`.
pub fn split_at_axis(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    let outer = shape[..axis].iter().product();
    let inner = shape[axis + 1..].iter().product();
    (outer, shape[axis], inner)
}

/// Resolves one `-1` in a requested shape against `numel`.
pub fn resolve_reshape(request: &[i64], numel: usize) -> Result<Vec<usize>, String> {
    let mut unknown = None;
    let mut known = 1usize;
    for (i, &d) in request.iter().enumerate() {
        match d {
            -1 if unknown.is_none() => unknown = Some(i),
            -1 => return Err("more than one -1 in the shape".into()),
            d if d < 0 => return Err(format!("negative dimension {d}")),
            d => known = known.checked_mul(d as usize).ok_or("shape overflows")?,
        }
    }
    let mut out: Vec<usize> = request.iter().map(|&d| d.max(0) as usize).collect();
    if let Some(i) = unknown {
        if known == 0 || !numel.is_multiple_of(known) {
            return Err(format!(
                "cannot infer -1: {numel} elements into {request:?}"
            ));
        }
        out[i] = numel / known;
    } else if known != numel {
        return Err(format!(
            "{request:?} holds {known} elements, the tensor has {numel}"
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcasting_and_reshape_rules() {
        assert_eq!(broadcast(&[2, 1, 4], &[3, 1]), Some(vec![2, 3, 4]));
        assert_eq!(broadcast(&[2, 3], &[4, 3]), None);
        assert_eq!(broadcast_strides(&[3, 1], &[2, 3, 4]), vec![0, 1, 0]);
        assert_eq!(axis(-1, 3), Some(2));
        assert_eq!(axis(3, 3), None);
        assert_eq!(resolve_reshape(&[2, -1], 12), Ok(vec![2, 6]));
        assert!(resolve_reshape(&[-1, -1], 12).is_err());
        assert!(resolve_reshape(&[5, -1], 12).is_err());
        assert!(resolve_reshape(&[3, 3], 12).is_err());
    }
}
