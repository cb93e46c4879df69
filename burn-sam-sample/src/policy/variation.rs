//! The vSAM variation-threshold gate.
//!
//! See: [Effective Gradient Sample Size via Variation Estimation for Accelerating Sharpness aware
//! Minimization](https://arxiv.org/abs/2403.08821) (Deng, Pang, Zhang, Wang, 2024). Where the paper
//! is silent this follows the authors' public code; `docs/algorithm.md` lists each such choice.

use std::collections::VecDeque;

use burn::config::Config;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::{PsfStats, MAX_PSF_NORM, MAX_PSF_RATIO};
use crate::error::{Result, SamError};

/// Largest window accepted: the histories hold `window` values each.
const MAX_WINDOW: usize = 1_000_000;

/// Configuration of the vSAM variation gate.
///
/// The gate keeps a per-window quota `s` of SAM steps. At every window boundary `s` is scaled by
/// `1 + alpha_ratio·m_r + alpha_variance·m_v`, where `m_r` is the mean relative change of
/// ‖PSF‖/‖g‖ and `m_v` the mean relative change of the sorted-block variance of ‖PSF‖, both over
/// the last `window` SAM samples and clipped to ±1. Inside a window exactly `floor(s)` SAM steps
/// are placed at random (Bernoulli(s/K) draws, filled up at the end of the window).
#[derive(Config, Debug, PartialEq)]
pub struct VariationConfig {
    /// Window length K in iterations; also the length of the statistic histories in SAM samples
    /// (default: 50).
    #[config(default = 50)]
    pub window: usize,
    /// Number B of sorted blocks the ‖PSF‖ history is split into for the block variance; must
    /// divide `window` into blocks of at least two values (default: 5).
    #[config(default = 5)]
    pub blocks: usize,
    /// Largest fraction of SAM steps in a window; caps the quota at `floor(max_fraction·K)`
    /// (default: 0.8).
    #[config(default = 0.8)]
    pub max_fraction: f64,
    /// Gain α_r on the mean relative change of ‖PSF‖/‖g‖ (default: 0.13, the authors' script).
    #[config(default = 0.13)]
    pub alpha_ratio: f64,
    /// Gain α_v on the mean relative change of the block variance of ‖PSF‖ (default: 0.13).
    #[config(default = 0.13)]
    pub alpha_variance: f64,
    /// Number of all-SAM warm-up steps before the windows start; required, because it must be
    /// scaled to the run (the authors use 3 epochs: [`Self::AUTHORS_WARMUP_STEPS`] at CIFAR's
    /// 391 steps per epoch). See [`VariationConfig::with_warmup_epochs`].
    pub warmup_steps: usize,
    /// Initial quota s₀ of SAM steps per window (default: 1).
    #[config(default = 1.0)]
    pub initial_quota: f64,
}

impl VariationConfig {
    /// The authors' warm-up: 3 epochs of CIFAR at batch size 128 (1173 steps).
    pub const AUTHORS_WARMUP_STEPS: usize = 1173;

    /// Sets the warm-up to `epochs` full epochs of `steps_per_epoch` steps each.
    pub fn with_warmup_epochs(self, epochs: usize, steps_per_epoch: usize) -> Self {
        self.with_warmup_steps(epochs.saturating_mul(steps_per_epoch))
    }

    /// Sets the warm-up to `steps` steps.
    pub fn with_warmup_steps(self, steps: usize) -> Self {
        Self { warmup_steps: steps, ..self }
    }

    /// Largest quota a window can hold, `floor(max_fraction·K)`.
    pub fn max_quota(&self) -> f64 {
        (self.max_fraction * self.window as f64).floor()
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if !(2..=MAX_WINDOW).contains(&self.window) {
            return Err(SamError::invalid("policy.variation.window", self.window, "must be in [2, 1000000]"));
        }
        if self.blocks == 0 || !self.window.is_multiple_of(self.blocks) {
            return Err(SamError::invalid(
                "policy.variation.blocks",
                self.blocks,
                "must be at least 1 and divide `window`",
            ));
        }
        if self.window / self.blocks < 2 {
            return Err(SamError::invalid(
                "policy.variation.blocks",
                self.blocks,
                "each block must hold at least two values (window / blocks >= 2)",
            ));
        }
        if !(self.max_fraction > 0.0 && self.max_fraction <= 1.0) {
            return Err(SamError::invalid("policy.variation.max_fraction", self.max_fraction, "must be in (0, 1]"));
        }
        if self.max_quota() < 1.0 {
            return Err(SamError::invalid(
                "policy.variation.max_fraction",
                self.max_fraction,
                "floor(max_fraction * window) must be at least 1",
            ));
        }
        if !self.alpha_ratio.is_finite() {
            return Err(SamError::invalid("policy.variation.alpha_ratio", self.alpha_ratio, "must be finite"));
        }
        if !self.alpha_variance.is_finite() {
            return Err(SamError::invalid("policy.variation.alpha_variance", self.alpha_variance, "must be finite"));
        }
        if !(self.initial_quota >= 1.0 && self.initial_quota <= self.max_quota()) {
            return Err(SamError::invalid(
                "policy.variation.initial_quota",
                self.initial_quota,
                "must be in [1, floor(max_fraction * window)]",
            ));
        }
        Ok(())
    }
}

/// Mutable state of the variation gate; serializable so that a run resumes exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct VariationState {
    /// Warm-up steps still to run.
    pub(crate) warmup_left: usize,
    /// Post-warm-up iteration counter J (starts at 1; boundaries at multiples of K).
    pub(crate) iteration: u64,
    /// Quota s: SAM steps per window (real-valued; floor(s) is used).
    pub(crate) quota: f64,
    /// Bernoulli probability p = s/K for a SAM draw inside the window.
    pub(crate) probability: f64,
    /// SAM steps taken in the current window, c.
    pub(crate) taken: i64,
    /// Last K values of ‖PSF‖ over the last N tensors (P).
    pub(crate) psf_norms: VecDeque<f64>,
    /// Last K values of ‖PSF‖/‖g‖ over the last N tensors (R).
    pub(crate) ratios: VecDeque<f64>,
    /// Block variances of the sorted ‖PSF‖ history (V); truncated to K at window boundaries.
    pub(crate) variances: Vec<f64>,
    /// Relative changes (m_r, m_v) used at the last boundary, for telemetry.
    pub(crate) last_changes: Option<(f64, f64)>,
}

impl VariationState {
    pub(crate) fn new(config: &VariationConfig) -> Self {
        let k = config.window;
        Self {
            warmup_left: config.warmup_steps,
            iteration: 1,
            quota: config.initial_quota,
            probability: 0.5,
            taken: 0,
            psf_norms: VecDeque::from(vec![0.0; k]),
            ratios: VecDeque::from(vec![0.0; k]),
            variances: vec![0.0; k],
            last_changes: None,
        }
    }

    /// Whether the state could have come from a gate with `config` (restored records are
    /// checked with this before use).
    pub(crate) fn is_consistent(&self, config: &VariationConfig) -> bool {
        let norm = |v: &f64| (0.0..=MAX_PSF_NORM).contains(v);
        let ratio = |v: &f64| (0.0..=MAX_PSF_RATIO).contains(v);
        let variance = |v: &f64| (0.0..=MAX_PSF_NORM * MAX_PSF_NORM).contains(v);
        let k = config.window;
        self.warmup_left <= config.warmup_steps
            && self.iteration >= 1
            && self.iteration < u64::MAX / 2
            && self.quota.is_finite()
            && self.quota >= 1.0
            && self.quota <= config.max_quota()
            && (0.0..=1.0).contains(&self.probability)
            && (0..=k as i64).contains(&self.taken)
            && self.psf_norms.len() == k
            && self.ratios.len() == k
            && self.psf_norms.iter().all(norm)
            && self.ratios.iter().all(ratio)
            // One block variance per SAM step, truncated to K at each window boundary.
            && self.variances.len() <= 2 * k
            && self.variances.iter().all(variance)
            && self.last_changes.is_none_or(|(r, v)| r.is_finite() && v.is_finite())
    }

    pub(crate) fn in_warmup(&self) -> bool {
        self.warmup_left > 0
    }

    /// Decides whether the coming step runs the second pass.
    pub(crate) fn decide(&mut self, config: &VariationConfig, rng: &mut impl Rng) -> bool {
        if self.warmup_left > 0 {
            self.warmup_left -= 1;
            // The authors' loop leaves c = 1 after warm-up, so the first partial window runs
            // without SAM steps (reference spec §1.5).
            self.taken = 1;
            return true;
        }
        let k = config.window as u64;
        if self.iteration.is_multiple_of(k) {
            self.update_quota(config);
        }
        let quota = self.quota.floor() as i64;
        let position = (self.iteration % k) as i64;
        let remaining = k as i64 - position;
        // Short-circuit as the reference does: the draw only happens while the quota is open.
        let drawn = self.taken < quota && rng.random::<f64>() < self.probability;
        let forced = remaining <= quota - self.taken;
        self.iteration = self.iteration.saturating_add(1);
        let sam = drawn || forced;
        if sam {
            self.taken = self.taken.saturating_add(1);
        }
        sam
    }

    fn update_quota(&mut self, config: &VariationConfig) {
        let k = config.window;
        if self.variances.len() > k {
            self.variances.drain(..self.variances.len() - k);
        }
        let m_r = mean_relative_change(self.ratios.iter().copied());
        let m_v = mean_relative_change(self.variances.iter().copied());
        self.last_changes = Some((m_r, m_v));
        let scaled = self.quota * (1.0 + config.alpha_ratio * m_r + config.alpha_variance * m_v);
        // `scaled` is finite: m_r, m_v ∈ [-1, 1] and the gains are finite; clamp keeps it in range.
        self.quota = if scaled.is_finite() { scaled } else { self.quota }.clamp(1.0, config.max_quota());
        self.probability = self.quota / k as f64;
        self.taken = 0;
    }

    /// Records the statistics of a finished SAM step.
    pub(crate) fn observe(&mut self, config: &VariationConfig, stats: PsfStats) {
        push_ring(&mut self.psf_norms, stats.psf_norm, config.window);
        push_ring(&mut self.ratios, stats.ratio, config.window);
        let v = sorted_block_variance(self.psf_norms.iter().copied(), config.blocks);
        self.variances.push(v);
    }
}

fn push_ring(ring: &mut VecDeque<f64>, value: f64, len: usize) {
    ring.push_back(value);
    while ring.len() > len {
        ring.pop_front();
    }
}

/// Mean over `i` of `(x[i+1] - x[i]) / x[i]`, clipped to [-1, 1].
///
/// A `0/0` term counts as no change, `x/0` as ±∞ (then clipped), and a mean that is undefined
/// (`+∞` and `-∞` together) counts as no change: the result is never NaN.
pub(crate) fn mean_relative_change(values: impl IntoIterator<Item = f64>) -> f64 {
    let values: Vec<f64> = values.into_iter().collect();
    if values.len() < 2 {
        return 0.0;
    }
    let sum: f64 = values
        .windows(2)
        .map(|pair| {
            let (before, after) = (pair[0], pair[1]);
            let change = after - before;
            if before != 0.0 {
                change / before
            } else if change == 0.0 {
                0.0
            } else {
                change.signum() * f64::INFINITY
            }
        })
        .sum();
    let mean = sum / (values.len() - 1) as f64;
    if mean.is_nan() {
        0.0
    } else {
        mean.clamp(-1.0, 1.0)
    }
}

/// Mean over `blocks` equal blocks of the ascending-sorted values of each block's unbiased
/// variance.
pub(crate) fn sorted_block_variance(values: impl IntoIterator<Item = f64>, blocks: usize) -> f64 {
    let mut sorted: Vec<f64> = values.into_iter().collect();
    sorted.sort_by(f64::total_cmp);
    let size = sorted.len() / blocks;
    if size < 2 {
        return 0.0;
    }
    let total: f64 = sorted
        .chunks_exact(size)
        .take(blocks)
        .map(|block| {
            let mean = block.iter().sum::<f64>() / size as f64;
            block.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (size - 1) as f64
        })
        .sum();
    total / blocks as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn config(warmup: usize) -> VariationConfig {
        VariationConfig::new(warmup)
    }

    #[test]
    fn relative_change_matches_hand_computation() {
        // (2-1)/1 = 1, (3-2)/2 = 0.5, (1.5-3)/3 = -0.5 → mean 1/3.
        let m = mean_relative_change([1.0, 2.0, 3.0, 1.5]);
        assert!((m - 1.0 / 3.0).abs() < 1e-15, "{m}");
        // 10× growth clips to +1; collapse to zero is -1 per step.
        assert_eq!(mean_relative_change([1.0, 10.0, 100.0]), 1.0);
        assert_eq!(mean_relative_change([4.0, 0.0]), -1.0);
    }

    #[test]
    fn relative_change_never_nan() {
        assert_eq!(mean_relative_change([0.0; 50]), 0.0);
        assert_eq!(mean_relative_change([0.0, 1.0]), 1.0);
        assert_eq!(mean_relative_change([0.0, 1.0, 0.0, -1.0]), 0.0);
        assert_eq!(mean_relative_change([3.0; 50]), 0.0);
        assert_eq!(mean_relative_change([]), 0.0);
    }

    #[test]
    fn block_variance_matches_hand_computation() {
        // Sorted: [1,2,3,4,10,20]; blocks of 3: var([1,2,3]) = 1, var([4,10,20]) = 65.33…
        let v = sorted_block_variance([10.0, 1.0, 20.0, 3.0, 2.0, 4.0], 2);
        let expected = (1.0 + (196.0 / 3.0)) / 2.0;
        assert!((v - expected).abs() < 1e-12, "{v} vs {expected}");
        assert_eq!(sorted_block_variance([7.0; 50], 5), 0.0);
    }

    #[test]
    fn warmup_is_all_sam_and_first_partial_window_has_none() {
        let cfg = config(7);
        let mut state = VariationState::new(&cfg);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for _ in 0..7 {
            assert!(state.decide(&cfg, &mut rng));
        }
        // J = 1..49 run with s = 1 and c = 1 carried over: no SAM step.
        for _ in 1..50 {
            assert!(!state.decide(&cfg, &mut rng));
        }
        assert_eq!(state.iteration, 50);
    }

    #[test]
    fn quota_update_on_hand_computed_histories() {
        let cfg = config(0);
        let mut state = VariationState::new(&cfg);
        state.quota = 10.0;
        // R doubles every sample from 1: relative change 1 each → m_r = 1.
        state.ratios = (0..50).map(|i| 2f64.powi(i)).collect();
        // V constant: m_v = 0.
        state.variances = vec![2.0; 60];
        state.iteration = 50;
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        state.decide(&cfg, &mut rng);
        assert_eq!(state.variances.len(), 50);
        assert!((state.quota - 11.3).abs() < 1e-12, "{}", state.quota);
        assert!((state.probability - 11.3 / 50.0).abs() < 1e-12);
        assert_eq!(state.last_changes, Some((1.0, 0.0)));
    }

    #[test]
    fn quota_clips_to_bounds() {
        let cfg = config(0);
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut state = VariationState::new(&cfg);
        state.quota = 39.0;
        state.ratios = (0..50).map(|i| 2f64.powi(i)).collect();
        state.variances = (0..50).map(|i| 2f64.powi(i)).collect();
        state.iteration = 50;
        state.decide(&cfg, &mut rng);
        assert_eq!(state.quota, 40.0);

        let mut state = VariationState::new(&cfg);
        // m_r = m_v = -0.5: 1.1 · (1 - 0.13) < 1.
        state.quota = 1.1;
        state.ratios = (0..50).map(|i| 0.5f64.powi(i)).collect();
        state.variances = (0..50).map(|i| 0.5f64.powi(i)).collect();
        state.iteration = 50;
        state.decide(&cfg, &mut rng);
        assert_eq!(state.quota, 1.0);
    }

    #[test]
    fn zero_and_constant_histories_keep_quota_finite() {
        let cfg = config(0);
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut state = VariationState::new(&cfg);
        for step in 0..2_000 {
            if state.decide(&cfg, &mut rng) {
                let value = if step < 1_000 { 0.0 } else { 1.0 };
                state.observe(&cfg, PsfStats { psf_norm: value, ratio: value });
            }
            assert!(state.quota.is_finite() && state.quota >= 1.0 && state.quota <= 40.0);
        }
    }

    #[test]
    fn every_full_window_has_exactly_floor_s_sam_steps() {
        let cfg = config(60);
        let mut rng = ChaCha8Rng::seed_from_u64(42);
        let mut state = VariationState::new(&cfg);
        for _ in 0..60 {
            assert!(state.decide(&cfg, &mut rng));
            state.observe(&cfg, PsfStats { psf_norm: 1.0, ratio: 0.1 });
        }
        // Skip the partial window J = 1..49.
        for _ in 1..50 {
            state.decide(&cfg, &mut rng);
        }
        let mut growth = 1.0;
        for _window in 0..30 {
            let mut count = 0;
            let mut quota = None;
            for _ in 0..50 {
                let sam = state.decide(&cfg, &mut rng);
                quota.get_or_insert(state.quota.floor() as usize);
                if sam {
                    count += 1;
                    growth *= 1.07;
                    state.observe(&cfg, PsfStats { psf_norm: growth, ratio: 0.1 * growth });
                }
            }
            assert_eq!(count, quota.unwrap());
        }
    }
}
