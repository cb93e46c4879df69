//! The trend gate ("vSAM-trend"): vSAM's PSF-ratio signal, without its drift and without its
//! dependence on the number of windows in a run.
//!
//! vSAM's quota update `s ← s·(1 + α·m_r)` integrates the relative changes of
//! r = ‖PSF‖/‖g‖, so in effect it sets the quota from the *level* of r: `ln s ≈ α'·ln(r_t / r_0)`.
//! Two properties of that rule hurt in practice (see `docs/algorithm.md`):
//! - the mean relative change of a stationary noisy sequence is positive (`E[x₂/x₁] − 1 =
//!   e^{σ²} − 1` for log-normal noise), so the quota drifts upward on noise alone;
//! - the quota moves at most ±26 % per 50-step window, so a run of a few thousand steps ends
//!   near its starting quota whatever the PSF does.
//!
//! This gate computes the level directly and without bias: `z = mean(ln r over the last H SAM
//! samples) − mean(ln r over every SAM sample so far)`. Its expectation is 0 on stationary noise,
//! so it cannot drift, and it compares the recent PSF with the whole run so far, so the same
//! relative rise of r moves the rate the same in a run of two thousand steps or of eighty
//! thousand. The SAM rate is
//!
//! ```text
//! rate = clamp(base_fraction · exp(elasticity · z), min_fraction, max_fraction)
//! ```
//!
//! and SAM steps are placed evenly at that rate (a credit accumulator, no random draws), so that
//! vSAM's decayed-PSF reuse covers the cheap steps between them.

use std::collections::VecDeque;

use burn::config::Config;
use serde::{Deserialize, Serialize};

use super::PsfStats;

/// Bound on |ln(‖PSF‖/‖g‖)| of a finite step (see `MAX_PSF_RATIO`: ln 2¹⁴⁰ ≈ 97).
const MAX_LOG_RATIO: f64 = 100.0;
use crate::error::{Result, SamError};

/// Largest history accepted, in SAM samples.
const MAX_HISTORY: usize = 1_000_000;

/// Configuration of the trend gate: SAM steps at a base rate, more of them while ‖PSF‖/‖g‖ is
/// above its run average and fewer while it is below.
///
/// Built by [`SamConfig::vsam_trend`](crate::SamConfig::vsam_trend). An opt-in variant of vSAM,
/// not the authors' rule; [`VariationConfig`](super::VariationConfig) is that.
#[derive(Config, Debug, PartialEq)]
pub struct TrendConfig {
    /// SAM rate on a flat signal (z = 0), in [`min_fraction`, `max_fraction`] (default: 0.15;
    /// with the default elasticity, the rise of ‖PSF‖/‖g‖ over a 30-epoch noisy-label
    /// Fashion-MNIST run brings the run's average to about 0.2, see `docs/algorithm.md`).
    #[config(default = 0.15)]
    pub base_fraction: f64,
    /// All-SAM steps at the start, which fill the history (default: 50, one history).
    #[config(default = 50)]
    pub warmup_steps: usize,
    /// Number H of recent SAM samples whose mean log-ratio is the current level (default: 50,
    /// the authors' history length).
    #[config(default = 50)]
    pub history: usize,
    /// How strongly the rate follows the level: the base rate is multiplied by
    /// `exp(elasticity·z)`; finite and ≥ 0, 0 gives an even schedule at `base_fraction`
    /// (default: 4.0, so that z = 0.1, the late-run level in that run, raises the rate by 1.5×).
    #[config(default = 4.0)]
    pub elasticity: f64,
    /// Smallest SAM rate, in (0, 1] (default: 0.02, the authors' one step per 50-step window).
    #[config(default = 0.02)]
    pub min_fraction: f64,
    /// Largest SAM rate, in [`min_fraction`, 1] (default: 0.8, the authors' cap).
    #[config(default = 0.8)]
    pub max_fraction: f64,
}

impl TrendConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        if !(self.min_fraction > 0.0 && self.min_fraction <= 1.0) {
            return Err(SamError::invalid("policy.trend.min_fraction", self.min_fraction, "must be in (0, 1]"));
        }
        if !(self.max_fraction >= self.min_fraction && self.max_fraction <= 1.0) {
            return Err(SamError::invalid(
                "policy.trend.max_fraction",
                self.max_fraction,
                "must be in [min_fraction, 1]",
            ));
        }
        if !(self.base_fraction >= self.min_fraction && self.base_fraction <= self.max_fraction) {
            return Err(SamError::invalid(
                "policy.trend.base_fraction",
                self.base_fraction,
                "must be in [min_fraction, max_fraction]",
            ));
        }
        if !(1..=MAX_HISTORY).contains(&self.history) {
            return Err(SamError::invalid("policy.trend.history", self.history, "must be in [1, 1000000]"));
        }
        if !(self.elasticity.is_finite() && self.elasticity >= 0.0) {
            return Err(SamError::invalid("policy.trend.elasticity", self.elasticity, "must be finite and >= 0"));
        }
        Ok(())
    }
}

/// Mutable state of the trend gate; serializable so that a run resumes exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct TrendState {
    /// Warm-up steps still to run.
    pub(crate) warmup_left: usize,
    /// Accumulated credit toward the next SAM step, in [0, 1).
    pub(crate) credit: f64,
    /// The SAM rate used for the last decision.
    pub(crate) rate: f64,
    /// ln(‖PSF‖/‖g‖) of the last H SAM samples.
    pub(crate) recent: VecDeque<f64>,
    /// Sum of ln(‖PSF‖/‖g‖) over every SAM sample so far.
    pub(crate) log_ratio_sum: f64,
    /// Number of SAM samples in `log_ratio_sum`.
    pub(crate) samples: u64,
}

impl TrendState {
    pub(crate) fn new(config: &TrendConfig) -> Self {
        Self {
            warmup_left: config.warmup_steps,
            credit: 0.0,
            rate: config.base_fraction,
            recent: VecDeque::with_capacity(config.history),
            log_ratio_sum: 0.0,
            samples: 0,
        }
    }

    /// Whether the state could have come from a gate with `config`.
    pub(crate) fn is_consistent(&self, config: &TrendConfig) -> bool {
        self.warmup_left <= config.warmup_steps
            && (0.0..1.0).contains(&self.credit)
            && (config.min_fraction..=config.max_fraction).contains(&self.rate)
            && self.recent.len() <= config.history
            && self.recent.len() as u64 <= self.samples
            // ln of a ratio a finite step measures lies within ±ln(MAX_PSF_RATIO) < 100.
            && self.recent.iter().all(|v| v.abs() <= MAX_LOG_RATIO)
            && self.log_ratio_sum.abs() <= MAX_LOG_RATIO * self.samples as f64
    }

    pub(crate) fn in_warmup(&self) -> bool {
        self.warmup_left > 0
    }

    /// The level signal z: the recent mean of ln r minus its mean over the run; 0 without samples.
    pub fn level(&self) -> f64 {
        if self.recent.is_empty() || self.samples == 0 {
            return 0.0;
        }
        let recent = self.recent.iter().sum::<f64>() / self.recent.len() as f64;
        recent - self.log_ratio_sum / self.samples as f64
    }

    /// Decides whether the coming step runs the second pass.
    pub(crate) fn decide(&mut self, config: &TrendConfig) -> bool {
        if self.warmup_left > 0 {
            self.warmup_left -= 1;
            return true;
        }
        let rate = config.base_fraction * (config.elasticity * self.level()).exp();
        // `level` is finite (finite samples only) and exp saturates to +inf at worst, which the
        // clamp turns into `max_fraction`; a NaN cannot arise from finite inputs.
        self.rate = rate.clamp(config.min_fraction, config.max_fraction);
        self.credit += self.rate;
        let sam = self.credit >= 1.0;
        if sam {
            self.credit -= 1.0;
        }
        sam
    }

    /// Records the statistics of a finished SAM step; a zero ratio (no gradient in the last N
    /// tensors) carries no level information and is skipped.
    pub(crate) fn observe(&mut self, config: &TrendConfig, stats: PsfStats) {
        if !(stats.ratio > 0.0 && stats.ratio.is_finite()) {
            return;
        }
        let log_ratio = stats.ratio.ln();
        self.recent.push_back(log_ratio);
        while self.recent.len() > config.history {
            self.recent.pop_front();
        }
        self.log_ratio_sum += log_ratio;
        self.samples = self.samples.saturating_add(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::variation::{VariationConfig, VariationState};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A standard normal draw (Box–Muller), so that the tests need no extra crate.
    fn normal(rng: &mut impl Rng) -> f64 {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Drives the gate alone for `steps` steps with ratios `exp(trend(t) + sigma·N(0,1))`;
    /// returns the SAM decisions.
    fn drive(config: &TrendConfig, steps: usize, sigma: f64, trend: impl Fn(usize) -> f64) -> (Vec<bool>, TrendState) {
        let mut state = TrendState::new(config);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let decisions = (0..steps)
            .map(|t| {
                let sam = state.decide(config);
                if sam {
                    let ratio = (trend(t) + sigma * normal(&mut rng)).exp();
                    state.observe(config, PsfStats { psf_norm: ratio, ratio });
                }
                assert!((config.min_fraction..=config.max_fraction).contains(&state.rate));
                sam
            })
            .collect();
        (decisions, state)
    }

    fn fraction(decisions: &[bool]) -> f64 {
        decisions.iter().filter(|&&s| s).count() as f64 / decisions.len() as f64
    }

    #[test]
    fn stationary_noise_keeps_the_rate_put_for_100k_steps() {
        let config = TrendConfig::new();
        let (decisions, state) = drive(&config, 100_000, 0.3, |_| 0.6f64.ln());
        // Every tenth of the run runs at the base rate: no drift, however long the run.
        for (i, tenth) in decisions.chunks(10_000).enumerate().skip(1) {
            let f = fraction(tenth);
            assert!((f - 0.15).abs() < 0.02, "tenth {i}: fraction {f}");
        }
        assert!(state.level().abs() < 0.15, "level {}", state.level());
        assert!((state.rate / 0.15).ln().abs() < 4.0 * 0.15, "rate {}", state.rate);
    }

    #[test]
    fn the_authors_rule_drifts_on_the_same_noise() {
        // The contrast that motivates this gate: the same stationary statistics push vSAM's
        // quota from 1 to far above it (its mean relative change is biased by e^{σ²} − 1).
        let config = VariationConfig::new(50);
        let mut state = VariationState::new(&config);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut draws = ChaCha8Rng::seed_from_u64(6);
        for _ in 0..100_000 {
            if state.decide(&config, &mut draws) {
                let ratio = (0.6f64.ln() + 0.3 * normal(&mut rng)).exp();
                state.observe(&config, PsfStats { psf_norm: ratio, ratio });
            }
        }
        assert!(state.quota > 10.0, "quota {}", state.quota);
    }

    #[test]
    fn a_rising_ratio_raises_the_rate_and_a_falling_one_lowers_it() {
        let steps = 20_000;
        let config = TrendConfig::new();
        // ln r rises by 0.3 over the run, as a PSF ratio that grows by 35 %.
        let (decisions, _) = drive(&config, steps, 0.2, |t| 0.3 * t as f64 / steps as f64);
        let (first, last) = (fraction(&decisions[..steps / 4]), fraction(&decisions[3 * steps / 4..]));
        assert!(last > 1.3 * first && last > 0.2, "first quarter {first}, last quarter {last}");

        let (decisions, _) = drive(&config, steps, 0.2, |t| -0.3 * t as f64 / steps as f64);
        let (first, last) = (fraction(&decisions[..steps / 4]), fraction(&decisions[3 * steps / 4..]));
        assert!(first > 1.3 * last && last < 0.12, "first quarter {first}, last quarter {last}");
    }

    #[test]
    fn the_response_does_not_depend_on_the_run_length() {
        // The same relative rise over 4k and 40k steps gives the same late rate.
        let late = |steps: usize| {
            let (decisions, _) = drive(&TrendConfig::new(), steps, 0.1, |t| 0.3 * t as f64 / steps as f64);
            fraction(&decisions[9 * steps / 10..])
        };
        let (short, long) = (late(4_000), late(40_000));
        assert!(short > 0.2 && (short - long).abs() < 0.03, "short {short}, long {long}");
    }

    #[test]
    fn zero_elasticity_is_an_even_schedule() {
        let config = TrendConfig::new().with_elasticity(0.0).with_warmup_steps(0).with_base_fraction(0.25);
        let (decisions, _) = drive(&config, 1_000, 1.0, |_| 0.0);
        // Every fourth step, no randomness: SAM steps at 4, 8, 12, …
        let expected: Vec<bool> = (1..=1_000).map(|t| t % 4 == 0).collect();
        assert_eq!(decisions, expected);
    }

    #[test]
    fn warmup_is_all_sam() {
        let config = TrendConfig::new().with_warmup_steps(100).with_elasticity(0.0);
        let (decisions, state) = drive(&config, 1_100, 0.1, |_| 0.0);
        assert!(decisions[..100].iter().all(|&s| s));
        assert_eq!(decisions[100..].iter().filter(|&&s| s).count(), 150);
        assert_eq!(state.samples, 250);
    }

    #[test]
    fn zero_and_invalid_ratios_are_not_samples() {
        let config = TrendConfig::new();
        let mut state = TrendState::new(&config);
        state.observe(&config, PsfStats { psf_norm: 0.0, ratio: 0.0 });
        assert_eq!(state.samples, 0);
        assert_eq!(state.level(), 0.0);
        state.observe(&config, PsfStats { psf_norm: 1.0, ratio: 2.0 });
        assert_eq!((state.samples, state.recent.len()), (1, 1));
        assert!(state.is_consistent(&config));
    }
}
