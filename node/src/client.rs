//! The command-line client of a node's HTTP API: `submit`, `jobs`, `peers --node`, `status`.
//! It reads the answers into the structs the API builds them from ([`crate::api::types`]).

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use crate::api::types::{
    ChatCompletion, ChatStreamEvent, ErrorResponse, JobAccepted, JobList, JobStatus, JobView,
    ModelList, OutcomeView, PeersResponse, StatusResponse,
};

/// Routing and generation options of `submit`.
#[derive(Clone, Debug, Default)]
pub struct SubmitOptions {
    /// Model name; `None` = the first model the node lists.
    pub model: Option<String>,
    /// A system message before the user's (a chat prompt's).
    pub system: Option<String>,
    /// Most tokens per prompt.
    pub max_tokens: u32,
    /// Sampling temperature (0 = greedy).
    pub temperature: f64,
    /// Budget.
    pub budget: Option<f64>,
    /// runtime, cost or energy.
    pub objective: Option<String>,
    /// Pinned method.
    pub method: Option<String>,
    /// Pinned host.
    pub host: Option<String>,
}

impl SubmitOptions {
    fn route(&self) -> Value {
        json!({
            "budget": self.budget,
            "objective": self.objective,
            "method": self.method,
            "host": self.host,
        })
    }
}

/// A client of one node.
pub struct ApiClient {
    base: String,
    http: reqwest::Client,
}

impl ApiClient {
    /// A client of the node at `base` (for example `http://127.0.0.1:8080`).
    /// Sends `METAINF_API_KEY`, when set, as the bearer token.
    pub fn new(base: &str) -> Result<Self> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Ok(key) = std::env::var("METAINF_API_KEY")
            && !key.is_empty()
        {
            let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {key}"))
                .context("METAINF_API_KEY holds characters a header cannot")?;
            value.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, value);
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .default_headers(headers)
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            http,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn check(response: reqwest::Response) -> Result<reqwest::Response> {
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let text = response.text().await.unwrap_or_default();
        let message = match serde_json::from_str::<ErrorResponse>(&text) {
            Ok(e) => e.error.message,
            Err(_) => serde_json::from_str::<Value>(&text)
                .unwrap_or(Value::Null)
                .to_string(),
        };
        bail!("the node answered {status}: {message}")
    }

    /// `GET path`, read as a `T`.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        let response = self
            .http
            .get(self.url(path))
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        Ok(Self::check(response).await?.json().await?)
    }

    /// `POST path` with a JSON body, read as a `T`.
    pub async fn post<T: DeserializeOwned>(&self, path: &str, body: &impl Serialize) -> Result<T> {
        let response = self
            .http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        Ok(Self::check(response).await?.json().await?)
    }

    /// `GET /v1/peers`.
    pub async fn peers(&self) -> Result<PeersResponse> {
        self.get("/v1/peers").await
    }

    /// `GET /v1/jobs`.
    pub async fn jobs(&self) -> Result<JobList> {
        self.get("/v1/jobs").await
    }

    /// `GET /v1/status`.
    pub async fn status(&self) -> Result<StatusResponse> {
        self.get("/v1/status").await
    }

    async fn model(&self, options: &SubmitOptions) -> Result<String> {
        if let Some(m) = &options.model {
            return Ok(m.clone());
        }
        let models: ModelList = self.get("/v1/models").await?;
        models
            .data
            .into_iter()
            .next()
            .map(|m| m.id)
            .ok_or_else(|| anyhow!("the network serves no model yet"))
    }

    /// Sends one chat prompt; prints the reply (token by token when `stream`) to `out` and the
    /// routing summary to `err`. Returns the `metainf` object of the response (`None` when a
    /// stream carried none).
    pub async fn chat(
        &self,
        prompt: &str,
        options: &SubmitOptions,
        stream: bool,
        out: &mut dyn Write,
    ) -> Result<Option<OutcomeView>> {
        let mut messages = Vec::new();
        if let Some(system) = &options.system {
            messages.push(json!({"role": "system", "content": system}));
        }
        messages.push(json!({"role": "user", "content": prompt}));
        let body = json!({
            "model": self.model(options).await?,
            "messages": messages,
            "max_tokens": options.max_tokens,
            "temperature": options.temperature,
            "stream": stream,
            "metainf": options.route(),
        });
        if !stream {
            let v: ChatCompletion = self.post("/v1/chat/completions", &body).await?;
            let text = v.choices.first().map_or("", |c| c.message.content.as_str());
            writeln!(out, "{text}")?;
            return Ok(v.metainf);
        }
        let response = self
            .http
            .post(self.url("/v1/chat/completions"))
            .json(&body)
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        let mut bytes = Self::check(response).await?.bytes_stream();
        let mut buffer = String::new();
        let mut metainf = None;
        while let Some(chunk) = bytes.next().await {
            buffer.push_str(&String::from_utf8_lossy(&chunk?));
            while let Some(end) = buffer.find("\n\n") {
                let event: String = buffer.drain(..end + 2).collect();
                for line in event.lines() {
                    let Some(data) = line.strip_prefix("data: ") else {
                        continue;
                    };
                    if data == "[DONE]" {
                        writeln!(out)?;
                        return Ok(metainf);
                    }
                    let chunk = match serde_json::from_str(data)
                        .with_context(|| format!("malformed event: {data}"))?
                    {
                        ChatStreamEvent::Error(e) => {
                            bail!("the job failed: {}", e.error.message)
                        }
                        ChatStreamEvent::Chunk(chunk) => chunk,
                    };
                    if let Some(t) = chunk.choices.first().and_then(|c| c.delta.content.as_ref()) {
                        write!(out, "{t}")?;
                        out.flush()?;
                    }
                    if chunk.metainf.is_some() {
                        metainf = chunk.metainf;
                    }
                }
            }
        }
        bail!("the stream ended without [DONE]")
    }

    /// Submits the prompts of a JSONL file (one per line: a JSON string, `{"prompt": …}` or
    /// `{"messages": […]}`) as one batch job and waits for it. Returns the finished job.
    pub async fn batch(&self, file: &Path, options: &SubmitOptions) -> Result<JobView> {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        let mut prompts = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: Value = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not JSON", file.display(), i + 1))?;
            if !(v.is_string() || v.get("prompt").is_some() || v.get("messages").is_some()) {
                bail!(
                    "{}:{}: expected a string, {{\"prompt\": …}} or {{\"messages\": […]}}",
                    file.display(),
                    i + 1
                );
            }
            prompts.push(v);
        }
        if prompts.is_empty() {
            bail!("{} holds no prompts", file.display());
        }
        let mut body = json!({
            "model": self.model(options).await?,
            "prompts": prompts,
            "max_tokens": options.max_tokens,
            "temperature": options.temperature,
        });
        if let (Some(o), Some(route)) = (body.as_object_mut(), options.route().as_object()) {
            for (k, v) in route {
                if !v.is_null() {
                    o.insert(k.clone(), v.clone());
                }
            }
        }
        let accepted: JobAccepted = self.post("/v1/jobs", &body).await?;
        let id = accepted.id;
        let choice = &accepted.metainf.choice;
        eprintln!(
            "job {id}: {} prompts → {} with {} (predicted {:.2} s)",
            prompts.len(),
            choice.host,
            choice.method,
            choice.predicted_runtime_s
        );
        loop {
            let job: JobView = self.get(&format!("/v1/jobs/{id}")).await?;
            match job.status {
                JobStatus::Done if job.result.is_some() => return Ok(job),
                JobStatus::Done => bail!("job {id} is done but the node sent no results"),
                JobStatus::Failed => bail!(
                    "job {id} failed: {}",
                    job.error.as_deref().unwrap_or("unknown reason")
                ),
                JobStatus::Queued | JobStatus::Running => {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
    }
}
