//! What SAM's ascent loses in half precision: trains the benchmark's Fashion-MNIST CNN with its
//! parameters in bf16 (or f16) and, at the start and after each epoch, measures on a training
//! batch how much of ε = ρ·g/‖g‖ survives `w + ε`, computed two ways:
//!
//! - **direct** (what the engine does): ε rounded to the parameters' dtype, then added in it,
//!   `w + cast(ε)`;
//! - **from an f32 copy**: `cast(f32(w) + ε)`, rounded once.
//!
//! Printed per ρ: the share of weights the perturbation leaves unchanged, ‖w_ε − w‖/‖ε‖ (the part
//! of ε's norm that survives) and how far the two ways' second-pass gradients g_s lie apart,
//! relative to the PSF (‖g_s − g_s'‖ / ‖g_s' − g‖). The numbers are in `docs/precision.md`.
//!
//! The CNN runs without dropout here (each pass would draw another mask, and the measurement
//! compares passes); BatchNorm uses the batch's statistics, as in training.
//!
//! Required features: `flex` (on by default), or a GPU backend that computes in the dtype, and
//! `ndarray` (on by default) for the f32 reference.
//!
//! ```text
//! cargo run --release -p burn-sam-sample-examples --example ascent_rounding -- --epochs 3
//! ```

use std::collections::HashMap;
use std::process::ExitCode;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataset::Dataset;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{momentum::MomentumConfig, GradientsParams, SgdConfig};
use burn::prelude::*;
use burn::tensor::DType;
use burn_sam_sample::backend;
use burn_sam_sample_examples::cli::{parse, Precision};
use burn_sam_sample_examples::fashion::{subset, FashionBatch, FashionBatcher, FashionMnist, Fetch};
use burn_sam_sample_examples::model::{Cnn, CnnConfig};
use burn_sam_sample_examples::process::{end_quietly_on_closed_output, exit_with};
use clap::Parser;
use rand::seq::SliceRandom;
use rand::SeedableRng;

/// Measure the rounding of SAM's ascent on a half-precision model.
#[derive(Parser, Debug)]
struct Args {
    /// Parameter dtype: bf16 or f16.
    #[arg(long, value_enum, default_value = "bf16")]
    precision: Precision,
    /// Training epochs (measured at the start and after each).
    #[arg(long, default_value_t = 3, value_parser = parse::positive_usize)]
    epochs: usize,
    /// Training images (the first N).
    #[arg(long, default_value_t = 5000, value_parser = parse::positive_usize)]
    train_subset: usize,
    /// Batch size.
    #[arg(long, default_value_t = 64, value_parser = parse::positive_usize)]
    batch_size: usize,
    /// Learning rate of the SGD (momentum 0.9) that trains the model between measurements.
    #[arg(long, default_value_t = 0.05, value_parser = parse::positive_f64)]
    lr: f64,
    /// The radii ρ to measure.
    #[arg(long, value_delimiter = ',', default_value = "0.05,0.1", value_parser = parse::positive_f64)]
    rho: Vec<f64>,
    /// Seed of the weights and the data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Backend (default: flex when compiled in).
    #[arg(long)]
    backend: Option<String>,
}

fn main() -> ExitCode {
    end_quietly_on_closed_output();
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let args = Args::parse();
    if args.precision == Precision::F32 {
        <Args as clap::CommandFactory>::command()
            .error(clap::error::ErrorKind::InvalidValue, "--precision must be bf16 or f16: f32 rounds nothing here")
            .exit();
    }
    exit_with(measure(args))
}

/// The two ways of forming `w + ε` on a copy of the module.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Way {
    Direct,
    FromF32,
}

struct Perturb<'a> {
    grads: &'a GradientsParams,
    scale: f64,
    way: Way,
}

impl ModuleMapper for Perturb<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(g) = self.grads.get::<D>(param.id) else { return param };
        let (scale, way) = (self.scale, self.way);
        param.map(|w| {
            let w = w.inner();
            let dtype = w.dtype();
            let eps = g.cast(DType::F32).mul_scalar(scale);
            let perturbed = match way {
                Way::Direct => w + eps.cast(dtype),
                Way::FromF32 => (w.cast(DType::F32) + eps).cast(dtype),
            };
            Tensor::from_inner(perturbed).require_grad()
        })
    }
}

/// Float parameters by id, flattened to f32 on the host (a measurement program may read).
struct Values(HashMap<ParamId, Vec<f32>>);

impl ModuleVisitor for Values {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.0.insert(param.id, param.val().into_data().iter::<f32>().collect());
    }
}

fn values<M: Module>(module: &M) -> HashMap<ParamId, Vec<f32>> {
    let mut visitor = Values(HashMap::new());
    module.visit(&mut visitor);
    visitor.0
}

/// Gradients by id, as f32 on the host.
struct GradValues<'a>(&'a GradientsParams, HashMap<ParamId, Vec<f64>>);

impl ModuleVisitor for GradValues<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(g) = self.0.get::<D>(param.id) {
            self.1.insert(param.id, g.into_data().iter::<f32>().map(f64::from).collect());
        }
    }
}

fn grad_values<M: Module>(module: &M, grads: &GradientsParams) -> HashMap<ParamId, Vec<f64>> {
    let mut visitor = GradValues(grads, HashMap::new());
    module.visit(&mut visitor);
    visitor.1
}

fn loss(model: &Cnn, batch: &FashionBatch) -> Tensor<1> {
    CrossEntropyLossConfig::new()
        .init(&batch.images.device())
        .forward(model.forward(batch.images.clone()), batch.targets.clone())
}

/// One measurement row.
struct Row {
    /// Share of weights `w + ε` leaves unchanged: direct, from an f32 copy.
    unchanged: [f64; 2],
    /// ‖w_ε − w‖/ρ: direct, from an f32 copy.
    surviving: [f64; 2],
    /// ‖PSF − PSF₃₂‖/‖PSF₃₂‖: direct, from an f32 copy.
    psf_error: [f64; 2],
    /// ‖g − g₃₂‖/‖g₃₂‖.
    grad_error: f64,
    /// ‖PSF₃₂‖/‖g₃₂‖.
    psf_ratio: f64,
}

fn norm(values: &HashMap<ParamId, Vec<f64>>) -> f64 {
    values.values().flatten().map(|v| v * v).sum::<f64>().sqrt()
}

/// ‖a − b‖ over the ids of `a`.
fn distance(a: &HashMap<ParamId, Vec<f64>>, b: &HashMap<ParamId, Vec<f64>>) -> f64 {
    a.iter().flat_map(|(id, x)| x.iter().zip(&b[id]).map(|(x, y)| (x - y).powi(2))).sum::<f64>().sqrt()
}

fn minus(a: &HashMap<ParamId, Vec<f64>>, b: &HashMap<ParamId, Vec<f64>>) -> HashMap<ParamId, Vec<f64>> {
    a.iter().map(|(id, x)| (*id, x.iter().zip(&b[id]).map(|(x, y)| x - y).collect())).collect()
}

/// g and g_s of `model` on `batch` with the ascent formed `way`, and the perturbed weights.
fn passes(model: &Cnn, batch: &FashionBatch, rho: f64, way: Way) -> [HashMap<ParamId, Vec<f64>>; 2] {
    let grads = GradientsParams::from_grads(loss(model, batch).backward(), model);
    let g = grad_values(model, &grads);
    let scale = rho / (norm(&g) + 1e-12);
    let perturbed = model.clone().map(&mut Perturb { grads: &grads, scale, way });
    let second = GradientsParams::from_grads(loss(&perturbed, batch).backward(), &perturbed);
    [g, grad_values(&perturbed, &second)]
}

fn measure_once(model: &Cnn, batch: &FashionBatch, rho: f64, reference: &Device) -> Row {
    // The reference: the same weights and batch in f32 (a cast is exact), g, ε and g_s in f32, on
    // a device whose default float is f32 (Burn's BatchNorm makes its constants in the device's
    // default dtype).
    let model32 = model.clone().with_float_dtype(DType::F32).fork(reference);
    let batch32 = FashionBatch {
        images: batch.images.clone().cast(DType::F32).to_device(reference),
        targets: batch.targets.clone().to_device(reference),
    };
    let [g32, gs32] = passes(&model32, &batch32, rho, Way::FromF32);
    let psf32 = minus(&gs32, &g32);

    let grads = GradientsParams::from_grads(loss(model, batch).backward(), model);
    let g = grad_values(model, &grads);
    let scale = rho / (norm(&g) + 1e-12);
    let w = values(model);
    let mut row = Row {
        unchanged: [0.0; 2],
        surviving: [0.0; 2],
        psf_error: [0.0; 2],
        grad_error: distance(&g, &g32) / norm(&g32),
        psf_ratio: norm(&psf32) / norm(&g32),
    };
    for (i, way) in [Way::Direct, Way::FromF32].into_iter().enumerate() {
        let perturbed = model.clone().map(&mut Perturb { grads: &grads, scale, way });
        let p = values(&perturbed);
        let (mut same, mut total, mut moved) = (0usize, 0usize, 0.0f64);
        for (id, before) in &w {
            if !g.contains_key(id) {
                continue;
            }
            for (a, b) in before.iter().zip(&p[id]) {
                same += usize::from(a == b);
                total += 1;
                moved += (f64::from(*b) - f64::from(*a)).powi(2);
            }
        }
        row.unchanged[i] = same as f64 / total as f64;
        row.surviving[i] = moved.sqrt() / rho;
        let second = GradientsParams::from_grads(loss(&perturbed, batch).backward(), &perturbed);
        let psf = minus(&grad_values(&perturbed, &second), &g);
        row.psf_error[i] = distance(&psf, &psf32) / norm(&psf32);
    }
    row
}

fn measure(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let name = args.backend.clone().or_else(|| backend::enabled_backends().contains(&"flex").then(|| "flex".into()));
    let mut device = backend::select(name.as_deref())?;
    args.precision.configure(&mut device)?;
    let device = device.autodiff();
    let reference = backend::select(Some("ndarray"))
        .map_err(|e| format!("the f32 reference runs on ndarray, which this build lacks: {e}"))?
        .autodiff();
    let data = FashionMnist::load(None, Fetch::from_flag(true))?;
    let train = subset(&data.train, Some(args.train_subset));
    device.seed(args.seed);
    // Without dropout: each pass would draw another mask, and the measurement compares passes.
    let mut model = CnnConfig::new().with_channels(16).with_hidden(128).with_dropout(0.0).init(&device);
    let mut optim = SgdConfig::new().with_momentum(Some(MomentumConfig::new().with_momentum(0.9))).init();
    let mut order: Vec<usize> = (0..train.len()).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(args.seed);
    let probe_items: Vec<_> = (0..args.batch_size).filter_map(|i| train.get(i).ok()).collect();
    let probe = FashionBatcher::plain().batch(probe_items, &device);

    println!(
        "{} model, {} parameters; ρ per row; `direct` = w + cast(ε), `f32 copy` = cast(f32(w) + ε)\n",
        args.precision.name(),
        model.num_params()
    );
    println!(
        "| epoch | ρ | unchanged: direct | unchanged: f32 copy | ‖Δw‖/ρ: direct | ‖Δw‖/ρ: f32 copy | \
         ‖g − g₃₂‖/‖g₃₂‖ | ‖PSF₃₂‖/‖g₃₂‖ | PSF error: direct | PSF error: f32 copy |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for epoch in 0..=args.epochs {
        if epoch > 0 {
            order.shuffle(&mut rng);
            for chunk in order.chunks(args.batch_size) {
                let items: Vec<_> = chunk.iter().filter_map(|&i| train.get(i).ok()).collect();
                let batch = FashionBatcher::plain().batch(items, &device);
                let grads = GradientsParams::from_grads(loss(&model, &batch).backward(), &model);
                model = optim.step(args.lr, model, grads);
            }
        }
        for &rho in &args.rho {
            let row = measure_once(&model, &probe, rho, &reference);
            println!(
                "| {epoch} | {rho} | {:.1} % | {:.1} % | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
                100.0 * row.unchanged[0],
                100.0 * row.unchanged[1],
                row.surviving[0],
                row.surviving[1],
                row.grad_error,
                row.psf_ratio,
                row.psf_error[0],
                row.psf_error[1]
            );
        }
    }
    Ok(())
}
