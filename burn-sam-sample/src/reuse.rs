//! What a cheap step (no second pass) adds to its plain gradient `g`.
//!
//! The rule is chosen here on the host; the tensor engine applies it on the device.

use burn::config::Config;
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
