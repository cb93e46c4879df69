//! Gating policies: which steps run SAM's second gradient pass.
//!
//! This layer is plain Rust over scalars: no tensors, no device. A [`Gate`] is asked for the
//! decision of the coming step ([`Gate::decide`]) and told the statistics of finished steps
//! ([`Gate::observe_sam`], [`Gate::observe_grad_norm_sq`]). The tensor engine drives it through
//! exactly this interface, so a gate can be unit-tested, simulated or driven by hand.

mod ae_sam;
mod trend;
mod variation;

pub use ae_sam::{AeSamConfig, AeSamState};
pub use trend::{TrendConfig, TrendState};
pub use variation::{mean_relative_change, sorted_block_variance, VariationConfig, VariationState};

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
        Self::Variation(VariationConfig::new())
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

/// Statistics of a finished SAM step, over the last N parameter tensors.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PsfStats {
    /// ‖PSF‖ = ‖g_s − g‖ over the last N tensors.
    pub psf_norm: f64,
    /// ‖PSF‖ / ‖g‖ over the last N tensors (0 when ‖g‖ = 0 there).
    pub ratio: f64,
}

impl PsfStats {
    /// Both values are finite and non-negative.
    pub fn is_valid(&self) -> bool {
        self.psf_norm.is_finite() && self.ratio.is_finite() && self.psf_norm >= 0.0 && self.ratio >= 0.0
    }
}

/// The policy-specific part of a gate's state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PolicyState {
    /// Policies without state of their own (always, never, periodic, bernoulli).
    Stateless,
    /// AE-SAM moving statistics.
    AeSam(AeSamState),
    /// vSAM window, quota and histories.
    Variation(VariationState),
    /// Trend gate: rate, credit and log-ratio level.
    Trend(TrendState),
}

/// The complete, serializable state of a [`Gate`], RNG included.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GateState {
    /// Policy-specific state.
    pub policy: PolicyState,
    /// The random generator behind Bernoulli draws, at its current position.
    pub rng: ChaCha8Rng,
    /// Steps decided so far.
    pub steps: u64,
    /// Of those, steps decided as SAM steps.
    pub sam_steps: u64,
}

/// A gating policy at run time: decides each step, learns from finished steps.
#[derive(Clone, Debug)]
pub struct Gate {
    policy: GatePolicy,
    state: GateState,
}

impl Gate {
    /// Builds a gate; `seed` fixes every random draw it will make.
    pub fn new(policy: GatePolicy, seed: u64) -> Result<Self> {
        policy.validate()?;
        let policy_state = match &policy {
            GatePolicy::AeSam(_) => PolicyState::AeSam(AeSamState::default()),
            GatePolicy::Variation(config) => PolicyState::Variation(VariationState::new(config)),
            GatePolicy::Trend(config) => PolicyState::Trend(TrendState::new(config)),
            _ => PolicyState::Stateless,
        };
        Ok(Self {
            state: GateState {
                policy: policy_state,
                rng: ChaCha8Rng::seed_from_u64(seed),
                steps: 0,
                sam_steps: 0,
            },
            policy,
        })
    }

    /// Rebuilds a gate from a saved state; fails when the state belongs to another policy.
    pub fn from_state(policy: GatePolicy, state: GateState) -> Result<Self> {
        policy.validate()?;
        let matches = matches!(
            (&policy, &state.policy),
            (GatePolicy::AeSam(_), PolicyState::AeSam(_))
                | (GatePolicy::Variation(_), PolicyState::Variation(_))
                | (GatePolicy::Trend(_), PolicyState::Trend(_))
                | (
                    GatePolicy::Always | GatePolicy::Never | GatePolicy::Periodic { .. } | GatePolicy::Bernoulli { .. },
                    PolicyState::Stateless
                )
        );
        if !matches {
            return Err(SamError::RecordMismatch(format!(
                "gate state {:?} does not belong to policy `{}`",
                state_kind(&state.policy),
                policy.name()
            )));
        }
        let consistent = match (&policy, &state.policy) {
            (GatePolicy::Variation(config), PolicyState::Variation(variation)) => variation.is_consistent(config),
            (GatePolicy::AeSam(_), PolicyState::AeSam(ae)) => ae.is_consistent(),
            (GatePolicy::Trend(config), PolicyState::Trend(trend)) => trend.is_consistent(config),
            _ => true,
        };
        if !consistent {
            return Err(SamError::RecordMismatch(format!(
                "the `{}` gate state is out of range for this configuration (non-finite statistics, a \
                 quota or rate outside its bounds, or histories that do not fit the window)",
                policy.name()
            )));
        }
        Ok(Self { policy, state })
    }

    /// Decides whether the coming step runs the second pass. Call exactly once per step.
    pub fn decide(&mut self) -> bool {
        let state = &mut self.state;
        let sam = match (&self.policy, &mut state.policy) {
            (GatePolicy::Always, _) => true,
            (GatePolicy::Never, _) => false,
            (GatePolicy::Periodic { k }, _) => state.steps.is_multiple_of(*k as u64),
            (GatePolicy::Bernoulli { p }, _) => state.rng.random::<f64>() < *p,
            (GatePolicy::AeSam(config), PolicyState::AeSam(ae)) => ae.decide(config),
            (GatePolicy::Variation(config), PolicyState::Variation(variation)) => {
                variation.decide(config, &mut state.rng)
            }
            (GatePolicy::Trend(config), PolicyState::Trend(trend)) => trend.decide(config),
            _ => unreachable!("policy and state kinds are checked at construction"),
        };
        state.steps = state.steps.saturating_add(1);
        if sam {
            state.sam_steps = state.sam_steps.saturating_add(1);
        }
        sam
    }

    /// Tells the gate the statistics of a finished SAM step. Invalid (non-finite or negative)
    /// statistics are ignored and `false` is returned.
    pub fn observe_sam(&mut self, stats: PsfStats) -> bool {
        if !stats.is_valid() {
            return false;
        }
        match (&self.policy, &mut self.state.policy) {
            (GatePolicy::Variation(config), PolicyState::Variation(variation)) => variation.observe(config, stats),
            (GatePolicy::Trend(config), PolicyState::Trend(trend)) => trend.observe(config, stats),
            _ => {}
        }
        true
    }

    /// Tells the gate ‖g‖² of a finished step (any kind). Non-finite values are ignored.
    pub fn observe_grad_norm_sq(&mut self, grad_norm_sq: f64) {
        if let (GatePolicy::AeSam(config), PolicyState::AeSam(ae)) = (&self.policy, &mut self.state.policy) {
            ae.observe(config, grad_norm_sq);
        }
    }

    /// Whether [`observe_grad_norm_sq`](Self::observe_grad_norm_sq) influences decisions, i.e.
    /// whether the engine must read ‖g‖² back from the device.
    pub fn wants_grad_norm(&self) -> bool {
        matches!(self.policy, GatePolicy::AeSam(_))
    }

    /// Whether [`observe_sam`](Self::observe_sam) influences decisions.
    pub fn wants_psf_stats(&self) -> bool {
        matches!(self.policy, GatePolicy::Variation(_) | GatePolicy::Trend(_))
    }

    /// The policy this gate runs.
    pub fn policy(&self) -> &GatePolicy {
        &self.policy
    }

    /// The current state, for saving.
    pub fn state(&self) -> &GateState {
        &self.state
    }

    /// Steps decided so far.
    pub fn steps(&self) -> u64 {
        self.state.steps
    }

    /// Steps decided as SAM steps so far.
    pub fn sam_steps(&self) -> u64 {
        self.state.sam_steps
    }

    /// The vSAM quota s (SAM steps per window), for the variation policy.
    pub fn quota(&self) -> Option<f64> {
        match &self.state.policy {
            PolicyState::Variation(variation) => Some(variation.quota),
            _ => None,
        }
    }

    /// The fraction of SAM steps the gate currently aims at: s/K for the variation gate, the
    /// rate for the trend gate, `None` for the others.
    pub fn target_fraction(&self) -> Option<f64> {
        match (&self.policy, &self.state.policy) {
            (GatePolicy::Variation(config), PolicyState::Variation(variation)) => {
                Some(variation.quota.floor() / config.window as f64)
            }
            (_, PolicyState::Trend(trend)) => Some(trend.rate),
            _ => None,
        }
    }

    /// Whether the vSAM or trend gate is still in its all-SAM warm-up.
    pub fn in_warmup(&self) -> bool {
        match &self.state.policy {
            PolicyState::Variation(v) => v.in_warmup(),
            PolicyState::Trend(p) => p.in_warmup(),
            _ => false,
        }
    }
}

fn state_kind(state: &PolicyState) -> &'static str {
    match state {
        PolicyState::Stateless => "stateless",
        PolicyState::AeSam(_) => "ae-sam",
        PolicyState::Variation(_) => "variation",
        PolicyState::Trend(_) => "trend",
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
            (GatePolicy::Variation(VariationConfig::new().with_window(1)), "policy.variation.window"),
            (GatePolicy::Variation(VariationConfig::new().with_blocks(7)), "policy.variation.blocks"),
            (GatePolicy::Variation(VariationConfig::new().with_blocks(50)), "policy.variation.blocks"),
            (GatePolicy::Variation(VariationConfig::new().with_max_fraction(1.5)), "policy.variation.max_fraction"),
            (GatePolicy::Variation(VariationConfig::new().with_max_fraction(0.01)), "policy.variation.max_fraction"),
            (GatePolicy::Variation(VariationConfig::new().with_alpha_ratio(f64::NAN)), "policy.variation.alpha_ratio"),
            (
                GatePolicy::Variation(VariationConfig::new().with_alpha_variance(f64::NEG_INFINITY)),
                "policy.variation.alpha_variance",
            ),
            (GatePolicy::Variation(VariationConfig::new().with_initial_quota(0.5)), "policy.variation.initial_quota"),
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
            GatePolicy::Variation(VariationConfig::new().with_warmup_steps(20)),
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
                        let norm = 1.01f64.powi(gate.sam_steps() as i32);
                        gate.observe_sam(PsfStats { psf_norm: norm, ratio: norm / 10.0 });
                    }
                    sam
                })
                .collect()
        };
        drive(&mut gate, 300);
        let json = serde_json::to_string(gate.state()).unwrap();
        let mut restored = Gate::from_state(policy, serde_json::from_str(&json).unwrap()).unwrap();
        let a = drive(&mut gate, 500);
        let b = drive(&mut restored, 500);
        assert_eq!(a, b);
        assert_eq!(gate.state(), restored.state());
    }

    #[test]
    fn out_of_range_restored_states_are_refused() {
        let config = VariationConfig::new().with_warmup_steps(3);
        let policy = GatePolicy::Variation(config.clone());
        let mut gate = Gate::new(policy.clone(), 1).unwrap();
        for _ in 0..10 {
            if gate.decide() {
                gate.observe_sam(PsfStats { psf_norm: 1.0, ratio: 0.5 });
            }
        }
        let good = gate.state().clone();
        assert!(Gate::from_state(policy.clone(), good.clone()).is_ok());
        type Edit = (&'static str, Box<dyn Fn(&mut VariationState)>);
        let edits: Vec<Edit> = vec![
            ("NaN quota", Box::new(|v| v.quota = f64::NAN)),
            ("quota above the cap", Box::new(|v| v.quota = 41.0)),
            ("quota below 1", Box::new(|v| v.quota = 0.5)),
            ("probability", Box::new(|v| v.probability = 2.0)),
            ("taken", Box::new(|v| v.taken = i64::MIN)),
            ("iteration", Box::new(|v| v.iteration = u64::MAX)),
            ("history length", Box::new(|v| {
                v.ratios.pop_back();
            })),
            ("infinite history", Box::new(|v| v.psf_norms[3] = f64::INFINITY)),
            ("negative variance", Box::new(|v| v.variances.push(-1.0))),
        ];
        for (what, edit) in edits {
            let mut state = good.clone();
            let PolicyState::Variation(variation) = &mut state.policy else { unreachable!() };
            edit(variation);
            let err = Gate::from_state(policy.clone(), state).unwrap_err();
            assert!(matches!(err, SamError::RecordMismatch(_)), "{what}: {err}");
        }

        let trend = GatePolicy::Trend(TrendConfig::new().with_warmup_steps(3));
        let mut gate = Gate::new(trend.clone(), 1).unwrap();
        for _ in 0..10 {
            if gate.decide() {
                gate.observe_sam(PsfStats { psf_norm: 1.0, ratio: 0.5 });
            }
        }
        let good = gate.state().clone();
        assert!(Gate::from_state(trend.clone(), good.clone()).is_ok());
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
            let PolicyState::Trend(trend_state) = &mut state.policy else { unreachable!() };
            edit(trend_state);
            assert!(Gate::from_state(trend.clone(), state).is_err(), "{what}");
        }

        let ae = GatePolicy::AeSam(AeSamConfig::new(10));
        let mut state = Gate::new(ae.clone(), 0).unwrap().state().clone();
        state.policy = PolicyState::AeSam(AeSamState { mean: Some(f64::NAN), ..AeSamState::default() });
        assert!(Gate::from_state(ae, state).is_err());
    }

    #[test]
    fn state_of_another_policy_is_refused() {
        let gate = Gate::new(GatePolicy::Always, 0).unwrap();
        let err = Gate::from_state(GatePolicy::Variation(VariationConfig::new()), gate.state().clone()).unwrap_err();
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
            let config = VariationConfig::new().with_warmup_steps(50);
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
