//! Saving and restoring the engine: the scalar state ([`EngineState`], gate and RNG included) as
//! JSON, the PSF cache as tensors keyed by `ParamId`, in a sealed container.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::{Bytes, DType, Device, Shape, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::{EngineState, ReuseCache, SamEngine};
use crate::config::SamConfig;
use crate::container::{self, Sealed, Tensors};
use crate::error::{Result, SamError};
use crate::policy::Gate;
use crate::reuse::ReusePolicy;

const CACHE_PREFIX: &str = "burn-sam-sample.cache.";
const CACHE_NORM: &str = "burn-sam-sample.cache-norm";
/// Version of the state JSON; 2 since the gate is stored as its rule paired with its state.
const FORMAT: u32 = 2;
/// The largest squared norm of a cache a finite step can store: f32's largest value, in which the
/// engine sums the squares of the PSF (its statistics) and of LookSAM's cache (its norm).
const MAX_CACHE_SQUARE_SUM: f64 = f32::MAX as f64;

/// The JSON part of a record: the engine state and what is needed to check it against a run.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Header {
    format: u32,
    /// The reuse rule the cache was built for.
    reuse: ReusePolicy,
    /// AE-SAM's ‖g‖² of the last round, read from the device.
    pending_grad_norm_sq: Option<f64>,
    state: EngineState,
}

/// A snapshot of a [`SamEngine`]: everything needed to continue its run exactly.
#[derive(Clone, Debug)]
pub struct EngineRecord {
    header: Header,
    cache: Vec<(u64, TensorData)>,
    cache_norm: Option<TensorData>,
}

impl EngineRecord {
    /// Number of cached tensors.
    pub fn cached_tensors(&self) -> usize {
        self.cache.len()
    }

    /// The cached tensors (flattened, f32) by parameter id.
    pub fn cache(&self) -> &[(u64, TensorData)] {
        &self.cache
    }

    /// Steps the engine had finished when the record was taken.
    pub fn steps(&self) -> u64 {
        self.header.state.steps
    }

    /// Checks that the record can continue a run of `config`, without a module: the same kind of
    /// gate and reuse rule, a gate state in range (warm-up left within the configured warm-up,
    /// quota and rates within their bounds, finite statistics), consistent counters, finite and
    /// bounded cached values, and for LookSAM a cache norm that matches the cached tensors.
    /// [`SamEngine::load_record`] runs the same check, then the checks against the module; the
    /// error names the first problem.
    pub fn check_config(&self, config: &SamConfig) -> Result<()> {
        self.checked_gate(config).map(|_| ())
    }

    /// The parameters (id, shape) the record was taken for.
    pub fn parameters(&self) -> &[(u64, Vec<usize>)] {
        &self.header.state.manifest
    }

    /// Every check that needs no module; returns the gate to continue with.
    fn checked_gate(&self, config: &SamConfig) -> Result<Gate> {
        let header = &self.header;
        if std::mem::discriminant(&header.reuse) != std::mem::discriminant(&config.reuse) {
            return Err(SamError::RecordMismatch(format!(
                "the record was saved with reuse rule `{}`, this run uses `{}`",
                header.reuse.name(),
                config.reuse.name()
            )));
        }
        let gate = Gate::resume(config.policy.clone(), header.state.gate.clone())?;
        let state = &header.state;
        if state.last_stats.is_some_and(|stats| !stats.is_valid()) {
            return Err(SamError::CorruptRecord("the last PSF statistics are not finite".into()));
        }
        let counters = [
            (state.sam_steps <= state.steps, "SAM steps", state.sam_steps, "steps", state.steps),
            (state.non_finite_steps <= state.steps, "non-finite steps", state.non_finite_steps, "steps", state.steps),
            (state.rounds <= state.steps, "optimizer steps", state.rounds, "train steps", state.steps),
            (
                state.passes == state.steps.saturating_add(state.sam_steps),
                "gradient passes",
                state.passes,
                "steps + SAM steps",
                state.steps.saturating_add(state.sam_steps),
            ),
            (
                u64::from(state.since_cache) <= state.rounds,
                "steps since the cache was stored",
                u64::from(state.since_cache),
                "optimizer steps",
                state.rounds,
            ),
        ];
        for (ok, what, value, bound, bound_value) in counters {
            if !ok {
                return Err(SamError::CorruptRecord(format!(
                    "the counters do not fit together: {what} = {value} against {bound} = {bound_value}"
                )));
            }
        }
        if header.pending_grad_norm_sq.is_some_and(|v| !(v.is_finite() && v >= 0.0)) {
            return Err(SamError::CorruptRecord("the pending ‖g‖² is not a finite non-negative value".into()));
        }
        if self.cache.is_empty() && self.cache_norm.is_some() {
            return Err(SamError::CorruptRecord("a cache norm without cached tensors".into()));
        }
        if !self.cache.is_empty() && matches!(config.reuse, ReusePolicy::None) {
            return Err(SamError::CorruptRecord(format!(
                "{} cached tensors for reuse rule `none`, which caches nothing",
                self.cache.len()
            )));
        }
        let mut square_sum = 0.0f64;
        for (id, data) in &self.cache {
            if !data.iter::<f32>().all(f32::is_finite) {
                return Err(SamError::CorruptRecord(format!(
                    "cached tensor for parameter {id} holds non-finite values"
                )));
            }
            square_sum += data.iter::<f32>().map(|v| f64::from(v) * f64::from(v)).sum::<f64>();
        }
        if square_sum > MAX_CACHE_SQUARE_SUM {
            return Err(SamError::CorruptRecord(format!(
                "the cached tensors have a norm of {:.3e}, beyond f32's range for their squared norm \
                 ({:.3e}): no finite step caches that",
                square_sum.sqrt(),
                MAX_CACHE_SQUARE_SUM.sqrt()
            )));
        }
        if let Some(norm) = &self.cache_norm {
            let values: Vec<f32> = norm.iter::<f32>().collect();
            let stored = match values.as_slice() {
                [value] if value.is_finite() && *value >= 0.0 => f64::from(*value),
                _ => {
                    return Err(SamError::CorruptRecord(format!(
                        "the cache norm must be one finite non-negative value, found {} values",
                        norm.num_elements()
                    )))
                }
            };
            // The engine sums squares in f32 on the device; 10⁻³ relative is far above that
            // rounding and far below any change that would alter a cheap step.
            let recomputed = square_sum.sqrt();
            if (stored - recomputed).abs() > 1e-3 * recomputed.max(f64::from(f32::MIN_POSITIVE)) {
                return Err(SamError::CorruptRecord(format!(
                    "the cache norm {stored:.6e} does not match the cached tensors, whose norm is {recomputed:.6e}"
                )));
            }
        }
        if matches!(config.reuse, ReusePolicy::LookSam { .. }) && !self.cache.is_empty() && self.cache_norm.is_none() {
            return Err(SamError::CorruptRecord("a LookSAM cache without its norm".into()));
        }
        Ok(gate)
    }

    /// Serializes the record to burnpack bytes.
    pub fn into_bytes(self) -> Result<Bytes> {
        container::to_bytes(self)
    }

    /// Decodes a record from burnpack bytes. Hostile bytes give an error, never a panic.
    pub fn from_bytes(bytes: Bytes) -> Result<Self> {
        container::from_bytes(bytes)
    }

    /// Writes the record to a burnpack file (the path is used as given).
    pub fn save(self, path: impl AsRef<std::path::Path>) -> Result<()> {
        container::save(self, path.as_ref())
    }

    /// Reads a record from a burnpack file written by [`save`](Self::save).
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self> {
        container::load(path.as_ref())
    }
}

impl Sealed for EngineRecord {
    fn into_parts(self) -> Result<(Vec<burn_pack::Tensor>, String)> {
        let mut tensors = Vec::with_capacity(self.cache.len() + 1);
        for (id, data) in self.cache {
            tensors.push(container::pack(format!("{CACHE_PREFIX}{id}"), Some(id), data));
        }
        if let Some(norm) = self.cache_norm {
            tensors.push(container::pack(CACHE_NORM.to_string(), None, norm));
        }
        let state = serde_json::to_string(&self.header)
            .map_err(|e| SamError::CorruptRecord(format!("cannot encode the engine state: {e}")))?;
        Ok((tensors, state))
    }

    fn from_parts(tensors: &mut Tensors, state: &str) -> Result<Self> {
        let header: Header = serde_json::from_str(state).map_err(|e| {
            SamError::CorruptRecord(format!("engine state does not decode (records of format {FORMAT} are read): {e}"))
        })?;
        if header.format != FORMAT {
            return Err(SamError::CorruptRecord(format!(
                "engine state format {} is not supported (expected {FORMAT})",
                header.format
            )));
        }
        let cached: Tensors = std::mem::take(tensors);
        let (cached, rest): (Tensors, Tensors) =
            cached.into_iter().partition(|(name, _)| name.starts_with(CACHE_PREFIX));
        *tensors = rest;
        let mut cache = Vec::with_capacity(cached.len());
        for (name, tensor) in cached {
            let id = name[CACHE_PREFIX.len()..]
                .parse::<u64>()
                .map_err(|_| SamError::CorruptRecord(format!("cache tensor `{name}` has no valid parameter id")))?;
            cache.push((id, container::unpack(&name, tensor, DType::F32)?));
        }
        let cache_norm = container::take(tensors, CACHE_NORM, DType::F32)?;
        Ok(Self { header, cache, cache_norm })
    }
}

/// Every float parameter of a module: shape and device, each `ParamId` once.
struct ShapeVisitor {
    seen: HashSet<ParamId>,
    params: HashMap<u64, (Shape, Device)>,
}

impl ModuleVisitor for ShapeVisitor {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.seen.insert(param.id) {
            let device = param.lazy_device();
            self.params.insert(param.id.val(), (param.lazy_shape(), device));
        }
    }
}

impl SamEngine {
    /// Takes a snapshot of the engine. Reads the cached tensors and two scalars back to the host.
    pub fn to_record(&self) -> EngineRecord {
        let mut state = self.state.clone();
        if let Some(count) = &self.device_non_finite {
            state.non_finite_steps += count.clone().into_scalar::<f32>().round() as u64;
        }
        let pending_grad_norm_sq = self.pending_grad_sq.as_ref().map(|t| t.clone().into_scalar::<f32>() as f64);
        let mut cache: Vec<(u64, TensorData)> =
            self.cache.tensors.iter().map(|(id, tensor)| (id.val(), tensor.to_data())).collect();
        cache.sort_by_key(|(id, _)| *id);
        EngineRecord {
            header: Header { format: FORMAT, reuse: self.config.reuse.clone(), pending_grad_norm_sq, state },
            cache,
            cache_norm: self.cache.norm.as_ref().map(|t| t.to_data()),
        }
    }

    /// Restores a snapshot taken by [`to_record`](Self::to_record), for training `module`.
    ///
    /// The record must come from an engine with the same kind of gate and reuse rule, and every
    /// parameter it knows must exist in `module` with the same shape; otherwise the error names
    /// the first mismatch and `self` is left unchanged. Cached tensors are placed on the device
    /// of their parameter.
    pub fn load_record<M: Module>(&mut self, record: EngineRecord, module: &M) -> Result<()> {
        let gate = record.checked_gate(&self.config)?;
        let EngineRecord { header, cache, cache_norm } = record;

        let mut visitor = ShapeVisitor { seen: HashSet::new(), params: HashMap::new() };
        module.visit(&mut visitor);
        let params = visitor.params;
        for (id, dims) in &header.state.manifest {
            let Some((shape, _)) = params.get(id) else {
                return Err(SamError::RecordMismatch(format!(
                    "parameter {id} (shape {dims:?}) of the record is missing from the module"
                )));
            };
            if shape.as_slice() != dims.as_slice() {
                return Err(SamError::RecordMismatch(format!(
                    "parameter {id} has shape {dims:?} in the record but {:?} in the module",
                    shape.as_slice()
                )));
            }
        }
        let mut tensors = HashMap::with_capacity(cache.len());
        for (id, data) in cache {
            let Some((shape, device)) = params.get(&id) else {
                return Err(SamError::RecordMismatch(format!(
                    "cached tensor for parameter {id} has no parameter in the module"
                )));
            };
            if shape.num_elements() != data.num_elements() {
                return Err(SamError::RecordMismatch(format!(
                    "cached tensor for parameter {id} has {} values but the parameter has shape {:?}",
                    data.num_elements(),
                    shape.as_slice()
                )));
            }
            tensors.insert(ParamId::from(id), Tensor::<1>::from_data(data, device).inner());
        }
        // Checked by `checked_gate`: one finite value matching the tensors, and only with tensors.
        let device = tensors.values().next().map(|t| t.device());
        let norm = match (cache_norm, &device) {
            (Some(data), Some(device)) => Some(Tensor::<1>::from_data(data, device).inner()),
            _ => None,
        };
        self.state = EngineState { gate, ..header.state };
        self.cache = Arc::new(ReuseCache { tensors, norm });
        self.pending_grad_sq = match (header.pending_grad_norm_sq, device) {
            (Some(value), Some(device)) => Some(Tensor::<1>::from_data([value as f32], &device)),
            (Some(value), None) => {
                // No tensor to learn a device from: feed the value to the gate right away, which
                // is what the next step would do.
                self.state.gate.observe_grad_norm_sq(value);
                None
            }
            (None, _) => None,
        };
        self.device_non_finite = None;
        Ok(())
    }
}
