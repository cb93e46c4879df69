//! The tensor work of one step, free of engine state: measuring the first pass, building the
//! perturbed clone, forming the direction of a cheap step, and evaluating a SAM step.
//!
//! [`Pass`](super::Pass) strings them together; the engine keeps the state between steps.

use std::collections::HashMap;

use burn::module::{Module, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Bool, DType, Device, Tensor};

use super::tensors::{self, dot, square_sum, sum_parts, Collected, FlatGrad};
use crate::config::SamConfig;
use crate::policy::PsfStats;
use crate::reuse::{CachePrecision, CheapTerm, ReusePolicy};

/// The first pass of a step, measured.
#[derive(Debug)]
pub(crate) struct FirstPass {
    pub(crate) collected: Collected,
    grad_sq_parts: Vec<Tensor<1>>,
    pub(crate) grad_sq: Tensor<1>,
    loss: Tensor<1>,
    skip: Tensor<1, Bool>,
    pub(crate) device: Device,
}

impl FirstPass {
    /// The parameters with a gradient, in module order, with their shapes.
    pub(crate) fn manifest(&self) -> Vec<(u64, Vec<usize>)> {
        self.collected.grads.iter().map(|flat| (flat.id.val(), flat.shape.to_vec())).collect()
    }

    /// 1.0 when the loss or the gradient is not finite, else 0.0 (f32, on the device).
    pub(crate) fn non_finite_flag(&self) -> Tensor<1> {
        self.skip.clone().float().cast(DType::F32)
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
        let norm = matches!(reuse, ReusePolicy::LookSam { .. }).then(|| {
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

/// Takes the pass-1 gradients and loss; computes ‖g‖² on the device when needed.
pub(crate) fn first_pass<M: Module>(
    config: &SamConfig,
    module: &M,
    grads: GradientsParams,
    loss: &Tensor<1>,
    sam: bool,
    wants_grad_norm: bool,
) -> FirstPass {
    let asam_eta = (sam && config.adaptive).then_some(config.adaptive_eta);
    let collected = tensors::collect(module, grads, sam, asam_eta);
    let device = collected.grads.first().map(|flat| flat.grad.device()).unwrap_or_else(|| loss.device());
    // ‖g‖² is needed for the ascent, LookSAM's norm matching and AE-SAM's statistic; the
    // non-finite guard alone only needs to know whether g is finite, which a plain sum (one read,
    // no temporary) tells as well: it is non-finite exactly when an element is (or when the sum
    // itself passes f32's range, ~3·10³⁸, which a finite ‖g‖² would have passed first).
    let needs_norm = sam || wants_grad_norm || matches!(config.reuse, ReusePolicy::LookSam { .. });
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

/// The perturbed module `w + ε` of a SAM step. When the loss or g is not finite the clone holds
/// garbage, which is harmless: the step is then skipped (its update zeroed, nothing cached, the
/// gate told nothing), so nothing computed on the clone is used.
pub(crate) fn perturb<M: Module>(config: &SamConfig, module: &M, first: &FirstPass) -> M {
    let norm_sq =
        if config.adaptive { sum_parts(&first.collected.scaled_sq, &first.device) } else { first.grad_sq.clone() };
    let rho = Tensor::<1>::full([1], config.rho, (&first.device, DType::F32));
    let scale = rho / norm_sq.sqrt().add_scalar(config.eps);
    let asam_eta = config.adaptive.then_some(config.adaptive_eta);
    tensors::perturbed_clone(module, &first.collected, &scale, asam_eta)
}

/// The direction of a cheap step: `g` plus the reuse `term` over `cache`, zeroed on the device
/// when the loss or gradient is not finite (if guarded).
pub(crate) fn cheap_direction<M: Module>(
    config: &SamConfig,
    module: &M,
    first: FirstPass,
    term: CheapTerm,
    cache: &ReuseCache,
) -> GradientsParams {
    let norm_matched = match (term, &cache.norm) {
        (CheapTerm::NormMatched(alpha), Some(cache_norm)) => Some(
            first
                .grad_sq
                .clone()
                .sqrt()
                .mul_scalar(alpha)
                .div(cache_norm.clone().to_device(&first.device).add_scalar(config.eps)),
        ),
        _ => None,
    };
    let guard = config.guard_non_finite;
    let directions = first
        .collected
        .grads
        .into_iter()
        .map(|flat| {
            let dtype = flat.grad.dtype();
            let device = flat.grad.device();
            // The cache is read in f32 whatever its storage, the sum rounded once to g's dtype.
            let cached = cache.tensors.get(&flat.id).map(|t| t.clone().to_device(&device).cast(DType::F32));
            let mut direction = match (term, cached, &norm_matched) {
                (CheapTerm::Scaled(weight), Some(cached), _) => {
                    store_as(flat.grad.cast(DType::F32) + cached.mul_scalar(weight), dtype)
                }
                (CheapTerm::NormMatched(_), Some(cached), Some(coefficient)) => {
                    store_as(flat.grad.cast(DType::F32) + cached * coefficient.clone().to_device(&device), dtype)
                }
                _ => flat.grad,
            };
            if guard {
                let skip = first.skip.clone().to_device(&device).expand([flat.shape.num_elements()]);
                direction = direction.mask_fill(skip, 0.0);
            }
            (flat.id, direction, flat.shape)
        })
        .collect();
    tensors::into_gradients(module, directions)
}

/// The host values of a SAM step, read in one transfer.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Readback {
    pub grad_sq: f64,
    grad_tail_sq: f64,
    psf_tail_sq: f64,
    /// Finite exactly when the second-pass gradient is (‖PSF‖² of the last N tensors plus the
    /// sums of g_s elsewhere).
    second_probe: f64,
    pub loss: f64,
    dot: f64,
    /// Sum of the non-finite flags handed in (cheap steps since the last read).
    pub cheap_non_finite: f64,
}

impl Readback {
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
}

/// A SAM step after its second pass: per parameter (g, g_s, PSF) and the host values.
pub(crate) struct SamOutcome {
    /// Per parameter: g, g_s, and the PSF where it was formed.
    pairs: Vec<(FlatGrad, Tensor<1>, Option<Tensor<1>>)>,
    pub readback: Readback,
    pub device: Device,
}

/// Evaluates a SAM step: PSF per parameter, the statistics, and one read of the host values.
/// `cheap_flags` (non-finite flags of earlier cheap steps) rides along in the same read.
pub(crate) fn evaluate_sam<M: Module>(
    config: &SamConfig,
    module: &M,
    first: FirstPass,
    second: GradientsParams,
    cheap_flags: Option<Tensor<1>>,
) -> SamOutcome {
    let FirstPass { collected, grad_sq_parts, grad_sq, loss, device, .. } = first;
    let mut second: HashMap<ParamId, Tensor<1>> =
        tensors::collect(module, second, false, None).grads.into_iter().map(|flat| (flat.id, flat.grad)).collect();
    let look_sam = matches!(config.reuse, ReusePolicy::LookSam { .. });
    // The PSF of a tensor is needed for the statistics (the last N tensors) and for vSAM's cache
    // (every tensor). Elsewhere only g_s's finiteness matters, which a plain sum tells.
    let cache_psf = matches!(config.reuse, ReusePolicy::DecayedPsf { .. });
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
        if look_sam {
            dot_parts.push(dot(&grad32, &sam32));
        }
        let in_tail = index >= tail;
        let psf = (in_tail || cache_psf).then(|| sam32.clone() - grad32);
        match &psf {
            Some(psf) if in_tail => psf_tail_parts.push(square_sum(psf)),
            _ => probe_parts.push(sam32.sum()),
        }
        pairs.push((flat, sam_grad, psf));
    }
    let psf_tail_sq = sum_parts(&psf_tail_parts, &device);
    let probe = psf_tail_sq.clone() + sum_parts(&probe_parts, &device);
    let readback = Tensor::cat(
        vec![
            grad_sq,
            sum_parts(&grad_sq_parts[tail..], &device),
            psf_tail_sq,
            probe,
            loss,
            sum_parts(&dot_parts, &device),
            cheap_flags
                .map(|flags| flags.to_device(&device))
                .unwrap_or_else(|| Tensor::zeros([1], (&device, DType::F32))),
        ],
        0,
    );
    let values: Vec<f64> = readback.into_data().iter::<f32>().map(f64::from).collect();
    // A read of another length cannot happen with a working backend; if it did, the step would
    // count as non-finite (skipped) rather than use misplaced values.
    let [grad_sq, grad_tail_sq, psf_tail_sq, second_probe, loss, dot, cheap_non_finite] =
        <[f64; 7]>::try_from(values).unwrap_or([f64::NAN; 7]);
    SamOutcome {
        pairs,
        readback: Readback { grad_sq, grad_tail_sq, psf_tail_sq, second_probe, loss, dot, cheap_non_finite },
        device,
    }
}

impl SamOutcome {
    /// What this step contributes to the reuse cache (f32, per parameter): the PSF for
    /// `DecayedPsf`, the part of g_s orthogonal to g for `LookSam`, nothing for `None`.
    /// Only meaningful when [`Readback::second_ok`].
    pub fn cache_tensors(&self, reuse: &ReusePolicy) -> Option<HashMap<ParamId, Tensor<1>>> {
        match reuse {
            ReusePolicy::None => None,
            ReusePolicy::DecayedPsf { .. } => {
                Some(self.pairs.iter().filter_map(|(flat, _, psf)| Some((flat.id, psf.clone()?))).collect())
            }
            ReusePolicy::LookSam { .. } => {
                let r = &self.readback;
                let projection = if r.grad_sq > 0.0 { r.dot / r.grad_sq } else { 0.0 };
                Some(
                    self.pairs
                        .iter()
                        .map(|(flat, sam_grad, _)| {
                            let g = flat.grad.clone().cast(DType::F32);
                            (flat.id, sam_grad.clone().cast(DType::F32) - g.mul_scalar(projection))
                        })
                        .collect(),
                )
            }
        }
    }

    /// Parameter order of this step, with the dtype each parameter's cache is stored in.
    pub fn layout(&self, precision: CachePrecision) -> Vec<(ParamId, DType)> {
        self.pairs
            .iter()
            .map(|(flat, _, _)| (flat.id, precision.storage_dtype(flat.grad.dtype(), &flat.grad.device())))
            .collect()
    }

    /// The direction: g_s when both passes are finite, g when only the first is, else zeros.
    pub fn direction<M: Module>(self, module: &M) -> GradientsParams {
        let (first_ok, second_ok) = (self.readback.first_ok(), self.readback.second_ok());
        let directions = self
            .pairs
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
        tensors::into_gradients(module, directions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
