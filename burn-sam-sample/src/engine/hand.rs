//! The step driven by hand, for programs that run the passes themselves (a training loop that
//! cannot hand [`SamOptimizer::step`](crate::SamOptimizer::step) a closure). Most programs do not
//! need it; it is re-exported in [`advanced`](crate::advanced).
//!
//! [`SamEngine::first_pass`] plans the step and measures the first pass; the returned [`Pass`]
//! is a SAM step (run the second pass on [`SamPass::perturbed`], then [`SamPass::finish`]) or a
//! cheap one ([`CheapPass::finish`]). Both finish with the same tensor functions and the same
//! commit as `SamOptimizer::step`.

use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::Tensor;

use super::step::{self, FirstPass};
use super::{Plan, SamEngine};
use crate::telemetry::StepTelemetry;

/// A step after its first pass: the gate has decided.
pub enum Pass<'a> {
    /// A SAM step: run the second pass on [`SamPass::perturbed`], then [`SamPass::finish`].
    Sam(SamPass<'a>),
    /// A cheap step: [`CheapPass::finish`] forms the direction from the first pass alone.
    Cheap(CheapPass<'a>),
}

/// The first pass of a SAM step, waiting for its second pass.
pub struct SamPass<'a> {
    engine: &'a mut SamEngine,
    plan: Plan,
    first: FirstPass,
}

/// The first pass of a cheap step.
pub struct CheapPass<'a> {
    engine: &'a mut SamEngine,
    plan: Plan,
    first: FirstPass,
}

impl SamEngine {
    /// Step 1 of a step driven by hand: takes the pass-1 gradients and loss of `module`, asks the
    /// gate, and returns a [`Pass::Sam`] (run the second pass on [`SamPass::perturbed`], then
    /// [`SamPass::finish`]) or a [`Pass::Cheap`] ([`CheapPass::finish`]). The pass borrows the
    /// engine until it is finished, so steps cannot interleave; a pass dropped unfinished leaves
    /// the counters and the cache as they were, but the gate has decided once.
    ///
    /// ```rust
    /// # use burn::nn::{Linear, LinearConfig};
    /// # use burn::optim::{GradientsParams, Optimizer, SgdConfig};
    /// # use burn::prelude::*;
    /// use burn_sam_sample::advanced::{Pass, SamEngine};
    /// use burn_sam_sample::SamConfig;
    ///
    /// # let device = burn::tensor::Device::flex().autodiff();
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
    /// # use burn_sam_sample::{advanced::SamEngine, SamConfig};
    /// # let device = burn::tensor::Device::flex().autodiff();
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
        let mut plan = self.plan();
        // The count of earlier non-finite cheap steps stays with the engine until the pass is
        // finished, so that a pass dropped unfinished loses nothing.
        if let Some(count) = plan.cheap_non_finite.take() {
            self.device_non_finite = Some(count);
        }
        let first = step::first_pass(&plan, module, grads, loss);
        if plan.sam {
            Pass::Sam(SamPass { engine: self, plan, first })
        } else {
            Pass::Cheap(CheapPass { engine: self, plan, first })
        }
    }
}

impl Pass<'_> {
    /// Whether the gate chose a SAM step (a second pass is needed).
    pub fn is_sam(&self) -> bool {
        matches!(self, Self::Sam(_))
    }
}

impl SamPass<'_> {
    /// The perturbed module `w + ε` to run the second pass on.
    ///
    /// The clone keeps every `ParamId`, require-grad and checkpointing setting; parameters
    /// without a gradient are left as they are; its BatchNorm running statistics are separate
    /// from `module`'s, so the second pass does not update them. `module` is not modified.
    pub fn perturbed<M: Module>(&self, module: &M) -> M {
        step::perturb(&self.plan, module, &self.first)
    }

    /// Finishes the SAM step with the gradients of the perturbed module: the PSF is measured and
    /// cached, the gate learns. Returns the direction for the base optimizer (g_s, or g when the
    /// second pass is not finite, or zeros when the first is not) and what the step did.
    pub fn finish<M: Module>(mut self, module: &M, second: GradientsParams) -> (GradientsParams, StepTelemetry) {
        self.plan.cheap_non_finite = self.engine.device_non_finite.take();
        let (direction, contribution) = step::finish_sam(&self.plan, module, self.first, second);
        (direction, self.engine.commit(contribution))
    }
}

impl CheapPass<'_> {
    /// Finishes the cheap step: the direction is g plus the reuse term (zeroed on the device when
    /// the loss or gradient is not finite, if guarded), and what the step did.
    pub fn finish<M: Module>(self, module: &M) -> (GradientsParams, StepTelemetry) {
        let (direction, contribution) = step::finish_cheap(&self.plan, module, self.first);
        (direction, self.engine.commit(contribution))
    }
}
