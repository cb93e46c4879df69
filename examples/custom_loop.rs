//! The Fashion-MNIST CNN trained in a hand-written loop with `SamOptimizer::step` and its
//! closure: no Learner. Shows the telemetry, saving the optimizer state, and resuming from it.
//!
//! Required features: one backend, `ndarray` or `flex` (both on by default), `wgpu` or `cuda`;
//! `--backend` picks among those compiled in.
//!
//! ```text
//! cargo run --release -p burn-sam-sample-examples --example custom_loop -- --method vsam --epochs 2
//! ```

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::data::dataset::Dataset;
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{decay::WeightDecayConfig, momentum::MomentumConfig, SgdConfig};
use burn_sam_sample::backend;
use burn_sam_sample::checkpoint::CheckpointSet;
use burn_sam_sample::learner::EpochLoader;
use burn_sam_sample::SamOptimizerRecord;
use burn_sam_sample_examples::cli::{parse, ResumeArgs, TrainArgs};
use burn_sam_sample_examples::evaluate_loader;
use burn_sam_sample_examples::fashion::{subset, FashionBatcher, FashionMnist, Fetch};
use burn_sam_sample_examples::methods::cosine_lr;
use burn_sam_sample_examples::model::{Cnn, CnnConfig};
use burn_sam_sample_examples::process::{end_quietly_on_closed_output, exit_with, usage_error, weights_digest};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

/// Train the Fashion-MNIST CNN in a custom loop.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    train: TrainArgs,
    /// Evaluate on the first N test images only.
    #[arg(long, value_parser = parse::positive_usize)]
    test_subset: Option<usize>,
    /// Where to save the model and optimizer state after each epoch (default:
    /// target/custom-loop/<method>); one run at a time (a second one is refused), and a fresh run
    /// refuses another run's checkpoints unless given --overwrite.
    #[arg(long)]
    artifact_dir: Option<PathBuf>,
    #[command(flatten)]
    resume: ResumeArgs,
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

fn train(Args { train: args, test_subset, artifact_dir, resume }: Args) -> Result<(), Box<dyn std::error::Error>> {
    // SAM steps allocate model-sized tensors the base step does not; keep freed memory for the
    // next step instead of faulting it in again (glibc; see docs/backends.md).
    burn_sam_sample::memory::keep_freed_memory();
    let device = backend::select(args.backend.as_deref())?;
    let train_device = device.clone().autodiff();
    let data = FashionMnist::load(args.data_dir.as_deref(), Fetch::from_flag(args.offline))?;
    let train = subset(&data.train, args.train_subset);
    let (steps_per_epoch, total_steps) = args.steps(train.len())?;
    let warmup = args.warmup(total_steps);
    let artifact_dir = args.artifact_dir(artifact_dir, "custom-loop");
    if artifact_dir.exists() && !artifact_dir.is_dir() {
        return Err(format!("--artifact-dir {} exists and is not a folder", artifact_dir.display()).into());
    }
    // One sealed set per epoch: the model and the optimizer (base optimizer + SAM state), of this
    // run only; the writer holds the directory's lock for the run.
    let run = args.fingerprint(&format!("{device:?}"), warmup).with("--weight-decay", 5e-4).with("--momentum", 0.9);
    let checkpoints = resume.sets(CheckpointSet::new(&artifact_dir, &["model", "optim"]), run).writer()?;
    let resume_from = match resume.resume {
        Some(resume) => {
            let epoch = resume.epoch(&checkpoints)?;
            if let Err(err) = checkpoints.check_resume(epoch, args.epochs) {
                // A finished run: say what its last set holds, then refuse to train nothing.
                if epoch == args.epochs && checkpoints.verify(epoch).is_ok() {
                    let model = CnnConfig::new().init(&train_device).try_load_file(checkpoints.file("model", epoch))?;
                    println!("checkpoint {epoch} holds the finished run: weights digest {}", weights_digest(&model));
                }
                return Err(format!("--resume {epoch}: {err}").into());
            }
            Some(epoch)
        }
        None => {
            checkpoints.start_fresh(resume.overwrite)?;
            None
        }
    };

    // Order and dropout of epoch e are functions of (seed, e), so a resumed run continues exactly.
    let train_loader = EpochLoader::new(train, FashionBatcher::plain(), args.batch_size, args.seed, &train_device)?
        .starting_at_epoch(resume_from.map_or(1, |epoch| epoch + 1));
    let test_loader = DataLoaderBuilder::new(FashionBatcher::plain())
        .batch_size(256)
        .build(subset(&data.test, test_subset))
        .to_device(&device);

    train_device.seed(args.seed);
    let mut model = CnnConfig::new().init(&train_device);
    let base = SgdConfig::new()
        .with_momentum(Some(MomentumConfig::new().with_momentum(0.9).with_dampening(0.0)))
        .with_weight_decay(Some(WeightDecayConfig::new(5e-4)))
        .init();
    let mut optim = args.method.config(total_steps, warmup, args.rho, args.seed).init(base)?;
    let loss_fn = CrossEntropyLossConfig::new().init(&train_device);
    let first_epoch = match resume_from {
        Some(epoch) => {
            model = model.try_load_file(checkpoints.file("model", epoch))?;
            let record = SamOptimizerRecord::load(checkpoints.file("optim", epoch))?;
            optim.load_record(record, &model).map_err(|e| format!("--resume {epoch}: {e}"))?;
            println!("resumed from the state saved after epoch {epoch} in {}", checkpoints.directory().display());
            epoch + 1
        }
        None => 1,
    };

    let bar = ProgressBar::new(total_steps as u64);
    bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} steps, {elapsed} elapsed, ETA {eta} | {msg}")?);
    let start = Instant::now();
    let mut step = (first_epoch - 1) * steps_per_epoch;
    bar.set_position(step as u64);
    for epoch in first_epoch..=args.epochs {
        for batch in train_loader.iter() {
            let batch = batch?;
            let lr = cosine_lr(args.lr, step, total_steps);
            let (next, out) = optim.step(lr, model, |m: &Cnn| {
                (loss_fn.forward(m.forward(batch.images.clone()), batch.targets.clone()), ())
            });
            model = next;
            step += 1;
            bar.inc(1);
            if step.is_multiple_of(20) {
                let t = out.telemetry;
                bar.set_message(format!(
                    "loss {:.3}, SAM fraction {:.2}, quota {}",
                    out.loss.into_scalar::<f32>(),
                    t.sam_fraction,
                    t.quota.map_or("-".into(), |s| format!("{s:.1}")),
                ));
            }
        }
        let accuracy = evaluate_loader(&model, test_loader.as_ref())?;
        bar.println(format!("epoch {epoch}: test accuracy {:.2}%", accuracy * 100.0));
        // Model and optimizer state together allow an exact restart from this point; the set
        // counts once sealed, so a run killed while writing leaves the previous one usable.
        model.clone().save_file(checkpoints.file("model", epoch))?;
        optim.to_record().save(checkpoints.file("optim", epoch))?;
        checkpoints.seal(epoch)?;
    }
    bar.finish_and_clear();
    let t = optim.telemetry();
    println!(
        "method {} | test accuracy {:.2}% | SAM fraction {:.3} | gradient passes/step {:.3} | steps {} | time {:.1} s",
        args.method.name(),
        evaluate_loader(&model, test_loader.as_ref())? * 100.0,
        t.sam_fraction,
        t.passes_per_step(),
        t.step,
        start.elapsed().as_secs_f64(),
    );
    println!("weights digest {}", weights_digest(&model));
    Ok(())
}
