//! The methods the examples and benchmarks compare, as [`SamConfig`]s.

use burn_sam_sample::SamConfig;

/// A member of the SAM family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Method {
    /// The base optimizer alone.
    Sgd,
    /// SAM: the second pass on every step.
    Sam,
    /// ASAM: scale-invariant SAM on every step.
    Asam,
    /// vSAM: the variation gate with decayed PSF reuse, as its authors run it.
    Vsam,
    /// vSAM-trend: about 15–25 % SAM steps, more while the PSF ratio is above its run average.
    VsamTrend,
    /// LookSAM: SAM every 5 steps, the orthogonal part of g_s reused in between.
    #[value(alias = "looksam")]
    LookSam,
    /// AE-SAM: SAM when ‖g‖² is unusually large.
    #[value(alias = "aesam")]
    AeSam,
    /// RST: SAM with probability 0.5 on each step.
    Rst,
}

impl Method {
    /// Every method, in table order.
    pub const ALL: [Method; 8] = [
        Method::Sgd,
        Method::Sam,
        Method::Asam,
        Method::Vsam,
        Method::VsamTrend,
        Method::LookSam,
        Method::AeSam,
        Method::Rst,
    ];

    /// The kebab-case name used on the command line and in tables, spelled as the library
    /// names the rules (`ReusePolicy::LookSam` is `look-sam`, `GatePolicy::AeSam` is `ae-sam`);
    /// the older spellings `looksam` and `aesam` are still accepted on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Method::Sgd => "sgd",
            Method::Sam => "sam",
            Method::Asam => "asam",
            Method::Vsam => "vsam",
            Method::VsamTrend => "vsam-trend",
            Method::LookSam => "look-sam",
            Method::AeSam => "ae-sam",
            Method::Rst => "rst",
        }
    }

    /// The configuration for a run of `total_steps` steps with the given all-SAM warm-up (vSAM)
    /// and radius (`None`: 0.05, or 0.5 for ASAM).
    pub fn config(self, total_steps: usize, warmup_steps: usize, rho: Option<f64>, seed: u64) -> SamConfig {
        let config = match self {
            Method::Sgd => SamConfig::base_only(),
            Method::Sam => SamConfig::sam(),
            Method::Asam => SamConfig::asam(),
            Method::Vsam => SamConfig::vsam(warmup_steps),
            Method::VsamTrend => SamConfig::vsam_trend(),
            Method::LookSam => SamConfig::look_sam(5, 0.7),
            Method::AeSam => SamConfig::ae_sam(total_steps.max(1)),
            Method::Rst => SamConfig::rst(0.5),
        };
        let config = match rho {
            Some(rho) => config.with_rho(rho),
            None => config,
        };
        config.with_seed(seed)
    }
}

/// vSAM's all-SAM warm-up for a run of `total_steps` steps: the authors' 3 of 200 epochs (1.5 %),
/// and at least one 50-step window so that the gate has statistics to start from.
pub fn scaled_warmup(total_steps: usize) -> usize {
    // ceil(3n / 200) without forming 3n, which overflows for the longest runs.
    (total_steps / 200 * 3 + (total_steps % 200 * 3).div_ceil(200)).max(50)
}

/// The learning rate at `step` of `total_steps` under a cosine decay from `peak` to 0.
pub fn cosine_lr(peak: f64, step: usize, total_steps: usize) -> f64 {
    peak * 0.5 * (1.0 + (std::f64::consts::PI * step as f64 / total_steps.max(1) as f64).cos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scaled_warmup_is_exact_and_never_overflows() {
        for n in [0, 1, 199, 200, 201, 3_333, 10_000, 1_000_003] {
            assert_eq!(scaled_warmup(n), (n * 3).div_ceil(200).max(50), "{n}");
        }
        assert_eq!(scaled_warmup(usize::MAX), usize::MAX / 200 * 3 + (usize::MAX % 200 * 3).div_ceil(200));
    }
}
