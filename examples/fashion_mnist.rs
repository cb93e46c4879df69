//! Fashion-MNIST with a small CNN (conv + BatchNorm + pooling) trained through Burn's Learner,
//! with vSAM or any other member of the family in front of SGD with momentum.
//!
//! Required features: one backend, `ndarray` or `flex` (both on by default), `wgpu` or `cuda`;
//! `--backend` picks among those compiled in.
//!
//! ```text
//! sudo apt-get install dataset-fashion-mnist          # or --data-dir / FASHION_MNIST_DIR
//! cargo run --release -p burn-sam-sample-examples --example fashion_mnist -- --method vsam --epochs 3
//! ```
//!
//! Reports test accuracy, the SAM fraction, gradient passes per step and wall-clock time. In a
//! terminal, Burn's dashboard shows the SAM metrics next to Burn's; otherwise (a log file, CI)
//! a line per tenth of an epoch and one per finished split with its metrics.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use burn::data::dataloader::DataLoaderBuilder;
use burn::data::dataset::Dataset;
use burn::lr_scheduler::cosine::CosineAnnealingLrSchedulerConfig;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{decay::WeightDecayConfig, momentum::MomentumConfig, SgdConfig};
use burn::prelude::*;
use burn::train::checkpoint::KeepLastNCheckpoints;
use burn::train::metric::{AccuracyMetric, LossMetric};
use burn::train::{ClassificationOutput, InferenceStep, Learner, SupervisedTraining, TrainOutput, TrainStep};
use burn_sam_sample::backend;
use burn_sam_sample::learner::{
    checkpoint_set, verify_checkpoint, EpochLoader, GradientPassesMetric, PsfRatioMetric, SamFractionMetric, SamModel,
    SamQuotaMetric, SamTargetMetric, SamTrainingExt,
};
use burn_sam_sample_examples::cli::{parse, ResumeArgs, TrainArgs};
use burn_sam_sample_examples::evaluate_loader;
use burn_sam_sample_examples::fashion::{subset, FashionBatch, FashionBatcher, FashionMnist, Fetch};
use burn_sam_sample_examples::methods::Method;
use burn_sam_sample_examples::model::{Cnn, CnnConfig};
use burn_sam_sample_examples::process::{end_quietly_on_closed_output, exit_with, usage_error, weights_digest};
use burn_sam_sample_examples::renderer::PlainOutput;
use clap::Parser;

/// Train a CNN on Fashion-MNIST with a member of the SAM family.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[command(flatten)]
    train: TrainArgs,
    /// Evaluate on the first N test images only.
    #[arg(long, value_parser = parse::positive_usize)]
    test_subset: Option<usize>,
    /// Random shifts and flips of the training images.
    #[arg(long)]
    augment: bool,
    /// Data-loader worker threads for evaluation. Training batches are built in order on the
    /// training thread, each epoch from (seed, epoch), so a run repeats exactly by its seed and
    /// a resumed run continues exactly.
    #[arg(long, default_value_t = 1, value_parser = parse::positive_usize)]
    workers: usize,
    /// Where metric logs and checkpoints go (default: target/fashion-mnist/<method>); one run at
    /// a time (a second one is refused), and a fresh run refuses another run's checkpoints unless
    /// given --overwrite.
    #[arg(long)]
    artifact_dir: Option<PathBuf>,
    #[command(flatten)]
    resume: ResumeArgs,
    /// Exit with an error when the test accuracy is not above this fraction.
    #[arg(long, value_parser = parse::fraction)]
    min_accuracy: Option<f64>,
}

#[derive(Module, Debug)]
struct Classifier {
    net: Cnn,
}

impl Classifier {
    fn classify(&self, batch: FashionBatch) -> ClassificationOutput {
        let logits = self.net.forward(batch.images);
        let loss = CrossEntropyLossConfig::new().init(&logits.device()).forward(logits.clone(), batch.targets.clone());
        ClassificationOutput::new(loss, logits, batch.targets)
    }
}

impl TrainStep for Classifier {
    type Input = FashionBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: FashionBatch) -> TrainOutput<ClassificationOutput> {
        let out = self.classify(batch);
        TrainOutput::new(self, out.loss.backward(), out)
    }
}

impl InferenceStep for Classifier {
    type Input = FashionBatch;
    type Output = ClassificationOutput;

    fn step(&self, batch: FashionBatch) -> ClassificationOutput {
        self.classify(batch)
    }
}

fn main() -> ExitCode {
    end_quietly_on_closed_output();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    if let Err(error) = args.train.check() {
        return usage_error(error);
    }
    exit_with(train(args))
}

fn train(options: Args) -> Result<(), Box<dyn std::error::Error>> {
    // SAM steps allocate model-sized tensors the base step does not; keep freed memory for the
    // next step instead of faulting it in again (glibc; see docs/backends.md).
    burn_sam_sample::memory::keep_freed_memory();
    let args = &options.train;
    let device = backend::select(args.backend.as_deref())?;

    let artifact_dir = args.artifact_dir(options.artifact_dir.clone(), "fashion-mnist");
    if artifact_dir.exists() && !artifact_dir.is_dir() {
        return Err(format!("--artifact-dir {} exists and is not a folder", artifact_dir.display()).into());
    }
    let data = FashionMnist::load(args.data_dir.as_deref(), Fetch::from_flag(args.offline))?;
    let train = subset(&data.train, args.train_subset);
    let test = subset(&data.test, options.test_subset);
    let (steps_per_epoch, total_steps) = args.steps(train.len())?;
    let warmup = args.warmup(total_steps);
    println!(
        "data: {} train / {} test images from {}{}; backend {device:?}; method {}; {} epochs × {steps_per_epoch} steps{}",
        train.len(),
        test.len(),
        data.source.display(),
        if data.fetched { " (fetched and verified)" } else { " (verified)" },
        args.method.name(),
        args.epochs,
        if args.method == Method::Vsam { format!("; warm-up {warmup} steps") } else { String::new() },
    );

    let config = args.method.config(total_steps, warmup, args.rho, args.seed);
    // The checkpoints of this run only: the lock is taken (one run per directory) and the
    // directory created before Burn starts, so that a folder that cannot be made is an error here.
    let run = args
        .fingerprint(&format!("{device:?}"), warmup)
        .with("--augment", options.augment)
        .with("--weight-decay", 5e-4)
        .with("--momentum", 0.9);
    let checkpoints = options.resume.sets(checkpoint_set(&artifact_dir), run).writer()?;
    let resume = match options.resume.resume {
        Some(resume) => {
            let epoch = resume.epoch(&checkpoints)?;
            verify_checkpoint(&checkpoints, epoch, args.epochs, &config)
                .map_err(|err| format!("--resume {epoch}: {err}"))?;
            println!("resuming from checkpoint {epoch} in {}", checkpoints.directory().display());
            Some(epoch)
        }
        None => {
            checkpoints.start_fresh(options.resume.overwrite)?;
            None
        }
    };
    let train_device = device.clone().autodiff();
    train_device.seed(args.seed);
    let model = SamModel::new(Classifier { net: CnnConfig::new().init(&train_device) }, &config)?;
    let sam = model.sam().clone();

    let batcher = if options.augment { FashionBatcher::augmented(args.seed) } else { FashionBatcher::plain() };
    // Order, augmentation and dropout of epoch e are functions of (seed, e): see `EpochLoader`.
    let train_loader = Arc::new(
        EpochLoader::new(train, batcher, args.batch_size, args.seed, &train_device)?
            .starting_at_epoch(resume.map_or(1, |epoch| epoch + 1)),
    );
    let test_loader =
        DataLoaderBuilder::new(FashionBatcher::plain()).batch_size(256).num_workers(options.workers).build(test);

    let base = SgdConfig::new()
        .with_momentum(Some(MomentumConfig::new().with_momentum(0.9).with_dampening(0.0)))
        .with_weight_decay(Some(WeightDecayConfig::new(5e-4)))
        .init();
    let schedule = CosineAnnealingLrSchedulerConfig::new(args.lr, total_steps.max(1)).init()?;

    let mut training = SupervisedTraining::new(&artifact_dir, train_loader, test_loader.clone())
        .num_epochs(args.epochs)
        .metrics((AccuracyMetric::new(), LossMetric::new()))
        .metric_train_numeric(SamFractionMetric::new())
        .metric_train_numeric(GradientPassesMetric::new())
        .metric_train_numeric(SamQuotaMetric::new())
        .metric_train_numeric(SamTargetMetric::new())
        .metric_train_numeric(PsfRatioMetric::new())
        .with_sam_checkpointing(&checkpoints, &sam, KeepLastNCheckpoints::new(2))
        // Log records go to stderr through env_logger, not to Burn's experiment log file.
        .with_application_logger(None)
        .summary();
    if let Some(epoch) = resume {
        training = training.checkpoint(epoch);
    }
    // Burn's dashboard in a terminal; otherwise plain lines, a few per epoch.
    training = training.plain_output_unless_terminal();

    let start = Instant::now();
    let result = training.launch(Learner::new(model, base, schedule));
    let elapsed = start.elapsed().as_secs_f64();
    if let Some(error) = result.error {
        return Err(format!("training failed: {error}").into());
    }
    if let Some(failure) = sam.failure() {
        return Err(format!("training failed: {failure}").into());
    }
    // Stopped early (the dashboard's `q`, which Burn reports as a normal end): the step count
    // tells, whatever the renderer did with the interruption.
    let done = sam.telemetry().step;
    if done < total_steps as u64 {
        let reason = result.interrupted.and_then(|i| i.reason).unwrap_or_else(|| "stopped early".to_string());
        return Err(format!(
            "training was interrupted ({reason}) after {done} of its {total_steps} steps; \
             --resume latest continues it from its last checkpoint"
        )
        .into());
    }

    let accuracy = evaluate_loader(&result.model.model().net, test_loader.to_device(&device).as_ref())?;
    let telemetry = sam.telemetry();
    println!(
        "method {} | test accuracy {:.2}% | SAM fraction {:.3} | gradient passes/step {:.3} | steps {} | \
         non-finite steps {} | train+eval time {elapsed:.1} s",
        args.method.name(),
        accuracy * 100.0,
        telemetry.sam_fraction,
        telemetry.passes_per_step(),
        telemetry.step,
        telemetry.non_finite_steps,
    );
    println!("weights digest {}", weights_digest(&result.model.model().net));
    if let Some(min) = options.min_accuracy {
        if accuracy <= min {
            return Err(format!("test accuracy {:.4} is not above the required {min}", accuracy).into());
        }
    }
    Ok(())
}
