//! What the request bodies of both job endpoints share: the generation fields with each
//! endpoint's defaults, the routing options, and the checks that turn them into a job.

use std::str::FromStr;

use metainf_protocol::{
    GenerationParams, JobId, JobRequest, MethodConfig, Objective, PeerId, Prompt,
};
use serde::Deserialize;

use super::ApiError;
use crate::jobs::JobService;
use crate::jobs::policy::RoutingPolicy;

/// `stop`: one string or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub(crate) fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// The generation fields of a request as the client sent them; what it leaves out is filled in
/// from the endpoint's [`GenerationDefaults`].
#[derive(Debug, Default, Deserialize)]
pub(crate) struct GenerationFields {
    #[serde(default)]
    pub(crate) max_tokens: Option<u32>,
    #[serde(default)]
    pub(crate) temperature: Option<f64>,
    #[serde(default)]
    pub(crate) top_p: Option<f64>,
    #[serde(default)]
    pub(crate) seed: Option<u64>,
    #[serde(default)]
    pub(crate) stop: Option<Stop>,
}

/// What an endpoint fills in for the generation fields a request leaves out.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct GenerationDefaults {
    pub(crate) max_tokens: u32,
    pub(crate) temperature: f64,
    pub(crate) top_p: f64,
}

impl GenerationDefaults {
    /// `/v1/chat/completions` and `/v1/completions`: OpenAI's documented defaults,
    /// temperature 1 and top_p 1, which OpenAI clients expect; 256 tokens.
    ///
    /// The two endpoints differ on purpose, and only here: a batch job ([`Self::batch`]) is
    /// greedy unless it says otherwise, so that its results are reproducible.
    pub(crate) const OPENAI: Self = Self {
        max_tokens: 256,
        temperature: 1.0,
        top_p: 1.0,
    };

    /// `/v1/jobs`: greedy (temperature 0, unlike [`Self::OPENAI`]), top_p 1, and the
    /// protocol's default length ([`GenerationParams::default`]).
    pub(crate) fn batch() -> Self {
        Self {
            max_tokens: GenerationParams::default().max_tokens,
            temperature: 0.0,
            top_p: 1.0,
        }
    }
}

impl GenerationFields {
    /// The parameters of the job, with `defaults` for what the request left out.
    pub(crate) fn into_params(self, defaults: GenerationDefaults) -> GenerationParams {
        GenerationParams {
            max_tokens: self.max_tokens.unwrap_or(defaults.max_tokens),
            temperature: self.temperature.unwrap_or(defaults.temperature),
            top_p: self.top_p.unwrap_or(defaults.top_p),
            seed: self.seed,
            stop: self.stop.map(Stop::into_vec).unwrap_or_default(),
        }
    }
}

/// Routing options a request may carry (`metainf` in OpenAI requests, top level in batch
/// jobs).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteOptions {
    /// Most the client will pay.
    #[serde(default)]
    pub budget: Option<f64>,
    /// What to minimise: runtime, cost or energy.
    #[serde(default)]
    pub objective: Option<Objective>,
    /// Run with exactly this method (`none`, `cb`, `cb+pc`, ...).
    #[serde(default)]
    pub method: Option<String>,
    /// Run on exactly this host (a peer id).
    #[serde(default)]
    pub host: Option<String>,
    /// How to choose the host (`metainf`, `round-robin`, `random`, `least-loaded`,
    /// `prefix-affinity`); the node's `[jobs] routing` where absent.
    #[serde(default)]
    pub policy: Option<String>,
}

impl RouteOptions {
    /// The routing policy asked for, if any.
    pub(crate) fn policy(&self) -> Result<Option<RoutingPolicy>, ApiError> {
        self.policy
            .as_deref()
            .map(str::parse)
            .transpose()
            .map_err(|e: String| ApiError::invalid(format!("metainf.policy: {e}")))
    }
}

/// Builds and validates a job request.
pub(crate) fn job_request(
    model: String,
    prompts: Vec<Prompt>,
    params: GenerationParams,
    route: RouteOptions,
    stream: bool,
) -> Result<JobRequest, ApiError> {
    let pin_method = route
        .method
        .as_deref()
        .map(MethodConfig::from_str)
        .transpose()
        .map_err(|e| ApiError::invalid(format!("metainf.method: {e}")))?;
    let pin_host = route
        .host
        .as_deref()
        .map(PeerId::from_str)
        .transpose()
        .map_err(|e| ApiError::invalid(format!("metainf.host is not a peer id: {e}")))?;
    let request = JobService::new_request(JobRequest {
        id: JobId([0; 16]),
        model,
        prompts,
        params,
        budget: route.budget,
        // A streamed request is someone watching: first token and end both count.
        objective: route.objective.unwrap_or(if stream {
            Objective::Interactive
        } else {
            Objective::Runtime
        }),
        pin_method,
        pin_host,
        stream,
        submitted_at_ms: 0,
    });
    request
        .validate()
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    Ok(request)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_endpoint_fills_in_its_own_defaults() {
        let p = GenerationFields::default().into_params(GenerationDefaults::batch());
        assert_eq!(p.max_tokens, GenerationParams::default().max_tokens);
        assert_eq!((p.temperature, p.top_p, p.seed), (0.0, 1.0, None));
        let p = GenerationFields::default().into_params(GenerationDefaults::OPENAI);
        assert_eq!((p.max_tokens, p.temperature, p.top_p), (256, 1.0, 1.0));
        let p = GenerationFields {
            temperature: Some(0.5),
            stop: Some(Stop::One("x".into())),
            ..Default::default()
        }
        .into_params(GenerationDefaults::OPENAI);
        assert_eq!((p.max_tokens, p.temperature), (256, 0.5));
        assert_eq!(p.stop, vec!["x".to_owned()]);
    }
}
