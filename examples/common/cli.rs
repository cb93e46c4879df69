//! Command-line options shared by the Fashion-MNIST examples.

use std::path::PathBuf;

use crate::methods::{scaled_warmup, Method};

/// What to train and how: flattened into each example's own options.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// The method.
    #[arg(long, value_enum, default_value = "vsam")]
    pub method: Method,
    /// Training epochs.
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    pub batch_size: usize,
    /// Peak learning rate (cosine decay to 0 over the run).
    #[arg(long, default_value_t = 0.05)]
    pub lr: f64,
    /// SAM radius ρ (default: 0.05; ASAM: 0.5).
    #[arg(long)]
    pub rho: Option<f64>,
    /// Seed of the model, the data order, the augmentation and the gate.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Folder with the four Fashion-MNIST files (searched before $FASHION_MNIST_DIR,
    /// /usr/share/datasets/fashion-mnist and Burn's cache).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Train on the first N training images only (quick runs).
    #[arg(long)]
    pub train_subset: Option<usize>,
    /// vSAM's all-SAM warm-up in steps (default: 1.5 % of the run, as the authors' 3 of 200
    /// epochs, and at least one window of 50 steps).
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Backend: ndarray, flex, wgpu or cuda (default: the most capable one compiled in).
    #[arg(long)]
    pub backend: Option<String>,
}

impl TrainArgs {
    /// vSAM's warm-up for a run of `total_steps` steps.
    pub fn warmup(&self, total_steps: usize) -> usize {
        self.warmup_steps.unwrap_or_else(|| scaled_warmup(total_steps))
    }
}
