//! The step, written once: plan, first pass, then either the SAM branch (perturbed clone, second
//! pass, evaluation) or the cheap branch (reuse term), then commit. Every driver runs it: a user's
//! own loop through [`SamEngine::first_pass`], [`SamOptimizer::step`](crate::SamOptimizer::step)
//! through [`Pass::run`], and the Learner's `SamHandle::train_step`, whose engine sits behind a
//! lock that is held only while planning and committing.

use std::ops::DerefMut;

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

use super::step::{self, FirstPass};
use super::{Plan, SamEngine};
use crate::telemetry::StepTelemetry;

/// Short-lived access to an engine.
pub(crate) type EngineRef<'a> = Box<dyn DerefMut<Target = SamEngine> + 'a>;

/// Where a step finds its engine: the engine itself (every step its own round), or a Learner
/// replica behind a lock (a round ends at the optimizer step, not here).
pub(crate) trait EngineAccess {
    /// The engine; in the Learner this takes the lock, so do not hold it across tensor work.
    fn engine(&mut self) -> EngineRef<'_>;

    /// Whether each step is a round of its own (ended when the step commits).
    fn step_is_round(&self) -> bool;
}

impl EngineAccess for SamEngine {
    fn engine(&mut self) -> EngineRef<'_> {
        Box::new(self)
    }

    fn step_is_round(&self) -> bool {
        true
    }
}

/// A step after its first pass: the gate has decided.
pub enum Pass<'a> {
    /// A SAM step: run the second pass on [`SamPass::perturbed`], then [`SamPass::finish`].
    Sam(SamPass<'a>),
    /// A cheap step: [`CheapPass::finish`] forms the direction from the first pass alone.
    Cheap(CheapPass<'a>),
}

/// The first pass of a SAM step, waiting for its second pass.
pub struct SamPass<'a> {
    access: &'a mut dyn EngineAccess,
    plan: Plan,
    first: FirstPass,
}

/// The first pass of a cheap step.
pub struct CheapPass<'a> {
    access: &'a mut dyn EngineAccess,
    plan: Plan,
    first: FirstPass,
}

impl<'a> Pass<'a> {
    /// Plans the step and measures its first pass.
    pub(crate) fn begin<M: Module>(
        access: &'a mut dyn EngineAccess,
        module: &M,
        grads: GradientsParams,
        loss: &Tensor<1>,
    ) -> Self {
        let new_round = access.step_is_round();
        let plan = access.engine().plan(new_round);
        let first = step::first_pass(&plan.config, module, grads, loss, plan.sam, plan.wants_grad_norm);
        if plan.sam {
            Self::Sam(SamPass { access, plan, first })
        } else {
            Self::Cheap(CheapPass { access, plan, first })
        }
    }

    /// Whether the gate chose a SAM step (a second pass is needed).
    pub fn is_sam(&self) -> bool {
        matches!(self, Self::Sam(_))
    }

    /// Finishes the step, running `second_loss` (forward and loss on the perturbed module) only on
    /// SAM steps. Returns the direction for the base optimizer and what the step did.
    pub fn run<M: Module>(
        self,
        module: &M,
        second_loss: impl FnOnce(&M) -> Tensor<1>,
    ) -> (GradientsParams, StepTelemetry) {
        match self {
            Self::Sam(pass) => {
                let perturbed = pass.perturbed(module);
                let loss = second_loss(&perturbed);
                let second = GradientsParams::from_grads(loss.backward(), &perturbed);
                // The perturbed weights are done with: free them before the PSF is formed, so
                // that the step's peak memory stays one model smaller.
                drop((loss, perturbed));
                pass.finish(module, second)
            }
            Self::Cheap(pass) => pass.finish(module),
        }
    }
}

impl SamPass<'_> {
    /// The perturbed module `w + ε` to run the second pass on.
    ///
    /// The clone keeps every `ParamId`, require-grad and checkpointing setting; parameters
    /// without a gradient are left as they are; its BatchNorm running statistics are separate
    /// from `module`'s, so the second pass does not update them. `module` is not modified.
    pub fn perturbed<M: Module>(&self, module: &M) -> M {
        step::perturb(&self.plan.config, module, &self.first)
    }

    /// Finishes the SAM step with the gradients of the perturbed module: the PSF is measured and
    /// cached, the gate learns. Returns the direction for the base optimizer (g_s, or g when the
    /// second pass is not finite, or zeros when the first is not) and what the step did.
    pub fn finish<M: Module>(self, module: &M, second: GradientsParams) -> (GradientsParams, StepTelemetry) {
        let manifest = self.first.manifest();
        let flags = self.access.engine().take_non_finite_flags();
        let outcome = step::evaluate_sam(&self.plan.config, module, self.first, second, flags);
        let step_is_round = self.access.step_is_round();
        let telemetry = {
            let mut engine = self.access.engine();
            let telemetry = engine.commit_sam(&outcome, manifest);
            if step_is_round {
                engine.end_round();
                engine.telemetry()
            } else {
                telemetry
            }
        };
        (outcome.direction(module), telemetry)
    }
}

impl CheapPass<'_> {
    /// Finishes the cheap step: the direction is g plus the reuse term (zeroed on the device when
    /// the loss or gradient is not finite, if guarded), and what the step did.
    pub fn finish<M: Module>(self, module: &M) -> (GradientsParams, StepTelemetry) {
        let step_is_round = self.access.step_is_round();
        let telemetry = {
            let mut engine = self.access.engine();
            let telemetry = engine.commit_cheap(&self.first);
            if step_is_round {
                engine.end_round();
                engine.telemetry()
            } else {
                telemetry
            }
        };
        let direction = step::cheap_direction(&self.plan.config, module, self.first, self.plan.term, &self.plan.cache);
        (direction, telemetry)
    }
}
