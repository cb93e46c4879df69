//! The AE-SAM gate: SAM when the squared gradient norm is unusually large.
//!
//! See: [An Adaptive Policy to Employ Sharpness-Aware Minimization](https://arxiv.org/abs/2304.14647)
//! (Jiang, Yang, Zhang, Kwok, ICLR 2023).

use burn::config::Config;
use serde::{Deserialize, Serialize};

use super::MAX_GRAD_NORM_SQ;
use crate::error::{Result, SamError};

/// Configuration of the AE-SAM gate.
///
/// The gate tracks exponential moving estimates of the mean μ and variance σ² of ‖g‖² and runs
/// the second pass when ‖g‖² ≥ μ + c_t·σ, with `c_t` moving linearly from `c_start` to `c_end`
/// over `total_steps`. To keep the device free of stalls, the decision for step t uses ‖g‖² of
/// step t−1 (read one step late).
#[derive(Config, Debug, PartialEq)]
pub struct AeSamConfig {
    /// Number of training steps T over which `c_t` moves from `c_start` to `c_end` (required).
    pub total_steps: usize,
    /// Forgetting factor δ of the moving mean and variance (default: 0.9).
    #[config(default = 0.9)]
    pub delta: f64,
    /// Threshold multiplier λ₁ at the start of training (default: -1.0).
    #[config(default = -1.0)]
    pub c_start: f64,
    /// Threshold multiplier λ₂ at the end of training (default: 1.0).
    #[config(default = 1.0)]
    pub c_end: f64,
}

impl AeSamConfig {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.total_steps == 0 {
            return Err(SamError::invalid("policy.ae_sam.total_steps", self.total_steps, "must be at least 1"));
        }
        if !(self.delta > 0.0 && self.delta < 1.0) {
            return Err(SamError::invalid("policy.ae_sam.delta", self.delta, "must be in (0, 1)"));
        }
        if !self.c_start.is_finite() {
            return Err(SamError::invalid("policy.ae_sam.c_start", self.c_start, "must be finite"));
        }
        if !self.c_end.is_finite() {
            return Err(SamError::invalid("policy.ae_sam.c_end", self.c_end, "must be finite"));
        }
        Ok(())
    }

    fn threshold_multiplier(&self, step: u64) -> f64 {
        let progress = (step as f64 / self.total_steps as f64).min(1.0);
        self.c_start + (self.c_end - self.c_start) * progress
    }
}

/// Mutable state of the AE-SAM gate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
pub(crate) struct AeSamState {
    /// Moving mean μ of ‖g‖²; `None` until the first observation.
    pub(crate) mean: Option<f64>,
    /// Moving variance σ² of ‖g‖².
    pub(crate) variance: f64,
    /// The most recent ‖g‖² not yet used for a decision.
    pub(crate) latest: Option<f64>,
    /// Steps decided so far (t).
    pub(crate) step: u64,
}

impl AeSamState {
    /// Whether the state could have come from this gate (finite statistics).
    pub(crate) fn is_consistent(&self) -> bool {
        // ‖g‖² is read from the device as f32: its moving mean stays below f32's largest value
        // and its moving variance below that value's square.
        let grad_sq = |v: f64| (0.0..=MAX_GRAD_NORM_SQ).contains(&v);
        self.mean.is_none_or(grad_sq)
            && (0.0..=MAX_GRAD_NORM_SQ * MAX_GRAD_NORM_SQ).contains(&self.variance)
            && self.latest.is_none_or(grad_sq)
    }

    /// Records ‖g‖² of a finished step. Non-finite values are ignored.
    pub(crate) fn observe(&mut self, config: &AeSamConfig, grad_norm_sq: f64) {
        if !grad_norm_sq.is_finite() {
            return;
        }
        let delta = config.delta;
        match self.mean {
            // Start from the first value rather than from zero, which would bias μ low.
            None => {
                self.mean = Some(grad_norm_sq);
                self.variance = 0.0;
            }
            Some(mean) => {
                let mean = delta * mean + (1.0 - delta) * grad_norm_sq;
                let deviation = grad_norm_sq - mean;
                self.variance = delta * self.variance + (1.0 - delta) * deviation * deviation;
                self.mean = Some(mean);
            }
        }
        self.latest = Some(grad_norm_sq);
    }

    /// Decides the coming step: SAM when the latest ‖g‖² is at least μ + c_t·σ. With no
    /// observation yet the step runs SAM.
    pub(crate) fn decide(&mut self, config: &AeSamConfig) -> bool {
        let c = config.threshold_multiplier(self.step);
        self.step = self.step.saturating_add(1);
        match (self.latest.take(), self.mean) {
            (Some(latest), Some(mean)) => latest >= mean + c * self.variance.sqrt(),
            _ => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moving_moments_match_hand_computation() {
        let config = AeSamConfig::new(100).with_delta(0.5);
        let mut state = AeSamState::default();
        state.observe(&config, 4.0);
        state.observe(&config, 8.0);
        // μ = 0.5·4 + 0.5·8 = 6; σ² = 0.5·0 + 0.5·(8-6)² = 2.
        assert_eq!(state.mean, Some(6.0));
        assert_eq!(state.variance, 2.0);
    }

    #[test]
    fn threshold_moves_linearly_and_decides() {
        let config = AeSamConfig::new(10).with_c_start(-1.0).with_c_end(1.0);
        assert_eq!(config.threshold_multiplier(0), -1.0);
        assert_eq!(config.threshold_multiplier(5), 0.0);
        assert_eq!(config.threshold_multiplier(50), 1.0);

        let config = config.with_c_start(0.5).with_c_end(0.5);
        let mut state = AeSamState::default();
        assert!(state.decide(&config), "no observation yet: SAM");
        state.observe(&config, 1.0);
        state.observe(&config, 1.0);
        state.observe(&config, 100.0);
        assert!(state.decide(&config), "a spike is sharp");
        state.observe(&config, 0.0);
        assert!(!state.decide(&config), "a drop below the mean is flat");
    }

    #[test]
    fn non_finite_observations_are_ignored() {
        let config = AeSamConfig::new(10);
        let mut state = AeSamState::default();
        state.observe(&config, 2.0);
        let before = state.clone();
        state.observe(&config, f64::NAN);
        state.observe(&config, f64::INFINITY);
        assert_eq!(state, before);
    }
}
