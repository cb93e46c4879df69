#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]
//! Fast sharpness-aware training for [Burn](https://burn.dev).
//!
//! SAM (sharpness-aware minimization) computes two gradients per step: `g = ∇L(w)` and
//! `g_s = ∇L(w + ρ·g/‖g‖)`. vSAM ([arXiv 2403.08821](https://arxiv.org/abs/2403.08821)) writes
//! `g_s = g + PSF` and computes the second pass only when a variation statistic of the PSF says
//! it is needed, reusing a decaying copy of the last PSF in between. This crate implements vSAM
//! and the classic family around one engine: plain SAM, ASAM, LookSAM-style reuse, AE-SAM and
//! random (RST) gating, on any Burn backend and with any Burn base optimizer.
//!
//! Layers, from the bottom:
//! - [`policy`]: the gates, plain Rust over scalars (no tensors), serializable, seeded;
//! - [`reuse`]: what cheap steps add to their gradient;
//! - the engine (private): the state of a run (gate, PSF cache, counters: one value, which is
//!   also its record, [`EngineRecord`]) and the step's tensor work, as plain functions;
//! - [`SamOptimizer`]: the engine plus a base optimizer, with a closure `step` for custom loops;
//! - [`learner`] (feature `train`): [`learner::SamModel`] runs the same step inside Burn's
//!   `Learner`; its checkpointers and [`learner::EpochLoader`] for exact resume;
//! - [`checkpoint`]: crash-consistent checkpoint sets, for the Learner and for custom loops.
//!
//! Start with [`SamConfig`].

pub mod backend;
pub mod checkpoint;
mod config;
mod container;
mod engine;
mod error;
#[cfg(feature = "train")]
pub mod learner;
pub mod memory;
mod optimizer;
pub mod policy;
pub mod reuse;
mod telemetry;

pub use config::SamConfig;
pub use engine::EngineRecord;
pub use error::{Result, SamError};
pub use optimizer::{SamOptimizer, SamOptimizerRecord, StepOutput};
pub use telemetry::StepTelemetry;

pub use burn;

/// The step driven by hand, for programs that cannot hand [`SamOptimizer::step`] a closure:
/// [`SamEngine::first_pass`](advanced::SamEngine::first_pass) returns a SAM pass (run the second
/// pass on its perturbed module, then finish it) or a cheap one. Most programs do not need it.
pub mod advanced {
    pub use crate::engine::hand::{CheapPass, Pass, SamPass};
    pub use crate::engine::SamEngine;
}

/// The README's code blocks, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

/// `docs/learner.md`'s code blocks, compiled as doc tests (the Learner programs are compiled,
/// not run: `examples/learner_minimal.rs` runs the same lines).
#[cfg(all(doctest, feature = "flex", feature = "train"))]
#[doc = include_str!("../../docs/learner.md")]
pub struct LearnerDoctests;

/// `docs/precision.md`'s code blocks, compiled and run as doc tests (they configure flex's
/// default float, so they need the `flex` feature).
#[cfg(all(doctest, feature = "flex"))]
#[doc = include_str!("../../docs/precision.md")]
pub struct PrecisionDoctests;
