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
pub(crate) use record::{pack_tensor, read_all, read_file, sealed_writer};
pub use step::FirstPass;
pub(crate) use step::{cheap_direction, evaluate_sam, first_pass as step_first_pass, perturb, ReuseCache, SamOutcome};

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
    /// Steps finished (train steps: with gradient accumulation or several devices, one per
    /// micro-batch or device).
    pub steps: u64,
    /// Of those, SAM steps (second pass run).
    pub sam_steps: u64,
    /// Gradient passes run (one per step, two per SAM step).
    pub passes: u64,
    /// Gate decisions taken (optimizer steps); equals `steps` in a custom loop.
    pub rounds: u64,
    /// Steps whose loss or gradient was not finite, as known on the host so far (cheap steps are
    /// counted on the device and read at the next SAM step or record).
    pub non_finite_steps: u64,
}

/// One gate decision and what the steps under it reported. A custom loop has one step per
/// round; the Learner integration has one per micro-batch and device of an optimizer step.
#[derive(Clone, Debug)]
pub(crate) struct Round {
    pub sam: bool,
    pub term: CheapTerm,
    cache_sum: Option<(std::collections::HashMap<ParamId, Tensor<1>>, Vec<ParamId>, burn::tensor::Device)>,
    contributions: u32,
    stats: Vec<PsfStats>,
    grad_sq_host: Vec<f64>,
    grad_sq_device: Option<Tensor<1>>,
    grad_sq_count: u32,
}

impl Round {
    fn closed() -> Self {
        Self {
            sam: true,
            term: CheapTerm::Plain,
            cache_sum: None,
            contributions: 0,
            stats: Vec::new(),
            grad_sq_host: Vec::new(),
            grad_sq_device: None,
            grad_sq_count: 0,
        }
    }
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
    round: Option<Round>,
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
            round: None,
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
        self.round = None;
        let sam = self.ensure_round();
        self.first_pass_in(sam, module, grads, loss)
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
        match (&self.round, first.sam, &second) {
            (Some(round), true, Some(_)) | (Some(round), false, None) if round.sam == first.sam => {}
            (None, ..) => {
                return Err(SamError::Protocol(format!(
                    "step {}: `finish` without a matching `first_pass`",
                    self.counters.steps
                )))
            }
            (_, true, _) => {
                return Err(SamError::Protocol(format!(
                    "step {} is a SAM step: `finish` needs the second-pass gradients",
                    self.counters.steps
                )))
            }
            (_, false, _) => {
                return Err(SamError::Protocol(format!(
                    "step {} is a cheap step: `finish` expects no second-pass gradients",
                    self.counters.steps
                )))
            }
        }
        let direction = match second {
            Some(second) => {
                let flags = self.take_non_finite_flags();
                let outcome = step::evaluate_sam(&self.config, module, first, second, flags);
                self.record_sam(&outcome);
                outcome.direction(module)
            }
            None => {
                let term = self.cheap_term();
                self.record_cheap(&first);
                step::cheap_direction(&self.config, module, first, term, &self.cache)
            }
        };
        self.end_round();
        Ok(direction)
    }

    /// Decides a new round unless one is open; returns its decision. The lagged ‖g‖² is fed to
    /// the gate first.
    pub(crate) fn ensure_round(&mut self) -> bool {
        if let Some(round) = &self.round {
            return round.sam;
        }
        if let Some(grad_sq) = self.pending_grad_sq.take() {
            self.gate.observe_grad_norm_sq(grad_sq.into_scalar::<f32>() as f64);
        }
        let sam = self.gate.decide();
        let term = if sam || self.cache.is_empty() {
            CheapTerm::Plain
        } else {
            self.config.reuse.cheap_term(self.since_cache.saturating_add(1))
        };
        self.round = Some(Round { sam, term, ..Round::closed() });
        sam
    }

    /// Whether a round is open (between its decision and its end).
    pub(crate) fn in_round(&self) -> bool {
        self.round.is_some()
    }

    /// What cheap steps of the open round add to their gradient.
    pub(crate) fn cheap_term(&self) -> CheapTerm {
        self.round.as_ref().map_or(CheapTerm::Plain, |round| round.term)
    }

    /// The first pass of one step under the open round's decision `sam`.
    pub(crate) fn first_pass_in<M: Module>(
        &mut self,
        sam: bool,
        module: &M,
        grads: GradientsParams,
        loss: &Tensor<1>,
    ) -> FirstPass {
        let first = step::first_pass(&self.config, module, grads, loss, sam, self.gate.wants_grad_norm());
        self.manifest = first.manifest();
        first
    }

    /// Records the parameters of the last step, for saving.
    pub(crate) fn set_manifest(&mut self, manifest: Vec<(ParamId, Shape)>) {
        self.manifest = manifest;
    }

    /// The cache cheap steps of the current round read.
    pub(crate) fn cache(&self) -> &ReuseCache {
        &self.cache
    }

    /// Takes the device-side non-finite flags of earlier cheap steps, to read with a SAM step.
    pub(crate) fn take_non_finite_flags(&mut self) -> Option<Tensor<1>> {
        self.device_non_finite.take()
    }

    /// Books a cheap step of `round` (no host read).
    pub(crate) fn record_cheap(&mut self, first: &FirstPass) -> StepTelemetry {
        if self.config.guard_non_finite {
            let flag = first.non_finite_flag();
            self.device_non_finite = Some(match self.device_non_finite.take() {
                Some(count) => {
                    let device = count.device();
                    count + flag.to_device(&device)
                }
                None => flag,
            });
        }
        if let (Some(round), true) = (self.round.as_mut(), self.gate.wants_grad_norm()) {
            let grad_sq = first.grad_sq.clone();
            round.grad_sq_device = Some(match round.grad_sq_device.take() {
                Some(sum) => {
                    let device = sum.device();
                    sum + grad_sq.to_device(&device)
                }
                None => grad_sq,
            });
            round.grad_sq_count = round.grad_sq_count.saturating_add(1);
        }
        self.counters.steps = self.counters.steps.saturating_add(1);
        self.counters.passes = self.counters.passes.saturating_add(1);
        self.last_sam = false;
        self.last_skipped = false;
        self.telemetry()
    }

    /// Books a SAM step of `round` from its evaluated outcome.
    pub(crate) fn record_sam(&mut self, outcome: &SamOutcome) -> StepTelemetry {
        let readback = outcome.readback;
        self.record_cheap_non_finite(readback.cheap_non_finite);
        let mut detached = None;
        let round = match self.round.as_mut() {
            Some(round) => round,
            // Steps outside any round (only after misuse) are booked but teach nothing.
            None => detached.get_or_insert(Round::closed()),
        };
        if readback.second_ok() {
            round.stats.push(readback.stats());
            round.grad_sq_host.push(readback.grad_sq);
            if let Some(tensors) = outcome.cache_tensors(&self.config.reuse) {
                round.contributions = round.contributions.saturating_add(1);
                round.cache_sum = Some(match round.cache_sum.take() {
                    None => (tensors, outcome.order(), outcome.device.clone()),
                    Some((mut sum, order, device)) => {
                        for (id, tensor) in tensors {
                            let tensor = tensor.to_device(&device);
                            let total = match sum.remove(&id) {
                                Some(previous) => previous + tensor,
                                None => tensor,
                            };
                            sum.insert(id, total);
                        }
                        (sum, order, device)
                    }
                });
            }
            self.last_stats = Some(readback.stats());
            self.last_skipped = false;
        } else {
            warn_skipped(self.counters.steps, &readback);
            if readback.first_ok() {
                round.grad_sq_host.push(readback.grad_sq);
            }
            self.counters.non_finite_steps = self.counters.non_finite_steps.saturating_add(1);
            self.last_skipped = true;
        }
        self.counters.steps = self.counters.steps.saturating_add(1);
        self.counters.sam_steps = self.counters.sam_steps.saturating_add(1);
        self.counters.passes = self.counters.passes.saturating_add(2);
        self.last_sam = true;
        self.telemetry()
    }

    /// Closes a round: the cache becomes the mean of the round's contributions, the gate learns
    /// the mean of its statistics.
    pub(crate) fn end_round(&mut self) {
        let Some(round) = self.round.take() else {
            return;
        };
        self.counters.rounds = self.counters.rounds.saturating_add(1);
        if let Some((sum, order, device)) = round.cache_sum {
            let tensors = if round.contributions > 1 {
                let scale = 1.0 / round.contributions as f64;
                sum.into_iter().map(|(id, t)| (id, t.mul_scalar(scale))).collect()
            } else {
                sum
            };
            self.cache = ReuseCache::new(tensors, &self.config.reuse, &order, &device);
            self.since_cache = 0;
        } else if !round.sam {
            self.since_cache = self.since_cache.saturating_add(1);
        }
        if !round.stats.is_empty() {
            let n = round.stats.len() as f64;
            let mean = PsfStats {
                psf_norm: round.stats.iter().map(|s| s.psf_norm).sum::<f64>() / n,
                ratio: round.stats.iter().map(|s| s.ratio).sum::<f64>() / n,
            };
            self.gate.observe_sam(mean);
        }
        if !round.grad_sq_host.is_empty() {
            let mean = round.grad_sq_host.iter().sum::<f64>() / round.grad_sq_host.len() as f64;
            self.gate.observe_grad_norm_sq(mean);
            self.pending_grad_sq = None;
        } else if let Some(sum) = round.grad_sq_device {
            self.pending_grad_sq = Some(if round.grad_sq_count > 1 {
                sum.div_scalar(round.grad_sq_count as f64)
            } else {
                sum
            });
        }
    }

    fn record_cheap_non_finite(&mut self, count: f64) {
        if count > 0.0 {
            let count = count.round() as u64;
            log::warn!(
                "{count} cheap step(s) before step {} had a non-finite loss or gradient; their \
                 updates were zeroed",
                self.counters.steps
            );
            self.counters.non_finite_steps = self.counters.non_finite_steps.saturating_add(count);
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
            target_fraction: self.gate.target_fraction(),
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
