//! The optimizer configuration and its named presets.

use burn::config::Config;
use burn::optim::ModuleOptimizer;

use crate::error::{Result, SamError};
use crate::optimizer::SamOptimizer;
use crate::policy::{AeSamConfig, GatePolicy, TrendConfig, VariationConfig};
use crate::reuse::{CachePrecision, ReusePolicy};

/// Configuration of a sharpness-aware optimizer: the SAM radius, the gate that decides which
/// steps run the second pass, and what cheap steps reuse.
///
/// The defaults are vSAM as its authors run it: ρ = 0.05, the variation gate
/// ([`VariationConfig`]) and the decayed PSF reuse (β = 0.7, 6 steps). That includes the
/// authors' all-SAM warm-up of [`VariationConfig::AUTHORS_WARMUP_STEPS`] (1,173) steps, three
/// CIFAR epochs: **`SamConfig::new()` is plain SAM, at SAM's full cost, for the first 1,173 steps**
/// and for any run shorter than that. Scale the warm-up to the run with
/// [`SamConfig::vsam`]`(steps)` (e.g. three epochs of yours). Presets build the other
/// members of the family: [`SamConfig::sam`], [`SamConfig::asam`], [`SamConfig::look_sam`],
/// [`SamConfig::ae_sam`], [`SamConfig::rst`] and [`SamConfig::base_only`], and the opt-in
/// variant [`SamConfig::vsam_trend`].
///
/// See: [Sharpness-Aware Minimization for Efficiently Improving
/// Generalization](https://arxiv.org/abs/2010.01412) and [Effective Gradient Sample Size via
/// Variation Estimation for Accelerating Sharpness aware Minimization](https://arxiv.org/abs/2403.08821).
#[derive(Config, Debug, PartialEq)]
pub struct SamConfig {
    /// Radius ρ of the ascent step ε = ρ·g/‖g‖; finite and > 0 (default: 0.05).
    #[config(default = 0.05)]
    pub rho: f64,
    /// Use ASAM's scale-invariant ascent ε = ρ·T²g/‖Tg‖ with T = |w| + η (default: false).
    /// ASAM usually wants a ρ about ten times larger.
    #[config(default = false)]
    pub adaptive: bool,
    /// η in ASAM's T = |w| + η; finite and ≥ 0 (default: 0.01).
    #[config(default = 0.01)]
    pub adaptive_eta: f64,
    /// Added to the norm in the ascent's denominator; finite and > 0 (default: 1e-12).
    #[config(default = 1e-12)]
    pub eps: f64,
    /// Which steps run the second pass (default: the vSAM variation gate).
    #[config(default = "GatePolicy::default()")]
    pub policy: GatePolicy,
    /// What cheap steps add to their gradient (default: vSAM's decayed PSF).
    #[config(default = "ReusePolicy::default()")]
    pub reuse: ReusePolicy,
    /// The precision in which the reuse cache is stored between SAM steps (default:
    /// [`CachePrecision::Parameters`], the parameters' own dtype: f32 on an f32 model, half the
    /// memory on a bf16 or f16 one). Reductions and the cheap step's sum run in f32 whatever it is.
    #[config(default = "CachePrecision::Parameters")]
    pub cache_precision: CachePrecision,
    /// Number N of trailing parameter tensors (module order, counting only tensors with a
    /// gradient) over which ‖PSF‖ and ‖PSF‖/‖g‖ are measured; ≥ 1 (default: 10).
    #[config(default = 10)]
    pub stats_last_n: usize,
    /// Replace the update of a step whose loss or gradient is not finite by zeros, on the device
    /// (default: true). With `false`, cheap steps hand such gradients to the base optimizer
    /// unchanged, saving one reduction per step; SAM steps are guarded either way.
    #[config(default = true)]
    pub guard_non_finite: bool,
    /// Seed of every random draw the gate makes (default: 0).
    #[config(default = 0)]
    pub seed: u64,
}

impl SamConfig {
    /// Plain SAM: every step runs the second pass, nothing is reused.
    pub fn sam() -> Self {
        Self::new().with_policy(GatePolicy::Always).with_reuse(ReusePolicy::None)
    }

    /// ASAM (element-wise adaptive SAM) with ρ = 0.5 on every step
    /// ([Kwon et al., 2021](https://arxiv.org/abs/2102.11600)).
    pub fn asam() -> Self {
        Self::sam().with_adaptive(true).with_rho(0.5)
    }

    /// vSAM with its defaults and the given all-SAM warm-up in steps.
    pub fn vsam(warmup_steps: usize) -> Self {
        Self::new().with_policy(GatePolicy::Variation(VariationConfig::new(warmup_steps)))
    }

    /// vSAM-trend, an opt-in variant of vSAM: SAM steps placed evenly at 15 % of the steps, more
    /// while ‖PSF‖/‖g‖ is above its run average and fewer while below, with vSAM's decayed PSF
    /// reuse in between (see [`TrendConfig`]). Unlike [`SamConfig::vsam`], its statistic does not
    /// drift on noise and its response does not depend on the run's length.
    ///
    /// Measured (`docs/benchmarks-20-seeds.md`, 20 paired seeds, Fashion-MNIST with 40 % label
    /// noise): it is not distinguishable from [`SamConfig::periodic_reuse`]`(5)` at the same cost
    /// at either the validation-selected or the final epoch, and without label noise its signal
    /// asks for more SAM steps (1.30 passes per step instead of 1.20) where SAM brings nothing.
    pub fn vsam_trend() -> Self {
        Self::new().with_policy(GatePolicy::Trend(TrendConfig::new()))
    }

    /// A fixed schedule with vSAM's reuse: SAM on every `k`-th step (the first step included),
    /// the cheap steps in between reusing the decayed PSF of the last SAM step
    /// ([`ReusePolicy::DecayedPsf`], vSAM's rule: weight 0.7^j on the j-th cheap step, for at
    /// most 6 of them). No warm-up and no signal: the cost is exactly
    /// `1 + 1/k` passes per step. On the benchmark's cost–accuracy frontier (`docs/benchmarks.md`)
    /// this is the curve every adaptive gate is measured against; at `k = 5` it kept all of SAM's
    /// final-epoch gain at 0.59× SAM's time, and about two thirds of it at the
    /// validation-selected epoch (`docs/benchmarks-20-seeds.md`). Without label noise, where SAM
    /// brought nothing, it was about 0.3 pp below the base optimizer alone at both epochs: check
    /// that SAM itself helps on your data first.
    ///
    /// `k = 0` is refused by [`SamConfig::init`] (`policy.periodic.k`).
    pub fn periodic_reuse(k: usize) -> Self {
        Self::new().with_policy(GatePolicy::Periodic { k })
    }

    /// LookSAM: SAM every `k` steps, the orthogonal part of g_s reused with weight `alpha` in
    /// between.
    pub fn look_sam(k: usize, alpha: f64) -> Self {
        Self::new().with_policy(GatePolicy::Periodic { k }).with_reuse(ReusePolicy::LookSam { alpha })
    }

    /// AE-SAM over a run of `total_steps` steps.
    pub fn ae_sam(total_steps: usize) -> Self {
        Self::new().with_policy(GatePolicy::AeSam(AeSamConfig::new(total_steps))).with_reuse(ReusePolicy::None)
    }

    /// RST / SS-SAM: each step is a SAM step with probability `p`.
    pub fn rst(p: f64) -> Self {
        Self::new().with_policy(GatePolicy::Bernoulli { p }).with_reuse(ReusePolicy::None)
    }

    /// The base optimizer alone, through the same machinery (a control run).
    pub fn base_only() -> Self {
        Self::new().with_policy(GatePolicy::Never).with_reuse(ReusePolicy::None)
    }

    /// Checks every field; the error names the first invalid one and its value.
    pub fn validate(&self) -> Result<()> {
        if !(self.rho.is_finite() && self.rho > 0.0) {
            return Err(SamError::invalid("rho", self.rho, "must be finite and > 0"));
        }
        if !(self.adaptive_eta.is_finite() && self.adaptive_eta >= 0.0) {
            return Err(SamError::invalid("adaptive_eta", self.adaptive_eta, "must be finite and >= 0"));
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return Err(SamError::invalid("eps", self.eps, "must be finite and > 0"));
        }
        if self.stats_last_n == 0 {
            return Err(SamError::invalid("stats_last_n", self.stats_last_n, "must be at least 1"));
        }
        self.policy.validate()?;
        self.reuse.validate()
    }

    /// Builds the custom-loop optimizer around `base`, which applies the final direction
    /// (momentum, weight decay, clipping and parameter groups stay the base optimizer's).
    pub fn init(&self, base: impl Into<ModuleOptimizer>) -> Result<SamOptimizer> {
        SamOptimizer::new(self, base.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_authors_vsam() {
        let config = SamConfig::new();
        assert_eq!(config.rho, 0.05);
        assert_eq!(config.eps, 1e-12);
        assert!(!config.adaptive);
        assert_eq!(config.stats_last_n, 10);
        assert_eq!(config.cache_precision, CachePrecision::Parameters);
        assert_eq!(config.reuse, ReusePolicy::DecayedPsf { beta: 0.7, max_reuse: 6 });
        let GatePolicy::Variation(variation) = &config.policy else { panic!("default policy is {:?}", config.policy) };
        assert_eq!((variation.window, variation.blocks), (50, 5));
        assert_eq!(variation.max_fraction, 0.8);
        assert_eq!((variation.alpha_ratio, variation.alpha_variance), (0.13, 0.13));
        config.validate().unwrap();
    }

    #[test]
    fn periodic_reuse_is_the_fixed_schedule_with_vsams_reuse() {
        let config = SamConfig::periodic_reuse(5);
        assert_eq!(config.policy, GatePolicy::Periodic { k: 5 });
        assert_eq!(config.reuse, ReusePolicy::DecayedPsf { beta: 0.7, max_reuse: 6 });
        config.validate().unwrap();
        let error = SamConfig::periodic_reuse(0).validate().unwrap_err().to_string();
        assert!(error.contains("policy.periodic.k"), "{error}");
    }

    #[test]
    fn each_invalid_field_has_its_own_error() {
        let cases = [
            (SamConfig::new().with_rho(0.0), "rho"),
            (SamConfig::new().with_rho(-1.0), "rho"),
            (SamConfig::new().with_rho(f64::NAN), "rho"),
            (SamConfig::new().with_rho(f64::INFINITY), "rho"),
            (SamConfig::new().with_adaptive_eta(-0.1), "adaptive_eta"),
            (SamConfig::new().with_eps(0.0), "eps"),
            (SamConfig::new().with_eps(f64::NAN), "eps"),
            (SamConfig::new().with_stats_last_n(0), "stats_last_n"),
            (SamConfig::rst(1.5), "policy.bernoulli.p"),
            (SamConfig::look_sam(0, 0.7), "policy.periodic.k"),
            (SamConfig::look_sam(5, -1.0), "reuse.look_sam.alpha"),
            (
                SamConfig::new().with_reuse(ReusePolicy::DecayedPsf { beta: 1.0, max_reuse: 6 }),
                "reuse.decayed_psf.beta",
            ),
        ];
        for (config, field) in cases {
            match config.validate() {
                Err(SamError::InvalidConfig { field: f, value, .. }) => {
                    assert_eq!(f, field, "{config:?}");
                    assert!(!value.is_empty());
                }
                other => panic!("{config:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn error_message_names_field_and_value() {
        let err = SamConfig::new().with_rho(-0.5).validate().unwrap_err();
        assert_eq!(err.to_string(), "invalid configuration: `rho` = -0.5: must be finite and > 0");
    }

    #[test]
    fn config_round_trips_through_json() {
        let config = SamConfig::look_sam(5, 0.3).with_seed(9);
        let json = serde_json::to_string(&config).unwrap();
        let back: SamConfig = serde_json::from_str(&json).unwrap();
        assert_eq!(config, back);
    }
}
