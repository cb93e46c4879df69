//! Soak test: 20,000 vSAM steps of a small MLP; reports resident memory after warm-up and at the
//! end, and the number of cached tensors, to show that nothing grows.
//!
//! Required features: one backend, `ndarray` or `flex` (both on by default), `wgpu` or `cuda`;
//! `--backend` picks among those compiled in.
//!
//! ```text
//! cargo run --release -p burn-sam-sample-examples --example soak -- --steps 20000
//! ```

use std::process::ExitCode;
use std::time::Instant;

use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{momentum::MomentumConfig, SgdConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn_sam_sample::{backend, SamConfig};
use burn_sam_sample_examples::cli::parse;
use burn_sam_sample_examples::process::{end_quietly_on_closed_output, exit_with};
use clap::Parser;

/// Run many vSAM steps and watch memory.
#[derive(Parser, Debug)]
struct Args {
    /// Steps to run (at least 1).
    #[arg(long, default_value_t = 20_000, value_parser = parse::positive_usize)]
    steps: usize,
    /// Backend: ndarray, flex, wgpu or cuda.
    #[arg(long)]
    backend: Option<String>,
}

#[derive(Module, Debug)]
struct Mlp {
    l1: Linear,
    l2: Linear,
    relu: Relu,
}

/// Resident set size in MiB, from /proc (Linux).
fn rss_mib() -> Option<f64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: f64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096.0 / (1024.0 * 1024.0))
}

fn main() -> ExitCode {
    end_quietly_on_closed_output();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    exit_with(soak(Args::parse()))
}

fn soak(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let device = backend::select(args.backend.as_deref())?.autodiff();
    device.seed(0);
    let mut model = Mlp {
        l1: LinearConfig::new(32, 64).init(&device),
        l2: LinearConfig::new(64, 10).init(&device),
        relu: Relu::new(),
    };
    let warmup = 200;
    let config = SamConfig::vsam(warmup);
    let base = SgdConfig::new().with_momentum(Some(MomentumConfig::new())).init();
    let mut optim = config.init(base)?;
    let x = Tensor::<2>::random([64, 32], Distribution::Normal(0.0, 1.0), &device);
    let y = Tensor::<2>::random([64, 10], Distribution::Normal(0.0, 1.0), &device);

    let start = Instant::now();
    let mut after_warmup = None;
    for step in 1..=args.steps {
        let noise = Tensor::<2>::random([64, 32], Distribution::Normal(0.0, 0.1), &device);
        let input = x.clone() + noise;
        let (next, _) = optim.step(0.01, model, |m: &Mlp| {
            let out = m.l2.forward(m.relu.forward(m.l1.forward(input.clone())));
            ((out - y.clone()).square().mean(), ())
        });
        model = next;
        if step == 2 * warmup {
            after_warmup = rss_mib();
        }
        if step % 5_000 == 0 || step == args.steps {
            let record = optim.to_record().engine;
            println!(
                "step {step:>6}: RSS {:.1} MiB, cached tensors {}, SAM fraction {:.3}, quota {:.1}, {:.1} s",
                rss_mib().unwrap_or(f64::NAN),
                record.cached_tensors(),
                optim.telemetry().sam_fraction,
                optim.telemetry().quota.unwrap_or(0.0),
                start.elapsed().as_secs_f64()
            );
        }
    }
    let end = rss_mib();
    println!(
        "soak: {} steps; RSS after warm-up (step {}) {:.1} MiB, at the end {:.1} MiB",
        args.steps,
        2 * warmup,
        after_warmup.unwrap_or(f64::NAN),
        end.unwrap_or(f64::NAN)
    );
    Ok(())
}
