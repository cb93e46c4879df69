//! The engine against independent numpy reference values (`reference/sam_reference.py`).

use burn::optim::SgdConfig;
use burn_sam_sample::policy::GatePolicy;
use burn_sam_sample::reuse::ReusePolicy;
use burn_sam_sample::SamConfig;
use burn_sam_sample_tests::reference::*;
use burn_sam_sample_tests::{assert_close, device, reference_mlp, values, Mlp};

const TOL: f64 = 1e-5;
const LR: f64 = 0.1;

fn flatten<const R: usize, const C: usize>(m: [[f64; C]; R]) -> Vec<f64> {
    m.iter().flatten().copied().collect()
}

fn assert_weights(model: &Mlp, w1: Vec<f64>, b1: &[f64], w2: Vec<f64>, b2: &[f64], what: &str) {
    assert_close(&values(model.l1.weight.val()), &w1, TOL, &format!("{what} l1.weight"));
    assert_close(&values(model.l1.bias.as_ref().unwrap().val()), b1, TOL, &format!("{what} l1.bias"));
    assert_close(&values(model.l2.weight.val()), &w2, TOL, &format!("{what} l2.weight"));
    assert_close(&values(model.l2.bias.as_ref().unwrap().val()), b2, TOL, &format!("{what} l2.bias"));
}

fn run(config: SamConfig, steps: usize) -> Vec<Mlp> {
    let device = device();
    let (mut model, x, y) = reference_mlp(&device);
    let mut sam = config.init(SgdConfig::new().init()).unwrap();
    let mut out = Vec::new();
    for _ in 0..steps {
        let (next, _) = sam.step(LR, model, |m: &Mlp| (m.loss(&x, &y), ()));
        model = next;
        out.push(model.clone());
    }
    out
}

#[test]
fn one_sam_step_matches_numpy() {
    let model = &run(SamConfig::sam(), 1)[0];
    assert_weights(model, flatten(SAM_W1), &SAM_B1, flatten(SAM_W2), &SAM_B2, "SAM");
}

#[test]
fn one_asam_step_matches_numpy() {
    let model = &run(SamConfig::asam(), 1)[0];
    assert_weights(model, flatten(ASAM_W1), &ASAM_B1, flatten(ASAM_W2), &ASAM_B2, "ASAM");
}

#[test]
fn decayed_psf_reuse_matches_numpy() {
    let config = SamConfig::new().with_policy(GatePolicy::Periodic { k: 2 }).with_reuse(ReusePolicy::decayed_psf());
    let models = run(config, 3);
    assert_weights(&models[0], flatten(VSAM1_W1), &VSAM1_B1, flatten(VSAM1_W2), &VSAM1_B2, "vSAM step 1");
    assert_weights(&models[1], flatten(VSAM2_W1), &VSAM2_B1, flatten(VSAM2_W2), &VSAM2_B2, "vSAM step 2");
    assert_weights(&models[2], flatten(VSAM3_W1), &VSAM3_B1, flatten(VSAM3_W2), &VSAM3_B2, "vSAM step 3");
}

#[test]
fn look_sam_reuse_matches_numpy() {
    let models = run(SamConfig::look_sam(2, 0.7), 3);
    assert_weights(&models[0], flatten(LOOKSAM1_W1), &LOOKSAM1_B1, flatten(LOOKSAM1_W2), &LOOKSAM1_B2, "LookSAM 1");
    assert_weights(&models[1], flatten(LOOKSAM2_W1), &LOOKSAM2_B1, flatten(LOOKSAM2_W2), &LOOKSAM2_B2, "LookSAM 2");
    assert_weights(&models[2], flatten(LOOKSAM3_W1), &LOOKSAM3_B1, flatten(LOOKSAM3_W2), &LOOKSAM3_B2, "LookSAM 3");
}

#[test]
fn the_reference_values_are_not_trivial() {
    // Guards the test itself: SAM must move the weights, and differently from plain SGD.
    let sgd = &run(SamConfig::base_only(), 1)[0];
    let sam = &run(SamConfig::sam(), 1)[0];
    let moved = values(sam.l1.weight.val());
    let init = flatten(INIT_W1);
    assert!(moved.iter().zip(&init).any(|(a, b)| (a - b).abs() > 1e-3));
    let plain = values(sgd.l1.weight.val());
    assert!(moved.iter().zip(&plain).any(|(a, b)| (a - b).abs() > 1e-4));
}
