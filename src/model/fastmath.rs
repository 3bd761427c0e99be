//! Branch-free `exp` and `erf` for f32, written so that loops over slices vectorise.
//!
//! libm's `expf` and `erff` are scalar calls with branches (and `expf` takes a slow path on
//! underflow, which every softmax over a large vocabulary hits); in the kernels' elementwise
//! loops they cost more than the memory traffic. These versions are a few multiply-adds and
//! selects, accurate to a few units in the last place (`exp`) and 4e-7 absolute (`erf`); the
//! tests at the bottom measure both against f64 over their whole useful range.

/// `log2(e)`.
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// `ln 2` split in a part exact in f32 and a correction (Cody and Waite's reduction).
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// Below this `exp` returns 0 (`e^-87.3` is the smallest normal f32); above the upper bound
/// it returns infinity (f32 overflows at 88.72).
const EXP_MIN: f32 = -87.0;
const EXP_MAX: f32 = 88.0;
/// `1.5 · 2^23`: adding it rounds an f32 of magnitude below 2^22 to an integer.
const ROUND: f32 = 12_582_912.0;

/// `e^x` for f32, relative error below 2e-7 (0 for `x < -87`, `+inf` beyond 88, NaN for
/// NaN).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let clamped = x.clamp(EXP_MIN, EXP_MAX);
    // x = n ln2 + r with |r| <= ln2 / 2, so e^x = 2^n e^r.
    let n = (clamped * LOG2_E + ROUND) - ROUND;
    let r = (clamped - n * LN2_HI) - n * LN2_LO;
    // e^r by its Taylor series to r^7 / 7!: the remainder is below 3e-9 on |r| <= 0.347.
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n built in the exponent bits; n is in [-126, 127], so the scale is a normal f32.
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    let y = p * scale;
    let y = if x < EXP_MIN { 0.0 } else { y };
    let y = if x > EXP_MAX { f32::INFINITY } else { y };
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// `erf(x)` for f32, absolute error below 4e-7: its Maclaurin series to `x^11` for `|x| <
/// 0.5`, else Abramowitz and Stegun 7.1.26 (`1 − (a1 t + … + a5 t^5) e^{−x²}`, `t = 1 / (1 +
/// p |x|)`), odd in `x`.
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    erf_with_gaussian(x, exp(-x * x))
}

/// [`erf`] given `e^{−x²}` already computed (GELU needs that factor for its slope too).
#[inline(always)]
fn erf_with_gaussian(x: f32, gaussian: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152_1,
        1.061_405_4,
    ];
    // erf(x) = 2/√π · (x − x³/3 + x⁵/10 − x⁷/42 + x⁹/216 − x¹¹/1320 + …)
    const F: f32 = std::f32::consts::FRAC_2_SQRT_PI;
    const M: [f32; 6] = [F, -F / 3.0, F / 10.0, -F / 42.0, F / 216.0, -F / 1320.0];
    let ax = x.abs();
    let t = 1.0 / (1.0 + P * ax);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let tail = (1.0 - poly * gaussian).copysign(x);
    let x2 = x * x;
    let series = x * (M[0] + x2 * (M[1] + x2 * (M[2] + x2 * (M[3] + x2 * (M[4] + x2 * M[5])))));
    if ax < 0.5 {
        series
    } else {
        tail
    }
}

/// The sum of `values`, over sixteen independent partial sums so that the loop vectorises
/// (a single running f32 sum cannot be reordered, so it would not).
#[inline]
pub fn sum(values: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut lanes = [0f32; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (l, v) in lanes.iter_mut().zip(chunk) {
            *l += v;
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    lanes.iter().sum::<f32>() + tail
}

/// Exact (erf) GELU and its slope: `x Φ(x)` and `Φ(x) + x φ(x)`.
#[inline(always)]
pub fn gelu_erf(x: f32) -> (f32, f32) {
    const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;
    let gaussian = exp(-0.5 * x * x);
    let cdf = 0.5 * (1.0 + erf_with_gaussian(x * std::f32::consts::FRAC_1_SQRT_2, gaussian));
    (x * cdf, cdf + x * FRAC_1_SQRT_2PI * gaussian)
}

/// `tanh(x)` as `1 − 2 / (e^{2x} + 1)`.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

/// tanh-approximated GELU and its slope: `x (1 + tanh(c (x + a x³))) / 2`.
#[inline(always)]
pub fn gelu_tanh(x: f32) -> (f32, f32) {
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    const A: f32 = 0.044_715;
    let t = tanh(C * (x + A * x * x * x));
    let slope = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * C * (1.0 + 3.0 * A * x * x);
    (0.5 * x * (1.0 + t), slope)
}

/// SiLU and its slope: `x σ(x)` and `σ(x) (1 + x (1 − σ(x)))`.
#[inline(always)]
pub fn silu(x: f32) -> (f32, f32) {
    let s = 1.0 / (1.0 + exp(-x));
    (x * s, s * (1.0 + x * (1.0 - s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn erf64(x: f64) -> f64 {
        // erf by its Maclaurin series (|x| <= 3) or its asymptotic complement, in f64: far
        // more accurate than the f32 function under test.
        if x.abs() > 3.0 {
            let mut term = 1.0;
            let mut sum = 1.0;
            for k in 1..12 {
                term *= -((2 * k - 1) as f64) / (2.0 * x * x);
                sum += term;
            }
            let tail = (-x * x).exp() / (x.abs() * std::f64::consts::PI.sqrt()) * sum;
            return (1.0 - tail).copysign(x);
        }
        let mut term = x;
        let mut sum = x;
        for n in 1..200 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    fn grid(lo: f32, hi: f32, n: usize) -> impl Iterator<Item = f32> {
        (0..=n).map(move |i| lo + (hi - lo) * i as f32 / n as f32)
    }

    #[test]
    fn exp_is_within_a_few_ulp_of_f64_over_the_normal_range() {
        let mut worst = 0f64;
        for x in grid(-87.0, 88.0, 2_000_000) {
            let exact = (x as f64).exp();
            let rel = ((exp(x) as f64 - exact) / exact).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 2e-7, "worst relative error {worst}");
    }

    #[test]
    fn exp_handles_the_edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-1000.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(1000.0), f32::INFINITY);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn erf_is_within_4e7_of_f64_and_odd() {
        let mut worst = 0f64;
        for x in grid(-6.0, 6.0, 600_000) {
            worst = worst.max((erf(x) as f64 - erf64(x as f64)).abs());
            assert_eq!(erf(-x), -erf(x));
        }
        assert!(worst < 4e-7, "worst absolute error {worst}");
        assert_eq!(erf(f32::INFINITY), 1.0);
    }

    #[test]
    fn activations_and_their_slopes_match_f64_and_finite_differences() {
        for x in grid(-8.0, 8.0, 1600) {
            let x64 = x as f64;
            let gelu64 = |v: f64| 0.5 * v * (1.0 + erf64(v / std::f64::consts::SQRT_2));
            let silu64 = |v: f64| v / (1.0 + (-v).exp());
            let tanh64 = |v: f64| {
                let c = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * v * (1.0 + (c * (v + 0.044_715 * v * v * v)).tanh())
            };
            let h = 1e-4;
            for (name, (value, slope), f) in [
                ("gelu", gelu_erf(x), &gelu64 as &dyn Fn(f64) -> f64),
                ("silu", silu(x), &silu64),
                ("gelu_tanh", gelu_tanh(x), &tanh64),
            ] {
                assert!((value as f64 - f(x64)).abs() < 1e-6, "{name}({x})");
                let numeric = (f(x64 + h) - f(x64 - h)) / (2.0 * h);
                assert!((slope as f64 - numeric).abs() < 1e-5, "{name}'({x})");
            }
        }
    }
}
