//! Sharpness-aware training inside Burn's `Learner` (feature `train`).
//!
//! Burn's Learner takes a concrete `ModuleOptimizer` and calls `TrainStep::step` once per batch,
//! so the second pass runs inside the train step: [`SamHandle::train_step`] runs pass 1, asks the
//! gate, runs pass 2 on a perturbed clone only on SAM steps, applies the reuse rule on cheap
//! steps, and returns the direction as the step's gradients. The Learner's own optimizer (any
//! `ModuleOptimizer`), scheduler, metrics and checkpoints stay as they are.
//!
//! One gate decision covers one optimizer step: every device of a multi-device step and every
//! micro-batch of an accumulated step takes the same decision. The step boundary is
//! [`SamHandle::optimize`], which the model's `TrainStep::optimize` calls.
//!
//! See `docs/learner.md` for the integration, the multi-device semantics and checkpointing.

mod checkpoint;
mod metrics;
mod output;

pub use checkpoint::{SamCheckpointer, SamCheckpointing, SamTrainingExt};
pub use metrics::{GradientPassesMetric, PsfRatioMetric, SamFractionMetric, SamQuotaMetric, SamStepInfo};
pub use output::SamOutput;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer, MultiGradientsParams};
use burn::tensor::Tensor;
use burn::train::TrainOutput;

use crate::config::SamConfig;
use crate::engine::{cheap_direction, evaluate_sam, perturb, step_first_pass, EngineRecord, SamEngine};
use crate::error::Result;
use crate::telemetry::StepTelemetry;

/// Default bound on the train steps of one round (devices × accumulated micro-batches).
const DEFAULT_MAX_STEPS_PER_ROUND: u64 = 256;

#[derive(Debug)]
struct Shared {
    engine: SamEngine,
    steps_in_round: u64,
    max_steps_per_round: u64,
    snapshots: BTreeMap<usize, SamEngine>,
    pending_restore: Option<EngineRecord>,
}

/// The SAM state of a Learner run, shared by every clone of the model it lives in.
///
/// Put it in the model as a `#[module(skip)]` field; cloning and forking the model (the Learner
/// does both, per device) share it. Use one handle per run: a new handle starts fresh.
#[derive(Clone)]
pub struct SamHandle {
    shared: Arc<Mutex<Shared>>,
}

impl std::fmt::Debug for SamHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let telemetry = self.telemetry();
        f.debug_struct("SamHandle")
            .field("policy", &self.lock().engine.config().policy.name())
            .field("steps", &telemetry.step)
            .field("sam_steps", &telemetry.sam_steps)
            .finish()
    }
}

impl SamHandle {
    /// A fresh handle; every field of `config` is checked first.
    pub fn new(config: &SamConfig) -> Result<Self> {
        Ok(Self {
            shared: Arc::new(Mutex::new(Shared {
                engine: SamEngine::new(config)?,
                steps_in_round: 0,
                max_steps_per_round: DEFAULT_MAX_STEPS_PER_ROUND,
                snapshots: BTreeMap::new(),
                pending_restore: None,
            })),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic in another train step poisons the lock; the state itself stays consistent
        // because every update under the lock is a handful of assignments.
        self.shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// One train step: pass 1, the gate, pass 2 on the perturbed clone on SAM steps, the reuse
    /// rule on cheap steps. Returns the direction as the gradients for the Learner's optimizer.
    ///
    /// `forward` runs forward + loss on the module it is given and returns the scalar loss and the
    /// item for the metrics; it is called on `model`, and on SAM steps a second time on the
    /// perturbed copy (that output is dropped). `input` is cloned for the second call.
    ///
    /// # Panics
    ///
    /// - When a checkpoint restored by [`SamCheckpointer`] does not fit `model` (missing
    ///   parameter ids or other shapes); the message names the first mismatch.
    /// - When more train steps than [`with_max_steps_per_round`](Self::with_max_steps_per_round)
    ///   run without [`optimize`](Self::optimize): `TrainStep::optimize` is not wired, and every
    ///   step would silently share one gate decision.
    pub fn train_step<M, I, O, F>(&self, model: &M, input: I, mut forward: F) -> TrainOutput<SamOutput<O>>
    where
        M: Module,
        I: Clone,
        F: FnMut(&M, I) -> (Tensor<1>, O),
    {
        let (loss, output) = forward(model, input.clone());
        let grads = GradientsParams::from_grads(loss.backward(), model);

        let (sam, config, wants_grad_norm, term, cache) = {
            let mut shared = self.lock();
            shared.apply_pending_restore(model);
            shared.bound_round();
            let sam = shared.engine.ensure_round();
            shared.steps_in_round += 1;
            let engine = &shared.engine;
            (
                sam,
                engine.config().clone(),
                engine.gate().wants_grad_norm(),
                engine.cheap_term(),
                (!sam).then(|| engine.cache().clone()),
            )
        };
        let first = step_first_pass(&config, model, grads, &loss, sam, wants_grad_norm);
        let manifest = first.manifest();

        let (direction, telemetry) = match perturb(&config, model, &first) {
            Some(perturbed) => {
                let (loss, _) = forward(&perturbed, input);
                let second = GradientsParams::from_grads(loss.backward(), &perturbed);
                let flags = self.lock().engine.take_non_finite_flags();
                let outcome = evaluate_sam(&config, model, first, second, flags);
                let telemetry = {
                    let mut shared = self.lock();
                    shared.engine.set_manifest(manifest);
                    shared.engine.record_sam(&outcome)
                };
                (outcome.direction(model), telemetry)
            }
            None => {
                let telemetry = {
                    let mut shared = self.lock();
                    shared.engine.set_manifest(manifest);
                    shared.engine.record_cheap(&first)
                };
                let cache = cache.unwrap_or_default();
                (cheap_direction(&config, model, first, term, &cache), telemetry)
            }
        };
        TrainOutput {
            grads: direction,
            item: SamOutput::new(output, telemetry),
        }
    }

    /// Ends the optimizer step's round, then applies the base optimizer. Call it from
    /// `TrainStep::optimize`.
    pub fn optimize<M: Module>(
        &self,
        model: M,
        optim: &mut ModuleOptimizer,
        lr: ModuleLearningRate,
        grads: GradientsParams,
    ) -> M {
        self.end_round();
        optim.step(lr, model, grads)
    }

    /// [`optimize`](Self::optimize) for gradients from several devices; call it from
    /// `TrainStep::optimize_multi`.
    pub fn optimize_multi<M: Module>(
        &self,
        model: M,
        optim: &mut ModuleOptimizer,
        lr: ModuleLearningRate,
        grads: MultiGradientsParams,
    ) -> M {
        self.end_round();
        optim.step_multi(lr, model, grads)
    }

    /// Ends the current round: the cache and the gate learn from its steps, and the next train
    /// step takes a new decision.
    pub fn end_round(&self) {
        let mut shared = self.lock();
        shared.engine.end_round();
        shared.steps_in_round = 0;
    }

    /// Sets the most train steps one optimizer step may hold (devices × accumulated
    /// micro-batches; default 256). More means `optimize` is not wired, which is reported.
    pub fn with_max_steps_per_round(self, max: u64) -> Self {
        self.lock().max_steps_per_round = max.max(1);
        self
    }

    /// What the last train step did and the totals so far.
    pub fn telemetry(&self) -> StepTelemetry {
        self.lock().engine.telemetry()
    }

    /// A copy of the engine state, e.g. to save it with [`SamEngine::to_record`].
    pub fn engine(&self) -> SamEngine {
        self.lock().engine.clone()
    }

    /// Keeps a copy of the current state for the checkpoint of `epoch`. Cheap: tensors are shared,
    /// nothing is read from the device.
    pub fn snapshot(&self, epoch: usize) {
        let mut shared = self.lock();
        let engine = shared.engine.clone();
        shared.snapshots.insert(epoch, engine);
    }

    pub(crate) fn take_snapshot(&self, epoch: usize) -> Option<SamEngine> {
        self.lock().snapshots.remove(&epoch)
    }

    /// Restores a saved state; it is checked against the model and applied at the next train
    /// step (the model is not known before).
    pub fn restore(&self, record: EngineRecord) {
        self.lock().pending_restore = Some(record);
    }
}

impl Shared {
    fn apply_pending_restore<M: Module>(&mut self, model: &M) {
        if let Some(record) = self.pending_restore.take() {
            let steps = record.steps();
            if let Err(err) = self.engine.load_record(record, model) {
                panic!("the restored SAM state (taken after {steps} steps) does not fit the model: {err}");
            }
            self.steps_in_round = 0;
            log::info!("SAM state restored: continuing after {steps} train steps");
        }
    }

    /// A round ends at `optimize`; one that outgrows any real optimizer step means the model's
    /// `TrainStep::optimize` does not call it.
    fn bound_round(&mut self) {
        if self.steps_in_round >= self.max_steps_per_round {
            panic!(
                "{} train steps ran without `SamHandle::optimize`: override `TrainStep::optimize` \
                 (and `optimize_multi`) to call it, so that one gate decision covers one optimizer \
                 step (see docs/learner.md); if one optimizer step really holds more train steps, \
                 raise `SamHandle::with_max_steps_per_round`",
                self.steps_in_round
            );
        }
    }
}
