//! Learner checkpoints that carry the SAM state of the same moment, in crash-consistent sets.
//!
//! Burn takes a checkpoint's records on the training thread and writes them on background
//! threads, one per file. The SAM state is captured by [`SamCheckpointing`], a checkpointing
//! strategy that Burn calls on the training thread at the moment of the checkpoint, and written by
//! [`SamCheckpointer`] together with the optimizer record. Each of the three checkpointers reports
//! its file to a shared tracker, which seals the epoch's set ([`CheckpointSet`]) once all three
//! are on disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use burn::optim::OptimizerRecord;
use burn::train::checkpoint::{
    Checkpoint, Checkpointer, CheckpointerError, CheckpointingAction, CheckpointingStrategy, FileCheckpointer,
};
use burn::train::metric::store::EventStoreClient;
use burn::train::{LearnerModel, SupervisedTraining};

use super::SamHandle;
use crate::checkpoint::CheckpointSet;
use crate::config::SamConfig;
use crate::error::SamError;
use crate::optimizer::SamOptimizerRecord;

/// A checkpointing strategy that snapshots the SAM state whenever the wrapped strategy saves.
pub struct SamCheckpointing<S> {
    inner: S,
    handle: SamHandle,
}

impl<S: CheckpointingStrategy> CheckpointingStrategy for SamCheckpointing<S> {
    fn checkpointing(&mut self, epoch: usize, collector: &EventStoreClient) -> Vec<CheckpointingAction> {
        let actions = self.inner.checkpointing(epoch, collector);
        if actions.contains(&CheckpointingAction::Save) {
            self.handle.snapshot(epoch);
        }
        actions
    }
}

/// The optimizer checkpointer: writes `{name}-{epoch}.bpk` holding the base optimizer's record
/// and the SAM state snapshotted for that epoch; restoring hands the SAM state back to the handle.
pub struct SamCheckpointer {
    directory: PathBuf,
    name: String,
    handle: SamHandle,
}

impl SamCheckpointer {
    /// Files go to `directory/{name}-{epoch}.bpk`.
    pub fn new(directory: impl AsRef<Path>, name: &str, handle: &SamHandle) -> Self {
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
                "no SAM snapshot for epoch {epoch}: wrap the checkpointing strategy with \
                 `SamHandle::checkpointing` (or use `with_sam_checkpointing`)"
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

fn learner_set(directory: &Path) -> CheckpointSet {
    CheckpointSet::new(directory.join("checkpoint"), &SET_FILES)
}

/// Checks, before training starts, that the checkpoint of `epoch` written under `directory` by
/// [`with_sam_checkpointing`](SamTrainingExt::with_sam_checkpointing) can resume a run of
/// `config`: its set is complete and sealed, the model, optimizer and scheduler files have the
/// sizes and checksums its manifest records, and its SAM state belongs to `config` (same gate and
/// reuse rule, state in range). Burn's `SupervisedTraining::checkpoint(epoch)` panics on a
/// missing or damaged file once training has started; call this first to get an error that says
/// which file and why.
pub fn verify_checkpoint(directory: impl AsRef<Path>, epoch: usize, config: &SamConfig) -> crate::Result<()> {
    let set = learner_set(directory.as_ref());
    set.verify(epoch)?;
    let optim = set.file("optim", epoch);
    let record = SamOptimizerRecord::load(&optim)
        .map_err(|err| SamError::CorruptRecord(format!("checkpoint {epoch}: {}: {err}", optim.display())))?;
    record
        .engine
        .check_config(config)
        .map_err(|err| SamError::RecordMismatch(format!("checkpoint {epoch}: {}: {err}", optim.display())))
}

/// The newest checkpoint under `directory` (written by
/// [`with_sam_checkpointing`](SamTrainingExt::with_sam_checkpointing)) whose set is complete and
/// undamaged, for `--resume latest`; `None` when there is none. Incomplete or damaged sets are
/// skipped with a warning.
pub fn latest_checkpoint(directory: impl AsRef<Path>) -> crate::Result<Option<usize>> {
    learner_set(directory.as_ref()).latest()
}

/// Seals an epoch's set once every file of it has been written.
struct SetTracker {
    set: CheckpointSet,
    written: Mutex<HashMap<usize, Vec<&'static str>>>,
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
            self.set.seal(epoch).map_err(unknown)?;
        }
        Ok(())
    }

    fn deleting(&self, epoch: usize) -> Result<(), CheckpointerError> {
        self.written.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(&epoch);
        self.set.unseal(epoch).map_err(unknown)
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
        // The set stops counting before any of its files goes.
        self.tracker.deleting(epoch)?;
        self.inner.delete(epoch)
    }

    fn restore(&self, epoch: usize) -> Result<R, CheckpointerError> {
        self.tracker.set.verify(epoch).map_err(unknown)?;
        self.inner.restore(epoch)
    }
}

impl SamHandle {
    /// Wraps a checkpointing strategy so that every checkpoint it asks for also captures the SAM
    /// state of that moment.
    pub fn checkpointing<S: CheckpointingStrategy>(&self, strategy: S) -> SamCheckpointing<S> {
        SamCheckpointing { inner: strategy, handle: self.clone() }
    }
}

/// Checkpointing with the SAM state in one call on [`SupervisedTraining`].
pub trait SamTrainingExt: Sized {
    /// Burn's default checkpoint files under `directory/checkpoint` (`model-N`, `optim-N`,
    /// `scheduler-N`), with the SAM state inside `optim-N.bpk`, taken at the moment `strategy`
    /// saves, and sealed as a set (`set-N.json`, see [`CheckpointSet`]) once all three are
    /// written. Stale temporary files of a killed run are removed first. Resume with
    /// [`verify_checkpoint`] then `SupervisedTraining::checkpoint(N)`, or find N with
    /// [`latest_checkpoint`].
    fn with_sam_checkpointing<S>(self, directory: impl AsRef<Path>, handle: &SamHandle, strategy: S) -> Self
    where
        S: CheckpointingStrategy + 'static;
}

impl<M: LearnerModel> SamTrainingExt for SupervisedTraining<M> {
    fn with_sam_checkpointing<S>(self, directory: impl AsRef<Path>, handle: &SamHandle, strategy: S) -> Self
    where
        S: CheckpointingStrategy + 'static,
    {
        let set = learner_set(directory.as_ref());
        if let Err(err) = set.remove_stale_temporaries() {
            log::warn!("{err}");
        }
        let folder = set.directory().to_path_buf();
        let tracker = Arc::new(SetTracker { set, written: Mutex::default() });
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
        .with_checkpointing_strategy(handle.checkpointing(strategy))
    }
}
