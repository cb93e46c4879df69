//! The tensor engine shared by every member of the family: the gate decides, the first pass is
//! measured, a perturbed clone is built for SAM steps, the PSF is cached, and cheap steps mix the
//! cache back in. The result is a direction for any Burn base optimizer.
//!
//! One step, in three parts:
//!
//! - the engine **plans** it ([`SamEngine::plan`]: the gate's decision, the cheap term, the cache
//!   to read), which is all the state the tensor work needs;
//! - the pure tensor functions of [`step`] run the passes, free of engine state;
//! - the engine **commits** the outcome (counts, statistics, the next cache).
//!
//! [`pass`] strings the three together once, for every driver: [`SamEngine::first_pass`] (users
//! who run the passes themselves), [`SamOptimizer::step`](crate::SamOptimizer::step) and the
//! Learner's `SamHandle::train_step`.
//!
//! Host reads: one small read per SAM step (the statistics, the loss and the non-finite counter,
//! together); none on cheap steps, except AE-SAM's ‖g‖² of the previous step.

mod pass;
mod record;
mod round;
mod step;
pub(crate) mod tensors;

pub use pass::{CheapPass, Pass, SamPass};
pub(crate) use pass::{EngineAccess, EngineRef};
pub use record::EngineRecord;

use std::sync::Arc;

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::config::SamConfig;
use crate::error::Result;
use crate::policy::{Gate, PsfStats};
use crate::reuse::CheapTerm;
use crate::telemetry::StepTelemetry;
use round::Round;
use step::{FirstPass, Readback, ReuseCache, SamOutcome};

/// The engine's scalar state, all of it: what the engine runs on and, as JSON, what its record
/// stores (next to the cached tensors).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct EngineState {
    /// The gate: rule, state, RNG position.
    pub gate: Gate,
    /// Cheap steps since the cache was stored.
    pub since_cache: u32,
    /// Steps finished (train steps: with gradient accumulation or several devices, one per
    /// micro-batch or device).
    pub steps: u64,
    /// Of those, SAM steps.
    pub sam_steps: u64,
    /// Gradient passes run.
    pub passes: u64,
    /// Gate decisions taken (optimizer steps).
    pub rounds: u64,
    /// Steps with a non-finite loss or gradient, as known on the host so far.
    pub non_finite_steps: u64,
    /// Statistics of the last successful SAM step.
    pub last_stats: Option<PsfStats>,
    /// Whether the last step was a SAM step.
    pub last_sam: bool,
    /// Whether the last SAM step was skipped as non-finite.
    pub last_skipped: bool,
    /// Parameters (id, shape) of the last step, to check a restored record against a module.
    pub manifest: Vec<(u64, Vec<usize>)>,
}

/// What one step needs from the engine: the decision, the cheap term and the cache it reads.
/// Taken under the engine's lock in the Learner, used without it.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub sam: bool,
    pub term: CheapTerm,
    /// The cache a cheap step reads (empty on SAM steps).
    pub cache: Arc<ReuseCache>,
    pub config: SamConfig,
    pub wants_grad_norm: bool,
}

/// Gate, PSF cache and tensor work of the SAM family, without a base optimizer.
///
/// [`SamOptimizer`](crate::SamOptimizer) combines it with a base optimizer for custom loops;
/// [`first_pass`](Self::first_pass) drives the passes by hand.
#[derive(Clone, Debug)]
pub struct SamEngine {
    config: SamConfig,
    state: EngineState,
    cache: Arc<ReuseCache>,
    /// ‖g‖² of the last round's cheap steps, still on the device (AE-SAM only).
    pending_grad_sq: Option<Tensor<1>>,
    /// Non-finite cheap steps counted on the device since the last read.
    device_non_finite: Option<Tensor<1>>,
    round: Option<Round>,
}

impl SamEngine {
    /// Builds an engine; every field of `config` is checked first.
    pub fn new(config: &SamConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            state: EngineState {
                gate: Gate::new(config.policy.clone(), config.seed)?,
                since_cache: 0,
                steps: 0,
                sam_steps: 0,
                passes: 0,
                rounds: 0,
                non_finite_steps: 0,
                last_stats: None,
                last_sam: false,
                last_skipped: false,
                manifest: Vec::new(),
            },
            config: config.clone(),
            cache: Arc::default(),
            pending_grad_sq: None,
            device_non_finite: None,
            round: None,
        })
    }

    /// The configuration this engine runs.
    pub fn config(&self) -> &SamConfig {
        &self.config
    }

    /// The gate, for inspection.
    pub fn gate(&self) -> &Gate {
        &self.state.gate
    }

    /// Step 1 of a step driven by hand: takes the pass-1 gradients and loss of `module`, asks the
    /// gate, and returns a [`Pass::Sam`] (run the second pass on
    /// [`SamPass::perturbed`], then [`SamPass::finish`]) or a [`Pass::Cheap`]
    /// ([`CheapPass::finish`]). The pass borrows the engine until it is finished, so steps cannot
    /// interleave; a pass dropped unfinished leaves the engine as if the step had not run,
    /// except that the gate has decided once.
    ///
    /// ```rust
    /// # use burn::nn::{Linear, LinearConfig};
    /// # use burn::optim::{GradientsParams, Optimizer, SgdConfig};
    /// # use burn::prelude::*;
    /// use burn_sam_sample::{Pass, SamConfig, SamEngine};
    ///
    /// # let device = burn_sam_sample::backend::cpu_device().autodiff();
    /// let mut model: Linear = LinearConfig::new(4, 1).init(&device);
    /// let mut engine = SamEngine::new(&SamConfig::vsam(10)).unwrap();
    /// let mut sgd = SgdConfig::new().init();
    /// let x = Tensor::<2>::ones([8, 4], &device);
    /// let loss_of = |m: &Linear| m.forward(x.clone()).powi_scalar(2).mean();
    /// for _ in 0..20 {
    ///     let loss = loss_of(&model);
    ///     let grads = GradientsParams::from_grads(loss.backward(), &model);
    ///     let (direction, telemetry) = match engine.first_pass(&model, grads, &loss) {
    ///         Pass::Sam(pass) => {
    ///             let perturbed = pass.perturbed(&model);
    ///             let second = GradientsParams::from_grads(loss_of(&perturbed).backward(), &perturbed);
    ///             pass.finish(&model, second)
    ///         }
    ///         Pass::Cheap(pass) => pass.finish(&model),
    ///     };
    ///     model = sgd.step(0.1, model, direction);
    ///     assert!(telemetry.step > 0);
    /// }
    /// ```
    ///
    /// A SAM pass cannot be finished without the second pass's gradients, a cheap one takes
    /// none, and a second step cannot start while a pass is open:
    ///
    /// ```compile_fail,E0499
    /// # use burn::nn::{Linear, LinearConfig};
    /// # use burn::optim::GradientsParams;
    /// # use burn::prelude::*;
    /// # use burn_sam_sample::{SamConfig, SamEngine};
    /// # let device = burn_sam_sample::backend::cpu_device().autodiff();
    /// # let model: Linear = LinearConfig::new(4, 1).init(&device);
    /// # let x = Tensor::<2>::ones([8, 4], &device);
    /// let mut engine = SamEngine::new(&SamConfig::sam()).unwrap();
    /// let loss = model.forward(x.clone()).mean();
    /// let pass = engine.first_pass(&model, GradientsParams::from_grads(loss.backward(), &model), &loss);
    /// let loss = model.forward(x).mean();
    /// let other = engine.first_pass(&model, GradientsParams::from_grads(loss.backward(), &model), &loss);
    /// drop(pass);
    /// ```
    pub fn first_pass<M: Module>(&mut self, module: &M, grads: GradientsParams, loss: &Tensor<1>) -> Pass<'_> {
        Pass::begin(self, module, grads, loss)
    }

    /// Decides the step: opens a round unless one is open (the lagged ‖g‖² is fed to the gate
    /// first), and returns what the tensor work needs. With `new_round`, any open round (a step
    /// abandoned before its end) is dropped first.
    pub(crate) fn plan(&mut self, new_round: bool) -> Plan {
        if new_round {
            self.round = None;
        }
        let round = match self.round.take() {
            Some(round) => round,
            None => {
                if let Some(grad_sq) = self.pending_grad_sq.take() {
                    self.state.gate.observe_grad_norm_sq(grad_sq.into_scalar::<f32>() as f64);
                }
                let sam = self.state.gate.decide();
                let term = if sam || self.cache.is_empty() {
                    CheapTerm::Plain
                } else {
                    self.config.reuse.cheap_term(self.state.since_cache.saturating_add(1))
                };
                Round::open(sam, term)
            }
        };
        let plan = Plan {
            sam: round.sam,
            term: round.term,
            cache: if round.sam { Arc::default() } else { Arc::clone(&self.cache) },
            config: self.config.clone(),
            wants_grad_norm: self.state.gate.wants_grad_norm(),
        };
        self.round = Some(round);
        plan
    }

    /// Whether a round is open (between its decision and its end).
    pub(crate) fn in_round(&self) -> bool {
        self.round.is_some()
    }

    /// Takes the device-side non-finite flags of earlier cheap steps, to read with a SAM step.
    pub(crate) fn take_non_finite_flags(&mut self) -> Option<Tensor<1>> {
        self.device_non_finite.take()
    }

    /// Books a cheap step (no host read).
    pub(crate) fn commit_cheap(&mut self, first: &FirstPass) -> StepTelemetry {
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
        if let (Some(round), true) = (self.round.as_mut(), self.state.gate.wants_grad_norm()) {
            round.add_device_grad_sq(first.grad_sq.clone());
        }
        self.state.manifest = first.manifest();
        let state = &mut self.state;
        state.steps = state.steps.saturating_add(1);
        state.passes = state.passes.saturating_add(1);
        state.last_sam = false;
        state.last_skipped = false;
        self.telemetry()
    }

    /// Books a SAM step from its evaluated outcome.
    pub(crate) fn commit_sam(&mut self, outcome: &SamOutcome, manifest: Vec<(u64, Vec<usize>)>) -> StepTelemetry {
        let readback = outcome.readback;
        self.record_cheap_non_finite(readback.cheap_non_finite);
        // A step whose round was dropped (a pass abandoned, then finished) is booked but teaches
        // nothing.
        let mut detached = Round::open(true, CheapTerm::Plain);
        let round = self.round.as_mut().unwrap_or(&mut detached);
        if readback.second_ok() {
            round.add_sam(readback.stats(), readback.grad_sq, outcome.cache_tensors(&self.config.reuse), || {
                (outcome.layout(self.config.cache_precision), outcome.device.clone())
            });
            self.state.last_stats = Some(readback.stats());
            self.state.last_skipped = false;
        } else {
            warn_skipped(self.state.steps, &readback);
            if readback.first_ok() {
                round.add_grad_sq(readback.grad_sq);
            }
            self.state.non_finite_steps = self.state.non_finite_steps.saturating_add(1);
            self.state.last_skipped = true;
        }
        self.state.manifest = manifest;
        let state = &mut self.state;
        state.steps = state.steps.saturating_add(1);
        state.sam_steps = state.sam_steps.saturating_add(1);
        state.passes = state.passes.saturating_add(2);
        state.last_sam = true;
        self.telemetry()
    }

    /// Closes a round: the cache becomes the mean of the round's contributions, the gate learns
    /// the mean of its statistics.
    pub(crate) fn end_round(&mut self) {
        let Some(round) = self.round.take() else {
            return;
        };
        self.state.rounds = self.state.rounds.saturating_add(1);
        let closed = round.close();
        if let Some((tensors, layout, device)) = closed.cache {
            self.cache = Arc::new(ReuseCache::new(tensors, &self.config.reuse, &layout, &device));
            self.state.since_cache = 0;
        } else if !closed.sam {
            self.state.since_cache = self.state.since_cache.saturating_add(1);
        }
        if let Some(stats) = closed.stats {
            self.state.gate.observe_sam(stats);
        }
        if let Some(grad_sq) = closed.grad_sq_host {
            self.state.gate.observe_grad_norm_sq(grad_sq);
            self.pending_grad_sq = None;
        } else if let Some(grad_sq) = closed.grad_sq_device {
            self.pending_grad_sq = Some(grad_sq);
        }
    }

    fn record_cheap_non_finite(&mut self, count: f64) {
        if count > 0.0 {
            let count = count.round() as u64;
            log::warn!(
                "{count} cheap step(s) before step {} had a non-finite loss or gradient; their \
                 updates were zeroed",
                self.state.steps
            );
            self.state.non_finite_steps = self.state.non_finite_steps.saturating_add(count);
        }
    }

    /// Reads the device-side count of non-finite cheap steps (one host read) and returns the
    /// telemetry with it.
    pub fn sync_telemetry(&mut self) -> StepTelemetry {
        if let Some(count) = self.device_non_finite.take() {
            let count = count.into_scalar::<f32>() as f64;
            self.record_cheap_non_finite(count);
        }
        self.telemetry()
    }

    /// What the last finished step did, and the totals so far. Reads nothing from the device.
    pub fn telemetry(&self) -> StepTelemetry {
        let state = &self.state;
        StepTelemetry {
            step: state.steps,
            sam: state.last_sam,
            skipped: state.last_skipped,
            passes: state.passes,
            sam_steps: state.sam_steps,
            rounds: state.rounds,
            sam_fraction: if state.steps == 0 { 0.0 } else { state.sam_steps as f64 / state.steps as f64 },
            quota: state.gate.quota(),
            target_fraction: state.gate.target_fraction(),
            warmup: state.gate.in_warmup(),
            psf_norm: state.last_stats.map(|s| s.psf_norm),
            psf_ratio: state.last_stats.map(|s| s.ratio),
            non_finite_steps: state.non_finite_steps,
            cache_bytes: self.cache.bytes(),
        }
    }
}

/// Logs a SAM step whose loss or gradient was not finite, and what was done instead.
fn warn_skipped(step: u64, readback: &Readback) {
    if readback.first_ok() {
        log::warn!(
            "step {step}: the second-pass gradient is not finite; the first-pass gradient is used, \
             nothing is cached and the gate statistics are unchanged"
        );
    } else {
        log::warn!(
            "step {step}: the loss ({}) or gradient (‖g‖² = {}) is not finite; the update is zeroed, \
             nothing is cached and the gate statistics are unchanged",
            readback.loss,
            readback.grad_sq
        );
    }
}
