//! The tensor work of one step, free of engine state: plain functions from a [`Plan`] and the
//! passes' gradients to the direction for the base optimizer and a [`Contribution`] (what the
//! step measured, for the engine to commit).
//!
//! [`run`] is the step: first pass, then the SAM branch (perturbed clone, second pass, PSF) or
//! the cheap branch (`g` plus the reuse term).

use std::collections::HashMap;

use burn::module::{Module, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Bool, DType, Device, Tensor};

use super::readback;
use super::tensors::{self, dot, square_sum, sum_parts, Collected};
use super::Plan;
use crate::policy::PsfStats;
use crate::reuse::ReusePolicy;

/// Per-parameter tensors to cache (f32), their parameter order with each one's storage dtype,
/// and the device.
pub(crate) type CacheParts = (HashMap<ParamId, Tensor<1>>, Vec<(ParamId, DType)>, Device);

/// What one step measured, for [`SamEngine::book`](super::SamEngine::book).
#[derive(Debug)]
pub(crate) struct Contribution {
    /// A SAM step's host values (its one read); `None` on a cheap step.
    pub values: Option<SamValues>,
    /// A SAM step's tensors to cache, when both passes are finite and the rule caches.
    pub cache: Option<CacheParts>,
    /// A cheap step's non-finite flag (1.0 or 0.0, f32, on the device), when guarded.
    pub non_finite: Option<Tensor<1>>,
    /// A cheap step's ‖g‖² on the device, when the gate wants it (AE-SAM).
    pub grad_sq: Option<Tensor<1>>,
    /// The parameters with a gradient, in module order, with their shapes.
    pub manifest: Vec<(u64, Vec<usize>)>,
}

/// The first pass of a step, measured.
#[derive(Debug)]
pub(crate) struct FirstPass {
    collected: Collected,
    grad_sq_parts: Vec<Tensor<1>>,
    grad_sq: Tensor<1>,
    loss: Tensor<1>,
    skip: Tensor<1, Bool>,
    device: Device,
}

impl FirstPass {
    /// The parameters with a gradient, in module order, with their shapes.
    fn manifest(&self) -> Vec<(u64, Vec<usize>)> {
        self.collected.grads.iter().map(|flat| (flat.id.val(), flat.shape.to_vec())).collect()
    }
}

/// What a SAM step stores for the cheap steps after it, per `ParamId`, in the dtype
/// [`CachePrecision`](crate::reuse::CachePrecision) chose (shared, not copied, by the plans of the
/// steps that read it).
#[derive(Clone, Debug, Default)]
pub(crate) struct ReuseCache {
    pub tensors: HashMap<ParamId, Tensor<1>>,
    /// ‖cache‖ (f32, of the stored values) for LookSAM's norm matching.
    pub norm: Option<Tensor<1>>,
}

impl ReuseCache {
    /// A cache of the f32 `tensors`, each stored in the dtype `layout` gives for its parameter
    /// (module order), with the norm LookSAM needs.
    pub fn new(
        tensors: HashMap<ParamId, Tensor<1>>,
        reuse: &ReusePolicy,
        layout: &[(ParamId, DType)],
        device: &Device,
    ) -> Self {
        let dtypes: HashMap<ParamId, DType> = layout.iter().copied().collect();
        let tensors: HashMap<ParamId, Tensor<1>> = tensors
            .into_iter()
            .map(|(id, tensor)| {
                let dtype = dtypes.get(&id).copied().unwrap_or(DType::F32);
                (id, store_as(tensor, dtype))
            })
            .collect();
        let norm = reuse.keeps_cache_norm().then(|| {
            let parts: Vec<Tensor<1>> = layout.iter().filter_map(|(id, _)| tensors.get(id)).map(square_sum).collect();
            sum_parts(&parts, device).sqrt()
        });
        Self { tensors, norm }
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Bytes the cached tensors occupy (from their shapes and dtypes; reads nothing).
    pub fn bytes(&self) -> u64 {
        let tensors = self.tensors.values().chain(self.norm.as_ref());
        tensors.map(|t| (t.shape().num_elements() * t.dtype().size()) as u64).sum()
    }
}

/// f16's largest finite value.
const F16_MAX: f64 = 65504.0;

/// `tensor` in `dtype`, rounded once; into f16 it saturates at ±65504, so that a finite value
/// never becomes infinite (bf16 has f32's range).
pub(crate) fn store_as(tensor: Tensor<1>, dtype: DType) -> Tensor<1> {
    if dtype == DType::F16 && tensor.dtype() != DType::F16 {
        tensor.clamp(-F16_MAX, F16_MAX).cast(dtype)
    } else {
        tensor.cast(dtype)
    }
}

/// One step after its first backward pass: the SAM branch (perturbed clone, `second_grads` of
/// it, PSF) or the cheap branch. Returns the direction for the base optimizer and what the step
/// measured.
pub(crate) fn run<M: Module>(
    plan: &Plan,
    module: &M,
    grads: GradientsParams,
    loss: &Tensor<1>,
    second_grads: impl FnOnce(&M) -> GradientsParams,
) -> (GradientsParams, Contribution) {
    let first = first_pass(plan, module, grads, loss);
    if !plan.sam {
        return finish_cheap(plan, module, first);
    }
    let perturbed = perturb(plan, module, &first);
    let second = second_grads(&perturbed);
    // The perturbed weights are done with: free them before the PSF is formed, so that the
    // step's peak memory stays one model smaller.
    drop(perturbed);
    finish_sam(plan, module, first, second)
}

/// Takes the pass-1 gradients and loss; computes ‖g‖² on the device when needed.
pub(crate) fn first_pass<M: Module>(plan: &Plan, module: &M, grads: GradientsParams, loss: &Tensor<1>) -> FirstPass {
    let config = &plan.config;
    let asam_eta = (plan.sam && config.adaptive).then_some(config.adaptive_eta);
    let collected = tensors::collect(module, grads, plan.sam, asam_eta);
    let device = collected.grads.first().map(|flat| flat.grad.device()).unwrap_or_else(|| loss.device());
    // ‖g‖² is needed for the ascent, the rule's and the gate's statistics; the non-finite guard
    // alone only needs to know whether g is finite, which a plain sum (no temporary) tells as
    // well: it is non-finite exactly when an element is (or when the sum itself passes f32's
    // range, ~3·10³⁸, which a finite ‖g‖² would have passed first).
    let needs_norm = plan.sam || plan.wants_grad_norm || config.reuse.needs_grad_norm();
    let grad_sq_parts: Vec<Tensor<1>> =
        if needs_norm { collected.grads.iter().map(|flat| square_sum(&flat.grad)).collect() } else { Vec::new() };
    let grad_sq = sum_parts(&grad_sq_parts, &device);
    let probe = if needs_norm || !config.guard_non_finite {
        grad_sq.clone()
    } else {
        let sums: Vec<Tensor<1>> =
            collected.grads.iter().map(|flat| flat.grad.clone().cast(DType::F32).sum()).collect();
        sum_parts(&sums, &device)
    };
    let loss = loss.clone().inner().cast(DType::F32).sum().to_device(&device);
    let skip = probe.is_finite().bool_and(loss.clone().is_finite()).bool_not();
    FirstPass { collected, grad_sq_parts, grad_sq, loss, skip, device }
}

/// The perturbed module `w + ε` of a SAM step, ε = ρ·g/‖g‖ (ASAM: ρ·T²g/‖Tg‖, T = |w| + η).
/// When the loss or g is not finite the clone holds garbage, which is harmless: the step is then
/// skipped (its update zeroed, nothing cached, the gate told nothing), so nothing computed on
/// the clone is used.
pub(crate) fn perturb<M: Module>(plan: &Plan, module: &M, first: &FirstPass) -> M {
    let config = &plan.config;
    let norm_sq =
        if config.adaptive { sum_parts(&first.collected.scaled_sq, &first.device) } else { first.grad_sq.clone() };
    let rho = Tensor::<1>::full([1], config.rho, (&first.device, DType::F32));
    let scale = rho / norm_sq.sqrt().add_scalar(config.eps);
    let asam_eta = config.adaptive.then_some(config.adaptive_eta);
    tensors::perturbed_clone(module, &first.collected, &scale, asam_eta)
}

/// A cheap step: `d = g + weight·cache` (the rule's term; `g` when it adds nothing), zeroed on
/// the device when the loss or gradient is not finite (if guarded). Reads nothing.
pub(crate) fn finish_cheap<M: Module>(plan: &Plan, module: &M, first: FirstPass) -> (GradientsParams, Contribution) {
    let config = &plan.config;
    let cache = &plan.cache;
    let weight = plan.term.weight(&first.grad_sq, cache.norm.as_ref(), config.eps);
    let guard = config.guard_non_finite;
    let contribution = Contribution {
        values: None,
        cache: None,
        non_finite: guard.then(|| first.skip.clone().float().cast(DType::F32)),
        grad_sq: plan.wants_grad_norm.then(|| first.grad_sq.clone()),
        manifest: first.manifest(),
    };
    let directions = first
        .collected
        .grads
        .into_iter()
        .map(|flat| {
            let dtype = flat.grad.dtype();
            let device = flat.grad.device();
            let cached = weight.as_ref().and_then(|w| Some((w, cache.tensors.get(&flat.id)?)));
            let mut direction = match cached {
                // The cache is read in f32 whatever its storage, the sum rounded once to g's dtype.
                Some((weight, cached)) => {
                    let cached = cached.clone().to_device(&device).cast(DType::F32);
                    store_as(flat.grad.cast(DType::F32) + weight.times(cached), dtype)
                }
                None => flat.grad,
            };
            if guard {
                let skip = first.skip.clone().to_device(&device).expand([flat.shape.num_elements()]);
                direction = direction.mask_fill(skip, 0.0);
            }
            (flat.id, direction, flat.shape)
        })
        .collect();
    (tensors::into_gradients(module, directions), contribution)
}

/// The host values of a SAM step, read in one transfer ([`readback::read`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct SamValues {
    pub grad_sq: f64,
    grad_tail_sq: f64,
    psf_tail_sq: f64,
    /// Finite exactly when the second-pass gradient is (‖PSF‖² of the last N tensors plus the
    /// sums of g_s elsewhere).
    second_probe: f64,
    pub loss: f64,
    dot: f64,
    /// Sum of the non-finite flags of the cheap steps since the last read.
    pub cheap_non_finite: f64,
}

impl SamValues {
    /// The loss and the first-pass gradient are finite.
    pub fn first_ok(&self) -> bool {
        self.grad_sq.is_finite() && self.loss.is_finite()
    }

    /// The second-pass gradient is finite too.
    pub fn second_ok(&self) -> bool {
        self.first_ok() && self.second_probe.is_finite()
    }

    /// ‖PSF‖ and ‖PSF‖/‖g‖ over the last N tensors (ratio 0 when that ‖g‖ is 0).
    pub fn stats(&self) -> PsfStats {
        let psf_norm = self.psf_tail_sq.sqrt();
        let grad_tail = self.grad_tail_sq.sqrt();
        let ratio = if grad_tail > 0.0 { psf_norm / grad_tail } else { 0.0 };
        PsfStats { psf_norm, ratio }
    }

    /// ⟨g, g_s⟩/‖g‖² (0 when ‖g‖ is 0): the part of g in g_s, for LookSAM.
    fn projection(&self) -> f64 {
        if self.grad_sq > 0.0 {
            self.dot / self.grad_sq
        } else {
            0.0
        }
    }

    /// Logs a step whose loss or gradient was not finite, and what was done instead.
    pub fn warn_skipped(&self, step: u64) {
        if self.first_ok() {
            log::warn!(
                "step {step}: the second-pass gradient is not finite; the first-pass gradient is used, \
                 nothing is cached and the gate statistics are unchanged"
            );
        } else {
            log::warn!(
                "step {step}: the loss ({}) or gradient (‖g‖² = {}) is not finite; the update is zeroed, \
                 nothing is cached and the gate statistics are unchanged",
                self.loss,
                self.grad_sq
            );
        }
    }
}

/// A SAM step after its second pass: the PSF per parameter, the statistics, one read of the host
/// values (with the plan's count of earlier non-finite cheap steps), the cache's tensors and the
/// direction: g_s when both passes are finite, g when only the first is, else zeros.
pub(crate) fn finish_sam<M: Module>(
    plan: &Plan,
    module: &M,
    first: FirstPass,
    second: GradientsParams,
) -> (GradientsParams, Contribution) {
    let config = &plan.config;
    let manifest = first.manifest();
    let FirstPass { collected, grad_sq_parts, grad_sq, loss, device, .. } = first;
    let mut second: HashMap<ParamId, Tensor<1>> =
        tensors::collect(module, second, false, None).grads.into_iter().map(|flat| (flat.id, flat.grad)).collect();
    // The PSF of a tensor is needed for the statistics (the last N tensors) and, for a rule that
    // caches it, for every tensor. Elsewhere only g_s's finiteness matters, which a plain sum tells.
    let full_psf = config.reuse.needs_full_psf();
    let tail = collected.grads.len().saturating_sub(config.stats_last_n);

    let mut pairs = Vec::with_capacity(collected.grads.len());
    let mut psf_tail_parts = Vec::with_capacity(config.stats_last_n.min(collected.grads.len()));
    let mut probe_parts = Vec::with_capacity(tail);
    let mut dot_parts = Vec::new();
    for (index, flat) in collected.grads.into_iter().enumerate() {
        // A parameter that took no part in the perturbed pass has no sharpness term.
        let sam_grad = second.remove(&flat.id).unwrap_or_else(|| flat.grad.clone());
        let grad32 = flat.grad.clone().cast(DType::F32);
        let sam32 = sam_grad.clone().cast(DType::F32);
        if config.reuse.needs_dot() {
            dot_parts.push(dot(&grad32, &sam32));
        }
        let in_tail = index >= tail;
        let psf = (in_tail || full_psf).then(|| sam32.clone() - grad32);
        match &psf {
            Some(psf) if in_tail => psf_tail_parts.push(square_sum(psf)),
            _ => probe_parts.push(sam32.sum()),
        }
        pairs.push((flat, sam_grad, psf));
    }
    let psf_tail_sq = sum_parts(&psf_tail_parts, &device);
    let probe = psf_tail_sq.clone() + sum_parts(&probe_parts, &device);
    let cheap_non_finite = plan.cheap_non_finite.clone().unwrap_or_else(|| Tensor::zeros([1], (&device, DType::F32)));
    let read = readback::read(
        [
            ("grad_sq", grad_sq),
            ("grad_tail_sq", sum_parts(&grad_sq_parts[tail..], &device)),
            ("psf_tail_sq", psf_tail_sq),
            ("second_probe", probe),
            ("loss", loss),
            ("dot", sum_parts(&dot_parts, &device)),
            ("cheap_non_finite", cheap_non_finite),
        ],
        &device,
    );
    let values = SamValues {
        grad_sq: read.get("grad_sq"),
        grad_tail_sq: read.get("grad_tail_sq"),
        psf_tail_sq: read.get("psf_tail_sq"),
        second_probe: read.get("second_probe"),
        loss: read.get("loss"),
        dot: read.get("dot"),
        cheap_non_finite: read.get("cheap_non_finite"),
    };

    let cache = values.second_ok().then(|| {
        let (reuse, projection) = (&config.reuse, values.projection());
        let tensors: HashMap<ParamId, Tensor<1>> = pairs
            .iter()
            .filter_map(|(flat, sam_grad, psf)| {
                Some((flat.id, reuse.cache_of(&flat.grad, sam_grad, psf.as_ref(), projection)?))
            })
            .collect();
        let precision = config.cache_precision;
        let layout = pairs
            .iter()
            .map(|(flat, _, _)| (flat.id, precision.storage_dtype(flat.grad.dtype(), &flat.grad.device())))
            .collect();
        (tensors, layout, device.clone())
    });
    let cache = cache.filter(|(tensors, _, _)| !tensors.is_empty());
    let (first_ok, second_ok) = (values.first_ok(), values.second_ok());
    let directions = pairs
        .into_iter()
        .map(|(flat, sam_grad, _)| {
            let direction = if second_ok {
                sam_grad
            } else if first_ok {
                flat.grad
            } else {
                flat.grad.zeros_like()
            };
            (flat.id, direction, flat.shape)
        })
        .collect();
    let contribution = Contribution { values: Some(values), cache, non_finite: None, grad_sq: None, manifest };
    (tensors::into_gradients(module, directions), contribution)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A plan for a cheap step that adds `term` of `cache`.
    fn cheap_plan(term: crate::reuse::CheapTerm, cache: ReuseCache) -> Plan {
        Plan {
            sam: false,
            term,
            cache: std::sync::Arc::new(cache),
            config: crate::SamConfig::vsam(1),
            wants_grad_norm: false,
            cheap_non_finite: None,
        }
    }

    #[test]
    fn a_cheap_direction_is_g_plus_the_weighted_cache_and_reads_nothing() {
        use burn::nn::{Linear, LinearConfig};
        let device = Device::flex().autodiff();
        let model: Linear = LinearConfig::new(3, 2).init(&device);
        let x = Tensor::<2>::from_data([[1.0f32, -2.0, 0.5]], &device);
        let loss_of = |m: &Linear| m.forward(x.clone()).powi_scalar(2).sum();
        let g = |m: &Linear| GradientsParams::from_grads(loss_of(m).backward(), m);
        let reference = g(&model);
        let g_w: Vec<f32> = reference.get::<2>(model.weight.id).unwrap().into_data().iter::<f32>().collect();
        // The cache holds the weight's PSF only: the bias has none and keeps g.
        let psf = Tensor::<1>::from_data([1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], (&device.clone().inner(), DType::F32));
        let tensors = HashMap::from([(model.weight.id, psf)]);
        let layout = [(model.weight.id, DType::F32)];
        let cache = ReuseCache::new(tensors, &ReusePolicy::decayed_psf(), &layout, &device.clone().inner());
        for (term, weight) in [(crate::reuse::CheapTerm::Scaled(0.49), 0.49f32), (crate::reuse::CheapTerm::Plain, 0.0)]
        {
            let plan = cheap_plan(term, cache.clone());
            let loss = loss_of(&model);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let first = first_pass(&plan, &model, grads, &loss);
            let (direction, contribution) = finish_cheap(&plan, &model, first);
            let d: Vec<f32> = direction.get::<2>(model.weight.id).unwrap().into_data().iter::<f32>().collect();
            for (i, (d, g)) in d.iter().zip(&g_w).enumerate() {
                assert_eq!(*d, g + weight * (i + 1) as f32, "{term:?}, element {i}");
            }
            let bias = model.bias.as_ref().unwrap().id;
            assert_eq!(
                direction.get::<1>(bias).unwrap().into_data().iter::<f32>().collect::<Vec<_>>(),
                reference.get::<1>(bias).unwrap().into_data().iter::<f32>().collect::<Vec<_>>()
            );
            assert!(contribution.values.is_none() && contribution.cache.is_none(), "a cheap step reads nothing");
            assert!(contribution.non_finite.is_some(), "guarded: the flag stays on the device");
        }
    }

    #[test]
    fn storing_in_f16_saturates_and_bf16_rounds_once() {
        let device = Device::flex();
        let values = [1.0e6f32, -7.0e4, 3.0, 1.0e-3, 65504.0];
        let tensor = Tensor::<1>::from_data(values, (&device, DType::F32));
        let stored = store_as(tensor.clone(), DType::F16);
        assert_eq!(stored.dtype(), DType::F16);
        let back: Vec<f32> = stored.into_data().iter::<f32>().collect();
        assert!(back.iter().all(|v| v.is_finite()), "{back:?}");
        assert_eq!(&back[..3], &[65504.0, -65504.0, 3.0]);
        let bf16: Vec<f32> = store_as(tensor, DType::BF16).into_data().iter::<f32>().collect();
        assert_eq!(bf16[0], 999424.0, "1e6 to bf16's nearest (8 significant bits)");
        assert_eq!(bf16[2], 3.0);
    }

    #[test]
    fn the_cache_is_stored_in_its_layout_dtype_and_counted_in_bytes() {
        let device = Device::flex();
        let (a, b) = (ParamId::new(), ParamId::new());
        let tensors = HashMap::from([
            (a, Tensor::<1>::from_data([1.0f32, 2.0, 3.0], (&device, DType::F32))),
            (b, Tensor::<1>::from_data([4.0f32], (&device, DType::F32))),
        ]);
        let layout = [(a, DType::BF16), (b, DType::F32)];
        let cache = ReuseCache::new(tensors.clone(), &ReusePolicy::decayed_psf(), &layout, &device);
        assert_eq!(cache.tensors[&a].dtype(), DType::BF16);
        assert_eq!(cache.tensors[&b].dtype(), DType::F32);
        assert_eq!(cache.bytes(), 3 * 2 + 4);
        // LookSAM's norm is of the stored values, in f32.
        let look = ReuseCache::new(tensors, &ReusePolicy::look_sam(), &layout, &device);
        let norm = look.norm.clone().map(|n| n.into_scalar::<f32>());
        assert_eq!(norm, Some(30.0f32.sqrt()));
        assert_eq!(look.bytes(), 3 * 2 + 4 + 4);
    }
}
