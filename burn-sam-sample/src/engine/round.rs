//! One gate decision and what the steps under it report. A custom loop has one step per round;
//! the Learner has one per micro-batch and device of an optimizer step, all under the same
//! decision, and the round's end averages what they saw.

use std::collections::HashMap;

use burn::module::ParamId;
use burn::tensor::{DType, Device, Tensor};

use crate::policy::PsfStats;
use crate::reuse::CheapTerm;

/// Per-parameter tensors to cache (f32), their parameter order with each one's storage dtype,
/// and the device.
pub(crate) type CacheParts = (HashMap<ParamId, Tensor<1>>, Vec<(ParamId, DType)>, Device);

#[derive(Clone, Debug)]
pub(crate) struct Round {
    pub sam: bool,
    pub term: CheapTerm,
    cache_sum: Option<CacheParts>,
    contributions: u32,
    stats: Vec<PsfStats>,
    grad_sq_host: Vec<f64>,
    grad_sq_device: Option<Tensor<1>>,
    grad_sq_count: u32,
}

/// What a round taught, averaged over its steps.
pub(crate) struct Closed {
    pub sam: bool,
    /// The mean of the steps' cache contributions.
    pub cache: Option<CacheParts>,
    /// The mean PSF statistics of its successful SAM steps.
    pub stats: Option<PsfStats>,
    /// The mean ‖g‖² read on the host (SAM steps).
    pub grad_sq_host: Option<f64>,
    /// The mean ‖g‖² still on the device (cheap steps, AE-SAM only).
    pub grad_sq_device: Option<Tensor<1>>,
}

impl Round {
    pub fn open(sam: bool, term: CheapTerm) -> Self {
        Self {
            sam,
            term,
            cache_sum: None,
            contributions: 0,
            stats: Vec::new(),
            grad_sq_host: Vec::new(),
            grad_sq_device: None,
            grad_sq_count: 0,
        }
    }

    /// A cheap step's ‖g‖², summed on the device.
    pub fn add_device_grad_sq(&mut self, grad_sq: Tensor<1>) {
        self.grad_sq_device = Some(match self.grad_sq_device.take() {
            Some(sum) => {
                let device = sum.device();
                sum + grad_sq.to_device(&device)
            }
            None => grad_sq,
        });
        self.grad_sq_count = self.grad_sq_count.saturating_add(1);
    }

    /// A SAM step whose ‖g‖² was read on the host but whose statistics are unusable.
    pub fn add_grad_sq(&mut self, grad_sq: f64) {
        self.grad_sq_host.push(grad_sq);
    }

    /// A successful SAM step: its statistics, ‖g‖² and cache contribution (`place` gives the
    /// parameter order and device of the first contribution).
    pub fn add_sam(
        &mut self,
        stats: PsfStats,
        grad_sq: f64,
        tensors: Option<HashMap<ParamId, Tensor<1>>>,
        place: impl FnOnce() -> (Vec<(ParamId, DType)>, Device),
    ) {
        self.stats.push(stats);
        self.grad_sq_host.push(grad_sq);
        let Some(tensors) = tensors else {
            return;
        };
        self.contributions = self.contributions.saturating_add(1);
        self.cache_sum = Some(match self.cache_sum.take() {
            None => {
                let (order, device) = place();
                (tensors, order, device)
            }
            Some((mut sum, order, device)) => {
                for (id, tensor) in tensors {
                    let tensor = tensor.to_device(&device);
                    let total = match sum.remove(&id) {
                        Some(previous) => previous + tensor,
                        None => tensor,
                    };
                    sum.insert(id, total);
                }
                (sum, order, device)
            }
        });
    }

    pub fn close(self) -> Closed {
        let cache = self.cache_sum.map(|(sum, order, device)| {
            let tensors = if self.contributions > 1 {
                let scale = 1.0 / self.contributions as f64;
                sum.into_iter().map(|(id, t)| (id, t.mul_scalar(scale))).collect()
            } else {
                sum
            };
            (tensors, order, device)
        });
        let stats = (!self.stats.is_empty()).then(|| {
            let n = self.stats.len() as f64;
            PsfStats {
                psf_norm: self.stats.iter().map(|s| s.psf_norm).sum::<f64>() / n,
                ratio: self.stats.iter().map(|s| s.ratio).sum::<f64>() / n,
            }
        });
        let grad_sq_host = (!self.grad_sq_host.is_empty())
            .then(|| self.grad_sq_host.iter().sum::<f64>() / self.grad_sq_host.len() as f64);
        let count = self.grad_sq_count;
        let grad_sq_device = self.grad_sq_device.map(|sum| if count > 1 { sum.div_scalar(count as f64) } else { sum });
        Closed { sam: self.sam, cache, stats, grad_sq_host, grad_sq_device }
    }
}
