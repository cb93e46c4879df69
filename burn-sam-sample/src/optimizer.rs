//! The custom-loop optimizer: the engine in front of any Burn base optimizer.

use burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::module::Module;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Bytes, DType, Tensor, TensorData};
use burn_pack::Reader;

use crate::config::SamConfig;
use crate::container::{self, Sealed, Tensors};
use crate::engine::{step, EngineRecord, SamEngine};
use crate::error::{Result, SamError};
use crate::policy::Gate;
use crate::telemetry::StepTelemetry;

const BASE_KEY: &str = "burn-sam-sample.base-optimizer";

/// What [`SamOptimizer::step`] returns besides the updated module.
#[derive(Debug)]
pub struct StepOutput<O> {
    /// The first-pass loss (at the unperturbed weights), still on the device.
    pub loss: Tensor<1>,
    /// What the closure returned besides the loss on the first pass.
    pub output: O,
    /// What the step did.
    pub telemetry: StepTelemetry,
}

/// A sharpness-aware optimizer for custom training loops, in the manner of Burn's L-BFGS: the
/// step takes a closure that runs forward + loss, and calls it once on cheap steps and twice on
/// SAM steps.
///
/// The direction (g on cheap steps, g + reuse term, or g_s on SAM steps) goes to the base
/// [`ModuleOptimizer`], so momentum, weight decay, gradient clipping and parameter groups are
/// the base optimizer's.
///
/// ```rust
/// # use burn::nn::{Linear, LinearConfig};
/// # use burn::optim::SgdConfig;
/// # use burn::prelude::*;
/// use burn_sam_sample::SamConfig;
///
/// # let device = burn_sam_sample::backend::cpu_device().autodiff();
/// let mut model: Linear = LinearConfig::new(4, 1).init(&device);
/// let mut sam = SamConfig::vsam(100).init(SgdConfig::new().init()).unwrap();
/// let x = Tensor::<2>::ones([8, 4], &device);
/// for _ in 0..5 {
///     let (next, out) = sam.step(0.1, model, |m: &Linear| (m.forward(x.clone()).powi_scalar(2).mean(), ()));
///     model = next;
///     println!("SAM step: {}, SAM fraction {:.2}", out.telemetry.sam, out.telemetry.sam_fraction);
/// }
/// ```
#[derive(Clone)]
pub struct SamOptimizer {
    engine: SamEngine,
    base: ModuleOptimizer,
}

impl SamOptimizer {
    /// Builds the optimizer; every field of `config` is checked first.
    pub fn new(config: &SamConfig, base: ModuleOptimizer) -> Result<Self> {
        Ok(Self { engine: SamEngine::new(config)?, base })
    }

    /// One training step.
    ///
    /// `closure` runs the forward pass and the loss on the module it is given and returns the
    /// scalar loss plus any output (logits for metrics, say). It is called on `module`, and on
    /// SAM steps a second time on the perturbed copy (whose output is dropped).
    pub fn step<M, F, O>(&mut self, lr: impl Into<ModuleLearningRate>, module: M, mut closure: F) -> (M, StepOutput<O>)
    where
        M: Module,
        F: FnMut(&M) -> (Tensor<1>, O),
    {
        let (loss, output) = closure(&module);
        let grads = GradientsParams::from_grads(loss.backward(), &module);
        // The gate decides; on a SAM step the closure runs again on w + ε.
        let plan = self.engine.plan();
        let (direction, contribution) = step::run(&plan, &module, grads, &loss, |perturbed| {
            let second_loss = closure(perturbed).0;
            GradientsParams::from_grads(second_loss.backward(), perturbed)
        });
        let telemetry = self.engine.commit(contribution);
        let module = self.base.step(lr, module, direction);
        (module, StepOutput { loss, output, telemetry })
    }

    /// What the last step did and the totals so far. Reads nothing from the device.
    pub fn telemetry(&self) -> StepTelemetry {
        self.engine.telemetry()
    }

    /// The telemetry with the non-finite cheap steps counted on the device since the last SAM
    /// step (one host read when there are any; see [`StepTelemetry::non_finite_steps`]).
    pub fn sync_telemetry(&mut self) -> StepTelemetry {
        self.engine.sync_telemetry()
    }

    /// The configuration this optimizer runs.
    pub fn config(&self) -> &SamConfig {
        self.engine.config()
    }

    /// The gate, for inspection (its rule's state, quota and counts).
    pub fn gate(&self) -> &Gate {
        self.engine.gate()
    }

    /// The base optimizer.
    pub fn base(&self) -> &ModuleOptimizer {
        &self.base
    }

    /// A snapshot of the whole optimizer state: the base optimizer's record and the engine's.
    /// Save it with [`SamOptimizerRecord::save`] or [`into_bytes`](SamOptimizerRecord::into_bytes).
    pub fn to_record(&self) -> SamOptimizerRecord {
        SamOptimizerRecord { base: self.base.to_record(), engine: self.engine.to_record() }
    }

    /// Restores a snapshot for training `module`; on error (the message names the first
    /// mismatch) the optimizer is left unchanged.
    ///
    /// Burn 0.22 restores a base optimizer's state tensors in the default float dtype of the
    /// default device, whatever dtype they were saved in; a half-precision state restored as f32
    /// would meet half-precision gradients at the next step. Such a record is refused here (the
    /// error says what to configure; see `docs/precision.md`).
    pub fn load_record<M: Module>(&mut self, record: SamOptimizerRecord, module: &M) -> Result<()> {
        let mut engine = self.engine.clone();
        engine.load_record(record.engine, module)?;
        let bytes = record.base.into_bytes()?;
        check_base_dtypes(&bytes)?;
        let base = burn::optim::OptimizerRecord::from_bytes(bytes)?;
        self.engine = engine;
        self.base = self.base.clone().load_record(base);
        Ok(())
    }
}

/// The state of a [`SamOptimizer`]: the base optimizer's record plus the engine's.
#[derive(Debug)]
pub struct SamOptimizerRecord {
    /// The base optimizer's own record.
    pub base: burn::optim::OptimizerRecord,
    /// The engine's record.
    pub engine: EngineRecord,
}

impl SamOptimizerRecord {
    /// Serializes the record to burnpack bytes.
    pub fn into_bytes(self) -> Result<Bytes> {
        container::to_bytes(self)
    }

    /// Decodes a record from burnpack bytes; hostile bytes give an error, never a panic.
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

impl Sealed for SamOptimizerRecord {
    fn into_parts(self) -> Result<(Vec<burn_pack::Tensor>, String)> {
        let base = self.base.into_bytes()?;
        let (mut tensors, state) = self.engine.into_parts()?;
        let base = TensorData::from_bytes_vec(base.to_vec(), [base.len()], DType::U8);
        tensors.push(container::pack(BASE_KEY.to_string(), None, base));
        Ok((tensors, state))
    }

    fn from_parts(tensors: &mut Tensors, state: &str) -> Result<Self> {
        let base = container::take(tensors, BASE_KEY, DType::U8)?
            .ok_or_else(|| SamError::CorruptRecord(format!("tensor `{BASE_KEY}` is missing")))?;
        let bytes = base.into_bytes();
        check_base_record(&bytes)?;
        let base = burn::optim::OptimizerRecord::from_bytes(bytes)?;
        let engine = EngineRecord::from_parts(tensors, state)?;
        Ok(Self { base, engine })
    }
}

/// Refuses a base optimizer record whose state tensors Burn would restore in another dtype than
/// they were saved in (it restores them in the default float dtype of the default device).
pub(crate) fn check_base_dtypes(bytes: &Bytes) -> Result<()> {
    let restored = DType::from(burn::tensor::Device::default().settings().float_dtype);
    let reader = Reader::from_bytes(bytes.clone())
        .map_err(|e| SamError::CorruptRecord(format!("base optimizer record: {e}")))?;
    let tensors = reader.into_tensors().map_err(|e| SamError::CorruptRecord(format!("base optimizer record: {e}")))?;
    match tensors.iter().find(|t| t.dtype.is_float() && t.dtype != restored) {
        Some(tensor) => Err(SamError::RecordMismatch(format!(
            "the base optimizer's state `{}` is {:?}, and Burn 0.22 restores optimizer states in the default \
             device's float dtype, {restored:?}: the resumed run would mix dtypes. Configure the default \
             device's float dtype to the model's before any tensor exists (`Device::configure`, see \
             docs/precision.md)",
            tensor.name, tensor.dtype
        ))),
        None => Ok(()),
    }
}

/// Burn's loader expects every tensor of an optimizer record to carry a parameter id and panics
/// otherwise; check first so that foreign bytes give an error.
fn check_base_record(bytes: &Bytes) -> Result<()> {
    let reader = Reader::from_bytes(bytes.clone())
        .map_err(|e| SamError::CorruptRecord(format!("base optimizer record: {e}")))?;
    let tensors = reader.into_tensors().map_err(|e| SamError::CorruptRecord(format!("base optimizer record: {e}")))?;
    if let Some(tensor) = tensors.iter().find(|t| t.param_id.is_none()) {
        return Err(SamError::CorruptRecord(format!(
            "base optimizer record: tensor `{}` carries no parameter id",
            tensor.name
        )));
    }
    Ok(())
}
