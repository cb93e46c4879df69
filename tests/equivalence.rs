//! Degenerate gates reduce exactly to the methods they stand for, and the reuse rule adds what
//! it says.

use burn::optim::{decay::WeightDecayConfig, momentum::MomentumConfig, GradientsParams, ModuleOptimizer, SgdConfig};
use burn_sam_sample::advanced::SamEngine;
use burn_sam_sample::policy::GatePolicy;
use burn_sam_sample::reuse::ReusePolicy;
use burn_sam_sample::SamConfig;
use burn_sam_sample_tests::{
    device, hand_driven_step, hand_written_sam, params, random_batch, random_mlp, values, Mlp,
};

const LR: f64 = 0.05;

fn base() -> ModuleOptimizer {
    SgdConfig::new()
        .with_momentum(Some(MomentumConfig::new().with_momentum(0.9)))
        .with_weight_decay(Some(WeightDecayConfig::new(1e-3)))
        .init()
}

fn engine_run(config: SamConfig, mut model: Mlp, steps: usize) -> Mlp {
    let device = device();
    let mut sam = config.init(base()).unwrap();
    for step in 0..steps {
        let (x, y) = random_batch(&device, 100 + step as u64);
        model = sam.step(LR, model, |m: &Mlp| (m.loss(&x, &y), ())).0;
    }
    model
}

fn bits(model: &Mlp) -> Vec<Vec<u32>> {
    params(model).into_iter().map(|(_, v)| v.into_iter().map(f32::to_bits).collect()).collect()
}

#[test]
fn always_gate_is_plain_sam_bit_for_bit() {
    let device = device();
    let model = random_mlp(&device, 1);
    let expected = hand_written_sam(model.clone(), &device, burn::tensor::DType::F32, 10, 0.05, base());
    let actual = engine_run(SamConfig::sam(), model, 10);
    assert_eq!(bits(&actual), bits(&expected));
}

#[test]
fn never_gate_is_the_base_optimizer_bit_for_bit() {
    let device = device();
    let mut expected = random_mlp(&device, 2);
    let model = expected.clone();
    let mut optim = base();
    for step in 0..10 {
        let (x, y) = random_batch(&device, 100 + step as u64);
        let grads = GradientsParams::from_grads(expected.loss(&x, &y).backward(), &expected);
        expected = optim.step(LR, expected, grads);
    }
    for reuse in [ReusePolicy::None, ReusePolicy::decayed_psf(), ReusePolicy::look_sam()] {
        let actual = engine_run(SamConfig::base_only().with_reuse(reuse.clone()), model.clone(), 10);
        assert_eq!(bits(&actual), bits(&expected), "{reuse:?}");
    }
}

/// Runs the engine alone on a fixed module and batch; returns each step's direction for
/// `l1.weight`, and the plain gradient.
fn directions(config: SamConfig, steps: usize) -> (Vec<Vec<f64>>, Vec<f64>) {
    let device = device();
    let model = random_mlp(&device, 3);
    let (x, y) = random_batch(&device, 4);
    let id = model.l1.weight.id;
    let plain = GradientsParams::from_grads(model.loss(&x, &y).backward(), &model);
    let plain = values(plain.get::<2>(id).unwrap());
    let mut engine = SamEngine::new(&config).unwrap();
    let mut out = Vec::new();
    for _ in 0..steps {
        let (direction, _) = hand_driven_step(&mut engine, &model, &x, &y);
        out.push(values(direction.get::<2>(id).unwrap()));
    }
    (out, plain)
}

#[test]
fn decayed_psf_adds_beta_powers_for_six_steps_then_nothing() {
    let config = SamConfig::new()
        .with_policy(GatePolicy::Periodic { k: 100 })
        .with_reuse(ReusePolicy::DecayedPsf { beta: 0.7, max_reuse: 6 });
    let (dirs, g) = directions(config, 10);
    let psf: Vec<f64> = dirs[0].iter().zip(&g).map(|(gs, g)| gs - g).collect();
    assert!(psf.iter().any(|v| v.abs() > 1e-6), "the PSF must not vanish");
    for k in 1..=6 {
        let weight = 0.7f64.powi(k);
        for (i, d) in dirs[k as usize].iter().enumerate() {
            let expected = g[i] + weight * psf[i];
            assert!((d - expected).abs() < 1e-6, "k = {k}, [{i}]: {d} vs {expected}");
        }
    }
    for (k, dir) in dirs.iter().enumerate().take(10).skip(7) {
        assert_eq!(dir, &g, "k = {k}: the PSF has expired");
    }
}

#[test]
fn no_reuse_cheap_steps_are_the_plain_gradient() {
    let (dirs, g) = directions(SamConfig::rst(1e-9).with_seed(1), 4);
    for d in &dirs {
        assert_eq!(d, &g);
    }
}

#[test]
fn an_abandoned_pass_leaves_the_next_step_as_in_a_fresh_run() {
    let device = device();
    let model = random_mlp(&device, 3);
    let (x, y) = random_batch(&device, 4);
    let run = |abandon: bool| {
        let mut engine = SamEngine::new(&SamConfig::sam()).unwrap();
        if abandon {
            let loss = model.loss(&x, &y);
            let pass = engine.first_pass(&model, GradientsParams::from_grads(loss.backward(), &model), &loss);
            assert!(pass.is_sam());
        }
        let (direction, telemetry) = hand_driven_step(&mut engine, &model, &x, &y);
        (values(direction.get::<2>(model.l1.weight.id).unwrap()), telemetry.step, telemetry.rounds)
    };
    assert_eq!(run(true), run(false));
}

#[test]
fn telemetry_counts_passes_and_fraction() {
    let device = device();
    let model = random_mlp(&device, 3);
    let (x, y) = random_batch(&device, 4);
    let mut sam = SamConfig::look_sam(4, 0.7).init(base()).unwrap();
    let mut model = model;
    let mut telemetry = None;
    for _ in 0..8 {
        let (next, out) = sam.step(LR, model, |m: &Mlp| (m.loss(&x, &y), ()));
        model = next;
        telemetry = Some(out.telemetry);
    }
    let t = telemetry.unwrap();
    assert_eq!((t.step, t.sam_steps, t.passes), (8, 2, 10));
    assert_eq!(t.sam_fraction, 0.25);
    assert_eq!(t.passes_per_step(), 1.25);
    assert!(t.psf_norm.unwrap() > 0.0 && t.psf_ratio.unwrap() > 0.0);
}

/// The docs' promise about host reads, counted: one per SAM step and none per cheap step (the
/// non-finite counts of cheap steps ride along with the next SAM step's read); AE-SAM reads its
/// lagged ‖g‖² once per cheap step besides; `sync_telemetry` reads only when there is a count.
#[test]
fn host_reads_are_one_per_sam_step_and_none_per_cheap_step() {
    let device = device();
    let (x, y) = random_batch(&device, 4);
    for (config, extra_per_cheap) in [
        (SamConfig::sam(), 0),
        (SamConfig::look_sam(4, 0.7), 0),
        (SamConfig::vsam(3), 0),
        (SamConfig::rst(0.3).with_seed(5), 0),
        (SamConfig::base_only(), 0),
        (SamConfig::ae_sam(40), 1),
    ] {
        let name = config.policy.name();
        let mut sam = config.init(base()).unwrap();
        let mut model = random_mlp(&device, 3);
        let mut reads = 0u64;
        for _ in 0..40 {
            let (next, out) = sam.step(LR, model, |m: &Mlp| (m.loss(&x, &y), ()));
            model = next;
            let t = out.telemetry;
            let expected = if t.sam { 1 } else { 0 };
            // AE-SAM's lagged read happens when the step after a cheap one is planned.
            assert!(
                t.host_reads >= reads + expected && t.host_reads <= reads + expected + extra_per_cheap,
                "{name}: {} reads after {reads}, SAM step {}",
                t.host_reads,
                t.sam
            );
            reads = t.host_reads;
        }
        let t = sam.telemetry();
        let cheap = t.step - t.sam_steps;
        if extra_per_cheap == 0 {
            assert_eq!(t.host_reads, t.sam_steps, "{name}: {t:?}");
        } else {
            assert!(t.host_reads >= t.sam_steps + cheap.saturating_sub(1), "{name}: {t:?}");
        }
        // The guard's counts of finite cheap steps are on the device: one read to sync them.
        let synced = sam.sync_telemetry();
        assert!(synced.host_reads <= t.host_reads + 1, "{name}: {synced:?}");
        assert_eq!(sam.sync_telemetry().host_reads, synced.host_reads, "{name}: nothing left to read");
    }
}
