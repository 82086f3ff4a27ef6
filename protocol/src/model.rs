//! Which model a measurement ran.

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::id::ContentId;
use crate::validate;

/// Content id of a [`ModelDescriptor`].
pub type ModelId = ContentId;

/// A model as the engine loaded it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelDescriptor {
    /// Human name, for example `SmolLM2-135M-Instruct`.
    pub name: String,
    /// Architecture family (`llama`).
    pub architecture: String,
    /// Number of parameters; 0 where it is unknown (an imported table whose model name carries
    /// no size).
    pub parameters: u64,
    /// Weight format as loaded (`Q4_1`, `Q8_0`, `F16`, ...).
    pub quantization: String,
    /// Average bits per weight of that format.
    pub bits_per_weight: f64,
    /// Context length the model supports.
    pub context_length: u32,
    /// Digest of the weights file, so two files with the same name are told apart.
    pub weights_digest: ContentId,
}

impl ModelDescriptor {
    /// The model's content id.
    pub fn id(&self) -> Result<ModelId> {
        ContentId::of("metainf model v1", self)
    }

    /// Checks ranges and sizes.
    pub fn validate(&self) -> Result<()> {
        validate::nonempty_text("model.name", &self.name)?;
        validate::nonempty_text("model.architecture", &self.architecture)?;
        validate::nonempty_text("model.quantization", &self.quantization)?;
        validate::in_range("model.bits_per_weight", self.bits_per_weight, 0.5, 64.0)?;
        Ok(())
    }
}
