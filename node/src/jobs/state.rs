//! A job's persisted state, and typed access to the store's `jobs` table.
//!
//! The store keeps each job as an opaque value under its id; this module owns the type and its
//! encoding: [`metainf_protocol::codec`], exactly as the store wrote it before it stopped naming
//! job types, so existing data directories still read.

use std::future::Future;

use metainf_protocol::{JobId, JobRequest, JobResult, PeerId, ProtocolError, codec};
use serde::{Deserialize, Serialize};
use tracing::warn;

use super::policy::RoutingPolicy;
use crate::store::{Store, StoreError};

/// Where a job stands.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Accepted, not yet running.
    Queued,
    /// Running on a host.
    Running {
        /// The host.
        host: PeerId,
    },
    /// Finished.
    Done(Box<JobResult>),
    /// Failed for good.
    Failed {
        /// Why.
        reason: String,
    },
}

/// A job the node accepted, with its state.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobEntry {
    /// What the client asked for.
    pub request: JobRequest,
    /// Where it stands.
    pub state: JobState,
    /// Last state change, Unix milliseconds.
    pub updated_at_ms: u64,
    /// The router's choice for the current attempt, with its predictions.
    pub route: Option<metainf_scheduler::Choice>,
    /// Hosts tried so far.
    pub attempts: u32,
    /// The policy it is routed by (the request's, or the node's default when it named none):
    /// a job run again after a restart keeps it. `None` in entries written before it was kept.
    pub policy: Option<RoutingPolicy>,
}

/// [`JobEntry`] as written before it kept its policy (the same fields, in the same order, less
/// the last), still read.
#[derive(Deserialize)]
struct JobEntryV1 {
    request: JobRequest,
    state: JobState,
    updated_at_ms: u64,
    route: Option<metainf_scheduler::Choice>,
    attempts: u32,
}

impl JobEntry {
    /// The value stored in the `jobs` table.
    pub fn encode(&self) -> Result<Vec<u8>, ProtocolError> {
        codec::encode(self)
    }

    /// Reads a value of the `jobs` table, of this layout or the one before it (whose bytes end
    /// where this one's policy begins, so they never decode as this one).
    pub fn decode(bytes: &[u8]) -> Result<Self, ProtocolError> {
        codec::decode(bytes).or_else(|e| match codec::decode::<JobEntryV1>(bytes) {
            Ok(v1) => Ok(Self {
                request: v1.request,
                state: v1.state,
                updated_at_ms: v1.updated_at_ms,
                route: v1.route,
                attempts: v1.attempts,
                policy: None,
            }),
            Err(_) => Err(e),
        })
    }
}

/// Logs a stored job that does not decode (it is then skipped, as the store skips its own).
fn undecodable(id: &JobId, error: &ProtocolError) {
    warn!(family = "jobs", key = %id, %error, "skipping a stored value that does not decode");
}

/// Typed access to the store's `jobs` table: the store's `*_raw` job methods, encoding and
/// decoding [`JobEntry`]s. Forgetting jobs needs no type: [`Store::delete_jobs`].
pub trait JobStore {
    /// Saves a job's state under its id, in a synced write. Blocks.
    fn put_job(&self, entry: &JobEntry) -> Result<(), StoreError>;

    /// [`JobStore::put_job`] for async callers: the write runs on tokio's blocking pool.
    fn put_job_async(&self, entry: JobEntry)
    -> impl Future<Output = Result<(), StoreError>> + Send;

    /// One job; `None` when unknown or when its stored value does not decode (logged).
    fn job(&self, id: &JobId) -> Result<Option<JobEntry>, StoreError>;

    /// Every job kept, in id order; values that do not decode are logged and skipped.
    fn jobs(&self) -> Result<Vec<JobEntry>, StoreError>;
}

impl JobStore for Store {
    fn put_job(&self, entry: &JobEntry) -> Result<(), StoreError> {
        self.put_job_raw(&entry.request.id, &entry.encode()?)
    }

    fn put_job_async(
        &self,
        entry: JobEntry,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let store = self.clone();
        async move {
            let value = entry.encode()?;
            store.put_job_raw_async(entry.request.id, value).await
        }
    }

    fn job(&self, id: &JobId) -> Result<Option<JobEntry>, StoreError> {
        Ok(self
            .job_raw(id)?
            .and_then(|value| match JobEntry::decode(&value) {
                Ok(entry) => Some(entry),
                Err(e) => {
                    undecodable(id, &e);
                    None
                }
            }))
    }

    fn jobs(&self) -> Result<Vec<JobEntry>, StoreError> {
        Ok(self
            .jobs_raw()?
            .into_iter()
            .filter_map(|(id, value)| match JobEntry::decode(&value) {
                Ok(entry) => Some(entry),
                Err(e) => {
                    undecodable(&id, &e);
                    None
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metainf_protocol::Keypair;

    fn host(seed: u8) -> PeerId {
        let mut bytes = [seed; 32];
        bytes[31] = 7;
        Keypair::ed25519_from_bytes(bytes)
            .unwrap()
            .public()
            .to_peer_id()
    }

    fn job(n: u8, state: JobState) -> JobEntry {
        JobEntry {
            request: JobRequest {
                id: JobId([n; 16]),
                model: "m".into(),
                prompts: vec![metainf_protocol::Prompt::Text("hi".into())],
                params: metainf_protocol::GenerationParams::default(),
                budget: Some(0.5),
                objective: metainf_protocol::Objective::Cost,
                pin_method: None,
                pin_host: None,
                stream: false,
                submitted_at_ms: u64::from(n),
            },
            state,
            updated_at_ms: u64::from(n),
            route: None,
            attempts: 1,
            policy: Some(RoutingPolicy::RoundRobin),
        }
    }

    #[test]
    fn entries_written_before_jobs_kept_their_policy_still_read() {
        #[derive(Serialize)]
        struct Before {
            request: JobRequest,
            state: JobState,
            updated_at_ms: u64,
            route: Option<metainf_scheduler::Choice>,
            attempts: u32,
        }
        let now = job(8, JobState::Queued);
        let before = codec::encode(&Before {
            request: now.request.clone(),
            state: now.state.clone(),
            updated_at_ms: now.updated_at_ms,
            route: None,
            attempts: now.attempts,
        })
        .unwrap();
        let read = JobEntry::decode(&before).unwrap();
        assert_eq!(read.policy, None);
        assert_eq!(
            JobEntry {
                policy: None,
                ..now.clone()
            },
            read
        );
        // Today's layout keeps the policy; a value of neither layout is still refused.
        assert_eq!(JobEntry::decode(&now.encode().unwrap()).unwrap(), now);
        let mut longer = now.encode().unwrap();
        longer.push(0);
        assert!(JobEntry::decode(&longer).is_err());
    }

    #[test]
    fn jobs_are_kept_across_reopen_and_forgotten_on_request() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path().join("store")).unwrap();
            store.put_job(&job(1, JobState::Queued)).unwrap();
            store
                .put_job(&job(2, JobState::Failed { reason: "x".into() }))
                .unwrap();
            store
                .put_job(&job(3, JobState::Running { host: host(3) }))
                .unwrap();
        }
        let store = Store::open(dir.path().join("store")).unwrap();
        assert_eq!(store.jobs().unwrap().len(), 3);
        assert_eq!(
            store.job(&JobId([3; 16])).unwrap(),
            Some(job(3, JobState::Running { host: host(3) }))
        );
        store
            .delete_jobs(&[JobId([1; 16]), JobId([2; 16])])
            .unwrap();
        let left = store.jobs().unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].request.id, JobId([3; 16]));
        assert_eq!(store.job(&JobId([1; 16])).unwrap(), None);
    }

    #[test]
    fn the_stored_value_is_the_codec_encoding_and_bad_values_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let entry = job(4, JobState::Queued);
        store.put_job(&entry).unwrap();
        // The encoding the store used when it held `JobEntry` itself.
        assert_eq!(
            store.job_raw(&entry.request.id).unwrap(),
            Some(codec::encode(&entry).unwrap())
        );
        store.put_job_raw(&JobId([5; 16]), b"\x01garbage").unwrap();
        assert_eq!(store.job(&JobId([5; 16])).unwrap(), None);
        assert_eq!(store.jobs().unwrap(), vec![entry]);
        assert_eq!(store.jobs_raw().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn async_writes_land() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        store
            .put_job_async(job(6, JobState::Failed { reason: "y".into() }))
            .await
            .unwrap();
        assert_eq!(store.jobs().unwrap().len(), 1);
        store.delete_jobs_async(vec![JobId([6; 16])]).await.unwrap();
        assert!(store.jobs().unwrap().is_empty());
    }
}
