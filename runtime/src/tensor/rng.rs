//! Counter-based random numbers: Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy
//! as 1, 2, 3", SC 2011) and standard-normal noise drawn from it with Box–Muller.
//!
//! Element `i` of a noise tensor depends only on `(seed, stream, i)`: counter words 0–1 are
//! `i / 4`, words 2–3 the stream, lane `i % 4`. Any device, any thread split, any order gives the
//! same tensor for the same seed, which is what makes seeded generation reproducible across CPU
//! and CUDA. Stream 0 is a sampler's starting noise; stochastic samplers draw step `k`'s fresh
//! noise from stream `k + 1`.

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// Philox4x32 with 10 rounds: four random words for counter `ctr` under `key`.
#[inline]
pub fn philox4x32_10(mut ctr: [u32; 4], mut key: [u32; 2]) -> [u32; 4] {
    for round in 0..10 {
        if round > 0 {
            key[0] = key[0].wrapping_add(W0);
            key[1] = key[1].wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, ctr[0]);
        let (hi1, lo1) = mulhilo(M1, ctr[2]);
        ctr = [hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0];
    }
    ctr
}

/// A word as a uniform number in (0, 1]: never 0, so `ln` is finite.
#[inline]
fn uniform_open0(x: u32) -> f64 {
    (x as f64 + 1.0) * (1.0 / 4_294_967_296.0)
}

/// Four standard normals from one Philox block (Box–Muller on word pairs), computed in f64.
#[inline]
fn normals_of_block(words: [u32; 4]) -> [f32; 4] {
    let mut out = [0f32; 4];
    for pair in 0..2 {
        let u1 = uniform_open0(words[2 * pair]);
        let u2 = uniform_open0(words[2 * pair + 1]);
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = std::f64::consts::TAU * u2;
        out[2 * pair] = (r * theta.cos()) as f32;
        out[2 * pair + 1] = (r * theta.sin()) as f32;
    }
    out
}

/// Fills `out` with standard normals for `seed`, element `i` being the `i`-th of stream 0.
pub fn fill_randn(seed: u64, out: &mut [f32]) {
    fill_randn_stream(seed, 0, out)
}

/// Fills `out` with standard normals for `seed`, element `i` being the `i`-th of `stream`.
pub fn fill_randn_stream(seed: u64, stream: u64, out: &mut [f32]) {
    let key = [seed as u32, (seed >> 32) as u32];
    let (s0, s1) = (stream as u32, (stream >> 32) as u32);
    for (block, chunk) in out.chunks_mut(4).enumerate() {
        let c = block as u64;
        let normals = normals_of_block(philox4x32_10([c as u32, (c >> 32) as u32, s0, s1], key));
        chunk.copy_from_slice(&normals[..chunk.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Known-answer vectors from Random123's `kat_vectors` for philox4x32_10.
    #[test]
    fn philox_matches_random123_known_answers() {
        assert_eq!(
            philox4x32_10([0, 0, 0, 0], [0, 0]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn noise_is_a_function_of_seed_and_index_only() {
        let mut a = vec![0f32; 37];
        let mut b = vec![0f32; 100];
        fill_randn(7, &mut a);
        fill_randn(7, &mut b);
        assert_eq!(a[..], b[..37]);
        let mut c = vec![0f32; 37];
        fill_randn(8, &mut c);
        assert_ne!(a, c);
    }

    /// The step noise of the stochastic sampler fixtures is ditflow's streams 1, 2, … of their
    /// seed, replayed in NumPy by `tools/make_parity_fixtures.py` (`philox_randn`): bit for bit.
    #[test]
    fn streams_match_the_python_replay_of_the_sampler_fixtures() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/samplers/euler_ancestral_epsilon.safetensors"
        );
        let bytes = std::fs::read(path).expect("the fixture");
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("a header");
        let seed: u64 = meta.metadata().as_ref().expect("metadata")["noise_seed"]
            .parse()
            .expect("a seed");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("a safetensors file");
        let view = st.tensor("step_noise").expect("step_noise");
        let rows = view.shape()[0];
        let want: Vec<f32> = view
            .data()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32)
            .collect();
        let n = want.len() / rows;
        for k in 0..rows {
            let mut got = vec![0f32; n];
            fill_randn_stream(seed, k as u64 + 1, &mut got);
            assert_eq!(got, want[k * n..(k + 1) * n], "stream {}", k + 1);
        }
        // Stream 0 is the plain noise, and streams differ.
        let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
        fill_randn(seed, &mut a);
        fill_randn_stream(seed, 0, &mut b);
        assert_eq!(a, b);
        fill_randn_stream(seed, 1, &mut b);
        assert_ne!(a, b);
    }

    /// Moments of 1M draws against N(0, 1), with bounds of about 5 standard errors.
    #[test]
    fn noise_is_standard_normal() {
        let mut x = vec![0f32; 1 << 20];
        fill_randn(1234, &mut x);
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let kurt = x.iter().map(|&v| (v as f64 - mean).powi(4)).sum::<f64>() / n / (var * var);
        assert!(mean.abs() < 5.0 / n.sqrt(), "mean {mean}");
        assert!((var - 1.0).abs() < 5.0 * (2.0 / n).sqrt(), "var {var}");
        assert!(
            (kurt - 3.0).abs() < 5.0 * (24.0 / n).sqrt(),
            "kurtosis {kurt}"
        );
    }
}
