//! The engine shared by every member of the family: the state between steps (gate, PSF cache,
//! counters, values still on the device) and the tensor work of one step.
//!
//! One step, in three parts:
//!
//! 1. the engine **plans** it ([`SamEngine::plan`]: the gate's decision, the cheap term, the cache
//!    to read), which is all the state the tensor work needs;
//! 2. the plain tensor functions of [`step`] run the passes and return the direction for the base
//!    optimizer plus a [`Contribution`] (what the step measured);
//! 3. the engine **commits** the contribution ([`SamEngine::commit`]): [`book`](SamEngine::book)
//!    counts the step, [`learn`](SamEngine::learn) stores the next cache and feeds the gate.
//!
//! A custom loop commits every step ([`SamOptimizer::step`](crate::SamOptimizer::step)). The
//! Learner books every train step and learns once per optimizer step, from the mean of its
//! micro-batches and devices (`learner/round.rs`).
//!
//! Host reads ([`readback`]): one per SAM step (its named values, the loss and the non-finite count
//! of the cheap steps before it, together); none on cheap steps, except AE-SAM's ‖g‖² of the
//! previous step, read when the next step is planned. Every read is counted in
//! [`StepTelemetry::host_reads`].

pub mod hand;
mod readback;
mod record;
pub(crate) mod step;
pub(crate) mod tensors;

pub use record::EngineRecord;

use std::sync::Arc;

use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use crate::config::SamConfig;
use crate::error::Result;
use crate::policy::{Gate, PsfStats};
use crate::reuse::CheapTerm;
use crate::telemetry::StepTelemetry;
pub(crate) use step::{CacheParts, Contribution, ReuseCache};

/// The engine's scalar state, all of it: what the engine runs on and, as JSON, what its record
/// stores (next to the cached tensors). The engine is the one owner of the run's counters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct EngineState {
    /// The gate: rule, state, RNG position.
    pub gate: Gate,
    /// Cheap optimizer steps since the cache was stored.
    pub since_cache: u32,
    /// Train steps finished (in the Learner one per micro-batch and device).
    pub steps: u64,
    /// Of those, SAM steps.
    pub sam_steps: u64,
    /// Gradient passes run.
    pub passes: u64,
    /// Gate decisions taken (optimizer steps).
    pub rounds: u64,
    /// Device-to-host reads the steps made.
    #[serde(default)]
    pub host_reads: u64,
    /// Steps with a non-finite loss or gradient, as known on the host so far.
    pub non_finite_steps: u64,
    /// Statistics of the last successful SAM step.
    pub last_stats: Option<PsfStats>,
    /// Whether the last step was a SAM step.
    pub last_sam: bool,
    /// Whether the last SAM step was skipped as non-finite.
    pub last_skipped: bool,
    /// Parameters (id, shape) of the last step, to check a restored record against a module.
    pub manifest: Vec<(u64, Vec<usize>)>,
}

/// What one step needs from the engine: the decision, the cheap term and the cache it reads.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub sam: bool,
    pub term: CheapTerm,
    /// The cache a cheap step reads (empty on SAM steps).
    pub cache: Arc<ReuseCache>,
    pub config: SamConfig,
    pub wants_grad_norm: bool,
    /// On a SAM step: the non-finite count of the cheap steps before it, still on the device, to
    /// read with the step's own values.
    pub cheap_non_finite: Option<Tensor<1>>,
}

/// What a round of steps (one optimizer step) teaches the cache and the gate.
#[derive(Debug)]
pub(crate) struct Lesson {
    pub sam: bool,
    /// The tensors to cache (f32), from successful SAM steps of a rule that caches.
    pub cache: Option<CacheParts>,
    /// PSF statistics of the successful SAM steps.
    pub stats: Option<PsfStats>,
    /// ‖g‖² read on the host (SAM steps with a finite first pass).
    pub grad_sq_host: Option<f64>,
    /// ‖g‖² still on the device (cheap steps of a gate that wants it).
    pub grad_sq_device: Option<Tensor<1>>,
}

/// Gate, PSF cache and counters of a run of the SAM family: the state between steps.
///
/// [`SamOptimizer`](crate::SamOptimizer) and the Learner integration drive it; the hand-driven
/// protocol is in [`advanced`](crate::advanced).
#[derive(Clone, Debug)]
pub struct SamEngine {
    config: SamConfig,
    state: EngineState,
    cache: Arc<ReuseCache>,
    /// ‖g‖² of the last round's cheap steps, still on the device (AE-SAM only).
    pending_grad_sq: Option<Tensor<1>>,
    /// Non-finite cheap steps counted on the device since the last read.
    device_non_finite: Option<Tensor<1>>,
}

impl SamEngine {
    /// Builds an engine; every field of `config` is checked first.
    pub fn new(config: &SamConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            state: EngineState {
                gate: Gate::new(config.policy.clone(), config.seed)?,
                since_cache: 0,
                steps: 0,
                sam_steps: 0,
                passes: 0,
                rounds: 0,
                host_reads: 0,
                non_finite_steps: 0,
                last_stats: None,
                last_sam: false,
                last_skipped: false,
                manifest: Vec::new(),
            },
            config: config.clone(),
            cache: Arc::default(),
            pending_grad_sq: None,
            device_non_finite: None,
        })
    }

    /// The configuration this engine runs.
    pub fn config(&self) -> &SamConfig {
        &self.config
    }

    /// The gate, for inspection.
    pub fn gate(&self) -> &Gate {
        &self.state.gate
    }

    /// Decides the next optimizer step (the lagged ‖g‖² of AE-SAM is read and fed to the gate
    /// first) and returns what the tensor work needs.
    pub(crate) fn plan(&mut self) -> Plan {
        if let Some(grad_sq) = self.pending_grad_sq.take() {
            self.state.host_reads += 1;
            self.state.gate.observe_grad_norm_sq(readback::read_one("grad_sq", grad_sq));
        }
        let sam = self.state.gate.decide();
        let term = if sam || self.cache.is_empty() {
            CheapTerm::Plain
        } else {
            self.config.reuse.cheap_term(self.state.since_cache.saturating_add(1))
        };
        Plan {
            sam,
            term,
            cache: if sam { Arc::default() } else { Arc::clone(&self.cache) },
            config: self.config.clone(),
            wants_grad_norm: self.state.gate.wants_grad_norm(),
            cheap_non_finite: if sam { self.device_non_finite.take() } else { None },
        }
    }

    /// Books and learns from one step that is its own optimizer step (a custom loop).
    pub(crate) fn commit(&mut self, contribution: Contribution) -> StepTelemetry {
        let lesson = self.book(contribution);
        self.learn(lesson);
        self.telemetry()
    }

    /// Counts one train step and returns what it teaches (see [`learn`](Self::learn)).
    pub(crate) fn book(&mut self, contribution: Contribution) -> Lesson {
        self.state.manifest = contribution.manifest;
        self.state.steps = self.state.steps.saturating_add(1);
        self.state.last_sam = contribution.values.is_some();
        let Some(values) = contribution.values else {
            // A cheap step: its non-finite flag stays on the device until the next read.
            if let Some(flag) = contribution.non_finite {
                self.device_non_finite = Some(match self.device_non_finite.take() {
                    Some(count) => {
                        let device = count.device();
                        count + flag.to_device(&device)
                    }
                    None => flag,
                });
            }
            self.state.passes = self.state.passes.saturating_add(1);
            self.state.last_skipped = false;
            return Lesson {
                sam: false,
                cache: None,
                stats: None,
                grad_sq_host: None,
                grad_sq_device: contribution.grad_sq,
            };
        };
        let state = &mut self.state;
        state.host_reads += 1;
        state.sam_steps = state.sam_steps.saturating_add(1);
        state.passes = state.passes.saturating_add(2);
        self.record_cheap_non_finite(values.cheap_non_finite);
        let state = &mut self.state;
        if values.second_ok() {
            state.last_stats = Some(values.stats());
            state.last_skipped = false;
            Lesson {
                sam: true,
                cache: contribution.cache,
                stats: Some(values.stats()),
                grad_sq_host: Some(values.grad_sq),
                grad_sq_device: None,
            }
        } else {
            values.warn_skipped(state.steps);
            state.non_finite_steps = state.non_finite_steps.saturating_add(1);
            state.last_skipped = true;
            let grad_sq_host = values.first_ok().then_some(values.grad_sq);
            Lesson { sam: true, cache: None, stats: None, grad_sq_host, grad_sq_device: None }
        }
    }

    /// Ends an optimizer step: the cache becomes the lesson's, the gate learns its statistics.
    pub(crate) fn learn(&mut self, lesson: Lesson) {
        self.state.rounds = self.state.rounds.saturating_add(1);
        if let Some((tensors, layout, device)) = lesson.cache {
            self.cache = Arc::new(ReuseCache::new(tensors, &self.config.reuse, &layout, &device));
            self.state.since_cache = 0;
        } else if !lesson.sam {
            self.state.since_cache = self.state.since_cache.saturating_add(1);
        }
        if let Some(stats) = lesson.stats {
            self.state.gate.observe_sam(stats);
        }
        if let Some(grad_sq) = lesson.grad_sq_host {
            self.state.gate.observe_grad_norm_sq(grad_sq);
            self.pending_grad_sq = None;
        } else if let Some(grad_sq) = lesson.grad_sq_device {
            self.pending_grad_sq = Some(grad_sq);
        }
    }

    fn record_cheap_non_finite(&mut self, count: f64) {
        if count > 0.0 {
            let count = count.round() as u64;
            log::warn!(
                "{count} cheap step(s) before step {} had a non-finite loss or gradient; their \
                 updates were zeroed",
                self.state.steps
            );
            self.state.non_finite_steps = self.state.non_finite_steps.saturating_add(count);
        }
    }

    /// Reads the device-side count of non-finite cheap steps (one host read, when there is a
    /// count to read) and returns the telemetry with it.
    pub fn sync_telemetry(&mut self) -> StepTelemetry {
        if let Some(count) = self.device_non_finite.take() {
            self.state.host_reads += 1;
            self.record_cheap_non_finite(readback::read_one("cheap_non_finite", count));
        }
        self.telemetry()
    }

    /// What the last finished step did, and the totals so far. Reads nothing from the device.
    pub fn telemetry(&self) -> StepTelemetry {
        let state = &self.state;
        StepTelemetry {
            step: state.steps,
            sam: state.last_sam,
            skipped: state.last_skipped,
            passes: state.passes,
            sam_steps: state.sam_steps,
            rounds: state.rounds,
            sam_fraction: if state.steps == 0 { 0.0 } else { state.sam_steps as f64 / state.steps as f64 },
            quota: state.gate.quota(),
            target_fraction: state.gate.target_fraction(),
            warmup: state.gate.in_warmup(),
            psf_norm: state.last_stats.map(|s| s.psf_norm),
            psf_ratio: state.last_stats.map(|s| s.ratio),
            non_finite_steps: state.non_finite_steps,
            cache_bytes: self.cache.bytes(),
            host_reads: state.host_reads,
        }
    }
}
