//! Any Burn base optimizer behind the engine: Adam, AdamW, SGD with gradient clipping, and
//! parameter groups (SGD on one layer, Adam on the other), each behind SAM and vSAM. For each:
//! the direction reaches the base optimizer unchanged (the optimizer's step equals the engine's
//! passes driven by hand followed by the same base optimizer, bit for bit), and its state
//! round-trips through a record (save after 6 steps, load into a fresh optimizer, continue: the
//! weights of an uninterrupted run, bit for bit).

use burn::grad_clipping::GradientClippingConfig;
use burn::module::ParamGroup;
use burn::optim::{AdamConfig, AdamWConfig, ModuleOptimizer, SgdConfig};
use burn::tensor::Bytes;
use burn_sam_sample::advanced::SamEngine;
use burn_sam_sample::policy::{GatePolicy, VariationConfig};
use burn_sam_sample::{SamConfig, SamOptimizerRecord};
use burn_sam_sample_tests::{device, hand_driven_step, params, random_batch, random_mlp, train_steps, Mlp};

const LR: f64 = 0.05;

/// The base optimizers, each built fresh for `model` (parameter groups name its parameters).
fn bases(model: &Mlp) -> Vec<(&'static str, ModuleOptimizer)> {
    let l2 = vec![model.l2.weight.id, model.l2.bias.as_ref().map(|b| b.id).unwrap_or(model.l2.weight.id)];
    vec![
        ("adam", AdamConfig::new().init()),
        ("adamw", AdamWConfig::new().with_weight_decay(0.01).init()),
        (
            "sgd with norm clipping",
            SgdConfig::new().with_gradient_clipping(Some(GradientClippingConfig::Norm(0.05))).init(),
        ),
        (
            "groups: sgd, adam on l2",
            ModuleOptimizer::from(SgdConfig::new().build()).with_group(
                ParamGroup::from_ids(l2),
                AdamConfig::new().build(),
                None,
            ),
        ),
    ]
}

fn configs() -> Vec<(&'static str, SamConfig)> {
    let gate = VariationConfig::new(3).with_window(4).with_blocks(2);
    vec![("sam", SamConfig::sam()), ("vsam", SamConfig::new().with_policy(GatePolicy::Variation(gate)).with_seed(5))]
}

fn bits(model: &Mlp) -> Vec<Vec<u32>> {
    params(model).into_iter().map(|(_, v)| v.into_iter().map(f32::to_bits).collect()).collect()
}

/// `steps` steps of the engine driven by hand, each direction handed to `base`.
fn by_hand(config: &SamConfig, mut base: ModuleOptimizer, mut model: Mlp, steps: u64) -> (Mlp, Vec<bool>) {
    let device = device();
    let mut engine = SamEngine::new(config).unwrap();
    let mut decisions = Vec::new();
    for step in 0..steps {
        let (x, y) = random_batch(&device, 500 + step);
        let (direction, telemetry) = hand_driven_step(&mut engine, &model, &x, &y);
        decisions.push(telemetry.sam);
        model = base.step(LR, model, direction);
    }
    (model, decisions)
}

#[test]
fn every_base_optimizer_gets_the_direction_unchanged() {
    let device = device();
    let model = random_mlp(&device, 11);
    let mut finals = Vec::new();
    for (config_name, config) in configs() {
        for ((name, base), (_, same)) in bases(&model).into_iter().zip(bases(&model)) {
            let (expected, hand_decisions) = by_hand(&config, same, model.clone(), 12);
            let mut sam = config.init(base).unwrap();
            let mut decisions = Vec::new();
            let actual = train_steps(&mut sam, model.clone(), 0..12, 500, &mut decisions);
            assert_eq!(decisions, hand_decisions, "{config_name} + {name}: decisions");
            assert_eq!(bits(&actual), bits(&expected), "{config_name} + {name}: weights");
            assert!(params(&actual).iter().all(|(_, v)| v.iter().all(|x| x.is_finite())));
            if config_name == "vsam" {
                assert!(decisions.contains(&true) && decisions.contains(&false), "{name}: both kinds of step");
            }
            finals.push(bits(&actual));
        }
    }
    // The base optimizers really differ: no two of them end with the same weights.
    for (i, a) in finals.iter().enumerate() {
        assert!(finals[i + 1..].iter().all(|b| a != b), "run {i} equals another");
    }
}

#[test]
fn every_base_optimizer_resumes_exactly_from_a_record() {
    let device = device();
    let model = random_mlp(&device, 12);
    for (config_name, config) in configs() {
        for (((name, first), (_, second)), (_, straight)) in
            bases(&model).into_iter().zip(bases(&model)).zip(bases(&model))
        {
            let mut uninterrupted = config.init(straight).unwrap();
            let (mut all, mut interrupted) = (Vec::new(), Vec::new());
            let expected = train_steps(&mut uninterrupted, model.clone(), 0..12, 700, &mut all);

            let mut sam = config.init(first).unwrap();
            let halfway = train_steps(&mut sam, model.clone(), 0..6, 700, &mut interrupted);
            let bytes = sam.to_record().into_bytes().unwrap();
            let record = SamOptimizerRecord::from_bytes(Bytes::from_bytes_vec(bytes.to_vec())).unwrap();
            let mut resumed = config.init(second).unwrap();
            resumed.load_record(record, &halfway).unwrap();
            let actual = train_steps(&mut resumed, halfway, 6..12, 700, &mut interrupted);
            assert_eq!(interrupted, all, "{config_name} + {name}: decisions");
            assert_eq!(bits(&actual), bits(&expected), "{config_name} + {name}: weights");
        }
    }
}
