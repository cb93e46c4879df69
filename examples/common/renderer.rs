//! Progress a person can read when standard output is not a terminal (a log file, CI, `nohup`):
//! Burn's plain renderer prints a `{:?}` dump of its progress for every batch. This one prints a
//! line per tenth of a split and, at the end of each split, a line with its metrics.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Instant;

use burn::train::logger::{EvaluationProgressLogger, TrainingProgressLogger};
use burn::train::metric::{MetricDefinition, MetricEntry, MetricId, NumericEntry};
use burn::train::renderer::{
    EvaluationName, MetricState, MetricsRenderer, MetricsRendererEvaluation, MetricsRendererTraining,
};
use burn::train::{LearnerModel, SupervisedTraining};

/// A renderer of plain lines: see the module documentation.
pub struct LineRenderer {
    names: HashMap<MetricId, String>,
    /// The latest value of each metric of the running split, in the order first seen.
    values: Vec<(MetricId, String)>,
    epoch: usize,
    epochs: usize,
    split: String,
    total: usize,
    next_tenth: usize,
    started: Instant,
}

impl LineRenderer {
    /// A renderer that prints to standard output.
    pub fn new() -> Self {
        Self {
            names: HashMap::new(),
            values: Vec::new(),
            epoch: 1,
            epochs: 0,
            split: String::new(),
            total: 0,
            next_tenth: 1,
            started: Instant::now(),
        }
    }

    /// This renderer when standard output is not a terminal; `None` (Burn's dashboard) when it is.
    pub fn unless_terminal() -> Option<Box<dyn MetricsRenderer>> {
        (!std::io::stdout().is_terminal()).then(|| Box::new(Self::new()) as Box<dyn MetricsRenderer>)
    }

    fn record(&mut self, state: MetricState) {
        let (entry, numeric): (MetricEntry, Option<NumericEntry>) = match state {
            MetricState::Generic(entry) => (entry, None),
            MetricState::Numeric(entry, numeric) => (entry, numeric),
        };
        let value = match numeric {
            Some(NumericEntry::Final(value)) => format!("{value:.4}"),
            _ => entry.serialized_entry.formatted.clone(),
        };
        match self.values.iter_mut().find(|(id, _)| *id == entry.metric_id) {
            Some((_, slot)) => *slot = value,
            None => self.values.push((entry.metric_id, value)),
        }
    }

    fn prefix(&self) -> String {
        format!("[{:>6.1} s] epoch {}/{} {}", self.started.elapsed().as_secs_f64(), self.epoch, self.epochs, self.split)
    }
}

impl Default for LineRenderer {
    fn default() -> Self {
        Self::new()
    }
}

impl MetricsRendererTraining for LineRenderer {
    fn update_train(&mut self, state: MetricState) {
        self.record(state);
    }

    fn update_valid(&mut self, state: MetricState) {
        self.record(state);
    }
}

impl MetricsRendererEvaluation for LineRenderer {
    fn update_test(&mut self, _name: EvaluationName, state: MetricState) {
        self.record(state);
    }
}

impl TrainingProgressLogger for LineRenderer {
    fn start(&mut self, total_epochs: usize, starting_epoch: usize, _items: Option<usize>, label: Option<&str>) {
        self.epochs = total_epochs;
        self.epoch = starting_epoch.max(1);
        println!("{} for {total_epochs} epochs, from epoch {}", label.unwrap_or("training"), self.epoch);
    }

    fn update_epoch(&mut self, epoch: usize) {
        self.epoch = epoch + 1;
    }

    fn start_split(&mut self, split: &str, total_items: usize) {
        self.split = split.to_string();
        self.total = total_items;
        self.next_tenth = 1;
        self.values.clear();
    }

    fn update_split(&mut self, items_processed: usize) {
        if self.total == 0 {
            return;
        }
        let tenths = items_processed.saturating_mul(10) / self.total;
        if tenths >= self.next_tenth && tenths < 10 {
            println!("{} {:>3} % ({items_processed}/{} items)", self.prefix(), tenths * 10, self.total);
            self.next_tenth = tenths + 1;
        }
    }

    fn end_split(&mut self) {
        let metrics: Vec<String> = self
            .values
            .iter()
            .map(|(id, value)| format!("{} {value}", self.names.get(id).map_or("?", String::as_str)))
            .collect();
        println!("{} done: {}", self.prefix(), if metrics.is_empty() { "-".to_string() } else { metrics.join(", ") });
    }

    fn end(&mut self) {
        println!("training ended after {:.1} s", self.started.elapsed().as_secs_f64());
    }

    /// Burn sends "Iteration" for every batch: nothing to print.
    fn log_event_training(&mut self, _event: String) {}
}

impl EvaluationProgressLogger for LineRenderer {
    fn start_global_progress(&mut self, _total_tests: usize) {}

    fn start_test(&mut self, name: &str, total_items: usize) {
        self.start_split(name, total_items);
    }

    fn update_test_progress(&mut self, items_processed: usize) {
        self.update_split(items_processed);
    }

    fn end_test(&mut self) {
        self.end_split();
    }

    fn end_global_progress(&mut self) {}

    fn log_event_evaluation(&mut self, _event: String) {}
}

impl MetricsRenderer for LineRenderer {
    fn manual_close(&mut self) {}

    fn register_metric(&mut self, definition: MetricDefinition) {
        self.names.insert(definition.metric_id, definition.name.to_string());
    }
}

/// Installs [`LineRenderer`] on a training when standard output is not a terminal.
pub trait PlainOutput {
    /// Plain lines outside a terminal; Burn's dashboard in one.
    fn plain_output_unless_terminal(self) -> Self;
}

impl<M: LearnerModel> PlainOutput for SupervisedTraining<M> {
    fn plain_output_unless_terminal(self) -> Self {
        match LineRenderer::unless_terminal() {
            Some(renderer) => self.renderer(renderer),
            None => self,
        }
    }
}
