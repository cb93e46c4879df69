//! Half precision: models whose parameters are bf16 or f16 train under every method, the `Always`
//! gate is a hand-written bf16 SAM bit for bit, one SAM and one ASAM step stay within bf16's
//! rounding of the float64 reference, the cache's precision sets its memory and survives a resume
//! exactly, and an f16 overflow storm leaves the cache finite.
//!
//! The models are cast (`cast_module`) rather than the device's default float configured, so that
//! the tests of this binary can share one device. They run on the test backend when it computes
//! in the dtype, else on flex (ndarray has no half precision); see `common::half_device`.

use burn::optim::{decay::WeightDecayConfig, momentum::MomentumConfig, GradientsParams, ModuleOptimizer, SgdConfig};
use burn::prelude::*;
use burn::tensor::DType;
use burn_sam_sample::policy::GatePolicy;
use burn_sam_sample::reuse::{CachePrecision, ReusePolicy};
use burn_sam_sample::{SamConfig, SamError, SamOptimizer, SamOptimizerRecord};
use burn_sam_sample_tests::reference::*;
use burn_sam_sample_tests::{
    cast_module, half_device, hand_written_sam, params, random_batch, random_mlp, reference_mlp, values, Mlp,
};

const LR: f64 = 0.05;

/// The device for `dtype`, or `None` with a line saying why the test has nothing to run.
fn device_for(dtype: DType, test: &str) -> Option<Device> {
    let device = half_device(dtype);
    if device.is_none() {
        let backend = burn_sam_sample_tests::backend_name();
        eprintln!("{test}: the {backend} device has no {dtype:?} arithmetic and flex is not compiled in");
        // What the library promises on such a device: a bf16 cache falls back to f32.
        let device = burn_sam_sample_tests::device();
        if dtype == DType::BF16 {
            assert_eq!(CachePrecision::Bf16.storage_dtype(DType::F32, &device), DType::F32);
        }
    }
    device
}

fn batch(device: &Device, seed: u64, dtype: DType) -> (Tensor<2>, Tensor<2>) {
    let (x, y) = random_batch(device, seed);
    (x.cast(dtype), y.cast(dtype))
}

fn momentum_sgd() -> ModuleOptimizer {
    SgdConfig::new()
        .with_momentum(Some(MomentumConfig::new().with_momentum(0.9)))
        .with_weight_decay(Some(WeightDecayConfig::new(1e-3)))
        .init()
}

/// The bits of every parameter, as the f32 values they convert to exactly.
fn bits(model: &Mlp) -> Vec<Vec<u32>> {
    params(model).into_iter().map(|(_, v)| v.into_iter().map(f32::to_bits).collect()).collect()
}

fn dtypes(model: &Mlp) -> Vec<DType> {
    vec![
        model.l1.weight.val().dtype(),
        model.l1.bias.as_ref().map(|b| b.val().dtype()).unwrap_or(DType::F64),
        model.l2.weight.val().dtype(),
        model.l2.bias.as_ref().map(|b| b.val().dtype()).unwrap_or(DType::F64),
    ]
}

fn engine_run(
    sam: &mut SamOptimizer,
    mut model: Mlp,
    device: &Device,
    dtype: DType,
    steps: std::ops::Range<u64>,
) -> Mlp {
    for step in steps {
        let (x, y) = batch(device, 100 + step, dtype);
        model = sam.step(LR, model, |m: &Mlp| (m.loss(&x, &y), ())).0;
    }
    model
}

#[test]
fn always_gate_is_plain_sam_bit_for_bit_in_bf16_and_f16() {
    for dtype in [DType::BF16, DType::F16] {
        let Some(device) = device_for(dtype, "always_gate_is_plain_sam_bit_for_bit") else { continue };
        let model = cast_module(random_mlp(&device, 1), dtype);
        let expected = hand_written_sam(model.clone(), &device, dtype, 10, 0.05, momentum_sgd());
        let mut sam = SamConfig::sam().init(momentum_sgd()).unwrap();
        let actual = engine_run(&mut sam, model.clone(), &device, dtype, 0..10);
        assert_eq!(dtypes(&actual), vec![dtype; 4], "the parameters stay {dtype:?}");
        assert_eq!(bits(&actual), bits(&expected), "{dtype:?}");
        assert_ne!(bits(&actual), bits(&model), "{dtype:?}: the steps changed the weights");
    }
}

/// One step of `config` with plain SGD (lr 0.1) on the reference model and batch in `dtype`.
fn reference_step(config: SamConfig, device: &Device, dtype: DType) -> (Mlp, Mlp) {
    let (model, x, y) = reference_mlp(device);
    let model = cast_module(model, dtype);
    let (x, y) = (x.cast(dtype), y.cast(dtype));
    let mut sam = config.init(SgdConfig::new().init()).unwrap();
    let (after, _) = sam.step(0.1, model.clone(), |m: &Mlp| (m.loss(&x, &y), ()));
    (model, after)
}

fn flatten<const R: usize, const C: usize>(m: [[f64; C]; R]) -> Vec<f64> {
    m.iter().flatten().copied().collect()
}

fn all_values(model: &Mlp) -> Vec<f64> {
    let mut out = values(model.l1.weight.val());
    out.extend(values(model.l1.bias.as_ref().unwrap().val()));
    out.extend(values(model.l2.weight.val()));
    out.extend(values(model.l2.bias.as_ref().unwrap().val()));
    out
}

/// Checks a bf16 step against the float64 reference: every weight within `TOL` of it, and the
/// update (after − before) pointing the reference's way (cosine ≥ 0.995), so that the tolerance
/// cannot be met by a step that did nothing.
fn assert_near_reference(before: &Mlp, after: &Mlp, expected: Vec<f64>, what: &str) {
    // bf16 keeps 8 significant bits: storing a weight of magnitude < 2 rounds it by at most
    // 2⁻⁸ (0.0039); the reference's initial weights are themselves rounded on the way in, and
    // the step adds the roundings of the forward pass, g and g_s. Twice the storage rounding
    // covers it (the largest deviations measured on flex: 0.0033 for SAM, 0.0043 for ASAM; the
    // cosines 0.9995 and 0.9996).
    const TOL: f64 = 2.0 * 0.0039;
    let actual = all_values(after);
    burn_sam_sample_tests::assert_close(&actual, &expected, TOL, what);
    let init = [flatten(INIT_W1), INIT_B1.to_vec(), flatten(INIT_W2), INIT_B2.to_vec()].concat();
    let start = all_values(before);
    let step: Vec<f64> = actual.iter().zip(&start).map(|(a, s)| a - s).collect();
    let reference: Vec<f64> = expected.iter().zip(&init).map(|(e, i)| e - i).collect();
    let dot: f64 = step.iter().zip(&reference).map(|(a, b)| a * b).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let cosine = dot / (norm(&step) * norm(&reference));
    assert!(cosine >= 0.995, "{what}: the bf16 update has cosine {cosine:.4} with the reference's");
}

#[test]
fn one_sam_and_one_asam_step_in_bf16_are_within_its_rounding_of_the_float64_reference() {
    let Some(device) = device_for(DType::BF16, "reference") else { return };
    let (before, after) = reference_step(SamConfig::sam(), &device, DType::BF16);
    assert_near_reference(
        &before,
        &after,
        [flatten(SAM_W1), SAM_B1.to_vec(), flatten(SAM_W2), SAM_B2.to_vec()].concat(),
        "SAM",
    );
    let (before, after) = reference_step(SamConfig::asam(), &device, DType::BF16);
    let asam = [flatten(ASAM_W1), ASAM_B1.to_vec(), flatten(ASAM_W2), ASAM_B2.to_vec()].concat();
    assert_near_reference(&before, &after, asam, "ASAM");
}

/// Mean loss over the four training batches, in f64.
fn mean_loss(model: &Mlp, batches: &[(Tensor<2>, Tensor<2>)]) -> f64 {
    let losses: f64 =
        batches.iter().map(|(x, y)| f64::from(model.loss(x, y).cast(DType::F32).into_scalar::<f32>())).sum();
    losses / batches.len() as f64
}

#[test]
fn every_method_trains_a_bf16_and_an_f16_model() {
    let methods: Vec<(&str, SamConfig)> = vec![
        ("sam", SamConfig::sam()),
        ("asam", SamConfig::asam()),
        ("vsam", SamConfig::vsam(5)),
        ("vsam-trend", SamConfig::vsam_trend()),
        ("look-sam", SamConfig::look_sam(3, 0.7)),
        ("ae-sam", SamConfig::ae_sam(80)),
        ("rst", SamConfig::rst(0.3)),
        ("sgd", SamConfig::base_only()),
    ];
    for dtype in [DType::BF16, DType::F16] {
        let Some(device) = device_for(dtype, "every_method_trains") else { continue };
        let batches: Vec<_> = (0..4).map(|seed| batch(&device, 40 + seed, dtype)).collect();
        let start = cast_module(random_mlp(&device, 3), dtype);
        let initial = mean_loss(&start, &batches);
        let parameters = 6 * 16 + 16 + 16 * 3 + 3;
        for (name, config) in &methods {
            let mut sam = config.init(SgdConfig::new().init()).unwrap();
            let mut model = start.clone();
            for step in 0..80 {
                let (x, y) = &batches[step % batches.len()];
                model = sam.step(LR, model, |m: &Mlp| (m.loss(x, y), ())).0;
            }
            let telemetry = sam.sync_telemetry();
            let last = mean_loss(&model, &batches);
            assert_eq!(dtypes(&model), vec![dtype; 4], "{name} {dtype:?}: the parameters stay {dtype:?}");
            assert!(params(&model).iter().all(|(_, v)| v.iter().all(|x| x.is_finite())), "{name} {dtype:?}");
            assert_eq!(telemetry.non_finite_steps, 0, "{name} {dtype:?}");
            assert!(last < 0.8 * initial, "{name} {dtype:?}: loss {initial:.4} -> {last:.4}");
            if *name != "sgd" {
                assert!(telemetry.sam_steps > 0, "{name} {dtype:?}: {telemetry:?}");
            }
            // The cache is kept in the parameters' dtype (two bytes a value), LookSAM's norm in f32.
            let expected_cache = match config.reuse {
                ReusePolicy::None => 0,
                ReusePolicy::DecayedPsf { .. } => 2 * parameters,
                ReusePolicy::LookSam { .. } => 2 * parameters + 4,
            };
            assert_eq!(telemetry.cache_bytes, expected_cache as u64, "{name} {dtype:?}");
        }
    }
}

/// Decayed-PSF reuse after every other step: a cache exists after the first step.
fn caching(precision: CachePrecision) -> SamConfig {
    SamConfig::new()
        .with_policy(GatePolicy::Periodic { k: 2 })
        .with_reuse(ReusePolicy::decayed_psf())
        .with_cache_precision(precision)
}

#[test]
fn the_cache_precision_sets_the_cached_bytes_and_a_half_cache_resumes_exactly() {
    let Some(device) = device_for(DType::BF16, "cache_precision") else { return };
    let parameters = (6 * 16 + 16 + 16 * 3 + 3) as u64;
    let cases = [
        (DType::F32, CachePrecision::Parameters, 4, DType::F32),
        (DType::F32, CachePrecision::F32, 4, DType::F32),
        (DType::F32, CachePrecision::Bf16, 2, DType::BF16),
        (DType::BF16, CachePrecision::Parameters, 2, DType::BF16),
        (DType::BF16, CachePrecision::F32, 4, DType::F32),
        (DType::BF16, CachePrecision::Bf16, 2, DType::BF16),
    ];
    // Plain SGD keeps no state; a base optimizer's state of a half-precision model is the
    // subject of the next test.
    let sgd = || SgdConfig::new().with_weight_decay(Some(WeightDecayConfig::new(1e-3))).init();
    for (model_dtype, precision, bytes, stored) in cases {
        let what = format!("{model_dtype:?} model, cache {precision}");
        let model = cast_module(random_mlp(&device, 4), model_dtype);
        let mut sam = caching(precision).init(sgd()).unwrap();
        let model = engine_run(&mut sam, model, &device, model_dtype, 0..3);
        assert_eq!(sam.telemetry().cache_bytes, bytes * parameters, "{what}");
        let record = sam.to_record();
        assert!(record.engine.cache().iter().all(|(_, data)| data.dtype() == stored), "{what}");
        let bytes_on_disk = record.into_bytes().unwrap();

        let straight = engine_run(&mut sam, model.clone(), &device, model_dtype, 3..9);
        let mut resumed = caching(precision).init(sgd()).unwrap();
        resumed.load_record(SamOptimizerRecord::from_bytes(bytes_on_disk.clone()).unwrap(), &model).unwrap();
        let again = engine_run(&mut resumed, model.clone(), &device, model_dtype, 3..9);
        assert_eq!(bits(&again), bits(&straight), "{what}: the resumed run continues bit for bit");
        assert_eq!(resumed.telemetry(), sam.telemetry(), "{what}");

        // A run that keeps its cache in another dtype refuses the record, naming both.
        let other = if stored == DType::F32 { CachePrecision::Bf16 } else { CachePrecision::F32 };
        let mut refused = caching(other).init(sgd()).unwrap();
        match refused.load_record(SamOptimizerRecord::from_bytes(bytes_on_disk).unwrap(), &model) {
            Err(SamError::RecordMismatch(message)) => {
                assert!(
                    message.contains(&format!("{stored:?}")) && message.contains(other.name()),
                    "{what}: {message}"
                );
            }
            other => panic!("{what}: a record with a {stored:?} cache loaded under `{precision}`: {other:?}"),
        }
    }
}

#[test]
fn a_half_precision_base_state_that_burn_would_restore_in_f32_is_refused() {
    let Some(device) = device_for(DType::BF16, "base state") else { return };
    // The default device's float dtype is f32 in this binary, so Burn would bring SGD's bf16
    // momentum back as f32 (and the next step would add bf16 gradients to it).
    assert_eq!(DType::from(Device::default().settings().float_dtype), DType::F32);
    let model = cast_module(random_mlp(&device, 4), DType::BF16);
    let mut sam = caching(CachePrecision::Parameters).init(momentum_sgd()).unwrap();
    let model = engine_run(&mut sam, model, &device, DType::BF16, 0..3);
    let bytes = sam.to_record().into_bytes().unwrap();
    let mut fresh = caching(CachePrecision::Parameters).init(momentum_sgd()).unwrap();
    match fresh.load_record(SamOptimizerRecord::from_bytes(bytes).unwrap(), &model) {
        Err(SamError::RecordMismatch(message)) => {
            assert!(message.contains("BF16") && message.contains("Device::configure"), "{message}");
        }
        other => panic!("a bf16 momentum state was accepted: {other:?}"),
    }
    // The same model in f32 resumes its momentum as before.
    let model = random_mlp(&device, 4);
    let mut sam = caching(CachePrecision::Parameters).init(momentum_sgd()).unwrap();
    let model = engine_run(&mut sam, model, &device, DType::F32, 0..3);
    let bytes = sam.to_record().into_bytes().unwrap();
    let mut fresh = caching(CachePrecision::Parameters).init(momentum_sgd()).unwrap();
    fresh.load_record(SamOptimizerRecord::from_bytes(bytes).unwrap(), &model).unwrap();
}

#[test]
fn an_f16_overflow_storm_leaves_the_cache_finite_and_a_large_norm_is_no_overflow() {
    let dtype = DType::F16;
    let Some(device) = device_for(dtype, "f16 storm") else { return };
    // Targets ×1000 make the squared residuals (~10⁶) overflow f16 (max 65504): loss and
    // gradients are infinite or NaN on those steps.
    let mut sam = caching(CachePrecision::Parameters).init(SgdConfig::new().init()).unwrap();
    let mut model = cast_module(random_mlp(&device, 5), dtype);
    for step in 0..24u64 {
        let (x, y) = batch(&device, 200 + step, dtype);
        let y = if step % 3 == 1 { y.mul_scalar(1000.0) } else { y };
        model = sam.step(LR, model, |m: &Mlp| (m.loss(&x, &y), ())).0;
    }
    let telemetry = sam.sync_telemetry();
    assert!(telemetry.non_finite_steps >= 4, "{telemetry:?}");
    assert!(params(&model).iter().all(|(_, v)| v.iter().all(|x| x.is_finite())), "the weights stay finite");
    let record = sam.to_record();
    assert!(!record.engine.cache().is_empty());
    for (id, data) in record.engine.cache() {
        assert_eq!(data.dtype(), DType::F16);
        assert!(data.iter::<f32>().all(f32::is_finite), "the cache of parameter {id} stays finite");
    }

    // A linear loss with a large weight gives gradient elements of a few hundred (they and the
    // loss fit f16) whose ‖g‖² passes f16's range: ‖g‖² is summed in f32, so this is an ordinary
    // step, not a non-finite one.
    let mut sam = SamConfig::sam().init(SgdConfig::new().init()).unwrap();
    let model = cast_module(random_mlp(&device, 6), dtype);
    let (x, _) = batch(&device, 300, dtype);
    let linear_loss = |m: &Mlp| m.forward(x.clone()).mul_scalar(1000.0).mean();
    let grads = GradientsParams::from_grads(linear_loss(&model).backward(), &model);
    let grad_sq: f64 = [
        grads.get::<2>(model.l1.weight.id).unwrap().cast(DType::F32).square().sum(),
        grads.get::<1>(model.l1.bias.as_ref().unwrap().id).unwrap().cast(DType::F32).square().sum(),
        grads.get::<2>(model.l2.weight.id).unwrap().cast(DType::F32).square().sum(),
        grads.get::<1>(model.l2.bias.as_ref().unwrap().id).unwrap().cast(DType::F32).square().sum(),
    ]
    .into_iter()
    .map(|t| f64::from(t.into_scalar::<f32>()))
    .sum();
    assert!(grad_sq > 65504.0 && grad_sq.is_finite(), "‖g‖² = {grad_sq} must pass f16's range");
    let (after, out) = sam.step(1e-4, model.clone(), |m: &Mlp| (linear_loss(m), ()));
    assert!(out.telemetry.sam && !out.telemetry.skipped, "{:?}", out.telemetry);
    assert_eq!(out.telemetry.non_finite_steps, 0);
    assert_ne!(bits(&after), bits(&model));
    assert!(params(&after).iter().all(|(_, v)| v.iter().all(|x| x.is_finite())));
}
