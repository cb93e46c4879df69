//! Command-line options shared by the Fashion-MNIST examples.

use std::path::PathBuf;

use burn_sam_sample::checkpoint::{CheckpointSet, RunFingerprint};

use crate::methods::{scaled_warmup, Method};

/// What to train and how: flattened into each example's own options.
#[derive(clap::Args, Debug, Clone)]
pub struct TrainArgs {
    /// The method.
    #[arg(long, value_enum, default_value = "vsam")]
    pub method: Method,
    /// Training epochs.
    #[arg(long, default_value_t = 3, value_parser = parse::positive_usize)]
    pub epochs: usize,
    /// Batch size.
    #[arg(long, default_value_t = 128, value_parser = parse::positive_usize)]
    pub batch_size: usize,
    /// Peak learning rate (cosine decay to 0 over the run).
    #[arg(long, default_value_t = 0.05, value_parser = parse::positive_f64)]
    pub lr: f64,
    /// SAM radius ρ (default: 0.05; ASAM: 0.5).
    #[arg(long, value_parser = parse::positive_f64)]
    pub rho: Option<f64>,
    /// Seed of the initial weights, the data order, the augmentation, dropout and the gate; with
    /// one data-loader worker, a run is repeated exactly by its seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Folder with the four Fashion-MNIST files; an error when they are not there (default:
    /// $FASHION_MNIST_DIR, else /usr/share/datasets/fashion-mnist, else Burn's cache, else
    /// fetched into the cache).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Never fetch the data over the network (also: FASHION_MNIST_OFFLINE=1); without it, the
    /// data is fetched into Burn's cache when no folder holds it.
    #[arg(long)]
    pub offline: bool,
    /// Train on the first N training images only (quick runs).
    #[arg(long, value_parser = parse::positive_usize)]
    pub train_subset: Option<usize>,
    /// vSAM's all-SAM warm-up in steps (default: 1.5 % of the run, as the authors' 3 of 200
    /// epochs, and at least one window of 50 steps). Only `--method vsam` has this warm-up; with
    /// another method the option is an error.
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Backend: ndarray, flex, wgpu or cuda (default: the most capable one compiled in).
    #[arg(long)]
    pub backend: Option<String>,
}

impl TrainArgs {
    /// Checks the options against each other (each is checked alone where it is parsed); the
    /// error is a usage error (exit 2).
    pub fn check(&self) -> Result<(), String> {
        if self.warmup_steps.is_some() && self.method != Method::Vsam {
            return Err(format!(
                "--warmup-steps is vSAM's warm-up and is used by --method vsam only, not by --method {}",
                self.method.name()
            ));
        }
        Ok(())
    }

    /// What determines the run's trajectory, for its checkpoints: every option here that
    /// changes the weights, with defaults resolved (`rho`, `warmup`) and the backend's name.
    pub fn fingerprint(&self, backend: &str, warmup: usize) -> RunFingerprint {
        let rho = self.rho.map_or_else(|| "default".to_string(), |rho| rho.to_string());
        RunFingerprint::new()
            .with("--method", self.method.name())
            .with("--epochs", self.epochs)
            .with("--batch-size", self.batch_size)
            .with("--lr", self.lr)
            .with("--rho", rho)
            .with("--seed", self.seed)
            .with("--train-subset", self.train_subset.map_or_else(|| "all".to_string(), |n| n.to_string()))
            .with("--warmup-steps", if self.method == Method::Vsam { warmup.to_string() } else { "-".to_string() })
            .with("--backend", backend)
    }

    /// The artifact folder: `given`, or `target/<program>/<method>`, so that the runs of
    /// different methods keep their checkpoints apart.
    pub fn artifact_dir(&self, given: Option<PathBuf>, program: &str) -> PathBuf {
        given.unwrap_or_else(|| PathBuf::from("target").join(program).join(self.method.name()))
    }

    /// vSAM's warm-up for a run of `total_steps` steps.
    pub fn warmup(&self, total_steps: usize) -> usize {
        self.warmup_steps.unwrap_or_else(|| scaled_warmup(total_steps))
    }

    /// Steps per epoch and in the whole run for `images` training images, or an error naming
    /// the options when the run has more steps than this machine can count.
    pub fn steps(&self, images: usize) -> Result<(usize, usize), String> {
        let per_epoch = images.div_ceil(self.batch_size);
        per_epoch
            .checked_mul(self.epochs)
            .map(|total| (per_epoch, total))
            .ok_or_else(|| format!("--epochs {} × {per_epoch} steps per epoch is too many steps", self.epochs))
    }
}

/// Resuming and overwriting checkpoints: flattened into the examples that write them.
#[derive(clap::Args, Debug, Clone)]
pub struct ResumeArgs {
    /// Resume from the checkpoint of this epoch in the artifact directory, or from the newest
    /// complete one of this run (`latest`). The options must be the checkpointed run's (the
    /// error names each one that differs); the resumed run ends with the weights of an
    /// uninterrupted one.
    #[arg(long, value_parser = parse::resume)]
    pub resume: Option<Resume>,
    /// With --resume: allow --epochs to differ from the checkpointed run's, e.g. to train
    /// longer. The cosine schedule then follows the new length from the checkpoint on, so the
    /// result is neither run's uninterrupted result.
    #[arg(long, requires = "resume")]
    pub allow_epochs_change: bool,
    /// Start afresh in an artifact directory that holds another run's checkpoints, deleting
    /// them (without it, such a directory is refused).
    #[arg(long, conflicts_with = "resume")]
    pub overwrite: bool,
}

impl ResumeArgs {
    /// The checkpoint sets of this run in `set`'s directory: another run's sets never verify,
    /// and `--allow-epochs-change` lets `--epochs` differ.
    pub fn sets(&self, set: CheckpointSet, run: RunFingerprint) -> CheckpointSet {
        let set = set.for_run(run);
        if self.allow_epochs_change {
            set.allowing_changes(&["--epochs"])
        } else {
            set
        }
    }
}

/// Where a run resumes: the checkpoint of an epoch, or the newest complete one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// The checkpoint written after this epoch.
    Epoch(usize),
    /// The newest checkpoint whose set is complete and undamaged.
    Latest,
}

impl Resume {
    /// The epoch to resume from: the newest set of this run in `set` for `latest` (an error
    /// when there is none); the set itself is checked by the caller.
    pub fn epoch(self, set: &CheckpointSet) -> Result<usize, String> {
        match self {
            Self::Epoch(epoch) => Ok(epoch),
            Self::Latest => set.latest().map_err(|e| format!("--resume latest: {e}"))?.ok_or_else(|| {
                format!("--resume latest: there is no complete checkpoint in {}", set.directory().display())
            }),
        }
    }
}

/// The float dtype of the model's parameters, activations and gradients.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// 32-bit floats (the default).
    F32,
    /// bfloat16: f32's range, 8 significant bits.
    Bf16,
    /// IEEE half: 11 significant bits, largest value 65504.
    F16,
}

impl Precision {
    /// The name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }

    /// Makes this the default float dtype of `device`; must run before any tensor exists on it.
    /// The error names the device and the dtype (a device without arithmetic in it, or one
    /// already in use).
    pub fn configure(self, device: &mut burn::tensor::Device) -> Result<(), String> {
        use burn::tensor::FloatDType;
        let dtype = match self {
            Self::F32 => return Ok(()),
            Self::Bf16 => FloatDType::BF16,
            Self::F16 => FloatDType::F16,
        };
        if !device.supports_dtype(dtype) {
            return Err(format!("--precision {}: the device {device:?} cannot compute in {dtype:?}", self.name()));
        }
        device.configure(dtype).map_err(|e| format!("--precision {}: {device:?}: {e}", self.name()))
    }
}

/// clap value parsers that check a number where it is parsed, so that a bad value is a usage
/// error (exit 2) whose message names the flag and the value.
pub mod parse {
    /// `latest` or an epoch ≥ 1.
    pub fn resume(text: &str) -> Result<super::Resume, String> {
        if text.trim() == "latest" {
            return Ok(super::Resume::Latest);
        }
        positive_usize(text).map(super::Resume::Epoch).map_err(|e| format!("{e} (or `latest`)"))
    }

    fn number<T: std::str::FromStr>(text: &str) -> Result<T, String>
    where
        T::Err: std::fmt::Display,
    {
        text.trim().parse::<T>().map_err(|e| format!("`{text}` is not a number: {e}"))
    }

    /// An integer ≥ 1.
    pub fn positive_usize(text: &str) -> Result<usize, String> {
        match number::<usize>(text)? {
            0 => Err("must be at least 1".into()),
            n => Ok(n),
        }
    }

    /// A finite number > 0.
    pub fn positive_f64(text: &str) -> Result<f64, String> {
        match number::<f64>(text)? {
            x if x.is_finite() && x > 0.0 => Ok(x),
            x => Err(format!("{x} must be finite and > 0")),
        }
    }

    /// A finite number ≥ 0.
    pub fn non_negative_f64(text: &str) -> Result<f64, String> {
        match number::<f64>(text)? {
            x if x.is_finite() && x >= 0.0 => Ok(x),
            x => Err(format!("{x} must be finite and >= 0")),
        }
    }

    /// A fraction in (0, 1].
    pub fn fraction(text: &str) -> Result<f64, String> {
        match number::<f64>(text)? {
            x if x > 0.0 && x <= 1.0 => Ok(x),
            x => Err(format!("{x} must be in (0, 1]")),
        }
    }

    /// A reuse-cache precision: `params`, `f32` or `bf16`.
    pub fn cache_precision(text: &str) -> Result<burn_sam_sample::reuse::CachePrecision, String> {
        burn_sam_sample::reuse::CachePrecision::from_name(text.trim()).map_err(|_| {
            format!("`{text}` is not a cache precision: use `params` (the parameters' dtype), `f32` or `bf16`")
        })
    }

    /// A label-noise fraction in [0, 1).
    pub fn noise(text: &str) -> Result<f64, String> {
        match number::<f64>(text)? {
            x if (0.0..1.0).contains(&x) => Ok(x),
            x => Err(format!("{x} must be in [0, 1)")),
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn each_parser_refuses_what_it_must() {
            assert_eq!(positive_usize("3"), Ok(3));
            assert!(positive_usize("0").is_err() && positive_usize("-1").is_err() && positive_usize("x").is_err());
            assert_eq!(positive_f64("0.5"), Ok(0.5));
            for bad in ["0", "-1", "nan", "inf", ""] {
                assert!(positive_f64(bad).is_err(), "{bad}");
            }
            assert_eq!(non_negative_f64("0"), Ok(0.0));
            assert!(non_negative_f64("-0.1").is_err() && non_negative_f64("NaN").is_err());
            assert!(
                fraction("1").is_ok() && fraction("0").is_err() && fraction("1.5").is_err() && fraction("nan").is_err()
            );
            assert!(noise("0").is_ok() && noise("0.4").is_ok() && noise("1").is_err() && noise("nan").is_err());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Program {
        #[command(flatten)]
        train: TrainArgs,
    }

    fn parse(args: &[&str]) -> Result<TrainArgs, String> {
        Program::try_parse_from(std::iter::once("program").chain(args.iter().copied()))
            .map(|p| p.train)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn bad_numbers_are_usage_errors_that_name_the_flag_and_the_value() {
        for (args, flag) in [
            (&["--epochs", "0"][..], "--epochs"),
            (&["--batch-size", "0"], "--batch-size"),
            (&["--lr", "nan"], "--lr"),
            (&["--lr", "-0.1"], "--lr"),
            (&["--rho", "inf"], "--rho"),
            (&["--train-subset", "0"], "--train-subset"),
        ] {
            let joined = format!("{}={}", args[0], args[1]);
            let err = parse(&[&joined]).unwrap_err();
            assert!(err.contains(flag) && err.contains(args[1]), "{args:?}: {err}");
        }
        assert!(parse(&[]).is_ok());
    }

    #[test]
    fn an_option_the_method_does_not_use_is_an_error() {
        let err = parse(&["--method", "sam", "--warmup-steps", "4"]).unwrap().check().unwrap_err();
        assert!(err.contains("--warmup-steps") && err.contains("--method sam"), "{err}");
        parse(&["--method", "vsam", "--warmup-steps", "4"]).unwrap().check().unwrap();
    }

    #[test]
    fn a_run_too_long_to_count_is_an_error() {
        let args = parse(&["--epochs", &usize::MAX.to_string()]).unwrap();
        let err = args.steps(60_000).unwrap_err();
        assert!(err.contains("--epochs"), "{err}");
        assert_eq!(parse(&["--epochs", "2"]).unwrap().steps(1_000).unwrap(), (8, 16));
    }
}
