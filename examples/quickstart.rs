//! Quick start: SGD, SAM and vSAM side by side on a small synthetic task, in seconds on a CPU.
//!
//! Required features: one backend, `ndarray` or `flex` (both on by default), `wgpu` or `cuda`;
//! `--backend` picks among those compiled in.
//!
//! ```text
//! cargo run --release -p burn-sam-sample-examples --example quickstart
//! ```

use std::process::ExitCode;
use std::time::Instant;

use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{momentum::MomentumConfig, SgdConfig};
use burn::prelude::*;
use burn_sam_sample::{backend, SamConfig};
use burn_sam_sample_examples::cli::parse;
use burn_sam_sample_examples::process::{end_quietly_on_closed_output, exit_with};
use burn_sam_sample_examples::{accuracy, spirals};
use clap::Parser;

/// SGD vs SAM vs vSAM on three noisy spirals.
#[derive(Parser, Debug)]
struct Args {
    /// Backend: ndarray, flex, wgpu or cuda (default: the most capable one compiled in).
    #[arg(long)]
    backend: Option<String>,
    /// Training steps per method (at least 1).
    #[arg(long, default_value_t = 600, value_parser = parse::positive_usize)]
    steps: usize,
    /// Seed of data and model.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(Module, Debug)]
struct Net {
    l1: Linear,
    l2: Linear,
    l3: Linear,
    relu: Relu,
}

impl Net {
    fn new(device: &Device) -> Self {
        Self {
            l1: LinearConfig::new(2, 64).init(device),
            l2: LinearConfig::new(64, 64).init(device),
            l3: LinearConfig::new(64, 3).init(device),
            relu: Relu::new(),
        }
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let x = self.relu.forward(self.l1.forward(x));
        let x = self.relu.forward(self.l2.forward(x));
        self.l3.forward(x)
    }
}

fn main() -> ExitCode {
    end_quietly_on_closed_output();
    env_logger::init();
    exit_with(compare(Args::parse()))
}

fn compare(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let device = backend::select(args.backend.as_deref())?;
    println!("backend: {device:?}");
    let (x_train, y_train) = spirals(100, 0.6, args.seed, &device);
    let (x_test, y_test) = spirals(500, 0.6, args.seed + 1, &device);
    let n_train = y_train.dims()[0];
    let batch = 50;
    let warmup = args.steps / 10;
    let methods = [("sgd", SamConfig::base_only()), ("sam", SamConfig::sam()), ("vsam", SamConfig::vsam(warmup))];
    println!(
        "{:<6} {:>10} {:>9} {:>12} {:>13} {:>8}",
        "method", "train loss", "test acc", "SAM fraction", "passes/step", "time"
    );
    for (name, config) in methods {
        let device = device.clone().autodiff();
        device.seed(args.seed);
        let mut model = Net::new(&device);
        let base = SgdConfig::new().with_momentum(Some(MomentumConfig::new().with_dampening(0.0))).init();
        let mut sam = config.with_seed(args.seed).init(base)?;
        let loss_fn = CrossEntropyLossConfig::new().init(&device);
        let start = Instant::now();
        let mut last_loss = Tensor::<1>::zeros([1], &device);
        let mut telemetry = sam.telemetry();
        for step in 0..args.steps {
            let offset = (step * batch) % n_train;
            let rows = offset..(offset + batch).min(n_train);
            let x = x_train.clone().slice(rows.clone());
            let y = y_train.clone().slice(rows);
            let (next, out) = sam.step(0.05, model, |m: &Net| (loss_fn.forward(m.forward(x.clone()), y.clone()), ()));
            model = next;
            last_loss = out.loss;
            telemetry = out.telemetry;
        }
        let elapsed = start.elapsed();
        let loss: f32 = last_loss.into_scalar();
        let acc = accuracy(model.valid().forward(x_test.clone()), y_test.clone());
        println!(
            "{name:<6} {loss:>10.6} {:>8.1}% {:>12.2} {:>13.2} {:>7.2}s",
            acc * 100.0,
            telemetry.sam_fraction,
            telemetry.passes_per_step(),
            elapsed.as_secs_f64()
        );
    }
    Ok(())
}
