//! The smallest complete Learner program with vSAM: a two-layer classifier on three noisy
//! spirals. The lines between `README:start` and `README:end` are the README's Learner snippet,
//! word for word (a test checks it), so that snippet is compiled and run.
//!
//! ```text
//! cargo run --release -p burn-sam-sample-examples --example learner_minimal
//! ```

use std::process::ExitCode;
use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::data::dataset::InMemDataset;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::SgdConfig;
use burn::prelude::*;
use burn::tensor::activation::relu;
use burn::train::checkpoint::KeepLastNCheckpoints;
use burn::train::metric::{AccuracyMetric, LossMetric};
use burn::train::{ClassificationOutput, InferenceStep, Learner, SupervisedTraining, TrainOutput, TrainStep};
use burn_sam_sample::{backend, learner::*, SamConfig};
use burn_sam_sample_examples::process::{end_quietly_on_closed_output, exit_with, usage_error};
use burn_sam_sample_examples::renderer::PlainOutput;
use burn_sam_sample_examples::spirals;

#[derive(Clone, Debug)]
struct Point {
    x: [f32; 2],
    class: i64,
}

#[derive(Clone, Debug)]
struct Batch {
    x: Tensor<2>,
    classes: Tensor<1, Int>,
}

#[derive(Clone)]
struct PointBatcher;

impl Batcher<Point, Batch> for PointBatcher {
    fn batch(&self, points: Vec<Point>, device: &Device) -> Batch {
        let xs: Vec<f32> = points.iter().flat_map(|p| p.x).collect();
        let classes: Vec<i64> = points.iter().map(|p| p.class).collect();
        Batch {
            x: Tensor::<1>::from_floats(xs.as_slice(), device).reshape([points.len(), 2]),
            classes: Tensor::<1, Int>::from_ints(classes.as_slice(), device),
        }
    }
}

impl EpochBatcher<Point, Batch> for PointBatcher {}

fn points(per_class: usize, seed: u64, device: &Device) -> InMemDataset<Point> {
    let (x, classes) = spirals(per_class, 0.3, seed, device);
    let xs: Vec<f32> = x.into_data().iter::<f32>().collect();
    let classes: Vec<i64> = classes.into_data().iter::<i64>().collect();
    InMemDataset::new(
        classes.iter().enumerate().map(|(i, &class)| Point { x: [xs[2 * i], xs[2 * i + 1]], class }).collect(),
    )
}

// README:start
#[derive(Module, Debug)]
struct Model {
    l1: Linear,
    l2: Linear,
}

impl Model {
    fn forward_classification(&self, batch: Batch) -> ClassificationOutput {
        let logits = self.l2.forward(relu(self.l1.forward(batch.x)));
        let loss = CrossEntropyLossConfig::new().init(&logits.device()).forward(logits.clone(), batch.classes.clone());
        ClassificationOutput::new(loss, logits, batch.classes)
    }
}

// Burn's train step, as without SAM.
impl TrainStep for Model {
    type Input = Batch;
    type Output = ClassificationOutput;
    fn step(&self, batch: Batch) -> TrainOutput<ClassificationOutput> {
        let output = self.forward_classification(batch);
        TrainOutput::new(self, output.loss.backward(), output)
    }
}
// README:end

impl InferenceStep for Model {
    type Input = Batch;
    type Output = ClassificationOutput;
    fn step(&self, batch: Batch) -> ClassificationOutput {
        self.forward_classification(batch)
    }
}

fn main() -> ExitCode {
    end_quietly_on_closed_output();
    if let Some(option) = std::env::args().nth(1) {
        return usage_error(format!("learner_minimal takes no options (got `{option}`)"));
    }
    exit_with(run())
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    // SAM steps allocate model-sized tensors the base step does not; keep freed memory for the
    // next step instead of faulting it in again (glibc; see docs/backends.md).
    burn_sam_sample::memory::keep_freed_memory();
    let dir = std::path::Path::new("target/learner-minimal");
    let (epochs, steps_per_epoch) = (6, 600 / 32);
    let cpu = backend::select(None)?;
    let device = cpu.clone().autodiff();
    device.seed(0);
    let train: Arc<dyn DataLoader<Batch>> =
        Arc::new(EpochLoader::new(points(200, 1, &cpu), PointBatcher, 32, 0, &device)?);
    let valid = DataLoaderBuilder::new(PointBatcher).batch_size(128).build(points(100, 2, &cpu));
    // README:start
    let model = Model { l1: LinearConfig::new(2, 64).init(&device), l2: LinearConfig::new(64, 3).init(&device) };
    let model = SamModel::new(model, &SamConfig::vsam(steps_per_epoch))?;
    let checkpoints = checkpoint_set(dir).writer()?;
    let result = SupervisedTraining::new(dir, train, valid)
        .num_epochs(epochs)
        .metrics((AccuracyMetric::new(), LossMetric::new()))
        .metric_train_numeric(SamFractionMetric::new())
        .with_sam_checkpointing(&checkpoints, model.sam(), KeepLastNCheckpoints::new(2))
        // README:end
        // Outside a terminal, plain lines instead of a dump of Burn's progress for every batch.
        .plain_output_unless_terminal()
        // README:start
        .launch(Learner::new(model, SgdConfig::new().init(), 0.1));
    // README:end
    if let Some(error) = result.error {
        return Err(format!("training failed: {error}").into());
    }
    let telemetry = result.model.telemetry();
    println!(
        "{} steps, SAM fraction {:.2}, {:.2} gradient passes per step; metrics and checkpoints in {}",
        telemetry.step,
        telemetry.sam_fraction,
        telemetry.passes_per_step(),
        dir.display()
    );
    Ok(())
}
