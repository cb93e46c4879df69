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
use crate::reuse::{CachePrecision, ReusePolicy};

/// The dtypes a cached tensor can be stored in.
const CACHE_DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

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

    /// The cached tensors (flattened, in their storage dtype: see
    /// [`CachePrecision`](crate::reuse::CachePrecision)) by parameter id.
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
        if header.pending_grad_norm_sq.is_some_and(|v| !(0.0..=f64::from(f32::MAX)).contains(&v)) {
            return Err(SamError::CorruptRecord(
                "the pending ‖g‖² is not a non-negative value that f32 can hold".into(),
            ));
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
        for (id, data) in &self.cache {
            let fits = match config.cache_precision {
                CachePrecision::Parameters => true,
                CachePrecision::F32 => data.dtype() == DType::F32,
                // f32 where the device has no bf16.
                CachePrecision::Bf16 => matches!(data.dtype(), DType::BF16 | DType::F32),
            };
            if !fits {
                return Err(SamError::RecordMismatch(format!(
                    "the cached tensor for parameter {id} is stored as {:?}; this run keeps its cache as \
                     `{}` (`cache_precision`)",
                    data.dtype(),
                    config.cache_precision
                )));
            }
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
            cache.push((id, container::unpack_one_of(&name, tensor, &CACHE_DTYPES)?));
        }
        let cache_norm = container::take(tensors, CACHE_NORM, DType::F32)?;
        Ok(Self { header, cache, cache_norm })
    }
}

/// Every float parameter of a module: shape, device and dtype, each `ParamId` once.
struct ShapeVisitor {
    seen: HashSet<ParamId>,
    params: HashMap<u64, (Shape, Device, DType)>,
}

impl ModuleVisitor for ShapeVisitor {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.seen.insert(param.id) {
            let device = param.lazy_device();
            self.params.insert(param.id.val(), (param.lazy_shape(), device, param.val().dtype()));
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
            let Some((shape, _, _)) = params.get(id) else {
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
            let Some((shape, device, param_dtype)) = params.get(&id) else {
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
            let dtype = self.config.cache_precision.storage_dtype(*param_dtype, device);
            if data.dtype() != dtype {
                return Err(SamError::RecordMismatch(format!(
                    "the cached tensor for parameter {id} is stored as {:?}; this run stores it as {dtype:?} \
                     (`cache_precision` = `{}`, parameter dtype {param_dtype:?})",
                    data.dtype(),
                    self.config.cache_precision
                )));
            }
            tensors.insert(ParamId::from(id), Tensor::<1>::from_data(data, (device, dtype)).inner());
        }
        // Checked by `checked_gate`: one finite value matching the tensors, and only with tensors.
        let device = tensors.values().next().map(|t| t.device());
        let norm = match (cache_norm, &device) {
            (Some(data), Some(device)) => Some(Tensor::<1>::from_data(data, (device, DType::F32)).inner()),
            _ => None,
        };
        self.state = EngineState { gate, ..header.state };
        self.cache = Arc::new(ReuseCache { tensors, norm });
        self.pending_grad_sq = match (header.pending_grad_norm_sq, device) {
            (Some(value), Some(device)) => Some(Tensor::<1>::from_data([value as f32], (&device, DType::F32))),
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

#[cfg(test)]
mod tests {
    //! A structure-aware record mutator: it edits the JSON fields and the tensor values of valid
    //! records, then re-seals them, so that every check behind the checksum is reached (byte
    //! flips almost never get past the checksum).

    use burn::nn::{Linear, LinearConfig};
    use burn::optim::{GradientsParams, SgdConfig};
    use burn::tensor::{Device, Tensor, TensorData};
    use rand::{Rng, SeedableRng};
    use serde_json::Value;

    use super::*;
    use crate::engine::hand::Pass;
    use crate::policy::{AeSamConfig, GatePolicy, VariationConfig};

    fn device() -> Device {
        Device::flex().autodiff()
    }

    fn configs() -> Vec<SamConfig> {
        let variation = VariationConfig::new(4).with_window(6).with_blocks(2);
        vec![
            SamConfig::new().with_policy(GatePolicy::Variation(variation)).with_seed(1),
            SamConfig::look_sam(3, 0.5),
            SamConfig::new().with_policy(GatePolicy::AeSam(AeSamConfig::new(50))).with_reuse(ReusePolicy::None),
            SamConfig::vsam_trend().with_seed(3),
        ]
    }

    /// `steps` hand-driven steps of a 4→3→1 model; returns the model.
    fn train(engine: &mut SamEngine, mut model: (Linear, Linear), steps: usize, seed: u64) -> (Linear, Linear) {
        let device = device();
        let mut sgd = SgdConfig::new().init();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        for _ in 0..steps {
            let values: Vec<f32> = (0..32).map(|_| rng.random_range(-1.0..1.0)).collect();
            let x = Tensor::<1>::from_floats(values.as_slice(), &device).reshape([8, 4]);
            let loss_of = |m: &(Linear, Linear)| m.1.forward(m.0.forward(x.clone()).tanh()).powi_scalar(2).mean();
            let loss = loss_of(&model);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            let (direction, _) = match engine.first_pass(&model, grads, &loss) {
                Pass::Sam(pass) => {
                    let perturbed = pass.perturbed(&model);
                    let second = GradientsParams::from_grads(loss_of(&perturbed).backward(), &perturbed);
                    pass.finish(&model, second)
                }
                Pass::Cheap(pass) => pass.finish(&model),
            };
            model = sgd.step(0.05, model, direction);
        }
        model
    }

    fn model() -> (Linear, Linear) {
        let device = device();
        device.seed(7);
        (LinearConfig::new(4, 3).init(&device), LinearConfig::new(3, 1).init(&device))
    }

    fn finite(model: &(Linear, Linear)) -> bool {
        let weights = [model.0.weight.val().into_data(), model.1.weight.val().into_data()];
        weights.iter().all(|data| data.iter::<f32>().all(f32::is_finite))
    }

    /// Replaces one leaf of `value` (chosen at random) by an extreme or shifted one.
    fn mutate_json(rng: &mut impl Rng, value: &mut Value) {
        let mut leaves = Vec::new();
        collect_leaves(value, &mut Vec::new(), &mut leaves);
        if leaves.is_empty() {
            return;
        }
        let path = leaves[rng.random_range(0..leaves.len())].clone();
        let mut leaf = &mut *value;
        for step in &path {
            leaf = match step {
                Key::Field(name) => &mut leaf[name.as_str()],
                Key::Index(i) => &mut leaf[*i],
            };
        }
        let number = leaf.as_f64();
        *leaf = match (leaf.clone(), rng.random_range(0..8)) {
            (Value::Bool(b), _) => Value::Bool(!b),
            (Value::Array(mut items), choice) => {
                if choice % 2 == 0 {
                    items.clear();
                } else if let Some(first) = items.first().cloned() {
                    items.push(first);
                }
                Value::Array(items)
            }
            (Value::Null, _) => serde_json::json!(1.0),
            (_, 0) => serde_json::json!(0),
            (_, 1) => serde_json::json!(-1),
            (_, 2) => serde_json::json!(1_000_000_000u64),
            (_, 3) => serde_json::json!(u64::MAX),
            (_, 4) => serde_json::json!(1e300),
            (_, 5) => serde_json::json!(-1e300),
            (_, 6) => serde_json::json!(number.unwrap_or(0.0) * 2.0 + 1.0),
            _ => Value::Null,
        };
    }

    #[derive(Clone)]
    enum Key {
        Field(String),
        Index(usize),
    }

    fn collect_leaves(value: &Value, path: &mut Vec<Key>, out: &mut Vec<Vec<Key>>) {
        match value {
            Value::Object(map) => {
                for (name, child) in map {
                    path.push(Key::Field(name.clone()));
                    collect_leaves(child, path, out);
                    path.pop();
                }
            }
            Value::Array(items) => {
                out.push(path.clone());
                for (i, child) in items.iter().enumerate() {
                    path.push(Key::Index(i));
                    collect_leaves(child, path, out);
                    path.pop();
                }
            }
            _ => out.push(path.clone()),
        }
    }

    /// Edits the cached tensor values or the cache norm.
    fn mutate_tensors(rng: &mut impl Rng, record: &mut EngineRecord) {
        let bad = [f32::NAN, f32::INFINITY, -f32::INFINITY, 1e30, -1e30, 0.0, 3e19];
        match rng.random_range(0..5) {
            0 if !record.cache.is_empty() => {
                let i = rng.random_range(0..record.cache.len());
                let (id, data) = &record.cache[i];
                let mut values: Vec<f32> = data.iter::<f32>().collect();
                let j = rng.random_range(0..values.len());
                values[j] = bad[rng.random_range(0..bad.len())];
                let n = values.len();
                record.cache[i] = (*id, TensorData::new(values, [n]));
            }
            1 if !record.cache.is_empty() => {
                let factor = [0.0f32, 1e20, -1.0, 2.0][rng.random_range(0..4)];
                for (_, data) in record.cache.iter_mut() {
                    let values: Vec<f32> = data.iter::<f32>().map(|v| v * factor).collect();
                    let n = values.len();
                    *data = TensorData::new(values, [n]);
                }
            }
            2 if !record.cache.is_empty() => {
                let i = rng.random_range(0..record.cache.len());
                if rng.random_bool(0.5) {
                    record.cache.remove(i);
                } else {
                    let (id, data) = &record.cache[i];
                    let values: Vec<f32> = data.iter::<f32>().skip(1).collect();
                    let n = values.len();
                    record.cache[i] = (*id, TensorData::new(values, [n]));
                }
            }
            3 => {
                let value = [0.0f32, -1.0, f32::NAN, 1e10][rng.random_range(0..4)];
                record.cache_norm = Some(TensorData::new(vec![value], [1]));
            }
            _ => record.cache_norm = None,
        }
    }

    #[test]
    fn structurally_mutated_records_load_into_a_valid_state_or_are_refused_by_both_doors() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2026);
        let (mut loaded, mut refused) = (0, 0);
        for config in configs() {
            let mut engine = SamEngine::new(&config).unwrap();
            let trained = train(&mut engine, model(), 14, 0);
            let valid = engine.to_record();
            for case in 0..120 {
                let mut record = valid.clone();
                if case % 2 == 0 {
                    let mut json = serde_json::to_value(&record.header).unwrap();
                    for _ in 0..rng.random_range(1..3) {
                        mutate_json(&mut rng, &mut json);
                    }
                    match serde_json::from_value::<Header>(json) {
                        Ok(header) => record.header = header,
                        Err(_) => continue,
                    }
                } else {
                    mutate_tensors(&mut rng, &mut record);
                }
                // Re-sealed: the checksum is valid, so only the checks behind it can refuse.
                let bytes = record.into_bytes().unwrap();
                let record = EngineRecord::from_bytes(bytes).unwrap();
                let early = record.check_config(&config);
                let loaded_header = record.header.clone();
                let mut fresh = SamEngine::new(&config).unwrap();
                match fresh.load_record(record, &trained) {
                    Err(err) => {
                        refused += 1;
                        let about_the_module = err.to_string().contains("parameter");
                        assert!(
                            early.is_err() || about_the_module,
                            "load_record refused what check_config (and so verify_checkpoint) passed: {err}"
                        );
                        if let Err(early) = early {
                            assert_eq!(early.to_string(), err.to_string(), "both doors say the same");
                        }
                    }
                    Ok(()) => {
                        loaded += 1;
                        assert!(early.is_ok());
                        let after = train(&mut fresh, trained.clone(), 6, case);
                        assert!(finite(&after), "{config:?}: a loaded record led to non-finite weights");
                        let telemetry = fresh.sync_telemetry();
                        assert!(telemetry.sam_steps <= telemetry.step && telemetry.sam_fraction <= 1.0);
                        // The state it reached is itself a valid record.
                        let again = fresh.to_record();
                        if let Err(err) = again.check_config(&config) {
                            panic!(
                                "{err}\nloaded: {}\nreached: {}",
                                serde_json::to_string(&loaded_header).unwrap(),
                                serde_json::to_string(&again.header).unwrap()
                            );
                        }
                        SamEngine::new(&config).unwrap().load_record(again, &after).unwrap();
                    }
                }
            }
        }
        assert!(loaded > 20 && refused > 100, "loaded {loaded}, refused {refused}");
    }

    #[test]
    fn the_cases_found_by_reading_are_refused() {
        let look = SamConfig::look_sam(3, 0.5);
        let mut engine = SamEngine::new(&look).unwrap();
        let trained = train(&mut engine, model(), 7, 0);
        let valid = engine.to_record();
        assert!(!valid.cache.is_empty() && valid.cache_norm.is_some());
        // LookSAM's cache norm set to 0: recomputed from the cached tensors, it does not match.
        let mut zero_norm = valid.clone();
        zero_norm.cache_norm = Some(TensorData::new(vec![0.0f32], [1]));
        let err = zero_norm.check_config(&look).unwrap_err().to_string();
        assert!(err.contains("does not match the cached tensors"), "{err}");
        // A NaN in the cached PSF.
        let mut nan = valid.clone();
        let (id, data) = nan.cache[0].clone();
        let mut values: Vec<f32> = data.iter::<f32>().collect();
        values[0] = f32::NAN;
        nan.cache[0] = (id, TensorData::new(values, [data.num_elements()]));
        assert!(nan.check_config(&look).unwrap_err().to_string().contains("non-finite"));
        // Cached values whose squared norm is beyond f32.
        let mut huge = valid.clone();
        let (id, data) = huge.cache[0].clone();
        let values: Vec<f32> = data.iter::<f32>().map(|_| 1e30).collect();
        huge.cache[0] = (id, TensorData::new(values, [data.num_elements()]));
        assert!(huge.check_config(&look).unwrap_err().to_string().contains("beyond f32's range"));
        // Counters that cannot come from one run.
        let mut counters = valid.clone();
        counters.header.state.sam_steps = counters.header.state.steps + 1;
        assert!(counters.check_config(&look).unwrap_err().to_string().contains("counters"));
        let mut since = valid.clone();
        since.header.state.since_cache = u32::MAX;
        assert!(since.check_config(&look).unwrap_err().to_string().contains("since the cache"));
        let mut fresh = SamEngine::new(&look).unwrap();
        fresh.load_record(valid, &trained).unwrap();

        // vSAM's warm-up left above the configured warm-up (a record of another run length).
        let vsam = SamConfig::vsam(10);
        let mut engine = SamEngine::new(&vsam).unwrap();
        train(&mut engine, model(), 3, 0);
        let mut long = engine.to_record();
        let mut json = serde_json::to_value(&long.header).unwrap();
        let state = &mut json["state"]["gate"]["rule"]["Variation"][1];
        assert!(state["warmup_left"].as_u64().is_some(), "{json}");
        state["warmup_left"] = serde_json::json!(1_000_000_000u64);
        long.header = serde_json::from_value(json).unwrap();
        let err = long.check_config(&vsam).unwrap_err().to_string();
        assert!(err.contains("warm-up"), "{err}");
    }
}
