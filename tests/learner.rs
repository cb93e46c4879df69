//! The Learner integration: metrics, exact checkpoint resume, equivalence with the custom loop,
//! gradient accumulation and multiple devices.
#![cfg(feature = "train")]

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use burn::data::dataloader::batcher::Batcher;
use burn::data::dataloader::{DataLoader, DataLoaderBuilder};
use burn::data::dataset::InMemDataset;
use burn::lr_scheduler::module_lr_scheduler::ModuleLearningRate;
use burn::module::Module;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{GradientsParams, ModuleOptimizer, MultiGradientsParams};
use burn::prelude::*;
use burn::tensor::activation::relu;
use burn::train::checkpoint::KeepLastNCheckpoints;
use burn::train::metric::{AccuracyMetric, LossMetric};
use burn::train::{
    ClassificationOutput, ExecutionStrategy, InferenceStep, Learner, MultiDeviceOptim, SupervisedTraining, TrainOutput,
    TrainStep,
};
use burn_sam_sample::learner::{
    checkpoint_set, verify_checkpoint, GradientPassesMetric, PsfRatioMetric, SamFractionMetric, SamHandle, SamModel,
    SamOutput, SamQuotaMetric, SamTargetMetric, SamTrainingExt,
};
use burn_sam_sample::policy::{GatePolicy, VariationConfig};
use burn_sam_sample::SamConfig;
use burn_sam_sample_tests::{cast_module, device, half_device, normal, params, sgd_momentum_undamped};

const BATCH: usize = 16;
const TRAIN_ITEMS: usize = 96; // 6 steps per epoch
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

struct ItemBatcher;

impl Batcher<Item, Batch> for ItemBatcher {
    fn batch(&self, items: Vec<Item>, device: &Device) -> Batch {
        let n = items.len();
        let xs: Vec<f32> = items.iter().flat_map(|item| item.x).collect();
        let ys: Vec<i64> = items.iter().map(|item| item.y).collect();
        Batch {
            x: Tensor::<1>::from_floats(xs.as_slice(), device).reshape([n, 2]),
            y: Tensor::<1, Int>::from_ints(ys.as_slice(), device),
        }
    }
}

fn items(count: usize, seed: u64) -> Vec<Item> {
    let noise = normal(seed, count * 2);
    (0..count)
        .map(|i| {
            let class = (i % 3) as i64;
            let angle = class as f32 * 2.1 + (i / 3) as f32 * 0.05;
            Item { x: [angle.cos() + 0.3 * noise[2 * i], angle.sin() + 0.3 * noise[2 * i + 1]], y: class }
        })
        .collect()
}

type Loader = Arc<dyn DataLoader<Batch>>;

fn loaders() -> (Loader, Loader) {
    let train = DataLoaderBuilder::new(ItemBatcher).batch_size(BATCH).build(InMemDataset::new(items(TRAIN_ITEMS, 1)));
    let valid = DataLoaderBuilder::new(ItemBatcher).batch_size(BATCH).build(InMemDataset::new(items(32, 2)));
    (train, valid)
}

/// A user's model, with Burn's own train and inference steps; it counts its forward calls.
#[derive(Module, Debug)]
struct Net {
    l1: Linear,
    l2: Linear,
    #[module(skip)]
    forward_calls: Arc<AtomicUsize>,
}

/// The Learner model of these tests: the user's model wrapped for SAM, plus a probe that records
/// each train step's gate decision.
#[derive(Module, Debug)]
struct Probe {
    sam: SamModel<Net>,
    #[module(skip)]
    decisions: Arc<Mutex<Vec<bool>>>,
}

impl Probe {
    fn new(device: &Device, config: &SamConfig) -> Self {
        Self::wrap(SamModel::new(Net::new(device), config).unwrap())
    }

    fn wrap(sam: SamModel<Net>) -> Self {
        Self { sam, decisions: Arc::default() }
    }

    fn handle(&self) -> SamHandle {
        self.sam.sam().clone()
    }

    fn net(&self) -> &Net {
        self.sam.model()
    }
}

impl TrainStep for Probe {
    type Input = Batch;
    type Output = SamOutput<ClassificationOutput>;

    fn step(&self, batch: Batch) -> TrainOutput<Self::Output> {
        let out = TrainStep::step(&self.sam, batch);
        self.decisions.lock().unwrap().push(out.item.telemetry.sam);
        out
    }

    fn optimize(self, optim: &mut ModuleOptimizer, lr: ModuleLearningRate, grads: GradientsParams) -> Self {
        Self { sam: self.sam.optimize(optim, lr, grads), decisions: self.decisions }
    }

    fn optimize_multi(self, optim: &mut ModuleOptimizer, lr: ModuleLearningRate, grads: MultiGradientsParams) -> Self {
        Self { sam: self.sam.optimize_multi(optim, lr, grads), decisions: self.decisions }
    }
}

impl InferenceStep for Probe {
    type Input = Batch;
    type Output = ClassificationOutput;

    fn step(&self, batch: Batch) -> ClassificationOutput {
        self.net().classify(batch)
    }
}

impl Net {
    fn new(device: &Device) -> Self {
        let weights = |seed: u64, rows: usize, cols: usize| {
            Tensor::<1>::from_floats(normal(seed, rows * cols).as_slice(), device).reshape([rows, cols]).mul_scalar(0.5)
        };
        // Weights and biases from the tests' own generator: the device's is shared by test threads.
        let layer = |seed: u64, rows: usize, cols: usize| {
            let mut layer = LinearConfig::new(rows, cols).init(device);
            layer.weight = burn::module::Param::from_tensor(weights(seed, rows, cols));
            layer.bias = Some(burn::module::Param::from_tensor(weights(seed + 100, 1, cols).reshape([cols])));
            layer
        };
        let (l1, l2) = (layer(10, 2, 16), layer(11, 16, 3));
        Self { l1, l2, forward_calls: Arc::default() }
    }

    fn classify(&self, batch: Batch) -> ClassificationOutput {
        // In the model's dtype (a no-op for f32; the half-precision test casts the model).
        let x = batch.x.cast(self.l1.weight.val().dtype());
        let logits = self.l2.forward(relu(self.l1.forward(x)));
        let loss = CrossEntropyLossConfig::new().init(&logits.device()).forward(logits.clone(), batch.y.clone());
        ClassificationOutput::new(loss, logits, batch.y)
    }
}

impl TrainStep for Net {
    type Input = Batch;
    type Output = ClassificationOutput;

    fn step(&self, batch: Batch) -> TrainOutput<ClassificationOutput> {
        self.forward_calls.fetch_add(1, Ordering::SeqCst);
        let out = self.classify(batch);
        TrainOutput::new(self, out.loss.backward(), out)
    }
}

impl InferenceStep for Net {
    type Input = Batch;
    type Output = ClassificationOutput;

    fn step(&self, batch: Batch) -> ClassificationOutput {
        self.classify(batch)
    }
}

fn vsam() -> SamConfig {
    let variation = VariationConfig::new(3).with_window(4).with_blocks(2);
    SamConfig::new().with_policy(GatePolicy::Variation(variation)).with_seed(7)
}

/// [`training`] with the SAM checkpoint sets of `dir`, keeping the last `keep`.
fn checkpointed(dir: &Path, epochs: usize, handle: &SamHandle, keep: usize) -> SupervisedTraining<Probe> {
    training(dir, epochs).with_sam_checkpointing(
        &checkpoint_set(dir).writer().unwrap(),
        handle,
        KeepLastNCheckpoints::new(keep),
    )
}

fn training(dir: &Path, epochs: usize) -> SupervisedTraining<Probe> {
    let (train, valid) = loaders();
    SupervisedTraining::new(dir, train, valid)
        .num_epochs(epochs)
        .metrics((AccuracyMetric::new(), LossMetric::new()))
        .metric_train_numeric(SamFractionMetric::new())
        .metric_train_numeric(GradientPassesMetric::new())
        .metric_train_numeric(SamQuotaMetric::new())
        .metric_train_numeric(SamTargetMetric::new())
        .metric_train_numeric(PsfRatioMetric::new())
        .with_application_logger(None)
}

/// The per-step values a metric logged for an epoch, and its epoch value.
fn logged(dir: &Path, epoch: usize, metric: &str) -> (Vec<f64>, Option<f64>) {
    let path = dir.join("train").join(format!("epoch-{epoch}")).join(format!("{metric}.log"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (mut steps, mut epoch_value) = (Vec::new(), None);
    for line in text.lines() {
        let value = line.split(',').next().unwrap().parse::<f64>().unwrap();
        if line.ends_with(",final") {
            epoch_value = Some(value);
        } else {
            steps.push(value);
        }
    }
    (steps, epoch_value)
}

fn logged_values(dir: &Path, epoch: usize, metric: &str) -> Vec<f64> {
    logged(dir, epoch, metric).0
}

fn weight_bits<M: Module>(model: &M) -> Vec<Vec<u32>> {
    params(model).into_iter().map(|(_, v)| v.into_iter().map(f32::to_bits).collect()).collect()
}

#[test]
fn two_epochs_log_sam_metrics_that_match_the_passes_run() {
    let dir = tempfile::tempdir().unwrap();
    let device = device();
    let model = Probe::new(&device, &vsam());
    let (calls, decisions, handle) = (model.net().forward_calls.clone(), model.decisions.clone(), model.handle());
    let result = training(dir.path(), 2).launch(Learner::new(model, sgd_momentum_undamped(), LR));
    assert!(result.error.is_none(), "{:?}", result.error);

    let steps = 2 * TRAIN_ITEMS / BATCH;
    let second_passes = calls.load(Ordering::SeqCst) - steps;
    let sam_logged: f64 = (1..=2).flat_map(|e| logged_values(dir.path(), e, "SAM_Fraction")).sum();
    assert_eq!(sam_logged as usize, second_passes, "SAM-fraction metric vs second passes counted");
    let passes: f64 = (1..=2).flat_map(|e| logged_values(dir.path(), e, "Gradient_Passes")).sum();
    assert_eq!(passes as usize, steps + second_passes);
    assert_eq!(decisions.lock().unwrap().iter().filter(|&&d| d).count(), second_passes);
    for epoch in 1..=2 {
        let (per_step, fraction) = logged(dir.path(), epoch, "SAM_Fraction");
        let expected = per_step.iter().sum::<f64>() / per_step.len() as f64;
        assert_eq!(fraction, Some(expected), "epoch {epoch}: the epoch value is the epoch's fraction");
    }
    assert!(second_passes >= 3 && second_passes < steps, "warm-up plus gating: {second_passes} of {steps}");
    let quota = logged_values(dir.path(), 2, "SAM_Quota");
    assert!(quota.iter().all(|&s| s >= 1.0), "{quota:?}");
    let target = logged_values(dir.path(), 2, "SAM_Target");
    assert!(!target.is_empty() && target.iter().all(|&f| f > 0.0 && f <= 0.8), "{target:?}");
    assert!(logged_values(dir.path(), 2, "PSF_Ratio").iter().any(|&r| r > 0.0));
    let telemetry = handle.telemetry();
    assert_eq!((telemetry.step as usize, telemetry.sam_steps as usize), (steps, second_passes));
    assert_eq!(telemetry.step, handle.telemetry().rounds, "one decision per optimizer step");
}

#[test]
fn resuming_from_a_checkpoint_is_exact() {
    let device = device();
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = Probe::new(&device, &vsam());
    let straight_decisions = straight.decisions.clone();
    let handle = straight.handle();
    let straight = checkpointed(straight_dir.path(), 3, &handle, 3)
        .launch(Learner::new(straight, sgd_momentum_undamped(), LR))
        .model;

    let dir = tempfile::tempdir().unwrap();
    let first = Probe::new(&device, &vsam());
    let mut decisions = first.decisions.clone();
    let handle = first.handle();
    checkpointed(dir.path(), 2, &handle, 3).launch(Learner::new(first, sgd_momentum_undamped(), LR));
    let mut all = decisions.lock().unwrap().clone();

    // A new process would check the checkpoint first, then build a fresh model and handle and
    // resume from checkpoint 2.
    verify_checkpoint(&checkpoint_set(dir.path()), 2, 3, &vsam()).unwrap();
    let err = verify_checkpoint(&checkpoint_set(dir.path()), 2, 3, &SamConfig::sam()).unwrap_err();
    assert!(err.to_string().contains("checkpoint 2") && err.to_string().contains("reuse rule"), "{err}");
    let err = verify_checkpoint(&checkpoint_set(dir.path()), 5, 6, &vsam()).unwrap_err();
    assert!(err.to_string().contains("model-5.bpk"), "{err}");
    let fresh = Probe::new(&device, &vsam());
    decisions = fresh.decisions.clone();
    let handle = fresh.handle();
    let resumed = training(dir.path(), 3)
        .checkpoint(2)
        .with_sam_checkpointing(&checkpoint_set(dir.path()).writer().unwrap(), &handle, KeepLastNCheckpoints::new(3))
        .launch(Learner::new(fresh, sgd_momentum_undamped(), LR))
        .model;
    all.extend(decisions.lock().unwrap().iter());
    assert_eq!(handle.telemetry().step as usize, 3 * TRAIN_ITEMS / BATCH, "the SAM state was restored");

    assert_eq!(all, *straight_decisions.lock().unwrap(), "gate decisions");
    assert!(all.contains(&true) && all.contains(&false));
    assert_eq!(weight_bits(&resumed), weight_bits(&straight), "final weights");
    assert!(dir.path().join("checkpoint").join("optim-2.bpk").exists());
}

/// Trains `epochs` epochs (resuming from `resume` when given) in `dir`; returns the decisions
/// of this launch and the final model.
fn run_with_checkpoints(dir: &Path, epochs: usize, resume: Option<usize>) -> (Vec<bool>, Probe) {
    let model = Probe::new(&device(), &vsam());
    let (decisions, handle) = (model.decisions.clone(), model.handle());
    let mut training = checkpointed(dir, epochs, &handle, 8);
    if let Some(epoch) = resume {
        training = training.checkpoint(epoch);
    }
    let model = training.launch(Learner::new(model, sgd_momentum_undamped(), LR)).model;
    let decisions = decisions.lock().unwrap().clone();
    (decisions, model)
}

#[test]
fn resuming_at_every_epoch_is_exact() {
    let straight_dir = tempfile::tempdir().unwrap();
    let (straight_decisions, straight) = run_with_checkpoints(straight_dir.path(), 5, None);
    for interrupt in 1..5 {
        let dir = tempfile::tempdir().unwrap();
        let (mut decisions, _) = run_with_checkpoints(dir.path(), interrupt, None);
        let (rest, resumed) = run_with_checkpoints(dir.path(), 5, Some(interrupt));
        decisions.extend(rest);
        assert_eq!(decisions, straight_decisions, "interrupted after epoch {interrupt}");
        assert_eq!(weight_bits(&resumed), weight_bits(&straight), "interrupted after epoch {interrupt}");
    }
}

#[test]
fn many_short_multi_device_runs_neither_race_nor_deadlock() {
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for run in 0..12u64 {
            let dir = tempfile::tempdir().unwrap();
            let device = device();
            let config = SamConfig::rst(0.5).with_seed(run);
            let model = Probe::new(&device, &config);
            let (decisions, handle) = (model.decisions.clone(), model.handle());
            let strategy =
                ExecutionStrategy::multi(vec![device.clone(), device.clone()], MultiDeviceOptim::OptimMainDevice);
            let result = training(dir.path(), 1)
                .grads_accumulation(if run % 2 == 0 { 1 } else { 2 })
                .with_training_strategy(strategy.into())
                .launch(Learner::new(model, sgd_momentum_undamped(), LR));
            assert!(result.error.is_none(), "run {run}: {:?}", result.error);
            let decisions = decisions.lock().unwrap().clone();
            let per_round = if run % 2 == 0 { 2 } else { 4 };
            assert!(
                decisions.chunks(per_round).all(|round| round.iter().all(|&d| d == round[0])),
                "run {run}: {decisions:?}"
            );
            assert_eq!(handle.telemetry().step as usize, decisions.len());
        }
        done.send(()).unwrap();
    });
    finished
        .recv_timeout(std::time::Duration::from_secs(300))
        .expect("12 multi-device runs finish within 5 minutes (no deadlock)");
}

#[test]
fn checkpointers_installed_after_sam_checkpointing_stop_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = Probe::new(&device(), &vsam());
    let handle = model.handle();
    // Burn's default checkpointers replace SAM's optimizer checkpointer: its files would hold no
    // SAM state. The third checkpoint finds the first one's state never written and stops.
    let result = checkpointed(dir.path(), 4, &handle, 4).with_default_checkpointers().launch(Learner::new(
        model,
        sgd_momentum_undamped(),
        LR,
    ));
    let error = result.error.map(|e| e.to_string()).unwrap_or_default();
    assert!(error.contains("never written") && error.contains("with_sam_checkpointing"), "{error:?}");
    assert!(handle.failure().is_some());
    assert!(!dir.path().join("checkpoint").join("model-3.bpk").exists(), "the third checkpoint was not written");
}

#[test]
fn the_always_gate_in_the_learner_is_the_custom_loop_sam() {
    let dir = tempfile::tempdir().unwrap();
    let device = device();
    let model = Probe::new(&device, &SamConfig::sam());
    let initial = model.clone();
    let learned = training(dir.path(), 1).launch(Learner::new(model, sgd_momentum_undamped(), LR)).model;

    let mut optim = SamConfig::sam().init(sgd_momentum_undamped()).unwrap();
    let mut model = initial.net().clone();
    let (train, _) = loaders();
    for batch in train.to_device(&device).iter() {
        let batch = batch.unwrap();
        model = optim
            .step(LR, model, |m: &Net| {
                let out = m.classify(batch.clone());
                (out.loss, ())
            })
            .0;
    }
    assert_eq!(optim.telemetry().sam_steps, (TRAIN_ITEMS / BATCH) as u64);
    assert_eq!(weight_bits(&learned), weight_bits(&model));
}

fn pairs_agree(decisions: &[bool]) -> bool {
    decisions.chunks(2).all(|pair| pair.len() == 2 && pair[0] == pair[1])
}

#[test]
fn gradient_accumulation_shares_one_decision_per_optimizer_step() {
    let dir = tempfile::tempdir().unwrap();
    let device = device();
    let config = SamConfig::rst(0.5).with_seed(3);
    let model = Probe::new(&device, &config);
    let (decisions, handle) = (model.decisions.clone(), model.handle());
    let result = training(dir.path(), 2).grads_accumulation(2).launch(Learner::new(model, sgd_momentum_undamped(), LR));
    assert!(result.error.is_none());
    let decisions = decisions.lock().unwrap().clone();
    assert_eq!(decisions.len(), 2 * TRAIN_ITEMS / BATCH);
    assert!(pairs_agree(&decisions), "{decisions:?}");
    assert!(decisions.contains(&true) && decisions.contains(&false), "{decisions:?}");
    assert_eq!(handle.telemetry().rounds as usize, decisions.len() / 2);
}

#[test]
fn two_cpu_devices_take_the_same_decision_each_step() {
    let dir = tempfile::tempdir().unwrap();
    let device = device();
    let model = Probe::new(&device, &vsam());
    let (decisions, handle) = (model.decisions.clone(), model.handle());
    let strategy = ExecutionStrategy::multi(vec![device.clone(), device.clone()], MultiDeviceOptim::OptimMainDevice);
    let result = training(dir.path(), 2).with_training_strategy(strategy.into()).launch(Learner::new(
        model,
        sgd_momentum_undamped(),
        LR,
    ));
    assert!(result.error.is_none(), "{:?}", result.error);
    let decisions = decisions.lock().unwrap().clone();
    assert_eq!(decisions.len(), 2 * TRAIN_ITEMS / BATCH);
    assert!(pairs_agree(&decisions), "{decisions:?}");
    assert_eq!(handle.telemetry().rounds as usize, decisions.len() / 2);
    let model = result.model;
    assert!(params(&model).iter().all(|(_, v)| v.iter().all(|x| x.is_finite())));
}

/// Distributed data parallel with per-replica SAM state: built and type-checked in every test
/// build, run nowhere here. Burn 0.22 implements the collective all-reduce DDP needs only where
/// devices have a transport between them (CUDA): on ndarray and flex, creating the strategy
/// panics inside Burn ("Distributed operations are not supported for device …"), and on wgpu the
/// first all-reduce panics ("Can't use `all_reduce` on wgpu<wgsl>, which has no transport between
/// its devices"). See docs/learner.md.
#[allow(dead_code)]
fn ddp_training(dir: &Path, devices: Vec<Device>) -> (SupervisedTraining<Probe>, Learner<Probe>) {
    let model = Probe::wrap(SamModel::per_replica(Net::new(&devices[0].clone().autodiff()), &vsam()).unwrap());
    let config = burn::tensor::distributed::DistributedConfig {
        all_reduce_op: burn::tensor::distributed::ReduceOperation::Mean,
    };
    let training = training(dir, 1).with_training_strategy(ExecutionStrategy::ddp(devices, config).into());
    (training, Learner::new(model, sgd_momentum_undamped(), LR))
}

#[test]
#[should_panic(expected = "autodiff device")]
fn a_model_off_the_autodiff_device_is_told_what_to_change() {
    let plain = device().inner();
    let net = Probe::new(&plain, &SamConfig::sam());
    let (train, _) = loaders();
    let batch = train.iter().next().unwrap().unwrap();
    let batch = Batch { x: batch.x.to_device(&plain), y: batch.y.to_device(&plain) };
    let _ = TrainStep::step(&net, batch);
}

#[test]
fn checkpoint_sets_are_sealed_and_incomplete_or_damaged_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("checkpoint");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("model-9.bpk.4242-0.tmp"), "left by a killed run").unwrap();
    let model = Probe::new(&device(), &vsam());
    let handle = model.handle();
    let result = checkpointed(dir.path(), 3, &handle, 2).launch(Learner::new(model, sgd_momentum_undamped(), LR));
    assert!(result.error.is_none(), "{:?}", result.error);
    assert!(!folder.join("model-9.bpk.4242-0.tmp").exists(), "stale temporary files are removed");
    // Kept: epochs 2 and 3, each sealed; epoch 1 was deleted with its manifest.
    assert!(!folder.join("set-1.json").exists() && !folder.join("model-1.bpk").exists());
    for epoch in [2, 3] {
        verify_checkpoint(&checkpoint_set(dir.path()), epoch, epoch + 1, &vsam()).unwrap();
    }
    assert_eq!(checkpoint_set(dir.path()).latest().unwrap(), Some(3));

    // A run killed after writing the files of epoch 3 but before sealing them.
    std::fs::remove_file(folder.join("set-3.json")).unwrap();
    let err = verify_checkpoint(&checkpoint_set(dir.path()), 3, 4, &vsam()).unwrap_err().to_string();
    assert!(err.contains("incomplete"), "{err}");
    assert_eq!(checkpoint_set(dir.path()).latest().unwrap(), Some(2));

    // 4 KiB of the model file overwritten after the fact: detected before anything is loaded.
    let model_file = folder.join("model-2.bpk");
    let mut bytes = std::fs::read(&model_file).unwrap();
    let start = bytes.len() / 2;
    let end = (start + 4096).min(bytes.len());
    bytes[start..end].fill(0xFF);
    std::fs::write(&model_file, bytes).unwrap();
    let err = verify_checkpoint(&checkpoint_set(dir.path()), 2, 3, &vsam()).unwrap_err().to_string();
    assert!(err.contains("model-2.bpk is damaged"), "{err}");
    assert_eq!(checkpoint_set(dir.path()).latest().unwrap(), None);
}

#[test]
fn a_restored_state_that_does_not_fit_is_refused_before_training_and_never_panics_in_it() {
    // Two runs whose models have other parameter ids; run B's optimizer file is put into run A's
    // set and the set re-sealed, so every checksum is valid.
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    for dir in [&a, &b] {
        let model = Probe::new(&device(), &vsam());
        let handle = model.handle();
        let result = checkpointed(dir.path(), 2, &handle, 3).launch(Learner::new(model, sgd_momentum_undamped(), LR));
        assert!(result.error.is_none(), "{:?}", result.error);
    }
    let (a_set, b_set) = (checkpoint_set(a.path()), checkpoint_set(b.path()));
    std::fs::copy(b_set.file("optim", 2), a_set.file("optim", 2)).unwrap();
    a_set.writer().unwrap().seal(2).unwrap();
    let err = verify_checkpoint(&a_set, 2, 3, &vsam()).unwrap_err().to_string();
    assert!(err.contains("knows parameter") && err.contains("model-2.bpk"), "{err}");

    // A program that skips the check: the run stops with the error, no panic, nothing trained.
    let model = Probe::new(&device(), &vsam());
    let (handle, decisions) = (model.handle(), model.decisions.clone());
    let result = training(a.path(), 3)
        .checkpoint(2)
        .with_sam_checkpointing(&a_set.writer().unwrap(), &handle, KeepLastNCheckpoints::new(3))
        .launch(Learner::new(model, sgd_momentum_undamped(), LR));
    let err = result.error.expect("the run must fail").to_string();
    assert!(err.contains("cannot continue this run") && err.contains("missing from the module"), "{err}");
    assert!(handle.failure().is_some_and(|failure| err.contains(&failure)), "{:?}", handle.failure());
    assert!(decisions.lock().unwrap().len() <= 1, "training stopped at its first step");
    assert!(!a_set.file("model", 3).exists(), "nothing was checkpointed after the failure");
}

#[test]
fn a_resume_with_nothing_left_to_train_is_an_error_naming_both_numbers() {
    let dir = tempfile::tempdir().unwrap();
    let model = Probe::new(&device(), &vsam());
    let handle = model.handle();
    checkpointed(dir.path(), 2, &handle, 3).launch(Learner::new(model, sgd_momentum_undamped(), LR));
    // Burn's default is one epoch: `.checkpoint(2)` without `.num_epochs(..)` would train nothing.
    let err = verify_checkpoint(&checkpoint_set(dir.path()), 2, 1, &vsam()).unwrap_err().to_string();
    assert!(err.contains("plans 1 epoch(s)") && err.contains("after epoch 2"), "{err}");
    verify_checkpoint(&checkpoint_set(dir.path()), 2, 3, &vsam()).unwrap();
}

/// Share of `items` the model classifies right.
fn accuracy(model: &Probe, items: &[Item], device: &Device) -> f64 {
    let batch = ItemBatcher.batch(items.to_vec(), device);
    let predicted = model.net().classify(batch.clone()).output.argmax(1).flatten::<1>(0, 1);
    let right = predicted.equal(batch.y).int().sum().into_scalar::<i64>();
    right as f64 / items.len() as f64
}

#[test]
fn a_bf16_model_learns_the_task_in_the_learner() {
    let Some(device) = half_device(burn::tensor::DType::BF16) else {
        eprintln!("no device computes in bf16 in this build (flex is not compiled in)");
        return;
    };
    let valid = items(96, 2);
    let mut accuracies = Vec::new();
    for dtype in [burn::tensor::DType::F32, burn::tensor::DType::BF16] {
        let dir = tempfile::tempdir().unwrap();
        let model = cast_module(Probe::new(&device, &vsam()), dtype);
        let before = accuracy(&model, &valid, &device);
        let handle = model.handle();
        let strategy = ExecutionStrategy::SingleDevice(device.clone());
        let result = training(dir.path(), 4).with_training_strategy(strategy.into()).launch(Learner::new(
            model,
            sgd_momentum_undamped(),
            LR,
        ));
        assert!(result.error.is_none(), "{dtype:?}: {:?}", result.error);
        let model = result.model;
        assert_eq!(model.net().l1.weight.val().dtype(), dtype, "the parameters stay {dtype:?}");
        let telemetry = handle.telemetry();
        assert!(telemetry.sam_steps > 0 && telemetry.sam_steps < telemetry.step, "{dtype:?}: {telemetry:?}");
        let after = accuracy(&model, &valid, &device);
        accuracies.push((dtype, before, after));
    }
    eprintln!("accuracy before and after: {accuracies:?}");
    let [(_, _, f32_after), (_, bf16_before, bf16_after)] = accuracies[..] else { unreachable!() };
    assert!(bf16_after >= 0.9 && bf16_after > bf16_before + 0.2, "{accuracies:?}");
    assert!((bf16_after - f32_after).abs() <= 0.05, "bf16 learns as f32 does: {accuracies:?}");
}
