//! The statistics of the benchmark report: paired t-intervals, Fieller's interval of a ratio of
//! paired means (retention), and t-intervals on log ratios (time). The formulas and their check
//! values are in `docs/benchmarks.md` ("How the numbers are computed").

/// Two-sided confidence levels with a t table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// 90 %, the report's level.
    P90,
    /// 95 %.
    P95,
}

/// Quantiles t_{df} for df = 1..=30, then 40, 60, 120 and ∞ (two-sided 90 %: the 0.95 quantile).
const T90: [f64; 30] = [
    6.314, 2.920, 2.353, 2.132, 2.015, 1.943, 1.895, 1.860, 1.833, 1.812, 1.796, 1.782, 1.771, 1.761, 1.753, 1.746,
    1.740, 1.734, 1.729, 1.725, 1.721, 1.717, 1.714, 1.711, 1.708, 1.706, 1.703, 1.701, 1.699, 1.697,
];
const T90_TAIL: [(usize, f64); 4] = [(40, 1.684), (60, 1.671), (120, 1.658), (usize::MAX, 1.645)];
/// Two-sided 95 %: the 0.975 quantile.
const T95: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131, 2.120,
    2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
];
const T95_TAIL: [(usize, f64); 4] = [(40, 2.021), (60, 2.000), (120, 1.980), (usize::MAX, 1.960)];

/// The two-sided t quantile for `df` degrees of freedom (df ≥ 1; beyond 30 the next smaller
/// tabulated df, which errs wide).
pub fn t_quantile(level: Level, df: usize) -> f64 {
    let (table, tail) = match level {
        Level::P90 => (&T90, &T90_TAIL),
        Level::P95 => (&T95, &T95_TAIL),
    };
    if df == 0 {
        return f64::INFINITY;
    }
    if df <= table.len() {
        return table[df - 1];
    }
    let mut last = table[table.len() - 1];
    for &(at, t) in tail {
        if df < at {
            return last;
        }
        last = t;
    }
    last
}

/// Mean and sample standard deviation (n − 1); the deviation is 0 for one value.
pub fn mean_sd(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 { values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

/// A mean with its two-sided interval; the bounds are infinite with fewer than two values.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Interval {
    /// The point estimate.
    pub mean: f64,
    /// Lower bound.
    pub lo: f64,
    /// Upper bound.
    pub hi: f64,
    /// Number of values (seeds).
    pub n: usize,
}

impl Interval {
    /// Whether the interval lies entirely above (`Some(true)`), below (`Some(false)`) or around
    /// (`None`) `value`.
    pub fn versus(&self, value: f64) -> Option<bool> {
        if self.lo > value {
            Some(true)
        } else if self.hi < value {
            Some(false)
        } else {
            None
        }
    }
}

/// The t-interval of the mean of `values` (for paired differences: the differences per seed).
pub fn t_interval(values: &[f64], level: Level) -> Interval {
    let n = values.len();
    let (mean, sd) = mean_sd(values);
    if n < 2 {
        return Interval { mean, lo: f64::NEG_INFINITY, hi: f64::INFINITY, n };
    }
    let half = t_quantile(level, n - 1) * sd / (n as f64).sqrt();
    Interval { mean, lo: mean - half, hi: mean + half, n }
}

/// The geometric mean of positive `ratios` with the t-interval of their logarithms, mapped back.
pub fn log_ratio_interval(ratios: &[f64], level: Level) -> Interval {
    let logs: Vec<f64> = ratios.iter().map(|r| r.ln()).collect();
    let i = t_interval(&logs, level);
    Interval { mean: i.mean.exp(), lo: i.lo.exp(), hi: i.hi.exp(), n: i.n }
}

/// Retention θ = mean(a)/mean(b) of paired values (a = method − SGD, b = SAM − SGD per seed).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ratio {
    /// mean(a)/mean(b).
    pub theta: f64,
    /// Fieller's interval; `None` when it is unbounded (mean(b) is not distinguishable from 0 at
    /// the level, so the ratio is not defined there).
    pub bounds: Option<(f64, f64)>,
    /// Number of paired values.
    pub n: usize,
}

/// Fieller's interval of mean(a)/mean(b) for paired a, b: the θ for which the paired t-test of
/// a − θ·b does not reject 0.
pub fn fieller(a: &[f64], b: &[f64], level: Level) -> Ratio {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let (ma, _) = mean_sd(a);
    let (mb, _) = mean_sd(b);
    let theta = ma / mb;
    if n < 2 {
        return Ratio { theta, bounds: None, n };
    }
    let nf = n as f64;
    let cov = |x: &[f64], mx: f64, y: &[f64], my: f64| {
        x.iter().zip(y).map(|(x, y)| (x - mx) * (y - my)).sum::<f64>() / (nf - 1.0)
    };
    let (saa, sbb, sab) = (cov(a, ma, a, ma), cov(b, mb, b, mb), cov(a, ma, b, mb));
    let t2 = t_quantile(level, n - 1).powi(2);
    let qa = mb * mb - t2 * sbb / nf;
    let qb = -2.0 * (ma * mb - t2 * sab / nf);
    let qc = ma * ma - t2 * saa / nf;
    let disc = qb * qb - 4.0 * qa * qc;
    let bounds = (qa > 0.0 && disc >= 0.0).then(|| {
        let root = disc.sqrt();
        let (r1, r2) = ((-qb - root) / (2.0 * qa), (-qb + root) / (2.0 * qa));
        (r1.min(r2), r1.max(r2))
    });
    Ratio { theta, bounds, n }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check value of the benchmark protocol: vsam-trend's final accuracies at 09fe4d2
    /// (`docs/benchmarks.md`, "How the numbers are computed").
    #[test]
    fn fieller_matches_the_check_value() {
        let (m, sgd, sam) = ([79.46, 79.86, 81.60], [71.44, 74.84, 73.20], [75.96, 78.82, 78.26]);
        let a: Vec<f64> = m.iter().zip(&sgd).map(|(m, s)| m - s).collect();
        let b: Vec<f64> = sam.iter().zip(&sgd).map(|(m, s)| m - s).collect();
        let r90 = fieller(&a, &b, Level::P90);
        assert!((r90.theta - 1.58).abs() < 0.005, "{r90:?}");
        let (lo, hi) = r90.bounds.expect("bounded at 90 %");
        assert!((lo - 1.08).abs() < 0.005 && (hi - 1.95).abs() < 0.005, "{lo} {hi}");
        let (lo, hi) = fieller(&a, &b, Level::P95).bounds.expect("bounded at 95 %");
        assert!((lo - 0.77).abs() < 0.005 && (hi - 2.10).abs() < 0.005, "{lo} {hi}");
    }

    #[test]
    fn fieller_is_unbounded_when_the_denominator_is_noise() {
        let r = fieller(&[1.0, -1.0, 0.5], &[0.2, -0.3, 0.1], Level::P90);
        assert_eq!(r.bounds, None);
    }

    #[test]
    fn t_interval_uses_the_tabulated_quantile() {
        // n = 10: mean 4.5, sd √(55/6); half width 1.833·sd/√10.
        let v: Vec<f64> = (0..10).map(f64::from).collect();
        let i = t_interval(&v, Level::P90);
        let half = 1.833 * (55.0f64 / 6.0).sqrt() / 10f64.sqrt();
        assert!((i.mean - 4.5).abs() < 1e-12 && (i.hi - 4.5 - half).abs() < 1e-9 && (4.5 - i.lo - half).abs() < 1e-9);
        assert_eq!(t_interval(&[1.0], Level::P90).lo, f64::NEG_INFINITY);
        assert_eq!(t_quantile(Level::P90, 19), 1.729);
        assert_eq!(t_quantile(Level::P90, 35), 1.697);
        assert_eq!(t_quantile(Level::P90, 1000), 1.658);
        assert_eq!(t_quantile(Level::P95, 2), 4.303);
    }

    #[test]
    fn log_ratio_interval_is_geometric() {
        let i = log_ratio_interval(&[0.5, 2.0], Level::P90);
        assert!((i.mean - 1.0).abs() < 1e-12 && i.lo < 1.0 && i.hi > 1.0 && (i.lo * i.hi - 1.0).abs() < 1e-9);
        assert_eq!(i.versus(1.0), None);
        // Reference: python3 -c "import math,statistics as s; l=[math.log(x) for x in (1.1,1.2,1.3)];
        // m=s.mean(l); h=2.920*s.stdev(l)/3**.5; print(math.exp(m),math.exp(m-h),math.exp(m+h))"
        let j = log_ratio_interval(&[1.1, 1.2, 1.3], Level::P90);
        for (got, want) in [(j.mean, 1.197_215_767), (j.lo, 1.039_919_4), (j.hi, 1.378_304_9)] {
            assert!((got - want).abs() < 1e-4, "{got} != {want}");
        }
        assert_eq!(j.versus(1.0), Some(true));
        assert_eq!(j.versus(1.5), Some(false));
    }
}
