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
//! Checkpoints: [`SamTrainingExt::with_sam_checkpointing`] writes sealed sets (model, optimizer
//! with the SAM state, scheduler) that [`verify_checkpoint`] and [`CheckpointSet::latest`](crate::checkpoint::CheckpointSet::latest) read;
//! [`EpochLoader`] makes a resumed run end with the weights of the uninterrupted one.
//!
//! See `docs/learner.md` for the integration, the multi-device semantics and checkpointing.

mod checkpoint;
mod epoch_loader;
mod loss;
mod metrics;
mod output;

pub use checkpoint::{checkpoint_set, verify_checkpoint, SamCheckpointer, SamCheckpointing, SamTrainingExt};
pub use epoch_loader::{epoch_seed, EpochBatcher, EpochLoader};
pub use loss::HasLoss;
pub use metrics::{
    GradientPassesMetric, PsfRatioMetric, SamFractionMetric, SamQuotaMetric, SamStepInfo, SamTargetMetric,
};
pub use output::SamOutput;

use std::collections::BTreeMap;
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};

use burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer, MultiGradientsParams};
use burn::tensor::{Device, Tensor};
use burn::train::checkpoint::CheckpointerError;
use burn::train::{Interrupter, TrainOutput, TrainingError};

use crate::config::SamConfig;
use crate::engine::{EngineAccess, EngineRecord, EngineRef, Pass, SamEngine};
use crate::error::Result;
use crate::telemetry::StepTelemetry;

/// Implements `TrainStep::optimize` and `optimize_multi` by way of the model's [`SamHandle`]
/// field, so that each optimizer step ends its gate round. Use it inside `impl TrainStep`:
///
/// ```rust,ignore
/// impl TrainStep for Model {
///     type Input = Batch;
///     type Output = SamOutput<ClassificationOutput>;
///     fn step(&self, batch: Batch) -> TrainOutput<Self::Output> {
///         self.sam.train_step(self, batch, Model::forward_classification)
///     }
///     burn_sam_sample::sam_optimize!(sam);
/// }
/// ```
#[macro_export]
macro_rules! sam_optimize {
    ($field:ident) => {
        fn optimize(
            self,
            optim: &mut $crate::burn::optim::ModuleOptimizer,
            lr: $crate::burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate,
            grads: $crate::burn::optim::GradientsParams,
        ) -> Self {
            self.$field.clone().optimize(self, optim, lr, grads)
        }

        fn optimize_multi(
            self,
            optim: &mut $crate::burn::optim::ModuleOptimizer,
            lr: $crate::burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate,
            grads: $crate::burn::optim::MultiGradientsParams,
        ) -> Self {
            self.$field.clone().optimize_multi(self, optim, lr, grads)
        }
    };
}

/// Default bound on the train steps of one round (devices × accumulated micro-batches).
const DEFAULT_MAX_STEPS_PER_ROUND: u64 = 256;

/// Which train steps share one engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    /// One engine for every device: single device, multi-device, gradient accumulation.
    Shared,
    /// One engine per device: distributed data parallel, where every replica runs its own
    /// optimizer step on all-reduced gradients.
    PerReplica,
}

#[derive(Debug)]
struct Replica {
    device: Option<Device>,
    engine: SamEngine,
    steps_in_round: u64,
    restored: u64,
}

struct Shared {
    scope: Scope,
    fresh: SamEngine,
    replicas: Vec<Replica>,
    max_steps_per_round: u64,
    snapshots: BTreeMap<usize, SamEngine>,
    restore: Option<(u64, EngineRecord)>,
    /// Burn's interrupter of the run, through which a restored state that does not fit the
    /// model stops training with an error.
    interrupter: Option<Interrupter>,
    /// Why this handle stopped the run, if it did.
    failure: Option<String>,
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
            .field("policy", &self.lock().fresh.config().policy.name())
            .field("steps", &telemetry.step)
            .field("sam_steps", &telemetry.sam_steps)
            .finish()
    }
}

impl SamHandle {
    /// A fresh handle for single-device and multi-device training (one gate decision per
    /// optimizer step, shared by all devices); every field of `config` is checked first.
    pub fn new(config: &SamConfig) -> Result<Self> {
        Self::with_scope(config, Scope::Shared)
    }

    /// A fresh handle for `ExecutionStrategy::DistributedDataParallel`: every replica (device)
    /// keeps its own engine. Burn all-reduces both passes' gradients, so the replicas see the
    /// same statistics and take the same decisions from the same seed.
    pub fn per_replica(config: &SamConfig) -> Result<Self> {
        Self::with_scope(config, Scope::PerReplica)
    }

    fn with_scope(config: &SamConfig, scope: Scope) -> Result<Self> {
        Ok(Self {
            shared: Arc::new(Mutex::new(Shared {
                scope,
                fresh: SamEngine::new(config)?,
                replicas: Vec::new(),
                max_steps_per_round: DEFAULT_MAX_STEPS_PER_ROUND,
                snapshots: BTreeMap::new(),
                restore: None,
                interrupter: None,
                failure: None,
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
    /// `forward` runs forward + loss on the module it is given and returns Burn's output (any
    /// [`HasLoss`] type: `ClassificationOutput`, `RegressionOutput`, …), e.g.
    /// `self.sam.train_step(self, batch, Model::forward_classification)`. It is called on
    /// `model`, and on SAM steps a second time on the perturbed copy (that output is dropped).
    /// `input` is cloned for the second call. For another output type, use
    /// [`train_step_with_loss`](Self::train_step_with_loss).
    ///
    /// # Panics
    ///
    /// `TrainStep::step` cannot return an error, so these are panics with a message that says
    /// what to change:
    /// - when the loss is not tracked by autodiff: the model must live on an autodiff device
    ///   (`device.autodiff()`);
    /// - when a checkpoint restored by [`SamCheckpointer`] does not fit `model` (missing
    ///   parameter ids or other shapes, or a state out of range) and no interrupter was given
    ///   ([`stop_with`](Self::stop_with), installed by
    ///   [`with_sam_checkpointing`](SamTrainingExt::with_sam_checkpointing)); with one, the run
    ///   stops with the error instead;
    /// - when more train steps than [`with_max_steps_per_round`](Self::with_max_steps_per_round)
    ///   run without [`optimize`](Self::optimize): `TrainStep::optimize` is not wired, and every
    ///   step would silently share one gate decision.
    pub fn train_step<M, I, O, F>(&self, model: &M, input: I, mut forward: F) -> TrainOutput<SamOutput<O>>
    where
        M: Module,
        I: Clone,
        O: HasLoss,
        F: FnMut(&M, I) -> O,
    {
        self.train_step_with_loss(model, input, |model, input| {
            let output = forward(model, input);
            (output.loss(), output)
        })
    }

    /// [`train_step`](Self::train_step) for any output: `forward` returns the scalar loss and
    /// the item for the metrics.
    ///
    /// # Panics
    ///
    /// As [`train_step`](Self::train_step).
    pub fn train_step_with_loss<M, I, O, F>(&self, model: &M, input: I, mut forward: F) -> TrainOutput<SamOutput<O>>
    where
        M: Module,
        I: Clone,
        F: FnMut(&M, I) -> (Tensor<1>, O),
    {
        let (loss, output) = forward(model, input.clone());
        // Documented panic (`TrainStep::step` returns no `Result`): without it, `backward` would
        // panic with a message that does not say what to change.
        assert!(
            loss.is_tracked(),
            "SamHandle::train_step: the loss is not tracked by autodiff. Build the model on an \
             autodiff device (`device.autodiff()`, e.g. `Device::flex().autodiff()`) before giving \
             it to the Learner; see docs/learner.md"
        );
        let grads = GradientsParams::from_grads(loss.backward(), model);
        let device = model.devices().into_iter().next();
        {
            let mut shared = self.lock();
            let max_steps = shared.max_steps_per_round;
            match shared.replica(device.as_ref(), model) {
                Ok(replica) => {
                    replica.bound_round(max_steps);
                    replica.steps_in_round += 1;
                }
                Err(message) => {
                    shared.failure.get_or_insert_with(|| message.clone());
                    let Some(interrupter) = shared.interrupter.clone() else {
                        // Documented panic: no interrupter to stop the run with, and continuing
                        // would train on a state that does not belong to this model.
                        panic!("{message}");
                    };
                    drop(shared);
                    // Stops the run before anything else is trained or checkpointed; the
                    // empty gradients leave the model as it is.
                    interrupter.fail(TrainingError::Checkpoint(CheckpointerError::Unknown(message)));
                    let telemetry = self.telemetry();
                    return TrainOutput { grads: GradientsParams::new(), item: SamOutput::new(output, telemetry) };
                }
            }
        }
        let mut access = ReplicaAccess { handle: self, device };
        let (grads, telemetry) =
            Pass::begin(&mut access, model, grads, &loss).run(model, |perturbed| forward(perturbed, input).0);
        TrainOutput { grads, item: SamOutput::new(output, telemetry) }
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
        self.end_round_of(&model);
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
        self.end_round_of(&model);
        optim.step_multi(lr, model, grads)
    }

    /// Ends the current round of `model`'s engine: the cache and the gate learn from its steps,
    /// and the next train step takes a new decision.
    pub fn end_round_of<M: Module>(&self, model: &M) {
        let device = model.devices().into_iter().next();
        let mut shared = self.lock();
        let index = shared.replica_index(device.as_ref());
        let replica = &mut shared.replicas[index];
        replica.engine.end_round();
        replica.steps_in_round = 0;
    }

    /// Sets the most train steps one optimizer step may hold (devices × accumulated
    /// micro-batches; default 256). More means `optimize` is not wired, which is reported.
    pub fn with_max_steps_per_round(self, max: u64) -> Self {
        self.lock().max_steps_per_round = max.max(1);
        self
    }

    /// What the last train step did and the totals so far (of the first replica).
    pub fn telemetry(&self) -> StepTelemetry {
        self.engine().telemetry()
    }

    /// A copy of the engine state (of the first replica), e.g. to save it with
    /// [`SamEngine::to_record`].
    pub fn engine(&self) -> SamEngine {
        let shared = self.lock();
        shared.replicas.first().map_or_else(|| shared.fresh.clone(), |replica| replica.engine.clone())
    }

    /// Keeps a copy of the current state for the checkpoint of `epoch`. Cheap: tensors are shared,
    /// nothing is read from the device. With several replicas, the one with the fewest steps and
    /// no open round is taken: the main replica, which checkpoints between steps.
    pub fn snapshot(&self, epoch: usize) {
        let mut shared = self.lock();
        let engine = shared
            .replicas
            .iter()
            .min_by_key(|replica| (replica.engine.in_round(), replica.engine.telemetry().step))
            .map_or_else(|| shared.fresh.clone(), |replica| replica.engine.clone());
        shared.snapshots.insert(epoch, engine);
    }

    /// Stops the run through `interrupter` (Burn's, of the `SupervisedTraining` this handle
    /// trains in) when a restored state does not fit the model, instead of panicking in the
    /// train step. [`with_sam_checkpointing`](SamTrainingExt::with_sam_checkpointing) installs
    /// it.
    pub fn stop_with(&self, interrupter: Interrupter) {
        self.lock().interrupter = Some(interrupter);
    }

    /// Why this handle stopped the run (a restored state that does not fit the model), if it
    /// did. Check it after `launch` as well as `LearningResult::error`: Burn's terminal
    /// dashboard resets the interrupter when training ends, which clears that error.
    pub fn failure(&self) -> Option<String> {
        self.lock().failure.clone()
    }

    pub(crate) fn take_snapshot(&self, epoch: usize) -> Option<SamEngine> {
        self.lock().snapshots.remove(&epoch)
    }

    /// Restores a saved state; it is checked against the model and applied by every replica at
    /// its next train step (the model is not known before).
    pub fn restore(&self, record: EngineRecord) {
        let mut shared = self.lock();
        let generation = shared.restore.as_ref().map_or(1, |(generation, _)| generation + 1);
        shared.restore = Some((generation, record));
    }
}

impl Shared {
    fn replica_index(&mut self, device: Option<&Device>) -> usize {
        let key = match self.scope {
            Scope::Shared => None,
            Scope::PerReplica => device.cloned(),
        };
        if let Some(index) = self.replicas.iter().position(|replica| replica.device == key) {
            return index;
        }
        self.replicas.push(Replica { device: key, engine: self.fresh.clone(), steps_in_round: 0, restored: 0 });
        self.replicas.len() - 1
    }

    /// The replica for `device`, with any pending restore applied; the error says why a
    /// restored state does not fit `model`.
    fn replica<M: Module>(&mut self, device: Option<&Device>, model: &M) -> std::result::Result<&mut Replica, String> {
        let index = self.replica_index(device);
        let restore = self.restore.as_ref();
        let replica = &mut self.replicas[index];
        if let Some((generation, record)) = restore {
            if replica.restored < *generation {
                let steps = record.steps();
                replica.restored = *generation;
                replica.engine.load_record(record.clone(), model).map_err(|err| {
                    format!("the restored SAM state (taken after {steps} steps) cannot continue this run: {err}")
                })?;
                replica.steps_in_round = 0;
                log::info!("SAM state restored: continuing after {steps} train steps");
            }
        }
        Ok(replica)
    }
}

impl Replica {
    /// A round ends at `optimize`; one that outgrows any real optimizer step means the model's
    /// `TrainStep::optimize` does not call it.
    fn bound_round(&self, max_steps: u64) {
        if self.steps_in_round >= max_steps {
            // Documented panic: `TrainStep::step` returns no `Result`, and continuing would let
            // every step share one gate decision without a word.
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

/// The engine of one replica, reached through the handle's lock for each short access.
struct ReplicaAccess<'h> {
    handle: &'h SamHandle,
    device: Option<Device>,
}

/// The lock on the shared state, narrowed to one replica's engine.
struct ReplicaGuard<'a> {
    shared: MutexGuard<'a, Shared>,
    index: usize,
}

impl Deref for ReplicaGuard<'_> {
    type Target = SamEngine;

    fn deref(&self) -> &SamEngine {
        &self.shared.replicas[self.index].engine
    }
}

impl DerefMut for ReplicaGuard<'_> {
    fn deref_mut(&mut self) -> &mut SamEngine {
        &mut self.shared.replicas[self.index].engine
    }
}

impl EngineAccess for ReplicaAccess<'_> {
    fn engine(&mut self) -> EngineRef<'_> {
        let mut shared = self.handle.lock();
        let index = shared.replica_index(self.device.as_ref());
        Box::new(ReplicaGuard { shared, index })
    }

    /// A round ends at `TrainStep::optimize`, after every device and micro-batch of the step.
    fn step_is_round(&self) -> bool {
        false
    }
}
