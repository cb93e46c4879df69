//! SAM metrics for Burn's dashboard and metric logs.

use std::sync::Arc;

use burn::tensor::TensorReadError;
use burn::train::metric::state::{FormatOptions, NumericMetricState};
use burn::train::metric::{
    Metric, MetricAttributes, MetricMetadata, MetricName, Numeric, NumericAttributes, NumericEntry, SerializedEntry,
};

use crate::telemetry::StepTelemetry;

/// The input of the SAM metrics: the telemetry of one train step.
#[derive(Clone, Copy, Debug)]
pub struct SamStepInfo {
    /// What the step did.
    pub telemetry: StepTelemetry,
}

macro_rules! sam_metric {
    ($(#[$doc:meta])* $name:ident, $label:literal, $precision:literal, $higher:literal, $value:expr) => {
        $(#[$doc])*
        #[derive(Clone)]
        pub struct $name {
            name: MetricName,
            state: NumericMetricState,
        }

        impl $name {
            /// Creates the metric.
            pub fn new() -> Self {
                Self {
                    name: Arc::new($label.to_string()),
                    state: NumericMetricState::new(),
                }
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl Metric for $name {
            type Input = SamStepInfo;

            fn update(&mut self, item: &SamStepInfo, _: &MetricMetadata) -> Result<SerializedEntry, TensorReadError> {
                let value: fn(&StepTelemetry) -> f64 = $value;
                self.state.update(value(&item.telemetry), 1);
                Ok(self.state.compute_update(FormatOptions::new(self.name()).precision($precision)))
            }

            fn compute(&mut self) -> Result<SerializedEntry, TensorReadError> {
                Ok(self.state.compute_final(FormatOptions::new(self.name()).precision($precision)))
            }

            fn clear(&mut self) {
                self.state.reset()
            }

            fn name(&self) -> MetricName {
                self.name.clone()
            }

            fn attributes(&self) -> MetricAttributes {
                NumericAttributes {
                    unit: None,
                    higher_is_better: $higher,
                }
                .into()
            }
        }

        impl Numeric for $name {
            fn value(&self) -> Option<NumericEntry> {
                Some(self.state.current_value())
            }

            fn running_value(&self) -> Option<NumericEntry> {
                Some(self.state.running_value())
            }

            fn final_value(&self) -> NumericEntry {
                self.state.final_value()
            }
        }
    };
}

sam_metric!(
    /// Fraction of train steps that ran the second (SAM) pass: 1 or 0 per step, so the running
    /// value is the fraction so far in the epoch and the epoch value the epoch's fraction.
    SamFractionMetric,
    "SAM Fraction",
    3,
    false,
    |t| if t.sam { 1.0 } else { 0.0 }
);

sam_metric!(
    /// Gradient passes per train step (1 for a cheap step, 2 for a SAM step); its mean is the
    /// compute cost relative to the base optimizer.
    GradientPassesMetric,
    "Gradient Passes",
    3,
    false,
    |t| if t.sam { 2.0 } else { 1.0 }
);

sam_metric!(
    /// The vSAM quota s: SAM steps per window (0 for gates without a quota).
    SamQuotaMetric,
    "SAM Quota",
    2,
    false,
    |t| t.quota.unwrap_or(0.0)
);

sam_metric!(
    /// The fraction of SAM steps the gate aims at: floor(s)/K for vSAM, the current rate for
    /// vSAM-trend (0 for gates without one).
    SamTargetMetric,
    "SAM Target",
    3,
    false,
    |t| t.target_fraction.unwrap_or(0.0)
);

sam_metric!(
    /// ‖PSF‖/‖g‖ over the last N tensors, as of the last successful SAM step (0 before one).
    PsfRatioMetric,
    "PSF Ratio",
    4,
    false,
    |t| t.psf_ratio.unwrap_or(0.0)
);
