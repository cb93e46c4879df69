//! Learner checkpoints that carry the SAM state of the same moment.
//!
//! Burn takes a checkpoint's records on the training thread and writes them on a background
//! thread. The SAM state is captured by [`SamCheckpointing`], a checkpointing strategy that Burn
//! calls on the training thread at the moment of the checkpoint, and written by
//! [`SamCheckpointer`] together with the optimizer record, in one file per epoch.

use std::path::{Path, PathBuf};

use burn::optim::OptimizerRecord;
use burn::train::checkpoint::{
    Checkpointer, CheckpointerError, CheckpointingAction, CheckpointingStrategy, FileCheckpointer,
};
use burn::train::metric::store::EventStoreClient;
use burn::train::{LearnerModel, SupervisedTraining};

use super::SamHandle;
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

/// Checks, before training starts, that the checkpoint of `epoch` written under `directory` by
/// [`with_sam_checkpointing`](SamTrainingExt::with_sam_checkpointing) can resume a run of
/// `config`: the model, optimizer and scheduler files are there and not empty, the optimizer file
/// passes its checksum, and its SAM state belongs to `config` (same gate and reuse rule, state in
/// range). Burn's `SupervisedTraining::checkpoint(epoch)` panics on a missing or damaged file
/// once training has started; call this first to get an error that says which file and why.
///
/// The model and scheduler files carry no checksum of their own: damage inside them that still
/// parses is not detected here.
pub fn verify_checkpoint(directory: impl AsRef<Path>, epoch: usize, config: &SamConfig) -> crate::Result<()> {
    let folder = directory.as_ref().join("checkpoint");
    for name in ["model", "optim", "scheduler"] {
        let path = folder.join(format!("{name}-{epoch}.bpk"));
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_file() && meta.len() > 0 => {}
            Ok(_) => {
                return Err(SamError::CorruptRecord(format!(
                    "checkpoint {epoch}: {} is empty or not a file",
                    path.display()
                )))
            }
            Err(err) => return Err(SamError::CorruptRecord(format!("checkpoint {epoch}: {}: {err}", path.display()))),
        }
    }
    let optim = folder.join(format!("optim-{epoch}.bpk"));
    let record = SamOptimizerRecord::load(&optim)
        .map_err(|err| SamError::CorruptRecord(format!("checkpoint {epoch}: {}: {err}", optim.display())))?;
    record
        .engine
        .check_config(config)
        .map_err(|err| SamError::RecordMismatch(format!("checkpoint {epoch}: {}: {err}", optim.display())))
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
    /// saves. Resume with `SupervisedTraining::checkpoint(N)` as usual.
    fn with_sam_checkpointing<S>(self, directory: impl AsRef<Path>, handle: &SamHandle, strategy: S) -> Self
    where
        S: CheckpointingStrategy + 'static;
}

impl<M: LearnerModel> SamTrainingExt for SupervisedTraining<M> {
    fn with_sam_checkpointing<S>(self, directory: impl AsRef<Path>, handle: &SamHandle, strategy: S) -> Self
    where
        S: CheckpointingStrategy + 'static,
    {
        let directory = directory.as_ref().join("checkpoint");
        self.with_custom_checkpointers(
            FileCheckpointer::new(&directory, "model"),
            SamCheckpointer::new(&directory, "optim", handle),
            FileCheckpointer::new(&directory, "scheduler"),
        )
        .with_checkpointing_strategy(handle.checkpointing(strategy))
    }
}
