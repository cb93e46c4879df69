//! The Learner model: a user's model with the SAM state beside it.

use burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer, MultiGradientsParams};
use burn::train::{InferenceStep, TrainOutput, TrainStep};

use super::{HasLoss, SamHandle, SamOutput, Scope};
use crate::config::SamConfig;
use crate::error::Result;
use crate::telemetry::StepTelemetry;

/// A model trained with SAM in Burn's `Learner`: give it to `Learner::new` in place of the model.
///
/// The model keeps its own `TrainStep` (forward, loss, `backward`) and `InferenceStep`; the
/// wrapper's train step runs the model's step once, and on SAM steps once more on the perturbed
/// weights, and hands the Learner's optimizer the direction. The model's
/// `TrainStep::optimize` runs as before (weight clipping, say), after the gate's round ends.
/// Requirements: `TrainStep::Input: Clone` (the batch is used twice) and an output that carries
/// its loss ([`HasLoss`]: every Burn output type does).
///
/// ```rust
/// # use burn::nn::{Linear, LinearConfig};
/// # use burn::prelude::*;
/// # use burn::train::{InferenceStep, RegressionOutput, TrainOutput, TrainStep};
/// use burn_sam_sample::learner::SamModel;
/// use burn_sam_sample::SamConfig;
///
/// # #[derive(Module, Debug)]
/// # struct Model { linear: Linear }
/// # impl TrainStep for Model {
/// #     type Input = (Tensor<2>, Tensor<2>);
/// #     type Output = RegressionOutput;
/// #     fn step(&self, (x, y): (Tensor<2>, Tensor<2>)) -> TrainOutput<RegressionOutput> {
/// #         let out = self.linear.forward(x);
/// #         let loss = (out.clone() - y.clone()).powi_scalar(2).mean();
/// #         TrainOutput::new(self, loss.backward(), RegressionOutput::new(loss, out, y))
/// #     }
/// # }
/// # impl InferenceStep for Model {
/// #     type Input = (Tensor<2>, Tensor<2>);
/// #     type Output = RegressionOutput;
/// #     fn step(&self, (x, y): (Tensor<2>, Tensor<2>)) -> RegressionOutput {
/// #         let out = self.linear.forward(x);
/// #         RegressionOutput::new((out.clone() - y.clone()).powi_scalar(2).mean(), out, y)
/// #     }
/// # }
/// # let device = burn::tensor::Device::flex().autodiff();
/// let model = Model { linear: LinearConfig::new(4, 1).init(&device) };
/// let model = SamModel::new(model, &SamConfig::vsam(100)).unwrap();
/// // SupervisedTraining::new(..).launch(Learner::new(model, AdamConfig::new().init(), 1e-3));
/// # let batch = (Tensor::<2>::ones([8, 4], &device), Tensor::<2>::zeros([8, 1], &device));
/// # let out = TrainStep::step(&model, batch);
/// # assert!(out.item.telemetry.sam);
/// ```
///
/// Checkpoints of a `SamModel` store the model's parameters under `model.` (`model.linear.weight`);
/// [`into_inner`](Self::into_inner) gives the trained model back.
#[derive(Module, Debug)]
pub struct SamModel<M> {
    model: M,
    #[module(skip)]
    sam: SamHandle,
}

impl<M: Module> SamModel<M> {
    /// Wraps `model` for single-device and multi-device training (one gate decision per
    /// optimizer step, shared by all devices); every field of `config` is checked first.
    pub fn new(model: M, config: &SamConfig) -> Result<Self> {
        Ok(Self { model, sam: SamHandle::with_scope(config, Scope::Shared)? })
    }

    /// Wraps `model` for `ExecutionStrategy::DistributedDataParallel`: every replica (device)
    /// keeps its own engine. Burn all-reduces both passes' gradients, so the replicas see the
    /// same statistics and take the same decisions from the same seed.
    pub fn per_replica(model: M, config: &SamConfig) -> Result<Self> {
        Ok(Self { model, sam: SamHandle::with_scope(config, Scope::PerReplica)? })
    }

    /// The SAM state of the run: telemetry, checkpointing, restore.
    pub fn sam(&self) -> &SamHandle {
        &self.sam
    }

    /// What the last train step did and the totals so far.
    pub fn telemetry(&self) -> StepTelemetry {
        self.sam.telemetry()
    }

    /// The wrapped model.
    pub fn model(&self) -> &M {
        &self.model
    }

    /// The wrapped model, unwrapped.
    pub fn into_inner(self) -> M {
        self.model
    }
}

impl<M> TrainStep for SamModel<M>
where
    M: TrainStep + Module,
    M::Input: Clone,
    M::Output: HasLoss,
{
    type Input = M::Input;
    type Output = SamOutput<M::Output>;

    fn step(&self, input: M::Input) -> TrainOutput<Self::Output> {
        self.sam.train_step(&self.model, input)
    }

    fn optimize(self, optim: &mut ModuleOptimizer, lr: ModuleLearningRate, grads: GradientsParams) -> Self {
        let Self { model, sam } = self;
        sam.end_round_of(&model);
        Self { model: model.optimize(optim, lr, grads), sam }
    }

    fn optimize_multi(self, optim: &mut ModuleOptimizer, lr: ModuleLearningRate, grads: MultiGradientsParams) -> Self {
        let Self { model, sam } = self;
        sam.end_round_of(&model);
        Self { model: model.optimize_multi(optim, lr, grads), sam }
    }
}

impl<M: InferenceStep> InferenceStep for SamModel<M> {
    type Input = M::Input;
    type Output = M::Output;

    fn step(&self, input: M::Input) -> M::Output {
        InferenceStep::step(&self.model, input)
    }
}
