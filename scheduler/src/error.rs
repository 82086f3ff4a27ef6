//! The scheduler's errors.

use thiserror::Error;

/// What can go wrong while learning, selecting or evaluating.
#[derive(Debug, Error)]
pub enum SchedulerError {
    /// The data cannot support the request (too few cells, no methods, ...).
    #[error("not enough data: {0}")]
    Data(String),
    /// A parameter is out of range.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// Which parameter.
        field: &'static str,
        /// Why.
        reason: String,
    },
    /// A learner failed to fit or predict.
    #[error("{model}: {reason}")]
    Model {
        /// Which learner.
        model: String,
        /// Why.
        reason: String,
    },
    /// The embedder failed.
    #[error("embedding failed: {0}")]
    Embed(String),
    /// A table could not be imported.
    #[error("import, {location}: {reason}")]
    Import {
        /// Where in the input (line and column).
        location: String,
        /// Why.
        reason: String,
    },
    /// A trained predictor could not be saved or loaded.
    #[error("predictor file: {0}")]
    Persist(String),
    /// Nothing fits the budget.
    #[error(transparent)]
    Select(#[from] crate::choice::SelectError),
    /// A record failed the protocol's checks.
    #[error(transparent)]
    Protocol(#[from] metainf_protocol::ProtocolError),
}

impl SchedulerError {
    pub(crate) fn model(model: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Self::Model {
            model: model.into(),
            reason: reason.to_string(),
        }
    }

    /// A request that cannot be served as given.
    pub fn invalid_input(reason: impl Into<String>) -> Self {
        Self::Invalid {
            field: "input",
            reason: reason.into(),
        }
    }

    pub(crate) fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid {
            field,
            reason: reason.into(),
        }
    }
}

/// Results of this crate.
pub type Result<T, E = SchedulerError> = std::result::Result<T, E>;
