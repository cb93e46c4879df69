//! Shared fixtures of the integration tests: the device, small models with fixed weights, and
//! comparison helpers.

pub mod reference {
    #![allow(missing_docs, clippy::excessive_precision)]
    include!("../reference/sam_reference_values.rs");
}

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::nn::{BatchNorm, BatchNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::tanh;

/// The name of the backend the tests run on: `$BURN_SAM_TEST_BACKEND`, else the first enabled of
/// ndarray, flex, wgpu and cuda (CPU first: `Device::default()` would pick a GPU backend whenever
/// one is compiled in).
pub fn backend_name() -> String {
    std::env::var("BURN_SAM_TEST_BACKEND").unwrap_or_else(|_| {
        let enabled = burn_sam_sample::backend::enabled_backends();
        ["ndarray", "flex", "wgpu", "cuda"]
            .into_iter()
            .find(|name| enabled.contains(name))
            .expect("the tests need a backend feature: ndarray, flex, wgpu or cuda")
            .to_string()
    })
}

/// The device every test runs on (see [`backend_name`]), with autodiff.
pub fn device() -> Device {
    burn_sam_sample::backend::select(Some(&backend_name())).expect("the test backend is compiled in").autodiff()
}

/// A device of the test backend on which `dtype` computes (storage, conversion and arithmetic),
/// else flex when it is compiled in, else `None` (with autodiff).
pub fn half_device(dtype: burn::tensor::DType) -> Option<Device> {
    let device = device();
    if device.supports_dtype(dtype) {
        return Some(device);
    }
    burn_sam_sample::backend::select(Some("flex")).ok().map(Device::autodiff).filter(|flex| flex.supports_dtype(dtype))
}

struct Cast(burn::tensor::DType);

impl burn::module::ModuleMapper for Cast {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        let require_grad = tensor.is_require_grad();
        let mut cast = Tensor::from_inner(tensor.inner().cast(self.0));
        if require_grad {
            cast = cast.require_grad();
        }
        Param::from_mapped_value(id, cast, mapper)
    }
}

/// `module` with every float parameter cast to `dtype` (ids and require-grad settings kept).
pub fn cast_module<M: Module>(module: M, dtype: burn::tensor::DType) -> M {
    module.map(&mut Cast(dtype))
}

/// Linear 3→4, tanh, Linear 4→2: the reference model of `reference/sam_reference.py`.
#[derive(Module, Debug)]
pub struct Mlp {
    pub l1: Linear,
    pub l2: Linear,
}

impl Mlp {
    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.l2.forward(tanh(self.l1.forward(x)))
    }

    /// The mean squared error on (x, y).
    pub fn loss(&self, x: &Tensor<2>, y: &Tensor<2>) -> Tensor<1> {
        (self.forward(x.clone()) - y.clone()).square().mean()
    }
}

fn matrix<const R: usize, const C: usize>(rows: [[f64; C]; R], device: &Device) -> Tensor<2> {
    let flat: Vec<f32> = rows.iter().flatten().map(|&v| v as f32).collect();
    Tensor::<1>::from_floats(flat.as_slice(), device).reshape([R, C])
}

fn vector<const N: usize>(values: [f64; N], device: &Device) -> Tensor<1> {
    let flat: Vec<f32> = values.iter().map(|&v| v as f32).collect();
    Tensor::from_floats(flat.as_slice(), device)
}

fn linear(weight: Tensor<2>, bias: Tensor<1>, device: &Device) -> Linear {
    let [d_in, d_out] = weight.dims();
    let mut layer = LinearConfig::new(d_in, d_out).init(device);
    layer.weight = Param::from_tensor(weight);
    layer.bias = Some(Param::from_tensor(bias));
    layer
}

/// The reference model with its initial weights, and the reference batch.
pub fn reference_mlp(device: &Device) -> (Mlp, Tensor<2>, Tensor<2>) {
    use reference::*;
    let model = Mlp {
        l1: linear(matrix(INIT_W1, device), vector(INIT_B1, device), device),
        l2: linear(matrix(INIT_W2, device), vector(INIT_B2, device), device),
    };
    (model, matrix(X, device), matrix(Y, device))
}

/// Seeded normal values; tests draw from their own generator because the device's global one
/// is shared between test threads.
pub fn normal(seed: u64, len: usize) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..len)
        .map(|_| {
            // Box-Muller from two uniforms.
            let (u, v): (f32, f32) = (rng.random::<f32>().max(1e-7), rng.random());
            (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
        })
        .collect()
}

fn random_matrix(seed: u64, rows: usize, cols: usize, scale: f32, device: &Device) -> Tensor<2> {
    let values: Vec<f32> = normal(seed, rows * cols).into_iter().map(|v| v * scale).collect();
    Tensor::<1>::from_floats(values.as_slice(), device).reshape([rows, cols])
}

fn random_linear(seed: u64, d_in: usize, d_out: usize, device: &Device) -> Linear {
    let scale = 1.0 / (d_in as f32).sqrt();
    let bias = random_matrix(seed + 1, 1, d_out, scale, device).reshape([d_out]);
    linear(random_matrix(seed, d_in, d_out, scale, device), bias, device)
}

/// A seeded random MLP 6 → 16 → 3.
pub fn random_mlp(device: &Device, seed: u64) -> Mlp {
    Mlp { l1: random_linear(seed * 10, 6, 16, device), l2: random_linear(seed * 10 + 5, 16, 3, device) }
}

/// A seeded random regression batch for [`random_mlp`].
pub fn random_batch(device: &Device, seed: u64) -> (Tensor<2>, Tensor<2>) {
    (random_matrix(seed * 7 + 1, 8, 6, 1.0, device), random_matrix(seed * 7 + 2, 8, 3, 1.0, device))
}

/// Linear → BatchNorm → Linear, to check running statistics.
#[derive(Module, Debug)]
pub struct BnNet {
    pub l1: Linear,
    pub bn: BatchNorm,
    pub l2: Linear,
}

impl BnNet {
    pub fn new(device: &Device) -> Self {
        Self {
            l1: random_linear(50, 6, 8, device),
            bn: BatchNormConfig::new(8).init(device),
            l2: random_linear(60, 8, 3, device),
        }
    }

    pub fn loss(&self, x: &Tensor<2>, y: &Tensor<2>) -> Tensor<1> {
        let h = self.bn.forward(self.l1.forward(x.clone()));
        (self.l2.forward(tanh(h)) - y.clone()).square().mean()
    }
}

struct Collect(Vec<(ParamId, Vec<f32>)>);

impl ModuleVisitor for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let values = param.val().into_data().iter::<f32>().collect();
        self.0.push((param.id, values));
    }
}

/// Every float parameter (running states included), in module order, with its id.
pub fn params<M: Module>(module: &M) -> Vec<(ParamId, Vec<f32>)> {
    let mut visitor = Collect(Vec::new());
    module.visit(&mut visitor);
    visitor.0
}

/// The values of a tensor as f64.
pub fn values<const D: usize>(tensor: Tensor<D>) -> Vec<f64> {
    tensor.into_data().iter::<f32>().map(f64::from).collect()
}

/// Asserts element-wise `|a - b| <= tol`.
pub fn assert_close(actual: &[f64], expected: &[f64], tol: f64, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!((a - e).abs() <= tol, "{what}[{i}]: {a} vs {e} (tolerance {tol})");
    }
}

/// Trains `model` with `sam` at learning rate 0.05 on the seeded batches `batch_seed + step` for
/// each step of `steps`, appending each step's gate decision to `decisions`.
pub fn train_steps(
    sam: &mut burn_sam_sample::SamOptimizer,
    mut model: Mlp,
    steps: std::ops::Range<u64>,
    batch_seed: u64,
    decisions: &mut Vec<bool>,
) -> Mlp {
    let device = device();
    for step in steps {
        let (x, y) = random_batch(&device, batch_seed + step);
        let (next, out) = sam.step(0.05, model, |m: &Mlp| (m.loss(&x, &y), ()));
        decisions.push(out.telemetry.sam);
        model = next;
    }
    model
}

/// One step of `engine` driven by hand on `model` and the batch (x, y): the first pass, then the
/// second pass on the perturbed copy when the gate asks for it. Returns the direction for the
/// base optimizer and the step's telemetry.
pub fn hand_driven_step(
    engine: &mut burn_sam_sample::advanced::SamEngine,
    model: &Mlp,
    x: &Tensor<2>,
    y: &Tensor<2>,
) -> (burn::optim::GradientsParams, burn_sam_sample::StepTelemetry) {
    use burn::optim::GradientsParams;
    let loss = model.loss(x, y);
    let grads = GradientsParams::from_grads(loss.backward(), model);
    match engine.first_pass(model, grads, &loss) {
        burn_sam_sample::advanced::Pass::Sam(pass) => {
            let perturbed = pass.perturbed(model);
            let second = GradientsParams::from_grads(perturbed.loss(x, y).backward(), &perturbed);
            pass.finish(model, second)
        }
        burn_sam_sample::advanced::Pass::Cheap(pass) => pass.finish(model),
    }
}

/// Plain SAM written out by hand, without the engine, in `model`'s dtype `dtype`: per step, on
/// the batch `random_batch(device, 100 + step)` (cast to `dtype`), ‖g‖² per tensor in f32 with the
/// engine's arithmetic (a 1×n by n×1 product on the CPU backends, a product and a sum elsewhere),
/// the ascent `w + cast(ρ·g/‖g‖)` with the scale in f32, then `optim` at learning rate 0.05 on g_s.
pub fn hand_written_sam(
    mut model: Mlp,
    device: &Device,
    dtype: burn::tensor::DType,
    steps: u64,
    rho: f64,
    mut optim: burn::optim::ModuleOptimizer,
) -> Mlp {
    use burn::optim::GradientsParams;
    use burn::tensor::DType;

    struct Ascent {
        grads: GradientsParams,
        scale: Tensor<1>,
    }
    impl burn::module::ModuleMapper for Ascent {
        fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            let id = param.id;
            match self.grads.get::<D>(id) {
                Some(g) => param.map(|w| {
                    let w = w.inner();
                    let scale = self.scale.clone().reshape([1; D]);
                    let ascent = (g.cast(DType::F32) * scale).cast(w.dtype());
                    Tensor::from_inner(w + ascent).require_grad()
                }),
                None => param,
            }
        }
    }

    let on_cpu = is_cpu(device);
    let square_sum = |t: Tensor<1>| {
        let t = t.cast(DType::F32);
        let n = t.dims()[0];
        if on_cpu {
            t.clone().reshape([1, n]).matmul(t.reshape([n, 1])).reshape([1])
        } else {
            (t.clone() * t).sum()
        }
    };
    for step in 0..steps {
        let (x, y) = random_batch(device, 100 + step);
        let (x, y) = (x.cast(dtype), y.cast(dtype));
        let grads = GradientsParams::from_grads(model.loss(&x, &y).backward(), &model);
        let flat = |t: Tensor<2>| t.flatten::<1>(0, 1);
        let bias = |layer: &Linear| layer.bias.as_ref().map(|b| b.id).expect("the reference layers have biases");
        let parts = vec![
            square_sum(flat(grads.get::<2>(model.l1.weight.id).expect("a gradient"))),
            square_sum(grads.get::<1>(bias(&model.l1)).expect("a gradient")),
            square_sum(flat(grads.get::<2>(model.l2.weight.id).expect("a gradient"))),
            square_sum(grads.get::<1>(bias(&model.l2)).expect("a gradient")),
        ];
        let norm = Tensor::cat(parts, 0).sum().sqrt();
        let rho = Tensor::<1>::full([1], rho, (&device.clone().inner(), DType::F32));
        let scale = rho / norm.add_scalar(1e-12);
        let perturbed = model.clone().map(&mut Ascent { grads, scale });
        let sam_grads = GradientsParams::from_grads(perturbed.loss(&x, &y).backward(), &perturbed);
        model = optim.step(0.05, model, sam_grads);
    }
    model
}

/// Whether `device` is a CPU backend's (flex, ndarray), where the engine computes its dot
/// products as matrix products.
#[allow(deprecated, unreachable_code)]
pub fn is_cpu(device: &Device) -> bool {
    #[cfg(feature = "flex")]
    if *device == Device::flex() {
        return true;
    }
    #[cfg(feature = "ndarray")]
    if *device == Device::ndarray() {
        return true;
    }
    let _ = device;
    false
}

/// SGD with momentum 0.9 (Burn's default dampening), the base optimizer of the custom-loop tests.
pub fn sgd_momentum() -> burn::optim::ModuleOptimizer {
    use burn::optim::{momentum::MomentumConfig, SgdConfig};
    SgdConfig::new().with_momentum(Some(MomentumConfig::new().with_momentum(0.9))).init()
}

/// SGD with momentum 0.9 and no dampening, the base optimizer of the Learner tests.
pub fn sgd_momentum_undamped() -> burn::optim::ModuleOptimizer {
    use burn::optim::{momentum::MomentumConfig, SgdConfig};
    SgdConfig::new().with_momentum(Some(MomentumConfig::new().with_momentum(0.9).with_dampening(0.0))).init()
}
