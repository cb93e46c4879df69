//! Side-by-side benchmark of the SAM family on Fashion-MNIST: the same CNN, base optimizer
//! (SGD + momentum), cosine schedule, augmentation and data order per seed for every method.
//! Writes a markdown report with the results table and SVG plots.
//!
//! Required features: one backend, `ndarray` or `flex` (both on by default), `wgpu` or `cuda`;
//! `--backend` picks among those compiled in.
//!
//! ```text
//! cargo run --release -p burn-sam-sample-examples --example benchmark -- --out docs/benchmarks.md
//! cargo run --release -p burn-sam-sample-examples --example benchmark -- --quick --out target/quick.md
//! ```

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::{Dataset, InMemDataset};
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{decay::WeightDecayConfig, momentum::MomentumConfig, SgdConfig};
use burn::prelude::*;
use burn_sam_sample::backend;
use burn_sam_sample_examples::correct;
use burn_sam_sample_examples::fashion::{subset, FashionBatch, FashionBatcher, FashionItem, FashionMnist};
use burn_sam_sample_examples::methods::{cosine_lr, scaled_warmup, Method};
use burn_sam_sample_examples::model::{Cnn, CnnConfig};
use clap::Parser;
use plotters::prelude::*;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;

/// Benchmark the SAM family on Fashion-MNIST.
#[derive(Parser, Debug, Clone)]
struct Args {
    /// Epochs per run.
    #[arg(long, default_value_t = 6)]
    epochs: usize,
    /// Seeds per method.
    #[arg(long, default_value_t = 3)]
    seeds: u64,
    /// Train on the first N images (default: all 60,000).
    #[arg(long)]
    train_subset: Option<usize>,
    /// Evaluate on the first N test images (default: all 10,000).
    #[arg(long)]
    test_subset: Option<usize>,
    /// Batch size.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Peak learning rate (cosine to 0 per step).
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    /// Label-noise fractions to run (0 = clean); each is a full setting with all methods.
    #[arg(long, value_delimiter = ',', default_value = "0")]
    label_noise: Vec<f64>,
    /// Methods to run (default: all, plus vSAM with the authors' fixed 3-epoch warm-up).
    #[arg(long, value_delimiter = ',')]
    methods: Option<Vec<String>>,
    /// A preset of at most a few minutes: 2k images, 1 epoch, 1 seed; checks the table is complete.
    #[arg(long)]
    quick: bool,
    /// Folder with the Fashion-MNIST files.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Backend: ndarray, flex, wgpu or cuda.
    #[arg(long)]
    backend: Option<String>,
    /// The markdown report; plots go next to it in `<stem>/`.
    #[arg(long, default_value = "docs/benchmarks.md")]
    out: PathBuf,
    /// Channels of the CNN's first convolution.
    #[arg(long, default_value_t = 8)]
    channels: usize,
    /// Width of the CNN's hidden layer.
    #[arg(long, default_value_t = 64)]
    hidden: usize,
    /// A line describing the machine, for the report.
    #[arg(long, default_value = "unspecified machine")]
    machine: String,
}

/// One method as run: the name in tables and its configuration recipe.
#[derive(Clone, Debug)]
struct Variant {
    name: String,
    method: Method,
    /// vSAM's warm-up: scaled to the run, or the authors' fixed 3 epochs.
    fixed_warmup_epochs: Option<usize>,
}

fn variants(selected: &Option<Vec<String>>) -> Result<Vec<Variant>, String> {
    let mut all: Vec<Variant> = Method::ALL
        .iter()
        .map(|&method| Variant {
            name: method.name().to_string(),
            method,
            fixed_warmup_epochs: None,
        })
        .collect();
    all.insert(
        4,
        Variant {
            name: "vsam-3ep".into(),
            method: Method::Vsam,
            fixed_warmup_epochs: Some(3),
        },
    );
    match selected {
        None => Ok(all),
        Some(names) => names
            .iter()
            .map(|name| {
                all.iter()
                    .find(|v| &v.name == name)
                    .cloned()
                    .ok_or_else(|| format!("unknown method `{name}`; known: {}", all.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ")))
            })
            .collect(),
    }
}

#[derive(Clone, Debug, Serialize)]
struct EpochPoint {
    epoch: usize,
    train_seconds: f64,
    test_accuracy: f64,
}

#[derive(Clone, Debug, Serialize)]
struct StepTrace {
    sam: bool,
    quota: Option<f64>,
    psf_ratio: Option<f64>,
}

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
    warmup_steps: usize,
    trace: Vec<StepTrace>,
}

impl RunResult {
    fn final_accuracy(&self) -> f64 {
        self.epochs.last().map_or(0.0, |e| e.test_accuracy)
    }
    fn best_accuracy(&self) -> f64 {
        self.epochs.iter().map(|e| e.test_accuracy).fold(0.0, f64::max)
    }
}

/// Same items, with a fraction of the labels replaced by a uniformly drawn different class.
fn with_label_noise(data: &InMemDataset<FashionItem>, fraction: f64, seed: u64) -> InMemDataset<FashionItem> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x6e_6f69_7365);
    let items = (0..data.len())
        .filter_map(|i| data.get(i).ok())
        .map(|mut item| {
            if rng.random::<f64>() < fraction {
                let other = rng.random_range(0..9u8);
                item.label = if other >= item.label { other + 1 } else { other };
            }
            item
        })
        .collect();
    InMemDataset::new(items)
}

fn evaluate(model: &Cnn, batches: &[FashionBatch]) -> f64 {
    let model = model.valid();
    let (mut right, mut total) = (0i64, 0usize);
    for batch in batches {
        total += batch.targets.dims()[0];
        right += correct(model.forward(batch.images.clone()), batch.targets.clone());
    }
    right as f64 / total.max(1) as f64
}

#[allow(clippy::too_many_arguments)]
fn run(
    args: &Args,
    variant: &Variant,
    noise: f64,
    seed: u64,
    train: &InMemDataset<FashionItem>,
    test: &[FashionBatch],
    device: &Device,
) -> Result<RunResult, Box<dyn std::error::Error>> {
    let train_device = device.clone().autodiff();
    let steps_per_epoch = train.len().div_ceil(args.batch_size);
    let total_steps = steps_per_epoch * args.epochs;
    let warmup = match variant.fixed_warmup_epochs {
        Some(epochs) => epochs * steps_per_epoch,
        None => scaled_warmup(total_steps),
    };
    let config = variant.method.config(total_steps, warmup, None, seed);
    train_device.seed(seed);
    let mut model = CnnConfig::new().with_channels(args.channels).with_hidden(args.hidden).init(&train_device);
    let base = SgdConfig::new()
        .with_momentum(Some(MomentumConfig::new().with_momentum(0.9).with_dampening(0.0)))
        .with_weight_decay(Some(WeightDecayConfig::new(5e-4)))
        .init();
    let mut optim = config.init(base)?;
    let loss_fn = CrossEntropyLossConfig::new().init(&train_device);
    let batcher = FashionBatcher::augmented(seed);
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);

    let mut epochs = Vec::new();
    let mut trace = Vec::with_capacity(total_steps);
    let mut train_seconds = 0.0;
    let mut step = 0usize;
    for epoch in 1..=args.epochs {
        order.shuffle(&mut rng);
        for chunk in order.chunks(args.batch_size) {
            let items: Vec<FashionItem> = chunk.iter().filter_map(|&i| train.get(i).ok()).collect();
            let batch = batcher.batch(items, &train_device);
            let lr = cosine_lr(args.lr, step, total_steps);
            let start = Instant::now();
            let (next, out) = optim.step(lr, model, |m: &Cnn| {
                (loss_fn.forward(m.forward(batch.images.clone()), batch.targets.clone()), ())
            });
            model = next;
            // Wait for the device so that the step's time is the step's.
            let _ = train_device.sync();
            train_seconds += start.elapsed().as_secs_f64();
            // The per-step trace feeds the vSAM plots; other methods keep their totals only.
            if variant.name == "vsam" {
                let t = out.telemetry;
                trace.push(StepTrace {
                    sam: t.sam,
                    quota: t.quota,
                    psf_ratio: t.psf_ratio,
                });
            }
            step += 1;
        }
        let test_accuracy = evaluate(&model, test);
        epochs.push(EpochPoint {
            epoch,
            train_seconds,
            test_accuracy,
        });
    }
    let counters = optim.engine().counters();
    Ok(RunResult {
        variant: variant.name.clone(),
        noise,
        seed,
        epochs,
        train_seconds,
        images: train.len() * args.epochs,
        steps: counters.steps,
        passes: counters.passes,
        sam_steps: counters.sam_steps,
        warmup_steps: if variant.method == Method::Vsam { warmup } else { 0 },
        trace,
    })
}

fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let var = if values.len() > 1 {
        values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

struct Row {
    name: String,
    final_acc: (f64, f64),
    best_acc: (f64, f64),
    seconds: f64,
    images_per_second: f64,
    passes_per_step: f64,
    sam_fraction: f64,
}

fn rows(results: &[RunResult], names: &[String], noise: f64) -> Vec<Row> {
    names
        .iter()
        .filter_map(|name| {
            let runs: Vec<&RunResult> = results.iter().filter(|r| &r.variant == name && r.noise == noise).collect();
            if runs.is_empty() {
                return None;
            }
            let finals: Vec<f64> = runs.iter().map(|r| r.final_accuracy() * 100.0).collect();
            let bests: Vec<f64> = runs.iter().map(|r| r.best_accuracy() * 100.0).collect();
            let seconds = runs.iter().map(|r| r.train_seconds).sum::<f64>() / runs.len() as f64;
            let images = runs.iter().map(|r| r.images as f64).sum::<f64>() / runs.len() as f64;
            let steps: u64 = runs.iter().map(|r| r.steps).sum();
            Some(Row {
                name: name.clone(),
                final_acc: mean_std(&finals),
                best_acc: mean_std(&bests),
                seconds,
                images_per_second: images / seconds,
                passes_per_step: runs.iter().map(|r| r.passes).sum::<u64>() as f64 / steps as f64,
                sam_fraction: runs.iter().map(|r| r.sam_steps).sum::<u64>() as f64 / steps as f64,
            })
        })
        .collect()
}

fn table(rows: &[Row]) -> String {
    let sgd = rows.iter().find(|r| r.name == "sgd").map(|r| r.seconds);
    let sam = rows.iter().find(|r| r.name == "sam").map(|r| r.seconds);
    let ratio = |base: Option<f64>, s: f64| base.map_or("–".to_string(), |b| format!("{:.2}×", s / b));
    let mut out = String::from(
        "| method | final test acc. (%) | best test acc. (%) | train time (s) | images/s | passes/step | SAM fraction | time vs SGD | time vs SAM |\n|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {:.2} ± {:.2} | {:.2} ± {:.2} | {:.1} | {:.0} | {:.3} | {:.3} | {} | {} |",
            r.name,
            r.final_acc.0,
            r.final_acc.1,
            r.best_acc.0,
            r.best_acc.1,
            r.seconds,
            r.images_per_second,
            r.passes_per_step,
            r.sam_fraction,
            ratio(sgd, r.seconds),
            ratio(sam, r.seconds),
        );
    }
    out
}

fn targets(rows: &[Row]) -> String {
    let find = |name: &str| rows.iter().find(|r| r.name == name);
    let (Some(sam), Some(vsam)) = (find("sam"), find("vsam")) else {
        return "SAM or vSAM was not run: no target check.\n".into();
    };
    let gap = sam.final_acc.0 - vsam.final_acc.0;
    let time = vsam.seconds / sam.seconds;
    let accuracy_met = gap <= 0.2;
    let time_met = time <= 0.60;
    format!(
        "- vSAM vs SAM, final test accuracy (mean of seeds): {:.2} vs {:.2} %, gap {gap:+.2} pp: target ≤ 0.2 pp **{}**.\n\
         - vSAM wall-clock relative to SAM: {time:.2}×: target ≤ 0.60× **{}**.\n",
        vsam.final_acc.0,
        sam.final_acc.0,
        if accuracy_met { "met" } else { "missed" },
        if time_met { "met" } else { "missed" },
    )
}

/// Where the hand-maintained machinery-overhead section of the report starts.
const OVERHEAD_MARKER: &str = "<!-- machinery-overhead -->";

const COLORS: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

type PlotResult = Result<(), Box<dyn std::error::Error>>;

fn plot_accuracy(path: &Path, results: &[RunResult], names: &[String], noise: f64) -> PlotResult {
    let root = SVGBackend::new(path, (760, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let series: Vec<(String, Vec<(f64, f64)>)> = names
        .iter()
        .map(|name| {
            let runs: Vec<&RunResult> = results.iter().filter(|r| &r.variant == name && r.noise == noise).collect();
            let epochs = runs.first().map_or(0, |r| r.epochs.len());
            let points = (0..epochs)
                .map(|e| {
                    let n = runs.len() as f64;
                    let t = runs.iter().map(|r| r.epochs[e].train_seconds).sum::<f64>() / n;
                    let a = runs.iter().map(|r| r.epochs[e].test_accuracy).sum::<f64>() / n * 100.0;
                    (t, a)
                })
                .collect();
            (name.clone(), points)
        })
        .collect();
    let max_t = series.iter().flat_map(|(_, p)| p.iter().map(|x| x.0)).fold(1.0, f64::max);
    let (min_a, max_a) = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|x| x.1))
        .fold((100.0f64, 0.0f64), |(lo, hi), a| (lo.min(a), hi.max(a)));
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("Test accuracy vs training wall-clock (label noise {:.0} %)", noise * 100.0), ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0.0..max_t * 1.05, (min_a - 1.0).max(0.0)..(max_a + 0.5).min(100.0))?;
    chart.configure_mesh().x_desc("training time (s), mean of seeds").y_desc("test accuracy (%)").draw()?;
    for (i, (name, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2)));
        chart.draw_series(points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw()?;
    root.present()?;
    Ok(())
}

fn plot_trace(path: &Path, run: &RunResult, window: usize) -> PlotResult {
    let root = SVGBackend::new(path, (760, 520)).into_drawing_area();
    root.fill(&WHITE)?;
    let (upper, lower) = root.split_vertically(260);
    let steps = run.trace.len();
    let fraction: Vec<(f64, f64)> = run
        .trace
        .chunks(window)
        .enumerate()
        .map(|(i, chunk)| ((i * window) as f64, chunk.iter().filter(|t| t.sam).count() as f64 / chunk.len() as f64))
        .collect();
    let quota: Vec<(f64, f64)> = run
        .trace
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.quota.map(|q| (i as f64, q / window as f64)))
        .collect();
    let mut chart = ChartBuilder::on(&upper)
        .caption(
            format!("vSAM (seed {}): SAM fraction per {window}-step window and quota s/K", run.seed),
            ("sans-serif", 16),
        )
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(45)
        .build_cartesian_2d(0.0..steps as f64, 0.0..1.05)?;
    chart.configure_mesh().x_desc("step").y_desc("fraction").draw()?;
    chart
        .draw_series(LineSeries::new(fraction, COLORS[0].stroke_width(2)))?
        .label("SAM fraction per window")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], COLORS[0].stroke_width(2)));
    chart
        .draw_series(LineSeries::new(quota, COLORS[1].stroke_width(2)))?
        .label("quota s / K")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], COLORS[1].stroke_width(2)));
    chart.configure_series_labels().border_style(BLACK).background_style(WHITE.mix(0.8)).draw()?;

    let ratio: Vec<(f64, f64)> = run
        .trace
        .iter()
        .enumerate()
        .filter(|(_, t)| t.sam)
        .filter_map(|(i, t)| t.psf_ratio.map(|r| (i as f64, r)))
        .collect();
    let max_r = ratio.iter().map(|p| p.1).fold(1e-6, f64::max);
    let mut chart = ChartBuilder::on(&lower)
        .caption("‖PSF‖/‖g‖ over the last 10 tensors, at each SAM step", ("sans-serif", 16))
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(45)
        .build_cartesian_2d(0.0..steps as f64, 0.0..max_r * 1.1)?;
    chart.configure_mesh().x_desc("step").y_desc("ratio").draw()?;
    chart.draw_series(ratio.iter().map(|&p| Circle::new(p, 2, COLORS[2].filled())))?;
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

fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let mut args = Args::parse();
    if args.quick {
        args.epochs = 1;
        args.seeds = 1;
        args.train_subset = Some(args.train_subset.unwrap_or(2_000));
        args.test_subset = Some(args.test_subset.unwrap_or(1_000));
    }
    let variants = variants(&args.methods)?;
    let names: Vec<String> = variants.iter().map(|v| v.name.clone()).collect();
    let device = backend::select(args.backend.as_deref())?;
    let data = FashionMnist::load(args.data_dir.as_deref())?;
    let clean_train = subset(&data.train, args.train_subset);
    let test_set = subset(&data.test, args.test_subset);
    let test: Vec<FashionBatch> = (0..test_set.len())
        .collect::<Vec<_>>()
        .chunks(500)
        .map(|chunk| FashionBatcher::plain().batch(chunk.iter().filter_map(|&i| test_set.get(i).ok()).collect(), &device))
        .collect();

    let command: Vec<String> = std::env::args().collect();
    let started = Instant::now();
    let mut results = Vec::new();
    for &noise in &args.label_noise {
        for seed in 0..args.seeds {
            let train = if noise > 0.0 {
                with_label_noise(&clean_train, noise, seed)
            } else {
                subset(&clean_train, None)
            };
            for variant in &variants {
                let result = run(&args, variant, noise, seed, &train, &test, &device)?;
                eprintln!(
                    "[{:>6.0} s] noise {noise:.2} seed {seed} {:<9} final {:.2}% best {:.2}% train {:.1} s SAM fraction {:.3}",
                    started.elapsed().as_secs_f64(),
                    result.variant,
                    result.final_accuracy() * 100.0,
                    result.best_accuracy() * 100.0,
                    result.train_seconds,
                    result.sam_steps as f64 / result.steps.max(1) as f64,
                );
                results.push(result);
            }
        }
    }

    let stem = args.out.with_extension("");
    std::fs::create_dir_all(&stem)?;
    let rel = |path: &Path| -> String {
        let parent = args.out.parent().unwrap_or(Path::new(""));
        path.strip_prefix(parent).unwrap_or(path).display().to_string()
    };
    let mut report = String::new();
    let _ = writeln!(report, "# Benchmarks\n");
    let _ = writeln!(
        report,
        "Written by `examples/benchmark.rs`. The tables and plots come from the one run described here; the hand-written sections after them name the command behind each of their numbers.\n"
    );
    let _ = writeln!(report, "- command: `cargo run --release -p burn-sam-sample-examples --example benchmark -- {}`", command[1..].iter().map(|arg| shell_quote(arg)).collect::<Vec<_>>().join(" "));
    let _ = writeln!(report, "- machine: {}; backend {device:?}", args.machine);
    let _ = writeln!(
        report,
        "- data: Fashion-MNIST, {} training / {} test images; random shifts (±2 px) and horizontal flips",
        clean_train.len(),
        test_set.len()
    );
    let _ = writeln!(
        report,
        "- model: CNN (conv {c} + BN + pool, conv {} + BN + pool, linear {}, dropout 0.2, linear 10), {} parameters",
        2 * args.channels,
        args.hidden,
        CnnConfig::new().with_channels(args.channels).with_hidden(args.hidden).init(&device).num_params(),
        c = args.channels
    );
    let _ = writeln!(
        report,
        "- training: {} epochs, batch {}, SGD (momentum 0.9, weight decay 5e-4), peak learning rate {} with a per-step cosine decay to 0; ρ = 0.05 (ASAM 0.5); {} seed(s) per method; the same data order and augmentation per seed for every method",
        args.epochs, args.batch_size, args.lr, args.seeds
    );
    let steps_per_epoch = clean_train.len().div_ceil(args.batch_size);
    let _ = writeln!(
        report,
        "- vSAM warm-up: `vsam` scales the authors' 3-of-200-epoch warm-up (1.5 %) to this run, with at least one 50-step window: {} steps; `vsam-3ep` keeps the authors' fixed 3 epochs: {} steps",
        scaled_warmup(steps_per_epoch * args.epochs),
        3 * steps_per_epoch
    );
    let _ = writeln!(report, "- training time counts the optimizer steps only (forward, backward, SAM machinery, update), not evaluation");
    let _ = writeln!(report, "- total wall-clock of the benchmark: {:.1} min\n", started.elapsed().as_secs_f64() / 60.0);
    for &noise in &args.label_noise {
        let rows = rows(&results, &names, noise);
        let _ = writeln!(report, "## Label noise {:.0} %\n", noise * 100.0);
        report.push_str(&table(&rows));
        report.push('\n');
        report.push_str(&targets(&rows));
        report.push('\n');
        let accuracy_plot = stem.join(format!("accuracy-noise{:.0}.svg", noise * 100.0));
        plot_accuracy(&accuracy_plot, &results, &names, noise)?;
        let _ = writeln!(report, "![test accuracy vs wall-clock]({})\n", rel(&accuracy_plot));
        if let Some(run) = results.iter().find(|r| r.variant == "vsam" && r.noise == noise && r.seed == 0) {
            let trace_plot = stem.join(format!("vsam-trace-noise{:.0}.svg", noise * 100.0));
            plot_trace(&trace_plot, run, 50)?;
            let _ = writeln!(report, "![vSAM SAM fraction, quota and PSF ratio]({})\n", rel(&trace_plot));
        }
    }
    std::fs::write(stem.join("results.json"), serde_json::to_string(&results)?)?;
    let _ = writeln!(report, "Raw results (per run, per epoch, per step): [`{}`]({}).", rel(&stem.join("results.json")), rel(&stem.join("results.json")));

    // The quick preset is CI's check that the report is complete.
    for &noise in &args.label_noise {
        let rows = rows(&results, &names, noise);
        if rows.len() != names.len() || rows.iter().any(|r| !(r.final_acc.0.is_finite() && r.seconds > 0.0)) {
            return Err(format!("incomplete table for noise {noise}").into());
        }
    }
    // The machinery-overhead section comes from the criterion benchmark, not from this run: keep it.
    if let Ok(previous) = std::fs::read_to_string(&args.out) {
        if let Some(at) = previous.find(OVERHEAD_MARKER) {
            report.push('\n');
            report.push_str(&previous[at..]);
        }
    }
    std::fs::write(&args.out, &report)?;
    println!("{report}");
    Ok(())
}
