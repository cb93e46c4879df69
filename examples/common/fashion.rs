//! Fashion-MNIST as a Burn `Dataset`, with a batcher.
//!
//! The four idx files (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-…`, gzipped or
//! not) are read from the folder the user names (`--data-dir`, else `$FASHION_MNIST_DIR`; an
//! unusable named folder is an error, never a fallback), or else looked for in
//! `/usr/share/datasets/fashion-mnist` (Debian's `dataset-fashion-mnist` package) and Burn's cache
//! (`<cache>/burn-dataset/fashion-mnist`); when none holds them, they are fetched into the cache
//! (see [`crate::download`]) unless fetching is off. Every file is checked against a pinned
//! SHA-256 of its idx content wherever it comes from.

use std::io::Read;
use std::path::{Path, PathBuf};

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::{Dataset, InMemDataset};
use burn::prelude::*;

use crate::download::{offline_hint, Downloader, FASHION_MNIST_SHA256};

/// Mean and standard deviation of Fashion-MNIST pixels (scaled to [0, 1]).
const MEAN: f32 = 0.2860;
const STD: f32 = 0.3530;
const PIXELS: usize = 28 * 28;
/// The number of items of each of the four files (in [`FILES`] order) of the real data set,
/// which its pinned checksums fix: a header that announces more is refused before anything is
/// inflated.
const FASHION_MNIST_ITEMS: [u32; 4] = [60_000, 60_000, 10_000, 10_000];
/// The four files, in the order of [`FASHION_MNIST_SHA256`].
pub const FILES: [&str; 4] =
    ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"];

/// One image (28×28 grey, row-major) and its class 0..=9.
#[derive(Clone, Debug)]
pub struct FashionItem {
    /// Pixels 0..=255.
    pub image: Vec<u8>,
    /// Class index.
    pub label: u8,
}

/// The class names, by index.
pub const CLASSES: [&str; 10] =
    ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"];

/// The training and test splits.
pub struct FashionMnist {
    /// 60,000 training images.
    pub train: InMemDataset<FashionItem>,
    /// 10,000 test images.
    pub test: InMemDataset<FashionItem>,
    /// The folder the files were read from.
    pub source: PathBuf,
    /// Whether the files were fetched over the network by this call.
    pub fetched: bool,
}

/// Whether missing data may be fetched over the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fetch {
    /// Fetch into Burn's cache when no folder holds the data (the default).
    Allowed,
    /// Never touch the network (`--offline`, or `FASHION_MNIST_OFFLINE=1`).
    Offline,
}

impl Fetch {
    /// `Offline` when `offline` is set or `FASHION_MNIST_OFFLINE` is set to anything but `0`
    /// or an empty value.
    pub fn from_flag(offline: bool) -> Self {
        let env = std::env::var("FASHION_MNIST_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0");
        if offline || env {
            Self::Offline
        } else {
            Self::Allowed
        }
    }
}

/// Why the data could not be loaded, with what to do about it.
#[derive(Debug)]
pub struct DataError(pub String);

impl std::fmt::Display for DataError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DataError {}

/// Burn's dataset cache folder for Fashion-MNIST.
pub fn burn_cache_dir() -> Option<PathBuf> {
    dirs::cache_dir().map(|dir| dir.join("burn-dataset").join("fashion-mnist"))
}

/// The folders searched, in order, when the user names none.
pub fn candidate_dirs() -> Vec<PathBuf> {
    let mut dirs = vec![PathBuf::from("/usr/share/datasets/fashion-mnist")];
    dirs.extend(burn_cache_dir());
    dirs
}

fn file_in(dir: &Path, name: &str) -> Option<PathBuf> {
    [dir.join(format!("{name}.gz")), dir.join(name)].into_iter().find(|path| path.is_file())
}

fn complete(dir: &Path) -> bool {
    FILES.iter().all(|name| file_in(dir, name).is_some())
}

/// What is wrong with `dir` as a Fashion-MNIST folder, or `None` when all four files are there.
fn unusable(dir: &Path) -> Option<String> {
    if !dir.exists() {
        return Some("does not exist".into());
    }
    if !dir.is_dir() {
        return Some("is not a folder".into());
    }
    let missing: Vec<String> =
        FILES.iter().filter(|name| file_in(dir, name).is_none()).map(|name| format!("{name}[.gz]")).collect();
    (!missing.is_empty()).then(|| format!("lacks {}", missing.join(", ")))
}

impl FashionMnist {
    /// Reads the dataset, verified. A folder the user names (`data_dir`, else
    /// `$FASHION_MNIST_DIR`) must hold the data: when it does not, that is an error, never a
    /// fallback. Without one, the Debian package's folder and Burn's cache are searched, in that
    /// order, and when neither holds the data it is fetched into the cache (unless `fetch` is
    /// [`Fetch::Offline`]).
    pub fn load(data_dir: Option<&Path>, fetch: Fetch) -> Result<Self, DataError> {
        let checksums = Some(&FASHION_MNIST_SHA256);
        let named = data_dir
            .map(|dir| ("--data-dir", dir.to_path_buf()))
            .or_else(|| std::env::var_os("FASHION_MNIST_DIR").map(|dir| ("FASHION_MNIST_DIR", PathBuf::from(dir))));
        if let Some((what, dir)) = named {
            if let Some(problem) = unusable(&dir) {
                return Err(DataError(format!(
                    "{what} names {}, which {problem}.\nIt must hold the four files {} (gzipped or not).",
                    dir.display(),
                    FILES.join(", ")
                )));
            }
            return Self::read_dir(dir, checksums);
        }
        let candidates = candidate_dirs();
        if let Some(dir) = candidates.iter().find(|dir| complete(dir)) {
            return Self::read_dir(dir.clone(), checksums);
        }
        let Some(cache) = burn_cache_dir() else {
            return Err(DataError(not_found_message(&candidates, "there is no cache folder on this system")));
        };
        if fetch == Fetch::Offline {
            return Err(DataError(not_found_message(
                &candidates,
                "fetching is off (--offline or FASHION_MNIST_OFFLINE)",
            )));
        }
        Downloader::default().fetch(&cache)?;
        let mut data = Self::read_dir(cache, checksums)?;
        data.fetched = true;
        Ok(data)
    }

    /// Reads the four files of `dir`; with `checksums` (in [`FILES`] order), each file's idx
    /// content must have that SHA-256.
    pub fn read_dir(dir: PathBuf, checksums: Option<&[&str; 4]>) -> Result<Self, DataError> {
        let path = |name: &str| {
            file_in(&dir, name).ok_or_else(|| DataError(format!("{}: {name}[.gz] is missing", dir.display())))
        };
        let pinned = checksums == Some(&FASHION_MNIST_SHA256);
        let read = |index: usize, expected: &[Option<u32>]| -> Result<(PathBuf, Idx), DataError> {
            let file = path(FILES[index])?;
            let mut expected = expected.to_vec();
            if pinned {
                expected[0] = Some(FASHION_MNIST_ITEMS[index]);
            }
            let idx = read_idx(&file, Some(&expected))?;
            if let Some(want) = checksums.map(|sums| sums[index]) {
                if idx.sha256 != want {
                    return Err(DataError(format!(
                        "{}: the SHA-256 of its idx content is {}, expected {want}: the file is damaged or not \
                         Fashion-MNIST; replace it (or remove it from the cache to fetch it again)",
                        file.display(),
                        idx.sha256
                    )));
                }
            }
            Ok((file, idx))
        };
        let split = |images: usize, labels: usize| -> Result<InMemDataset<FashionItem>, DataError> {
            let (images_path, images) = read(images, &[None, Some(28), Some(28)])?;
            let (labels_path, labels) = read(labels, &[None])?;
            if images.dims[0] != labels.dims[0] {
                return Err(DataError(format!(
                    "{} holds {} images but {} holds {} labels",
                    images_path.display(),
                    images.dims[0],
                    labels_path.display(),
                    labels.dims[0]
                )));
            }
            if let Some(at) = labels.payload.iter().position(|&label| label as usize >= CLASSES.len()) {
                return Err(DataError(format!(
                    "{}: label {} of item {at} is not a class (0..=9)",
                    labels_path.display(),
                    labels.payload[at]
                )));
            }
            let items = images
                .payload
                .chunks_exact(PIXELS)
                .zip(labels.payload)
                .map(|(image, label)| FashionItem { image: image.to_vec(), label })
                .collect();
            Ok(InMemDataset::new(items))
        };
        Ok(Self { train: split(0, 1)?, test: split(2, 3)?, source: dir, fetched: false })
    }
}

fn not_found_message(candidates: &[PathBuf], fetch: &str) -> String {
    let searched: Vec<String> = candidates.iter().map(|dir| format!("  - {}", dir.display())).collect();
    format!(
        "Fashion-MNIST was not found in:\n{}\nand was not fetched: {fetch}.\n{}",
        searched.join("\n"),
        offline_hint()
    )
}

/// Largest payload accepted: 64 × the 47 MB of the training images.
const MAX_PAYLOAD: u64 = 3 << 30;

/// An idx file's dimensions, payload and the SHA-256 of its (decompressed) content.
pub struct Idx {
    /// The dimensions from the header.
    pub dims: Vec<u32>,
    /// The bytes after the header.
    pub payload: Vec<u8>,
    /// SHA-256 of the header and payload, lower-case hex.
    pub sha256: String,
}

/// Reads an idx file of unsigned bytes (optionally gzipped) whose dimensions must match
/// `expected` (`None` inside: any size; `None`: any rank). The header is read and checked first,
/// and at most the payload it announces (plus one byte, to detect trailing data) is
/// decompressed, so a hostile file cannot make the reader allocate more than it declares.
pub fn read_idx(path: &Path, expected: Option<&[Option<u32>]>) -> Result<Idx, DataError> {
    use sha2::Digest;
    use std::io::BufRead;
    let error = |what: String| DataError(format!("{}: {what}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| error(e.to_string()))?;
    let mut buffered = std::io::BufReader::new(file);
    let gzipped = buffered.fill_buf().map_err(|e| error(e.to_string()))?.starts_with(&[0x1f, 0x8b]);
    let mut reader: Box<dyn Read> =
        if gzipped { Box::new(flate2::bufread::GzDecoder::new(buffered)) } else { Box::new(buffered) };
    let mut hasher = sha2::Sha256::new();
    let mut magic = [0u8; 4];
    reader.read_exact(&mut magic).map_err(|e| error(format!("cannot read the idx header: {e}")))?;
    hasher.update(magic);
    let rank = expected.map_or(magic[3] as usize, <[_]>::len);
    if magic[..3] != [0, 0, 8] || magic[3] as usize != rank || !(1..=3).contains(&rank) {
        return Err(error(format!(
            "not an idx file of rank {rank} of unsigned bytes (magic {magic:02x?}, expected [00, 00, 08, {rank:02x}])"
        )));
    }
    let mut dims = Vec::with_capacity(rank);
    for i in 0..rank {
        let mut word = [0u8; 4];
        reader.read_exact(&mut word).map_err(|e| error(format!("cannot read dimension {i} of the idx header: {e}")))?;
        hasher.update(word);
        let dim = u32::from_be_bytes(word);
        if let Some(want) = expected.and_then(|e| e[i]).filter(|&want| want != dim) {
            return Err(error(format!("dimension {i} is {dim}, expected {want}")));
        }
        dims.push(dim);
    }
    let len = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))
        .filter(|&len| len <= MAX_PAYLOAD)
        .ok_or_else(|| error(format!("the header's dimensions {dims:?} describe more than {MAX_PAYLOAD} bytes")))?;
    let mut payload = Vec::new();
    reader.by_ref().take(len + 1).read_to_end(&mut payload).map_err(|e| error(format!("cannot read the data: {e}")))?;
    match (payload.len() as u64).cmp(&len) {
        std::cmp::Ordering::Less => Err(error(format!("holds {} bytes of data, its header says {len}", payload.len()))),
        std::cmp::Ordering::Greater => Err(error(format!("holds more data than the {len} bytes its header says"))),
        std::cmp::Ordering::Equal => {
            hasher.update(&payload);
            let sha256 = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
            Ok(Idx { dims, payload, sha256 })
        }
    }
}

/// SHA-256 of the idx content of the file at `path` (decompressed when gzipped).
pub fn idx_sha256(path: &Path) -> Result<String, DataError> {
    read_idx(path, None).map(|idx| idx.sha256)
}

/// The first `n` items of `dataset` (all of them when `n` is `None` or larger).
pub fn subset(dataset: &InMemDataset<FashionItem>, n: Option<usize>) -> InMemDataset<FashionItem> {
    let n = n.unwrap_or(usize::MAX).min(dataset.len());
    InMemDataset::new((0..n).filter_map(|i| dataset.get(i).ok()).collect())
}

/// A batch: normalized images `[B, 1, 28, 28]` and class indices.
#[derive(Clone, Debug)]
pub struct FashionBatch {
    /// Normalized images.
    pub images: Tensor<4>,
    /// Class indices.
    pub targets: Tensor<1, Int>,
}

/// Builds [`FashionBatch`]es. With augmentation, each image is shifted by up to 2 pixels and
/// mirrored at random; the draws come from a seed and a batch counter, so a run with one loader
/// worker sees the same augmented data for the same seed. Under an
/// [`EpochLoader`](burn_sam_sample::learner::EpochLoader) both restart at each epoch from a seed
/// of (seed, epoch), so a resumed run draws what the uninterrupted one drew.
#[derive(Clone, Debug, Default)]
pub struct FashionBatcher {
    augment: bool,
    seed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    batches: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl FashionBatcher {
    /// A batcher without augmentation (test data).
    pub fn plain() -> Self {
        Self::default()
    }

    /// A batcher with random shifts and flips drawn from `seed`.
    pub fn augmented(seed: u64) -> Self {
        Self { augment: true, seed: std::sync::Arc::new(seed.into()), batches: Default::default() }
    }
}

impl Batcher<FashionItem, FashionBatch> for FashionBatcher {
    fn batch(&self, items: Vec<FashionItem>, device: &Device) -> FashionBatch {
        use rand::{Rng, SeedableRng};
        let n = items.len();
        let batch = self.batches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let seed = self.seed.load(std::sync::atomic::Ordering::SeqCst);
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ batch.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut pixels = Vec::with_capacity(n * PIXELS);
        for item in &items {
            let image = if self.augment {
                shift_and_flip(&item.image, rng.random_range(-2..=2), rng.random_range(-2..=2), rng.random())
            } else {
                item.image.clone()
            };
            pixels.extend(image.into_iter().map(|p| (p as f32 / 255.0 - MEAN) / STD));
        }
        let labels: Vec<i64> = items.iter().map(|item| item.label as i64).collect();
        FashionBatch {
            images: Tensor::<1>::from_floats(pixels.as_slice(), device).reshape([n, 1, 28, 28]),
            targets: Tensor::<1, Int>::from_ints(labels.as_slice(), device),
        }
    }
}

impl burn_sam_sample::learner::EpochBatcher<FashionItem, FashionBatch> for FashionBatcher {
    fn start_epoch(&self, seed: u64) {
        self.seed.store(seed, std::sync::atomic::Ordering::SeqCst);
        self.batches.store(0, std::sync::atomic::Ordering::SeqCst);
    }
}

fn shift_and_flip(image: &[u8], dx: i32, dy: i32, flip: bool) -> Vec<u8> {
    let mut out = vec![0u8; PIXELS];
    for y in 0..28i32 {
        for x in 0..28i32 {
            let sx = if flip { 27 - x } else { x } - dx;
            let sy = y - dy;
            if (0..28).contains(&sx) && (0..28).contains(&sy) {
                out[(y * 28 + x) as usize] = image[(sy * 28 + sx) as usize];
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn idx(magic_rank: u8, dims: &[u32], payload: &[u8]) -> Vec<u8> {
        let mut bytes = vec![0, 0, 8, magic_rank];
        for d in dims {
            bytes.extend(d.to_be_bytes());
        }
        bytes.extend(payload);
        bytes
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    fn read(bytes: &[u8], expected: &[Option<u32>]) -> Result<(Vec<u32>, Vec<u8>), String> {
        let dir = std::env::temp_dir().join(format!("fashion-idx-test-{}-{:p}", std::process::id(), bytes));
        std::fs::write(&dir, bytes).unwrap();
        let result = read_idx(&dir, Some(expected)).map(|idx| (idx.dims, idx.payload)).map_err(|e| e.to_string());
        let _ = std::fs::remove_file(&dir);
        result
    }

    #[test]
    fn idx_headers_are_checked_before_the_body() {
        let good = idx(3, &[2, 28, 28], &[7; 2 * 784]);
        assert_eq!(read(&good, &[None, Some(28), Some(28)]).unwrap().0, vec![2, 28, 28]);
        assert_eq!(read(&gzip(&good), &[None, Some(28), Some(28)]).unwrap().1.len(), 2 * 784);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (idx(1, &[2], &[0, 1]), "rank 3"),
            (idx(3, &[2, 28, 27], &[0; 2 * 28 * 27]), "dimension 2 is 27"),
            (idx(3, &[2, 28, 28], &[0; 100]), "holds 100 bytes"),
            (idx(3, &[2, 28, 28], &[0; 2 * 784 + 1]), "more data"),
            (vec![0, 0], "header"),
            (idx(3, &[u32::MAX, 28, 28], &[]), "describe more than"),
        ];
        for (bytes, needle) in cases {
            let err = read(&bytes, &[None, Some(28), Some(28)]).unwrap_err();
            assert!(err.contains(needle), "{err} should say {needle}");
        }
    }

    #[test]
    fn a_gzip_bomb_is_refused_without_inflating_it() {
        // The header announces one image; the stream goes on for 64 MiB of zeros.
        let mut bytes = idx(3, &[1, 28, 28], &[]);
        bytes.resize(bytes.len() + (64 << 20), 0);
        let err = read(&gzip(&bytes), &[None, Some(28), Some(28)]).unwrap_err();
        assert!(err.contains("more data"), "{err}");
    }
}

#[cfg(test)]
mod named_folder_tests {
    use super::*;

    fn message(dir: &Path) -> String {
        match FashionMnist::load(Some(dir), Fetch::Offline) {
            Ok(_) => panic!("{} loaded", dir.display()),
            Err(err) => err.to_string(),
        }
    }

    #[test]
    fn a_named_folder_that_cannot_serve_is_an_error_not_a_fallback() {
        let root = std::env::temp_dir().join(format!("fashion-named-{}", std::process::id()));
        let empty = root.join("empty");
        std::fs::create_dir_all(&empty).unwrap();
        let file = root.join("file");
        std::fs::write(&file, b"x").unwrap();
        let partial = root.join("partial");
        std::fs::create_dir_all(&partial).unwrap();
        for name in &FILES[..3] {
            std::fs::write(partial.join(name), b"").unwrap();
        }
        assert!(message(&root.join("missing")).contains("does not exist"));
        assert!(message(&file).contains("is not a folder"));
        let all = message(&empty);
        assert!(FILES.iter().all(|name| all.contains(name)), "{all}");
        let one = message(&partial);
        assert!(one.contains("which lacks t10k-labels-idx1-ubyte[.gz].\n"), "{one}");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn labels_outside_the_classes_are_refused() {
        let dir = std::env::temp_dir().join(format!("fashion-labels-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let images = |n: u32| {
            let mut bytes = vec![0, 0, 8, 3];
            for d in [n, 28, 28] {
                bytes.extend(d.to_be_bytes());
            }
            bytes.resize(16 + n as usize * PIXELS, 0);
            bytes
        };
        let labels = |values: &[u8]| {
            let mut bytes = vec![0, 0, 8, 1];
            bytes.extend((values.len() as u32).to_be_bytes());
            bytes.extend(values);
            bytes
        };
        std::fs::write(dir.join(FILES[0]), images(2)).unwrap();
        std::fs::write(dir.join(FILES[1]), labels(&[3, 10])).unwrap();
        std::fs::write(dir.join(FILES[2]), images(1)).unwrap();
        std::fs::write(dir.join(FILES[3]), labels(&[1])).unwrap();
        // Unverified reading (a synthetic folder has other checksums) checks labels and counts.
        let unverified = |dir: &Path| match FashionMnist::read_dir(dir.to_path_buf(), None) {
            Ok(data) => Ok(data.train.len()),
            Err(err) => Err(err.to_string()),
        };
        let err = unverified(&dir).unwrap_err();
        assert!(err.contains("label 10 of item 1"), "{err}");
        std::fs::write(dir.join(FILES[1]), labels(&[3])).unwrap();
        let err = unverified(&dir).unwrap_err();
        assert!(err.contains("2 images but"), "{err}");
        std::fs::write(dir.join(FILES[1]), labels(&[3, 9])).unwrap();
        assert_eq!(unverified(&dir), Ok(2));
        // The public loader verifies: these are not Fashion-MNIST's files, which its pinned
        // checksums fix down to the item count, checked before anything is inflated.
        let err = message(&dir);
        assert!(err.contains("dimension 0 is 2, expected 60000") && err.contains(FILES[0]), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
