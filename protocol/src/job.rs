//! Jobs: what a client asks the network to run, and what comes back.

use std::fmt;
use std::str::FromStr;

use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};

use crate::error::{ProtocolError, Result};
use crate::method::MethodConfig;
use crate::record::{Metrics, RecordId};
use crate::validate;

/// Most prompts in one job.
pub const MAX_PROMPTS: usize = 4096;
/// Most tokens a request may ask to generate.
pub const MAX_NEW_TOKENS: u32 = 32_768;

/// A job's id: 16 random bytes, shown as 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct JobId(pub [u8; 16]);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({self})")
    }
}

impl FromStr for JobId {
    type Err = ProtocolError;
    fn from_str(s: &str) -> Result<Self> {
        let bytes = hex::decode(s)
            .map_err(|e| ProtocolError::invalid("job.id", format!("not hex: {e}")))?;
        let arr: [u8; 16] = bytes
            .try_into()
            .map_err(|_| ProtocolError::invalid("job.id", "expected 32 hex digits"))?;
        Ok(JobId(arr))
    }
}

/// One chat message.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// One request of a job: raw text, or a chat to which the model's template is applied.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    /// Raw completion prompt.
    Text(String),
    /// Chat messages.
    Chat(Vec<ChatMessage>),
}

/// How to generate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerationParams {
    /// Most tokens to generate per request.
    pub max_tokens: u32,
    /// Sampling temperature; 0 is greedy.
    pub temperature: f64,
    /// Nucleus sampling mass, in (0, 1].
    pub top_p: f64,
    /// Seed for sampling.
    pub seed: Option<u64>,
    /// Extra stop strings.
    pub stop: Vec<String>,
}

impl Default for GenerationParams {
    fn default() -> Self {
        Self {
            max_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            seed: None,
            stop: Vec::new(),
        }
    }
}

/// What the router minimises among the pairs that fit the budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Objective {
    /// Predicted runtime.
    #[default]
    Runtime,
    /// Predicted cost.
    Cost,
    /// Predicted energy, where known.
    Energy,
    /// Predicted time to the first token plus time to the end: for streamed chats, where a
    /// person watches both (the default of a streamed request that names no objective).
    Interactive,
}

/// A job as a client submits it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    /// Job id, chosen by the node that accepted it.
    pub id: JobId,
    /// Model name.
    pub model: String,
    /// The requests.
    pub prompts: Vec<Prompt>,
    /// Generation parameters shared by all requests.
    pub params: GenerationParams,
    /// Most the client will pay, in the network's price unit; `None` is no limit.
    pub budget: Option<f64>,
    /// What to minimise.
    pub objective: Objective,
    /// Run with exactly this method.
    pub pin_method: Option<MethodConfig>,
    /// Run on exactly this host.
    pub pin_host: Option<PeerId>,
    /// Whether the client wants tokens as they are generated.
    pub stream: bool,
    /// When the job was accepted, Unix milliseconds.
    pub submitted_at_ms: u64,
}

impl JobRequest {
    /// Checks sizes and ranges.
    pub fn validate(&self) -> Result<()> {
        validate::nonempty_text("job.model", &self.model)?;
        if self.prompts.is_empty() {
            return Err(ProtocolError::invalid("job.prompts", "no prompts"));
        }
        validate::count("job.prompts", self.prompts.len(), MAX_PROMPTS)?;
        for prompt in &self.prompts {
            if let Prompt::Chat(messages) = prompt {
                if messages.is_empty() {
                    return Err(ProtocolError::invalid(
                        "job.prompts",
                        "chat without messages",
                    ));
                }
                for m in messages {
                    validate::key("job.prompts.role", &m.role)?;
                }
            }
        }
        let p = &self.params;
        if p.max_tokens == 0 || p.max_tokens > MAX_NEW_TOKENS {
            return Err(ProtocolError::invalid(
                "job.params.max_tokens",
                format!("{} is outside 1..={MAX_NEW_TOKENS}", p.max_tokens),
            ));
        }
        validate::in_range("job.params.temperature", p.temperature, 0.0, 10.0)?;
        validate::in_range("job.params.top_p", p.top_p, 1e-9, 1.0)?;
        validate::count("job.params.stop", p.stop.len(), 16)?;
        if let Some(b) = self.budget {
            validate::finite_nonneg("job.budget", b)?;
        }
        if let Some(m) = &self.pin_method {
            m.validate()?;
        }
        Ok(())
    }
}

/// Why generation of one request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop token or stop string.
    Stop,
    /// `max_tokens` reached.
    Length,
}

/// The output of one request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// Generated text.
    pub text: String,
    /// Prompt length in tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub output_tokens: u32,
    /// Why it ended.
    pub finish_reason: FinishReason,
}

/// A finished job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    /// The job.
    pub id: JobId,
    /// Host that ran it.
    pub host: PeerId,
    /// Method it ran with.
    pub method: MethodConfig,
    /// One completion per prompt, in order.
    pub completions: Vec<Completion>,
    /// What the host measured.
    pub metrics: Metrics,
    /// The performance record the host made of it.
    pub record: Option<RecordId>,
}
