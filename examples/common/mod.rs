//! Pieces shared by the examples and benchmarks: the Fashion-MNIST data, the CNN, the methods,
//! and a seeded synthetic task.

#[cfg(all(feature = "backend", not(any(feature = "ndarray", feature = "flex", feature = "wgpu", feature = "cuda"))))]
compile_error!("the examples need a backend: enable one of the features `ndarray`, `flex`, `wgpu` or `cuda`");

pub mod cli;
pub mod download;
pub mod fashion;
pub mod methods;
pub mod model;
pub mod process;
pub mod renderer;
pub mod stats;

use burn::prelude::*;
use rand::{Rng, SeedableRng};

/// Three interleaved noisy spirals in the plane: a small task where a smooth decision boundary
/// generalizes better than a sharp one.
pub fn spirals(points_per_class: usize, noise: f32, seed: u64, device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut xs = Vec::with_capacity(points_per_class * 3 * 2);
    let mut ys = Vec::with_capacity(points_per_class * 3);
    for class in 0..3 {
        for i in 0..points_per_class {
            let r = i as f32 / points_per_class as f32;
            let angle = class as f32 * 2.094 + r * 4.0 + noise * (rng.random::<f32>() - 0.5) * 2.0;
            xs.push(r * angle.sin());
            xs.push(r * angle.cos());
            ys.push(class as i64);
        }
    }
    let n = ys.len();
    (
        Tensor::<1>::from_floats(xs.as_slice(), device).reshape([n, 2]),
        Tensor::<1, Int>::from_ints(ys.as_slice(), device),
    )
}

/// Test accuracy of `model` (in evaluation mode: dropout off, BatchNorm running statistics) over
/// prepared batches.
pub fn evaluate(model: &model::Cnn, batches: &[fashion::FashionBatch]) -> f64 {
    let model = model.valid();
    let (mut right, mut total) = (0i64, 0usize);
    for batch in batches {
        total += batch.targets.dims()[0];
        right += correct(model.forward(batch.images.clone()), batch.targets.clone());
    }
    right as f64 / total.max(1) as f64
}

/// [`evaluate`] over the batches of a data loader.
pub fn evaluate_loader(
    model: &model::Cnn,
    loader: &dyn burn::data::dataloader::DataLoader<fashion::FashionBatch>,
) -> Result<f64, burn::data::dataset::DatasetError> {
    let batches = loader.iter().collect::<Result<Vec<_>, _>>()?;
    Ok(evaluate(model, &batches))
}

/// Fraction of rows of `logits` whose arg-max equals `labels`.
pub fn accuracy(logits: Tensor<2>, labels: Tensor<1, Int>) -> f64 {
    let n = labels.dims()[0];
    correct(logits, labels) as f64 / n as f64
}

/// Number of rows of `logits` whose arg-max equals `labels`.
pub fn correct(logits: Tensor<2>, labels: Tensor<1, Int>) -> i64 {
    logits.argmax(1).squeeze_dim::<1>(1).equal(labels).int().sum().into_scalar()
}
