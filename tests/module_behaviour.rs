//! What the perturbed pass may and may not touch: ids, frozen parameters, BatchNorm running
//! statistics; and what non-finite or zero gradients do.

use burn::module::Module;
use burn::optim::{GradientsParams, SgdConfig};
use burn_sam_sample::advanced::{Pass, SamEngine};
use burn_sam_sample::policy::GatePolicy;
use burn_sam_sample::reuse::ReusePolicy;
use burn_sam_sample::SamConfig;
use burn_sam_sample_tests::{device, params, random_batch, random_mlp, BnNet, Mlp};

fn first_and_perturbed(model: &Mlp, engine: &mut SamEngine) -> Mlp {
    let (x, y) = random_batch(&device(), 7);
    let loss = model.loss(&x, &y);
    let Pass::Sam(pass) = engine.first_pass(model, GradientsParams::from_grads(loss.backward(), model), &loss) else {
        panic!("the SAM gate always perturbs")
    };
    pass.perturbed(model)
}

#[test]
fn the_perturbed_clone_keeps_ids_and_the_original_is_unchanged() {
    let device = device();
    let model = random_mlp(&device, 1);
    let before = params(&model);
    let mut engine = SamEngine::new(&SamConfig::sam()).unwrap();
    let perturbed = first_and_perturbed(&model, &mut engine);
    let after = params(&perturbed);
    assert_eq!(
        before.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        after.iter().map(|(id, _)| *id).collect::<Vec<_>>()
    );
    for ((_, a), (_, b)) in before.iter().zip(&after) {
        assert_ne!(a, b, "every parameter with a gradient is perturbed");
    }
    assert_eq!(params(&model), before, "the original module is not modified");
    assert!(perturbed.l1.weight.val().is_require_grad());
}

#[test]
fn frozen_parameters_are_neither_perturbed_nor_updated() {
    let device = device();
    let mut model = random_mlp(&device, 1);
    model.l1 = model.l1.no_grad();
    let frozen = params(&model.l1);
    let mut engine = SamEngine::new(&SamConfig::sam()).unwrap();
    let perturbed = first_and_perturbed(&model, &mut engine);
    assert_eq!(params(&perturbed.l1), frozen);
    assert!(!perturbed.l1.weight.val().is_require_grad());
    assert_ne!(params(&perturbed.l2), params(&model.l2));

    let mut sam = SamConfig::sam().init(SgdConfig::new().init()).unwrap();
    let (x, y) = random_batch(&device, 8);
    for _ in 0..3 {
        model = sam.step(0.1, model, |m: &Mlp| (m.loss(&x, &y), ())).0;
    }
    assert_eq!(params(&model.l1), frozen);
}

fn running_mean(net: &BnNet) -> Vec<f32> {
    net.bn.running_mean.value_sync().into_data().iter::<f32>().collect()
}

#[test]
fn batch_norm_running_statistics_are_updated_once_per_step() {
    let device = device();
    let (x, y) = random_batch(&device, 9);
    let x = x.mul_scalar(3.0).add_scalar(1.0);

    // One plain forward pass on an identical network gives the expected running mean.
    let reference = BnNet::new(&device);
    let _ = reference.loss(&x, &y);
    let expected = running_mean(&reference);

    // A second forward pass moves it again: the check below can fail.
    let twice = BnNet::new(&device);
    let _ = twice.loss(&x, &y);
    let _ = twice.loss(&x, &y);
    assert_ne!(running_mean(&twice), expected);

    let net = BnNet::new(&device);
    let mut sam = SamConfig::sam().init(SgdConfig::new().init()).unwrap();
    let (net, out) = sam.step(0.1, net, |m: &BnNet| (m.loss(&x, &y), ()));
    assert!(out.telemetry.sam);
    assert_eq!(running_mean(&net), expected);
}

#[test]
fn a_nan_gradient_leaves_the_cache_finite_and_zeroes_the_update() {
    let device = device();
    let (x, y) = random_batch(&device, 10);
    let config = SamConfig::new().with_policy(GatePolicy::Periodic { k: 2 }).with_reuse(ReusePolicy::decayed_psf());
    let mut sam = config.init(SgdConfig::new().init()).unwrap();
    let mut model = random_mlp(&device, 2);
    let poison = |m: &Mlp| (m.loss(&x, &y) * f32::NAN, ());
    let fine = |m: &Mlp| (m.loss(&x, &y), ());

    model = sam.step(0.1, model, fine).0; // SAM step: caches a PSF
    let cache_before = sam.to_record().engine;
    let weights = params(&model);
    let (next, out) = sam.step(0.1, model, poison); // cheap step, NaN
    model = next;
    assert!(!out.telemetry.sam);
    assert_eq!(params(&model), weights, "a non-finite cheap step applies no update");
    let (next, out) = sam.step(0.1, model, poison); // SAM step, NaN
    model = next;
    assert!(out.telemetry.sam && out.telemetry.skipped);
    assert_eq!(params(&model), weights, "a non-finite SAM step applies no update");
    assert_eq!(out.telemetry.non_finite_steps, 2, "the cheap step is counted at the SAM step");
    assert!(params(&model).iter().all(|(_, v)| v.iter().all(|x| x.is_finite())));

    let cache_after = sam.to_record().engine;
    assert_eq!(cache_after.cached_tensors(), cache_before.cached_tensors());
    for ((id_a, a), (id_b, b)) in cache_before.cache().iter().zip(cache_after.cache()) {
        assert_eq!(id_a, id_b);
        assert_eq!(a.as_bytes(), b.as_bytes(), "the cached PSF is untouched");
        assert!(a.iter::<f32>().all(f32::is_finite));
    }

    // Training goes on, finite.
    for _ in 0..4 {
        model = sam.step(0.1, model, fine).0;
    }
    assert!(params(&model).iter().all(|(_, v)| v.iter().all(|x| x.is_finite())));
    assert_eq!(sam.sync_telemetry().non_finite_steps, 2);
}

#[test]
fn a_zero_gradient_gives_no_perturbation_and_no_nan() {
    let device = device();
    let (x, y) = random_batch(&device, 11);
    let mut sam = SamConfig::vsam(3).init(SgdConfig::new().init()).unwrap();
    let mut model = random_mlp(&device, 3);
    let before = params(&model);
    for _ in 0..3 {
        let (next, out) = sam.step(0.1, model, |m: &Mlp| (m.loss(&x, &y).mul_scalar(0.0), ()));
        model = next;
        assert!(out.telemetry.sam && !out.telemetry.skipped);
        assert_eq!(out.telemetry.psf_norm, Some(0.0));
        assert_eq!(out.telemetry.psf_ratio, Some(0.0));
    }
    assert_eq!(params(&model), before);
    let mut engine = SamEngine::new(&SamConfig::sam()).unwrap();
    let loss = model.loss(&x, &y).mul_scalar(0.0);
    let Pass::Sam(pass) = engine.first_pass(&model, GradientsParams::from_grads(loss.backward(), &model), &loss) else {
        panic!("the SAM gate always perturbs")
    };
    let perturbed = pass.perturbed(&model);
    assert_eq!(params(&perturbed), before, "ε = 0 for g = 0");
}

#[test]
fn gradient_checkpointing_is_kept_on_the_perturbed_clone() {
    let device = device().gradient_checkpointing();
    let mut model = random_mlp(&device, 6);
    let (x, y) = random_batch(&device, 12);
    let strategy = model.l1.weight.val().gradient_checkpointing_strategy();
    assert!(strategy.is_some());

    let mut engine = SamEngine::new(&SamConfig::sam()).unwrap();
    let loss = model.loss(&x, &y);
    let Pass::Sam(pass) = engine.first_pass(&model, GradientsParams::from_grads(loss.backward(), &model), &loss) else {
        panic!("the SAM gate always perturbs")
    };
    let perturbed = pass.perturbed(&model);
    assert_eq!(perturbed.l1.weight.val().gradient_checkpointing_strategy(), strategy);

    // Without the restored strategy the perturbed pass would mix two strategies and panic.
    let mut sam = SamConfig::vsam(2).init(SgdConfig::new().init()).unwrap();
    for _ in 0..4 {
        model = sam.step(0.1, model, |m: &Mlp| (m.loss(&x, &y), ())).0;
    }
    assert!(params(&model).iter().all(|(_, v)| v.iter().all(|x| x.is_finite())));
}
