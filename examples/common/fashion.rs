//! Fashion-MNIST from disk as a Burn `Dataset`, with a batcher.
//!
//! The four idx files (`train-images-idx3-ubyte`, `train-labels-idx1-ubyte`, `t10k-…`, gzipped or
//! not) are looked for, in order, in `--data-dir`, `$FASHION_MNIST_DIR`,
//! `/usr/share/datasets/fashion-mnist` (Debian's `dataset-fashion-mnist` package) and Burn's cache
//! (`<cache>/burn-dataset/fashion-mnist`). With the `download` feature, missing files are fetched
//! from the dataset's canonical source into Burn's cache with Burn's own downloader.

use std::io::Read;
use std::path::{Path, PathBuf};

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::{Dataset, InMemDataset};
use burn::prelude::*;

/// Mean and standard deviation of Fashion-MNIST pixels (scaled to [0, 1]).
const MEAN: f32 = 0.2860;
const STD: f32 = 0.3530;
const PIXELS: usize = 28 * 28;
const FILES: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];
/// Where the dataset's authors publish the files.
#[cfg_attr(not(feature = "download"), allow(dead_code))]
const SOURCE: &str = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/";

/// One image (28×28 grey, row-major) and its class 0..=9.
#[derive(Clone, Debug)]
pub struct FashionItem {
    /// Pixels 0..=255.
    pub image: Vec<u8>,
    /// Class index.
    pub label: u8,
}

/// The class names, by index.
pub const CLASSES: [&str; 10] = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
];

/// The training and test splits.
pub struct FashionMnist {
    /// 60,000 training images.
    pub train: InMemDataset<FashionItem>,
    /// 10,000 test images.
    pub test: InMemDataset<FashionItem>,
    /// The folder the files were read from.
    pub source: PathBuf,
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

/// The folders searched, in order.
pub fn candidate_dirs(data_dir: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    dirs.extend(data_dir.map(Path::to_path_buf));
    dirs.extend(std::env::var_os("FASHION_MNIST_DIR").map(PathBuf::from));
    dirs.push(PathBuf::from("/usr/share/datasets/fashion-mnist"));
    dirs.extend(burn_cache_dir());
    dirs
}

fn file_in(dir: &Path, name: &str) -> Option<PathBuf> {
    [dir.join(format!("{name}.gz")), dir.join(name)].into_iter().find(|path| path.is_file())
}

fn complete(dir: &Path) -> bool {
    FILES.iter().all(|name| file_in(dir, name).is_some())
}

impl FashionMnist {
    /// Finds and reads the dataset; `data_dir` (if given) is searched first.
    pub fn load(data_dir: Option<&Path>) -> Result<Self, DataError> {
        let candidates = candidate_dirs(data_dir);
        let found = candidates.iter().find(|dir| complete(dir)).cloned();
        let dir = match found {
            Some(dir) => dir,
            None => download().map_err(|reason| DataError(not_found_message(&candidates, &reason)))?,
        };
        let read = |images: &str, labels: &str| -> Result<InMemDataset<FashionItem>, DataError> {
            let images = read_idx(&file_in(&dir, images).expect("checked"), 3)?;
            let labels = read_idx(&file_in(&dir, labels).expect("checked"), 1)?;
            if images.len() != labels.len() * PIXELS {
                return Err(DataError(format!(
                    "{}: {} labels for {} pixels",
                    dir.display(),
                    labels.len(),
                    images.len()
                )));
            }
            let items = images
                .chunks_exact(PIXELS)
                .zip(labels)
                .map(|(image, label)| FashionItem {
                    image: image.to_vec(),
                    label,
                })
                .collect();
            Ok(InMemDataset::new(items))
        };
        Ok(Self {
            train: read(FILES[0], FILES[1])?,
            test: read(FILES[2], FILES[3])?,
            source: dir,
        })
    }
}

fn not_found_message(candidates: &[PathBuf], download: &str) -> String {
    let searched: Vec<String> = candidates.iter().map(|dir| format!("  - {}", dir.display())).collect();
    format!(
        "Fashion-MNIST was not found. Searched, in order:\n{}\nEach folder must hold the four files \
         {} (gzipped or not).\nTo get them:\n  - Debian/Ubuntu: `sudo apt-get install dataset-fashion-mnist` \
         (installs /usr/share/datasets/fashion-mnist);\n  - or download them from \
         https://github.com/zalandoresearch/fashion-mnist and pass `--data-dir <folder>` or set \
         FASHION_MNIST_DIR;\n  - or build with `--features download` on a machine with internet access.\n\
         Download: {download}",
        searched.join("\n"),
        FILES.join(", ")
    )
}

#[cfg(not(feature = "download"))]
fn download() -> Result<PathBuf, String> {
    Err("not attempted (built without the `download` feature)".into())
}

#[cfg(feature = "download")]
fn download() -> Result<PathBuf, String> {
    use burn::data::network::downloader::download_file_as_bytes;
    let dir = burn_cache_dir().ok_or("no cache folder on this system")?;
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for name in FILES {
        let target = dir.join(format!("{name}.gz"));
        if target.is_file() {
            continue;
        }
        let url = format!("{SOURCE}{name}.gz");
        // Burn's downloader panics when the network fails; turn that into an error.
        let bytes = std::panic::catch_unwind(|| download_file_as_bytes(&url, name))
            .map_err(|_| format!("fetching {url} failed (no network?)"))?;
        std::fs::write(&target, bytes).map_err(|e| format!("{}: {e}", target.display()))?;
    }
    Ok(dir)
}

/// Reads an idx file (optionally gzipped) of the given rank; returns its payload.
fn read_idx(path: &Path, rank: u8) -> Result<Vec<u8>, DataError> {
    let error = |what: String| DataError(format!("{}: {what}", path.display()));
    let raw = std::fs::read(path).map_err(|e| error(e.to_string()))?;
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| error(format!("not a valid gzip file: {e}")))?;
        out
    } else {
        raw
    };
    let header = 4 + 4 * rank as usize;
    if bytes.len() < header || bytes[..3] != [0, 0, 8] || bytes[3] != rank {
        return Err(error(format!("not an idx file of rank {rank} (unsigned bytes)")));
    }
    let dims: Vec<usize> = (0..rank as usize)
        .map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().expect("4 bytes")) as usize)
        .collect();
    let len: usize = dims.iter().product();
    if bytes.len() != header + len {
        return Err(error(format!("holds {} bytes of data, its header says {len}", bytes.len() - header)));
    }
    Ok(bytes[header..].to_vec())
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
/// mirrored at random; the draws come from `seed` and a batch counter, so a run with one loader
/// worker sees the same augmented data for the same seed.
#[derive(Clone, Debug, Default)]
pub struct FashionBatcher {
    augment: bool,
    seed: u64,
    batches: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl FashionBatcher {
    /// A batcher without augmentation (test data).
    pub fn plain() -> Self {
        Self::default()
    }

    /// A batcher with random shifts and flips drawn from `seed`.
    pub fn augmented(seed: u64) -> Self {
        Self {
            augment: true,
            seed,
            batches: Default::default(),
        }
    }
}

impl Batcher<FashionItem, FashionBatch> for FashionBatcher {
    fn batch(&self, items: Vec<FashionItem>, device: &Device) -> FashionBatch {
        use rand::{Rng, SeedableRng};
        let n = items.len();
        let batch = self.batches.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed ^ batch.wrapping_mul(0x9e37_79b9_7f4a_7c15));
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
