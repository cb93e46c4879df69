//! Per-step telemetry.

use serde::{Deserialize, Serialize};

/// What the last step did, and the totals of the run so far.
///
/// Reading it costs nothing: every field is already on the host.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct StepTelemetry {
    /// Train steps finished so far: one per call of `SamOptimizer::step`; in the Learner one
    /// per micro-batch and device (see [`rounds`](Self::rounds) for optimizer steps).
    pub step: u64,
    /// Whether the last step ran the second pass.
    pub sam: bool,
    /// Whether the last SAM step was skipped for a non-finite loss or gradient.
    pub skipped: bool,
    /// Gradient passes so far (one per step, two per SAM step).
    pub passes: u64,
    /// SAM steps so far.
    pub sam_steps: u64,
    /// Gate decisions so far (optimizer steps); equals `step` in a custom loop, and is smaller
    /// in the Learner when one optimizer step holds several devices or accumulated micro-batches.
    pub rounds: u64,
    /// SAM steps / steps so far.
    pub sam_fraction: f64,
    /// The vSAM quota s (SAM steps per window), for the variation gate.
    pub quota: Option<f64>,
    /// The fraction of SAM steps the gate aims at now: s/K (floored quota) for the variation
    /// gate, the current rate for the trend gate.
    pub target_fraction: Option<f64>,
    /// Whether the vSAM or trend gate is still in its all-SAM warm-up.
    pub warmup: bool,
    /// ‖PSF‖ over the last N tensors at the last successful SAM step.
    pub psf_norm: Option<f64>,
    /// ‖PSF‖/‖g‖ over the last N tensors at the last successful SAM step.
    pub psf_ratio: Option<f64>,
    /// Steps with a non-finite loss or gradient known so far (cheap steps are counted on the
    /// device and become known at the next SAM step or [`sync_telemetry`](crate::SamOptimizer::sync_telemetry)).
    pub non_finite_steps: u64,
    /// Bytes the reuse cache occupies now (its tensors in their storage dtype, see
    /// [`CachePrecision`](crate::reuse::CachePrecision)); 0 before the first SAM step and for
    /// rules that cache nothing.
    #[serde(default)]
    pub cache_bytes: u64,
    /// Device-to-host reads the engine's steps made so far: one per SAM step, none per cheap
    /// step (AE-SAM: one more per cheap optimizer step, its lagged ‖g‖²), one per
    /// [`sync_telemetry`](crate::SamOptimizer::sync_telemetry) that had a count to read.
    /// Records taken for checkpoints read the cache besides and are not counted.
    #[serde(default)]
    pub host_reads: u64,
}

impl StepTelemetry {
    /// Mean gradient passes per step so far (1 for the base optimizer, 2 for SAM).
    pub fn passes_per_step(&self) -> f64 {
        if self.step == 0 {
            0.0
        } else {
            self.passes as f64 / self.step as f64
        }
    }
}
