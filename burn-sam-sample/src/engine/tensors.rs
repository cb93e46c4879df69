//! Module walking and per-parameter tensor work: gradients flattened in module order, the ascent
//! applied to a clone, directions handed back keyed by `ParamId`.
//!
//! Gradients are handled flattened (`Tensor<1>`, a free reshape of the contiguous gradient), so
//! that the engine can keep them in plain collections without a const rank; they are reshaped
//! back when the direction is handed to the base optimizer.

use std::collections::{HashMap, HashSet};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{DType, Device, GradientCheckpointingStrategy, Shape, Tensor};

/// The autodiff settings a parameter carries, taken from the original module and put back on
/// its perturbed copy (the same logic as Burn's optimizer uses after an update).
#[derive(Clone, Debug)]
pub(crate) struct ParamContext {
    require_grad: bool,
    distributed: bool,
    checkpointing: Option<GradientCheckpointingStrategy>,
}

impl ParamContext {
    fn capture<const D: usize>(parameter: &Tensor<D>) -> Self {
        Self {
            require_grad: parameter.is_require_grad(),
            distributed: parameter.is_distributed(),
            checkpointing: parameter.gradient_checkpointing_strategy(),
        }
    }

    fn restore<const D: usize>(&self, inner: Tensor<D>, id: ParamId) -> Tensor<D> {
        let mut parameter = Tensor::from_inner(inner);
        if let Some(strategy) = self.checkpointing {
            parameter = parameter.with_gradient_checkpointing_strategy(strategy);
        }
        if self.require_grad {
            parameter = parameter.require_grad();
        }
        if self.distributed {
            parameter = parameter.set_distributed(id);
        }
        parameter
    }
}

/// One parameter's gradient, flattened, with what is needed to put it back.
#[derive(Clone, Debug)]
pub(crate) struct FlatGrad {
    pub id: ParamId,
    pub shape: Shape,
    pub grad: Tensor<1>,
}

/// The gradients of a pass, in module order, each parameter once.
#[derive(Debug, Default)]
pub(crate) struct Collected {
    pub grads: Vec<FlatGrad>,
    pub contexts: HashMap<ParamId, ParamContext>,
    /// Per parameter ‖T⊙g‖² for ASAM (same order as `grads`), when requested.
    pub scaled_sq: Vec<Tensor<1>>,
}

struct CollectVisitor<'a> {
    grads: &'a mut GradientsParams,
    seen: HashSet<ParamId>,
    out: Collected,
    asam_eta: Option<f64>,
    capture: bool,
}

impl ModuleVisitor for CollectVisitor<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        // Tied parameters are visited once per use; their gradient is counted once.
        if !self.seen.insert(param.id) {
            return;
        }
        let Some(grad) = self.grads.remove::<D>(param.id) else {
            return;
        };
        let shape = grad.shape();
        if self.capture || self.asam_eta.is_some() {
            let value = param.val();
            if let Some(eta) = self.asam_eta {
                let scaled =
                    value.clone().inner().cast(DType::F32).abs().add_scalar(eta) * grad.clone().cast(DType::F32);
                self.out.scaled_sq.push(scaled.square().sum());
            }
            if self.capture {
                self.out.contexts.insert(param.id, ParamContext::capture(&value));
            }
        }
        let numel = shape.num_elements();
        self.out.grads.push(FlatGrad { id: param.id, shape, grad: grad.reshape([numel]) });
    }
}

/// Takes the gradients of `module`'s float parameters out of `grads`, in module order.
///
/// `capture` also records each parameter's autodiff context (needed to perturb it);
/// `asam_eta` also computes ‖(|w| + η)⊙g‖² per parameter.
pub(crate) fn collect<M: Module>(
    module: &M,
    mut grads: GradientsParams,
    capture: bool,
    asam_eta: Option<f64>,
) -> Collected {
    let mut visitor =
        CollectVisitor { grads: &mut grads, seen: HashSet::new(), out: Collected::default(), asam_eta, capture };
    module.visit(&mut visitor);
    visitor.out
}

struct DirectionVisitor {
    flats: HashMap<ParamId, (Tensor<1>, Shape)>,
    out: GradientsParams,
}

impl ModuleVisitor for DirectionVisitor {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some((flat, shape)) = self.flats.remove(&param.id) {
            self.out.register::<D>(param.id, flat.reshape::<D, _>(shape));
        }
    }
}

/// Reshapes flattened directions back into `GradientsParams` keyed like `module`'s parameters.
pub(crate) fn into_gradients<M: Module>(module: &M, flats: Vec<(ParamId, Tensor<1>, Shape)>) -> GradientsParams {
    let mut visitor = DirectionVisitor {
        flats: flats.into_iter().map(|(id, t, s)| (id, (t, s))).collect(),
        out: GradientsParams::new(),
    };
    module.visit(&mut visitor);
    visitor.out
}

/// Maps a clone of the module to `w + ε`, keeping every `ParamId` and autodiff context.
struct PerturbMapper<'a> {
    grads: HashMap<ParamId, &'a Tensor<1>>,
    contexts: &'a HashMap<ParamId, ParamContext>,
    scale: &'a Tensor<1>,
    asam_eta: Option<f64>,
}

impl ModuleMapper for PerturbMapper<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let (Some(grad), Some(context)) = (self.grads.get(&id), self.contexts.get(&id)) else {
            return Param::from_mapped_value(id, tensor, mapper);
        };
        let weight = tensor.inner();
        let shape = weight.shape();
        let device = weight.device();
        let ones = [1usize; D];
        let scale = self.scale.clone().to_device(&device).reshape::<D, _>(ones);
        let mut ascent = (*grad).clone().reshape::<D, _>(shape.clone()).cast(DType::F32) * scale;
        if let Some(eta) = self.asam_eta {
            let t = weight.clone().cast(DType::F32).abs().add_scalar(eta);
            ascent = ascent * t.square();
        }
        let perturbed = weight.clone() + ascent.cast(weight.dtype());
        Param::from_mapped_value(id, context.restore(perturbed, id), mapper)
    }
}

/// Builds `w + scale·g` (ASAM: `w + scale·T²g`) on a copy of `module` whose BatchNorm running
/// statistics live in fresh cells, so the perturbed pass cannot update the original's.
pub(crate) fn perturbed_clone<M: Module>(
    module: &M,
    collected: &Collected,
    scale: &Tensor<1>,
    asam_eta: Option<f64>,
) -> M {
    // `valid()` then `train()` rebuilds every running-state cell (they are shared between
    // clones otherwise) and keeps ids, require-grad settings and training flags.
    let fresh = module.valid().train();
    let mut mapper = PerturbMapper {
        grads: collected.grads.iter().map(|flat| (flat.id, &flat.grad)).collect(),
        contexts: &collected.contexts,
        scale,
        asam_eta,
    };
    fresh.map(&mut mapper)
}

/// Σ over `parts` on `device` (zero when empty). Moves each part there first, so layer-parallel
/// modules work.
pub(crate) fn sum_parts(parts: &[Tensor<1>], device: &Device) -> Tensor<1> {
    if parts.is_empty() {
        return Tensor::zeros([1], (device, DType::F32));
    }
    let parts: Vec<Tensor<1>> = parts.iter().map(|part| part.clone().to_device(device)).collect();
    Tensor::cat(parts, 0).sum()
}

/// ‖t‖² in f32, as a one-element tensor on `t`'s device (see [`dot`]).
pub(crate) fn square_sum(t: &Tensor<1>) -> Tensor<1> {
    dot(t, t)
}

/// a·b in f32, as a one-element tensor on `a`'s device.
///
/// On the CPU backends this is a 1×n by n×1 matrix product: one read of each operand and no
/// n-sized temporary, 3× faster on flex than multiplying and summing (`benches/ops.rs`). Elsewhere
/// it is a product and a sum: a matrix product of that shape has one output element, which leaves
/// a GPU matrix kernel little to spread over the device, while a sum is a parallel reduction (on
/// lavapipe the matrix product measured 1.3× slower than square + sum).
pub(crate) fn dot(a: &Tensor<1>, b: &Tensor<1>) -> Tensor<1> {
    let a = a.clone().cast(DType::F32);
    let b = b.clone().cast(DType::F32);
    if runs_on_cpu(&a.device()) {
        let n = a.dims()[0];
        a.reshape([1, n]).matmul(b.reshape([n, 1])).reshape([1])
    } else {
        (a * b).sum()
    }
}

/// Whether `device` belongs to one of this crate's CPU backends (`flex`, `ndarray`), with or
/// without autodiff. The engine computes its dot products (‖g‖², ‖PSF‖²) as matrix products there
/// and as a product and a sum elsewhere, whichever is faster on each kind of backend.
fn runs_on_cpu(device: &Device) -> bool {
    #[cfg(feature = "flex")]
    if *device == Device::flex() {
        return true;
    }
    #[cfg(feature = "ndarray")]
    #[allow(deprecated)]
    if *device == Device::ndarray() {
        return true;
    }
    let _ = device;
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_devices_are_recognized_with_or_without_autodiff() {
        assert!(runs_on_cpu(&Device::flex()));
        assert!(runs_on_cpu(&Device::flex().autodiff()));
    }

    #[test]
    fn dot_products_are_exact_on_small_integers() {
        let device = Device::flex();
        let a = Tensor::<1>::from_data([1.0f32, 2.0, 3.0], (&device, DType::F32));
        let b = Tensor::<1>::from_data([4.0f32, -5.0, 6.0], (&device, DType::F32));
        assert_eq!(dot(&a, &b).into_scalar::<f32>(), 12.0);
        assert_eq!(square_sum(&a).into_scalar::<f32>(), 14.0);
        assert_eq!(sum_parts(&[], &device).into_scalar::<f32>(), 0.0);
    }
}
