//! Learner checkpoints that carry the SAM state of the same moment, in crash-consistent sets.
//!
//! Burn takes a checkpoint's records on the training thread and writes them on background
//! threads, one per file. The SAM state is captured by [`SamCheckpointing`], a checkpointing
//! strategy that Burn calls on the training thread at the moment of the checkpoint, and written by
//! [`SamCheckpointer`] together with the optimizer record. Each of the three checkpointers reports
//! its file to a shared tracker, which seals the epoch's set ([`CheckpointSet`]) once all three
//! are on disk.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use burn::optim::OptimizerRecord;
use burn::train::checkpoint::{
    Checkpoint, Checkpointer, CheckpointerError, CheckpointingAction, CheckpointingStrategy, FileCheckpointer,
};
use burn::train::metric::store::EventStoreClient;
use burn::train::{LearnerModel, SupervisedTraining, TrainingError};

use super::SamHandle;
use crate::checkpoint::{CheckpointSet, CheckpointWriter};
use crate::config::SamConfig;
use crate::error::SamError;
use crate::optimizer::SamOptimizerRecord;

/// A checkpointing strategy that snapshots the SAM state whenever the wrapped strategy saves.
pub(super) struct SamCheckpointing<S> {
    inner: S,
    handle: SamHandle,
}

impl<S: CheckpointingStrategy> CheckpointingStrategy for SamCheckpointing<S> {
    fn checkpointing(&mut self, epoch: usize, collector: &EventStoreClient) -> Vec<CheckpointingAction> {
        let actions = self.inner.checkpointing(epoch, collector);
        if actions.contains(&CheckpointingAction::Save) {
            if let Err(message) = self.handle.snapshot(epoch) {
                // Writing on would store checkpoints without their SAM state.
                if let Some(interrupter) = self.handle.interrupter() {
                    interrupter.fail(TrainingError::Checkpoint(CheckpointerError::Unknown(message)));
                }
                return Vec::new();
            }
        }
        actions
    }
}

/// The optimizer checkpointer: writes `{name}-{epoch}.bpk` holding the base optimizer's record
/// and the SAM state snapshotted for that epoch; restoring hands the SAM state back to the handle.
pub(super) struct SamCheckpointer {
    directory: PathBuf,
    name: String,
    handle: SamHandle,
}

impl SamCheckpointer {
    /// Files go to `directory/{name}-{epoch}.bpk`.
    fn new(directory: impl AsRef<Path>, name: &str, handle: &SamHandle) -> Self {
        Self { directory: directory.as_ref().to_path_buf(), name: name.to_string(), handle: handle.clone() }
    }

    fn path(&self, epoch: usize) -> PathBuf {
        self.directory.join(format!("{}-{epoch}.bpk", self.name))
    }
}

fn unknown(err: impl std::fmt::Display) -> CheckpointerError {
    CheckpointerError::Unknown(err.to_string())
}

impl Checkpointer<OptimizerRecord> for SamCheckpointer {
    fn save(&self, epoch: usize, record: OptimizerRecord) -> Result<(), CheckpointerError> {
        let engine = self.handle.take_snapshot(epoch).ok_or_else(|| {
            unknown(format!(
                "no SAM snapshot for epoch {epoch}: a checkpointing strategy installed after \
                 `with_sam_checkpointing` replaced SAM's; call `with_sam_checkpointing` last"
            ))
        })?;
        std::fs::create_dir_all(&self.directory).map_err(CheckpointerError::IOError)?;
        let record = SamOptimizerRecord { base: record, engine: engine.to_record() };
        record.save(self.path(epoch)).map_err(unknown)
    }

    fn delete(&self, epoch: usize) -> Result<(), CheckpointerError> {
        match std::fs::remove_file(self.path(epoch)) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(CheckpointerError::IOError(err)),
            _ => Ok(()),
        }
    }

    fn restore(&self, epoch: usize) -> Result<OptimizerRecord, CheckpointerError> {
        let record = SamOptimizerRecord::load(self.path(epoch)).map_err(unknown)?;
        self.handle.restore(record.engine);
        Ok(record.base)
    }
}

/// The files of one Learner checkpoint, in `directory/checkpoint`.
const SET_FILES: [&str; 3] = ["model", "optim", "scheduler"];

/// The checkpoint sets that [`with_sam_checkpointing`](SamTrainingExt::with_sam_checkpointing)
/// writes under `directory/checkpoint` (`model-N`, `optim-N`, `scheduler-N`, sealed by
/// `set-N.json`). Give it the run's fingerprint with
/// [`for_run`](CheckpointSet::for_run), then open it for writing with
/// [`writer`](CheckpointSet::writer), or find the newest set with
/// [`latest`](CheckpointSet::latest).
pub fn checkpoint_set(directory: impl AsRef<Path>) -> CheckpointSet {
    CheckpointSet::new(directory.as_ref().join("checkpoint"), &SET_FILES)
}

/// Checks, before training starts, that the checkpoint of `epoch` in `set` (see
/// [`checkpoint_set`]) can resume a run of `config` planned for `planned_epochs` epochs, with
/// every check that loading it would make, so that a resume fails here with a message instead of
/// inside Burn's Learner:
/// - the run plans more epochs than `epoch` (otherwise Burn would end at once, having trained
///   nothing);
/// - the set is complete, sealed, written by this run (same fingerprint), and its files have the
///   sizes and checksums its manifest records;
/// - the SAM state belongs to `config` (same gate and reuse rule, gate state and counters in
///   range, finite and bounded cache; see [`EngineRecord::check_config`](crate::EngineRecord::check_config));
/// - every parameter the SAM state knows is in `model-N.bpk`, with the same shape;
/// - Burn can restore the base optimizer's state in the dtype it was saved in (see
///   [`SamOptimizer::load_record`](crate::SamOptimizer::load_record)).
///
/// The cache's dtype against the parameters' (`CachePrecision::Parameters`) is checked when the
/// state is loaded, against the model in memory: a model file need not store the parameters in
/// their training dtype.
pub fn verify_checkpoint(
    set: &CheckpointSet,
    epoch: usize,
    planned_epochs: usize,
    config: &SamConfig,
) -> crate::Result<()> {
    set.check_resume(epoch, planned_epochs)?;
    let optim = set.file("optim", epoch);
    let record = SamOptimizerRecord::load(&optim)
        .map_err(|err| SamError::CorruptRecord(format!("checkpoint {epoch}: {}: {err}", optim.display())))?;
    let mismatch = |err: SamError| SamError::RecordMismatch(format!("checkpoint {epoch}: {}: {err}", optim.display()));
    record.engine.check_config(config).map_err(mismatch)?;
    let model = set.file("model", epoch);
    let parameters = model_parameters(&model)
        .map_err(|err| SamError::CorruptRecord(format!("checkpoint {epoch}: {}: {err}", model.display())))?;
    if let Some(parameters) = parameters {
        for (id, dims) in record.engine.parameters() {
            if !parameters.contains(&(*id, dims.clone())) {
                return Err(SamError::RecordMismatch(format!(
                    "checkpoint {epoch}: {} knows parameter {id} of shape {dims:?}, which {} does not hold",
                    optim.display(),
                    model.display()
                )));
            }
        }
        // The base optimizer's state tensors are named after the parameter they belong to.
        let ids: HashSet<u64> = parameters.iter().map(|(id, _)| *id).collect();
        let base_bytes = record
            .base
            .into_bytes()
            .map_err(|err| SamError::CorruptRecord(format!("checkpoint {epoch}: {}: {err}", optim.display())))?;
        crate::optimizer::check_base_dtypes(&base_bytes).map_err(mismatch)?;
        let base = Ok::<_, String>(base_bytes)
            .and_then(|bytes| burn_pack::Reader::from_bytes(bytes).map_err(|e| e.to_string()))
            .and_then(|reader| reader.into_tensors().map_err(|e| e.to_string()))
            .map_err(|err| SamError::CorruptRecord(format!("checkpoint {epoch}: {}: {err}", optim.display())))?;
        if let Some(stranger) = base.iter().find(|tensor| tensor.param_id.is_some_and(|id| !ids.contains(&id))) {
            return Err(SamError::RecordMismatch(format!(
                "checkpoint {epoch}: the base optimizer's state `{}` in {} belongs to a parameter that {} does not hold",
                stranger.name,
                optim.display(),
                model.display()
            )));
        }
    }
    Ok(())
}

/// Parameters as (id, shape) pairs.
type Parameters = HashSet<(u64, Vec<usize>)>;

/// The (parameter id, shape) pairs of a model file; `None` when it records no parameter ids.
fn model_parameters(path: &Path) -> Result<Option<Parameters>, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let reader =
        burn_pack::Reader::from_bytes(burn::tensor::Bytes::from_bytes_vec(bytes)).map_err(|e| e.to_string())?;
    let tensors = reader.into_tensors().map_err(|e| e.to_string())?;
    if tensors.iter().any(|tensor| tensor.param_id.is_none()) {
        return Ok(None);
    }
    Ok(Some(tensors.iter().filter_map(|tensor| Some((tensor.param_id?, tensor.shape.as_slice().to_vec()))).collect()))
}

/// Seals an epoch's set once every file of it has been written.
struct SetTracker {
    writer: CheckpointWriter,
    written: Mutex<HashMap<usize, Vec<&'static str>>>,
    /// Epochs already retired: the three members each ask, the first one does it.
    retired: Mutex<HashSet<usize>>,
}

impl SetTracker {
    fn written(&self, epoch: usize, name: &'static str) -> Result<(), CheckpointerError> {
        let complete = {
            let mut written = self.written.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let names = written.entry(epoch).or_default();
            if !names.contains(&name) {
                names.push(name);
            }
            let complete = names.len() == SET_FILES.len();
            if complete {
                written.remove(&epoch);
            }
            complete
        };
        if complete {
            self.writer.seal(epoch).map_err(unknown)?;
        }
        Ok(())
    }

    /// A rotation deletes `epoch`: the set is retired once a newer one is sealed (the writer
    /// removes its files then), so that a kill at any moment leaves a sealed set.
    fn deleting(&self, epoch: usize) -> Result<(), CheckpointerError> {
        self.written.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&epoch);
        if !self.retired.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(epoch) {
            return Ok(());
        }
        self.writer.retire(epoch).map_err(unknown)
    }
}

/// A checkpointer whose files belong to a sealed set.
struct SetMember<C> {
    inner: C,
    name: &'static str,
    tracker: Arc<SetTracker>,
}

impl<R: Checkpoint, C: Checkpointer<R>> Checkpointer<R> for SetMember<C> {
    fn save(&self, epoch: usize, record: R) -> Result<(), CheckpointerError> {
        self.inner.save(epoch, record)?;
        self.tracker.written(epoch, self.name)
    }

    fn delete(&self, epoch: usize) -> Result<(), CheckpointerError> {
        // The three members ask in turn; the first asks the writer, which deletes the whole set
        // after a newer one is sealed.
        self.tracker.deleting(epoch)
    }

    fn restore(&self, epoch: usize) -> Result<R, CheckpointerError> {
        self.tracker.writer.verify(epoch).map_err(unknown)?;
        self.inner.restore(epoch)
    }
}

/// Checkpointing with the SAM state in one call on [`SupervisedTraining`].
pub trait SamTrainingExt: Sized {
    /// Burn's default checkpoint files in `writer`'s directory (see [`checkpoint_set`]:
    /// `model-N`, `optim-N`, `scheduler-N`), with the SAM state inside `optim-N.bpk`, taken at
    /// the moment `strategy` saves, and sealed as a set (`set-N.json` with the run's
    /// fingerprint, see [`CheckpointSet`]) once all three are written. The writer holds the
    /// directory's lock for the run. Sets the strategy deletes are removed only once a newer
    /// set is sealed.
    ///
    /// A restored SAM state that does not fit the model stops the run through Burn's
    /// interrupter with the error in `LearningResult::error`, instead of a panic. Resume with
    /// [`verify_checkpoint`] then `SupervisedTraining::checkpoint(N)`; find N with
    /// [`CheckpointSet::latest`].
    fn with_sam_checkpointing<S>(self, writer: &CheckpointWriter, handle: &SamHandle, strategy: S) -> Self
    where
        S: CheckpointingStrategy + 'static;
}

impl<M: LearnerModel> SamTrainingExt for SupervisedTraining<M> {
    fn with_sam_checkpointing<S>(self, writer: &CheckpointWriter, handle: &SamHandle, strategy: S) -> Self
    where
        S: CheckpointingStrategy + 'static,
    {
        handle.stop_with(self.interrupter());
        let folder = writer.directory().to_path_buf();
        let tracker =
            Arc::new(SetTracker { writer: writer.clone(), written: Mutex::default(), retired: Mutex::default() });
        let member = |name: &'static str| SetMember {
            inner: FileCheckpointer::new(&folder, name),
            name,
            tracker: tracker.clone(),
        };
        self.with_custom_checkpointers(
            member("model"),
            SetMember {
                inner: SamCheckpointer::new(&folder, "optim", handle),
                name: "optim",
                tracker: tracker.clone(),
            },
            member("scheduler"),
        )
        .with_checkpointing_strategy(SamCheckpointing { inner: strategy, handle: handle.clone() })
    }
}
