//! What a cheap step (no second pass) adds to its plain gradient `g`.
//!
//! The rule is chosen here on the host; the tensor engine applies it on the device. Where the
//! cache is kept, and in which precision, is [`CachePrecision`].

use burn::config::Config;
use burn::tensor::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Result, SamError};

/// How cheap steps reuse what the last SAM step computed.
#[derive(Config, Debug, PartialEq)]
pub enum ReusePolicy {
    /// Cheap steps use the plain gradient: `d = g` (SAM, RST, AE-SAM).
    None,
    /// vSAM: `d = g + β^k·PSF` for the k-th cheap step after a SAM step (k = 1..=`max_reuse`),
    /// then `d = g`. `PSF = g_s − g` of the last SAM step; no rescaling, no projection.
    DecayedPsf {
        /// Per-step decay β of the reused PSF, in [0, 1) (vSAM: 0.7).
        beta: f64,
        /// Number of cheap steps that reuse a PSF before it expires (vSAM: 6).
        max_reuse: u32,
    },
    /// LookSAM: the part `g_v` of `g_s` orthogonal to `g` is stored at each SAM step, and cheap
    /// steps use `d = g + α·(‖g‖/‖g_v‖)·g_v`
    /// ([Liu et al., 2022](https://arxiv.org/abs/2203.02714)).
    LookSam {
        /// Weight α of the reused direction (paper: 0.7).
        alpha: f64,
    },
}

impl Default for ReusePolicy {
    fn default() -> Self {
        Self::decayed_psf()
    }
}

impl ReusePolicy {
    /// vSAM's reuse with the authors' values: β = 0.7 for at most 6 steps.
    pub fn decayed_psf() -> Self {
        Self::DecayedPsf { beta: 0.7, max_reuse: 6 }
    }

    /// LookSAM's reuse with the paper's α = 0.7.
    pub fn look_sam() -> Self {
        Self::LookSam { alpha: 0.7 }
    }

    /// Checks every field; the error names the first invalid one.
    pub fn validate(&self) -> Result<()> {
        match self {
            Self::None => Ok(()),
            Self::DecayedPsf { beta, .. } if !(*beta >= 0.0 && *beta < 1.0) => {
                Err(SamError::invalid("reuse.decayed_psf.beta", beta, "must be in [0, 1)"))
            }
            Self::DecayedPsf { .. } => Ok(()),
            Self::LookSam { alpha } if !(alpha.is_finite() && *alpha >= 0.0) => {
                Err(SamError::invalid("reuse.look_sam.alpha", alpha, "must be finite and >= 0"))
            }
            Self::LookSam { .. } => Ok(()),
        }
    }

    /// A short name for logs and telemetry.
    pub fn name(&self) -> &'static str {
        match self {
            Self::None => "none",
            Self::DecayedPsf { .. } => "decayed-psf",
            Self::LookSam { .. } => "look-sam",
        }
    }

    /// Whether a cheap step needs ‖g‖ (LookSAM matches the cache's norm to it).
    pub(crate) fn needs_grad_norm(&self) -> bool {
        matches!(self, Self::LookSam { .. })
    }

    /// Whether a SAM step forms the PSF of every tensor (vSAM caches it); otherwise only the
    /// statistics' tensors need it.
    pub(crate) fn needs_full_psf(&self) -> bool {
        matches!(self, Self::DecayedPsf { .. })
    }

    /// Whether a SAM step measures ⟨g, g_s⟩ (LookSAM projects g out of g_s).
    pub(crate) fn needs_dot(&self) -> bool {
        matches!(self, Self::LookSam { .. })
    }

    /// Whether the cache keeps its norm, ‖cache‖ (LookSAM).
    pub(crate) fn keeps_cache_norm(&self) -> bool {
        matches!(self, Self::LookSam { .. })
    }

    /// What a successful SAM step caches for one parameter (f32), from g, g_s, the PSF where it
    /// was formed ([`needs_full_psf`](Self::needs_full_psf)), and ⟨g, g_s⟩/‖g‖² (read on the host
    /// when [`needs_dot`](Self::needs_dot)); `None` for a rule that caches nothing.
    pub(crate) fn cache_of(
        &self,
        grad: &Tensor<1>,
        sam_grad: &Tensor<1>,
        psf: Option<&Tensor<1>>,
        projection: f64,
    ) -> Option<Tensor<1>> {
        match self {
            Self::None => None,
            Self::DecayedPsf { .. } => psf.cloned(),
            Self::LookSam { .. } => {
                Some(sam_grad.clone().cast(DType::F32) - grad.clone().cast(DType::F32).mul_scalar(projection))
            }
        }
    }

    /// The term a cheap step adds, given the number `k ≥ 1` of cheap steps since the cached
    /// tensor was stored.
    pub(crate) fn cheap_term(&self, k: u32) -> CheapTerm {
        match *self {
            Self::None => CheapTerm::Plain,
            Self::DecayedPsf { beta, max_reuse } if k <= max_reuse => CheapTerm::Scaled(beta.powi(k as i32)),
            Self::DecayedPsf { .. } => CheapTerm::Plain,
            Self::LookSam { alpha } => CheapTerm::NormMatched(alpha),
        }
    }
}

/// The precision in which the reuse cache (vSAM's PSF, LookSAM's orthogonal part) is stored
/// between SAM steps.
///
/// The cache is always formed and read in f32 (the PSF is the f32 difference of two gradients;
/// a cheap step adds it to `g` in f32 and rounds the sum once, to the parameter's dtype); this
/// choice only sets how it is stored, i.e. its memory and one rounding of it.
///
/// | choice | f32 model | bf16 / f16 model |
/// |---|---|---|
/// | [`Parameters`](Self::Parameters) (default) | f32, 4 bytes per value | the parameter's dtype, 2 bytes |
/// | [`F32`](Self::F32) | f32 | f32: twice the model's memory |
/// | [`Bf16`](Self::Bf16) | bf16: half the cache memory | bf16 |
///
/// Storing in f16 saturates at ±65504 (a finite PSF never becomes infinite in the cache). A
/// device that cannot compute in bf16 (`Device::supports_dtype` false, e.g. ndarray) keeps a
/// [`Bf16`](Self::Bf16) cache in f32, and says so once in the log. See `docs/precision.md`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CachePrecision {
    /// The dtype of each parameter: f32 on an f32 model (the cache exactly as vSAM's authors
    /// keep it), bf16 or f16 on a half-precision one.
    #[default]
    Parameters,
    /// f32 whatever the parameters' dtype.
    F32,
    /// bf16 whatever the parameters' dtype (f32 where the device has no bf16).
    Bf16,
}

impl CachePrecision {
    /// Every choice, in the order of [`name`](Self::name)'s table.
    pub const ALL: [Self; 3] = [Self::Parameters, Self::F32, Self::Bf16];

    /// The name used by programs and logs: `params`, `f32` or `bf16`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Parameters => "params",
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
        }
    }

    /// Parses a [`name`](Self::name); the error lists the choices.
    pub fn from_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|choice| choice.name() == name)
            .ok_or_else(|| SamError::invalid("cache_precision", name, "must be one of `params`, `f32`, `bf16`"))
    }

    /// The dtype in which the cache of a parameter of `param_dtype` living on `device` is stored.
    pub fn storage_dtype(&self, param_dtype: DType, device: &Device) -> DType {
        match self {
            Self::Parameters if param_dtype.is_float() => param_dtype,
            Self::Parameters | Self::F32 => DType::F32,
            Self::Bf16 if device.supports_dtype(DType::BF16) => DType::BF16,
            Self::Bf16 => {
                static WARNED: std::sync::Once = std::sync::Once::new();
                WARNED.call_once(|| {
                    log::warn!(
                        "the device {device:?} has no bf16 arithmetic; the reuse cache \
                         (`cache_precision` = bf16) is kept in f32"
                    );
                });
                DType::F32
            }
        }
    }
}

impl std::fmt::Display for CachePrecision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What one cheap step adds to `g`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) enum CheapTerm {
    /// Nothing: `d = g`.
    Plain,
    /// `d = g + w·cache` with this weight.
    Scaled(f64),
    /// `d = g + α·(‖g‖/‖cache‖)·cache` with this α.
    NormMatched(f64),
}

/// The weight of the cache in a cheap step's direction `d = g + weight·cache`.
#[derive(Clone, Debug)]
// One value per step, never stored: the size of the tensor variant does not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum CacheWeight {
    /// Known on the host.
    Scalar(f64),
    /// A one-element f32 tensor on the device (LookSAM's α·‖g‖/‖cache‖).
    Device(Tensor<1>),
}

impl CheapTerm {
    /// The cache's weight this step, from ‖g‖² and ‖cache‖ (both f32, on the device; nothing is
    /// read); `None` when the step adds nothing.
    pub(crate) fn weight(&self, grad_sq: &Tensor<1>, cache_norm: Option<&Tensor<1>>, eps: f64) -> Option<CacheWeight> {
        match *self {
            Self::Plain => None,
            Self::Scaled(weight) => Some(CacheWeight::Scalar(weight)),
            Self::NormMatched(alpha) => cache_norm.map(|norm| {
                let norm = norm.clone().to_device(&grad_sq.device()).add_scalar(eps);
                CacheWeight::Device(grad_sq.clone().sqrt().mul_scalar(alpha).div(norm))
            }),
        }
    }
}

impl CacheWeight {
    /// `weight·cached`, on `cached`'s device.
    pub(crate) fn times(&self, cached: Tensor<1>) -> Tensor<1> {
        match self {
            Self::Scalar(weight) => cached.mul_scalar(*weight),
            Self::Device(weight) => {
                let device = cached.device();
                cached * weight.clone().to_device(&device)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decayed_psf_uses_six_powers_then_expires() {
        let reuse = ReusePolicy::decayed_psf();
        for k in 1..=6 {
            assert_eq!(reuse.cheap_term(k), CheapTerm::Scaled(0.7f64.powi(k as i32)));
        }
        assert_eq!(reuse.cheap_term(7), CheapTerm::Plain);
        assert_eq!(reuse.cheap_term(100), CheapTerm::Plain);
    }

    #[test]
    fn cache_precision_names_round_trip_and_resolve_per_device() {
        for choice in CachePrecision::ALL {
            assert_eq!(CachePrecision::from_name(choice.name()).unwrap(), choice);
        }
        let err = CachePrecision::from_name("fp16").unwrap_err().to_string();
        assert!(err.contains("fp16") && err.contains("`params`"), "{err}");
        let flex = Device::flex();
        assert_eq!(CachePrecision::Parameters.storage_dtype(DType::BF16, &flex), DType::BF16);
        assert_eq!(CachePrecision::Parameters.storage_dtype(DType::F16, &flex), DType::F16);
        assert_eq!(CachePrecision::Parameters.storage_dtype(DType::F32, &flex), DType::F32);
        assert_eq!(CachePrecision::F32.storage_dtype(DType::BF16, &flex), DType::F32);
        assert_eq!(CachePrecision::Bf16.storage_dtype(DType::F32, &flex), DType::BF16);
        // ndarray has no half precision: the documented fallback (Burn 0.23 removes ndarray).
        #[cfg(feature = "ndarray")]
        {
            #[allow(deprecated)]
            let ndarray = Device::ndarray();
            assert_eq!(CachePrecision::Bf16.storage_dtype(DType::F32, &ndarray), DType::F32);
        }
    }

    #[test]
    fn invalid_fields_are_named() {
        for (reuse, field) in [
            (ReusePolicy::DecayedPsf { beta: 1.0, max_reuse: 6 }, "reuse.decayed_psf.beta"),
            (ReusePolicy::DecayedPsf { beta: -0.1, max_reuse: 6 }, "reuse.decayed_psf.beta"),
            (ReusePolicy::LookSam { alpha: f64::NAN }, "reuse.look_sam.alpha"),
        ] {
            match reuse.validate() {
                Err(SamError::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{reuse:?}: {other:?}"),
            }
        }
    }
}
