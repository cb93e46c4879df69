//! Overhead of the SAM machinery against the bare base optimizer, on MLPs of 0.13 M, 1.07 M and
//! 9.4 M parameters (batch 64), as ratios measured in one run of one binary:
//!
//! - `base`: forward, backward and an SGD-with-momentum step;
//! - `cheap`: a vSAM cheap step (forward, backward, the non-finite guard, g + β^k·PSF, SGD);
//! - `cheap_unguarded`: the same without the non-finite guard;
//! - `cheap_plain`: a cheap step without reuse and without guard: only the engine's bookkeeping;
//! - `sam`: a SAM step (two forward/backward passes, perturbed clone, PSF, one host read, SGD),
//!   compared with two base steps;
//! - `minimum`: the base step with `g + t` added in place per parameter (`t` a fixed tensor of the
//!   gradient's shape), outside the engine: the memory traffic of the least a reuse step needs,
//!   one fused `g + c·PSF` (read 2n, write n), so `minimum/base` is the floor of `cheap/base` on
//!   this backend and `cheap_unguarded/minimum` the engine's excess over it.
//!
//! `cheap_plain` is also the base optimizer's step as it runs behind the engine, which hands it
//! contiguous (flattened and reshaped) gradients; on flex that step is often faster than the bare
//! one, so the ratios over `cheap_plain` isolate the engine's own tensor work.
//!
//! Each repeat times single steps of every kind in rotation (the order shifts by one each round),
//! about 1.5 s of base steps per kind; a round's ratios compare steps run one after the other, so
//! slow phases of a shared machine, which last longer than a round, cancel out. A repeat's ratio
//! is the median over its rounds, and the repeats' ratios are reported as median, min and max.
//!
//! ```text
//! cargo bench -p burn-sam-sample --bench overhead --no-default-features --features flex,train
//! ```
//!
//! Environment: `BURN_SAM_BENCH_BACKEND` (default: flex when compiled in, else ndarray),
//! `BURN_SAM_BENCH_REPEATS` (default 5), `BURN_SAM_BENCH_JSON` (a file to write the rows to, as
//! `docs/benchmarks/overhead.json`; an absolute path, since cargo runs benches in the package folder), `BURN_SAM_BENCH_KEEP_MEMORY=1` (call
//! `memory::keep_freed_memory` first).

use std::time::{Duration, Instant};

use burn::module::Module;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{momentum::MomentumConfig, GradientsParams, ModuleOptimizer, SgdConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn_sam_sample::policy::GatePolicy;
use burn_sam_sample::reuse::{CachePrecision, ReusePolicy};
use burn_sam_sample::{backend, memory, SamConfig, SamOptimizer};

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
    /// The base step plus `g + t` per parameter, `t` a fixed tensor of the gradient's shape: the
    /// memory traffic of the least a reuse step needs (one fused `g + c·PSF`: read 2n, write n),
    /// in place, with no allocation.
    Minimum(Option<Mlp>, ModuleOptimizer, Mlp),
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
            Self::Minimum(model, optim, term) => {
                let Some(current) = model.take() else { return };
                let mut grads = GradientsParams::from_grads(current.loss(x, y).backward(), &current);
                for (layer, fixed) in current.layers.iter().zip(&term.layers) {
                    if let Some(g) = grads.remove::<2>(layer.weight.id) {
                        grads.register(layer.weight.id, g + fixed.weight.val().inner());
                    }
                    if let (Some(bias), Some(fixed)) = (&layer.bias, &fixed.bias) {
                        if let Some(g) = grads.remove::<1>(bias.id) {
                            grads.register(bias.id, g + fixed.val().inner());
                        }
                    }
                }
                *model = Some(optim.step(0.001, current, grads));
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

fn round4(value: f64) -> f64 {
    (value * 1e4).round() / 1e4
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
    let kept = std::env::var("BURN_SAM_BENCH_KEEP_MEMORY").is_ok_and(|v| v == "1") && memory::keep_freed_memory();
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
        // What the vSAM cache of this model occupies, as the engine counts it (telemetry), stored
        // in f32 and in bf16 (a bf16 model's default cache has the bf16 size).
        let [cache_f32, cache_bf16] = [CachePrecision::F32, CachePrecision::Bf16].map(|precision| {
            let mut optim =
                cheap(reuse.clone(), true).with_cache_precision(precision).init(base()).expect("valid configuration");
            // The first step is the one SAM step, which fills the cache.
            let _ = optim.step(0.001, Mlp::new(&widths, &device), |m: &Mlp| (m.loss(&x, &y), ()));
            optim.telemetry().cache_bytes
        });
        println!("model {label}: reuse cache {cache_f32} bytes in f32, {cache_bf16} bytes in bf16");
        let mut kinds = [
            ("base", Stepper::Base(Some(Mlp::new(&widths, &device)), base())),
            ("cheap", sam_of(cheap(reuse.clone(), true))),
            ("cheap_unguarded", sam_of(cheap(reuse.clone(), false))),
            ("cheap_plain", sam_of(cheap(ReusePolicy::None, false))),
            ("sam", sam_of(SamConfig::sam())),
            ("minimum", Stepper::Minimum(Some(Mlp::new(&widths, &device)), base(), Mlp::new(&widths, &device))),
        ];
        // Warm up (the cheap kinds' first step is their one SAM step) and size a repeat to about
        // 1.5 s of base steps.
        for (_, stepper) in kinds.iter_mut() {
            for _ in 0..3 {
                stepper.step(&x, &y);
            }
        }
        let per_base = kinds[0].1.time(3, &x, &y, &device);
        let rounds = ((Duration::from_millis(1500).as_secs_f64() / per_base).ceil() as usize).clamp(20, 300);
        let mut ratios: Vec<[f64; 8]> = Vec::with_capacity(repeats);
        let mut base_ms = Vec::with_capacity(repeats);
        for _ in 0..repeats {
            // Per round, each kind's step over the base (or engine-base) step of the same round, so
            // that a slow phase of the machine, which lasts longer than a round, cancels out.
            let mut per_round: [Vec<f64>; 8] = Default::default();
            let mut base_times = Vec::with_capacity(rounds);
            for round in 0..rounds {
                let mut times = [0.0; 6];
                for offset in 0..kinds.len() {
                    let kind = (round + offset) % kinds.len();
                    times[kind] = kinds[kind].1.time(1, &x, &y, &device);
                }
                let [base, cheap, unguarded, plain, sam, minimum] = times;
                base_times.push(base);
                let round_ratios = [
                    cheap / base,
                    unguarded / base,
                    plain / base,
                    sam / (2.0 * base),
                    cheap / plain,
                    sam / (2.0 * plain),
                    minimum / base,
                    unguarded / minimum,
                ];
                for (column, ratio) in per_round.iter_mut().zip(round_ratios) {
                    column.push(ratio);
                }
            }
            base_ms.push(median_min_max(base_times).0 * 1000.0);
            ratios.push(per_round.map(|column| median_min_max(column).0));
        }
        let column = |i: usize| median_min_max(ratios.iter().map(|r| r[i]).collect());
        let [cheap, unguarded, plain, sam, cheap_engine, sam_engine, minimum, over_minimum] =
            std::array::from_fn(column);
        let base_ms = median_min_max(base_ms).0;
        let show = |(median, min, max): (f64, f64, f64)| format!("{median:.3} [{min:.3}, {max:.3}]");
        println!(
            "model {label} ({params} parameters, {rounds} rounds per repeat, base step {base_ms:.2} ms): cheap/base {}, \
             cheap_unguarded/base {}, cheap_plain/base {}, sam/two_base {}, minimum/base {}, \
             cheap_unguarded/minimum {}; over the engine's base step: cheap {}, sam/two {}",
            show(cheap),
            show(unguarded),
            show(plain),
            show(sam),
            show(minimum),
            show(over_minimum),
            show(cheap_engine),
            show(sam_engine)
        );
        rows.push(serde_json::json!({
            "model": label,
            "parameters": params,
            "backend": name,
            "repeats": repeats,
            "freed_memory_kept": kept,
            "fusion": cfg!(feature = "fusion"),
            "rounds_per_repeat": rounds,
            "base_step_ms": round4(base_ms),
            "cheap_over_base": round4(cheap.0),
            "cheap_over_base_min": round4(cheap.1),
            "cheap_over_base_max": round4(cheap.2),
            "cheap_unguarded_over_base": round4(unguarded.0),
            "cheap_plain_over_base": round4(plain.0),
            "sam_over_two_base": round4(sam.0),
            "sam_over_two_base_min": round4(sam.1),
            "sam_over_two_base_max": round4(sam.2),
            "minimum_over_base": round4(minimum.0),
            "cheap_unguarded_over_minimum": round4(over_minimum.0),
            "cheap_over_engine_base": round4(cheap_engine.0),
            "cache_bytes_f32": cache_f32,
            "cache_bytes_bf16": cache_bf16,
            "sam_over_two_engine_base": round4(sam_engine.0),
        }));
    }
    if let Ok(path) = std::env::var("BURN_SAM_BENCH_JSON") {
        let json = serde_json::to_string_pretty(&rows).unwrap_or_default() + "\n";
        if let Err(err) = std::fs::write(&path, json) {
            eprintln!("error: cannot write {path}: {err}");
            std::process::exit(1);
        }
        println!("rows written to {path}");
    }
}
