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
use burn_sam_sample_examples::cli::TrainArgs;
use burn_sam_sample_examples::fashion::{subset, FashionBatch, FashionBatcher, FashionMnist, Fetch};
use burn_sam_sample_examples::methods::cosine_lr;
use burn_sam_sample_examples::model::{Cnn, CnnConfig};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

/// Train the Fashion-MNIST CNN in a custom loop.
#[derive(Parser, Debug)]
struct Args {
    #[command(flatten)]
    train: TrainArgs,
    /// Where to save the model and optimizer state after each epoch.
    #[arg(long, default_value = "target/custom-loop")]
    artifact_dir: PathBuf,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    match train(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

fn train(Args { train: args, artifact_dir }: Args) -> Result<(), Box<dyn std::error::Error>> {
    let device = backend::select(args.backend.as_deref())?;
    let train_device = device.clone().autodiff();
    let data = FashionMnist::load(args.data_dir.as_deref(), Fetch::from_flag(args.offline))?;
    let train = subset(&data.train, args.train_subset);
    let (_, total_steps) = args.steps(train.len())?;
    let warmup = args.warmup(total_steps);

    let train_loader = DataLoaderBuilder::new(FashionBatcher::plain())
        .batch_size(args.batch_size)
        .shuffle(args.seed)
        .build(train)
        .to_device(&train_device);
    let test_loader =
        DataLoaderBuilder::new(FashionBatcher::plain()).batch_size(256).build(data.test).to_device(&device);

    train_device.seed(args.seed);
    let mut model = CnnConfig::new().init(&train_device);
    let base = SgdConfig::new()
        .with_momentum(Some(MomentumConfig::new().with_momentum(0.9).with_dampening(0.0)))
        .with_weight_decay(Some(WeightDecayConfig::new(5e-4)))
        .init();
    let mut optim = args.method.config(total_steps, warmup, args.rho, args.seed).init(base)?;
    let loss_fn = CrossEntropyLossConfig::new().init(&train_device);
    std::fs::create_dir_all(&artifact_dir)?;

    let bar = ProgressBar::new(total_steps as u64);
    bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} steps, {elapsed} elapsed, ETA {eta} | {msg}")?);
    let start = Instant::now();
    let mut step = 0usize;
    for epoch in 1..=args.epochs {
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
        // Model and optimizer state together allow an exact restart from this point.
        model.clone().save_file(artifact_dir.join(format!("model-{epoch}.bpk")))?;
        optim.to_record().save(artifact_dir.join(format!("optim-{epoch}.bpk")))?;
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
    Ok(())
}
