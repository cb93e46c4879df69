//! Checkpoint sets that survive a crash: the files of one epoch (model, optimizer with the SAM
//! state, scheduler, …) count only once a small manifest, written last and atomically, lists
//! each of them with its size and CRC-32, and the fingerprint of the run that wrote them.
//!
//! A run killed while it writes leaves at worst an unsealed set, which [`CheckpointSet::latest`]
//! skips and [`CheckpointSet::verify`] reports; a file damaged later fails its checksum before
//! anything is loaded from it; a set of another run ([`RunFingerprint`]) never verifies. Writing
//! goes through a [`CheckpointWriter`], which holds the directory's lock, so that one run at a
//! time writes there. The Learner integration
//! ([`with_sam_checkpointing`](crate::learner::SamTrainingExt::with_sam_checkpointing)) seals
//! Burn's checkpoints this way; a custom loop calls [`CheckpointWriter::seal`] after writing its
//! files:
//!
//! ```
//! use burn_sam_sample::checkpoint::{CheckpointSet, RunFingerprint};
//!
//! # let directory = std::env::temp_dir().join(format!("sets-doc-{}", std::process::id()));
//! let run = RunFingerprint::new().with("seed", 0).with("epochs", 2);
//! let writer = CheckpointSet::new(&directory, &["model", "optim"]).for_run(run).writer()?;
//! writer.start_fresh(false)?; // refuses the sets of another run
//! for epoch in 1..=2 {
//!     for name in ["model", "optim"] {
//!         std::fs::write(writer.file(name, epoch), b"...")?; // model.save_file(..), record.save(..)
//!     }
//!     writer.seal(epoch)?;
//! }
//! assert_eq!(writer.latest()?, Some(2));
//! writer.check_resume(2, 3)?; // sealed, of this run, undamaged, and epoch 3 is left to train
//! # drop(writer);
//! # std::fs::remove_dir_all(&directory)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::error::{Result, SamError};

/// Version 2 records the run's fingerprint.
const MANIFEST_FORMAT: u32 = 2;
/// The lock file of a checkpoint directory.
const LOCK_FILE: &str = ".lock";

/// The manifest of one sealed set: `set-{epoch}.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    epoch: usize,
    run: RunFingerprint,
    files: Vec<FileEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileEntry {
    name: String,
    bytes: u64,
    crc32: String,
}

/// What determines a run's trajectory (model and optimizer configuration, data selection, batch
/// size, seed, schedule, epochs planned), as named options, recorded in every set the run seals.
///
/// A resume whose fingerprint differs is refused with the differing options named; options
/// passed to [`CheckpointSet::allowing_changes`] may differ. Values are compared as text, so
/// record them the way the program prints them.
///
/// ```
/// use burn_sam_sample::checkpoint::RunFingerprint;
///
/// let saved = RunFingerprint::new().with("seed", 0).with("lr", 0.05).with("epochs", 3);
/// let now = RunFingerprint::new().with("seed", 7).with("lr", 0.05).with("epochs", 4);
/// assert_eq!(now.differences(&saved, &["epochs"]), ["seed: 0 in the checkpoint, 7 now"]);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunFingerprint {
    options: BTreeMap<String, String>,
}

impl RunFingerprint {
    /// An empty fingerprint.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) one option.
    pub fn with(mut self, name: &str, value: impl std::fmt::Display) -> Self {
        self.options.insert(name.to_string(), value.to_string());
        self
    }

    /// The options, by name.
    pub fn options(&self) -> &BTreeMap<String, String> {
        &self.options
    }

    /// The options of `self` that differ from `saved` (present in one only, or with other
    /// values), except those in `allowed`, each as `name: <saved> in the checkpoint, <now> now`.
    pub fn differences(&self, saved: &RunFingerprint, allowed: &[&str]) -> Vec<String> {
        let names: BTreeSet<&String> = self.options.keys().chain(saved.options.keys()).collect();
        let shown = |value: Option<&String>| value.map_or_else(|| "(not recorded)".to_string(), Clone::clone);
        names
            .into_iter()
            .filter(|name| !allowed.contains(&name.as_str()))
            .filter(|name| self.options.get(*name) != saved.options.get(*name))
            .map(|name| {
                format!(
                    "{name}: {} in the checkpoint, {} now",
                    shown(saved.options.get(name)),
                    shown(self.options.get(name))
                )
            })
            .collect()
    }
}

/// The checkpoint sets of one directory: for epoch N, the files `{name}-N.bpk` for each name and
/// the manifest `set-N.json` that seals them, with the fingerprint of the run that wrote them.
///
/// Reading ([`verify`](Self::verify), [`latest`](Self::latest)) needs nothing else; writing
/// takes the directory's lock first ([`writer`](Self::writer)), so that two runs never write
/// into one directory.
#[derive(Clone, Debug)]
pub struct CheckpointSet {
    directory: PathBuf,
    names: Vec<String>,
    run: RunFingerprint,
    allowed_changes: Vec<String>,
}

impl CheckpointSet {
    /// The sets of `directory` made of one `{name}-N.bpk` file per name, for a run with an empty
    /// fingerprint (see [`for_run`](Self::for_run)).
    pub fn new(directory: impl AsRef<Path>, names: &[&str]) -> Self {
        Self {
            directory: directory.as_ref().to_path_buf(),
            names: names.iter().map(|n| n.to_string()).collect(),
            run: RunFingerprint::new(),
            allowed_changes: Vec::new(),
        }
    }

    /// The sets of the run with this fingerprint: sets of other runs do not verify and are
    /// never the latest.
    pub fn for_run(mut self, run: RunFingerprint) -> Self {
        self.run = run;
        self
    }

    /// Options of the fingerprint that a resume may change (a deliberate change, e.g. more
    /// epochs).
    pub fn allowing_changes(mut self, options: &[&str]) -> Self {
        self.allowed_changes = options.iter().map(|o| o.to_string()).collect();
        self
    }

    /// The fingerprint of the run these sets belong to.
    pub fn run(&self) -> &RunFingerprint {
        &self.run
    }

    /// The directory holding the sets.
    pub fn directory(&self) -> &Path {
        &self.directory
    }

    /// The path of file `name` of epoch `epoch`.
    pub fn file(&self, name: &str, epoch: usize) -> PathBuf {
        self.directory.join(format!("{name}-{epoch}.bpk"))
    }

    fn manifest_path(&self, epoch: usize) -> PathBuf {
        self.directory.join(format!("set-{epoch}.json"))
    }

    /// Opens the directory for writing: creates it, takes its lock (held until the last clone
    /// of the writer is dropped; the error names the process that holds it), and removes the
    /// temporary files that writers killed mid-write left behind (no live writer owns them,
    /// since none holds the lock).
    pub fn writer(&self) -> Result<CheckpointWriter> {
        std::fs::create_dir_all(&self.directory)
            .map_err(|e| SamError::Checkpoint(format!("cannot create {}: {e}", self.directory.display())))?;
        let lock = DirectoryLock::take(&self.directory)?;
        let writer = CheckpointWriter {
            set: self.clone(),
            _lock: Arc::new(lock),
            retiring: Arc::new(Mutex::new(BTreeSet::new())),
        };
        writer.remove_stale_temporaries()?;
        Ok(writer)
    }

    /// Checks the set of `epoch`: sealed, written by this run (same fingerprint but for the
    /// allowed changes), and every file there with the size and checksum the manifest records.
    /// The error names the first file or option that fails and why.
    pub fn verify(&self, epoch: usize) -> Result<()> {
        let manifest = self.manifest(epoch)?;
        let differences = self.differences(&manifest);
        if !differences.is_empty() {
            return Err(
                self.error(epoch, format!("it was written by a run with other options: {}", differences.join("; ")))
            );
        }
        for name in &self.names {
            let file = format!("{name}-{epoch}.bpk");
            let entry = manifest
                .files
                .iter()
                .find(|entry| entry.name == file)
                .ok_or_else(|| self.error(epoch, format!("the manifest does not list {file}")))?;
            let (bytes, crc) = file_checksum(&self.directory.join(&file)).map_err(|e| self.error(epoch, e))?;
            if bytes != entry.bytes || format!("{crc:08x}") != entry.crc32 {
                return Err(self.error(
                    epoch,
                    format!(
                        "{file} is damaged: {bytes} bytes with CRC-32 {crc:08x}, the manifest says {} bytes with {}",
                        entry.bytes, entry.crc32
                    ),
                ));
            }
        }
        Ok(())
    }

    /// [`verify`](Self::verify), and that a run of `planned_epochs` epochs has something left to
    /// train after `epoch`; the error names both numbers.
    pub fn check_resume(&self, epoch: usize, planned_epochs: usize) -> Result<()> {
        if epoch >= planned_epochs {
            return Err(self.error(
                epoch,
                format!(
                    "the run plans {planned_epochs} epoch(s), so nothing is left to train after epoch {epoch}; \
                     plan more epochs than the checkpoint's"
                ),
            ));
        }
        self.verify(epoch)
    }

    /// The sealed manifest of `epoch`, decoded; the error says whether the set is absent or
    /// incomplete.
    fn manifest(&self, epoch: usize) -> Result<Manifest> {
        let path = self.manifest_path(epoch);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let present: Vec<String> = self
                    .names
                    .iter()
                    .filter(|name| self.file(name, epoch).is_file())
                    .map(|name| format!("{name}-{epoch}.bpk"))
                    .collect();
                return Err(self.error(
                    epoch,
                    if present.is_empty() {
                        let expected: Vec<String> =
                            self.names.iter().map(|name| format!("{name}-{epoch}.bpk")).collect();
                        format!("there is no checkpoint of this epoch ({} absent)", expected.join(", "))
                    } else {
                        format!(
                            "the set is incomplete: {} has no manifest (set-{epoch}.json), so the run stopped \
                             while writing it or it was written without sealing; present: {}",
                            self.directory.display(),
                            present.join(", ")
                        )
                    },
                ));
            }
            Err(e) => return Err(self.error(epoch, format!("{}: {e}", path.display()))),
        };
        let manifest: Manifest = serde_json::from_slice(&text)
            .map_err(|e| self.error(epoch, format!("{} does not decode: {e}", path.display())))?;
        if manifest.format != MANIFEST_FORMAT || manifest.epoch != epoch {
            return Err(self.error(
                epoch,
                format!(
                    "{} is for epoch {} (format {}; this version reads format {MANIFEST_FORMAT})",
                    path.display(),
                    manifest.epoch,
                    manifest.format
                ),
            ));
        }
        Ok(manifest)
    }

    /// The epochs that have a manifest, newest first.
    fn sealed_epochs(&self) -> Result<Vec<usize>> {
        let entries = match std::fs::read_dir(&self.directory) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(SamError::Checkpoint(format!("{}: {e}", self.directory.display()))),
        };
        let mut epochs: Vec<usize> = entries
            .filter_map(|entry| entry.ok())
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                let epoch = name.strip_prefix("set-")?.strip_suffix(".json")?;
                epoch.parse().ok()
            })
            .collect();
        epochs.sort_unstable_by(|a, b| b.cmp(a));
        Ok(epochs)
    }

    /// The newest epoch whose set verifies (sealed, undamaged, of this run), skipping and
    /// logging unsealed or damaged ones; `None` when the directory holds no set at all. When
    /// it holds sets but none of this run, the error names the options in which the newest
    /// differs, so that `--resume latest` never continues another run.
    pub fn latest(&self) -> Result<Option<usize>> {
        let mut other_run = None;
        for epoch in self.sealed_epochs()? {
            match self.verify(epoch) {
                Ok(()) => return Ok(Some(epoch)),
                Err(err) => {
                    let foreign = self.manifest(epoch).is_ok_and(|manifest| !self.differences(&manifest).is_empty());
                    if foreign {
                        other_run.get_or_insert(err);
                    } else {
                        log::warn!("skipping a checkpoint that does not verify: {err}");
                    }
                }
            }
        }
        match other_run {
            Some(err) => Err(SamError::Checkpoint(format!("no checkpoint of this run; the newest one: {err}"))),
            None => Ok(None),
        }
    }

    /// The options in which the run that sealed `manifest` differs from this one, but for the
    /// allowed changes.
    fn differences(&self, manifest: &Manifest) -> Vec<String> {
        let allowed: Vec<&str> = self.allowed_changes.iter().map(String::as_str).collect();
        self.run.differences(&manifest.run, &allowed)
    }

    fn error(&self, epoch: usize, reason: impl std::fmt::Display) -> SamError {
        SamError::Checkpoint(format!("checkpoint {epoch} in {}: {reason}", self.directory.display()))
    }
}

/// A [`CheckpointSet`] opened for writing: it holds the directory's lock, seals sets with the
/// run's fingerprint, and retires old sets only once a newer one is sealed. Clones share the
/// lock.
#[derive(Clone, Debug)]
pub struct CheckpointWriter {
    set: CheckpointSet,
    _lock: Arc<DirectoryLock>,
    /// Epochs asked to be retired while no newer set was sealed yet.
    retiring: Arc<Mutex<BTreeSet<usize>>>,
}

impl std::ops::Deref for CheckpointWriter {
    type Target = CheckpointSet;

    fn deref(&self) -> &CheckpointSet {
        &self.set
    }
}

impl CheckpointWriter {
    /// Before a fresh run (not a resume) writes here: an error when the directory holds sealed
    /// sets of another run, naming the options that differ; with `overwrite`, every set of the
    /// directory is removed instead.
    pub fn start_fresh(&self, overwrite: bool) -> Result<()> {
        for epoch in self.sealed_epochs()? {
            if overwrite {
                self.remove(epoch)?;
                continue;
            }
            if let Ok(manifest) = self.manifest(epoch) {
                let differences = self.differences(&manifest);
                if !differences.is_empty() {
                    return Err(self.error(
                        epoch,
                        format!(
                            "the directory holds checkpoints of another run ({}); resume that run with its \
                             own options, use another directory, or start over with --overwrite",
                            differences.join("; ")
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Seals the set of `epoch`: every file must exist; each is flushed to disk, then their
    /// sizes and checksums and the run's fingerprint go to the manifest, written to a
    /// temporary file, flushed and renamed into place. Sets waiting to be retired
    /// ([`retire`](Self::retire)) are removed once this one is sealed.
    pub fn seal(&self, epoch: usize) -> Result<()> {
        let mut files = Vec::with_capacity(self.names.len());
        for name in &self.names {
            let path = self.file(name, epoch);
            std::fs::File::open(&path)
                .and_then(|file| file.sync_all())
                .map_err(|e| self.error(epoch, format!("cannot seal: {}: {e}", path.display())))?;
            let (bytes, crc) = file_checksum(&path).map_err(|e| self.error(epoch, format!("cannot seal: {e}")))?;
            files.push(FileEntry { name: format!("{name}-{epoch}.bpk"), bytes, crc32: format!("{crc:08x}") });
        }
        let manifest = Manifest { format: MANIFEST_FORMAT, epoch, run: self.run.clone(), files };
        let json = serde_json::to_vec_pretty(&manifest)
            .map_err(|e| self.error(epoch, format!("cannot encode the manifest: {e}")))?;
        let path = self.manifest_path(epoch);
        write_atomically(&path, &json).map_err(|e| self.error(epoch, format!("{}: {e}", path.display())))?;
        let due: Vec<usize> = {
            let mut retiring = self.retiring.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let due: Vec<usize> = retiring.range(..epoch).copied().collect();
            for old in &due {
                retiring.remove(old);
            }
            due
        };
        for old in due {
            self.remove(old)?;
        }
        Ok(())
    }

    /// Retires the set of `epoch` (a checkpoint rotation): unsealed, then its files deleted, but
    /// only once a newer set of this run is sealed, so that a kill at any moment leaves a sealed
    /// set. Until then it waits, and the next [`seal`](Self::seal) of a newer epoch removes it.
    pub fn retire(&self, epoch: usize) -> Result<()> {
        // Decided under the lock that `seal` drains the waiting list with, so that a set sealed
        // meanwhile either is seen here or removes this one.
        let mut retiring = self.retiring.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let newer_sealed = self.sealed_epochs()?.into_iter().any(|e| e > epoch && self.verify(e).is_ok());
        if newer_sealed {
            drop(retiring);
            self.remove(epoch)
        } else {
            retiring.insert(epoch);
            Ok(())
        }
    }

    /// Unseals the set of `epoch` (so that it stops counting), then deletes its files.
    fn remove(&self, epoch: usize) -> Result<()> {
        self.unseal(epoch)?;
        for name in &self.names {
            match std::fs::remove_file(self.file(name, epoch)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(self.error(epoch, format!("cannot delete {name}-{epoch}.bpk: {e}")))
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Unseals the set of `epoch` (removes its manifest) so that it stops counting before its
    /// files are deleted. A set that is not sealed is left as it is.
    pub fn unseal(&self, epoch: usize) -> Result<()> {
        match std::fs::remove_file(self.manifest_path(epoch)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(self.error(epoch, format!("cannot unseal: {e}"))),
            _ => {
                sync_directory(self.directory());
                Ok(())
            }
        }
    }

    /// Removes the temporary files that writers killed mid-write leave behind (`*.bpk.*.tmp`,
    /// `set-N.json.*.tmp`). Runs when the writer is opened, under the lock. Returns how many
    /// were removed.
    fn remove_stale_temporaries(&self) -> Result<usize> {
        let entries = match std::fs::read_dir(self.directory()) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(SamError::Checkpoint(format!("{}: {e}", self.directory().display()))),
        };
        let mut removed = 0;
        for entry in entries.filter_map(|entry| entry.ok()) {
            let name = entry.file_name().to_string_lossy().into_owned();
            let stale = name.ends_with(".tmp") && (name.contains(".bpk.") || name.starts_with("set-"));
            if stale && entry.path().is_file() {
                std::fs::remove_file(entry.path())
                    .map_err(|e| SamError::Checkpoint(format!("cannot remove {}: {e}", entry.path().display())))?;
                log::info!("removed the stale temporary file {}", entry.path().display());
                removed += 1;
            }
        }
        Ok(removed)
    }
}

/// An exclusive advisory lock on a checkpoint directory (`.lock`, holding the owner's process
/// id), released when dropped or when the process dies.
#[derive(Debug)]
struct DirectoryLock {
    _file: std::fs::File,
}

impl DirectoryLock {
    fn take(directory: &Path) -> Result<Self> {
        let path = directory.join(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| SamError::Checkpoint(format!("cannot open {}: {e}", path.display())))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                return Err(SamError::Checkpoint(format!(
                    "{} is in use by another run (process {}); one run writes into a directory at a time",
                    directory.display(),
                    if holder.is_empty() { "unknown" } else { holder }
                )));
            }
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(SamError::Checkpoint(format!("cannot lock {}: {e}", path.display())))
            }
        }
        file.set_len(0)
            .and_then(|()| file.write_all(std::process::id().to_string().as_bytes()))
            .map_err(|e| SamError::Checkpoint(format!("cannot write {}: {e}", path.display())))?;
        Ok(Self { _file: file })
    }
}

/// Size and CRC-32 of a file, read in chunks.
fn file_checksum(path: &Path) -> std::result::Result<(u64, u32), String> {
    let mut file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let read = file.read(&mut buffer).map_err(|e| format!("{}: {e}", path.display()))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        bytes += read as u64;
    }
    Ok((bytes, hasher.finalize()))
}

/// Makes renames and removals in `directory` durable where the platform allows opening a
/// directory.
fn sync_directory(directory: &Path) {
    if let Ok(directory) = std::fs::File::open(directory) {
        let _ = directory.sync_all();
    }
}

/// Writes `contents` to `path` through a flushed temporary sibling (named after this process and
/// a counter, so that no two writers share one) and a rename, so that `path` holds either its
/// old contents or all of the new ones.
fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(format!(".{}-{}.tmp", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed)));
    let temporary = PathBuf::from(temporary);
    {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(contents)?;
        file.sync_all()?;
    }
    std::fs::rename(&temporary, path)?;
    if let Some(parent) = path.parent() {
        sync_directory(parent);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_with_files(dir: &Path, epochs: &[usize]) -> CheckpointSet {
        let set = CheckpointSet::new(dir, &["model", "optim"]).for_run(RunFingerprint::new().with("seed", 0));
        for &epoch in epochs {
            write_files(&set, epoch);
        }
        set
    }

    fn write_files(set: &CheckpointSet, epoch: usize) {
        for name in ["model", "optim"] {
            std::fs::write(set.file(name, epoch), format!("{name} of epoch {epoch}")).unwrap();
        }
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("burn-sam-sample-set-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_sealed_set_verifies_and_an_unsealed_one_is_incomplete() {
        let dir = temp_dir("seal");
        let set = set_with_files(&dir, &[1, 2]);
        set.writer().unwrap().seal(1).unwrap();
        set.verify(1).unwrap();
        let err = set.verify(2).unwrap_err().to_string();
        assert!(err.contains("incomplete") && err.contains("model-2.bpk"), "{err}");
        assert_eq!(set.latest().unwrap(), Some(1));
        let err = set.verify(3).unwrap_err().to_string();
        assert!(err.contains("no checkpoint of this epoch"), "{err}");
        let err = set.check_resume(1, 1).unwrap_err().to_string();
        assert!(err.contains("plans 1 epoch(s)") && err.contains("after epoch 1"), "{err}");
        set.check_resume(1, 2).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_damaged_or_missing_file_is_named() {
        let dir = temp_dir("damage");
        let set = set_with_files(&dir, &[1, 2]);
        let writer = set.writer().unwrap();
        writer.seal(1).unwrap();
        writer.seal(2).unwrap();
        std::fs::write(set.file("model", 2), "model of epoch 9").unwrap();
        let err = set.verify(2).unwrap_err().to_string();
        assert!(err.contains("model-2.bpk is damaged"), "{err}");
        assert_eq!(set.latest().unwrap(), Some(1), "the damaged newest set is skipped");
        std::fs::remove_file(set.file("optim", 1)).unwrap();
        assert!(set.verify(1).unwrap_err().to_string().contains("optim-1.bpk"));
        assert_eq!(set.latest().unwrap(), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unsealing_and_stale_temporaries() {
        let dir = temp_dir("stale");
        let set = set_with_files(&dir, &[4]);
        {
            let writer = set.writer().unwrap();
            writer.seal(4).unwrap();
            writer.unseal(4).unwrap();
            writer.unseal(4).unwrap();
        }
        assert!(set.verify(4).is_err());
        std::fs::write(dir.join("model-5.bpk.123-0.tmp"), "partial").unwrap();
        std::fs::write(dir.join("set-5.json.123-0.tmp"), "partial").unwrap();
        std::fs::write(dir.join("notes.tmp"), "not ours").unwrap();
        let _writer = set.writer().unwrap();
        assert!(!dir.join("model-5.bpk.123-0.tmp").exists() && !dir.join("set-5.json.123-0.tmp").exists());
        assert!(dir.join("notes.tmp").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn sets_of_another_run_do_not_verify_and_are_never_the_latest() {
        let dir = temp_dir("runs");
        let seed0 = set_with_files(&dir, &[1, 2, 3]);
        let writer = seed0.writer().unwrap();
        for epoch in 1..=3 {
            writer.seal(epoch).unwrap();
        }
        drop(writer);
        let seed7 = CheckpointSet::new(&dir, &["model", "optim"]).for_run(RunFingerprint::new().with("seed", 7));
        let err = seed7.verify(3).unwrap_err().to_string();
        assert!(err.contains("other options") && err.contains("seed: 0 in the checkpoint, 7 now"), "{err}");
        let err = seed7.latest().unwrap_err().to_string();
        assert!(err.contains("no checkpoint of this run") && err.contains("seed: 0"), "{err}");
        // A fresh run of seed 7 refuses the directory, unless told to overwrite it.
        let writer = seed7.writer().unwrap();
        let err = writer.start_fresh(false).unwrap_err().to_string();
        assert!(err.contains("another run") && err.contains("--overwrite"), "{err}");
        seed0.writer().unwrap_err();
        writer.start_fresh(true).unwrap();
        assert_eq!(seed0.latest().unwrap(), None);
        assert!(!seed0.file("model", 2).exists());
        // The same run may start again; an allowed change verifies.
        write_files(&seed7, 1);
        writer.seal(1).unwrap();
        writer.start_fresh(false).unwrap();
        let more = CheckpointSet::new(&dir, &["model", "optim"])
            .for_run(RunFingerprint::new().with("seed", 7).with("epochs", 9))
            .allowing_changes(&["epochs"]);
        more.verify(1).unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn one_writer_per_directory() {
        let dir = temp_dir("lock");
        let set = set_with_files(&dir, &[]);
        let writer = set.writer().unwrap();
        let clone = writer.clone();
        drop(writer);
        let err = set.writer().unwrap_err().to_string();
        assert!(err.contains("in use by another run") && err.contains(&std::process::id().to_string()), "{err}");
        drop(clone);
        set.writer().unwrap();
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_old_set_is_retired_only_once_a_newer_one_is_sealed() {
        let dir = temp_dir("retire");
        let set = set_with_files(&dir, &[1, 2]);
        let writer = set.writer().unwrap();
        writer.seal(1).unwrap();
        // Keep-last-one asks to delete set 1 before set 2 is sealed: it stays until then.
        writer.retire(1).unwrap();
        assert_eq!(set.latest().unwrap(), Some(1));
        writer.seal(2).unwrap();
        assert_eq!(set.latest().unwrap(), Some(2));
        assert!(set.verify(1).is_err() && !set.file("model", 1).exists());
        // With a newer set sealed, retiring is immediate.
        write_files(&set, 3);
        writer.seal(3).unwrap();
        writer.retire(2).unwrap();
        assert!(!set.file("optim", 2).exists());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
