//! The replica: this node's copy of the performance tensor, kept current from the network.
//!
//! It consumes the network's [`NetEvent`]s that concern the tensor and does all their disk work
//! off the swarm loop: gossiped records are verified on the blocking pool and stored in batches
//! through the store's group commit, and each verdict goes back to gossipsub (so nothing invalid
//! is forwarded and a record is forwarded only once it is durable); heartbeats are remembered in
//! the peers table in unsynced batches; anti-entropy requests are answered, vectors compared and
//! pulled pages verified and stored here. Every task it starts is owned by the node's tracker.
//!
//! Equivocation: a record that conflicts with a stored one (same origin and seq, different
//! content) is proof that its origin lies. The two records are stored as evidence, the origin's
//! records are deleted and its later ones refused, the proof is gossiped and served to peers
//! whose convicted sets differ, and the network layer bans the origin. The relay that forwarded
//! the conflicting record is not penalised: it may not have seen the other version.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use libp2p::PeerId;
use metainf_protocol::{Equivocation, Heartbeat, SignedRecord, VerifiedEquivocation};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::clock::now_ms;
use crate::net::{
    Client, GossipRecord, GossipVerdict, InboundJob, InboundSync, JobReply, MAX_EVIDENCE_PAGE,
    MAX_PAGE, MAX_SUMMARY, NetEvent, SUMMARY_BUCKETS, SyncRequest, SyncResponse, bucket_digests,
    bucket_of, convicted_digest, summary_page,
};
use crate::store::{PeerEntry, PutOutcome, PutReport, Store};

/// Gossiped records waiting to be checked; past this they are ignored (anti-entropy fetches
/// them later).
const RECORD_QUEUE: usize = 8192;
/// Records checked and stored as one batch at most.
const RECORD_BATCH: usize = 1024;
/// Sync requests answered at once; more get "busy".
const SYNC_ANSWERS: usize = 8;
/// Rounds of anti-entropy (one per peer) run at once.
const SYNC_ROUNDS: usize = 4;
/// Longest one round with one peer may take.
const SYNC_ROUND_LIMIT: Duration = Duration::from_secs(120);
/// Most summary pages asked of one peer per bucket per round (at [`MAX_SUMMARY`] entries each,
/// 16 million origins in all).
const MAX_SUMMARY_PAGES: usize = 16;
/// Most pages of proofs asked of one peer per round.
const MAX_EVIDENCE_PAGES: usize = 64;
/// Gossiped proofs of equivocation waiting to be checked; past this they are ignored.
const EVIDENCE_QUEUE: usize = 64;
/// Peers not heard from for this long are forgotten by the peers table.
const PEER_TABLE_TTL_MS: u64 = 7 * 24 * 3600 * 1000;
/// How often the peers table is pruned.
const PEER_TABLE_PRUNE: Duration = Duration::from_secs(3600);
/// How long heartbeats are gathered before one batch write.
const HEARTBEAT_FLUSH: Duration = Duration::from_secs(1);

/// The replica's inboxes. Cheap to clone; its tasks end when every clone is dropped.
#[derive(Clone, Debug)]
pub struct Replica {
    store: Store,
    client: Client,
    records: mpsc::Sender<GossipRecord>,
    evidence: mpsc::Sender<GossipRecord>,
    heartbeats: mpsc::Sender<Heartbeat>,
    sync_answers: Arc<Semaphore>,
    /// Rounds of anti-entropy run at once.
    sync_rounds: Arc<Semaphore>,
    /// Peers with a round running.
    syncing: Arc<std::sync::Mutex<HashSet<PeerId>>>,
    /// What anti-entropy remembers between rounds.
    memory: Arc<RoundMemory>,
    tasks: TaskTracker,
}

impl Replica {
    /// Starts the replica's record and heartbeat writers on `tasks`.
    pub fn start(store: Store, client: Client, tasks: TaskTracker) -> Self {
        let (records, records_rx) = mpsc::channel(RECORD_QUEUE);
        let (heartbeats, heartbeats_rx) = mpsc::channel(1024);
        let (evidence, evidence_rx) = mpsc::channel(EVIDENCE_QUEUE);
        tasks.spawn(store_gossip(store.clone(), client.clone(), records_rx));
        tasks.spawn(store_gossiped_evidence(
            store.clone(),
            client.clone(),
            evidence_rx,
        ));
        tasks.spawn(remember_heartbeats(store.clone(), heartbeats_rx));
        Self {
            store,
            client,
            records,
            evidence,
            heartbeats,
            sync_answers: Arc::new(Semaphore::new(SYNC_ANSWERS)),
            sync_rounds: Arc::new(Semaphore::new(SYNC_ROUNDS)),
            syncing: Arc::new(std::sync::Mutex::new(HashSet::new())),
            memory: Arc::new(RoundMemory::default()),
            tasks,
        }
    }

    /// Queues a gossiped message for its checker; when the queue is full it is ignored (neither
    /// forwarded nor held against its sender; anti-entropy fetches it later).
    fn check_later(&self, queue: &mpsc::Sender<GossipRecord>, message: GossipRecord) {
        if let Err(e) = queue.try_send(message) {
            let message = e.into_inner();
            let client = self.client.clone();
            self.tasks.spawn(async move {
                let _ = client
                    .report_record(message.ticket, GossipVerdict::Ignore)
                    .await;
            });
        }
    }

    /// Takes the events that concern the tensor without waiting; gives back the others.
    pub fn handle(&self, event: NetEvent) -> Option<NetEvent> {
        match event {
            NetEvent::Record(record) => self.check_later(&self.records, record),
            NetEvent::Evidence(proof) => self.check_later(&self.evidence, proof),
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
                for peer in peers {
                    // One round per peer at a time; a few peers at once.
                    let Ok(mut syncing) = self.syncing.lock() else {
                        return None;
                    };
                    if !syncing.insert(peer) {
                        continue;
                    }
                    drop(syncing);
                    let (store, client) = (self.store.clone(), self.client.clone());
                    let (rounds, syncing) = (self.sync_rounds.clone(), Arc::clone(&self.syncing));
                    let memory = Arc::clone(&self.memory);
                    self.tasks.spawn(async move {
                        if let Ok(_permit) = rounds.acquire_owned().await {
                            // A slow or stalling peer holds a round slot for this long at most.
                            let round = sync_with(&store, &client, peer, &memory);
                            if tokio::time::timeout(SYNC_ROUND_LIMIT, round).await.is_err() {
                                debug!(%peer, "a sync round ran past its limit");
                            }
                        }
                        if let Ok(mut s) = syncing.lock() {
                            s.remove(&peer);
                        }
                    });
                }
            }
            NetEvent::SyncPage {
                peer,
                origin,
                records,
                next_after,
            } => {
                let (store, client) = (self.store.clone(), self.client.clone());
                self.tasks.spawn(async move {
                    let next = store_page(&store, &client, peer, origin, records, next_after).await;
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
            match store.put_convicting_async(valid).await {
                Ok(PutReport {
                    outcomes,
                    convicted,
                }) => {
                    for (ticket, outcome) in valid_tickets.into_iter().zip(outcomes) {
                        let verdict = match outcome {
                            PutOutcome::Stored => GossipVerdict::Accept,
                            // A conflicting record convicts its origin, not the relay, which
                            // may not have seen the other version: not forwarded, not held
                            // against it.
                            PutOutcome::Duplicate
                            | PutOutcome::Conflict { .. }
                            | PutOutcome::Convicted => GossipVerdict::Ignore,
                        };
                        verdicts.push((ticket, verdict));
                    }
                    announce_convictions(&client, convicted).await;
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
    let mut pruned_at: Option<std::time::Instant> = None;
    while let Some(first) = rx.recv().await {
        if pruned_at.is_none_or(|t| t.elapsed() >= PEER_TABLE_PRUNE) {
            pruned_at = Some(std::time::Instant::now());
            let (store, before) = (store.clone(), now_ms().saturating_sub(PEER_TABLE_TTL_MS));
            match tokio::task::spawn_blocking(move || store.prune_peers(before)).await {
                Ok(Ok(n)) if n > 0 => debug!(forgotten = n, "pruned the peers table"),
                Ok(Err(e)) => warn!(error = %e, "cannot prune the peers table"),
                _ => {}
            }
        }
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

/// Bans the origins just convicted and gossips their proofs.
async fn announce_convictions(client: &Client, convicted: Vec<VerifiedEquivocation>) {
    for proof in convicted {
        let _ = client.ban(proof.origin()).await;
        match proof.to_wire() {
            Ok(bytes) => {
                if let Err(e) = client.gossip_evidence(bytes).await {
                    debug!(error = %e, "cannot gossip a proof; anti-entropy spreads it");
                }
            }
            Err(e) => warn!(error = %e, "cannot encode a proof of equivocation"),
        }
    }
}

/// Checks gossiped proofs of equivocation one at a time (two signatures each) and convicts
/// their origins; forwards the new ones, ignores known ones, rejects invalid ones (a relay
/// forwards a proof only after checking it, so an invalid one is its sender's fault).
async fn store_gossiped_evidence(
    store: Store,
    client: Client,
    mut rx: mpsc::Receiver<GossipRecord>,
) {
    while let Some(proof) = rx.recv().await {
        let GossipRecord { data, ticket } = proof;
        let checked = tokio::task::spawn_blocking(move || {
            Equivocation::from_wire(&data).and_then(Equivocation::verify)
        })
        .await;
        let Ok(checked) = checked else { continue };
        let verdict = match checked {
            Ok(proof) => {
                let origin = proof.origin();
                match store.convict_async(proof).await {
                    Ok(true) => {
                        warn!(%origin, "origin convicted of equivocation by a proof from the network");
                        let _ = client.ban(origin).await;
                        GossipVerdict::Accept
                    }
                    Ok(false) => GossipVerdict::Ignore,
                    Err(e) => {
                        warn!(error = %e, "cannot store a proof of equivocation");
                        GossipVerdict::Ignore
                    }
                }
            }
            Err(e) => {
                debug!(error = %e, "invalid proof of equivocation");
                GossipVerdict::Reject
            }
        };
        if client.report_record(ticket, verdict).await.is_err() {
            return;
        }
    }
}

/// Verifies and stores a page of proofs pulled from `peer`; `false` when one was invalid.
async fn store_evidence(
    store: &Store,
    client: &Client,
    peer: PeerId,
    proofs: Vec<Equivocation>,
) -> bool {
    // Proofs of origins convicted already are skipped before their signatures are checked.
    let known = convicted(store).await.unwrap_or_default();
    let checked = tokio::task::spawn_blocking(move || {
        proofs
            .into_iter()
            .filter(|p| !known.contains(&p.first.record.origin))
            .map(Equivocation::verify)
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    let mut all_valid = true;
    for proof in checked {
        match proof {
            Ok(proof) => {
                let origin = proof.origin();
                match store.convict_async(proof).await {
                    Ok(true) => {
                        warn!(%origin, %peer, "origin convicted of equivocation by a proof from a peer");
                        let _ = client.ban(origin).await;
                    }
                    Ok(false) => {}
                    Err(e) => {
                        warn!(error = %e, "cannot store a proof of equivocation");
                        return false;
                    }
                }
            }
            Err(e) => {
                warn!(%peer, error = %e, "a peer served an invalid proof of equivocation");
                all_valid = false;
            }
        }
    }
    all_valid
}

/// One round of anti-entropy with `peer`: compares version vectors by bucket digest, pages
/// through the buckets that differ and queues pulls of what `peer` has and this node lacks,
/// then fetches the proofs of equivocation it lacks. Every answer is checked before it is used;
/// the first one that is wrong ends the round.
async fn sync_with(store: &Store, client: &Client, peer: PeerId, memory: &RoundMemory) {
    let ours = {
        let store = store.clone();
        match tokio::task::spawn_blocking(move || store.version_chains()).await {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => return warn!(error = %e, "cannot read the version vector"),
            Err(_) => return,
        }
    };
    let convicted = convicted(store).await.unwrap_or_default();
    let theirs = match client.sync_call(peer, SyncRequest::Digests).await {
        Ok(SyncResponse::Digests(d)) if d.len() == SUMMARY_BUCKETS => d,
        Ok(SyncResponse::Error(e)) => {
            return debug!(%peer, error = %e, "peer could not send its digests");
        }
        Ok(_) => return warn!(%peer, "peer answered digests with something else"),
        Err(e) => return debug!(%peer, error = %e, "no digests from peer"),
    };
    let mine = bucket_digests(&ours);
    for (b, (m, t)) in mine.iter().zip(&theirs).enumerate() {
        if m == t {
            continue;
        }
        let Ok(bucket) = u8::try_from(b) else { break };
        let mut after: Option<PeerId> = None;
        for _ in 0..MAX_SUMMARY_PAGES {
            let (vector, next) = match client
                .sync_call(peer, SyncRequest::Summary { bucket, after })
                .await
            {
                Ok(SyncResponse::Summary { vector, next_after }) => (vector, next_after),
                Ok(_) => return warn!(%peer, "peer answered a summary with something else"),
                Err(e) => return debug!(%peer, error = %e, "no summary from peer"),
            };
            let honest = vector.len() <= MAX_SUMMARY
                && vector
                    .keys()
                    .all(|o| bucket_of(o) == bucket && after.is_none_or(|a| *o > a));
            if !honest {
                return warn!(%peer, bucket, "peer sent a summary page outside what was asked");
            }
            for (origin, (seq, chain)) in vector {
                if convicted.contains(&origin) {
                    continue;
                }
                let (have, our_chain) = ours
                    .get(&origin)
                    .copied()
                    .unwrap_or((0, metainf_protocol::ContentId([0; 32])));
                if seq > have {
                    let _ = client.pull(peer, origin, have).await;
                } else if seq == have && seq > 0 && chain != our_chain && memory.due(peer, origin) {
                    // The same records counted, different records held: one of them is a
                    // second version. Pulling all of them finds it (and convicts its origin).
                    let _ = client.pull(peer, origin, 0).await;
                }
            }
            match next {
                Some(n) if after.is_none_or(|a| n > a) => after = Some(n),
                _ => break,
            }
        }
    }
    let digest = convicted_digest(&convicted);
    // A set larger than one round's pages is fetched over several rounds: each resumes where
    // the last one stopped.
    let mut after: Option<PeerId> = memory.cursor(peer);
    let mut finished = false;
    for _ in 0..MAX_EVIDENCE_PAGES {
        let (proofs, next) = match client
            .sync_call(peer, SyncRequest::Evidence { digest, after })
            .await
        {
            Ok(SyncResponse::Evidence { proofs, next_after }) => (proofs, next_after),
            Ok(_) => return warn!(%peer, "peer answered evidence with something else"),
            Err(e) => return debug!(%peer, error = %e, "no evidence from peer"),
        };
        if proofs.len() > MAX_EVIDENCE_PAGE {
            return warn!(%peer, "peer sent an oversized page of evidence");
        }
        // A page with a bad proof ends the exchange with that peer for this round.
        if !store_evidence(store, client, peer, proofs).await {
            return;
        }
        match next {
            Some(n) if after.is_none_or(|a| n > a) => after = Some(n),
            _ => {
                finished = true;
                break;
            }
        }
    }
    memory.set_cursor(peer, if finished { None } else { after });
}

/// The origins this node convicted, read off the runtime.
async fn convicted(store: &Store) -> Option<std::collections::HashSet<PeerId>> {
    let store = store.clone();
    match tokio::task::spawn_blocking(move || store.convicted()).await {
        Ok(Ok(set)) => Some(set),
        Ok(Err(e)) => {
            warn!(error = %e, "cannot read the convicted origins");
            None
        }
        Err(_) => None,
    }
}

/// What anti-entropy remembers between rounds: when each (peer, origin) was last pulled whole
/// because the chains differed (at most once an hour, so a peer that fakes chains cannot make
/// this node verify an origin's records every round), and per peer where the last exchange of
/// proofs stopped.
#[derive(Debug, Default)]
struct RoundMemory {
    fork_pulls: std::sync::Mutex<HashMap<(PeerId, PeerId), std::time::Instant>>,
    evidence_cursors: std::sync::Mutex<HashMap<PeerId, PeerId>>,
}

impl RoundMemory {
    fn cursor(&self, peer: PeerId) -> Option<PeerId> {
        self.evidence_cursors.lock().ok()?.get(&peer).copied()
    }

    fn set_cursor(&self, peer: PeerId, after: Option<PeerId>) {
        let Ok(mut cursors) = self.evidence_cursors.lock() else {
            return;
        };
        match after {
            Some(a) if cursors.len() < Self::MAX || cursors.contains_key(&peer) => {
                cursors.insert(peer, a);
            }
            _ => {
                cursors.remove(&peer);
            }
        }
    }

    const EVERY: Duration = Duration::from_secs(3600);
    const MAX: usize = 65_536;

    fn due(&self, peer: PeerId, origin: PeerId) -> bool {
        let Ok(mut last) = self.fork_pulls.lock() else {
            return false;
        };
        if last.len() >= Self::MAX {
            last.retain(|_, t| t.elapsed() < Self::EVERY);
            if last.len() >= Self::MAX {
                // Full of recent ones: no more whole pulls until some expire.
                return false;
            }
        }
        match last.get(&(peer, origin)) {
            Some(t) if t.elapsed() < Self::EVERY => false,
            _ => {
                last.insert((peer, origin), std::time::Instant::now());
                true
            }
        }
    }
}

/// Answers a peer's sync request from the store, off the runtime.
async fn answer_sync(store: Store, inbound: Box<InboundSync>) {
    let request = inbound.request.clone();
    let response = tokio::task::spawn_blocking(move || match request {
        SyncRequest::Digests => match store.version_chains() {
            Ok(vector) => SyncResponse::Digests(bucket_digests(&vector)),
            Err(e) => SyncResponse::Error(e.to_string()),
        },
        SyncRequest::Summary { bucket, after } => match store.version_chains() {
            Ok(vector) => {
                let (vector, next_after) = summary_page(&vector, bucket, after);
                SyncResponse::Summary { vector, next_after }
            }
            Err(e) => SyncResponse::Error(e.to_string()),
        },
        SyncRequest::Evidence { digest, after } => match store.evidence() {
            Ok(proofs) => {
                if after.is_none() && convicted_digest(proofs.keys()) == digest {
                    SyncResponse::Evidence {
                        proofs: Vec::new(),
                        next_after: None,
                    }
                } else {
                    let mut rest = proofs
                        .into_iter()
                        .filter(|(origin, _)| after.is_none_or(|a| *origin > a));
                    let page: Vec<(PeerId, Equivocation)> =
                        rest.by_ref().take(MAX_EVIDENCE_PAGE).collect();
                    let next_after = match rest.next() {
                        Some(_) => page.last().map(|(o, _)| *o),
                        None => None,
                    };
                    SyncResponse::Evidence {
                        proofs: page.into_iter().map(|(_, p)| p).collect(),
                        next_after,
                    }
                }
            }
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
    client: &Client,
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
    if verified.is_empty() {
        return None;
    }
    let Ok(PutReport {
        outcomes,
        convicted,
    }) = store.put_convicting_async(verified).await
    else {
        return None;
    };
    // Pulling stops at a conviction: the origin's records are not wanted any more.
    let clean = convicted.is_empty()
        && outcomes
            .iter()
            .all(|o| matches!(o, PutOutcome::Stored | PutOutcome::Duplicate));
    announce_convictions(client, convicted).await;
    if clean && rejected == 0 {
        next_after
    } else {
        None
    }
}
