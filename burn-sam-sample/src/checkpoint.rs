//! Checkpoint sets that survive a crash: the files of one epoch (model, optimizer with the SAM
//! state, scheduler, …) count only once a small manifest, written last and atomically, lists
//! each of them with its size and CRC-32.
//!
//! A run killed while it writes leaves at worst an unsealed set, which [`CheckpointSet::latest`]
//! skips and [`CheckpointSet::verify`] reports; a file damaged later fails its checksum before
//! anything is loaded from it. The Learner integration
//! ([`with_sam_checkpointing`](crate::learner::SamTrainingExt::with_sam_checkpointing)) seals
//! Burn's checkpoints this way; a custom loop calls [`CheckpointSet::seal`] after writing its
//! files.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, SamError};

const MANIFEST_FORMAT: u32 = 1;

/// The manifest of one sealed set: `set-{epoch}.json`.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    epoch: usize,
    files: Vec<FileEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileEntry {
    name: String,
    bytes: u64,
    crc32: String,
}

/// The checkpoint sets of one directory: for epoch N, the files `{name}-N.bpk` for each name and
/// the manifest `set-N.json` that seals them.
#[derive(Clone, Debug)]
pub struct CheckpointSet {
    directory: PathBuf,
    names: Vec<String>,
}

impl CheckpointSet {
    /// The sets of `directory` made of one `{name}-N.bpk` file per name.
    pub fn new(directory: impl AsRef<Path>, names: &[&str]) -> Self {
        Self { directory: directory.as_ref().to_path_buf(), names: names.iter().map(|n| n.to_string()).collect() }
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

    /// Seals the set of `epoch`: every file must exist; their sizes and checksums go to the
    /// manifest, written to a temporary file, flushed and renamed into place.
    pub fn seal(&self, epoch: usize) -> Result<()> {
        let mut files = Vec::with_capacity(self.names.len());
        for name in &self.names {
            let path = self.file(name, epoch);
            let (bytes, crc) = file_checksum(&path).map_err(|e| self.error(epoch, format!("cannot seal: {e}")))?;
            files.push(FileEntry { name: format!("{name}-{epoch}.bpk"), bytes, crc32: format!("{crc:08x}") });
        }
        let json = serde_json::to_vec_pretty(&Manifest { format: MANIFEST_FORMAT, epoch, files })
            .map_err(|e| self.error(epoch, format!("cannot encode the manifest: {e}")))?;
        let path = self.manifest_path(epoch);
        write_atomically(&path, &json).map_err(|e| self.error(epoch, format!("{}: {e}", path.display())))
    }

    /// Unseals the set of `epoch` (removes its manifest) so that it stops counting before its
    /// files are deleted. A set that is not sealed is left as it is.
    pub fn unseal(&self, epoch: usize) -> Result<()> {
        match std::fs::remove_file(self.manifest_path(epoch)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(self.error(epoch, format!("cannot unseal: {e}"))),
            _ => Ok(()),
        }
    }

    /// Checks the set of `epoch`: sealed, and every file there with the size and checksum the
    /// manifest records. The error names the first file that fails and why.
    pub fn verify(&self, epoch: usize) -> Result<()> {
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
                format!("{} is for epoch {} (format {})", path.display(), manifest.epoch, manifest.format),
            ));
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

    /// The newest epoch whose set verifies, skipping (and logging) unsealed or damaged ones;
    /// `None` when there is none.
    pub fn latest(&self) -> Result<Option<usize>> {
        let entries = match std::fs::read_dir(&self.directory) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
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
        for epoch in epochs {
            match self.verify(epoch) {
                Ok(()) => return Ok(Some(epoch)),
                Err(err) => log::warn!("skipping a checkpoint that does not verify: {err}"),
            }
        }
        Ok(None)
    }

    /// Removes the temporary files that writers killed mid-write leave behind
    /// (`*.bpk.<pid>-<n>.tmp`, `set-N.json.tmp`); call it before a run starts writing here.
    /// Returns how many were removed.
    pub fn remove_stale_temporaries(&self) -> Result<usize> {
        let entries = match std::fs::read_dir(&self.directory) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(SamError::Checkpoint(format!("{}: {e}", self.directory.display()))),
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

    fn error(&self, epoch: usize, reason: impl std::fmt::Display) -> SamError {
        SamError::Checkpoint(format!("checkpoint {epoch} in {}: {reason}", self.directory.display()))
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

/// Writes `contents` to `path` through a flushed temporary sibling and a rename, so that `path`
/// holds either its old contents or all of the new ones.
fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut temporary = path.as_os_str().to_owned();
    temporary.push(".tmp");
    let temporary = PathBuf::from(temporary);
    {
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(contents)?;
        file.sync_all()?;
    }
    std::fs::rename(&temporary, path)?;
    if let Some(parent) = path.parent() {
        // Makes the rename itself durable where the platform allows opening a directory.
        if let Ok(directory) = std::fs::File::open(parent) {
            let _ = directory.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set_with_files(dir: &Path, epochs: &[usize]) -> CheckpointSet {
        let set = CheckpointSet::new(dir, &["model", "optim"]);
        for &epoch in epochs {
            for name in ["model", "optim"] {
                std::fs::write(set.file(name, epoch), format!("{name} of epoch {epoch}")).unwrap();
            }
        }
        set
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
        set.seal(1).unwrap();
        set.verify(1).unwrap();
        let err = set.verify(2).unwrap_err().to_string();
        assert!(err.contains("incomplete") && err.contains("model-2.bpk"), "{err}");
        assert_eq!(set.latest().unwrap(), Some(1));
        let err = set.verify(3).unwrap_err().to_string();
        assert!(err.contains("no checkpoint of this epoch"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_damaged_or_missing_file_is_named() {
        let dir = temp_dir("damage");
        let set = set_with_files(&dir, &[1, 2]);
        set.seal(1).unwrap();
        set.seal(2).unwrap();
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
        set.seal(4).unwrap();
        set.unseal(4).unwrap();
        set.unseal(4).unwrap();
        assert!(set.verify(4).is_err());
        std::fs::write(dir.join("model-5.bpk.123-0.tmp"), "partial").unwrap();
        std::fs::write(dir.join("set-5.json.tmp"), "partial").unwrap();
        std::fs::write(dir.join("notes.tmp"), "not ours").unwrap();
        assert_eq!(set.remove_stale_temporaries().unwrap(), 2);
        assert!(dir.join("notes.tmp").exists());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
