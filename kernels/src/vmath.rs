//! Vectorisable f32 elementary functions and the row loops that use them most (softmax
//! rows, vocabulary-wide log-sum-exp, SiLU, GELU). libm's scalar `expf`/`erff` cost more
//! than the matrix products on small models; these are branch-free polynomials the
//! compiler turns into SIMD code, compiled for AVX-512 and AVX2+FMA and chosen at run time.
//!
//! Accuracy (checked in the tests against f64): `exp` within 2 ulp over [-87, 88], `erf`
//! within 5e-7 absolute (Abramowitz and Stegun 7.1.26: 1.5e-7, plus f32 rounding). Both
//! are far inside what a perplexity needs: the golden tests agree with transformers to
//! about 1e-7 relative.

/// e^x for x in about [-87.3, 88.7] (clamped outside), Cephes' `expf` polynomial.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    let n = (x * std::f32::consts::LOG2_E).round_ties_even();
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let p = 1.987_569_1e-4f32;
    let p = p.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 0.5);
    let y = p.mul_add(r * r, r + 1.0);
    y * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// erf(x), Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / 0.327_591_1f32.mul_add(a, 1.0);
    let poly = 1.061_405_4f32;
    let poly = poly.mul_add(t, -1.453_152_1);
    let poly = poly.mul_add(t, 1.421_413_8);
    let poly = poly.mul_add(t, -0.284_496_74);
    let poly = poly.mul_add(t, 0.254_829_6);
    let y = 1.0 - poly * t * exp(-a * a);
    y.copysign(x)
}

macro_rules! multiversion {
    ($(#[$doc:meta])* pub fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,fma")]
                unsafe fn v512($($arg: $ty),*) $(-> $ret)? { generic($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v256($($arg: $ty),*) $(-> $ret)? { generic($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") {
                    // SAFETY: the CPU has the features this variant was compiled for.
                    return unsafe { v512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: as above.
                    return unsafe { v256($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}

/// Independent f32 accumulators: a float sum only vectorises when its lanes are explicit
/// (the compiler may not reassociate one running sum).
const LANES: usize = 16;

/// Sum of `f(x)` over `xs` in [`LANES`] f32 lanes, blocks of 256 added in f64; `f` may
/// also store its value (softmax).
#[inline(always)]
fn lane_sum(xs: &mut [f32], f: impl Fn(f32) -> f32, store: bool) -> f64 {
    let mut total = 0.0f64;
    for block in xs.chunks_mut(256) {
        let mut acc = [0.0f32; LANES];
        let mut chunks = block.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for (a, x) in acc.iter_mut().zip(c.iter_mut()) {
                let y = f(*x);
                if store {
                    *x = y;
                }
                *a += y;
            }
        }
        for x in chunks.into_remainder() {
            let y = f(*x);
            if store {
                *x = y;
            }
            acc[0] += y;
        }
        total += acc.iter().map(|&a| a as f64).sum::<f64>();
    }
    total
}

multiversion! {
    /// `sum_i exp(x_i - max)`, accumulated in f32 lanes, blocks of 256 added in f64.
    pub fn exp_sum(row: &[f32], max: f32) -> f64 {
        let mut total = 0.0f64;
        let mut buf = [0.0f32; 256];
        for block in row.chunks(256) {
            let b = &mut buf[..block.len()];
            b.copy_from_slice(block);
            total += lane_sum(b, |x| exp(x - max), false);
        }
        total
    }
}

multiversion! {
    /// Softmax of one row in place (max-shifted, normalised by an f64 sum).
    pub fn softmax(row: &mut [f32]) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let total = lane_sum(row, |x| exp(x - max), true);
        let inv = (1.0 / total) as f32;
        row.iter_mut().for_each(|x| *x *= inv);
    }
}

multiversion! {
    /// `gate = silu(gate) * up`.
    pub fn silu_mul(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = *g / (1.0 + exp(-*g)) * u;
        }
    }
}

multiversion! {
    /// `x = silu(x)`.
    pub fn silu(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v /= 1.0 + exp(-*v);
        }
    }
}

multiversion! {
    /// Exact-form GELU, `0.5 x (1 + erf(x / sqrt 2))`.
    pub fn gelu(x: &mut [f32]) {
        for v in x.iter_mut() {
            *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            let ulp = f32::EPSILON as f64 * want;
            worst = worst.max((got - want).abs() / ulp);
            x += 0.001_37;
        }
        assert!(worst <= 2.0, "exp: worst error {worst} ulp");
        assert_eq!(exp(-1000.0), exp(-87.3));
    }

    #[test]
    fn erf_is_within_5e7() {
        let mut x = -6.0f32;
        while x < 6.0 {
            let want = libm::erf(x as f64);
            assert!(
                (erf(x) as f64 - want).abs() < 5e-7,
                "erf({x}): {} vs {want}",
                erf(x)
            );
            x += 0.000_97;
        }
    }

    #[test]
    fn row_functions_match_scalar_definitions() {
        let row: Vec<f32> = (0..1000)
            .map(|i| ((i * 37) % 101) as f32 / 7.0 - 6.0)
            .collect();
        let max = row.iter().copied().fold(f32::MIN, f32::max);
        let want: f64 = row.iter().map(|&x| (x as f64 - max as f64).exp()).sum();
        assert!((exp_sum(&row, max) - want).abs() / want < 1e-6);
        let mut s = row.clone();
        softmax(&mut s);
        for (p, &x) in s.iter().zip(&row) {
            let w = (x as f64 - max as f64).exp() / want;
            assert!((*p as f64 - w).abs() < 1e-6 * w.max(1e-3));
        }
        let mut g = row.clone();
        gelu(&mut g);
        for (v, &x) in g.iter().zip(&row) {
            let w = 0.5 * x as f64 * (1.0 + libm::erf(x as f64 / std::f64::consts::SQRT_2));
            assert!((*v as f64 - w).abs() < 1e-6 * (1.0 + w.abs()), "gelu({x})");
        }
        let mut a = row.clone();
        silu_mul(&mut a, &row);
        for (v, &x) in a.iter().zip(&row) {
            let w = x as f64 / (1.0 + (-x as f64).exp()) * x as f64;
            assert!((*v as f64 - w).abs() < 1e-5 * (1.0 + w.abs()), "silu({x})");
        }
    }
}
