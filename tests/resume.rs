//! Save at step 13, load into a fresh optimizer, continue: identical to an uninterrupted run.

use burn::tensor::Bytes;
use burn_sam_sample::policy::{AeSamConfig, GatePolicy, TrendConfig, VariationConfig};
use burn_sam_sample::{SamConfig, SamError, SamOptimizer, SamOptimizerRecord};
use burn_sam_sample_tests::{device, params, random_mlp, sgd_momentum, train_steps, Mlp};

fn configs() -> Vec<(&'static str, SamConfig)> {
    let variation = VariationConfig::new(4).with_window(10).with_blocks(2);
    vec![
        ("vsam", SamConfig::new().with_policy(GatePolicy::Variation(variation)).with_seed(3)),
        (
            "vsam-trend",
            SamConfig::vsam_trend().with_policy(GatePolicy::Trend(
                TrendConfig::new().with_warmup_steps(4).with_history(5).with_base_fraction(0.3),
            )),
        ),
        ("look-sam", SamConfig::look_sam(3, 0.5)),
        ("ae-sam", SamConfig::ae_sam(30).with_policy(GatePolicy::AeSam(AeSamConfig::new(30).with_delta(0.5)))),
        ("rst", SamConfig::rst(0.4).with_seed(5)),
        ("asam", SamConfig::asam()),
    ]
}

fn train(sam: &mut SamOptimizer, model: Mlp, steps: std::ops::Range<u64>, decisions: &mut Vec<bool>) -> Mlp {
    train_steps(sam, model, steps, 1000, decisions)
}

enum Via {
    Bytes,
    File,
}

fn check_resume(name: &str, config: SamConfig, via: Via) {
    let device = device();
    let model = random_mlp(&device, 21);

    let mut straight_decisions = Vec::new();
    let mut sam = config.init(sgd_momentum()).unwrap();
    let straight = train(&mut sam, model.clone(), 0..30, &mut straight_decisions);

    let mut decisions = Vec::new();
    let mut sam = config.init(sgd_momentum()).unwrap();
    let half = train(&mut sam, model, 0..13, &mut decisions);
    let mut fresh = config.init(sgd_momentum()).unwrap();
    match via {
        Via::Bytes => {
            let bytes: Bytes = sam.to_record().into_bytes().unwrap();
            drop(sam);
            fresh.load_record(SamOptimizerRecord::from_bytes(bytes).unwrap(), &half).unwrap();
        }
        Via::File => {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("sam-state.bpk");
            sam.to_record().save(&path).unwrap();
            drop(sam);
            fresh.load_record(SamOptimizerRecord::load(&path).unwrap(), &half).unwrap();
        }
    }
    let resumed = train(&mut fresh, half, 13..30, &mut decisions);

    assert_eq!(decisions, straight_decisions, "{name}: gate decisions");
    assert!(decisions.iter().any(|&d| d) && decisions.iter().any(|&d| !d) || name == "asam", "{name}: {decisions:?}");
    let bits = |m: &Mlp| -> Vec<Vec<u32>> {
        params(m).into_iter().map(|(_, v)| v.into_iter().map(f32::to_bits).collect()).collect()
    };
    assert_eq!(bits(&resumed), bits(&straight), "{name}: weights");
    assert_eq!(fresh.telemetry().step, 30);
}

#[test]
fn resume_through_bytes_is_bit_exact() {
    for (name, config) in configs() {
        check_resume(name, config, Via::Bytes);
    }
}

#[test]
fn resume_through_a_file_is_bit_exact() {
    for (name, config) in configs() {
        check_resume(name, config, Via::File);
    }
}

fn trained(config: &SamConfig) -> (SamOptimizer, Mlp) {
    let mut sam = config.init(sgd_momentum()).unwrap();
    let model = train(&mut sam, random_mlp(&device(), 21), 0..6, &mut Vec::new());
    (sam, model)
}

#[test]
fn loading_into_another_module_names_the_first_mismatch() {
    let config = SamConfig::look_sam(2, 0.5);
    let (sam, model) = trained(&config);
    let record = || sam.to_record().into_bytes().unwrap();

    // Fresh parameters: the ids of the record are missing.
    let other = random_mlp(&device(), 21);
    let err = config
        .init(sgd_momentum())
        .unwrap()
        .load_record(SamOptimizerRecord::from_bytes(record()).unwrap(), &other)
        .unwrap_err();
    let id = model.l1.weight.id.val();
    assert!(matches!(err, SamError::RecordMismatch(_)), "{err}");
    assert!(err.to_string().contains(&format!("parameter {id}")), "{err}");
    assert!(err.to_string().contains("missing"), "{err}");

    // Same ids, other shapes.
    let mut wrong = model.clone();
    wrong.l1.weight =
        wrong.l1.weight.map(|w| burn::tensor::Tensor::from_inner(w.inner().slice([0..5, 0..16])).require_grad());
    let err = config
        .init(sgd_momentum())
        .unwrap()
        .load_record(SamOptimizerRecord::from_bytes(record()).unwrap(), &wrong)
        .unwrap_err();
    assert!(err.to_string().contains("[6, 16]") && err.to_string().contains("[5, 16]"), "{err}");

    // Another policy.
    let err = SamConfig::sam()
        .init(sgd_momentum())
        .unwrap()
        .load_record(SamOptimizerRecord::from_bytes(record()).unwrap(), &model)
        .unwrap_err();
    assert!(err.to_string().contains("reuse rule"), "{err}");
    let err = SamConfig::look_sam(2, 0.5)
        .with_policy(GatePolicy::Always)
        .init(sgd_momentum())
        .unwrap()
        .load_record(SamOptimizerRecord::from_bytes(record()).unwrap(), &model)
        .unwrap_err();
    assert!(err.to_string().contains("gate policy"), "{err}");

    // A failed load leaves the optimizer usable and unchanged.
    let mut target = config.init(sgd_momentum()).unwrap();
    assert!(target.load_record(SamOptimizerRecord::from_bytes(record()).unwrap(), &other).is_err());
    assert_eq!(target.telemetry().step, 0);
}

#[test]
fn corrupt_bytes_are_an_error() {
    let (sam, _) = trained(&SamConfig::vsam(2));
    let bytes = sam.to_record().into_bytes().unwrap().to_vec();
    for cut in [0, 7, 64, bytes.len() / 2, bytes.len() - 1] {
        let result = burn_sam_sample::SamOptimizerRecord::from_bytes(Bytes::from_bytes_vec(bytes[..cut].to_vec()));
        assert!(result.is_err(), "truncated at {cut}");
    }
}
