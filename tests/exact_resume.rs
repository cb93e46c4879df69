//! "Train 4 epochs" and "train 2, resume, train 2 more" end with bit-identical weights, with
//! shuffling, augmentation and dropout on: in a custom loop and inside Burn's Learner.
//!
//! Dropout draws from the device's global generator, which every test of a binary shares, so
//! this binary holds a single test that runs its cases one after the other.
#![cfg(feature = "train")]

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::data::dataset::InMemDataset;
use burn::module::{Module, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::store::ModuleRecord;
use burn::tensor::activation::relu;
use burn::train::checkpoint::KeepLastNCheckpoints;
use burn::train::{ClassificationOutput, InferenceStep, Learner, SupervisedTraining, TrainOutput, TrainStep};
use burn_sam_sample::learner::{
    checkpoint_set, verify_checkpoint, EpochBatcher, EpochLoader, SamModel, SamTrainingExt,
};
use burn_sam_sample::policy::{GatePolicy, VariationConfig};
use burn_sam_sample::{SamConfig, SamOptimizer, SamOptimizerRecord};
use burn_sam_sample_tests::{device, normal, params, sgd_momentum_undamped};
use rand::{Rng, SeedableRng};

const BATCH: usize = 16;
const ITEMS: usize = 96;
const SEED: u64 = 5;
const LR: f64 = 0.05;

#[derive(Clone, Debug)]
struct Item {
    x: [f32; 2],
    y: i64,
}

#[derive(Clone, Debug)]
struct Batch {
    x: Tensor<2>,
    y: Tensor<1, Int>,
}

/// Adds random noise to every input: an augmentation whose draws restart at each epoch.
#[derive(Clone, Default)]
struct NoisyBatcher {
    seed: Arc<AtomicU64>,
    batches: Arc<AtomicU64>,
}

impl Batcher<Item, Batch> for NoisyBatcher {
    fn batch(&self, items: Vec<Item>, device: &Device) -> Batch {
        let batch = self.batches.fetch_add(1, Ordering::SeqCst);
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.seed.load(Ordering::SeqCst) ^ batch);
        let n = items.len();
        let xs: Vec<f32> = items.iter().flat_map(|item| item.x).map(|x| x + rng.random_range(-0.2..0.2)).collect();
        let ys: Vec<i64> = items.iter().map(|item| item.y).collect();
        Batch {
            x: Tensor::<1>::from_floats(xs.as_slice(), device).reshape([n, 2]),
            y: Tensor::<1, Int>::from_ints(ys.as_slice(), device),
        }
    }
}

impl EpochBatcher<Item, Batch> for NoisyBatcher {
    fn start_epoch(&self, seed: u64) {
        self.seed.store(seed, Ordering::SeqCst);
        self.batches.store(0, Ordering::SeqCst);
    }
}

fn dataset(count: usize, seed: u64) -> InMemDataset<Item> {
    let noise = normal(seed, count * 2);
    InMemDataset::new(
        (0..count)
            .map(|i| {
                let class = (i % 3) as i64;
                let angle = class as f32 * 2.1 + (i / 3) as f32 * 0.05;
                Item { x: [angle.cos() + 0.3 * noise[2 * i], angle.sin() + 0.3 * noise[2 * i + 1]], y: class }
            })
            .collect(),
    )
}

fn train_loader(device: &Device, first_epoch: usize) -> EpochLoader<Item, Batch> {
    EpochLoader::new(dataset(ITEMS, 1), NoisyBatcher::default(), BATCH, SEED, device)
        .expect("a batch size of at least 1")
        .starting_at_epoch(first_epoch)
}

/// Linear, ReLU, dropout 0.3, Linear; fixed initial weights.
#[derive(Module, Debug)]
struct DropNet {
    l1: Linear,
    dropout: Dropout,
    l2: Linear,
}

impl DropNet {
    fn new(device: &Device) -> Self {
        let layer = |seed: u64, rows: usize, cols: usize| {
            let weights = |seed: u64, len: usize| Tensor::<1>::from_floats(normal(seed, len).as_slice(), device);
            let mut layer = LinearConfig::new(rows, cols).init(device);
            layer.weight = Param::from_tensor(weights(seed, rows * cols).reshape([rows, cols]).mul_scalar(0.5));
            layer.bias = Some(Param::from_tensor(weights(seed + 100, cols).mul_scalar(0.5)));
            layer
        };
        Self { l1: layer(10, 2, 32), dropout: DropoutConfig::new(0.3).init(), l2: layer(11, 32, 3) }
    }

    fn classify(&self, batch: Batch) -> ClassificationOutput {
        let logits = self.l2.forward(self.dropout.forward(relu(self.l1.forward(batch.x))));
        let loss = CrossEntropyLossConfig::new().init(&logits.device()).forward(logits.clone(), batch.y.clone());
        ClassificationOutput::new(loss, logits, batch.y)
    }
}

impl TrainStep for DropNet {
    type Input = Batch;
    type Output = ClassificationOutput;

    fn step(&self, batch: Batch) -> TrainOutput<ClassificationOutput> {
        let out = self.classify(batch);
        TrainOutput::new(self, out.loss.backward(), out)
    }
}

impl InferenceStep for DropNet {
    type Input = Batch;
    type Output = ClassificationOutput;

    fn step(&self, batch: Batch) -> ClassificationOutput {
        self.classify(batch)
    }
}

fn config() -> SamConfig {
    let variation = VariationConfig::new(4).with_window(4).with_blocks(2);
    SamConfig::new().with_policy(GatePolicy::Variation(variation)).with_seed(SEED)
}

fn bits(model: &DropNet) -> Vec<Vec<u32>> {
    params(model).into_iter().map(|(_, v)| v.into_iter().map(f32::to_bits).collect()).collect()
}

/// Custom loop: epochs `from..=to` on `model` and `optim`.
fn custom_epochs(model: DropNet, optim: &mut SamOptimizer, from: usize, to: usize) -> DropNet {
    let device = device();
    let loader = train_loader(&device, from);
    let mut model = model;
    for _ in from..=to {
        for batch in loader.iter() {
            let batch = batch.expect("in-memory data");
            let (next, _) = optim.step(LR, model, |m: &DropNet| (m.classify(batch.clone()).loss, ()));
            model = next;
        }
    }
    model
}

fn custom_loop_resumes_exactly() {
    let device = device();
    let mut optim = config().init(sgd_momentum_undamped()).unwrap();
    let straight = custom_epochs(DropNet::new(&device), &mut optim, 1, 4);

    let mut optim = config().init(sgd_momentum_undamped()).unwrap();
    let half = custom_epochs(DropNet::new(&device), &mut optim, 1, 2);
    let model_bytes = half.clone().into_record().into_bytes().unwrap();
    let optim_bytes = optim.to_record().into_bytes().unwrap();
    drop((half, optim));

    // A new process: fresh model and optimizer, state loaded, the loader at epoch 3.
    let fresh = DropNet::new(&device);
    let resumed = fresh.try_load_record(ModuleRecord::from_bytes(model_bytes).unwrap()).unwrap();
    let mut optim = config().init(sgd_momentum_undamped()).unwrap();
    optim.load_record(SamOptimizerRecord::from_bytes(optim_bytes).unwrap(), &resumed).unwrap();
    let resumed = custom_epochs(resumed, &mut optim, 3, 4);
    assert!(optim.telemetry().sam_steps > 0 && optim.telemetry().sam_fraction < 1.0, "{:?}", optim.telemetry());
    assert_eq!(bits(&resumed), bits(&straight), "custom loop: 4 epochs vs 2 + resume + 2");
}

fn learner_run(dir: &Path, epochs: usize, resume: Option<usize>) -> DropNet {
    let device = device();
    let model = SamModel::new(DropNet::new(&device), &config()).unwrap();
    let handle = model.sam().clone();
    let train: Arc<dyn DataLoader<Batch>> = Arc::new(train_loader(&device, resume.map_or(1, |e| e + 1)));
    let valid = DataLoaderBuilder::new(NoisyBatcher::default()).batch_size(BATCH).build(dataset(32, 2));
    let mut training = SupervisedTraining::new(dir, train, valid)
        .num_epochs(epochs)
        .with_sam_checkpointing(&checkpoint_set(dir).writer().unwrap(), &handle, KeepLastNCheckpoints::new(4))
        .with_application_logger(None);
    if let Some(epoch) = resume {
        verify_checkpoint(&checkpoint_set(dir), epoch, epoch + 1, &config()).unwrap();
        training = training.checkpoint(epoch);
    }
    let result = training.launch(Learner::new(model, sgd_momentum_undamped(), LR));
    assert!(result.error.is_none(), "{:?}", result.error);
    let _ = handle;
    result.model.into_inner()
}

fn learner_resumes_exactly() {
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = learner_run(straight_dir.path(), 4, None);
    let dir = tempfile::tempdir().unwrap();
    learner_run(dir.path(), 2, None);
    let resumed = learner_run(dir.path(), 4, Some(2));
    assert_eq!(bits(&resumed), bits(&straight), "Learner: 4 epochs vs 2 + resume + 2");
}

/// Without the epoch loader, the resumed run differs: the check above can fail.
fn burns_loader_does_not_resume_exactly() {
    let device = device();
    let loader = |_: usize| {
        DataLoaderBuilder::new(NoisyBatcher::default()).batch_size(BATCH).shuffle(SEED).build(dataset(ITEMS, 1))
    };
    let run = |model: DropNet, optim: &mut SamOptimizer, epochs: usize| {
        let loader = loader(0).to_device(&device);
        let mut model = model;
        for _ in 0..epochs {
            for batch in loader.iter() {
                let batch = batch.unwrap();
                let (next, _) = optim.step(LR, model, |m: &DropNet| (m.classify(batch.clone()).loss, ()));
                model = next;
            }
        }
        model
    };
    device.seed(SEED);
    let mut optim = config().init(sgd_momentum_undamped()).unwrap();
    let straight = run(DropNet::new(&device), &mut optim, 2);
    device.seed(SEED);
    let mut optim = config().init(sgd_momentum_undamped()).unwrap();
    let first = run(DropNet::new(&device), &mut optim, 1);
    let bytes = optim.to_record().into_bytes().unwrap();
    device.seed(SEED);
    let mut optim = config().init(sgd_momentum_undamped()).unwrap();
    optim.load_record(SamOptimizerRecord::from_bytes(bytes).unwrap(), &first).unwrap();
    let resumed = run(first, &mut optim, 1);
    assert_ne!(bits(&resumed), bits(&straight), "Burn's loader restarts its order from the seed");
}

#[test]
fn four_epochs_equal_two_then_resume_then_two() {
    custom_loop_resumes_exactly();
    learner_resumes_exactly();
    burns_loader_does_not_resume_exactly();
}
