//! The replica: this node's copy of the performance tensor, kept current from the network.
//!
//! It consumes the network's [`NetEvent`]s that concern the tensor and does all their disk work
//! off the swarm loop: gossiped records are verified on the blocking pool and stored in batches
//! through the store's group commit, and each verdict goes back to gossipsub (so nothing invalid
//! is forwarded and a record is forwarded only once it is durable); heartbeats are remembered in
//! the peers table in unsynced batches; anti-entropy requests are answered, vectors compared and
//! pulled pages verified and stored here. Every task it starts is owned by the node's tracker.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;
use metainf_protocol::{Heartbeat, SignedRecord};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::clock::now_ms;
use crate::net::{
    Client, GossipRecord, GossipVerdict, InboundJob, InboundSync, JobReply, MAX_PAGE, NetEvent,
    SyncRequest, SyncResponse,
};
use crate::store::{PeerEntry, PutOutcome, Store};

/// Gossiped records waiting to be checked; past this they are ignored (anti-entropy fetches
/// them later).
const RECORD_QUEUE: usize = 8192;
/// Records checked and stored as one batch at most.
const RECORD_BATCH: usize = 1024;
/// Sync requests answered at once; more get "busy".
const SYNC_ANSWERS: usize = 8;
/// How long heartbeats are gathered before one batch write.
const HEARTBEAT_FLUSH: Duration = Duration::from_secs(1);

/// The replica's inboxes. Cheap to clone; its tasks end when every clone is dropped.
#[derive(Clone, Debug)]
pub struct Replica {
    store: Store,
    client: Client,
    records: mpsc::Sender<GossipRecord>,
    heartbeats: mpsc::Sender<Heartbeat>,
    sync_answers: Arc<Semaphore>,
    tasks: TaskTracker,
}

impl Replica {
    /// Starts the replica's record and heartbeat writers on `tasks`.
    pub fn start(store: Store, client: Client, tasks: TaskTracker) -> Self {
        let (records, records_rx) = mpsc::channel(RECORD_QUEUE);
        let (heartbeats, heartbeats_rx) = mpsc::channel(1024);
        tasks.spawn(store_gossip(store.clone(), client.clone(), records_rx));
        tasks.spawn(remember_heartbeats(store.clone(), heartbeats_rx));
        Self {
            store,
            client,
            records,
            heartbeats,
            sync_answers: Arc::new(Semaphore::new(SYNC_ANSWERS)),
            tasks,
        }
    }

    /// Takes the events that concern the tensor without waiting; gives back the others.
    pub fn handle(&self, event: NetEvent) -> Option<NetEvent> {
        match event {
            NetEvent::Record(record) => {
                if let Err(e) = self.records.try_send(record) {
                    let record = e.into_inner();
                    let client = self.client.clone();
                    self.tasks.spawn(async move {
                        let _ = client
                            .report_record(record.ticket, GossipVerdict::Ignore)
                            .await;
                    });
                }
            }
            NetEvent::Heartbeat(heartbeat) => {
                let _ = self.heartbeats.try_send(*heartbeat);
            }
            NetEvent::SyncRequest(inbound) => match self.sync_answers.clone().try_acquire_owned() {
                Ok(permit) => {
                    let store = self.store.clone();
                    self.tasks.spawn(async move {
                        answer_sync(store, inbound).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    self.tasks.spawn(
                        inbound.respond(SyncResponse::Error("busy; ask again later".into())),
                    );
                }
            },
            NetEvent::SyncDue(peers) => {
                let (store, client) = (self.store.clone(), self.client.clone());
                self.tasks.spawn(async move {
                    if let Some(vector) = version_vector(&store).await {
                        for peer in peers {
                            let _ = client.offer_summary(peer, vector.clone()).await;
                        }
                    }
                });
            }
            NetEvent::SyncSummary { peer, vector } => {
                let (store, client) = (self.store.clone(), self.client.clone());
                self.tasks.spawn(async move {
                    let Some(ours) = version_vector(&store).await else {
                        return;
                    };
                    for (origin, theirs) in vector {
                        let have = ours.get(&origin).copied().unwrap_or(0);
                        if theirs > have {
                            let _ = client.pull(peer, origin, have).await;
                        }
                    }
                });
            }
            NetEvent::SyncPage {
                peer,
                origin,
                records,
                next_after,
            } => {
                let (store, client) = (self.store.clone(), self.client.clone());
                self.tasks.spawn(async move {
                    let next = store_page(&store, peer, origin, records, next_after).await;
                    let _ = client.page_stored(peer, origin, next).await;
                });
            }
            other => return Some(other),
        }
        None
    }
}

/// Routes the network's events until the network stops: the tensor's to the replica, job calls
/// to `jobs` (answered `Busy` when there is none or its queue is full).
pub async fn route_events(
    mut events: mpsc::Receiver<NetEvent>,
    replica: Replica,
    jobs: Option<mpsc::Sender<InboundJob>>,
) {
    while let Some(event) = events.recv().await {
        // Peers' comings and goings are left to the loop's log: nothing here acts on them yet.
        if let Some(NetEvent::Job(job)) = replica.handle(event) {
            let refused = match &jobs {
                Some(jobs) => jobs.try_send(*job).err().map(|e| e.into_inner()),
                None => Some(*job),
            };
            if let Some(job) = refused {
                replica
                    .tasks
                    .spawn(job.respond(JobReply::Busy { retry_after_s: 1 }));
            }
        }
    }
}

/// Checks and stores gossiped records in batches, then reports each verdict.
async fn store_gossip(store: Store, client: Client, mut rx: mpsc::Receiver<GossipRecord>) {
    let mut batch = Vec::with_capacity(RECORD_BATCH);
    while rx.recv_many(&mut batch, RECORD_BATCH).await > 0 {
        let received = std::mem::take(&mut batch);
        // ~50 µs of ed25519 per record: on the blocking pool, not a runtime worker.
        let checked = tokio::task::spawn_blocking(move || {
            received
                .into_iter()
                .map(|r| {
                    let verified = SignedRecord::from_wire(&r.data).and_then(SignedRecord::verify);
                    (r.ticket, verified)
                })
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        let mut verdicts = Vec::with_capacity(checked.len());
        let mut valid = Vec::new();
        let mut valid_tickets = Vec::new();
        for (ticket, verified) in checked {
            match verified {
                Ok(v) => {
                    valid.push(v);
                    valid_tickets.push(ticket);
                }
                Err(e) => {
                    debug!(error = %e, "invalid record");
                    verdicts.push((ticket, GossipVerdict::Reject));
                }
            }
        }
        if !valid.is_empty() {
            match store.put_async(valid).await {
                Ok(outcomes) => {
                    for (ticket, outcome) in valid_tickets.into_iter().zip(outcomes) {
                        let verdict = match outcome {
                            PutOutcome::Stored => GossipVerdict::Accept,
                            PutOutcome::Duplicate => GossipVerdict::Ignore,
                            PutOutcome::Conflict { .. } => GossipVerdict::Reject,
                        };
                        verdicts.push((ticket, verdict));
                    }
                }
                Err(e) => {
                    warn!(error = %e, "cannot store gossiped records; anti-entropy will retry");
                    verdicts.extend(
                        valid_tickets
                            .into_iter()
                            .map(|t| (t, GossipVerdict::Ignore)),
                    );
                }
            }
        }
        for (ticket, verdict) in verdicts {
            if client.report_record(ticket, verdict).await.is_err() {
                return;
            }
        }
    }
}

/// Writes the latest heartbeat of each peer, one unsynced batch per [`HEARTBEAT_FLUSH`]: the
/// peers table is a cache for the offline `peers` command, and losing its last second to a
/// crash costs nothing.
async fn remember_heartbeats(store: Store, mut rx: mpsc::Receiver<Heartbeat>) {
    while let Some(first) = rx.recv().await {
        tokio::time::sleep(HEARTBEAT_FLUSH).await;
        let mut latest: HashMap<PeerId, Heartbeat> = HashMap::new();
        latest.insert(first.peer, first);
        while let Ok(h) = rx.try_recv() {
            latest.insert(h.peer, h);
        }
        let now = now_ms();
        let entries: Vec<PeerEntry> = latest
            .into_values()
            .map(|h| PeerEntry {
                peer: h.peer,
                addrs: Vec::new(),
                last_seen_ms: now,
                heartbeat: Some(h),
            })
            .collect();
        if let Err(e) = store.put_peers_async(entries).await {
            warn!(error = %e, "cannot remember peers");
        }
    }
}

/// This node's version vector, read off the runtime.
async fn version_vector(store: &Store) -> Option<BTreeMap<PeerId, u64>> {
    let store = store.clone();
    match tokio::task::spawn_blocking(move || store.version_vector()).await {
        Ok(Ok(vector)) => Some(vector),
        Ok(Err(e)) => {
            warn!(error = %e, "cannot read the version vector");
            None
        }
        Err(_) => None,
    }
}

/// Answers a peer's sync request from the store, off the runtime.
async fn answer_sync(store: Store, inbound: Box<InboundSync>) {
    let request = inbound.request.clone();
    let response = tokio::task::spawn_blocking(move || match request {
        SyncRequest::Summary { .. } => match store.version_vector() {
            Ok(vector) => SyncResponse::Summary { vector },
            Err(e) => SyncResponse::Error(e.to_string()),
        },
        SyncRequest::Pull {
            origin,
            after,
            limit,
        } => {
            let limit = limit.clamp(1, MAX_PAGE) as usize;
            match store.records_after(&origin, after, limit) {
                Ok(page) => SyncResponse::Page {
                    records: page.records,
                    next_after: page.next_after,
                },
                Err(e) => SyncResponse::Error(e.to_string()),
            }
        }
    })
    .await
    .unwrap_or_else(|e| SyncResponse::Error(e.to_string()));
    inbound.respond(response).await;
}

/// Verifies and stores a pulled page; returns where the next page starts when this one was
/// whole and there is more.
async fn store_page(
    store: &Store,
    peer: PeerId,
    origin: PeerId,
    records: Vec<SignedRecord>,
    next_after: Option<u64>,
) -> Option<u64> {
    let checked = tokio::task::spawn_blocking(move || {
        let mut verified = Vec::with_capacity(records.len());
        let mut rejected = 0usize;
        for r in records {
            match r.verify() {
                Ok(v) if v.origin() == origin => verified.push(v),
                _ => rejected += 1,
            }
        }
        (verified, rejected)
    })
    .await;
    let (verified, rejected) = checked.unwrap_or_default();
    if rejected > 0 {
        warn!(%peer, rejected, "sync page held invalid records");
    }
    let ok = !verified.is_empty() && store.put_async(verified).await.is_ok();
    if ok && rejected == 0 {
        next_after
    } else {
        None
    }
}
