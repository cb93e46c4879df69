//! Overhead of the SAM machinery against the bare base optimizer, on MLPs of about 0.1 M, 1 M and
//! 10 M parameters:
//!
//! - `base`: forward, backward and an SGD-with-momentum step;
//! - `cheap`: a vSAM cheap step (forward, backward, ‖g‖² on the device, g + β^k·PSF, guard, SGD);
//! - `cheap_unguarded`: the same without the non-finite guard (no ‖g‖², no mask);
//! - `cheap_plain`: a cheap step without reuse and without guard: only the engine's bookkeeping;
//! - `sam`: a SAM step (two forward/backward passes, perturbed clone, PSF, one host read, SGD);
//! - `two_base`: two base steps, the cost a SAM step is compared with.
//!
//! `cargo bench -p burn-sam-sample --bench overhead` (backend: `$BURN_SAM_BENCH_BACKEND`, else flex
//! when compiled in, else ndarray).

use std::hint::black_box;

use burn::module::Module;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::{momentum::MomentumConfig, GradientsParams, ModuleOptimizer, SgdConfig};
use burn::prelude::*;
use burn::tensor::Distribution;
use burn_sam_sample::policy::GatePolicy;
use burn_sam_sample::reuse::ReusePolicy;
use burn_sam_sample::{backend, SamConfig, SamOptimizer};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};

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

fn device() -> Device {
    let name = std::env::var("BURN_SAM_BENCH_BACKEND").ok().unwrap_or_else(|| {
        let enabled = backend::enabled_backends();
        if enabled.contains(&"flex") { "flex" } else { "ndarray" }.to_string()
    });
    backend::select(Some(&name)).expect("bench backend").autodiff()
}

fn base_step(model: Mlp, optim: &mut ModuleOptimizer, x: &Tensor<2>, y: &Tensor<2>) -> Mlp {
    let grads = GradientsParams::from_grads(model.loss(x, y).backward(), &model);
    optim.step(0.01, model, grads)
}

fn sam_step(model: Mlp, optim: &mut SamOptimizer, x: &Tensor<2>, y: &Tensor<2>) -> Mlp {
    optim.step(0.01, model, |m: &Mlp| (m.loss(x, y), ())).0
}

fn overhead(c: &mut Criterion) {
    let device = device();
    let sizes: [(&str, Vec<usize>); 3] =
        [("0.1M", vec![256, 256, 256, 10]), ("1M", vec![784, 1024, 256, 10]), ("10M", vec![2048, 2048, 2048, 512, 10])];
    let mut group = c.benchmark_group("step");
    group.sample_size(10);
    group.warm_up_time(std::time::Duration::from_secs(1));
    group.measurement_time(std::time::Duration::from_secs(4));
    for (name, widths) in sizes {
        device.seed(0);
        let x = Tensor::<2>::random([64, widths[0]], Distribution::Normal(0.0, 1.0), &device);
        let y = Tensor::<2>::random([64, *widths.last().unwrap()], Distribution::Normal(0.0, 1.0), &device);
        let params = Mlp::new(&widths, &device).num_params();
        println!("model {name}: {params} parameters");

        let mut model = Mlp::new(&widths, &device);
        let mut optim = base();
        group.bench_function(BenchmarkId::new("base", name), |b| {
            b.iter(|| {
                model = base_step(model.clone(), &mut optim, &x, &y);
                let _ = device.sync();
            })
        });
        group.bench_function(BenchmarkId::new("two_base", name), |b| {
            b.iter(|| {
                model = base_step(model.clone(), &mut optim, &x, &y);
                model = base_step(model.clone(), &mut optim, &x, &y);
                let _ = device.sync();
            })
        });

        // One SAM step first, then every step is cheap (and mixes the PSF in, where reused).
        let cheap_variants = [
            ("cheap", ReusePolicy::DecayedPsf { beta: 0.999_999, max_reuse: u32::MAX }, true),
            ("cheap_unguarded", ReusePolicy::DecayedPsf { beta: 0.999_999, max_reuse: u32::MAX }, false),
            ("cheap_plain", ReusePolicy::None, false),
        ];
        for (label, reuse, guard) in cheap_variants {
            let config = SamConfig::new()
                .with_policy(GatePolicy::Periodic { k: usize::MAX })
                .with_reuse(reuse)
                .with_guard_non_finite(guard);
            let mut sam = config.init(base()).unwrap();
            model = sam_step(model.clone(), &mut sam, &x, &y);
            group.bench_function(BenchmarkId::new(label, name), |b| {
                b.iter(|| {
                    model = sam_step(model.clone(), &mut sam, &x, &y);
                    let _ = device.sync();
                })
            });
            assert_eq!(sam.telemetry().sam_steps, 1, "only the first step was a SAM step");
        }

        let mut sam = SamConfig::sam().init(base()).unwrap();
        group.bench_function(BenchmarkId::new("sam", name), |b| {
            b.iter(|| {
                model = sam_step(model.clone(), &mut sam, &x, &y);
                let _ = device.sync();
            })
        });
        black_box(&model);
    }
    group.finish();
}

criterion_group!(benches, overhead);
criterion_main!(benches);
