//! The train-step output: the user's item plus what the step did.

use burn::train::metric::{
    AccuracyInput, Adaptor, CerInput, ConfusionStatsInput, HammingScoreInput, LossInput, PerplexityInput,
    TopKAccuracyInput, WerInput,
};
use burn::train::ItemLazy;
use burn_std::ExecutionError;

use super::metrics::SamStepInfo;
use crate::telemetry::StepTelemetry;

/// A train-step item with the step's SAM telemetry attached.
///
/// Burn's metrics keep working: every metric input Burn's own outputs provide (accuracy, loss,
/// top-k accuracy, perplexity, confusion statistics, Hamming score, CER, WER) is forwarded to
/// `inner`, and the SAM metrics ([`SamFractionMetric`](super::SamFractionMetric) and friends)
/// read `telemetry`.
#[derive(Debug, Clone)]
pub struct SamOutput<O> {
    /// The item the forward closure returned (e.g. a `ClassificationOutput`).
    pub inner: O,
    /// What this train step did.
    pub telemetry: StepTelemetry,
}

impl<O> SamOutput<O> {
    /// Wraps an item.
    pub fn new(inner: O, telemetry: StepTelemetry) -> Self {
        Self { inner, telemetry }
    }
}

impl<O: ItemLazy> ItemLazy for SamOutput<O> {
    fn sync(self) -> Result<Self, ExecutionError> {
        Ok(Self { inner: self.inner.sync()?, telemetry: self.telemetry })
    }
}

impl<O> Adaptor<SamStepInfo> for SamOutput<O> {
    fn adapt(&self) -> SamStepInfo {
        SamStepInfo { telemetry: self.telemetry }
    }
}

macro_rules! forward_metric_inputs {
    ($($input:ty),* $(,)?) => {
        $(
            impl<O: Adaptor<$input>> Adaptor<$input> for SamOutput<O> {
                fn adapt(&self) -> $input {
                    self.inner.adapt()
                }
            }
        )*
    };
}

forward_metric_inputs!(
    AccuracyInput,
    LossInput,
    TopKAccuracyInput,
    PerplexityInput,
    ConfusionStatsInput,
    HammingScoreInput,
    CerInput,
    WerInput,
);
