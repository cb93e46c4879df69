//! The crate's error type.

use burn::store::RecordError;

/// Everything that can go wrong when building, driving, saving or loading a SAM optimizer.
///
/// Every variant names the offending value, so a message can be acted on without a debugger.
#[derive(Debug, thiserror::Error)]
pub enum SamError {
    /// A configuration field holds a value outside its valid range.
    #[error("invalid configuration: `{field}` = {value}: {reason}")]
    InvalidConfig {
        /// Dotted path of the field, e.g. `policy.variation.window`.
        field: &'static str,
        /// The rejected value, formatted.
        value: String,
        /// What the field accepts.
        reason: &'static str,
    },

    /// A state record does not fit the module or the optimizer it is loaded into.
    #[error("record mismatch: {0}")]
    RecordMismatch(String),

    /// A state record could not be decoded (truncated, corrupted or foreign bytes).
    #[error("corrupt record: {0}")]
    CorruptRecord(String),

    /// A checkpoint set is incomplete, damaged or cannot be written; the message names the
    /// directory, the epoch and the file.
    #[error("{0}")]
    Checkpoint(String),

    /// Reading or writing a record failed at the burnpack layer.
    #[error("record I/O: {0}")]
    Record(#[from] RecordError),
}

impl SamError {
    pub(crate) fn invalid(field: &'static str, value: impl std::fmt::Display, reason: &'static str) -> Self {
        Self::InvalidConfig { field, value: value.to_string(), reason }
    }
}

/// Shorthand for results of this crate.
pub type Result<T, E = SamError> = std::result::Result<T, E>;
