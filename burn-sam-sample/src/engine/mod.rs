//! The tensor engine shared by every member of the family: the first pass is measured, the gate
//! decides, a perturbed clone is built for SAM steps, the PSF is cached, and cheap steps mix the
//! cache back in. The result is a direction for any Burn base optimizer.
//!
//! The protocol for one step:
//!
//! 1. [`SamEngine::first_pass`] with the pass-1 gradients and loss; the gate decides here;
//! 2. [`SamEngine::perturb`] returns the perturbed module on SAM steps (`None` on cheap steps);
//!    run the second forward/backward pass on it;
//! 3. [`SamEngine::finish`] with the second-pass gradients (SAM steps) or `None` (cheap steps)
//!    returns the direction to hand to the base optimizer.
//!
//! Host reads: one small read per SAM step (the statistics, the loss and the non-finite counter,
//! together); none on cheap steps, except AE-SAM's ‖g‖² of the previous step.

mod record;
mod step;
pub(crate) mod tensors;

pub use record::EngineRecord;
pub(crate) use record::{pack_tensor, read_all, read_file, STATE_KEY};
pub use step::FirstPass;
pub(crate) use step::ReuseCache;

use burn::module::{Module, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Shape, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::SamConfig;
use crate::error::{Result, SamError};
use crate::policy::{Gate, PsfStats};
use crate::reuse::CheapTerm;
use crate::telemetry::StepTelemetry;

/// Running totals kept by the engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Steps finished.
    pub steps: u64,
    /// Of those, SAM steps (second pass run).
    pub sam_steps: u64,
    /// Gradient passes run (one per step, two per SAM step).
    pub passes: u64,
    /// Steps whose loss or gradient was not finite, as known on the host so far (cheap steps are
    /// counted on the device and read at the next SAM step or record).
    pub non_finite_steps: u64,
}

/// Gate, PSF cache and tensor work of the SAM family, without a base optimizer.
///
/// [`SamOptimizer`](crate::SamOptimizer) combines it with a base optimizer for custom loops.
#[derive(Clone, Debug)]
pub struct SamEngine {
    config: SamConfig,
    gate: Gate,
    cache: ReuseCache,
    since_cache: u32,
    pending_grad_sq: Option<Tensor<1>>,
    device_non_finite: Option<Tensor<1>>,
    counters: Counters,
    last_stats: Option<PsfStats>,
    last_sam: bool,
    last_skipped: bool,
    manifest: Vec<(ParamId, Shape)>,
}

impl SamEngine {
    /// Builds an engine; every field of `config` is checked first.
    pub fn new(config: &SamConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            gate: Gate::new(config.policy.clone(), config.seed)?,
            config: config.clone(),
            cache: ReuseCache::default(),
            since_cache: 0,
            pending_grad_sq: None,
            device_non_finite: None,
            counters: Counters::default(),
            last_stats: None,
            last_sam: false,
            last_skipped: false,
            manifest: Vec::new(),
        })
    }

    /// The configuration this engine runs.
    pub fn config(&self) -> &SamConfig {
        &self.config
    }

    /// The gate, for inspection.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// Running totals.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Step 1: takes the pass-1 gradients and loss of `module`, and decides the step.
    pub fn first_pass<M: Module>(&mut self, module: &M, grads: GradientsParams, loss: &Tensor<1>) -> FirstPass {
        if let Some(grad_sq) = self.pending_grad_sq.take() {
            self.gate.observe_grad_norm_sq(grad_sq.into_scalar::<f32>() as f64);
        }
        let sam = self.gate.decide();
        let first = step::first_pass(&self.config, module, grads, loss, sam, self.gate.wants_grad_norm());
        self.manifest = first.manifest();
        first
    }

    /// Step 2: the perturbed module `w + ε` for a SAM step, `None` for a cheap step.
    ///
    /// The clone keeps every `ParamId`, require-grad and checkpointing setting; parameters
    /// without a gradient are left as they are; its BatchNorm running statistics are separate
    /// from `module`'s, so the second pass does not update them. `module` is not modified.
    pub fn perturb<M: Module>(&self, module: &M, first: &FirstPass) -> Option<M> {
        step::perturb(&self.config, module, first)
    }

    /// Step 3: the direction for the base optimizer.
    ///
    /// `second` must hold the gradients of the perturbed module on SAM steps and be `None` on
    /// cheap steps; anything else is a protocol error and leaves the engine unchanged.
    pub fn finish<M: Module>(
        &mut self,
        module: &M,
        first: FirstPass,
        second: Option<GradientsParams>,
    ) -> Result<GradientsParams> {
        match (first.sam, second) {
            (true, Some(second)) => Ok(self.finish_sam(module, first, second)),
            (false, None) => Ok(self.finish_cheap(module, first)),
            (true, None) => Err(SamError::Protocol(format!(
                "step {} is a SAM step: `finish` needs the second-pass gradients",
                self.counters.steps
            ))),
            (false, Some(_)) => Err(SamError::Protocol(format!(
                "step {} is a cheap step: `finish` expects no second-pass gradients",
                self.counters.steps
            ))),
        }
    }

    fn finish_cheap<M: Module>(&mut self, module: &M, first: FirstPass) -> GradientsParams {
        self.since_cache = self.since_cache.saturating_add(1);
        let term = if self.cache.is_empty() {
            CheapTerm::Plain
        } else {
            self.config.reuse.cheap_term(self.since_cache)
        };
        if self.config.guard_non_finite {
            let flag = first.non_finite_flag();
            self.device_non_finite = Some(match self.device_non_finite.take() {
                Some(count) => count + flag,
                None => flag,
            });
        }
        if self.gate.wants_grad_norm() {
            self.pending_grad_sq = Some(first.grad_sq.clone());
        }
        let direction = step::cheap_direction(&self.config, module, first, term, &self.cache);
        self.counters.steps += 1;
        self.counters.passes += 1;
        self.last_sam = false;
        self.last_skipped = false;
        direction
    }

    fn finish_sam<M: Module>(&mut self, module: &M, first: FirstPass, second: GradientsParams) -> GradientsParams {
        let outcome = step::evaluate_sam(&self.config, module, first, second, self.device_non_finite.take());
        let readback = outcome.readback;
        self.record_cheap_non_finite(readback.cheap_non_finite);
        let step = self.counters.steps;
        if readback.second_ok() {
            let stats = readback.stats();
            self.gate.observe_sam(stats);
            self.gate.observe_grad_norm_sq(readback.grad_sq);
            self.last_stats = Some(stats);
            self.last_skipped = false;
            if let Some(tensors) = outcome.cache_tensors(&self.config.reuse) {
                self.cache = ReuseCache::new(tensors, &self.config.reuse, &outcome.order(), &outcome.device);
                self.since_cache = 0;
            }
        } else {
            self.counters.non_finite_steps += 1;
            self.last_skipped = true;
            warn_skipped(step, &readback);
            if readback.first_ok() {
                self.gate.observe_grad_norm_sq(readback.grad_sq);
            }
        }
        self.pending_grad_sq = None;
        self.counters.steps += 1;
        self.counters.sam_steps += 1;
        self.counters.passes += 2;
        self.last_sam = true;
        outcome.direction(module)
    }

    fn record_cheap_non_finite(&mut self, count: f64) {
        if count > 0.0 {
            let count = count.round() as u64;
            log::warn!(
                "{count} cheap step(s) before step {} had a non-finite loss or gradient; their \
                 updates were zeroed",
                self.counters.steps
            );
            self.counters.non_finite_steps += count;
        }
    }

    /// Reads the device-side count of non-finite cheap steps into [`Counters`] (one host read).
    pub fn sync_counters(&mut self) -> Counters {
        if let Some(count) = self.device_non_finite.take() {
            let count = count.into_scalar::<f32>() as f64;
            self.record_cheap_non_finite(count);
        }
        self.counters
    }

    /// What the last finished step did, and the totals so far. Reads nothing from the device.
    pub fn telemetry(&self) -> StepTelemetry {
        let c = self.counters;
        StepTelemetry {
            step: c.steps,
            sam: self.last_sam,
            skipped: self.last_skipped,
            passes: c.passes,
            sam_steps: c.sam_steps,
            sam_fraction: if c.steps == 0 { 0.0 } else { c.sam_steps as f64 / c.steps as f64 },
            quota: self.gate.quota(),
            warmup: self.gate.in_warmup(),
            psf_norm: self.last_stats.map(|s| s.psf_norm),
            psf_ratio: self.last_stats.map(|s| s.ratio),
            non_finite_steps: c.non_finite_steps,
        }
    }
}

/// Logs a SAM step whose loss or gradient was not finite, and what was done instead.
pub(crate) fn warn_skipped(step: u64, readback: &step::Readback) {
    if readback.first_ok() {
        log::warn!(
            "step {step}: the second-pass gradient is not finite; the first-pass gradient is used, \
             nothing is cached and the gate statistics are unchanged"
        );
    } else {
        log::warn!(
            "step {step}: the loss ({}) or gradient (‖g‖² = {}) is not finite; no perturbation, the \
             update is zeroed, nothing is cached and the gate statistics are unchanged",
            readback.loss,
            readback.grad_sq
        );
    }
}
