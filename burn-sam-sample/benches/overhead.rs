//! Overhead of the SAM machinery against the bare base optimizer, on MLPs of 0.13 M, 1.07 M and
//! 9.4 M parameters (batch 64), as ratios measured in one run of one binary:
//!
//! - `base`: forward, backward and an SGD-with-momentum step;
//! - `cheap`: a vSAM cheap step (forward, backward, the non-finite guard, g + β^k·PSF, SGD);
//! - `cheap_unguarded`: the same without the non-finite guard;
//! - `cheap_plain`: a cheap step without reuse and without guard: only the engine's bookkeeping;
//! - `sam`: a SAM step (two forward/backward passes, perturbed clone, PSF, one host read, SGD),
//!   compared with two base steps.
//!
//! `cheap_plain` is also the base optimizer's step as it runs behind the engine, which hands it
//! contiguous (flattened and reshaped) gradients; on flex that step is often faster than the bare
//! one, so the ratios over `cheap_plain` isolate the engine's own tensor work.
//!
//! Each repeat times single steps of every kind in rotation (the order shifts by one each round),
//! so slow phases of a shared machine hit all kinds alike; a repeat's ratio is that of the kinds'
//! median step times, and the repeats' ratios are reported as median, min and max.
//!
//! ```text
//! cargo bench -p burn-sam-sample --bench overhead --no-default-features --features flex,train
//! ```
//!
//! Environment: `BURN_SAM_BENCH_BACKEND` (default: flex when compiled in, else ndarray),
//! `BURN_SAM_BENCH_REPEATS` (default 5), `BURN_SAM_BENCH_JSON` (a file to write the rows to, as
//! `docs/benchmarks/overhead.json`; an absolute path, since cargo runs benches in the package folder), `BURN_SAM_BENCH_KEEP_MEMORY=1` (call
//! `backend::keep_freed_memory` first).

use std::time::{Duration, Instant};

use burn::module::Module;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{momentum::MomentumConfig, GradientsParams, ModuleOptimizer, SgdConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn_sam_sample::policy::GatePolicy;
use burn_sam_sample::reuse::ReusePolicy;
use burn_sam_sample::{backend, SamConfig, SamOptimizer};

#[derive(Module, Debug)]
struct Mlp {
    layers: Vec<Linear>,
    relu: Relu,
}

impl Mlp {
    fn new(widths: &[usize], device: &Device) -> Self {
        Self {
            layers: widths.windows(2).map(|w| LinearConfig::new(w[0], w[1]).init(device)).collect(),
            relu: Relu::new(),
        }
    }

    fn loss(&self, x: &Tensor<2>, y: &Tensor<2>) -> Tensor<1> {
        let mut h = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            h = layer.forward(h);
            if i + 1 < self.layers.len() {
                h = self.relu.forward(h);
            }
        }
        (h - y.clone()).square().mean()
    }
}

fn base() -> ModuleOptimizer {
    SgdConfig::new().with_momentum(Some(MomentumConfig::new())).init()
}

fn backend_name() -> String {
    std::env::var("BURN_SAM_BENCH_BACKEND").ok().unwrap_or_else(|| {
        let enabled = backend::enabled_backends();
        if enabled.contains(&"flex") { "flex" } else { "ndarray" }.to_string()
    })
}

/// One kind of step with its own model and optimizer state.
enum Stepper {
    Base(Option<Mlp>, ModuleOptimizer),
    Sam(Option<Mlp>, Box<SamOptimizer>),
}

impl Stepper {
    fn step(&mut self, x: &Tensor<2>, y: &Tensor<2>) {
        match self {
            Self::Base(model, optim) => {
                let Some(current) = model.take() else { return };
                let grads = GradientsParams::from_grads(current.loss(x, y).backward(), &current);
                *model = Some(optim.step(0.001, current, grads));
            }
            Self::Sam(model, optim) => {
                let Some(current) = model.take() else { return };
                *model = Some(optim.step(0.001, current, |m: &Mlp| (m.loss(x, y), ())).0);
            }
        }
    }

    /// Seconds per step over `steps` steps, the device synchronized at both ends.
    fn time(&mut self, steps: usize, x: &Tensor<2>, y: &Tensor<2>, device: &Device) -> f64 {
        let _ = device.sync();
        let start = Instant::now();
        for _ in 0..steps {
            self.step(x, y);
        }
        let _ = device.sync();
        start.elapsed().as_secs_f64() / steps as f64
    }
}

fn cheap(reuse: ReusePolicy, guard: bool) -> SamConfig {
    SamConfig::new().with_policy(GatePolicy::Periodic { k: usize::MAX }).with_reuse(reuse).with_guard_non_finite(guard)
}

fn median_min_max(mut values: Vec<f64>) -> (f64, f64, f64) {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    let median = if n % 2 == 1 { values[n / 2] } else { (values[n / 2 - 1] + values[n / 2]) / 2.0 };
    (median, values[0], values[n - 1])
}

fn main() {
    // `cargo bench` passes `--bench`; no other argument is read.
    let name = backend_name();
    let device = match backend::select(Some(&name)) {
        Ok(device) => device.autodiff(),
        Err(err) => {
            eprintln!("error: {err}");
            std::process::exit(2);
        }
    };
    let kept = std::env::var("BURN_SAM_BENCH_KEEP_MEMORY").is_ok_and(|v| v == "1") && backend::keep_freed_memory();
    let repeats: usize = std::env::var("BURN_SAM_BENCH_REPEATS").ok().and_then(|v| v.parse().ok()).unwrap_or(5).max(1);
    let sizes: [(&str, Vec<usize>); 3] =
        [("0.1M", vec![256, 256, 256, 10]), ("1M", vec![784, 1024, 256, 10]), ("10M", vec![2048, 2048, 2048, 512, 10])];
    let reuse = ReusePolicy::DecayedPsf { beta: 0.999_999, max_reuse: u32::MAX };
    let mut rows = Vec::new();
    println!("backend {name}, {repeats} repeats, freed memory kept: {kept}; ratios: median [min, max]");
    for (label, widths) in sizes {
        device.seed(0);
        let x = Tensor::<2>::random([64, widths[0]], Distribution::Normal(0.0, 1.0), &device);
        let y = Tensor::<2>::random([64, widths[widths.len() - 1]], Distribution::Normal(0.0, 1.0), &device);
        let params = Mlp::new(&widths, &device).num_params();
        let sam_of = |config: SamConfig| {
            let optim = config.init(base()).expect("valid configuration");
            Stepper::Sam(Some(Mlp::new(&widths, &device)), Box::new(optim))
        };
        let mut kinds = [
            ("base", Stepper::Base(Some(Mlp::new(&widths, &device)), base())),
            ("cheap", sam_of(cheap(reuse.clone(), true))),
            ("cheap_unguarded", sam_of(cheap(reuse.clone(), false))),
            ("cheap_plain", sam_of(cheap(ReusePolicy::None, false))),
            ("sam", sam_of(SamConfig::sam())),
        ];
        // Warm up (the cheap kinds' first step is their one SAM step) and size the blocks to
        // about half a second of base steps.
        for (_, stepper) in kinds.iter_mut() {
            for _ in 0..3 {
                stepper.step(&x, &y);
            }
        }
        let per_base = kinds[0].1.time(3, &x, &y, &device);
        let steps = ((Duration::from_millis(500).as_secs_f64() / per_base).ceil() as usize).clamp(5, 100);
        let mut ratios: Vec<[f64; 6]> = Vec::with_capacity(repeats);
        for _ in 0..repeats {
            let mut times: [Vec<f64>; 5] = Default::default();
            for round in 0..steps {
                for offset in 0..kinds.len() {
                    let kind = (round + offset) % kinds.len();
                    times[kind].push(kinds[kind].1.time(1, &x, &y, &device));
                }
            }
            let median = |values: &[f64]| median_min_max(values.to_vec()).0;
            let base = median(&times[0]);
            let plain = median(&times[3]);
            ratios.push([
                median(&times[1]) / base,
                median(&times[2]) / base,
                plain / base,
                median(&times[4]) / (2.0 * base),
                median(&times[1]) / plain,
                median(&times[4]) / (2.0 * plain),
            ]);
        }
        let column = |i: usize| median_min_max(ratios.iter().map(|r| r[i]).collect());
        let (cheap, unguarded, plain, sam) = (column(0), column(1), column(2), column(3));
        let (cheap_engine, sam_engine) = (column(4), column(5));
        println!(
            "model {label} ({params} parameters, {steps} steps of each kind per repeat): cheap/base {:.3} [{:.3}, {:.3}], \
             cheap_unguarded/base {:.3} [{:.3}, {:.3}], cheap_plain/base {:.3} [{:.3}, {:.3}], \
             sam/two_base {:.3} [{:.3}, {:.3}]; over the engine's base step: cheap {:.3} [{:.3}, {:.3}], \
             sam/two {:.3} [{:.3}, {:.3}]",
            cheap.0, cheap.1, cheap.2, unguarded.0, unguarded.1, unguarded.2, plain.0, plain.1, plain.2, sam.0,
            sam.1, sam.2, cheap_engine.0, cheap_engine.1, cheap_engine.2, sam_engine.0, sam_engine.1, sam_engine.2
        );
        rows.push(format!(
            "  {{\"model\": \"{label}\", \"parameters\": {params}, \"backend\": \"{name}\", \"repeats\": {repeats}, \"freed_memory_kept\": {kept}, \
             \"steps_per_repeat\": {steps}, \"cheap_over_base\": {:.4}, \"cheap_over_base_min\": {:.4}, \
             \"cheap_over_base_max\": {:.4}, \"cheap_unguarded_over_base\": {:.4}, \"cheap_plain_over_base\": {:.4}, \
             \"sam_over_two_base\": {:.4}, \"sam_over_two_base_min\": {:.4}, \"sam_over_two_base_max\": {:.4}, \
             \"cheap_over_engine_base\": {:.4}, \"sam_over_two_engine_base\": {:.4}}}",
            cheap.0, cheap.1, cheap.2, unguarded.0, plain.0, sam.0, sam.1, sam.2, cheap_engine.0, sam_engine.0
        ));
    }
    if let Ok(path) = std::env::var("BURN_SAM_BENCH_JSON") {
        let json = format!("[\n{}\n]\n", rows.join(",\n"));
        if let Err(err) = std::fs::write(&path, json) {
            eprintln!("error: cannot write {path}: {err}");
            std::process::exit(1);
        }
        println!("rows written to {path}");
    }
}
