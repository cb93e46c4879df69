//! Side-by-side benchmark of the SAM family on Fashion-MNIST, under a protocol a skeptical reader
//! can check: a validation split (same label noise as training) on which the learning rate, ρ and
//! the reported epoch are chosen, paired seeds, intervals on every comparison, a cost–accuracy
//! frontier, and resumable runs.
//!
//! Required features: one backend, `ndarray` or `flex` (both on by default), `wgpu` or `cuda`;
//! `--backend` picks among those compiled in.
//!
//! ```text
//! cargo run --release -p burn-sam-sample-examples --example benchmark -- --quick
//! cargo run --release -p burn-sam-sample-examples --example benchmark -- run --seeds 10 --out docs/benchmarks.md
//! cargo run --release -p burn-sam-sample-examples --example benchmark -- report --seeds 10 --out docs/benchmarks.md
//! ```
//!
//! Each finished run is appended as one JSON line to the results file (`<stem>/runs.jsonl`);
//! the same command run again skips the runs already there, so a benchmark can be interrupted,
//! resumed, or spread over machines. A run is identified by everything that can change its
//! result (the setting, the method and its parameters, the learning rate, ρ, the seed, and the
//! commit of the code): a changed option or commit is a different run, never mixed in. `report`
//! rebuilds the tables, plots and `summary.json` from the results file alone; `report --runs-at
//! A,B` pools the runs of earlier commits (seeds run at A and further seeds run at B), and its
//! header counts the runs on file at both and how many of them gave the same result.
//!
//! Without `--out` the report goes to `target/benchmark/benchmarks.md`; `--quick` keeps any
//! `--epochs`, `--seeds` and subset sizes given with it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::{Dataset, InMemDataset};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{decay::WeightDecayConfig, momentum::MomentumConfig, SgdConfig};
use burn::prelude::*;
use burn_sam_sample::policy::{GatePolicy, TrendConfig};
use burn_sam_sample::reuse::{CachePrecision, ReusePolicy};
use burn_sam_sample::{backend, SamConfig, SamOptimizer};
use burn_sam_sample_examples::cli::{parse, Precision};
use burn_sam_sample_examples::evaluate;
use burn_sam_sample_examples::fashion::{FashionBatch, FashionBatcher, FashionItem, FashionMnist, Fetch};
use burn_sam_sample_examples::methods::{cosine_lr, scaled_warmup};
use burn_sam_sample_examples::model::{Cnn, CnnConfig};
use burn_sam_sample_examples::stats::{fieller, log_ratio_interval, mean_sd, t_interval, Interval, Level, Ratio};
use clap::Parser;
use plotters::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// What the command does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum StepKind {
    /// Run what is missing, then write the report.
    All,
    /// Run what is missing; no report.
    Run,
    /// Write the report from the results file alone; runs not there are listed as missing.
    Report,
}

/// Benchmark the SAM family on Fashion-MNIST.
#[derive(Parser, Debug, Clone)]
struct Args {
    /// `all` (run what is missing, then report), `run` or `report`.
    #[arg(value_enum, default_value = "all")]
    step: StepKind,
    /// Epochs per run (default: 6; 1 with --quick).
    #[arg(long, value_parser = parse::positive_usize)]
    epochs: Option<usize>,
    /// Evaluation seeds per method: first-seed, first-seed + 1, … (default: 3; 1 with --quick).
    #[arg(long, value_parser = parse::positive_usize)]
    seeds: Option<usize>,
    /// The first evaluation seed; another range reruns the comparison on seeds the report did not use.
    #[arg(long, default_value_t = 0)]
    first_seed: u64,
    /// Seeds of each selection run (seeds 1000, 1001, …, apart from the evaluation seeds).
    #[arg(long, default_value_t = 2, value_parser = parse::positive_usize)]
    select_seeds: usize,
    /// Peak learning rates SGD's is chosen from on validation accuracy; every method uses it.
    #[arg(long, value_delimiter = ',', default_value = "0.02,0.05,0.1", value_parser = parse::positive_f64)]
    lr_grid: Vec<f64>,
    /// SAM radii SAM's ρ is chosen from (at the chosen learning rate); every method but ASAM uses it.
    #[arg(long, value_delimiter = ',', default_value = "0.02,0.05,0.1,0.2", value_parser = parse::positive_f64)]
    rho_grid: Vec<f64>,
    /// ASAM radii ASAM's ρ is chosen from (its scale-invariant ascent wants about ten times SAM's).
    #[arg(long, value_delimiter = ',', default_value = "0.2,0.5,1.0", value_parser = parse::positive_f64)]
    asam_rho_grid: Vec<f64>,
    /// Train on the first N images (default: all 60,000 but the validation images).
    #[arg(long, value_parser = parse::positive_usize)]
    train_subset: Option<usize>,
    /// Validation images, the last N of the training file, never trained on (label noise as in training).
    #[arg(long, default_value_t = 1000, value_parser = parse::positive_usize)]
    validation: usize,
    /// Evaluate on the first N test images (default: all 10,000).
    #[arg(long, value_parser = parse::positive_usize)]
    test_subset: Option<usize>,
    /// Batch size.
    #[arg(long, default_value_t = 128, value_parser = parse::positive_usize)]
    batch_size: usize,
    /// Learning-rate schedule: a per-step cosine decay from the peak to 0, or constant.
    #[arg(long, value_enum, default_value = "cosine")]
    schedule: Schedule,
    /// Coupled L2 weight decay of the base SGD.
    #[arg(long, default_value_t = 5e-4, value_parser = parse::non_negative_f64)]
    weight_decay: f64,
    /// Random shifts (±2 px) and horizontal flips of the training images: true or false.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    augment: bool,
    /// The matched cost of look-sam (SAM every round(1/budget) steps) and rst (probability budget).
    #[arg(long, default_value_t = 0.2, value_parser = parse::fraction)]
    budget: f64,
    /// SAM rate of `trend-flat`, the ablation of vsam-trend (its signal off: the same warm-up
    /// and even placement at this rate; set it to vsam-trend's measured mean rate).
    #[arg(long, default_value_t = 0.2, value_parser = parse::fraction)]
    flat_rate: f64,
    /// Label-noise fractions to run (0 = clean); each is a full setting. Flipped labels are drawn
    /// per seed, uniformly among the other classes, in the training and the validation images.
    #[arg(long, value_delimiter = ',', default_value = "0", value_parser = parse::noise)]
    label_noise: Vec<f64>,
    /// Methods to run (default: all).
    #[arg(long, value_delimiter = ',')]
    methods: Option<Vec<String>>,
    /// Methods for the clean setting (label noise 0), when it is run beside noisy ones
    /// (default: the same as --methods).
    #[arg(long, value_delimiter = ',')]
    control_methods: Option<Vec<String>>,
    /// The variant whose goal the report checks.
    #[arg(long, default_value = "vsam-trend")]
    variant: String,
    /// Flipped training images whose predictions are tracked each epoch (memorization).
    #[arg(long, default_value_t = 1000, value_parser = parse::positive_usize)]
    memorization_images: usize,
    /// A preset of a few minutes: 2k training, 200 validation and 1k test images, 1 epoch,
    /// 1 seed, two-value grids, unless given otherwise; checks that the tables are complete.
    #[arg(long)]
    quick: bool,
    /// Folder with the Fashion-MNIST files (an error when they are not there).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Never fetch the data over the network (also: FASHION_MNIST_OFFLINE=1).
    #[arg(long)]
    offline: bool,
    /// Backend: ndarray, flex, wgpu or cuda.
    #[arg(long)]
    backend: Option<String>,
    /// Float dtype of the model, its activations and gradients (the device's default float,
    /// configured before any tensor exists); bf16 and f16 need a backend that computes in them
    /// (flex, or a GPU that does).
    #[arg(long, value_enum, default_value = "f32")]
    precision: Precision,
    /// Storage of the SAM methods' reuse cache: `params` (the parameters' dtype), `f32` or `bf16`.
    #[arg(long, default_value = "params", value_parser = parse::cache_precision)]
    cache_precision: CachePrecision,
    /// The markdown report; plots, the results file and the summary go next to it in `<stem>/`.
    /// The committed report is `docs/benchmarks.md`, written only when named here.
    #[arg(long, default_value = "target/benchmark/benchmarks.md")]
    out: PathBuf,
    /// The results file, one JSON line per finished run (default: `<stem>/runs.jsonl`).
    #[arg(long)]
    results: Option<PathBuf>,
    /// Channels of the CNN's first convolution.
    #[arg(long, default_value_t = 8, value_parser = parse::positive_usize)]
    channels: usize,
    /// Width of the CNN's hidden layer.
    #[arg(long, default_value_t = 64, value_parser = parse::positive_usize)]
    hidden: usize,
    /// A line describing the machine, for the report.
    #[arg(long, default_value = "unspecified machine")]
    machine: String,
    /// `report` only: report the runs recorded at these earlier commits (as the results file
    /// spells them, comma-separated) instead of the current code's; the report's header names
    /// them. With several, a run is taken from the first commit that has it, and the header counts
    /// the runs on file at more than one of them and how many of those are identical (the pooling
    /// is sound only when they all are). Without it a report uses only runs of the current code.
    #[arg(long, value_parser = commit_name, value_delimiter = ',')]
    runs_at: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Schedule {
    Cosine,
    Constant,
}

impl Args {
    /// Epochs per run: as given, else 6.
    fn epochs(&self) -> usize {
        self.epochs.unwrap_or(6)
    }

    /// Seeds per method: as given, else 3.
    fn seeds(&self) -> usize {
        self.seeds.unwrap_or(3)
    }

    fn eval_seeds(&self) -> Vec<u64> {
        (0..self.seeds() as u64).map(|i| self.first_seed.saturating_add(i)).collect()
    }

    fn results_path(&self) -> PathBuf {
        self.results.clone().unwrap_or_else(|| self.out.with_extension("").join("runs.jsonl"))
    }
}

/// First seed of the selection runs.
const SELECT_SEED: u64 = 1000;

/// How a method's configuration is built for one run.
#[derive(Clone, Debug, PartialEq)]
enum Recipe {
    Sgd,
    Sam,
    Asam,
    /// vSAM with the authors' gate: warm-up scaled to the run, or a fixed number of epochs.
    Vsam {
        fixed_warmup_epochs: Option<usize>,
        reuse: bool,
    },
    /// vSAM-trend at a base rate (`None`: its default) and elasticity (`None`: its default; 0 is
    /// the signal switched off).
    Trend {
        base_fraction: Option<f64>,
        elasticity: Option<f64>,
    },
    PeriodicReuse {
        k: usize,
    },
    LookSam {
        k: usize,
    },
    AeSam,
    Rst {
        p: f64,
    },
}

impl Recipe {
    /// Whether the method runs SAM's second pass at all (and so takes ρ).
    fn uses_rho(&self) -> bool {
        !matches!(self, Recipe::Sgd)
    }

    /// A fixed schedule with vSAM's reuse (or its end points, SGD and SAM): the curve that needs
    /// no signal.
    fn fixed_schedule(&self) -> bool {
        matches!(self, Recipe::Sgd | Recipe::Sam | Recipe::PeriodicReuse { .. })
    }
}

/// One method as run: its name in tables and its recipe.
#[derive(Clone, Debug)]
struct Variant {
    name: String,
    recipe: Recipe,
}

impl Variant {
    fn config(
        &self,
        total_steps: usize,
        steps_per_epoch: usize,
        rho: f64,
        seed: u64,
        cache: CachePrecision,
    ) -> SamConfig {
        let config = match &self.recipe {
            Recipe::Sgd => SamConfig::base_only(),
            Recipe::Sam => SamConfig::sam(),
            Recipe::Asam => SamConfig::asam(),
            Recipe::Vsam { fixed_warmup_epochs, reuse } => {
                let warmup = fixed_warmup_epochs.map_or(scaled_warmup(total_steps), |e| e * steps_per_epoch);
                let config = SamConfig::vsam(warmup);
                if *reuse {
                    config
                } else {
                    config.with_reuse(ReusePolicy::None)
                }
            }
            Recipe::Trend { base_fraction, elasticity } => {
                let mut trend = TrendConfig::new();
                if let Some(b) = base_fraction {
                    trend = trend.with_base_fraction(*b);
                }
                if let Some(e) = elasticity {
                    trend = trend.with_elasticity(*e);
                }
                SamConfig::vsam_trend().with_policy(GatePolicy::Trend(trend))
            }
            Recipe::PeriodicReuse { k } => SamConfig::periodic_reuse(*k),
            Recipe::LookSam { k } => SamConfig::look_sam(*k, 0.7),
            Recipe::AeSam => SamConfig::ae_sam(total_steps),
            Recipe::Rst { p } => SamConfig::rst(*p),
        };
        config.with_rho(rho).with_seed(seed).with_cache_precision(cache)
    }

    /// Whether the run records a per-window trace of its gate.
    fn traced(&self) -> bool {
        matches!(self.recipe, Recipe::Vsam { .. } | Recipe::Trend { .. })
    }
}

/// Every method, in table order.
fn all_variants(budget: f64, flat_rate: f64) -> Vec<Variant> {
    let k = ((1.0 / budget).round() as usize).max(1);
    let v = |name: &str, recipe| Variant { name: name.to_string(), recipe };
    let trend = |b: Option<f64>, e: Option<f64>| Recipe::Trend { base_fraction: b, elasticity: e };
    let mut all = vec![
        v("sgd", Recipe::Sgd),
        v("sam", Recipe::Sam),
        v("asam", Recipe::Asam),
        v("vsam", Recipe::Vsam { fixed_warmup_epochs: None, reuse: true }),
        v("vsam-3ep", Recipe::Vsam { fixed_warmup_epochs: Some(3), reuse: true }),
        v("vsam-noreuse", Recipe::Vsam { fixed_warmup_epochs: None, reuse: false }),
        v("vsam-trend", trend(None, None)),
        v("vsam-trend@0.075", trend(Some(0.075), None)),
        v("vsam-trend@0.3", trend(Some(0.3), None)),
        v("trend-flat", trend(Some(flat_rate), Some(0.0))),
    ];
    for k in [2, 3, 5, 10, 25] {
        all.push(v(&format!("periodic{k}-reuse"), Recipe::PeriodicReuse { k }));
    }
    all.push(v("look-sam", Recipe::LookSam { k }));
    all.push(v("ae-sam", Recipe::AeSam));
    all.push(v("rst", Recipe::Rst { p: budget }));
    all
}

fn select(all: &[Variant], names: &Option<Vec<String>>) -> Result<Vec<Variant>, String> {
    let Some(names) = names else { return Ok(all.to_vec()) };
    names
        .iter()
        .map(|name| {
            // The spellings of earlier reports (`docs/benchmarks.md` at 09fe4d2) still work.
            let name = match name.as_str() {
                "looksam" => "look-sam",
                "aesam" => "ae-sam",
                other => other,
            };
            all.iter().find(|v| v.name == name).cloned().ok_or_else(|| {
                let known: Vec<&str> = all.iter().map(|v| v.name.as_str()).collect();
                format!("unknown method `{name}`; known: {}", known.join(", "))
            })
        })
        .collect()
}

/// Everything about a setting that can change a run's result.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct SettingSpec {
    noise: f64,
    train_images: usize,
    validation_images: usize,
    test_images: usize,
    epochs: usize,
    batch_size: usize,
    schedule: Schedule,
    weight_decay: f64,
    augment: bool,
    channels: usize,
    hidden: usize,
    precision: String,
    cache_precision: String,
    backend: String,
}

/// Everything that can change one run's result; equal specs are the same run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct RunSpec {
    /// The last commit touching the code a run depends on ([`RUN_CODE`]; `+dirty` with
    /// uncommitted changes there).
    commit: String,
    setting: SettingSpec,
    method: String,
    /// The method's recipe with its parameters.
    recipe: String,
    lr: f64,
    /// ρ (0 for SGD, which has none).
    rho: f64,
    seed: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct EpochPoint {
    epoch: usize,
    train_seconds: f64,
    validation_accuracy: f64,
    test_accuracy: f64,
    /// Fraction of the tracked flipped training images predicted as their noisy label.
    memorized: Option<f64>,
    /// Fraction of the tracked flipped training images predicted as their true label.
    flipped_true: Option<f64>,
}

/// The gate over one window of `WINDOW` steps.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct WindowTrace {
    start_step: usize,
    sam_steps: usize,
    /// The gate's target SAM fraction at the window's end (vSAM: floor(s)/K; trend: its rate).
    target_fraction: Option<f64>,
    /// vSAM's quota s at the window's end.
    quota: Option<f64>,
    /// Mean ‖PSF‖/‖g‖ (last N tensors) over the window's SAM steps.
    psf_ratio: Option<f64>,
    /// vSAM's relative changes (m_r, m_v) at its last boundary.
    changes: Option<(f64, f64)>,
    /// The trend gate's level z.
    level: Option<f64>,
}

/// Steps per trace window: the authors' window length.
const WINDOW: usize = 50;

/// One finished run: a line of the results file.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct RunRecord {
    spec: RunSpec,
    /// `select` or `evaluate`: why the run was first made (a run serves both when its spec is asked again).
    stage: String,
    epochs: Vec<EpochPoint>,
    /// Optimizer steps only (forward, backward, SAM machinery, update), not evaluation.
    train_seconds: f64,
    steps: u64,
    passes: u64,
    sam_steps: u64,
    non_finite_steps: u64,
    /// The engine's cached bytes at the end (PSF cache; 0 for rules without one).
    cache_bytes: u64,
    /// Peak resident memory of the process during the run (peak reset before it; Linux only).
    peak_rss_mib: Option<f64>,
    windows: Vec<WindowTrace>,
}

/// A run whose validation and final test accuracy stay below this did not train (chance is 0.10).
const TRAINED: f64 = 0.2;

impl RunRecord {
    /// Whether `other` gave the same result: the same per-epoch validation and test accuracy,
    /// memorization and SAM-step count (times differ from run to run and are not compared).
    fn same_result(&self, other: &RunRecord) -> bool {
        let trace = |r: &RunRecord| -> Vec<(f64, f64, Option<f64>)> {
            r.epochs.iter().map(|e| (e.validation_accuracy, e.test_accuracy, e.memorized)).collect()
        };
        self.sam_steps == other.sam_steps && trace(self) == trace(other)
    }
    fn final_accuracy(&self) -> f64 {
        self.epochs.last().map_or(0.0, |e| e.test_accuracy)
    }
    /// The epoch with the best validation accuracy (ties: the earliest).
    fn selected_epoch(&self) -> Option<&EpochPoint> {
        self.epochs.iter().fold(None, |best: Option<&EpochPoint>, e| match best {
            Some(b) if b.validation_accuracy >= e.validation_accuracy => Some(b),
            _ => Some(e),
        })
    }
    /// Test accuracy at the validation-selected epoch.
    fn selected_accuracy(&self) -> f64 {
        self.selected_epoch().map_or(0.0, |e| e.test_accuracy)
    }
    /// Best validation accuracy: the selection score.
    fn validation_score(&self) -> f64 {
        self.selected_epoch().map_or(0.0, |e| e.validation_accuracy)
    }
    fn trained(&self) -> bool {
        self.final_accuracy() >= TRAINED && self.validation_score() >= TRAINED
    }
    fn sam_fraction(&self) -> f64 {
        self.sam_steps as f64 / self.steps.max(1) as f64
    }
}

/// The training set of one seed and setting, and which items had their label flipped.
struct NoisyTrain {
    data: InMemDataset<FashionItem>,
    /// Batches of flipped items with their noisy labels, and the true labels of the same items.
    flipped: Vec<(FashionBatch, Tensor<1, Int>)>,
}

/// Items with a fraction of the labels replaced by a uniformly drawn different class; the
/// replaced items (up to `tracked`) with their true labels.
fn flip_labels(
    items: &[FashionItem],
    fraction: f64,
    rng: &mut rand::rngs::StdRng,
    tracked: usize,
) -> (Vec<FashionItem>, Vec<(FashionItem, u8)>) {
    let mut flipped = Vec::new();
    let items = items
        .iter()
        .cloned()
        .map(|mut item| {
            if fraction > 0.0 && rng.random::<f64>() < fraction {
                let other = rng.random_range(0..9u8);
                let noisy = if other >= item.label { other + 1 } else { other };
                if flipped.len() < tracked {
                    flipped.push((FashionItem { image: item.image.clone(), label: noisy }, item.label));
                }
                item.label = noisy;
            }
            item
        })
        .collect();
    (items, flipped)
}

/// The training set of a seed, with its label noise.
fn noisy_train(items: &[FashionItem], fraction: f64, seed: u64, tracked: usize, device: &Device) -> NoisyTrain {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x6e_6f69_7365);
    let (items, flipped) = flip_labels(items, fraction, &mut rng, tracked);
    let flipped = flipped
        .chunks(500)
        .map(|chunk| {
            let batch = FashionBatcher::plain().batch(chunk.iter().map(|(item, _)| item.clone()).collect(), device);
            let truth: Vec<i64> = chunk.iter().map(|(_, label)| *label as i64).collect();
            (batch, Tensor::<1, Int>::from_ints(truth.as_slice(), device))
        })
        .collect();
    NoisyTrain { data: InMemDataset::new(items), flipped }
}

/// Evaluation batches of 500 images.
fn batches(items: &[FashionItem], device: &Device) -> Vec<FashionBatch> {
    items.chunks(500).map(|chunk| FashionBatcher::plain().batch(chunk.to_vec(), device)).collect()
}

/// The validation set of a seed: the same noise process as training, its own draw.
fn noisy_validation(items: &[FashionItem], fraction: f64, seed: u64, device: &Device) -> Vec<FashionBatch> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x0076_616c_6964);
    let (items, _) = flip_labels(items, fraction, &mut rng, 0);
    batches(&items, device)
}

/// (memorized, true) fractions over the flipped items; `None` without flipped items.
fn memorization(model: &Cnn, flipped: &[(FashionBatch, Tensor<1, Int>)]) -> (Option<f64>, Option<f64>) {
    if flipped.is_empty() {
        return (None, None);
    }
    let model = model.valid();
    let (mut noisy, mut truth, mut total) = (0i64, 0i64, 0usize);
    for (batch, labels) in flipped {
        let predicted = model.forward(batch.images.clone()).argmax(1).squeeze_dim::<1>(1);
        total += labels.dims()[0];
        noisy += predicted.clone().equal(batch.targets.clone()).int().sum().into_scalar::<i64>();
        truth += predicted.equal(labels.clone()).int().sum().into_scalar::<i64>();
    }
    (Some(noisy as f64 / total as f64), Some(truth as f64 / total as f64))
}

/// Accumulates one window of the gate's behaviour.
#[derive(Default)]
struct WindowAccumulator {
    start_step: usize,
    sam_steps: usize,
    ratio_sum: f64,
    ratios: usize,
}

impl WindowAccumulator {
    fn step(&mut self, sam: bool, ratio: Option<f64>) {
        if sam {
            self.sam_steps += 1;
            if let Some(r) = ratio {
                self.ratio_sum += r;
                self.ratios += 1;
            }
        }
    }

    fn close(&mut self, optim: &SamOptimizer, next_start: usize) -> WindowTrace {
        let gate = optim.gate();
        let (changes, level) = (gate.variation_changes(), gate.trend_level());
        let trace = WindowTrace {
            start_step: self.start_step,
            sam_steps: self.sam_steps,
            target_fraction: gate.target_fraction(),
            quota: gate.quota(),
            psf_ratio: (self.ratios > 0).then(|| self.ratio_sum / self.ratios as f64),
            changes,
            level,
        };
        *self = Self { start_step: next_start, ..Self::default() };
        trace
    }
}

/// Resets the process's peak resident memory (Linux: `clear_refs` 5); false where unsupported.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

/// The process's peak resident memory in MiB since the last reset (Linux: `VmHWM`).
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// The data of one (setting, seed): training with its noise, validation, test.
struct SeedData {
    train: NoisyTrain,
    validation: Vec<FashionBatch>,
}

/// The images every run reads.
struct Data {
    train: Vec<FashionItem>,
    validation: Vec<FashionItem>,
    test: Vec<FashionBatch>,
}

fn run_one(
    args: &Args,
    spec: &RunSpec,
    variant: &Variant,
    seed_data: &SeedData,
    data: &Data,
    device: &Device,
) -> Result<RunRecord, Box<dyn std::error::Error>> {
    let train = &seed_data.train.data;
    let seed = spec.seed;
    let train_device = device.clone().autodiff();
    let steps_per_epoch = train.len().div_ceil(args.batch_size);
    let total_steps = steps_per_epoch.saturating_mul(args.epochs());
    let config = variant.config(
        total_steps,
        steps_per_epoch,
        if spec.rho > 0.0 { spec.rho } else { 0.05 },
        seed,
        args.cache_precision,
    );
    let measured_memory = reset_peak_rss();
    train_device.seed(seed);
    let mut model = CnnConfig::new().with_channels(args.channels).with_hidden(args.hidden).init(&train_device);
    let weight_decay = (args.weight_decay > 0.0).then(|| WeightDecayConfig::new(args.weight_decay as f32));
    let base = SgdConfig::new()
        .with_momentum(Some(MomentumConfig::new().with_momentum(0.9).with_dampening(0.0)))
        .with_weight_decay(weight_decay)
        .init();
    let mut optim = config.init(base)?;
    let loss_fn = CrossEntropyLossConfig::new().init(&train_device);
    let batcher = if args.augment { FashionBatcher::augmented(seed) } else { FashionBatcher::plain() };
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let mut epochs = Vec::new();
    let mut windows = Vec::new();
    let mut window = WindowAccumulator::default();
    let mut train_seconds = 0.0;
    let mut step = 0usize;
    for epoch in 1..=args.epochs() {
        order.shuffle(&mut rng);
        for chunk in order.chunks(args.batch_size) {
            let items: Vec<FashionItem> = chunk.iter().filter_map(|&i| train.get(i).ok()).collect();
            let batch = batcher.batch(items, &train_device);
            let lr = match args.schedule {
                Schedule::Cosine => cosine_lr(spec.lr, step, total_steps),
                Schedule::Constant => spec.lr,
            };
            let start = Instant::now();
            let (next, out) = optim.step(lr, model, |m: &Cnn| {
                (loss_fn.forward(m.forward(batch.images.clone()), batch.targets.clone()), ())
            });
            model = next;
            // Wait for the device so that the step's time is the step's.
            let _ = train_device.sync();
            train_seconds += start.elapsed().as_secs_f64();
            step += 1;
            if variant.traced() {
                let t = out.telemetry;
                window.step(t.sam, t.psf_ratio);
                if step.is_multiple_of(WINDOW) {
                    windows.push(window.close(&optim, step));
                }
            }
        }
        let validation_accuracy = evaluate(&model, &seed_data.validation);
        let test_accuracy = evaluate(&model, &data.test);
        let (memorized, flipped_true) = memorization(&model, &seed_data.train.flipped);
        epochs.push(EpochPoint { epoch, train_seconds, validation_accuracy, test_accuracy, memorized, flipped_true });
    }
    let counters = optim.sync_telemetry();
    Ok(RunRecord {
        spec: spec.clone(),
        stage: String::new(),
        epochs,
        train_seconds,
        steps: counters.step,
        passes: counters.passes,
        sam_steps: counters.sam_steps,
        non_finite_steps: counters.non_finite_steps,
        cache_bytes: counters.cache_bytes,
        peak_rss_mib: if measured_memory { peak_rss_mib() } else { None },
        windows,
    })
}

/// Sizes of the Fashion-MNIST files.
const TRAIN_FILE_IMAGES: usize = 60_000;
const TEST_FILE_IMAGES: usize = 10_000;

/// A commit as the results file spells it: 4 to 40 hexadecimal digits, optionally `+dirty`.
fn commit_name(text: &str) -> Result<String, String> {
    let hex = text.strip_suffix("+dirty").unwrap_or(text);
    if (4..=40).contains(&hex.len()) && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(text.to_string())
    } else {
        Err(format!("{text:?} is not a commit (4 to 40 hexadecimal digits, optionally +dirty)"))
    }
}

/// The code a run's result depends on, as git pathspecs: the library, the benchmark and the
/// example modules it trains with, and the dependency versions. The report-only modules
/// (statistics, plotting) and the other examples are left out, so that a fix there does not
/// turn finished runs into different ones.
const RUN_CODE: &[&str] = &[
    "burn-sam-sample/src",
    "burn-sam-sample/Cargo.toml",
    "Cargo.toml",
    "Cargo.lock",
    "examples/Cargo.toml",
    "examples/benchmark.rs",
    "examples/common",
    ":(exclude)examples/common/stats.rs",
    ":(exclude)examples/common/renderer.rs",
];

/// The last commit touching [`RUN_CODE`], with `+dirty` when any of it has uncommitted
/// changes; `unknown` outside a git checkout.
fn code_commit() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(&root)
            .args(args)
            .args(RUN_CODE)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(commit) = git(&["log", "-1", "--format=%h", "--"]).filter(|c| !c.is_empty()) else {
        return "unknown".into();
    };
    match git(&["status", "--porcelain", "--"]) {
        Some(status) if status.is_empty() => commit,
        _ => format!("{commit}+dirty"),
    }
}

/// The runs already finished, read from the results file. A line that cannot be read is an
/// error naming it, except an unfinished last line (an interrupted write), which is ignored.
fn load_results(path: &Path) -> Result<(Vec<RunRecord>, bool), String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), true)),
        Err(e) => return Err(format!("cannot read the results file {}: {e}", path.display())),
    };
    let complete = text.is_empty() || text.ends_with('\n');
    let lines: Vec<&str> = text.lines().collect();
    let mut records = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<RunRecord>(line) {
            Ok(record) => records.push(record),
            Err(_) if i + 1 == lines.len() && !complete => {
                log::warn!("{}: ignoring the unfinished last line (an interrupted write)", path.display());
            }
            Err(e) => return Err(format!("{} line {}: not a run record: {e}", path.display(), i + 1)),
        }
    }
    Ok((records, complete))
}

/// A selection: one parameter, its grid and the validation score of each value.
#[derive(Clone, Debug, Serialize)]
struct Selection {
    /// What was chosen, e.g. `SGD peak learning rate`.
    what: String,
    method: String,
    /// (value, validation score per selection seed (%), failed seeds).
    candidates: Vec<(f64, Vec<f64>, Vec<u64>)>,
    chosen: f64,
}

/// What one setting produced: its choices and its evaluation runs per method.
struct SettingOutcome {
    setting: SettingSpec,
    name: String,
    lr: f64,
    rho: f64,
    asam_rho: f64,
    selections: Vec<Selection>,
    methods: Vec<Variant>,
    runs: BTreeMap<String, Vec<RunRecord>>,
    missing: usize,
}

struct Harness<'a> {
    args: &'a Args,
    /// The commit runs are made at, or the first of `--runs-at`.
    commit: String,
    /// The further commits of `--runs-at` whose runs a report may use.
    pooled: Vec<String>,
    /// Runs on file at more than one of the report's commits, and how many of them match the one
    /// used (per-epoch accuracies, memorization, SAM steps).
    on_several: usize,
    identical: usize,
    device: Device,
    backend: String,
    records: Vec<RunRecord>,
    file: PathBuf,
    /// Whether the results file ends with a newline (a new line can be appended as is).
    complete: bool,
    data: Option<Data>,
    seed_data: Option<((u64, u64), SeedData)>,
    started: Instant,
    ran: usize,
    reused: usize,
    missing: usize,
}

impl Harness<'_> {
    fn running(&self) -> bool {
        self.args.step != StepKind::Report
    }

    fn setting(&self, noise: f64) -> SettingSpec {
        let args = self.args;
        SettingSpec {
            noise,
            train_images: args.train_subset.unwrap_or(usize::MAX).min(TRAIN_FILE_IMAGES - args.validation),
            validation_images: args.validation,
            test_images: args.test_subset.unwrap_or(usize::MAX).min(TEST_FILE_IMAGES),
            epochs: args.epochs(),
            batch_size: args.batch_size,
            schedule: args.schedule,
            weight_decay: args.weight_decay,
            augment: args.augment,
            channels: args.channels,
            hidden: args.hidden,
            precision: args.precision.name().to_string(),
            cache_precision: args.cache_precision.to_string(),
            backend: self.backend.clone(),
        }
    }

    fn spec(&self, setting: &SettingSpec, variant: &Variant, lr: f64, rho: f64, seed: u64) -> RunSpec {
        RunSpec {
            commit: self.commit.clone(),
            setting: setting.clone(),
            method: variant.name.clone(),
            recipe: format!("{:?}", variant.recipe),
            lr,
            rho: if variant.recipe.uses_rho() { rho } else { 0.0 },
            seed,
        }
    }

    fn data(&mut self) -> Result<&Data, Box<dyn std::error::Error>> {
        if self.data.is_none() {
            let args = self.args;
            let files = FashionMnist::load(args.data_dir.as_deref(), Fetch::from_flag(args.offline))?;
            let take = |set: &InMemDataset<FashionItem>, range: std::ops::Range<usize>| -> Vec<FashionItem> {
                range.filter_map(|i| set.get(i).ok()).collect()
            };
            let setting = self.setting(0.0);
            let train_len = files.train.len();
            let validation = take(&files.train, train_len.saturating_sub(args.validation)..train_len);
            let train = take(&files.train, 0..setting.train_images.min(train_len.saturating_sub(args.validation)));
            let test_items = take(&files.test, 0..setting.test_images.min(files.test.len()));
            let test = batches(&test_items, &self.device);
            self.data = Some(Data { train, validation, test });
        }
        self.data.as_ref().ok_or_else(|| "the data did not load".into())
    }

    /// The finished run of `spec`: from the results file, or run now (and appended), or `None`
    /// when the report step finds it missing.
    fn get(
        &mut self,
        spec: RunSpec,
        variant: &Variant,
        stage: &str,
    ) -> Result<Option<RunRecord>, Box<dyn std::error::Error>> {
        let at = |commit: &String| RunSpec { commit: commit.clone(), ..spec.clone() };
        let mut candidates = std::iter::once(&self.commit).chain(&self.pooled).filter_map(|c| {
            let wanted = at(c);
            self.records.iter().find(|r| r.spec == wanted)
        });
        if let Some(found) = candidates.next().cloned() {
            let others: Vec<bool> = candidates.map(|r| r.same_result(&found)).collect();
            if !others.is_empty() {
                self.on_several += 1;
                self.identical += usize::from(others.iter().all(|&same| same));
            }
            self.reused += 1;
            return Ok(Some(found));
        }
        if !self.running() {
            self.missing += 1;
            return Ok(None);
        }
        self.data()?;
        let key = (spec.setting.noise.to_bits(), spec.seed);
        if self.seed_data.as_ref().is_none_or(|(k, _)| *k != key) {
            let Some(data) = self.data.as_ref() else { return Err("the data did not load".into()) };
            let seed_data = SeedData {
                train: noisy_train(
                    &data.train,
                    spec.setting.noise,
                    spec.seed,
                    self.args.memorization_images,
                    &self.device,
                ),
                validation: noisy_validation(&data.validation, spec.setting.noise, spec.seed, &self.device),
            };
            self.seed_data = Some((key, seed_data));
        }
        let (Some(data), Some((_, seed_data))) = (self.data.as_ref(), self.seed_data.as_ref()) else {
            return Err("the data did not load".into());
        };
        let mut record = run_one(self.args, &spec, variant, seed_data, data, &self.device)?;
        record.stage = stage.to_string();
        self.ran += 1;
        eprintln!(
            "[{:>6.0} s] {stage:<8} noise {:.2} seed {:<4} {:<17} lr {} ρ {}: selected-epoch test {:.2}% final {:.2}% train {:.1} s SAM fraction {:.3}{}",
            self.started.elapsed().as_secs_f64(),
            spec.setting.noise,
            spec.seed,
            spec.method,
            spec.lr,
            spec.rho,
            record.selected_accuracy() * 100.0,
            record.final_accuracy() * 100.0,
            record.train_seconds,
            record.sam_fraction(),
            if record.trained() { "" } else { "  DID NOT TRAIN" },
        );
        self.append(&record)?;
        self.records.push(record.clone());
        Ok(Some(record))
    }

    fn append(&mut self, record: &RunRecord) -> Result<(), Box<dyn std::error::Error>> {
        let mut line = if self.complete { String::new() } else { "\n".to_string() };
        line.push_str(&serde_json::to_string(record)?);
        line.push('\n');
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.file)
            .map_err(|e| format!("cannot open the results file {}: {e}", self.file.display()))?;
        file.write_all(line.as_bytes())
            .and_then(|()| file.flush())
            .map_err(|e| format!("cannot append to the results file {}: {e}", self.file.display()))?;
        self.complete = true;
        Ok(())
    }

    /// Chooses one parameter on validation accuracy: the grid value with the highest mean
    /// best-epoch validation accuracy over the selection seeds (ties: the earlier value in the
    /// grid). A one-value grid is taken as is, without runs. `None` when the report step lacks
    /// runs to decide.
    fn choose(
        &mut self,
        what: &str,
        variant: &Variant,
        grid: &[f64],
        spec_of: &dyn Fn(&Self, f64, u64) -> RunSpec,
    ) -> Result<Option<Selection>, Box<dyn std::error::Error>> {
        let mut candidates = Vec::new();
        let mut complete = true;
        if grid.len() > 1 {
            for &value in grid {
                let (mut scores, mut failed) = (Vec::new(), Vec::new());
                for i in 0..self.args.select_seeds as u64 {
                    let seed = SELECT_SEED + i;
                    match self.get(spec_of(self, value, seed), variant, "select")? {
                        Some(run) => {
                            scores.push(run.validation_score() * 100.0);
                            if !run.trained() {
                                failed.push(seed);
                            }
                        }
                        None => complete = false,
                    }
                }
                candidates.push((value, scores, failed));
            }
        }
        if !complete {
            return Ok(None);
        }
        let mut chosen = grid[0];
        let mut best = f64::NEG_INFINITY;
        for (value, scores, _) in &candidates {
            let score = mean_sd(scores).0;
            if score > best {
                best = score;
                chosen = *value;
            }
        }
        Ok(Some(Selection { what: what.to_string(), method: variant.name.clone(), candidates, chosen }))
    }

    fn run_setting(
        &mut self,
        noise: f64,
        methods: &[Variant],
        all: &[Variant],
    ) -> Result<SettingOutcome, Box<dyn std::error::Error>> {
        let setting = self.setting(noise);
        let find = |name: &str| all.iter().find(|v| v.name == name).cloned().ok_or_else(|| format!("no method {name}"));
        let (sgd, sam, asam) = (find("sgd")?, find("sam")?, find("asam")?);
        let args = self.args;
        let incomplete = || -> Box<dyn std::error::Error> {
            format!(
                "the selection runs for label noise {noise} are not all in the results file; run the benchmark (`all` or `run`) with the same options first"
            )
            .into()
        };
        let s = setting.clone();
        let lr_sel = self
            .choose("SGD's peak learning rate", &sgd, &args.lr_grid, &|h, lr, seed| h.spec(&s, &sgd, lr, 0.0, seed))?
            .ok_or_else(incomplete)?;
        let lr = lr_sel.chosen;
        let rho_sel = self
            .choose("SAM's ρ (every SAM method but ASAM)", &sam, &args.rho_grid, &|h, rho, seed| {
                h.spec(&s, &sam, lr, rho, seed)
            })?
            .ok_or_else(incomplete)?;
        let rho = rho_sel.chosen;
        let mut selections = vec![lr_sel, rho_sel];
        let mut asam_rho = args.asam_rho_grid[0];
        if methods.iter().any(|m| m.recipe == Recipe::Asam) {
            let sel = self
                .choose("ASAM's ρ", &asam, &args.asam_rho_grid, &|h, rho, seed| h.spec(&s, &asam, lr, rho, seed))?
                .ok_or_else(incomplete)?;
            asam_rho = sel.chosen;
            selections.push(sel);
        }
        let mut runs: BTreeMap<String, Vec<RunRecord>> = BTreeMap::new();
        let missing_before = self.missing;
        for seed in args.eval_seeds() {
            // The method order is shuffled per seed (its own stream), so that no method always
            // runs first or last in a process.
            let mut order = methods.to_vec();
            order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ 0x006f_7264_6572));
            for variant in &order {
                let r = if variant.recipe == Recipe::Asam { asam_rho } else { rho };
                let spec = self.spec(&setting, variant, lr, r, seed);
                if let Some(run) = self.get(spec, variant, "evaluate")? {
                    runs.entry(variant.name.clone()).or_default().push(run);
                }
            }
        }
        for list in runs.values_mut() {
            list.sort_by_key(|r| r.spec.seed);
        }
        Ok(SettingOutcome {
            name: setting_name(noise),
            setting,
            lr,
            rho,
            asam_rho,
            selections,
            methods: methods.to_vec(),
            runs,
            missing: self.missing - missing_before,
        })
    }
}

fn setting_name(noise: f64) -> String {
    format!("noise{:.0}", noise * 100.0)
}

/// One (setting, method) over its seeds; also a row of `summary.json`.
#[derive(Clone, Debug, Serialize)]
struct Summary {
    setting: String,
    method: String,
    seeds: usize,
    /// Seeds whose run did not train (accuracy below 20 %); they are in the means.
    failed_seeds: Vec<u64>,
    final_acc_mean: f64,
    final_acc_std: f64,
    /// Test accuracy at the validation-selected epoch (best validation accuracy, ties → earliest).
    selected_acc_mean: f64,
    selected_acc_std: f64,
    /// Paired difference to SGD of the validation-selected test accuracy (points, 90 % t-interval).
    selected_vs_sgd: Option<Interval>,
    /// Paired difference to SAM of the validation-selected test accuracy.
    selected_vs_sam: Option<Interval>,
    /// Paired difference to SGD of the final test accuracy.
    final_vs_sgd: Option<Interval>,
    /// Retention of SAM's gain at the validation-selected epoch, with Fieller's 90 % interval
    /// (`null` bounds: SAM's gain is not distinguishable from 0, the ratio is unbounded).
    retention_selected: Option<f64>,
    retention_selected_lo90: Option<f64>,
    retention_selected_hi90: Option<f64>,
    /// The same at the final epoch.
    retention: Option<f64>,
    retention_lo90: Option<f64>,
    retention_hi90: Option<f64>,
    passes_per_step: f64,
    sam_fraction: f64,
    train_seconds: f64,
    /// Geometric mean over seeds of the per-seed time ratio, with the 90 % interval of its log.
    time_vs_sgd: Option<f64>,
    time_vs_sgd_ci90: Option<(f64, f64)>,
    time_vs_sam: Option<f64>,
    time_vs_sam_ci90: Option<(f64, f64)>,
    peak_memory_mib: Option<f64>,
    cache_mib: f64,
    memorized_final: Option<f64>,
    lr: f64,
    rho: Option<f64>,
    /// The commits the method's runs ran at, in seed order of first appearance.
    commits: Vec<String>,
}

/// Values of `f` on the seeds that both lists have, in seed order.
fn paired(a: &[RunRecord], b: &[RunRecord], f: impl Fn(&RunRecord) -> f64) -> (Vec<f64>, Vec<f64>) {
    a.iter().filter_map(|x| b.iter().find(|y| y.spec.seed == x.spec.seed).map(|y| (f(x), f(y)))).unzip()
}

fn paired_diff(a: &[RunRecord], b: &[RunRecord], f: impl Fn(&RunRecord) -> f64) -> Option<Interval> {
    let (x, y) = paired(a, b, f);
    (!x.is_empty()).then(|| t_interval(&x.iter().zip(&y).map(|(x, y)| x - y).collect::<Vec<_>>(), Level::P90))
}

/// Retention of SAM's gain by `m` over the seeds all three share.
fn retention(m: &[RunRecord], sgd: &[RunRecord], sam: &[RunRecord], f: impl Fn(&RunRecord) -> f64) -> Option<Ratio> {
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for x in m {
        let seed = x.spec.seed;
        if let (Some(g), Some(s)) = (sgd.iter().find(|r| r.spec.seed == seed), sam.iter().find(|r| r.spec.seed == seed))
        {
            a.push(f(x) - f(g));
            b.push(f(s) - f(g));
        }
    }
    let r = fieller(&a, &b, Level::P90);
    (!a.is_empty() && mean_sd(&b).0 > 0.0).then_some(r)
}

fn time_ratio(m: &[RunRecord], reference: &[RunRecord]) -> Option<Interval> {
    let (x, y) = paired(m, reference, |r| r.train_seconds);
    let ratios: Vec<f64> = x.iter().zip(&y).map(|(x, y)| x / y).filter(|r| r.is_finite() && *r > 0.0).collect();
    (!ratios.is_empty()).then(|| log_ratio_interval(&ratios, Level::P90))
}

fn acc_selected(r: &RunRecord) -> f64 {
    r.selected_accuracy() * 100.0
}
fn acc_final(r: &RunRecord) -> f64 {
    r.final_accuracy() * 100.0
}

fn summarize(outcome: &SettingOutcome) -> Vec<Summary> {
    let empty = Vec::new();
    let sgd = outcome.runs.get("sgd").unwrap_or(&empty);
    let sam = outcome.runs.get("sam").unwrap_or(&empty);
    outcome
        .methods
        .iter()
        .filter_map(|variant| {
            let runs = outcome.runs.get(&variant.name)?;
            let finals: Vec<f64> = runs.iter().map(acc_final).collect();
            let selected: Vec<f64> = runs.iter().map(acc_selected).collect();
            let steps: u64 = runs.iter().map(|r| r.steps).sum();
            let memorized: Vec<f64> = runs.iter().filter_map(|r| r.epochs.last().and_then(|e| e.memorized)).collect();
            let peaks: Vec<f64> = runs.iter().filter_map(|r| r.peak_rss_mib).collect();
            let (final_acc_mean, final_acc_std) = mean_sd(&finals);
            let (selected_acc_mean, selected_acc_std) = mean_sd(&selected);
            let ret_sel = retention(runs, sgd, sam, acc_selected);
            let ret_fin = retention(runs, sgd, sam, acc_final);
            let (vs_sgd, vs_sam) = (time_ratio(runs, sgd), time_ratio(runs, sam));
            let bounds = |r: Option<Ratio>| r.and_then(|r| r.bounds);
            Some(Summary {
                setting: outcome.name.clone(),
                method: variant.name.clone(),
                seeds: runs.len(),
                failed_seeds: runs.iter().filter(|r| !r.trained()).map(|r| r.spec.seed).collect(),
                final_acc_mean,
                final_acc_std,
                selected_acc_mean,
                selected_acc_std,
                selected_vs_sgd: paired_diff(runs, sgd, acc_selected),
                selected_vs_sam: paired_diff(runs, sam, acc_selected),
                final_vs_sgd: paired_diff(runs, sgd, acc_final),
                retention_selected: ret_sel.map(|r| r.theta),
                retention_selected_lo90: bounds(ret_sel).map(|b| b.0),
                retention_selected_hi90: bounds(ret_sel).map(|b| b.1),
                retention: ret_fin.map(|r| r.theta),
                retention_lo90: bounds(ret_fin).map(|b| b.0),
                retention_hi90: bounds(ret_fin).map(|b| b.1),
                passes_per_step: runs.iter().map(|r| r.passes).sum::<u64>() as f64 / steps.max(1) as f64,
                sam_fraction: runs.iter().map(|r| r.sam_steps).sum::<u64>() as f64 / steps.max(1) as f64,
                train_seconds: runs.iter().map(|r| r.train_seconds).sum::<f64>() / runs.len() as f64,
                time_vs_sgd: vs_sgd.map(|i| i.mean),
                time_vs_sgd_ci90: vs_sgd.filter(|i| i.n > 1).map(|i| (i.lo, i.hi)),
                time_vs_sam: vs_sam.map(|i| i.mean),
                time_vs_sam_ci90: vs_sam.filter(|i| i.n > 1).map(|i| (i.lo, i.hi)),
                peak_memory_mib: (!peaks.is_empty()).then(|| mean_sd(&peaks).0),
                cache_mib: runs.iter().map(|r| r.cache_bytes as f64).fold(0.0, f64::max) / (1024.0 * 1024.0),
                memorized_final: (!memorized.is_empty()).then(|| mean_sd(&memorized).0 * 100.0),
                lr: outcome.lr,
                rho: variant.recipe.uses_rho().then(|| runs[0].spec.rho),
                commits: runs.iter().fold(Vec::new(), |mut seen, r| {
                    if !seen.contains(&r.spec.commit) {
                        seen.push(r.spec.commit.clone());
                    }
                    seen
                }),
            })
        })
        .collect()
}

fn fmt_interval(i: &Option<Interval>) -> String {
    match i {
        Some(i) if i.n > 1 => format!("{:+.2} [{:+.2}, {:+.2}]", i.mean, i.lo, i.hi),
        Some(i) => format!("{:+.2}", i.mean),
        None => "–".into(),
    }
}

fn fmt_retention(theta: Option<f64>, lo: Option<f64>, hi: Option<f64>) -> String {
    match (theta, lo, hi) {
        (Some(t), Some(lo), Some(hi)) => format!("{t:.2} [{lo:.2}, {hi:.2}]"),
        (Some(t), _, _) => format!("{t:.2} [unbounded]"),
        _ => "–".into(),
    }
}

fn fmt_ratio(mean: Option<f64>, ci: Option<(f64, f64)>) -> String {
    match (mean, ci) {
        (Some(m), Some((lo, hi))) => format!("{m:.2}× [{lo:.2}, {hi:.2}]"),
        (Some(m), None) => format!("{m:.2}×"),
        _ => "–".into(),
    }
}

fn table(rows: &[Summary]) -> String {
    let mut out = String::from(
        "| method | seeds | test acc. at the validation-selected epoch (%) | − SGD (pp, 90 % CI) | retention of SAM's gain, selected epoch [90 % CI] | final test acc. (%) | − SGD (pp) | retention, final epoch [90 % CI] | passes/step | time vs SGD [90 % CI] | time vs SAM | peak RSS (MiB) | PSF cache (MiB) | memorized flipped labels (%) | did not train |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {:.2} ± {:.2} | {} | {} | {:.2} ± {:.2} | {} | {} | {:.3} | {} | {} | {} | {:.2} | {} | {} |",
            r.method,
            r.seeds,
            r.selected_acc_mean,
            r.selected_acc_std,
            fmt_interval(&r.selected_vs_sgd),
            fmt_retention(r.retention_selected, r.retention_selected_lo90, r.retention_selected_hi90),
            r.final_acc_mean,
            r.final_acc_std,
            fmt_interval(&r.final_vs_sgd),
            fmt_retention(r.retention, r.retention_lo90, r.retention_hi90),
            r.passes_per_step,
            fmt_ratio(r.time_vs_sgd, r.time_vs_sgd_ci90),
            fmt_ratio(r.time_vs_sam, r.time_vs_sam_ci90),
            r.peak_memory_mib.map_or("–".into(), |m| format!("{m:.0}")),
            r.cache_mib,
            r.memorized_final.map_or("–".into(), |m| format!("{m:.1}")),
            if r.failed_seeds.is_empty() {
                "–".to_string()
            } else {
                format!("seed {}", r.failed_seeds.iter().map(u64::to_string).collect::<Vec<_>>().join(", "))
            },
        );
    }
    out
}

fn selection_table(selections: &[Selection]) -> String {
    let mut out = String::from(
        "| choice | method | value | validation accuracy at its best epoch, per selection seed (%) | mean | did not train | chosen |\n|---|---|---|---|---|---|---|\n",
    );
    for s in selections {
        if s.candidates.is_empty() {
            let _ =
                writeln!(out, "| {} | {} | {} | (one value given, no runs) | – | – | ✔ |", s.what, s.method, s.chosen);
        }
        for (value, scores, failed) in &s.candidates {
            let _ = writeln!(
                out,
                "| {} | {} | {value} | {} | {:.2} | {} | {} |",
                s.what,
                s.method,
                scores.iter().map(|v| format!("{v:.2}")).collect::<Vec<_>>().join(", "),
                mean_sd(scores).0,
                if failed.is_empty() { "–".into() } else { format!("seed {failed:?}") },
                if *value == s.chosen { "✔" } else { "" },
            );
        }
    }
    out
}

/// A method's place relative to the fixed-schedule curve at its own cost.
#[derive(Clone, Debug, Serialize)]
struct FrontierVerdict {
    method: String,
    /// Per-seed accuracy minus the fixed-schedule curve interpolated at the method's cost (pp).
    selected_vs_curve: Option<Interval>,
    final_vs_curve: Option<Interval>,
}

/// One point of `summary.json`'s `frontier`.
#[derive(Clone, Debug, Serialize)]
struct FrontierPoint {
    setting: String,
    method: String,
    time_vs_sam: f64,
    selected_acc_mean: f64,
    final_acc_mean: f64,
    fixed_schedule: bool,
}

/// Per seed, `method`'s value minus the fixed-schedule curve (linear between its two points
/// around the method's cost, ordered by time relative to SAM), over the seeds all three share;
/// `None` outside the curve's costs.
fn versus_curve(
    outcome: &SettingOutcome,
    rows: &[Summary],
    method: &str,
    f: fn(&RunRecord) -> f64,
) -> Option<Interval> {
    let row = rows.iter().find(|r| r.method == method)?;
    let cost = row.time_vs_sam?;
    let mut curve: Vec<(&str, f64)> = rows
        .iter()
        .filter(|r| outcome.methods.iter().any(|v| v.name == r.method && v.recipe.fixed_schedule()))
        .filter_map(|r| r.time_vs_sam.map(|t| (r.method.as_str(), t)))
        .collect();
    curve.sort_by(|a, b| a.1.total_cmp(&b.1));
    let upper = curve.iter().position(|p| p.1 >= cost)?;
    let (hi_name, hi_cost) = curve[upper];
    let (lo_name, lo_cost) = if upper == 0 { curve[0] } else { curve[upper - 1] };
    let w = if hi_cost > lo_cost { (cost - lo_cost) / (hi_cost - lo_cost) } else { 1.0 };
    let (runs, lo_runs, hi_runs) = (outcome.runs.get(method)?, outcome.runs.get(lo_name)?, outcome.runs.get(hi_name)?);
    if upper == 0 && cost < lo_cost {
        return None;
    }
    let diffs: Vec<f64> = runs
        .iter()
        .filter_map(|r| {
            let lo = lo_runs.iter().find(|x| x.spec.seed == r.spec.seed)?;
            let hi = hi_runs.iter().find(|x| x.spec.seed == r.spec.seed)?;
            Some(f(r) - ((1.0 - w) * f(lo) + w * f(hi)))
        })
        .collect();
    (!diffs.is_empty()).then(|| t_interval(&diffs, Level::P90))
}

fn frontier(outcome: &SettingOutcome, rows: &[Summary]) -> (Vec<FrontierPoint>, Vec<FrontierVerdict>) {
    let fixed = |name: &str| outcome.methods.iter().any(|v| v.name == name && v.recipe.fixed_schedule());
    let points = rows
        .iter()
        .filter_map(|r| {
            Some(FrontierPoint {
                setting: outcome.name.clone(),
                method: r.method.clone(),
                time_vs_sam: r.time_vs_sam?,
                selected_acc_mean: r.selected_acc_mean,
                final_acc_mean: r.final_acc_mean,
                fixed_schedule: fixed(&r.method),
            })
        })
        .collect();
    let verdicts = rows
        .iter()
        .filter(|r| !fixed(&r.method))
        .map(|r| FrontierVerdict {
            method: r.method.clone(),
            selected_vs_curve: versus_curve(outcome, rows, &r.method, acc_selected),
            final_vs_curve: versus_curve(outcome, rows, &r.method, acc_final),
        })
        .collect();
    (points, verdicts)
}

fn verdict_word(i: &Option<Interval>) -> &'static str {
    match i.as_ref().filter(|i| i.n > 1).map(|i| i.versus(0.0)) {
        Some(Some(true)) => "above",
        Some(Some(false)) => "below",
        Some(None) => "not distinguishable",
        None => "–",
    }
}

fn frontier_table(verdicts: &[FrontierVerdict]) -> String {
    let mut out = String::from(
        "| method | − fixed-schedule curve at its cost, selected epoch (pp, 90 % CI) | | − curve, final epoch (pp) | |\n|---|---|---|---|---|\n",
    );
    for v in verdicts {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            v.method,
            v.selected_vs_curve.as_ref().map_or("outside the curve's costs".into(), |i| fmt_interval(&Some(*i))),
            verdict_word(&v.selected_vs_curve),
            v.final_vs_curve.as_ref().map_or("outside the curve's costs".into(), |i| fmt_interval(&Some(*i))),
            verdict_word(&v.final_vs_curve),
        );
    }
    out
}

/// The variant against every other method of the setting, paired per seed (the seeds both
/// have): the comparisons a reading of the variant rests on (against its ablation, against the
/// fixed schedule at its cost, against the authors' rule).
fn variant_table(outcome: &SettingOutcome, variant: &str) -> String {
    let Some(v) = outcome.runs.get(variant).filter(|r| !r.is_empty()) else {
        return String::new();
    };
    let mut out = format!(
        "`{variant}` against each method, paired over the seeds both have (`{variant}` − method, pp, 90 % CI; *above*: `{variant}` is better):\n\n| method | seeds | selected epoch | | final epoch | |\n|---|---|---|---|---|---|\n"
    );
    for m in outcome.methods.iter().filter(|m| m.name != variant) {
        let Some(runs) = outcome.runs.get(&m.name).filter(|r| !r.is_empty()) else {
            continue;
        };
        let selected = paired_diff(v, runs, acc_selected);
        let last = paired_diff(v, runs, acc_final);
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} | {} |",
            m.name,
            selected.map_or(0, |i| i.n),
            fmt_interval(&selected),
            verdict_word(&selected),
            fmt_interval(&last),
            verdict_word(&last),
        );
    }
    out.push('\n');
    out
}

/// The goal for the variant: where SAM pays, retention at the selected epoch ≥ 0.9 with its 90 %
/// lower bound ≥ 0.9, at ≤ 1.10× SGD's time, on or above the fixed-schedule curve; where SAM
/// brings nothing, ≤ 1.10× SGD's time. Every bar is read on the bound of its 90 % interval: a
/// point estimate that clears a bar while its interval does not is "not met".
fn goal_check(rows: &[Summary], variant: &str, verdicts: &[FrontierVerdict]) -> String {
    let Some(v) = rows.iter().find(|r| r.method == variant) else {
        return String::new();
    };
    let sam_gain = rows.iter().find(|r| r.method == "sam").and_then(|r| r.selected_vs_sgd);
    let verdict = |ok: Option<bool>| match ok {
        Some(true) => "met",
        Some(false) => "not met",
        None => "not measured",
    };
    let mut out = String::new();
    let gain = match sam_gain {
        Some(g) if g.n > 1 => g,
        _ => return format!("- {variant} goal: not measured (SAM's gain needs two paired seeds).\n"),
    };
    let _ = writeln!(
        out,
        "- SAM − SGD at the validation-selected epoch: {} pp; {}.",
        fmt_interval(&Some(gain)),
        if gain.lo > 0.0 {
            "SAM's gain is above zero at 90 %"
        } else {
            "SAM's gain is not distinguishable from zero: retention is not defined here, and the goal here is the cost"
        }
    );
    let time = v.time_vs_sgd_ci90.map(|(_, hi)| hi);
    if gain.lo > 0.0 {
        let lo = v.retention_selected_lo90;
        let _ = writeln!(
            out,
            "- {variant} goal: retention at the selected epoch {} with lower bound ≥ 0.9: **{}**; time {} with upper bound ≤ 1.10× SGD: **{}**; on or above the fixed-schedule curve: **{}**.",
            fmt_retention(v.retention_selected, lo, v.retention_selected_hi90),
            verdict(lo.map(|l| l >= 0.9)),
            fmt_ratio(v.time_vs_sgd, v.time_vs_sgd_ci90),
            verdict(time.map(|t| t <= 1.10)),
            verdicts.iter().find(|x| x.method == variant).map_or("not measured", |x| match verdict_word(&x.selected_vs_curve) {
                "below" => "not met (below)",
                "–" => "not measured",
                _ => "met (not below)",
            }),
        );
    } else {
        let _ = writeln!(
            out,
            "- {variant} cost where SAM brings nothing: {} with upper bound ≤ 1.10× SGD: **{}**.",
            fmt_ratio(v.time_vs_sgd, v.time_vs_sgd_ci90),
            verdict(time.map(|t| t <= 1.10)),
        );
    }
    out
}

/// Where the hand-maintained sections of the report start.
const HAND_WRITTEN_MARKER: &str = "<!-- hand-written -->";

const COLORS: [RGBColor; 12] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(0, 0, 0),
    RGBColor(255, 187, 120),
];

type PlotResult = Result<(), Box<dyn std::error::Error>>;

/// Mean over seeds of `value` per epoch, for each method that has it.
fn epoch_series(
    outcome: &SettingOutcome,
    value: impl Fn(&EpochPoint) -> Option<f64>,
) -> Vec<(String, Vec<(f64, f64)>)> {
    outcome
        .methods
        .iter()
        .filter_map(|variant| {
            let runs = outcome.runs.get(&variant.name)?;
            let epochs = runs.first()?.epochs.len();
            let points: Vec<(f64, f64)> = (0..epochs)
                .filter_map(|e| {
                    let values: Vec<f64> = runs.iter().filter_map(|r| r.epochs.get(e).and_then(&value)).collect();
                    (!values.is_empty()).then(|| ((e + 1) as f64, mean_sd(&values).0 * 100.0))
                })
                .collect();
            (!points.is_empty()).then(|| (variant.name.clone(), points))
        })
        .collect()
}

fn plot_epochs(path: &Path, caption: &str, y_desc: &str, series: &[(String, Vec<(f64, f64)>)]) -> PlotResult {
    let root = SVGBackend::new(path, (860, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let max_e = series.iter().flat_map(|(_, p)| p.iter().map(|x| x.0)).fold(1.0, f64::max);
    let (lo, hi) = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .fold((100.0f64, 0.0f64), |(lo, hi), a| (lo.min(a), hi.max(a)));
    let mut chart = ChartBuilder::on(&root)
        .caption(caption, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.5..max_e + 0.5, (lo - 1.0).max(0.0)..(hi + 1.0).min(100.0))?;
    chart.configure_mesh().x_desc("epoch").y_desc(y_desc).draw()?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw()?;
    root.present()?;
    Ok(())
}

fn plot_gate(path: &Path, run: &RunRecord) -> PlotResult {
    let root = SVGBackend::new(path, (860, 760)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((3, 1));
    let steps = run.windows.last().map_or(1, |w| w.start_step + WINDOW) as f64;
    let at = |w: &WindowTrace| w.start_step as f64;

    let fraction: Vec<(f64, f64)> = run.windows.iter().map(|w| (at(w), w.sam_steps as f64 / WINDOW as f64)).collect();
    let target: Vec<(f64, f64)> = run.windows.iter().filter_map(|w| w.target_fraction.map(|t| (at(w), t))).collect();
    let mut chart = ChartBuilder::on(&panels[0])
        .caption(
            format!(
                "{} (noise {:.0} %, seed {}): SAM fraction per {WINDOW}-step window",
                run.spec.method,
                run.spec.setting.noise * 100.0,
                run.spec.seed
            ),
            ("sans-serif", 16),
        )
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(45)
        .build_cartesian_2d(0.0..steps, 0.0..1.05)?;
    chart.configure_mesh().y_desc("fraction").draw()?;
    chart
        .draw_series(LineSeries::new(fraction, COLORS[0].stroke_width(2)))?
        .label("SAM steps / window")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], COLORS[0].stroke_width(2)));
    chart
        .draw_series(LineSeries::new(target, COLORS[1].stroke_width(2)))?
        .label("gate's target fraction")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], COLORS[1].stroke_width(2)));
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw()?;

    let ratio: Vec<(f64, f64)> = run.windows.iter().filter_map(|w| w.psf_ratio.map(|r| (at(w), r))).collect();
    let max_r = ratio.iter().map(|p| p.1).fold(1e-6, f64::max);
    let mut chart = ChartBuilder::on(&panels[1])
        .caption("mean ‖PSF‖/‖g‖ (last 10 tensors) over each window's SAM steps", ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(45)
        .build_cartesian_2d(0.0..steps, 0.0..max_r * 1.1)?;
    chart.configure_mesh().y_desc("ratio").draw()?;
    chart.draw_series(ratio.iter().map(|&p| Circle::new(p, 2, COLORS[2].filled())))?;

    let mut signals: Vec<(&str, Vec<(f64, f64)>)> = vec![
        ("m_r (vSAM)", run.windows.iter().filter_map(|w| w.changes.map(|c| (at(w), c.0))).collect()),
        ("m_v (vSAM)", run.windows.iter().filter_map(|w| w.changes.map(|c| (at(w), c.1))).collect()),
        ("level z (trend)", run.windows.iter().filter_map(|w| w.level.map(|z| (at(w), z))).collect()),
    ];
    signals.retain(|(_, points)| !points.is_empty());
    let bound = signals.iter().flat_map(|(_, p)| p.iter().map(|x| x.1.abs())).fold(0.05, f64::max);
    let mut chart = ChartBuilder::on(&panels[2])
        .caption("the gate's signal at each window's end", ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(45)
        .build_cartesian_2d(0.0..steps, -bound * 1.1..bound * 1.1)?;
    chart.configure_mesh().x_desc("step").draw()?;
    for (i, (name, points)) in signals.into_iter().enumerate() {
        let color = COLORS[3 + i];
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(1)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw()?;
    root.present()?;
    Ok(())
}

/// Test accuracy against time relative to SAM: the fixed-schedule curve and every other method
/// as a point, with the 90 % t-interval of each mean; two panels (selected and final epoch).
fn plot_frontier(path: &Path, caption: &str, outcome: &SettingOutcome, rows: &[Summary]) -> PlotResult {
    let root = SVGBackend::new(path, (900, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((2, 1));
    let fixed = |name: &str| outcome.methods.iter().any(|v| v.name == name && v.recipe.fixed_schedule());
    for (panel, (label, f)) in panels.iter().zip([
        ("validation-selected epoch", acc_selected as fn(&RunRecord) -> f64),
        ("final epoch", acc_final as fn(&RunRecord) -> f64),
    ]) {
        let mut points: Vec<(String, f64, Interval, bool)> = rows
            .iter()
            .filter_map(|r| {
                let runs = outcome.runs.get(&r.method)?;
                let values: Vec<f64> = runs.iter().map(f).collect();
                Some((r.method.clone(), r.time_vs_sam?, t_interval(&values, Level::P90), fixed(&r.method)))
            })
            .collect();
        points.sort_by(|a, b| a.1.total_cmp(&b.1));
        let finite = |v: f64, m: f64| if v.is_finite() { v } else { m };
        let lo = points.iter().map(|p| finite(p.2.lo, p.2.mean)).fold(100.0, f64::min);
        let hi = points.iter().map(|p| finite(p.2.hi, p.2.mean)).fold(0.0, f64::max);
        let max_x = points.iter().map(|p| p.1).fold(1.0, f64::max);
        let mut chart = ChartBuilder::on(panel)
            .caption(format!("{caption}: test accuracy at the {label}"), ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0.0..max_x * 1.08, (lo - 0.5).max(0.0)..(hi + 0.5).min(100.0))?;
        chart.configure_mesh().x_desc("training time relative to SAM").y_desc("test accuracy (%)").draw()?;
        let curve: Vec<(f64, f64)> = points.iter().filter(|p| p.3).map(|p| (p.1, p.2.mean)).collect();
        chart
            .draw_series(LineSeries::new(curve, COLORS[0].stroke_width(2)))?
            .label("fixed schedule with reuse (SGD, SAM every k steps, SAM)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], COLORS[0].stroke_width(2)));
        for (i, (name, x, interval, is_fixed)) in points.iter().enumerate() {
            let color = if *is_fixed { COLORS[0] } else { COLORS[1 + i % (COLORS.len() - 1)] };
            let (l, h) = (finite(interval.lo, interval.mean), finite(interval.hi, interval.mean));
            chart.draw_series(std::iter::once(PathElement::new(vec![(*x, l), (*x, h)], color.stroke_width(1))))?;
            chart.draw_series(std::iter::once(Circle::new((*x, interval.mean), 4, color.filled())))?;
            chart.draw_series(std::iter::once(Text::new(
                name.clone(),
                (*x + 0.01, interval.mean),
                ("sans-serif", 12).into_font().color(&color),
            )))?;
        }
        chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw()?;
    }
    root.present()?;
    Ok(())
}

/// `arg` as a POSIX shell word, so that the reproduce command in the report pastes as is.
fn shell_quote(arg: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./,=:+@%".contains(c);
    if !arg.is_empty() && arg.chars().all(plain) {
        arg.to_string()
    } else if !arg.contains(['"', '$', '`', '\\', '!']) {
        format!("\"{arg}\"")
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

fn header(args: &Args, h: &Harness, library: &str, freed_memory_kept: bool) -> String {
    let mut out = String::new();
    let command: Vec<String> = std::env::args().skip(1).map(|a| shell_quote(&a)).collect();
    let setting = h.setting(0.0);
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "Written by `examples/benchmark.rs` from its results file; the hand-written sections after the tables name the command behind each of their numbers.\n"
    );
    let _ = writeln!(
        out,
        "- command: `cargo run --release -p burn-sam-sample-examples --example benchmark -- {}` (the same command resumes it; with `report` first it rebuilds this page from the results file)",
        command.join(" ")
    );
    match args.runs_at.as_slice() {
        [] => {
            let _ = writeln!(
                out,
                "- code: commit {} (the last commit touching the code a run depends on: the library, `examples/benchmark.rs`, the example modules it trains with, the lock file; the library's own last change: {library}); every run in the tables ran at it",
                h.commit
            );
        }
        [at] => {
            let _ = writeln!(
                out,
                "- code: every run in the tables ran at commit {at}, named with `--runs-at`; this page was written by the code at {} (`git diff {at} {} -- burn-sam-sample/src examples` shows what changed since)",
                code_commit(),
                code_commit().trim_end_matches("+dirty")
            );
        }
        [first, ..] => {
            let _ = writeln!(
                out,
                "- code: every run in the tables ran at one of the commits {}, named with `--runs-at` (a run is taken from the first of them that has it; each row's commits are in `summary.json`); {} run(s) are on file at more than one of them, {} of those with the same result at each (per-epoch validation and test accuracy, memorization, SAM steps); this page was written by the code at {} (`git diff {first} {} -- burn-sam-sample/src examples` shows what changed since)",
                args.runs_at.join(", "),
                h.on_several,
                h.identical,
                code_commit(),
                code_commit().trim_end_matches("+dirty")
            );
        }
    }
    let _ = writeln!(
        out,
        "- machine: {}; backend {}; precision {} (reuse cache: {}); the allocator keeps freed memory (`burn_sam_sample::memory::keep_freed_memory`): {}",
        args.machine,
        h.backend,
        args.precision.name(),
        args.cache_precision,
        if freed_memory_kept { "yes" } else { "no (not glibc)" }
    );
    let _ = writeln!(
        out,
        "- data: Fashion-MNIST, the first {} training images; validation: the last {} images of the training file (never trained on; labels flipped by the same process as training, drawn per seed); test: the first {} test images; {}",
        setting.train_images,
        setting.validation_images,
        setting.test_images,
        if args.augment { "random shifts (±2 px) and horizontal flips" } else { "no augmentation" }
    );
    let _ = writeln!(
        out,
        "- model: CNN (conv {c} + BN + pool, conv {} + BN + pool, linear {}, dropout 0.2, linear 10), {} parameters",
        2 * args.channels,
        args.hidden,
        CnnConfig::new().with_channels(args.channels).with_hidden(args.hidden).init(&h.device).num_params(),
        c = args.channels
    );
    let steps_per_epoch = setting.train_images.div_ceil(args.batch_size);
    let _ = writeln!(
        out,
        "- training: {} epochs ({} steps), batch {}, SGD (momentum 0.9, weight decay {}), {}; evaluation seeds {}–{} (`--first-seed {} --seeds {}`): the same initial weights, data order, augmentation, label noise and dropout per seed for every method; the method order is shuffled per seed",
        args.epochs(),
        steps_per_epoch * args.epochs(),
        args.batch_size,
        args.weight_decay,
        match args.schedule {
            Schedule::Cosine => "per-step cosine decay of the learning rate to 0",
            Schedule::Constant => "constant learning rate",
        },
        args.first_seed,
        args.first_seed + args.seeds() as u64 - 1,
        args.first_seed,
        args.seeds()
    );
    let _ = writeln!(
        out,
        "- selection, on validation accuracy only (each run's best epoch; the mean over {} selection seeds from {SELECT_SEED}; ties → the earlier grid value): SGD's peak learning rate from {:?}, used by every method; then SAM's ρ from {:?} at that rate, used by every SAM method but ASAM (the cheap methods approximate SAM); ASAM's ρ from {:?}",
        args.select_seeds, args.lr_grid, args.rho_grid, args.asam_rho_grid
    );
    let k = ((1.0 / args.budget).round() as usize).max(1);
    let _ = writeln!(
        out,
        "- methods: `vsam` is the authors' rule (`SamConfig::vsam`) with the warm-up scaled to the run ({} steps; `vsam-3ep`: the authors' fixed 3 epochs, {} steps); `vsam-noreuse` the same gate without PSF reuse; `vsam-trend` the opt-in variant (`SamConfig::vsam_trend`, base rate 0.15), `vsam-trend@b` at base rate b; `trend-flat` its ablation (signal off: elasticity 0, the same warm-up and even placement at rate {}); `periodic{{k}}-reuse` SAM every k steps with vSAM's decayed PSF reuse (`SamConfig::periodic_reuse(k)`); `look-sam` SAM every {k} steps (α = 0.7); `rst` with probability {}; `ae-sam` with its paper's defaults",
        scaled_warmup(steps_per_epoch * args.epochs()),
        3 * steps_per_epoch,
        args.flat_rate,
        args.budget
    );
    let _ = writeln!(out, "- statistics: differences are paired over seeds with 90 % t-intervals; retention = mean(acc − acc_SGD) / mean(acc_SAM − acc_SGD) with Fieller's paired 90 % interval (unbounded when SAM's gain is not distinguishable from 0); time ratios per seed (method / reference, training steps only, not evaluation), geometric mean with the 90 % t-interval of their logarithms; a difference whose interval contains 0 is *not distinguishable*");
    let _ = writeln!(out, "- a run whose final test or best validation accuracy is below {:.0} % did not train: it is named in the table and kept in the means; peak RSS is the process's peak resident memory during the run (peak reset before it; the data and earlier runs' retained memory included)\n", TRAINED * 100.0);
    out
}

fn main() -> ExitCode {
    burn_sam_sample_examples::process::end_quietly_on_closed_output();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    let usage = |message: String| -> ! {
        <Args as clap::CommandFactory>::command().error(clap::error::ErrorKind::InvalidValue, message).exit()
    };
    // Method names depend on --budget (`look-sam`'s k), so they are checked here, as a usage
    // error (exit 2) like every other bad option.
    let all = all_variants(args.budget, args.flat_rate);
    for names in [&args.methods, &args.control_methods] {
        if let Err(message) = select(&all, names) {
            usage(message);
        }
    }
    if !args.runs_at.is_empty() && args.step != StepKind::Report {
        usage("--runs-at: only with the `report` step (runs are always made at the current code)".into());
    }
    if let Some((i, twice)) = args.runs_at.iter().enumerate().find(|(i, c)| args.runs_at[..*i].contains(c)) {
        usage(format!("--runs-at: commit {twice} is named twice (entry {})", i + 1));
    }
    if !all.iter().any(|v| v.name == args.variant) {
        usage(format!("--variant {}: not a method", args.variant));
    }
    if args.validation >= TRAIN_FILE_IMAGES {
        usage(format!(
            "--validation {}: must leave training images (at most {})",
            args.validation,
            TRAIN_FILE_IMAGES - 1
        ));
    }
    for (name, grid) in
        [("--lr-grid", &args.lr_grid), ("--rho-grid", &args.rho_grid), ("--asam-rho-grid", &args.asam_rho_grid)]
    {
        if grid.is_empty() {
            usage(format!("{name}: give at least one value"));
        }
    }
    match run_benchmark(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn library_commit() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::process::Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["log", "-1", "--format=%h", "--", "burn-sam-sample"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

fn run_benchmark(mut args: Args) -> Result<(), Box<dyn std::error::Error>> {
    if args.quick {
        args.epochs.get_or_insert(1);
        args.seeds.get_or_insert(1);
        args.train_subset = Some(args.train_subset.unwrap_or(2_000));
        args.test_subset = Some(args.test_subset.unwrap_or(1_000));
        if args.validation == 1000 {
            args.validation = 200;
        }
        // Two-value grids of the defaults: selection is exercised at half the cost.
        for (grid, default) in [
            (&mut args.lr_grid, &[0.02, 0.05, 0.1][..]),
            (&mut args.rho_grid, &[0.02, 0.05, 0.1, 0.2][..]),
            (&mut args.asam_rho_grid, &[0.2, 0.5, 1.0][..]),
        ] {
            if grid.as_slice() == default {
                grid.truncate(2);
            }
        }
    }
    let freed_memory_kept = burn_sam_sample::memory::keep_freed_memory();
    let all = all_variants(args.budget, args.flat_rate);
    let variants = select(&all, &args.methods)?;
    let control = match &args.control_methods {
        Some(_) => select(&all, &args.control_methods)?,
        None => variants.clone(),
    };
    // The output folders are made before any run, so that a path that cannot be written is an
    // error naming it, not one after hours of training.
    let stem = args.out.with_extension("");
    std::fs::create_dir_all(&stem)
        .map_err(|e| format!("--out {}: cannot create {}: {e}", args.out.display(), stem.display()))?;
    let file = args.results_path();
    if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .map_err(|e| format!("--results {}: cannot create {}: {e}", file.display(), parent.display()))?;
    }
    let mut device = backend::select(args.backend.as_deref())?;
    args.precision.configure(&mut device)?;
    let (records, complete) = load_results(&file)?;
    let args = &args;
    let mut h = Harness {
        args,
        commit: args.runs_at.first().cloned().unwrap_or_else(code_commit),
        pooled: args.runs_at.iter().skip(1).cloned().collect(),
        on_several: 0,
        identical: 0,
        backend: format!("{device:?}"),
        device,
        records,
        file: file.clone(),
        complete,
        data: None,
        seed_data: None,
        started: Instant::now(),
        ran: 0,
        reused: 0,
        missing: 0,
    };
    let on_file = h.records.len();
    // Noisy settings first: they are where SAM pays; the clean one is the control.
    let mut settings = args.label_noise.clone();
    settings.sort_by(|a, b| b.total_cmp(a));
    let mut outcomes = Vec::new();
    for &noise in &settings {
        let methods = if noise == 0.0 && args.label_noise.len() > 1 { &control } else { &variants };
        outcomes.push(h.run_setting(noise, methods, &all)?);
    }
    eprintln!(
        "results file {}: {on_file} run(s) on file, {} of them used here, {} run now, {} missing",
        file.display(),
        h.reused,
        h.ran,
        h.missing
    );
    if args.step == StepKind::Run {
        return Ok(());
    }
    let _ = h.data.take();

    let rel = |path: &Path| -> String {
        let parent = args.out.parent().unwrap_or(Path::new(""));
        path.strip_prefix(parent).unwrap_or(path).display().to_string()
    };
    let mut report = header(args, &h, &library_commit(), freed_memory_kept);
    let mut summaries = Vec::new();
    let mut frontier_points = Vec::new();
    let mut selections = Vec::new();
    for outcome in &outcomes {
        let noise = outcome.setting.noise;
        let rows = summarize(outcome);
        let _ =
            writeln!(report, "## Label noise {:.0} %{}\n", noise * 100.0, if noise == 0.0 { " (control)" } else { "" });
        let _ = writeln!(
            report,
            "Selection (validation accuracy only): learning rate {}, ρ {}{}.\n",
            outcome.lr,
            outcome.rho,
            if outcome.methods.iter().any(|m| m.recipe == Recipe::Asam) {
                format!(", ASAM's ρ {}", outcome.asam_rho)
            } else {
                String::new()
            }
        );
        report.push_str(&selection_table(&outcome.selections));
        report.push('\n');
        if outcome.missing > 0 {
            let _ = writeln!(report, "**{} evaluation run(s) of this setting are not in the results file yet**; each method's row uses the seeds it has, each comparison the seeds both sides have.\n", outcome.missing);
        }
        report.push_str(&table(&rows));
        report.push('\n');
        let (points, verdicts) = frontier(outcome, &rows);
        report.push_str(&goal_check(&rows, &args.variant, &verdicts));
        report.push('\n');
        let _ = writeln!(report, "Against the fixed-schedule curve (per seed: the method's accuracy minus the curve through SGD, `periodic{{k}}-reuse` and SAM, interpolated at the method's mean time relative to SAM):\n");
        report.push_str(&frontier_table(&verdicts));
        report.push('\n');
        report.push_str(&variant_table(outcome, &args.variant));
        let tag = &outcome.name;
        let frontier_plot = stem.join(format!("frontier-{tag}.svg"));
        plot_frontier(&frontier_plot, &format!("Label noise {:.0} %", noise * 100.0), outcome, &rows)?;
        let _ = writeln!(report, "![cost–accuracy frontier]({})\n", rel(&frontier_plot));
        let accuracy_plot = stem.join(format!("accuracy-{tag}.svg"));
        plot_epochs(
            &accuracy_plot,
            &format!("Test accuracy per epoch, mean of seeds (label noise {:.0} %)", noise * 100.0),
            "test accuracy (%)",
            &epoch_series(outcome, |e| Some(e.test_accuracy)),
        )?;
        let _ = writeln!(report, "![test accuracy per epoch]({})\n", rel(&accuracy_plot));
        let validation_plot = stem.join(format!("validation-{tag}.svg"));
        plot_epochs(
            &validation_plot,
            &format!(
                "Validation accuracy per epoch (noisy labels as in training), mean of seeds (label noise {:.0} %)",
                noise * 100.0
            ),
            "validation accuracy (%)",
            &epoch_series(outcome, |e| Some(e.validation_accuracy)),
        )?;
        let _ = writeln!(report, "![validation accuracy per epoch]({})\n", rel(&validation_plot));
        if noise > 0.0 {
            let memo_plot = stem.join(format!("memorization-{tag}.svg"));
            plot_epochs(
                &memo_plot,
                "Flipped training images predicted as their noisy label (memorization)",
                "memorized (%)",
                &epoch_series(outcome, |e| e.memorized),
            )?;
            let _ = writeln!(report, "![memorization per epoch]({})\n", rel(&memo_plot));
        }
        for run in outcome.runs.values().filter_map(|runs| runs.first()).filter(|r| !r.windows.is_empty()) {
            let plot = stem.join(format!("gate-{}-{tag}.svg", run.spec.method));
            plot_gate(&plot, run)?;
            let _ = writeln!(report, "![{} gate trace]({})\n", run.spec.method, rel(&plot));
        }
        summaries.extend(rows);
        frontier_points.extend(points);
        selections.extend(outcome.selections.iter().map(|s| (outcome.name.clone(), s.clone())));
    }
    let summary = serde_json::json!({
        "commit": h.commit,
        "pooled_commits": h.pooled,
        "command": std::env::args().skip(1).collect::<Vec<_>>(),
        "selections": selections.iter().map(|(setting, s)| serde_json::json!({"setting": setting, "selection": s})).collect::<Vec<_>>(),
        "rows": summaries,
        "frontier": frontier_points,
    });
    let write = |path: &Path, contents: &[u8]| {
        std::fs::write(path, contents).map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    write(&stem.join("summary.json"), serde_json::to_string_pretty(&summary)?.as_bytes())?;
    let _ = writeln!(
        report,
        "Results file (one line per run, per epoch, per gate window): [`{0}`]({0}); summary: [`{1}`]({1}).",
        rel(&file),
        rel(&stem.join("summary.json"))
    );
    // The hand-written reading and the machinery-overhead section are kept across runs.
    if let Ok(previous) = std::fs::read_to_string(&args.out) {
        if let Some(at) = previous.find(HAND_WRITTEN_MARKER) {
            report.push('\n');
            report.push_str(&previous[at..]);
        }
    }
    write(&args.out, report.as_bytes())?;
    println!("{report}");
    Ok(())
}
