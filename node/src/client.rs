//! The command-line client of a node's HTTP API: `submit`, `jobs`, `peers --node`, `status`.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use futures::StreamExt;
use serde_json::{Value, json};

/// Routing and generation options of `submit`.
#[derive(Clone, Debug, Default)]
pub struct SubmitOptions {
    /// Model name; `None` = the first model the node lists.
    pub model: Option<String>,
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
    pub fn new(base: &str) -> Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
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
        let body: Value = response.json().await.unwrap_or(Value::Null);
        let message = body["error"]["message"]
            .as_str()
            .map_or_else(|| body.to_string(), str::to_owned);
        bail!("the node answered {status}: {message}")
    }

    /// `GET path` as JSON.
    pub async fn get(&self, path: &str) -> Result<Value> {
        let response = self
            .http
            .get(self.url(path))
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        Ok(Self::check(response).await?.json().await?)
    }

    /// `POST path` with a JSON body, as JSON.
    pub async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let response = self
            .http
            .post(self.url(path))
            .json(body)
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        Ok(Self::check(response).await?.json().await?)
    }

    async fn model(&self, options: &SubmitOptions) -> Result<String> {
        if let Some(m) = &options.model {
            return Ok(m.clone());
        }
        let models = self.get("/v1/models").await?;
        models["data"][0]["id"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("the network serves no model yet"))
    }

    /// Sends one chat prompt; prints the reply (token by token when `stream`) to `out` and the
    /// routing summary to `err`. Returns the `metainf` object of the response.
    pub async fn chat(
        &self,
        prompt: &str,
        options: &SubmitOptions,
        stream: bool,
        out: &mut dyn Write,
    ) -> Result<Value> {
        let body = json!({
            "model": self.model(options).await?,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": options.max_tokens,
            "temperature": options.temperature,
            "stream": stream,
            "metainf": options.route(),
        });
        if !stream {
            let v = self.post("/v1/chat/completions", &body).await?;
            let text = v["choices"][0]["message"]["content"].as_str().unwrap_or("");
            writeln!(out, "{text}")?;
            return Ok(v["metainf"].clone());
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
        let mut metainf = Value::Null;
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
                    let v: Value = serde_json::from_str(data)
                        .with_context(|| format!("malformed event: {data}"))?;
                    if let Some(e) = v.get("error") {
                        bail!("the job failed: {}", e["message"].as_str().unwrap_or(""));
                    }
                    if let Some(t) = v["choices"][0]["delta"]["content"].as_str() {
                        write!(out, "{t}")?;
                        out.flush()?;
                    }
                    if v.get("metainf").is_some() {
                        metainf = v["metainf"].clone();
                    }
                }
            }
        }
        bail!("the stream ended without [DONE]")
    }

    /// Submits the prompts of a JSONL file (one per line: a JSON string, `{"prompt": …}` or
    /// `{"messages": […]}`) as one batch job and waits for it. Returns the finished job.
    pub async fn batch(&self, file: &Path, options: &SubmitOptions) -> Result<Value> {
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
        let accepted = self.post("/v1/jobs", &body).await?;
        let id = accepted["id"]
            .as_str()
            .ok_or_else(|| anyhow!("the node returned no job id"))?
            .to_owned();
        eprintln!(
            "job {id}: {} prompts → {} with {} (predicted {:.2} s)",
            prompts.len(),
            accepted["metainf"]["host"].as_str().unwrap_or("?"),
            accepted["metainf"]["method"].as_str().unwrap_or("?"),
            accepted["metainf"]["predicted_runtime_s"]
                .as_f64()
                .unwrap_or(f64::NAN)
        );
        loop {
            let job = self.get(&format!("/v1/jobs/{id}")).await?;
            match job["status"].as_str() {
                Some("done") => return Ok(job),
                Some("failed") => bail!(
                    "job {id} failed: {}",
                    job["error"].as_str().unwrap_or("unknown reason")
                ),
                _ => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
    }
}
