//! The tensor engine shared by every member of the family: the first pass is measured, the gate
//! decides, a perturbed clone is built for SAM steps, the PSF is cached, and cheap steps mix the
//! cache back in. The result is a direction for any Burn base optimizer.
//!
//! The protocol for one step:
//!
//! 1. [`SamEngine::first_pass`] with the pass-1 gradients and loss; the gate decides here;
//! 2. [`SamEngine::perturb`] returns the perturbed module on SAM steps (`None` on cheap steps);
//!    run the second forward/backward pass on it;
//! 3. [`SamEngine::finish`] with the second-pass gradients (SAM steps) or `None` (cheap steps)
//!    returns the direction to hand to the base optimizer.
//!
//! Host reads: one small read per SAM step (the statistics, the loss and the non-finite counter,
//! together); none on cheap steps, except AE-SAM's ‖g‖² of the previous step.

mod record;
pub(crate) mod tensors;

pub use record::EngineRecord;
pub(crate) use record::{pack_tensor, read_all, read_file, STATE_KEY};

use std::collections::HashMap;

use burn::module::{Module, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::{Bool, DType, Device, Shape, Tensor};
use serde::{Deserialize, Serialize};

use crate::config::SamConfig;
use crate::error::{Result, SamError};
use crate::policy::{Gate, PsfStats};
use crate::reuse::{CheapTerm, ReusePolicy};
use crate::telemetry::StepTelemetry;
use tensors::{square_sum, sum_parts, Collected};

/// Running totals kept by the engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Steps finished.
    pub steps: u64,
    /// Of those, SAM steps (second pass run).
    pub sam_steps: u64,
    /// Gradient passes run (one per step, two per SAM step).
    pub passes: u64,
    /// Steps whose loss or gradient was not finite, as known on the host so far (cheap steps are
    /// counted on the device and read at the next SAM step or record).
    pub non_finite_steps: u64,
}

/// What a SAM step stores for the cheap steps after it, per `ParamId`, in f32.
#[derive(Clone, Debug, Default)]
pub(crate) struct ReuseCache {
    pub tensors: HashMap<ParamId, Tensor<1>>,
    /// ‖g_v‖ for LookSAM's norm matching.
    pub norm: Option<Tensor<1>>,
}

/// The result of the first pass of a step, to hand back to [`SamEngine::perturb`] and
/// [`SamEngine::finish`].
#[derive(Debug)]
pub struct FirstPass {
    sam: bool,
    collected: Collected,
    grad_sq_parts: Vec<Tensor<1>>,
    grad_sq: Tensor<1>,
    loss: Tensor<1>,
    skip: Tensor<1, Bool>,
    device: Device,
}

impl FirstPass {
    /// Whether the gate chose a SAM step (a second pass is expected).
    pub fn is_sam(&self) -> bool {
        self.sam
    }
}

/// Gate, PSF cache and tensor work of the SAM family, without a base optimizer.
///
/// [`SamOptimizer`](crate::SamOptimizer) combines it with a base optimizer for custom loops; the
/// Learner integration drives it from a train step.
#[derive(Clone, Debug)]
pub struct SamEngine {
    config: SamConfig,
    gate: Gate,
    cache: ReuseCache,
    since_cache: u32,
    pending_grad_sq: Option<Tensor<1>>,
    device_non_finite: Option<Tensor<1>>,
    counters: Counters,
    last_stats: Option<PsfStats>,
    last_sam: bool,
    last_skipped: bool,
    manifest: Vec<(ParamId, Shape)>,
}

impl SamEngine {
    /// Builds an engine; every field of `config` is checked first.
    pub fn new(config: &SamConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            gate: Gate::new(config.policy.clone(), config.seed)?,
            config: config.clone(),
            cache: ReuseCache::default(),
            since_cache: 0,
            pending_grad_sq: None,
            device_non_finite: None,
            counters: Counters::default(),
            last_stats: None,
            last_sam: false,
            last_skipped: false,
            manifest: Vec::new(),
        })
    }

    /// The configuration this engine runs.
    pub fn config(&self) -> &SamConfig {
        &self.config
    }

    /// The gate, for inspection.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }

    /// Running totals.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Step 1: takes the pass-1 gradients and loss of `module`, and decides the step.
    pub fn first_pass<M: Module>(&mut self, module: &M, grads: GradientsParams, loss: &Tensor<1>) -> FirstPass {
        self.feed_lagged_grad_norm();
        let sam = self.gate.decide();
        let asam_eta = (sam && self.config.adaptive).then_some(self.config.adaptive_eta);
        let collected = tensors::collect(module, grads, sam, asam_eta);
        let device = collected
            .grads
            .first()
            .map(|flat| flat.grad.device())
            .unwrap_or_else(|| loss.device());
        let needs_norm = sam
            || self.config.guard_non_finite
            || self.gate.wants_grad_norm()
            || matches!(self.config.reuse, ReusePolicy::LookSam { .. });
        let grad_sq_parts: Vec<Tensor<1>> = if needs_norm {
            collected.grads.iter().map(|flat| square_sum(&flat.grad)).collect()
        } else {
            Vec::new()
        };
        let grad_sq = sum_parts(&grad_sq_parts, &device);
        let loss = loss.clone().inner().cast(DType::F32).sum().to_device(&device);
        let skip = grad_sq.clone().is_finite().bool_and(loss.clone().is_finite()).bool_not();
        self.manifest = collected.grads.iter().map(|flat| (flat.id, flat.shape.clone())).collect();
        FirstPass {
            sam,
            collected,
            grad_sq_parts,
            grad_sq,
            loss,
            skip,
            device,
        }
    }

    /// Step 2: the perturbed module `w + ε` for a SAM step, `None` for a cheap step.
    ///
    /// The clone keeps every `ParamId`, require-grad and checkpointing setting; parameters
    /// without a gradient are left as they are; its BatchNorm running statistics are separate
    /// from `module`'s, so the second pass does not update them. `module` is not modified.
    pub fn perturb<M: Module>(&self, module: &M, first: &FirstPass) -> Option<M> {
        if !first.sam {
            return None;
        }
        let norm_sq = if self.config.adaptive {
            sum_parts(&first.collected.scaled_sq, &first.device)
        } else {
            first.grad_sq.clone()
        };
        let rho = Tensor::<1>::full([1], self.config.rho, (&first.device, DType::F32));
        let scale = rho / norm_sq.sqrt().add_scalar(self.config.eps);
        let asam_eta = self.config.adaptive.then_some(self.config.adaptive_eta);
        Some(tensors::perturbed_clone(module, &first.collected, &scale, &first.skip, asam_eta))
    }

    /// Step 3: the direction for the base optimizer.
    ///
    /// `second` must hold the gradients of the perturbed module on SAM steps and be `None` on
    /// cheap steps; anything else is a protocol error and leaves the engine unchanged.
    pub fn finish<M: Module>(
        &mut self,
        module: &M,
        first: FirstPass,
        second: Option<GradientsParams>,
    ) -> Result<GradientsParams> {
        match (first.sam, second) {
            (true, Some(second)) => Ok(self.finish_sam(module, first, second)),
            (false, None) => Ok(self.finish_cheap(module, first)),
            (true, None) => Err(SamError::Protocol(format!(
                "step {} is a SAM step: `finish` needs the second-pass gradients",
                self.counters.steps
            ))),
            (false, Some(_)) => Err(SamError::Protocol(format!(
                "step {} is a cheap step: `finish` expects no second-pass gradients",
                self.counters.steps
            ))),
        }
    }

    fn finish_cheap<M: Module>(&mut self, module: &M, first: FirstPass) -> GradientsParams {
        self.since_cache = self.since_cache.saturating_add(1);
        let term = if self.cache.tensors.is_empty() {
            CheapTerm::Plain
        } else {
            self.config.reuse.cheap_term(self.since_cache)
        };
        let norm_matched = match (term, &self.cache.norm) {
            (CheapTerm::NormMatched(alpha), Some(cache_norm)) => Some(
                first
                    .grad_sq
                    .clone()
                    .sqrt()
                    .mul_scalar(alpha)
                    .div(cache_norm.clone().to_device(&first.device).add_scalar(self.config.eps)),
            ),
            _ => None,
        };
        let guard = self.config.guard_non_finite;
        let directions = first
            .collected
            .grads
            .into_iter()
            .map(|flat| {
                let cached = self.cache.tensors.get(&flat.id);
                let mut direction = match (term, cached) {
                    (CheapTerm::Scaled(weight), Some(cached)) => {
                        let dtype = flat.grad.dtype();
                        (flat.grad.cast(DType::F32) + cached.clone().mul_scalar(weight)).cast(dtype)
                    }
                    (CheapTerm::NormMatched(_), Some(cached)) => {
                        let dtype = flat.grad.dtype();
                        let coefficient = norm_matched.clone().expect("set with the norm-matched term");
                        let coefficient = coefficient.to_device(&cached.device());
                        (flat.grad.cast(DType::F32) + cached.clone() * coefficient).cast(dtype)
                    }
                    _ => flat.grad,
                };
                if guard {
                    let skip = first.skip.clone().to_device(&direction.device()).expand(flat.shape.clone().flatten());
                    direction = direction.mask_fill(skip, 0.0);
                }
                (flat.id, direction, flat.shape)
            })
            .collect();
        if guard {
            let bad = first.skip.clone().float().cast(DType::F32);
            self.device_non_finite = Some(match self.device_non_finite.take() {
                Some(count) => count + bad,
                None => bad,
            });
        }
        if self.gate.wants_grad_norm() {
            self.pending_grad_sq = Some(first.grad_sq);
        }
        self.counters.steps += 1;
        self.counters.passes += 1;
        self.last_sam = false;
        self.last_skipped = false;
        tensors::into_gradients(module, directions)
    }

    fn finish_sam<M: Module>(&mut self, module: &M, first: FirstPass, second: GradientsParams) -> GradientsParams {
        let FirstPass {
            collected,
            grad_sq_parts,
            grad_sq,
            loss,
            device,
            ..
        } = first;
        let mut second: HashMap<ParamId, Tensor<1>> = tensors::collect(module, second, false, None)
            .grads
            .into_iter()
            .map(|flat| (flat.id, flat.grad))
            .collect();
        let look_sam = matches!(self.config.reuse, ReusePolicy::LookSam { .. });

        let mut pairs = Vec::with_capacity(collected.grads.len());
        let mut psf_sq_parts = Vec::with_capacity(collected.grads.len());
        let mut dot_parts = Vec::new();
        for flat in collected.grads {
            // A parameter that took no part in the perturbed pass has no sharpness term.
            let sam_grad = second.remove(&flat.id).unwrap_or_else(|| flat.grad.clone());
            let grad32 = flat.grad.clone().cast(DType::F32);
            let sam32 = sam_grad.clone().cast(DType::F32);
            if look_sam {
                dot_parts.push((grad32.clone() * sam32.clone()).sum());
            }
            let psf = sam32 - grad32;
            psf_sq_parts.push(square_sum(&psf));
            pairs.push((flat, sam_grad, psf));
        }
        let tail = pairs.len().saturating_sub(self.config.stats_last_n);
        let readback = Tensor::cat(
            vec![
                grad_sq,
                sum_parts(&grad_sq_parts[tail..], &device),
                sum_parts(&psf_sq_parts[tail..], &device),
                sum_parts(&psf_sq_parts, &device),
                loss,
                sum_parts(&dot_parts, &device),
                self.device_non_finite
                    .take()
                    .map(|count| count.to_device(&device))
                    .unwrap_or_else(|| Tensor::zeros([1], (&device, DType::F32))),
            ],
            0,
        );
        let values: Vec<f64> = readback
            .into_data()
            .iter::<f32>()
            .map(f64::from)
            .collect();
        let [grad_sq, grad_tail_sq, psf_tail_sq, psf_sq, loss, dot, cheap_non_finite] = values[..] else {
            unreachable!("seven statistics were concatenated")
        };
        self.record_cheap_non_finite(cheap_non_finite);

        let step = self.counters.steps;
        let first_ok = grad_sq.is_finite() && loss.is_finite();
        let second_ok = psf_sq.is_finite();
        let directions = if first_ok && second_ok {
            let psf_norm = psf_tail_sq.sqrt();
            let grad_tail = grad_tail_sq.sqrt();
            let ratio = if grad_tail > 0.0 { psf_norm / grad_tail } else { 0.0 };
            let stats = PsfStats { psf_norm, ratio };
            self.gate.observe_sam(stats);
            self.gate.observe_grad_norm_sq(grad_sq);
            self.last_stats = Some(stats);
            self.last_skipped = false;
            let projection = if grad_sq > 0.0 { dot / grad_sq } else { 0.0 };
            self.store_cache(&pairs, projection, &device);
            pairs
                .into_iter()
                .map(|(flat, sam_grad, _)| (flat.id, sam_grad, flat.shape))
                .collect()
        } else {
            self.counters.non_finite_steps += 1;
            self.last_skipped = true;
            if first_ok {
                log::warn!(
                    "step {step}: the second-pass gradient is not finite; the first-pass gradient is \
                     used, nothing is cached and the gate statistics are unchanged"
                );
                self.gate.observe_grad_norm_sq(grad_sq);
                pairs.into_iter().map(|(flat, _, _)| (flat.id, flat.grad, flat.shape)).collect()
            } else {
                log::warn!(
                    "step {step}: the loss ({loss}) or gradient (‖g‖² = {grad_sq}) is not finite; \
                     no perturbation, the update is zeroed, nothing is cached and the gate \
                     statistics are unchanged"
                );
                pairs
                    .into_iter()
                    .map(|(flat, _, _)| (flat.id, flat.grad.zeros_like(), flat.shape))
                    .collect()
            }
        };
        self.pending_grad_sq = None;
        self.counters.steps += 1;
        self.counters.sam_steps += 1;
        self.counters.passes += 2;
        self.last_sam = true;
        tensors::into_gradients(module, directions)
    }

    fn store_cache(&mut self, pairs: &[(tensors::FlatGrad, Tensor<1>, Tensor<1>)], projection: f64, device: &Device) {
        match self.config.reuse {
            ReusePolicy::None => return,
            ReusePolicy::DecayedPsf { .. } => {
                self.cache.tensors = pairs.iter().map(|(flat, _, psf)| (flat.id, psf.clone())).collect();
                self.cache.norm = None;
            }
            ReusePolicy::LookSam { .. } => {
                let orthogonal: Vec<(ParamId, Tensor<1>)> = pairs
                    .iter()
                    .map(|(flat, sam_grad, _)| {
                        let g = flat.grad.clone().cast(DType::F32);
                        (flat.id, sam_grad.clone().cast(DType::F32) - g.mul_scalar(projection))
                    })
                    .collect();
                let parts: Vec<Tensor<1>> = orthogonal.iter().map(|(_, t)| square_sum(t)).collect();
                self.cache.norm = Some(sum_parts(&parts, device).sqrt());
                self.cache.tensors = orthogonal.into_iter().collect();
            }
        }
        self.since_cache = 0;
    }

    fn record_cheap_non_finite(&mut self, count: f64) {
        if count > 0.0 {
            let count = count.round() as u64;
            log::warn!(
                "{count} cheap step(s) before step {} had a non-finite loss or gradient; their \
                 updates were zeroed",
                self.counters.steps
            );
            self.counters.non_finite_steps += count;
        }
    }

    fn feed_lagged_grad_norm(&mut self) {
        if let Some(grad_sq) = self.pending_grad_sq.take() {
            let value = grad_sq.into_scalar::<f32>() as f64;
            self.gate.observe_grad_norm_sq(value);
        }
    }

    /// Reads the device-side count of non-finite cheap steps into [`Counters`] (one host read).
    pub fn sync_counters(&mut self) -> Counters {
        if let Some(count) = self.device_non_finite.take() {
            let count = count.into_scalar::<f32>() as f64;
            self.record_cheap_non_finite(count);
        }
        self.counters
    }

    /// What the last finished step did, and the totals so far. Reads nothing from the device.
    pub fn telemetry(&self) -> StepTelemetry {
        let c = self.counters;
        StepTelemetry {
            step: c.steps,
            sam: self.last_sam,
            skipped: self.last_skipped,
            passes: c.passes,
            sam_steps: c.sam_steps,
            sam_fraction: if c.steps == 0 { 0.0 } else { c.sam_steps as f64 / c.steps as f64 },
            quota: self.gate.quota(),
            warmup: self.gate.in_warmup(),
            psf_norm: self.last_stats.map(|s| s.psf_norm),
            psf_ratio: self.last_stats.map(|s| s.ratio),
            non_finite_steps: c.non_finite_steps,
        }
    }
}
