//! Side-by-side benchmark of the SAM family on Fashion-MNIST: the same CNN, base optimizer
//! (SGD + momentum), schedule, augmentation, label noise and data order per seed for every
//! method. Writes a markdown report with the results tables, SVG plots, the raw results and a
//! machine-readable summary (`<stem>/summary.json`).
//!
//! Required features: one backend, `ndarray` or `flex` (both on by default), `wgpu` or `cuda`;
//! `--backend` picks among those compiled in.
//!
//! ```text
//! cargo run --release -p burn-sam-sample-examples --example benchmark -- --out docs/benchmarks.md
//! cargo run --release -p burn-sam-sample-examples --example benchmark -- --quick
//! ```
//! Without `--out` the report goes to `target/benchmark/benchmarks.md`; `--quick` keeps any
//! `--epochs`, `--seeds` and subset sizes given with it. The report's header holds the exact command of the published run.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::{Dataset, InMemDataset};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{decay::WeightDecayConfig, momentum::MomentumConfig, SgdConfig};
use burn::prelude::*;
use burn_sam_sample::policy::GatePolicy;
use burn_sam_sample::reuse::{CachePrecision, ReusePolicy};
use burn_sam_sample::{backend, SamConfig, SamOptimizer};
use burn_sam_sample_examples::cli::{parse, Precision};
use burn_sam_sample_examples::evaluate;
use burn_sam_sample_examples::fashion::{subset, FashionBatch, FashionBatcher, FashionItem, FashionMnist, Fetch};
use burn_sam_sample_examples::methods::{cosine_lr, scaled_warmup};
use burn_sam_sample_examples::model::{Cnn, CnnConfig};
use clap::Parser;
use plotters::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// Benchmark the SAM family on Fashion-MNIST.
#[derive(Parser, Debug, Clone)]
struct Args {
    /// Epochs per run (default: 6; 1 with --quick).
    #[arg(long, value_parser = parse::positive_usize)]
    epochs: Option<usize>,
    /// Seeds per method (seeds 0, 1, …; default: 3; 1 with --quick).
    #[arg(long, value_parser = parse::positive_usize)]
    seeds: Option<usize>,
    /// Train on the first N images (default: all 60,000).
    #[arg(long, value_parser = parse::positive_usize)]
    train_subset: Option<usize>,
    /// Evaluate on the first N test images (default: all 10,000).
    #[arg(long, value_parser = parse::positive_usize)]
    test_subset: Option<usize>,
    /// Batch size.
    #[arg(long, default_value_t = 128, value_parser = parse::positive_usize)]
    batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 0.05, value_parser = parse::positive_f64)]
    lr: f64,
    /// Learning-rate schedule: a per-step cosine decay from the peak to 0, or constant.
    #[arg(long, value_enum, default_value = "cosine")]
    schedule: Schedule,
    /// Coupled L2 weight decay of the base SGD.
    #[arg(long, default_value_t = 5e-4, value_parser = parse::non_negative_f64)]
    weight_decay: f64,
    /// Random shifts (±2 px) and horizontal flips of the training images: true or false.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    augment: bool,
    /// SAM radius ρ of every SAM method but ASAM.
    #[arg(long, default_value_t = 0.05, value_parser = parse::positive_f64)]
    rho: f64,
    /// ASAM's radius (its scale-invariant ascent wants about ten times SAM's).
    #[arg(long, default_value_t = 0.5, value_parser = parse::positive_f64)]
    asam_rho: f64,
    /// The matched cost of the fixed-rate baselines: periodic-reuse and look-sam run SAM every
    /// round(1/budget) steps, rst with probability budget (vsam-trend's own rate is its default).
    #[arg(long, default_value_t = 0.2, value_parser = parse::fraction)]
    budget: f64,
    /// Label-noise fractions to run (0 = clean); each is a full setting. Flipped labels are drawn
    /// per seed, uniformly among the other classes.
    #[arg(long, value_delimiter = ',', default_value = "0", value_parser = parse::noise)]
    label_noise: Vec<f64>,
    /// Methods to run (default: all).
    #[arg(long, value_delimiter = ',')]
    methods: Option<Vec<String>>,
    /// Methods for the clean setting (label noise 0), when it is run beside noisy ones
    /// (default: the same as --methods).
    #[arg(long, value_delimiter = ',')]
    control_methods: Option<Vec<String>>,
    /// Flipped training images whose predictions are tracked each epoch (memorization).
    #[arg(long, default_value_t = 1000, value_parser = parse::positive_usize)]
    memorization_images: usize,
    /// A preset of a few minutes: 2k training and 1k test images, 1 epoch, 1 seed, unless
    /// `--train-subset`, `--test-subset`, `--epochs` or `--seeds` say otherwise; checks that the
    /// tables are complete.
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
    /// The markdown report; plots, raw results and the summary go next to it in `<stem>/`. The
    /// committed report is `docs/benchmarks.md`, written only when named here.
    #[arg(long, default_value = "target/benchmark/benchmarks.md")]
    out: PathBuf,
    /// Channels of the CNN's first convolution.
    #[arg(long, default_value_t = 8, value_parser = parse::positive_usize)]
    channels: usize,
    /// Width of the CNN's hidden layer.
    #[arg(long, default_value_t = 64, value_parser = parse::positive_usize)]
    hidden: usize,
    /// A line describing the machine, for the report.
    #[arg(long, default_value = "unspecified machine")]
    machine: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
enum Schedule {
    Cosine,
    Constant,
}

/// How a method's configuration is built for one run.
#[derive(Clone, Debug)]
enum Recipe {
    Sgd,
    Sam,
    Asam,
    /// vSAM with the authors' gate: warm-up scaled to the run, or a fixed number of epochs.
    Vsam {
        fixed_warmup_epochs: Option<usize>,
        reuse: bool,
    },
    Trend,
    PeriodicReuse {
        k: usize,
    },
    LookSam {
        k: usize,
    },
    AeSam,
    Rst,
}

/// One method as run: its name in tables and its recipe.
#[derive(Clone, Debug)]
struct Variant {
    name: String,
    recipe: Recipe,
}

/// The run-dependent quantities a recipe needs.
struct RunShape {
    steps_per_epoch: usize,
    total_steps: usize,
}

impl Variant {
    fn config(&self, args: &Args, shape: &RunShape, seed: u64) -> SamConfig {
        let scaled = scaled_warmup(shape.total_steps);
        let config = match &self.recipe {
            Recipe::Sgd => SamConfig::base_only(),
            Recipe::Sam => SamConfig::sam(),
            Recipe::Asam => SamConfig::asam(),
            Recipe::Vsam { fixed_warmup_epochs, reuse } => {
                let warmup = fixed_warmup_epochs.map_or(scaled, |e| e * shape.steps_per_epoch);
                let config = SamConfig::vsam(warmup);
                if *reuse {
                    config
                } else {
                    config.with_reuse(ReusePolicy::None)
                }
            }
            Recipe::Trend => SamConfig::vsam_trend(),
            Recipe::PeriodicReuse { k } => SamConfig::new().with_policy(GatePolicy::Periodic { k: *k }),
            Recipe::LookSam { k } => SamConfig::look_sam(*k, 0.7),
            Recipe::AeSam => SamConfig::ae_sam(shape.total_steps),
            Recipe::Rst => SamConfig::rst(args.budget),
        };
        let rho = if matches!(self.recipe, Recipe::Asam) { args.asam_rho } else { args.rho };
        config.with_rho(rho).with_seed(seed).with_cache_precision(args.cache_precision)
    }

    /// Whether the run records a per-window trace of its gate.
    fn traced(&self) -> bool {
        matches!(self.recipe, Recipe::Vsam { .. } | Recipe::Trend)
    }
}

fn all_variants(budget: f64) -> Vec<Variant> {
    let k = ((1.0 / budget).round() as usize).max(1);
    let v = |name: &str, recipe| Variant { name: name.to_string(), recipe };
    vec![
        v("sgd", Recipe::Sgd),
        v("sam", Recipe::Sam),
        v("asam", Recipe::Asam),
        v("vsam", Recipe::Vsam { fixed_warmup_epochs: None, reuse: true }),
        v("vsam-3ep", Recipe::Vsam { fixed_warmup_epochs: Some(3), reuse: true }),
        v("vsam-noreuse", Recipe::Vsam { fixed_warmup_epochs: None, reuse: false }),
        v("vsam-trend", Recipe::Trend),
        v(&format!("periodic{k}-reuse"), Recipe::PeriodicReuse { k }),
        v("periodic25-reuse", Recipe::PeriodicReuse { k: 25 }),
        v("look-sam", Recipe::LookSam { k }),
        v("ae-sam", Recipe::AeSam),
        v("rst", Recipe::Rst),
    ]
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

#[derive(Clone, Debug, Serialize)]
struct EpochPoint {
    epoch: usize,
    train_seconds: f64,
    test_accuracy: f64,
    /// Fraction of the tracked flipped training images predicted as their noisy label.
    memorized: Option<f64>,
    /// Fraction of the tracked flipped training images predicted as their true label.
    flipped_true: Option<f64>,
}

/// The gate over one window of `WINDOW` steps.
#[derive(Clone, Debug, Serialize)]
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

#[derive(Clone, Debug, Serialize)]
struct RunResult {
    variant: String,
    noise: f64,
    seed: u64,
    epochs: Vec<EpochPoint>,
    train_seconds: f64,
    images: usize,
    steps: u64,
    passes: u64,
    sam_steps: u64,
    non_finite_steps: u64,
    windows: Vec<WindowTrace>,
}

/// A run whose final test accuracy stays below this did not train (chance is 0.10).
const TRAINED: f64 = 0.2;

impl RunResult {
    fn final_accuracy(&self) -> f64 {
        self.epochs.last().map_or(0.0, |e| e.test_accuracy)
    }
    fn best_accuracy(&self) -> f64 {
        self.epochs.iter().map(|e| e.test_accuracy).fold(0.0, f64::max)
    }
    fn trained(&self) -> bool {
        self.final_accuracy() >= TRAINED
    }
}

/// The training set of one seed and setting, and which items had their label flipped.
struct NoisyTrain {
    data: InMemDataset<FashionItem>,
    /// Batches of flipped items with their noisy labels, and the true labels of the same items.
    flipped: Vec<(FashionBatch, Tensor<1, Int>)>,
}

/// Same items, with a fraction of the labels replaced by a uniformly drawn different class.
fn with_label_noise(
    data: &InMemDataset<FashionItem>,
    fraction: f64,
    seed: u64,
    tracked: usize,
    device: &Device,
) -> NoisyTrain {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x6e_6f69_7365);
    let mut flipped = Vec::new();
    let items: Vec<FashionItem> = (0..data.len())
        .filter_map(|i| data.get(i).ok())
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

struct Setting<'a> {
    noise: f64,
    seed: u64,
    train: &'a NoisyTrain,
    test: &'a [FashionBatch],
}

fn run(
    args: &Args,
    variant: &Variant,
    setting: &Setting,
    device: &Device,
) -> Result<RunResult, Box<dyn std::error::Error>> {
    let train = &setting.train.data;
    let seed = setting.seed;
    let train_device = device.clone().autodiff();
    let steps_per_epoch = train.len().div_ceil(args.batch_size);
    let shape = RunShape { steps_per_epoch, total_steps: steps_per_epoch.saturating_mul(args.epochs()) };
    let config = variant.config(args, &shape, seed);
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
                Schedule::Cosine => cosine_lr(args.lr, step, shape.total_steps),
                Schedule::Constant => args.lr,
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
        let test_accuracy = evaluate(&model, setting.test);
        let (memorized, flipped_true) = memorization(&model, &setting.train.flipped);
        epochs.push(EpochPoint { epoch, train_seconds, test_accuracy, memorized, flipped_true });
    }
    let counters = optim.sync_telemetry();
    Ok(RunResult {
        variant: variant.name.clone(),
        noise: setting.noise,
        seed,
        epochs,
        train_seconds,
        images: train.len() * args.epochs(),
        steps: counters.step,
        passes: counters.passes,
        sam_steps: counters.sam_steps,
        non_finite_steps: counters.non_finite_steps,
        windows,
    })
}

fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 { values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0) } else { 0.0 };
    (mean, var.sqrt())
}

/// One (setting, method) over its seeds; also a row of `summary.json`.
#[derive(Clone, Debug, Serialize)]
struct Summary {
    setting: String,
    method: String,
    final_acc_mean: f64,
    final_acc_std: f64,
    best_acc_mean: f64,
    best_acc_std: f64,
    /// (acc − acc_SGD) / (acc_SAM − acc_SGD) of the final accuracies' means; `null` when SAM
    /// does not beat SGD by at least `MIN_GAIN` points (there is no gain to retain).
    retention: Option<f64>,
    passes_per_step: f64,
    sam_fraction: f64,
    train_seconds: f64,
    time_vs_sgd: Option<f64>,
    time_vs_sam: Option<f64>,
    /// Final memorized fraction of the tracked flipped images (noisy settings).
    memorized_final: Option<f64>,
    seeds: usize,
    /// Seeds whose run did not train (final accuracy below 20 %); they are in the means.
    failed_seeds: Vec<u64>,
}

/// Retention is only defined where SAM beats SGD by at least this many points.
const MIN_GAIN: f64 = 1.0;

fn setting_name(noise: f64) -> String {
    format!("noise{:.0}", noise * 100.0)
}

fn summarize(results: &[RunResult], names: &[String], noise: f64) -> Vec<Summary> {
    let mut rows: Vec<Summary> = names
        .iter()
        .filter_map(|name| {
            let runs: Vec<&RunResult> = results.iter().filter(|r| &r.variant == name && r.noise == noise).collect();
            if runs.is_empty() {
                return None;
            }
            let finals: Vec<f64> = runs.iter().map(|r| r.final_accuracy() * 100.0).collect();
            let bests: Vec<f64> = runs.iter().map(|r| r.best_accuracy() * 100.0).collect();
            let steps: u64 = runs.iter().map(|r| r.steps).sum();
            let memorized: Vec<f64> = runs.iter().filter_map(|r| r.epochs.last().and_then(|e| e.memorized)).collect();
            let (final_acc_mean, final_acc_std) = mean_std(&finals);
            let (best_acc_mean, best_acc_std) = mean_std(&bests);
            Some(Summary {
                setting: setting_name(noise),
                method: name.clone(),
                final_acc_mean,
                final_acc_std,
                best_acc_mean,
                best_acc_std,
                retention: None,
                passes_per_step: runs.iter().map(|r| r.passes).sum::<u64>() as f64 / steps.max(1) as f64,
                sam_fraction: runs.iter().map(|r| r.sam_steps).sum::<u64>() as f64 / steps.max(1) as f64,
                train_seconds: runs.iter().map(|r| r.train_seconds).sum::<f64>() / runs.len() as f64,
                time_vs_sgd: None,
                time_vs_sam: None,
                memorized_final: (!memorized.is_empty()).then(|| mean_std(&memorized).0 * 100.0),
                seeds: runs.len(),
                failed_seeds: runs.iter().filter(|r| !r.trained()).map(|r| r.seed).collect(),
            })
        })
        .collect();
    let find = |name: &str| rows.iter().find(|r| r.method == name).map(|r| (r.final_acc_mean, r.train_seconds));
    let (sgd, sam) = (find("sgd"), find("sam"));
    for row in &mut rows {
        row.time_vs_sgd = sgd.map(|(_, t)| row.train_seconds / t);
        row.time_vs_sam = sam.map(|(_, t)| row.train_seconds / t);
        if let (Some((sgd_acc, _)), Some((sam_acc, _))) = (sgd, sam) {
            if sam_acc - sgd_acc >= MIN_GAIN {
                row.retention = Some((row.final_acc_mean - sgd_acc) / (sam_acc - sgd_acc));
            }
        }
    }
    rows
}

fn table(rows: &[Summary]) -> String {
    let opt = |v: Option<f64>, f: &dyn Fn(f64) -> String| v.map_or("–".to_string(), f);
    let mut out = String::from(
        "| method | final test acc. (%) | best test acc. (%) | retention of SAM's gain | passes/step | time vs SGD | time vs SAM | train time (s) | memorized flipped labels (%) | did not train |\n|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {:.2} ± {:.2} | {:.2} ± {:.2} | {} | {:.3} | {} | {} | {:.1} | {} | {} |",
            r.method,
            r.final_acc_mean,
            r.final_acc_std,
            r.best_acc_mean,
            r.best_acc_std,
            opt(r.retention, &|x| format!("{x:.2}")),
            r.passes_per_step,
            opt(r.time_vs_sgd, &|x| format!("{x:.2}×")),
            opt(r.time_vs_sam, &|x| format!("{x:.2}×")),
            r.train_seconds,
            opt(r.memorized_final, &|x| format!("{x:.1}")),
            if r.failed_seeds.is_empty() {
                "–".to_string()
            } else {
                format!("seed {}", r.failed_seeds.iter().map(u64::to_string).collect::<Vec<_>>().join(", "))
            },
        );
    }
    out
}

/// The variant's goal on a setting where SAM pays: retention ≥ 0.9 at ≤ 0.60× SAM's and
/// ≤ 1.3× SGD's wall-clock.
fn goal_check(rows: &[Summary]) -> String {
    let Some(trend) = rows.iter().find(|r| r.method == "vsam-trend") else {
        return String::new();
    };
    let Some(retention) = trend.retention else {
        return "- vsam-trend goal: not applicable, SAM does not beat SGD by 1 point here.\n".into();
    };
    let verdict = |ok: bool| if ok { "met" } else { "missed" };
    let (vs_sam, vs_sgd) = (trend.time_vs_sam.unwrap_or(f64::NAN), trend.time_vs_sgd.unwrap_or(f64::NAN));
    format!(
        "- vsam-trend goal (mean of seeds): retention {retention:.2} ≥ 0.9 **{}**; time {vs_sam:.2}× SAM ≤ 0.60× **{}**; time {vs_sgd:.2}× SGD ≤ 1.3× **{}**.\n",
        verdict(retention >= 0.9),
        verdict(vs_sam <= 0.60),
        verdict(vs_sgd <= 1.3),
    )
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
    results: &[RunResult],
    names: &[String],
    noise: f64,
    value: impl Fn(&EpochPoint) -> Option<f64>,
) -> Vec<(String, Vec<(f64, f64)>)> {
    names
        .iter()
        .filter_map(|name| {
            let runs: Vec<&RunResult> = results.iter().filter(|r| &r.variant == name && r.noise == noise).collect();
            let epochs = runs.first()?.epochs.len();
            let points: Vec<(f64, f64)> = (0..epochs)
                .filter_map(|e| {
                    let values: Vec<f64> = runs.iter().filter_map(|r| value(&r.epochs[e])).collect();
                    (!values.is_empty()).then(|| ((e + 1) as f64, mean_std(&values).0 * 100.0))
                })
                .collect();
            (!points.is_empty()).then(|| (name.clone(), points))
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

fn plot_gate(path: &Path, run: &RunResult) -> PlotResult {
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
                run.variant,
                run.noise * 100.0,
                run.seed
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

fn header(args: &Args, train_len: usize, test_len: usize, minutes: f64, device: &Device) -> String {
    let mut out = String::new();
    let command: Vec<String> = std::env::args().skip(1).map(|a| shell_quote(&a)).collect();
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "Written by `examples/benchmark.rs`. The tables and plots come from the one run described here; the hand-written sections after them name the command behind each of their numbers.\n"
    );
    let _ = writeln!(
        out,
        "- command: `cargo run --release -p burn-sam-sample-examples --example benchmark -- {}`",
        command.join(" ")
    );
    let _ = writeln!(
        out,
        "- machine: {}; backend {device:?}; precision {} (reuse cache: {})",
        args.machine,
        args.precision.name(),
        args.cache_precision
    );
    let _ = writeln!(
        out,
        "- data: Fashion-MNIST, the first {train_len} training / {test_len} test images; {}; label noise per setting (flipped labels drawn per seed, uniformly among the other classes)",
        if args.augment { "random shifts (±2 px) and horizontal flips" } else { "no augmentation" }
    );
    let _ = writeln!(
        out,
        "- model: CNN (conv {c} + BN + pool, conv {} + BN + pool, linear {}, dropout 0.2, linear 10), {} parameters",
        2 * args.channels,
        args.hidden,
        CnnConfig::new().with_channels(args.channels).with_hidden(args.hidden).init(device).num_params(),
        c = args.channels
    );
    let _ = writeln!(
        out,
        "- training: {} epochs, batch {}, SGD (momentum 0.9, weight decay {}), peak learning rate {} ({}); {} seed(s) per method; the same initial weights, data order, augmentation and label noise per seed for every method",
        args.epochs(),
        args.batch_size,
        args.weight_decay,
        args.lr,
        match args.schedule {
            Schedule::Cosine => "per-step cosine decay to 0",
            Schedule::Constant => "constant",
        },
        args.seeds()
    );
    let steps_per_epoch = train_len.div_ceil(args.batch_size);
    let k = ((1.0 / args.budget).round() as usize).max(1);
    let _ = writeln!(
        out,
        "- methods: ρ = {} for every SAM method but ASAM (ρ = {}); `vsam` is the authors' rule (`SamConfig::vsam`) with the warm-up scaled to the run ({} steps; `vsam-3ep`: the authors' fixed 3 epochs, {} steps); `vsam-noreuse` is the same gate without PSF reuse; `vsam-trend` is the opt-in variant (`SamConfig::vsam_trend`, its defaults); `periodic{k}-reuse` and `periodic25-reuse` run SAM every {k} and 25 steps with vSAM's decayed PSF reuse; `look-sam` runs SAM every {k} steps (α = 0.7); `rst` with probability {}; `ae-sam` with its paper's defaults",
        args.rho,
        args.asam_rho,
        scaled_warmup(steps_per_epoch * args.epochs()),
        3 * steps_per_epoch,
        args.budget
    );
    let _ = writeln!(out, "- retention = (acc − acc_SGD) / (acc_SAM − acc_SGD) of the mean final test accuracies, shown only where SAM beats SGD by at least {MIN_GAIN} point; a run whose final accuracy is below {:.0} % did not train: it is named in the table and kept in the means", TRAINED * 100.0);
    let _ = writeln!(out, "- training time counts the optimizer steps only (forward, backward, SAM machinery, update), not evaluation; ratios compare methods within this run");
    let _ = writeln!(out, "- total wall-clock of the benchmark: {minutes:.1} min\n");
    out
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
}

fn main() -> ExitCode {
    burn_sam_sample_examples::process::end_quietly_on_closed_output();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    // Method names depend on --budget (`periodic{k}-reuse`), so they are checked here, as a
    // usage error (exit 2) like every other bad option.
    let all = all_variants(args.budget);
    for names in [&args.methods, &args.control_methods] {
        if let Err(message) = select(&all, names) {
            <Args as clap::CommandFactory>::command().error(clap::error::ErrorKind::InvalidValue, message).exit();
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

fn run_benchmark(mut args: Args) -> Result<(), Box<dyn std::error::Error>> {
    if args.quick {
        args.epochs.get_or_insert(1);
        args.seeds.get_or_insert(1);
        args.train_subset = Some(args.train_subset.unwrap_or(2_000));
        args.test_subset = Some(args.test_subset.unwrap_or(1_000));
    }
    let all = all_variants(args.budget);
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
    let mut device = backend::select(args.backend.as_deref())?;
    args.precision.configure(&mut device)?;
    let data = FashionMnist::load(args.data_dir.as_deref(), Fetch::from_flag(args.offline))?;
    let clean_train = subset(&data.train, args.train_subset);
    let test_set = subset(&data.test, args.test_subset);
    let test: Vec<FashionBatch> = (0..test_set.len())
        .collect::<Vec<_>>()
        .chunks(500)
        .map(|chunk| {
            FashionBatcher::plain().batch(chunk.iter().filter_map(|&i| test_set.get(i).ok()).collect(), &device)
        })
        .collect();

    let started = Instant::now();
    let mut results = Vec::new();
    for &noise in &args.label_noise {
        let methods = if noise == 0.0 && args.label_noise.len() > 1 { &control } else { &variants };
        for seed in 0..args.seeds() as u64 {
            let train = with_label_noise(&clean_train, noise, seed, args.memorization_images, &device);
            let setting = Setting { noise, seed, train: &train, test: &test };
            for variant in methods {
                let result = run(&args, variant, &setting, &device)?;
                eprintln!(
                    "[{:>6.0} s] noise {noise:.2} seed {seed} {:<16} final {:.2}% best {:.2}% train {:.1} s SAM fraction {:.3}{}",
                    started.elapsed().as_secs_f64(),
                    result.variant,
                    result.final_accuracy() * 100.0,
                    result.best_accuracy() * 100.0,
                    result.train_seconds,
                    result.sam_steps as f64 / result.steps.max(1) as f64,
                    if result.trained() { "" } else { "  DID NOT TRAIN" },
                );
                results.push(result);
            }
        }
    }

    let rel = |path: &Path| -> String {
        let parent = args.out.parent().unwrap_or(Path::new(""));
        path.strip_prefix(parent).unwrap_or(path).display().to_string()
    };
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    let mut report = header(&args, clean_train.len(), test_set.len(), minutes, &device);
    let mut summaries = Vec::new();
    // Noisy settings first: they are where SAM pays; the clean one is the control.
    let mut settings = args.label_noise.clone();
    settings.sort_by(|a, b| b.total_cmp(a));
    for noise in settings {
        let names: Vec<String> = if noise == 0.0 && args.label_noise.len() > 1 { &control } else { &variants }
            .iter()
            .map(|v| v.name.clone())
            .collect();
        let rows = summarize(&results, &names, noise);
        let _ =
            writeln!(report, "## Label noise {:.0} %{}\n", noise * 100.0, if noise == 0.0 { " (control)" } else { "" });
        report.push_str(&table(&rows));
        report.push('\n');
        report.push_str(&goal_check(&rows));
        report.push('\n');
        if rows.len() != names.len() || rows.iter().any(|r| !(r.final_acc_mean.is_finite() && r.train_seconds > 0.0)) {
            return Err(format!("incomplete table for label noise {noise}").into());
        }
        let tag = setting_name(noise);
        let accuracy_plot = stem.join(format!("accuracy-{tag}.svg"));
        let series = epoch_series(&results, &names, noise, |e| Some(e.test_accuracy));
        plot_epochs(
            &accuracy_plot,
            &format!("Test accuracy per epoch, mean of seeds (label noise {:.0} %)", noise * 100.0),
            "test accuracy (%)",
            &series,
        )?;
        let _ = writeln!(report, "![test accuracy per epoch]({})\n", rel(&accuracy_plot));
        if noise > 0.0 {
            let memo_plot = stem.join(format!("memorization-{tag}.svg"));
            let series = epoch_series(&results, &names, noise, |e| e.memorized);
            plot_epochs(
                &memo_plot,
                "Flipped training images predicted as their noisy label (memorization)",
                "memorized (%)",
                &series,
            )?;
            let _ = writeln!(report, "![memorization per epoch]({})\n", rel(&memo_plot));
        }
        for run in results.iter().filter(|r| r.noise == noise && r.seed == 0 && !r.windows.is_empty()) {
            let plot = stem.join(format!("gate-{}-{tag}.svg", run.variant));
            plot_gate(&plot, run)?;
            let _ = writeln!(report, "![{} gate trace]({})\n", run.variant, rel(&plot));
        }
        summaries.extend(rows);
    }
    let write = |path: &Path, contents: &[u8]| {
        std::fs::write(path, contents).map_err(|e| format!("cannot write {}: {e}", path.display()))
    };
    write(&stem.join("results.json"), serde_json::to_string(&results)?.as_bytes())?;
    write(&stem.join("summary.json"), serde_json::to_string_pretty(&summaries)?.as_bytes())?;
    let _ = writeln!(
        report,
        "Raw results (per run, per epoch, per gate window): [`{0}`]({0}); summary: [`{1}`]({1}).",
        rel(&stem.join("results.json")),
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
