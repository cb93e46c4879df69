//! Hostile record bytes, NaN storms, resume at any step, arbitrary configurations.

use std::path::PathBuf;

use burn::tensor::Bytes;
use burn_sam_sample::policy::{AeSamConfig, GatePolicy, VariationConfig};
use burn_sam_sample::reuse::ReusePolicy;
use burn_sam_sample::{SamConfig, SamError, SamOptimizer, SamOptimizerRecord};
use burn_sam_sample_tests::{device, params, random_batch, random_mlp, sgd_momentum, train_steps, Mlp};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

const LR: f64 = 0.05;

fn small_vsam(seed: u64) -> SamConfig {
    let variation = VariationConfig::new(5).with_window(6).with_blocks(2);
    SamConfig::new().with_policy(GatePolicy::Variation(variation)).with_seed(seed)
}

/// The configurations whose records the fuzzing starts from.
fn corpus_configs() -> Vec<(&'static str, SamConfig)> {
    vec![
        ("vsam", small_vsam(1)),
        ("look-sam", SamConfig::look_sam(3, 0.5)),
        ("ae-sam", SamConfig::new().with_policy(GatePolicy::AeSam(AeSamConfig::new(50))).with_reuse(ReusePolicy::None)),
        ("rst", SamConfig::rst(0.5).with_seed(2)),
    ]
}

fn train(sam: &mut SamOptimizer, model: Mlp, steps: std::ops::Range<u64>, decisions: &mut Vec<bool>) -> Mlp {
    train_steps(sam, model, steps, 500, decisions)
}

/// Valid records after 9 steps of each configuration (the seed corpus), and the model each
/// fits.
fn corpus() -> Vec<(SamConfig, Vec<u8>, Mlp)> {
    corpus_configs()
        .into_iter()
        .map(|(_, config)| {
            let mut sam = config.init(sgd_momentum()).unwrap();
            let model = train(&mut sam, random_mlp(&device(), 4), 0..9, &mut Vec::new());
            (config, sam.to_record().into_bytes().unwrap().to_vec(), model)
        })
        .collect()
}

/// Decoding and loading `bytes` must return, never panic; when it loads, training goes on.
fn load_hostile(config: &SamConfig, bytes: &[u8], model: &Mlp) {
    let record = SamOptimizerRecord::from_bytes(Bytes::from_bytes_vec(bytes.to_vec()));
    let Ok(record) = record else { return };
    let mut sam = config.init(sgd_momentum()).unwrap();
    if sam.load_record(record, model).is_ok() {
        let t = sam.telemetry();
        assert!(t.sam_fraction.is_finite());
        let after = train(&mut sam, model.clone(), 0..2, &mut Vec::new());
        assert!(params(&after).iter().all(|(_, v)| v.iter().all(|x| x.is_finite())));
    }
}

fn mutate(rng: &mut impl Rng, bytes: &[u8]) -> Vec<u8> {
    let mut out = bytes.to_vec();
    match rng.random_range(0..4) {
        0 => out.truncate(rng.random_range(0..=bytes.len())),
        1 => {
            for _ in 0..rng.random_range(1..8) {
                let i = rng.random_range(0..out.len());
                out[i] ^= 1 << rng.random_range(0..8);
            }
        }
        2 => {
            let i = rng.random_range(0..out.len());
            out[i] = rng.random();
        }
        _ => {
            // Splice a random run of bytes in.
            let i = rng.random_range(0..out.len());
            let run: Vec<u8> = (0..rng.random_range(1..32)).map(|_| rng.random()).collect();
            out.splice(i..i, run);
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = SamOptimizerRecord::from_bytes(Bytes::from_bytes_vec(bytes.clone()));
        let _ = burn_sam_sample::EngineRecord::from_bytes(Bytes::from_bytes_vec(bytes));
    }
}

#[test]
fn mutated_records_never_panic() {
    let corpus = corpus();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..400 {
        let (config, bytes, model) = &corpus[rng.random_range(0..corpus.len())];
        load_hostile(config, &mutate(&mut rng, bytes), model);
    }
}

#[test]
fn the_saved_corpus_still_loads_and_its_mutations_never_panic() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz_corpus");
    let corpus = corpus();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        files += 1;
        for (config, _, model) in &corpus {
            load_hostile(config, &bytes, model);
            for _ in 0..10 {
                load_hostile(config, &mutate(&mut rng, &bytes), model);
            }
        }
    }
    assert!(files >= 4, "the corpus in {} holds {files} files", dir.display());
}

/// Regenerates the seed corpus: `cargo test -p burn-sam-sample-tests --test robustness -- --ignored write_corpus`.
#[test]
#[ignore]
fn write_corpus() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz_corpus");
    std::fs::create_dir_all(&dir).unwrap();
    for ((name, _), (_, bytes, _)) in corpus_configs().into_iter().zip(corpus()) {
        std::fs::write(dir.join(format!("{name}.bpk")), bytes).unwrap();
    }
}

/// Long fuzzing run: `FUZZ_SECONDS=600 cargo test --release -p burn-sam-sample-tests --test
/// robustness -- --ignored --nocapture fuzz_records_for_a_while`. Mutates the corpus and saves
/// every input that decodes into `fuzz_corpus/` when `FUZZ_SAVE` is set.
#[test]
#[ignore]
fn fuzz_records_for_a_while() {
    let seconds: u64 = std::env::var("FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let corpus = corpus();
    let mut pool: Vec<Vec<u8>> = corpus.iter().map(|(_, bytes, _)| bytes.clone()).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(std::process::id() as u64);
    let start = std::time::Instant::now();
    let (mut executions, mut decoded, mut loaded) = (0u64, 0u64, 0u64);
    while start.elapsed().as_secs() < seconds {
        let parent = &pool[rng.random_range(0..pool.len())];
        let input = mutate(&mut rng, parent);
        let (config, _, model) = &corpus[rng.random_range(0..corpus.len())];
        executions += 1;
        if let Ok(record) = SamOptimizerRecord::from_bytes(Bytes::from_bytes_vec(input.clone())) {
            decoded += 1;
            let mut sam = config.init(sgd_momentum()).unwrap();
            if sam.load_record(record, model).is_ok() {
                loaded += 1;
                let after = train(&mut sam, model.clone(), 0..1, &mut Vec::new());
                assert!(params(&after).iter().all(|(_, v)| v.iter().all(|x| x.is_finite())));
            }
            if pool.len() < 64 {
                pool.push(input);
            }
        }
    }
    println!(
        "fuzzing: {executions} executions in {:.0} s, {decoded} decoded, {loaded} loaded and trained",
        start.elapsed().as_secs_f64()
    );
}

#[test]
fn nan_storms_leave_cache_and_gate_finite_and_are_counted() {
    let device = device();
    for (name, config) in corpus_configs() {
        let mut sam = config.init(sgd_momentum()).unwrap();
        let mut model = random_mlp(&device, 5);
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut injected = 0u64;
        for step in 0..80u64 {
            let (x, y) = random_batch(&device, 900 + step);
            // Storms in the warm-up, on SAM steps and on cheap steps alike.
            let poison = match rng.random_range(0..10) {
                0 => Some(f32::NAN),
                1 => Some(f32::INFINITY),
                _ => None,
            };
            injected += u64::from(poison.is_some());
            let (next, out) = sam.step(LR, model, |m: &Mlp| match poison {
                Some(value) => (m.loss(&x, &y) * value, ()),
                None => (m.loss(&x, &y), ()),
            });
            model = next;
            assert!(out.telemetry.psf_ratio.is_none_or(f64::is_finite), "{name}");
        }
        assert!(injected > 0);
        let counters = sam.sync_telemetry();
        assert_eq!(counters.non_finite_steps, injected, "{name}: affected steps counted");
        assert!(params(&model).iter().all(|(_, v)| v.iter().all(|x| x.is_finite())), "{name}: weights");
        let record = sam.to_record().engine;
        for (_, data) in record.cache() {
            assert!(data.iter::<f32>().all(f32::is_finite), "{name}: cache");
        }
        // A round trip through the record validates the gate state (finite, in range).
        let mut fresh = config.init(sgd_momentum()).unwrap();
        fresh
            .load_record(SamOptimizerRecord::from_bytes(sam.to_record().into_bytes().unwrap()).unwrap(), &model)
            .unwrap();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]
    #[test]
    fn resuming_at_any_step_is_bit_exact(t in 1u64..60, which in 0usize..4) {
        let (_, config) = corpus_configs().swap_remove(which);
        let model = random_mlp(&device(), 8);
        let mut straight = Vec::new();
        let mut sam = config.init(sgd_momentum()).unwrap();
        let expected = train(&mut sam, model.clone(), 0..60, &mut straight);

        let mut decisions = Vec::new();
        let mut sam = config.init(sgd_momentum()).unwrap();
        let half = train(&mut sam, model, 0..t, &mut decisions);
        let mut resumed = config.init(sgd_momentum()).unwrap();
        resumed.load_record(SamOptimizerRecord::from_bytes(sam.to_record().into_bytes().unwrap()).unwrap(), &half).unwrap();
        let done = train(&mut resumed, half, t..60, &mut decisions);
        prop_assert_eq!(decisions, straight);
        prop_assert_eq!(params(&done), params(&expected));
    }
}

fn arbitrary_f64() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(0.0),
        Just(-0.0),
        Just(f64::MAX),
        Just(f64::MIN_POSITIVE),
        -10.0f64..10.0,
        any::<f64>(),
    ]
}

fn arbitrary_usize() -> impl Strategy<Value = usize> {
    prop_oneof![Just(0usize), Just(1), Just(usize::MAX), 0usize..200, any::<usize>()]
}

fn arbitrary_policy() -> impl Strategy<Value = GatePolicy> {
    prop_oneof![
        Just(GatePolicy::Always),
        Just(GatePolicy::Never),
        arbitrary_usize().prop_map(|k| GatePolicy::Periodic { k }),
        arbitrary_f64().prop_map(|p| GatePolicy::Bernoulli { p }),
        (arbitrary_usize(), arbitrary_f64(), arbitrary_f64(), arbitrary_f64()).prop_map(|(t, d, a, b)| {
            GatePolicy::AeSam(AeSamConfig::new(t).with_delta(d).with_c_start(a).with_c_end(b))
        }),
        (
            (arbitrary_usize(), arbitrary_usize(), arbitrary_f64()),
            (arbitrary_f64(), arbitrary_f64(), arbitrary_usize(), arbitrary_f64())
        )
            .prop_map(|((window, blocks, max_fraction), (ar, av, warmup, quota))| {
                GatePolicy::Variation(
                    VariationConfig::new(warmup)
                        .with_window(window)
                        .with_blocks(blocks)
                        .with_max_fraction(max_fraction)
                        .with_alpha_ratio(ar)
                        .with_alpha_variance(av)
                        .with_initial_quota(quota),
                )
            }),
    ]
}

fn arbitrary_reuse() -> impl Strategy<Value = ReusePolicy> {
    prop_oneof![
        Just(ReusePolicy::None),
        (arbitrary_f64(), any::<u32>()).prop_map(|(beta, max_reuse)| ReusePolicy::DecayedPsf { beta, max_reuse }),
        arbitrary_f64().prop_map(|alpha| ReusePolicy::LookSam { alpha }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn arbitrary_configurations_never_panic(
        (rho, eta, eps) in (arbitrary_f64(), arbitrary_f64(), arbitrary_f64()),
        (adaptive, last_n, seed) in (any::<bool>(), arbitrary_usize(), any::<u64>()),
        policy in arbitrary_policy(),
        reuse in arbitrary_reuse(),
    ) {
        let config = SamConfig::new()
            .with_rho(rho)
            .with_adaptive_eta(eta)
            .with_eps(eps)
            .with_adaptive(adaptive)
            .with_stats_last_n(last_n)
            .with_seed(seed)
            .with_policy(policy)
            .with_reuse(reuse);
        match config.init(sgd_momentum()) {
            Ok(_) => prop_assert!(config.validate().is_ok()),
            Err(SamError::InvalidConfig { field, value, .. }) => {
                prop_assert!(!field.is_empty() && !value.is_empty());
            }
            Err(other) => prop_assert!(false, "unexpected error {other}"),
        }
    }
}

#[test]
fn a_non_finite_second_pass_outside_the_statistics_tail_is_caught() {
    let device = device();
    // With N = 1 the statistics cover `l2.bias` only; the NaN reaches `l1.weight`'s g_s alone.
    for config in [SamConfig::sam().with_stats_last_n(1), SamConfig::vsam(2).with_stats_last_n(1)] {
        let mut sam = config.init(sgd_momentum()).unwrap();
        let model = random_mlp(&device, 5);
        let (x, y) = random_batch(&device, 7);
        let mut calls = 0;
        let (model, out) = sam.step(LR, model, |m: &Mlp| {
            calls += 1;
            let loss = m.loss(&x, &y);
            if calls == 2 {
                (loss + m.l1.weight.val().sum().mul_scalar(f32::NAN), ())
            } else {
                (loss, ())
            }
        });
        assert!(out.telemetry.sam && out.telemetry.skipped, "{:?}", out.telemetry);
        assert_eq!(sam.sync_telemetry().non_finite_steps, 1);
        assert!(params(&model).iter().all(|(_, v)| v.iter().all(|x| x.is_finite())));
        assert!(sam.to_record().engine.cache().iter().all(|(_, data)| data.iter::<f32>().all(f32::is_finite)));
    }
}
