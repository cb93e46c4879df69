//! Gating policies: which steps run SAM's second gradient pass.
//!
//! This layer is plain Rust over scalars: no tensors, no device. A [`Gate`] is asked for the
//! decision of the coming step ([`Gate::decide`]) and told the statistics of finished steps
//! ([`Gate::observe_sam`], [`Gate::observe_grad_norm_sq`]). The tensor engine drives it through
//! exactly this interface, so a gate can be unit-tested, simulated or driven by hand.

mod ae_sam;
mod trend;
mod variation;

pub use ae_sam::AeSamConfig;
pub(crate) use ae_sam::AeSamState;
pub use trend::TrendConfig;
pub(crate) use trend::TrendState;
pub use variation::VariationConfig;
pub(crate) use variation::VariationState;

use burn::config::Config;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Result, SamError};

/// Which steps compute the SAM gradient (the second forward/backward pass).
#[derive(Config, Debug, PartialEq)]
pub enum GatePolicy {
    /// Every step is a SAM step: plain SAM
    /// ([Foret et al., 2021](https://arxiv.org/abs/2010.01412)).
    Always,
    /// No step is a SAM step: the base optimizer alone.
    Never,
    /// A SAM step every `k` steps, starting with the first (LookSAM's schedule,
    /// [Liu et al., 2022](https://arxiv.org/abs/2203.02714)).
    Periodic {
        /// Period in steps (≥ 1).
        k: usize,
    },
    /// Each step is a SAM step with probability `p`, independently (RST / SS-SAM,
    /// [Zhao et al., 2022](https://arxiv.org/abs/2203.09962)).
    Bernoulli {
        /// Probability of a SAM step, in (0, 1].
        p: f64,
    },
    /// SAM when ‖g‖² is large relative to its moving statistics (AE-SAM).
    AeSam(AeSamConfig),
    /// The vSAM variation-threshold rule, as its authors run it.
    Variation(VariationConfig),
    /// vSAM's PSF-ratio signal without its drift or its dependence on the run's length (an
    /// opt-in variant; see [`TrendConfig`]).
    Trend(TrendConfig),
}

impl Default for GatePolicy {
    fn default() -> Self {
        Self::Variation(VariationConfig::new(VariationConfig::AUTHORS_WARMUP_STEPS))
    }
}

impl GatePolicy {
    /// Checks every field; the error names the first invalid one.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::Always | Self::Never => Ok(()),
            Self::Periodic { k } if *k == 0 => Err(SamError::invalid("policy.periodic.k", k, "must be at least 1")),
            Self::Periodic { .. } => Ok(()),
            Self::Bernoulli { p } if !(*p > 0.0 && *p <= 1.0) => {
                Err(SamError::invalid("policy.bernoulli.p", p, "must be in (0, 1]"))
            }
            Self::Bernoulli { .. } => Ok(()),
            Self::AeSam(config) => config.validate(),
            Self::Variation(config) => config.validate(),
            Self::Trend(config) => config.validate(),
        }
    }

    /// A short name for logs and telemetry.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Always => "always",
            Self::Never => "never",
            Self::Periodic { .. } => "periodic",
            Self::Bernoulli { .. } => "bernoulli",
            Self::AeSam(_) => "ae-sam",
            Self::Variation(_) => "variation",
            Self::Trend(_) => "trend",
        }
    }
}

/// The largest ‖PSF‖ a finite step measures: the engine sums its squares in f32, whose largest
/// value is below 2¹²⁸, so the norm is below 2⁶⁴. Restored statistics above it cannot come from
/// a run (and their squares would overflow the gate's variances).
pub(crate) const MAX_PSF_NORM: f64 = 18_446_744_073_709_551_616.0;
/// The largest ‖PSF‖/‖g‖ a finite step measures: below 2⁶⁴ over the square root of f32's
/// smallest positive value (2⁻¹⁴⁹); 2¹⁴⁰ leaves room.
pub(crate) const MAX_PSF_RATIO: f64 = MAX_PSF_NORM * MAX_PSF_NORM * 4096.0;
/// The largest ‖g‖² read from the device (f32).
pub(crate) const MAX_GRAD_NORM_SQ: f64 = f32::MAX as f64;

/// Statistics of a finished SAM step, over the last N parameter tensors.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PsfStats {
    /// ‖PSF‖ = ‖g_s − g‖ over the last N tensors.
    pub psf_norm: f64,
    /// ‖PSF‖ / ‖g‖ over the last N tensors (0 when ‖g‖ = 0 there).
    pub ratio: f64,
}

impl PsfStats {
    /// Both values are finite, non-negative and within what a finite step can measure (the
    /// engine sums squares in f32).
    pub fn is_valid(&self) -> bool {
        (0.0..=MAX_PSF_NORM).contains(&self.psf_norm) && (0.0..=MAX_PSF_RATIO).contains(&self.ratio)
    }
}

/// A gate's rule: each policy's configuration paired with the state it drives, so that a rule
/// can never meet the state of another.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) enum Rule {
    /// Every step is a SAM step.
    Always,
    /// No step is a SAM step.
    Never,
    /// A SAM step every `k` steps.
    Periodic {
        /// Period in steps.
        k: usize,
    },
    /// A SAM step with probability `p`.
    Bernoulli {
        /// Probability of a SAM step.
        p: f64,
    },
    /// AE-SAM and its moving statistics.
    AeSam(AeSamConfig, AeSamState),
    /// The vSAM rule and its window, quota and histories.
    Variation(VariationConfig, VariationState),
    /// The trend gate and its rate, credit and log-ratio level.
    Trend(TrendConfig, TrendState),
}

impl Rule {
    fn fresh(policy: GatePolicy) -> Self {
        match policy {
            GatePolicy::Always => Self::Always,
            GatePolicy::Never => Self::Never,
            GatePolicy::Periodic { k } => Self::Periodic { k },
            GatePolicy::Bernoulli { p } => Self::Bernoulli { p },
            GatePolicy::AeSam(config) => Self::AeSam(config, AeSamState::default()),
            GatePolicy::Variation(config) => {
                let state = VariationState::new(&config);
                Self::Variation(config, state)
            }
            GatePolicy::Trend(config) => {
                let state = TrendState::new(&config);
                Self::Trend(config, state)
            }
        }
    }

    /// The run's `policy` with the state of this (saved) rule; `None` when the kinds differ.
    fn with_policy(self, policy: GatePolicy) -> Option<Self> {
        Some(match (policy, self) {
            (GatePolicy::Always, Self::Always) => Self::Always,
            (GatePolicy::Never, Self::Never) => Self::Never,
            (GatePolicy::Periodic { k }, Self::Periodic { .. }) => Self::Periodic { k },
            (GatePolicy::Bernoulli { p }, Self::Bernoulli { .. }) => Self::Bernoulli { p },
            (GatePolicy::AeSam(config), Self::AeSam(_, state)) => Self::AeSam(config, state),
            (GatePolicy::Variation(config), Self::Variation(_, state)) => Self::Variation(config, state),
            (GatePolicy::Trend(config), Self::Trend(_, state)) => Self::Trend(config, state),
            _ => return None,
        })
    }

    /// Whether the state could have come from a gate with this configuration.
    fn is_consistent(&self) -> bool {
        match self {
            Self::AeSam(_, state) => state.is_consistent(),
            Self::Variation(config, state) => state.is_consistent(config),
            Self::Trend(config, state) => state.is_consistent(config),
            Self::Always | Self::Never | Self::Periodic { .. } | Self::Bernoulli { .. } => true,
        }
    }

    /// The configuration alone.
    pub fn policy(&self) -> GatePolicy {
        match self {
            Self::Always => GatePolicy::Always,
            Self::Never => GatePolicy::Never,
            Self::Periodic { k } => GatePolicy::Periodic { k: *k },
            Self::Bernoulli { p } => GatePolicy::Bernoulli { p: *p },
            Self::AeSam(config, _) => GatePolicy::AeSam(config.clone()),
            Self::Variation(config, _) => GatePolicy::Variation(config.clone()),
            Self::Trend(config, _) => GatePolicy::Trend(config.clone()),
        }
    }
}

/// A gating policy at run time: decides each step, learns from finished steps. The whole value
/// (rule, state, RNG position, counts) is serializable, so a run resumes exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gate {
    rule: Rule,
    /// The random generator behind Bernoulli draws, at its current position.
    rng: ChaCha8Rng,
    steps: u64,
    sam_steps: u64,
}

impl Gate {
    /// Builds a gate; `seed` fixes every random draw it will make.
    pub fn new(policy: GatePolicy, seed: u64) -> Result<Self> {
        policy.validate()?;
        Ok(Self { rule: Rule::fresh(policy), rng: ChaCha8Rng::seed_from_u64(seed), steps: 0, sam_steps: 0 })
    }

    /// Continues a saved gate under the run's `policy`: the same kind of policy, its fields taken
    /// from `policy`, the state from `saved`. Fails when the kinds differ or the state is out of
    /// range for `policy` (non-finite statistics, a quota or rate outside its bounds, histories
    /// that do not fit the window).
    pub fn resume(policy: GatePolicy, saved: Gate) -> Result<Self> {
        policy.validate()?;
        let name = policy.name();
        let saved_name = saved.rule.policy().name();
        let rule = saved.rule.with_policy(policy).ok_or_else(|| {
            SamError::RecordMismatch(format!(
                "the record was saved with gate policy `{saved_name}`, this run uses `{name}`"
            ))
        })?;
        if !rule.is_consistent() {
            return Err(SamError::RecordMismatch(format!(
                "the `{name}` gate state is out of range for this configuration (non-finite statistics, a \
                 quota or rate outside its bounds, more warm-up left than configured, or histories that \
                 do not fit the window)"
            )));
        }
        if saved.sam_steps > saved.steps {
            return Err(SamError::CorruptRecord(format!(
                "the gate counts {} SAM decisions in {} decisions",
                saved.sam_steps, saved.steps
            )));
        }
        Ok(Self { rule, ..saved })
    }

    /// Decides whether the coming step runs the second pass. Call exactly once per step.
    pub fn decide(&mut self) -> bool {
        let sam = match &mut self.rule {
            Rule::Always => true,
            Rule::Never => false,
            Rule::Periodic { k } => self.steps.is_multiple_of(*k as u64),
            Rule::Bernoulli { p } => self.rng.random::<f64>() < *p,
            Rule::AeSam(config, state) => state.decide(config),
            Rule::Variation(config, state) => state.decide(config, &mut self.rng),
            Rule::Trend(config, state) => state.decide(config),
        };
        self.steps = self.steps.saturating_add(1);
        if sam {
            self.sam_steps = self.sam_steps.saturating_add(1);
        }
        sam
    }

    /// Tells the gate the statistics of a finished SAM step. Invalid (non-finite or negative)
    /// statistics are ignored and `false` is returned.
    pub fn observe_sam(&mut self, stats: PsfStats) -> bool {
        if !stats.is_valid() {
            return false;
        }
        match &mut self.rule {
            Rule::Variation(config, state) => state.observe(config, stats),
            Rule::Trend(config, state) => state.observe(config, stats),
            _ => {}
        }
        true
    }

    /// Tells the gate ‖g‖² of a finished step (any kind). Non-finite values are ignored.
    pub fn observe_grad_norm_sq(&mut self, grad_norm_sq: f64) {
        if let Rule::AeSam(config, state) = &mut self.rule {
            state.observe(config, grad_norm_sq);
        }
    }

    /// Whether [`observe_grad_norm_sq`](Self::observe_grad_norm_sq) influences decisions, i.e.
    /// whether the engine must read ‖g‖² back from the device.
    pub fn wants_grad_norm(&self) -> bool {
        matches!(self.rule, Rule::AeSam(..))
    }

    /// vSAM's relative changes (m_r, m_v) of ‖PSF‖/‖g‖ and of the block variance at the last
    /// window boundary; `None` for other gates and before the first boundary.
    pub fn variation_changes(&self) -> Option<(f64, f64)> {
        match &self.rule {
            Rule::Variation(_, state) => state.last_changes,
            _ => None,
        }
    }

    /// vSAM-trend's level signal z (the recent mean of ln ‖PSF‖/‖g‖ minus its mean over the run,
    /// 0 without samples); `None` for other gates.
    pub fn trend_level(&self) -> Option<f64> {
        match &self.rule {
            Rule::Trend(_, state) => Some(state.level()),
            _ => None,
        }
    }

    /// Decisions for a SAM step so far. (The run's counters are the engine's, in
    /// `StepTelemetry`; the gate counts its decisions for `Periodic`'s schedule and its checks.)
    #[cfg(test)]
    pub(crate) fn sam_decisions(&self) -> u64 {
        self.sam_steps
    }

    /// The vSAM quota s (SAM steps per window), for the variation policy.
    pub fn quota(&self) -> Option<f64> {
        match &self.rule {
            Rule::Variation(_, state) => Some(state.quota),
            _ => None,
        }
    }

    /// The fraction of SAM steps the gate currently aims at: s/K for the variation gate, the
    /// rate for the trend gate, `None` for the others.
    pub fn target_fraction(&self) -> Option<f64> {
        match &self.rule {
            Rule::Variation(config, state) => Some(state.quota.floor() / config.window as f64),
            Rule::Trend(_, state) => Some(state.rate),
            _ => None,
        }
    }

    /// Whether the vSAM or trend gate is still in its all-SAM warm-up.
    pub fn in_warmup(&self) -> bool {
        match &self.rule {
            Rule::Variation(_, state) => state.in_warmup(),
            Rule::Trend(_, state) => state.in_warmup(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(policy: GatePolicy, seed: u64, steps: usize) -> Vec<bool> {
        let mut gate = Gate::new(policy, seed).unwrap();
        (0..steps).map(|_| gate.decide()).collect()
    }

    #[test]
    fn always_never_periodic() {
        assert!(run(GatePolicy::Always, 0, 20).iter().all(|&s| s));
        assert!(run(GatePolicy::Never, 0, 20).iter().all(|&s| !s));
        let periodic = run(GatePolicy::Periodic { k: 3 }, 0, 9);
        assert_eq!(periodic, [true, false, false, true, false, false, true, false, false]);
    }

    #[test]
    fn bernoulli_is_seeded_and_has_the_right_rate() {
        let a = run(GatePolicy::Bernoulli { p: 0.3 }, 7, 10_000);
        assert_eq!(a, run(GatePolicy::Bernoulli { p: 0.3 }, 7, 10_000));
        assert_ne!(a, run(GatePolicy::Bernoulli { p: 0.3 }, 8, 10_000));
        let rate = a.iter().filter(|&&s| s).count() as f64 / a.len() as f64;
        assert!((rate - 0.3).abs() < 0.02, "{rate}");
    }

    #[test]
    fn invalid_policies_name_their_field() {
        let cases: Vec<(GatePolicy, &str)> = vec![
            (GatePolicy::Periodic { k: 0 }, "policy.periodic.k"),
            (GatePolicy::Bernoulli { p: 0.0 }, "policy.bernoulli.p"),
            (GatePolicy::Bernoulli { p: f64::NAN }, "policy.bernoulli.p"),
            (GatePolicy::AeSam(AeSamConfig::new(0)), "policy.ae_sam.total_steps"),
            (GatePolicy::AeSam(AeSamConfig::new(5).with_delta(1.0)), "policy.ae_sam.delta"),
            (GatePolicy::AeSam(AeSamConfig::new(5).with_c_end(f64::INFINITY)), "policy.ae_sam.c_end"),
            (
                GatePolicy::Variation(VariationConfig::new(VariationConfig::AUTHORS_WARMUP_STEPS).with_window(1)),
                "policy.variation.window",
            ),
            (
                GatePolicy::Variation(VariationConfig::new(VariationConfig::AUTHORS_WARMUP_STEPS).with_blocks(7)),
                "policy.variation.blocks",
            ),
            (
                GatePolicy::Variation(VariationConfig::new(VariationConfig::AUTHORS_WARMUP_STEPS).with_blocks(50)),
                "policy.variation.blocks",
            ),
            (
                GatePolicy::Variation(
                    VariationConfig::new(VariationConfig::AUTHORS_WARMUP_STEPS).with_max_fraction(1.5),
                ),
                "policy.variation.max_fraction",
            ),
            (
                GatePolicy::Variation(
                    VariationConfig::new(VariationConfig::AUTHORS_WARMUP_STEPS).with_max_fraction(0.01),
                ),
                "policy.variation.max_fraction",
            ),
            (
                GatePolicy::Variation(
                    VariationConfig::new(VariationConfig::AUTHORS_WARMUP_STEPS).with_alpha_ratio(f64::NAN),
                ),
                "policy.variation.alpha_ratio",
            ),
            (
                GatePolicy::Variation(
                    VariationConfig::new(VariationConfig::AUTHORS_WARMUP_STEPS).with_alpha_variance(f64::NEG_INFINITY),
                ),
                "policy.variation.alpha_variance",
            ),
            (
                GatePolicy::Variation(
                    VariationConfig::new(VariationConfig::AUTHORS_WARMUP_STEPS).with_initial_quota(0.5),
                ),
                "policy.variation.initial_quota",
            ),
            (GatePolicy::Trend(TrendConfig::new().with_base_fraction(0.9)), "policy.trend.base_fraction"),
            (GatePolicy::Trend(TrendConfig::new().with_base_fraction(f64::NAN)), "policy.trend.base_fraction"),
            (GatePolicy::Trend(TrendConfig::new().with_min_fraction(0.0)), "policy.trend.min_fraction"),
            (GatePolicy::Trend(TrendConfig::new().with_max_fraction(1.5)), "policy.trend.max_fraction"),
            (GatePolicy::Trend(TrendConfig::new().with_history(0)), "policy.trend.history"),
            (GatePolicy::Trend(TrendConfig::new().with_elasticity(-1.0)), "policy.trend.elasticity"),
            (GatePolicy::Trend(TrendConfig::new().with_elasticity(f64::INFINITY)), "policy.trend.elasticity"),
        ];
        for (policy, field) in cases {
            match Gate::new(policy.clone(), 0) {
                Err(SamError::InvalidConfig { field: f, .. }) => assert_eq!(f, field, "{policy:?}"),
                other => panic!("{policy:?} gave {other:?}"),
            }
        }
    }

    #[test]
    fn state_round_trips_through_json_and_continues_identically() {
        for policy in [
            GatePolicy::Variation(VariationConfig::new(20)),
            GatePolicy::Trend(TrendConfig::new().with_warmup_steps(20)),
        ] {
            round_trip_and_continue(policy);
        }
    }

    fn round_trip_and_continue(policy: GatePolicy) {
        let mut gate = Gate::new(policy.clone(), 11).unwrap();
        let drive = |gate: &mut Gate, steps: usize| -> Vec<bool> {
            (0..steps)
                .map(|_| {
                    let sam = gate.decide();
                    if sam {
                        let norm = 1.01f64.powi(gate.sam_decisions() as i32);
                        gate.observe_sam(PsfStats { psf_norm: norm, ratio: norm / 10.0 });
                    }
                    sam
                })
                .collect()
        };
        drive(&mut gate, 300);
        let json = serde_json::to_string(&gate).unwrap();
        let mut restored = Gate::resume(policy, serde_json::from_str(&json).unwrap()).unwrap();
        let a = drive(&mut gate, 500);
        let b = drive(&mut restored, 500);
        assert_eq!(a, b);
        assert_eq!(gate, restored);
    }

    #[test]
    fn out_of_range_restored_states_are_refused() {
        let config = VariationConfig::new(3);
        let policy = GatePolicy::Variation(config.clone());
        let mut gate = Gate::new(policy.clone(), 1).unwrap();
        for _ in 0..10 {
            if gate.decide() {
                gate.observe_sam(PsfStats { psf_norm: 1.0, ratio: 0.5 });
            }
        }
        let good = gate.clone();
        assert!(Gate::resume(policy.clone(), good.clone()).is_ok());
        type Edit = (&'static str, Box<dyn Fn(&mut VariationState)>);
        let edits: Vec<Edit> = vec![
            ("NaN quota", Box::new(|v| v.quota = f64::NAN)),
            ("quota above the cap", Box::new(|v| v.quota = 41.0)),
            ("quota below 1", Box::new(|v| v.quota = 0.5)),
            ("probability", Box::new(|v| v.probability = 2.0)),
            ("taken", Box::new(|v| v.taken = i64::MIN)),
            ("iteration", Box::new(|v| v.iteration = u64::MAX)),
            (
                "history length",
                Box::new(|v| {
                    v.ratios.pop_back();
                }),
            ),
            ("infinite history", Box::new(|v| v.psf_norms[3] = f64::INFINITY)),
            ("negative variance", Box::new(|v| v.variances.push(-1.0))),
        ];
        for (what, edit) in edits {
            let mut state = good.clone();
            let Rule::Variation(_, variation) = &mut state.rule else { panic!("a variation gate") };
            edit(variation);
            let err = Gate::resume(policy.clone(), state).unwrap_err();
            assert!(matches!(err, SamError::RecordMismatch(_)), "{what}: {err}");
        }

        let trend = GatePolicy::Trend(TrendConfig::new().with_warmup_steps(3));
        let mut gate = Gate::new(trend.clone(), 1).unwrap();
        for _ in 0..10 {
            if gate.decide() {
                gate.observe_sam(PsfStats { psf_norm: 1.0, ratio: 0.5 });
            }
        }
        let good = gate.clone();
        assert!(Gate::resume(trend.clone(), good.clone()).is_ok());
        type TrendEdit = (&'static str, Box<dyn Fn(&mut TrendState)>);
        let edits: Vec<TrendEdit> = vec![
            ("credit", Box::new(|p| p.credit = 1.0)),
            ("rate", Box::new(|p| p.rate = f64::NAN)),
            ("more recent samples than samples", Box::new(|p| p.samples = 0)),
            ("infinite sample", Box::new(|p| p.recent[0] = f64::NEG_INFINITY)),
            ("sum", Box::new(|p| p.log_ratio_sum = f64::NAN)),
            ("history", Box::new(|p| p.recent.extend([0.0; 60]))),
        ];
        for (what, edit) in edits {
            let mut state = good.clone();
            let Rule::Trend(_, trend_state) = &mut state.rule else { panic!("a trend gate") };
            edit(trend_state);
            assert!(Gate::resume(trend.clone(), state).is_err(), "{what}");
        }

        let ae = GatePolicy::AeSam(AeSamConfig::new(10));
        let mut state = Gate::new(ae.clone(), 0).unwrap();
        state.rule = Rule::AeSam(AeSamConfig::new(10), AeSamState { mean: Some(f64::NAN), ..AeSamState::default() });
        assert!(Gate::resume(ae, state).is_err());
    }

    #[test]
    fn state_of_another_policy_is_refused() {
        let gate = Gate::new(GatePolicy::Always, 0).unwrap();
        let err =
            Gate::resume(GatePolicy::Variation(VariationConfig::new(VariationConfig::AUTHORS_WARMUP_STEPS)), gate)
                .unwrap_err();
        assert!(err.to_string().contains("variation"), "{err}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn variation_fraction_stays_in_bounds(
            seed in any::<u64>(),
            stats in proptest::collection::vec((0.0f64..1e3, 0.0f64..10.0), 1..200),
            zeros in any::<bool>(),
        ) {
            let config = VariationConfig::new(50);
            let mut gate = Gate::new(GatePolicy::Variation(config.clone()), seed).unwrap();
            let mut sample = 0usize;
            let mut window_count = 0usize;
            let mut position = 0usize;
            for step in 0..3_000usize {
                let sam = gate.decide();
                if sam {
                    let (n, r) = if zeros && sample.is_multiple_of(3) { (0.0, 0.0) } else { stats[sample % stats.len()] };
                    gate.observe_sam(PsfStats { psf_norm: n, ratio: r });
                    sample += 1;
                }
                let s = gate.quota().unwrap();
                prop_assert!(s.is_finite() && (1.0..=40.0).contains(&s), "s = {}", s);
                // Full windows start at post-warm-up iteration 50 (step 50 + 49).
                if step >= 50 + 49 {
                    window_count += usize::from(sam);
                    position += 1;
                    if position == 50 {
                        let fraction = window_count as f64 / 50.0;
                        prop_assert!((1.0 / 50.0..=0.8).contains(&fraction), "fraction {}", fraction);
                        window_count = 0;
                        position = 0;
                    }
                }
            }
        }
    }
}
