//! Saving and restoring the engine: PSF cache tensors, gate state (RNG included), counters.
//!
//! The record is a burnpack container: the cached tensors are burnpack tensors keyed by their
//! `ParamId`, the scalar state is JSON in the container's metadata.

use std::collections::{BTreeMap, HashMap, HashSet};

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::{Bytes, DType, Device, Shape, Tensor, TensorData};
use burn_pack::{Reader, Writer};
use serde::{Deserialize, Serialize};

use super::{Counters, ReuseCache, SamEngine};
use crate::config::SamConfig;
use crate::error::{Result, SamError};
use crate::policy::{Gate, GatePolicy, GateState, PsfStats};
use crate::reuse::ReusePolicy;

pub(crate) const STATE_KEY: &str = "burn-sam-sample.engine";
const CHECKSUM_KEY: &str = "burn-sam-sample.crc32";
const CACHE_PREFIX: &str = "burn-sam-sample.cache.";
const CACHE_NORM: &str = "burn-sam-sample.cache-norm";
const FORMAT: u32 = 1;

#[derive(Clone, Debug, Serialize, Deserialize)]
struct EngineState {
    format: u32,
    policy: GatePolicy,
    reuse: ReusePolicy,
    gate: GateState,
    since_cache: u32,
    counters: Counters,
    pending_grad_norm_sq: Option<f64>,
    last_stats: Option<PsfStats>,
    last_sam: bool,
    last_skipped: bool,
    manifest: Vec<(u64, Vec<usize>)>,
}

/// A snapshot of a [`SamEngine`]: everything needed to continue its run exactly.
#[derive(Clone, Debug)]
pub struct EngineRecord {
    state: EngineState,
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
        self.state.counters.steps
    }

    /// Checks that the record can continue a run of `config` (the same kind of gate and reuse
    /// rule, a gate state in range, finite statistics); the error names the first mismatch.
    /// [`SamEngine::load_record`] runs the same check, then the checks against the module.
    pub fn check_config(&self, config: &SamConfig) -> Result<()> {
        self.gate_for(config).map(|_| ())
    }

    fn gate_for(&self, config: &SamConfig) -> Result<Gate> {
        let state = &self.state;
        if std::mem::discriminant(&state.reuse) != std::mem::discriminant(&config.reuse) {
            return Err(SamError::RecordMismatch(format!(
                "the record was saved with reuse rule `{}`, this run uses `{}`",
                state.reuse.name(),
                config.reuse.name()
            )));
        }
        if std::mem::discriminant(&state.policy) != std::mem::discriminant(&config.policy) {
            return Err(SamError::RecordMismatch(format!(
                "the record was saved with gate policy `{}`, this run uses `{}`",
                state.policy.name(),
                config.policy.name()
            )));
        }
        let gate = Gate::from_state(config.policy.clone(), state.gate.clone())?;
        if state.last_stats.is_some_and(|stats| !stats.is_valid()) {
            return Err(SamError::CorruptRecord("the last PSF statistics are not finite".into()));
        }
        Ok(gate)
    }

    pub(crate) fn into_pack(self) -> Result<(Vec<burn_pack::Tensor>, String)> {
        let mut tensors = Vec::with_capacity(self.cache.len() + 1);
        for (id, data) in self.cache {
            tensors.push(pack_tensor(format!("{CACHE_PREFIX}{id}"), Some(id), data));
        }
        if let Some(norm) = self.cache_norm {
            tensors.push(pack_tensor(CACHE_NORM.to_string(), None, norm));
        }
        let state = serde_json::to_string(&self.state)
            .map_err(|e| SamError::CorruptRecord(format!("cannot encode the engine state: {e}")))?;
        Ok((tensors, state))
    }

    pub(crate) fn from_pack(tensors: &mut BTreeMap<String, burn_pack::Tensor>, metadata: &BTreeMap<String, String>) -> Result<Self> {
        let json = metadata
            .get(STATE_KEY)
            .ok_or_else(|| SamError::CorruptRecord(format!("metadata `{STATE_KEY}` is missing")))?;
        let state: EngineState = serde_json::from_str(json)
            .map_err(|e| SamError::CorruptRecord(format!("engine state does not decode: {e}")))?;
        if state.format != FORMAT {
            return Err(SamError::CorruptRecord(format!(
                "engine state format {} is not supported (expected {FORMAT})",
                state.format
            )));
        }
        let names: Vec<String> = tensors.keys().filter(|name| name.starts_with(CACHE_PREFIX)).cloned().collect();
        let mut cache = Vec::with_capacity(names.len());
        for name in names {
            let tensor = tensors.remove(&name).expect("name was just listed");
            let id = name[CACHE_PREFIX.len()..]
                .parse::<u64>()
                .map_err(|_| SamError::CorruptRecord(format!("cache tensor `{name}` has no valid parameter id")))?;
            cache.push((id, unpack_f32(&name, tensor)?));
        }
        let cache_norm = tensors
            .remove(CACHE_NORM)
            .map(|tensor| unpack_f32(CACHE_NORM, tensor))
            .transpose()?;
        Ok(Self { state, cache, cache_norm })
    }

    /// Serializes the record to burnpack bytes.
    pub fn into_bytes(self) -> Result<Bytes> {
        let (tensors, state) = self.into_pack()?;
        Ok(sealed_writer(tensors, &state)?.into_bytes().map_err(burn::store::RecordError::from)?)
    }

    /// Decodes a record from burnpack bytes. Hostile bytes give an error, never a panic.
    pub fn from_bytes(bytes: Bytes) -> Result<Self> {
        let reader = Reader::from_bytes(bytes).map_err(|e| SamError::CorruptRecord(e.to_string()))?;
        let (mut tensors, metadata) = read_all(reader)?;
        Self::from_pack(&mut tensors, &metadata)
    }

    /// Writes the record to a burnpack file.
    pub fn save(self, path: impl AsRef<std::path::Path>) -> Result<()> {
        let (tensors, state) = self.into_pack()?;
        sealed_writer(tensors, &state)?
            .auto_extension(false)
            .write_to_file(path)
            .map_err(burn::store::RecordError::from)?;
        Ok(())
    }

    /// Reads a record from a burnpack file written by [`save`](Self::save).
    pub fn load(path: impl AsRef<std::path::Path>) -> Result<Self> {
        let reader = Reader::from_bytes(crate::engine::read_file(path.as_ref())?).map_err(|e| SamError::CorruptRecord(e.to_string()))?;
        let (mut tensors, metadata) = read_all(reader)?;
        Self::from_pack(&mut tensors, &metadata)
    }
}

/// Reads a whole record file into memory: the tensors must not stay backed by a file that a
/// checkpoint rotation may delete or overwrite later.
pub(crate) fn read_file(path: &std::path::Path) -> Result<Bytes> {
    let bytes = std::fs::read(path)
        .map_err(|e| SamError::Record(burn::store::RecordError::Io(format!("cannot read '{}': {e}", path.display()))))?;
    Ok(Bytes::from_bytes_vec(bytes))
}

/// Reads every tensor and the metadata of a record, and checks its checksum.
pub(crate) fn read_all(reader: Reader) -> Result<(BTreeMap<String, burn_pack::Tensor>, BTreeMap<String, String>)> {
    let metadata = reader.metadata().clone();
    let tensors: BTreeMap<String, burn_pack::Tensor> = reader
        .into_tensors()
        .map_err(|e| SamError::CorruptRecord(e.to_string()))?
        .into_iter()
        .map(|tensor| (tensor.name.clone(), tensor))
        .collect();
    let state = metadata
        .get(STATE_KEY)
        .ok_or_else(|| SamError::CorruptRecord(format!("metadata `{STATE_KEY}` is missing")))?;
    let stored = metadata
        .get(CHECKSUM_KEY)
        .ok_or_else(|| SamError::CorruptRecord(format!("metadata `{CHECKSUM_KEY}` is missing")))?;
    let computed = checksum(tensors.values(), state)?;
    if *stored != computed {
        return Err(SamError::CorruptRecord(format!(
            "checksum mismatch (stored {stored}, computed {computed}): the record is damaged"
        )));
    }
    Ok((tensors, metadata))
}

/// CRC-32 over every tensor (name, dtype, shape, bytes, in name order) and the state JSON, so
/// that truncation or flipped bits are reported instead of loaded.
fn checksum<'a>(tensors: impl IntoIterator<Item = &'a burn_pack::Tensor>, state: &str) -> Result<String> {
    let mut sorted: Vec<&burn_pack::Tensor> = tensors.into_iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut hasher = crc32fast::Hasher::new();
    for tensor in sorted {
        hasher.update(tensor.name.as_bytes());
        hasher.update(format!("{:?}{:?}", tensor.dtype, tensor.shape.as_slice()).as_bytes());
        let bytes = tensor
            .to_bytes()
            .map_err(|e| SamError::CorruptRecord(format!("tensor `{}`: {e}", tensor.name)))?;
        hasher.update(&bytes);
    }
    hasher.update(state.as_bytes());
    Ok(format!("{:08x}", hasher.finalize()))
}

/// A burnpack writer for `tensors` and the state JSON, sealed with a checksum.
pub(crate) fn sealed_writer(tensors: Vec<burn_pack::Tensor>, state: &str) -> Result<Writer> {
    let crc = checksum(&tensors, state)?;
    Ok(Writer::new(tensors)
        .with_metadata(STATE_KEY, state)
        .with_metadata(CHECKSUM_KEY, &crc))
}

pub(crate) fn pack_tensor(name: String, param_id: Option<u64>, data: TensorData) -> burn_pack::Tensor {
    let (bytes, shape, dtype) = data.into_parts();
    burn_pack::Tensor::new(name, dtype, shape, param_id, bytes)
}

fn unpack_f32(name: &str, tensor: burn_pack::Tensor) -> Result<TensorData> {
    let (_, dtype, shape, _, bytes) = tensor
        .into_parts()
        .map_err(|e| SamError::CorruptRecord(format!("tensor `{name}`: {e}")))?;
    if dtype != DType::F32 || shape.num_dims() != 1 {
        return Err(SamError::CorruptRecord(format!(
            "tensor `{name}` must be a rank-1 f32 tensor, found {dtype:?} with shape {shape}"
        )));
    }
    TensorData::try_from_bytes(bytes, shape, dtype)
        .map_err(|e| SamError::CorruptRecord(format!("tensor `{name}`: {e:?}")))
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
        let mut counters = self.counters;
        if let Some(count) = &self.device_non_finite {
            counters.non_finite_steps += count.clone().into_scalar::<f32>().round() as u64;
        }
        let pending_grad_norm_sq = self
            .pending_grad_sq
            .as_ref()
            .map(|t| t.clone().into_scalar::<f32>() as f64);
        let mut cache: Vec<(u64, TensorData)> = self
            .cache
            .tensors
            .iter()
            .map(|(id, tensor)| (id.val(), tensor.to_data()))
            .collect();
        cache.sort_by_key(|(id, _)| *id);
        EngineRecord {
            state: EngineState {
                format: FORMAT,
                policy: self.config.policy.clone(),
                reuse: self.config.reuse.clone(),
                gate: self.gate.state().clone(),
                since_cache: self.since_cache,
                counters,
                pending_grad_norm_sq,
                last_stats: self.last_stats,
                last_sam: self.last_sam,
                last_skipped: self.last_skipped,
                manifest: self
                    .manifest
                    .iter()
                    .map(|(id, shape)| (id.val(), shape.to_vec()))
                    .collect(),
            },
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
        let gate = record.gate_for(&self.config)?;
        let EngineRecord { state, cache, cache_norm } = record;

        let mut visitor = ShapeVisitor {
            seen: HashSet::new(),
            params: HashMap::new(),
        };
        module.visit(&mut visitor);
        let params = visitor.params;
        let mut manifest = Vec::with_capacity(state.manifest.len());
        for (id, dims) in &state.manifest {
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
            manifest.push((ParamId::from(*id), shape.clone()));
        }
        let mut tensors = HashMap::with_capacity(cache.len());
        for (id, data) in cache {
            let Some((shape, device)) = params.get(&id) else {
                return Err(SamError::RecordMismatch(format!(
                    "cached tensor for parameter {id} has no parameter in the module"
                )));
            };
            if !data.iter::<f32>().all(f32::is_finite) {
                return Err(SamError::CorruptRecord(format!(
                    "cached tensor for parameter {id} holds non-finite values"
                )));
            }
            if shape.num_elements() != data.num_elements() {
                return Err(SamError::RecordMismatch(format!(
                    "cached tensor for parameter {id} has {} values but the parameter has shape {:?}",
                    data.num_elements(),
                    shape.as_slice()
                )));
            }
            tensors.insert(ParamId::from(id), Tensor::<1>::from_data(data, device).inner());
        }
        let norm = match cache_norm {
            Some(data) if data.num_elements() == 1 && data.iter::<f32>().all(|v| v.is_finite() && v >= 0.0) => {
                let device = tensors
                    .values()
                    .next()
                    .map(|t| t.device())
                    .ok_or_else(|| SamError::RecordMismatch("a cache norm without cached tensors".into()))?;
                Some(Tensor::<1>::from_data(data, &device).inner())
            }
            Some(data) => {
                return Err(SamError::CorruptRecord(format!(
                    "the cache norm must be one finite non-negative value, found {} values",
                    data.num_elements()
                )))
            }
            None => None,
        };
        if matches!(self.config.reuse, ReusePolicy::LookSam { .. }) && !tensors.is_empty() && norm.is_none() {
            return Err(SamError::CorruptRecord("a LookSAM cache without its norm".into()));
        }

        let device = tensors.values().next().map(|t| t.device());
        self.gate = gate;
        self.cache = ReuseCache { tensors, norm };
        self.since_cache = state.since_cache;
        self.counters = state.counters;
        self.pending_grad_sq = match (state.pending_grad_norm_sq, device) {
            (Some(value), Some(device)) => Some(Tensor::<1>::from_data([value as f32], &device)),
            (Some(value), None) => {
                // No tensor to learn a device from: feed the value to the gate right away, which
                // is what the next step would do.
                self.gate.observe_grad_norm_sq(value);
                None
            }
            (None, _) => None,
        };
        self.device_non_finite = None;
        self.last_stats = state.last_stats;
        self.last_sam = state.last_sam;
        self.last_skipped = state.last_skipped;
        self.manifest = manifest;
        Ok(())
    }
}
