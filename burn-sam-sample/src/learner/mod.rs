//! Sharpness-aware training inside Burn's `Learner` (feature `train`).
//!
//! Burn's Learner takes a concrete `ModuleOptimizer` and calls `TrainStep::step` once per batch,
//! so the second pass runs inside the train step. Wrap the model: [`SamModel::new`]`(model,
//! &config)` is a Learner model whose train step runs the model's own `TrainStep::step` (pass
//! 1), asks the gate, runs it again on a perturbed clone only on SAM steps, applies the reuse rule
//! on cheap steps, and returns the direction as the step's gradients. The Learner's own optimizer
//! (any `ModuleOptimizer`), scheduler, metrics and checkpoints stay as they are, and so does the
//! model's `TrainStep::optimize`, which the wrapper calls.
//!
//! One gate decision covers one optimizer step: every device of a multi-device step and every
//! micro-batch of an accumulated step takes the same decision (`round.rs`); the step boundary is
//! `TrainStep::optimize`.
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
mod model;
mod output;
mod round;

pub use checkpoint::{checkpoint_set, verify_checkpoint, SamTrainingExt};
pub use epoch_loader::{epoch_seed, EpochBatcher, EpochLoader};
pub use loss::HasLoss;
pub use metrics::{
    GradientPassesMetric, PsfRatioMetric, SamFractionMetric, SamQuotaMetric, SamStepInfo, SamTargetMetric,
};
pub use model::SamModel;
pub use output::SamOutput;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::Device;
use burn::train::checkpoint::CheckpointerError;
use burn::train::{Interrupter, TrainOutput, TrainStep, TrainingError};

use crate::config::SamConfig;
use crate::engine::{step, EngineRecord, SamEngine};
use crate::error::Result;
use crate::telemetry::StepTelemetry;
use round::Round;

/// Which train steps share one engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    /// One engine for every device: single device, multi-device, gradient accumulation.
    Shared,
    /// One engine per device: distributed data parallel, where every replica runs its own
    /// optimizer step on all-reduced gradients.
    PerReplica,
}

/// One engine and its open round (between the first train step of an optimizer step and
/// `optimize`).
#[derive(Debug)]
struct Replica {
    device: Option<Device>,
    engine: SamEngine,
    round: Option<Round>,
    restored: u64,
}

struct Shared {
    scope: Scope,
    fresh: SamEngine,
    replicas: Vec<Replica>,
    snapshots: BTreeMap<usize, SamEngine>,
    restore: Option<(u64, EngineRecord)>,
    /// Burn's interrupter of the run, through which a restored state that does not fit the
    /// model stops training with an error.
    interrupter: Option<Interrupter>,
    /// Why this handle stopped the run, if it did.
    failure: Option<String>,
}

/// The SAM state of a Learner run, shared by every clone of the [`SamModel`] it lives in (the
/// Learner clones and forks the model per device). Reach it with [`SamModel::sam`]: for the
/// telemetry, checkpointing ([`SamTrainingExt::with_sam_checkpointing`]) and restore.
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
    fn with_scope(config: &SamConfig, scope: Scope) -> Result<Self> {
        Ok(Self {
            shared: Arc::new(Mutex::new(Shared {
                scope,
                fresh: SamEngine::new(config)?,
                replicas: Vec::new(),
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

    /// One train step of `model`: its own `TrainStep::step` (pass 1), the gate, the same step
    /// on the perturbed clone on SAM steps (its output is dropped), the reuse rule on cheap
    /// steps. The lock is taken twice: to plan and to book.
    fn train_step<M>(&self, model: &M, input: M::Input) -> TrainOutput<SamOutput<M::Output>>
    where
        M: TrainStep + Module,
        M::Input: Clone,
        M::Output: HasLoss,
    {
        let device = model.devices().into_iter().next();
        // Documented panic (`TrainStep::step` returns no `Result`): without it, the model's own
        // `backward` would panic with a message that does not say what to change.
        assert!(
            device.as_ref().is_none_or(Device::is_autodiff),
            "SamModel: the model is not on an autodiff device. Build it on `device.autodiff()` \
             (e.g. `Device::flex().autodiff()`) before giving it to the Learner; see docs/learner.md"
        );
        let TrainOutput { grads, item } = TrainStep::step(model, input.clone());
        let loss = item.loss();
        // Bound first: a guard in the `match` scrutinee would live through the arms.
        let begun = self.lock().begin_step(device.as_ref(), model);
        let plan = match begun {
            Ok(plan) => plan,
            Err(message) => return self.fail(message, item),
        };
        let (grads, contribution) =
            step::run(&plan, model, grads, &loss, |perturbed| TrainStep::step(perturbed, input).grads);
        let telemetry = self.lock().end_step(device.as_ref(), contribution);
        TrainOutput { grads, item: SamOutput::new(item, telemetry) }
    }

    /// Stops the run with `message` (a restored state that does not fit the model), through
    /// Burn's interrupter; the empty gradients leave the model as it is.
    fn fail<O>(&self, message: String, item: O) -> TrainOutput<SamOutput<O>> {
        let interrupter = {
            let mut shared = self.lock();
            shared.failure.get_or_insert_with(|| message.clone());
            shared.interrupter.clone()
        };
        let Some(interrupter) = interrupter else {
            // Documented panic (`TrainStep::step` returns no `Result`): no interrupter to stop
            // the run with, and continuing would train on a state that is not this model's.
            panic!("{message}");
        };
        interrupter.fail(TrainingError::Checkpoint(CheckpointerError::Unknown(message)));
        TrainOutput { grads: GradientsParams::new(), item: SamOutput::new(item, self.telemetry()) }
    }

    /// Ends the optimizer step of `model`'s engine: the cache and the gate learn from its train
    /// steps, and the next train step takes a new decision.
    fn end_round_of<M: Module>(&self, model: &M) {
        let device = model.devices().into_iter().next();
        let mut shared = self.lock();
        let index = shared.replica_index(device.as_ref());
        let replica = &mut shared.replicas[index];
        if let Some(round) = replica.round.take() {
            replica.engine.learn(round.close());
        }
    }

    /// What the last train step did and the totals so far (of the first replica).
    pub fn telemetry(&self) -> StepTelemetry {
        let shared = self.lock();
        shared.replicas.first().map_or_else(|| shared.fresh.telemetry(), |replica| replica.engine.telemetry())
    }

    /// A snapshot of the SAM state (of the first replica), e.g. to save it with
    /// [`EngineRecord::save`].
    pub fn to_record(&self) -> EngineRecord {
        let shared = self.lock();
        shared.replicas.first().map_or_else(|| shared.fresh.to_record(), |replica| replica.engine.to_record())
    }

    /// Keeps a copy of the current state for the checkpoint of `epoch`. Cheap: tensors are
    /// shared, nothing is read from the device. With several replicas, the one with the fewest
    /// steps and no open round is taken: the main replica, which checkpoints between steps.
    ///
    /// The error says that the snapshot of a checkpoint two saves back was never taken: the
    /// optimizer checkpointer is not the crate's optimizer checkpointer (checkpointers installed after
    /// [`with_sam_checkpointing`](SamTrainingExt::with_sam_checkpointing) replaced it).
    fn snapshot(&self, epoch: usize) -> std::result::Result<(), String> {
        let mut shared = self.lock();
        let engine = shared
            .replicas
            .iter()
            .min_by_key(|replica| (replica.round.is_some(), replica.engine.telemetry().step))
            .map_or_else(|| shared.fresh.clone(), |replica| replica.engine.clone());
        shared.snapshots.insert(epoch, engine);
        // Burn hands one save at a time to each checkpointer's thread: when a third save is asked
        // for, the first one's has been taken by a SamCheckpointer, if there is one.
        if shared.snapshots.len() > 2 {
            let stale = shared.snapshots.keys().next().copied().unwrap_or(epoch);
            let message = format!(
                "the SAM state of the checkpoint of epoch {stale} was never written: the optimizer \
                 checkpointer is not SamCheckpointer. Call `with_sam_checkpointing` after any \
                 `with_default_checkpointers`, `with_custom_checkpointers` or \
                 `with_checkpointing_strategy` (see docs/learner.md)"
            );
            shared.failure.get_or_insert_with(|| message.clone());
            return Err(message);
        }
        Ok(())
    }

    /// Stops the run through `interrupter` (Burn's, of the `SupervisedTraining` this handle
    /// trains in) when a restored state does not fit the model, instead of panicking in the
    /// train step. [`with_sam_checkpointing`](SamTrainingExt::with_sam_checkpointing) installs
    /// it.
    fn stop_with(&self, interrupter: Interrupter) {
        self.lock().interrupter = Some(interrupter);
    }

    fn interrupter(&self) -> Option<Interrupter> {
        self.lock().interrupter.clone()
    }

    /// Why this handle stopped the run (a restored state that does not fit the model, or SAM
    /// state missing from checkpoints), if it did. Check it after `launch` as well as
    /// `LearningResult::error`: Burn's terminal dashboard resets the interrupter when training
    /// ends, which clears that error.
    pub fn failure(&self) -> Option<String> {
        self.lock().failure.clone()
    }

    fn take_snapshot(&self, epoch: usize) -> Option<SamEngine> {
        self.lock().snapshots.remove(&epoch)
    }

    /// Restores a saved state; it is checked against the model and applied by every replica at
    /// its next train step (the model is not known before). The checkpointer of
    /// [`with_sam_checkpointing`](SamTrainingExt::with_sam_checkpointing) calls it when Burn
    /// restores a checkpoint.
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
        self.replicas.push(Replica { device: key, engine: self.fresh.clone(), round: None, restored: 0 });
        self.replicas.len() - 1
    }

    /// A train step begins: any pending restore is applied (the error says why it does not fit
    /// `model`), the round is opened if this is the optimizer step's first train step, and the
    /// step's plan is returned.
    fn begin_step<M: Module>(
        &mut self,
        device: Option<&Device>,
        model: &M,
    ) -> std::result::Result<crate::engine::Plan, String> {
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
                replica.round = None;
                log::info!("SAM state restored: continuing after {steps} train steps");
            }
        }
        let engine = &mut replica.engine;
        Ok(replica.round.get_or_insert_with(|| Round::open(engine.plan())).plan_for_step())
    }

    /// A train step ends: the engine books it, its lesson joins the round.
    fn end_step(&mut self, device: Option<&Device>, contribution: step::Contribution) -> StepTelemetry {
        let index = self.replica_index(device);
        let replica = &mut self.replicas[index];
        let lesson = replica.engine.book(contribution);
        match replica.round.as_mut() {
            Some(round) => round.add(lesson),
            // The round was dropped by a restore between the two halves of the step: the step
            // is counted, and teaches the restored state nothing.
            None => drop(lesson),
        }
        replica.engine.telemetry()
    }
}
