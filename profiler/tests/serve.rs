//! The serving engine on the real default model: jobs submitted concurrently share the batch
//! and the prefix cache, and get exactly the tokens they get alone; cancelling, stopping, a
//! tiny KV budget and a full queue behave.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::model_path;

use std::sync::mpsc;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metainf_profiler::ProfilerError;
use metainf_profiler::engine::serve::{JobOutcome, JobSink, Server, SubmitError};
use metainf_profiler::engine::{
    Engine, EngineOptions, JobPolicy, MethodSettings, Request, Sampling, SchedConfig,
};
use metainf_protocol::{ChatMessage, MethodConfig};

fn engine() -> Arc<Engine> {
    static ENGINE: OnceLock<Arc<Engine>> = OnceLock::new();
    ENGINE
        .get_or_init(|| Arc::new(Engine::load(&model_path(), EngineOptions::default()).unwrap()))
        .clone()
}

fn chat(system: &str, user: &str) -> Vec<ChatMessage> {
    vec![
        ChatMessage {
            role: "system".into(),
            content: system.into(),
        },
        ChatMessage {
            role: "user".into(),
            content: user.into(),
        },
    ]
}

fn request(messages: &[ChatMessage], max_tokens: u32) -> Request {
    common::chat_request(&engine(), messages, max_tokens)
}

const SYSTEM: &str = "You are a concise assistant for a travel agency. Answer in one or two \
    sentences, name concrete places, never invent prices, and say so when you do not know. \
    The agency sells trips to France, Italy, Spain, Portugal and Greece, by train or by plane, \
    with hotels of three to five stars, and it cares about clear answers more than long ones.";

enum Event {
    Token(usize, u32),
    Done(metainf_profiler::Result<JobOutcome>),
}

struct Sink(mpsc::SyncSender<Event>);

impl JobSink for Sink {
    fn token(&mut self, index: usize, token: u32) {
        let _ = self.0.send(Event::Token(index, token));
    }
    fn done(self: Box<Self>, outcome: metainf_profiler::Result<JobOutcome>) {
        let _ = self.0.send(Event::Done(outcome));
    }
}

fn submit(
    server: &Server,
    requests: Vec<Request>,
    policy: JobPolicy,
) -> (
    metainf_profiler::engine::serve::JobHandle,
    mpsc::Receiver<Event>,
) {
    let (tx, rx) = mpsc::sync_channel(10_000);
    let handle = server.submit(requests, policy, Box::new(Sink(tx))).unwrap();
    (handle, rx)
}

/// Waits for the job's end; returns the tokens streamed per sequence and the outcome.
fn wait(
    rx: &mpsc::Receiver<Event>,
    n: usize,
) -> (Vec<Vec<u32>>, metainf_profiler::Result<JobOutcome>) {
    let mut streamed = vec![Vec::new(); n];
    loop {
        match rx.recv_timeout(Duration::from_secs(300)).unwrap() {
            Event::Token(i, t) => streamed[i].push(t),
            Event::Done(outcome) => return (streamed, outcome),
        }
    }
}

fn alone(r: &Request) -> Vec<u32> {
    engine()
        .run(std::slice::from_ref(r), &MethodSettings::default())
        .unwrap()
        .completions[0]
        .tokens
        .clone()
}

fn policy(short: &str) -> JobPolicy {
    let method = MethodConfig::standard_methods()
        .into_iter()
        .find(|m| m.short_name() == short)
        .unwrap();
    JobPolicy::of(&MethodSettings::from_method(&method).unwrap())
}

fn config() -> SchedConfig {
    SchedConfig {
        block_size: 16,
        chunk_size: 32,
        ..SchedConfig::default()
    }
}

#[test]
fn concurrent_jobs_share_the_batch_and_get_the_tokens_they_get_alone() {
    let users = [
        "Which city should I visit in Portugal?",
        "Is the train from Paris to Rome fast?",
        "What is the capital of Greece?",
        "Name one beach in Spain.",
        "How long is a flight from Lisbon to Athens?",
        "What should I pack for Italy in winter?",
        "Do you sell trips to Norway?",
        "Recommend a museum in Madrid.",
        "Tell me one fact about the Acropolis.",
    ];
    let mut requests: Vec<Request> = users
        .iter()
        .map(|u| request(&chat(SYSTEM, u), 24))
        .collect();
    // One sampled request: a seeded sampler gives the same tokens in any company.
    requests[4].sampling = Sampling {
        temperature: 0.9,
        top_p: 0.9,
        seed: 42,
    };
    let reference: Vec<Vec<u32>> = requests.iter().map(alone).collect();
    let (server, thread) = Server::start(engine(), config()).unwrap();
    let methods = [
        "none", "cb", "pc", "cp", "cb+pc", "cb+cp", "pc+cp", "cb+pc+cp", "cb+pc+cp",
    ];
    let jobs: Vec<_> = requests
        .iter()
        .zip(methods)
        .map(|(r, m)| submit(&server, vec![r.clone()], policy(m)))
        .collect();
    let mut most_foreign = 0.0f64;
    for (i, (handle, rx)) in jobs.iter().enumerate() {
        let (streamed, outcome) = wait(rx, 1);
        let outcome = outcome.unwrap();
        assert_eq!(
            outcome.report.completions[0].tokens, reference[i],
            "job {i} ({})",
            methods[i]
        );
        assert_eq!(streamed[0], reference[i], "streamed tokens of job {i}");
        most_foreign = most_foreign.max(outcome.co_load.mean_foreign);
        let _ = handle;
    }
    assert!(
        most_foreign >= 2.0,
        "the jobs ran one after another (at most {most_foreign} foreign sequences per step)"
    );
    drop(jobs);
    drop(server);
    thread.join().unwrap();
}

#[test]
fn a_later_job_reuses_the_prefix_an_earlier_job_left() {
    let (server, thread) = Server::start(engine(), config()).unwrap();
    let first = request(&chat(SYSTEM, "Which island in Greece is quiet?"), 16);
    let (_h, rx) = submit(&server, vec![first.clone()], policy("cb+pc"));
    let (_, outcome) = wait(&rx, 1);
    let answer = outcome.unwrap().report.completions[0].tokens.clone();
    assert_eq!(answer, alone(&first));
    // The next turn of the conversation resends the history: it is served from the cache.
    let e = engine();
    let tok = e.model().tokenizer();
    let mut history = chat(SYSTEM, "Which island in Greece is quiet?");
    history.push(ChatMessage {
        role: "assistant".into(),
        content: tok.decode(&answer).unwrap(),
    });
    history.push(ChatMessage {
        role: "user".into(),
        content: "And how do I get there?".into(),
    });
    let second = request(&history, 16);
    let (_h, rx) = submit(&server, vec![second.clone()], policy("cb+pc"));
    let (_, outcome) = wait(&rx, 1);
    let outcome = outcome.unwrap();
    assert_eq!(outcome.report.completions[0].tokens, alone(&second));
    let cached = outcome.co_load.cached_prompt_tokens as usize;
    assert!(
        cached >= first.prompt.len() / 16 * 16 - 16,
        "{cached} of {} prompt tokens came from the cache; the first turn had {}",
        second.prompt.len(),
        first.prompt.len()
    );
    assert!(outcome.report.kv.hits > 0);
    // A job whose method does not cache computes everything.
    let (_h, rx) = submit(&server, vec![second.clone()], policy("cb"));
    let (_, outcome) = wait(&rx, 1);
    assert_eq!(outcome.unwrap().co_load.cached_prompt_tokens, 0);
    assert!(
        server.load().kv_blocks_cached > 0,
        "the cache outlives its jobs"
    );
    // The same prompt again: below block granularity, every token but the last comes from
    // the cache (the rows of the block the first turn's prompt ended inside are copied), and
    // the tokens are those it gets alone.
    let (_h, rx) = submit(&server, vec![second.clone()], policy("cb+pc"));
    let (_, outcome) = wait(&rx, 1);
    let outcome = outcome.unwrap();
    assert_eq!(outcome.report.completions[0].tokens, alone(&second));
    assert_eq!(
        outcome.co_load.cached_prompt_tokens as usize,
        second.prompt.len() - 1,
        "a prompt seen before is computed from its last token only"
    );
    // A prompt that shares the first turn's prompt and then diverges inside a block reuses
    // exactly the shared rows.
    let mut fork = first.clone();
    let cut = fork.prompt.len() - 3;
    fork.prompt.truncate(cut);
    fork.prompt.extend_from_slice(&[13, 13, 13, 13, 13]);
    let (_h, rx) = submit(&server, vec![fork.clone()], policy("cb+pc"));
    let (_, outcome) = wait(&rx, 1);
    let outcome = outcome.unwrap();
    assert_eq!(outcome.report.completions[0].tokens, alone(&fork));
    assert_eq!(outcome.co_load.cached_prompt_tokens as usize, cut);
    drop(server);
    thread.join().unwrap();
}

#[test]
fn a_cancelled_job_leaves_the_batch_and_the_others_finish() {
    let (server, thread) = Server::start(engine(), config()).unwrap();
    let long = request(&chat(SYSTEM, "Describe a week in Italy, day by day."), 200);
    let other = request(&chat(SYSTEM, "Name a quiet village in Portugal."), 24);
    let (doomed, doomed_rx) = submit(&server, vec![long.clone(), long.clone()], policy("cb"));
    let (_h, other_rx) = submit(&server, vec![other.clone()], policy("cb+pc+cp"));
    // A few tokens in, stop one sequence (a stop string matched), then cancel the job.
    let mut seen = 0;
    while seen < 4 {
        if let Event::Token(..) = doomed_rx.recv_timeout(Duration::from_secs(120)).unwrap() {
            seen += 1;
        }
    }
    doomed.stop(1);
    std::thread::sleep(Duration::from_millis(200));
    doomed.cancel();
    let (_, outcome) = wait(&doomed_rx, 2);
    assert!(
        matches!(outcome, Err(ProfilerError::Cancelled)),
        "{outcome:?}"
    );
    let (_, outcome) = wait(&other_rx, 1);
    assert_eq!(outcome.unwrap().report.completions[0].tokens, alone(&other));
    // Everything the cancelled job held is back.
    std::thread::sleep(Duration::from_millis(100));
    let load = server.load();
    assert_eq!((load.running, load.waiting, load.jobs), (0, 0, 0));
    assert_eq!(load.kv_blocks_used, 0, "{load:?}");
    // Dropping a handle cancels its job too.
    let (handle, rx) = submit(&server, vec![long], policy("cb"));
    drop(handle);
    let (_, outcome) = wait(&rx, 1);
    assert!(matches!(outcome, Err(ProfilerError::Cancelled)));
    drop(server);
    thread.join().unwrap();
}

#[test]
fn a_tiny_kv_budget_queues_jobs_without_deadlock_and_refuses_what_never_fits() {
    let per_token = engine().model().config.kv_bytes_per_token();
    let requests: Vec<Request> = (0..6)
        .map(|i| {
            request(
                &chat(SYSTEM, &format!("Give me tip number {i} for Spain.")),
                40,
            )
        })
        .collect();
    let longest = requests.iter().map(|r| r.prompt.len() + 40).max().unwrap();
    // Room for one and a half of these requests: they must take turns.
    let cfg = SchedConfig {
        kv_budget_bytes: (longest * 3 / 2 + 32) * per_token,
        ..config()
    };
    let (server, thread) = Server::start(engine(), cfg).unwrap();
    let jobs: Vec<_> = requests
        .iter()
        .enumerate()
        .map(|(i, r)| {
            submit(
                &server,
                vec![r.clone()],
                policy(if i % 2 == 0 { "cb" } else { "cb+pc" }),
            )
        })
        .collect();
    for (i, (_h, rx)) in jobs.iter().enumerate() {
        let (_, outcome) = wait(rx, 1);
        let outcome = outcome.unwrap();
        assert_eq!(
            outcome.report.completions[0].tokens,
            alone(&requests[i]),
            "job {i}"
        );
        assert!(outcome.report.peak_kv_bytes <= cfg.kv_budget_bytes as u64);
    }
    let huge = request(&chat(SYSTEM, "hi"), (longest * 2) as u32);
    let (tx, _rx) = mpsc::sync_channel(10_000);
    match server.submit(vec![huge], policy("cb"), Box::new(Sink(tx))) {
        Err(SubmitError::Rejected(reason)) => assert!(reason.contains("KV cache"), "{reason}"),
        other => panic!("expected a rejection, got {:?}", other.map(|_| ())),
    }
    drop(jobs);
    drop(server);
    thread.join().unwrap();
}

#[test]
fn a_full_queue_refuses_with_a_retry_estimate() {
    let cfg = SchedConfig {
        max_running: 1,
        max_waiting: 1,
        ..config()
    };
    let (server, thread) = Server::start(engine(), cfg).unwrap();
    let long = request(&chat(SYSTEM, "Describe a week in Greece, day by day."), 120);
    let short = request(&chat(SYSTEM, "hi"), 4);
    let (_running, rx) = submit(&server, vec![long], policy("cb"));
    // Wait until it runs: the queue is then empty.
    while !matches!(
        rx.recv_timeout(Duration::from_secs(120)).unwrap(),
        Event::Token(..)
    ) {}
    let (tx, _keep) = mpsc::sync_channel(10_000);
    // While the queue has room a job is taken whatever its size: three prompts, one place.
    let (_a, a_rx) = submit(&server, vec![short.clone(); 3], policy("cb"));
    match server.submit(vec![short.clone()], policy("cb"), Box::new(Sink(tx))) {
        Err(SubmitError::Busy { retry_after_s }) => assert!((1..=60).contains(&retry_after_s)),
        other => panic!("expected busy, got {:?}", other.map(|_| ())),
    }
    assert_eq!(server.load().waiting, 3);
    // The waiting ones run once the first is done.
    let (_, outcome) = wait(&a_rx, 3);
    assert_eq!(outcome.unwrap().report.completions.len(), 3);
    drop(server);
    thread.join().unwrap();
}

#[test]
fn a_request_that_needs_the_whole_pool_runs_again_after_its_rows_were_cached() {
    let per_token = engine().model().config.kv_bytes_per_token();
    let r = request(&chat(SYSTEM, "Name a quiet island in Greece."), 8);
    // Exactly the blocks this request needs: the second run must not be refused because the
    // cached block it copies rows from is held during admission.
    let blocks = (r.prompt.len() + 8).div_ceil(16);
    let cfg = SchedConfig {
        kv_budget_bytes: blocks * 16 * per_token,
        ..config()
    };
    let (server, thread) = Server::start(engine(), cfg).unwrap();
    for _ in 0..2 {
        let (_h, rx) = submit(&server, vec![r.clone()], policy("cb+pc"));
        let (_, outcome) = wait(&rx, 1);
        assert_eq!(outcome.unwrap().report.completions[0].tokens, alone(&r));
    }
    drop(server);
    thread.join().unwrap();
}
