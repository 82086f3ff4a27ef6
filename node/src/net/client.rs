//! [`Client`]: the cloneable handle through which the rest of the node drives the network. Each
//! method sends one [`Command`] over a bounded channel to the event loop, most with a oneshot
//! for the answer.

use std::collections::HashSet;

use libp2p::request_response::ResponseChannel;
use libp2p::{Multiaddr, PeerId};
use metainf_protocol::{Heartbeat, JobId, ModelId, VerifiedRecord};
use tokio::sync::{mpsc, oneshot, watch};

use super::config::NetError;
use super::event::{GossipTicket, GossipVerdict, NatStatus, Offer, PeerStatus, Topic};
use super::jobs::{DeltaAck, JobCall, JobDelta, JobReply};
use super::sync::{SyncRequest, SyncResponse};

/// Commands from [`Client`] (and from tasks the loop spawned) to the event loop.
#[derive(Debug)]
pub(crate) enum Command {
    Gossip {
        topic: Topic,
        bytes: Vec<u8>,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    PublishBytes {
        topic: Topic,
        bytes: Vec<u8>,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    ReportRecord {
        ticket: GossipTicket,
        verdict: GossipVerdict,
    },
    Peers {
        reply: oneshot::Sender<Vec<PeerStatus>>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    AddExternalAddress {
        addr: Multiaddr,
    },
    NatStatus {
        reply: oneshot::Sender<NatStatus>,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    Provide {
        model: ModelId,
        reply: oneshot::Sender<Result<(), NetError>>,
    },
    FindProviders {
        model: ModelId,
        reply: oneshot::Sender<HashSet<PeerId>>,
    },
    SyncNow,
    Counters {
        reply: oneshot::Sender<super::NetCounters>,
    },
    QueryState {
        peer: PeerId,
        reply: super::state::StateAnswer,
    },
    SyncCall {
        peer: PeerId,
        request: Box<SyncRequest>,
        reply: oneshot::Sender<Result<SyncResponse, NetError>>,
    },
    Ban {
        peer: PeerId,
    },
    AbandonJob {
        peer: PeerId,
        job: JobId,
    },
    Pull {
        peer: PeerId,
        origin: PeerId,
        after: u64,
    },
    PageStored {
        peer: PeerId,
        origin: PeerId,
        next_after: Option<u64>,
    },
    RespondSync {
        channel: ResponseChannel<SyncResponse>,
        response: Box<SyncResponse>,
    },
    SetOffer {
        offer: watch::Receiver<Offer>,
    },
    SetRecordsSeq {
        seq: watch::Receiver<u64>,
    },
    CallJob {
        peer: PeerId,
        call: Box<JobCall>,
        deltas: Option<mpsc::Sender<JobDelta>>,
        reply: oneshot::Sender<Result<JobReply, NetError>>,
    },
    RespondJob {
        channel: ResponseChannel<JobReply>,
        reply: Box<JobReply>,
    },
    SendDelta {
        peer: PeerId,
        delta: JobDelta,
        reply: oneshot::Sender<Result<DeltaAck, NetError>>,
    },
    RespondDelta {
        channel: ResponseChannel<DeltaAck>,
        ack: DeltaAck,
    },
}

/// A cloneable handle to the network.
#[derive(Clone, Debug)]
pub struct Client {
    pub(super) tx: mpsc::Sender<Command>,
    pub(super) peer_id: PeerId,
}

impl Client {
    /// This node's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NetError> {
        let (reply, rx) = oneshot::channel();
        self.send(make(reply)).await?;
        rx.await.map_err(|_| NetError::Closed)
    }

    async fn send(&self, command: Command) -> Result<(), NetError> {
        self.tx.send(command).await.map_err(|_| NetError::Closed)
    }

    /// Gossips a record this node made and already stored. Having no peers yet is not an error:
    /// anti-entropy spreads the record when they come.
    pub async fn gossip(&self, record: &VerifiedRecord) -> Result<(), NetError> {
        let bytes = record
            .signed()
            .to_wire()
            .map_err(|e| NetError::Publish(e.to_string()))?;
        self.ask(|reply| Command::Gossip {
            topic: Topic::Records,
            bytes,
            reply,
        })
        .await?
    }

    /// Gossips raw bytes on the records topic without any local check: peers validate what
    /// they receive. For tests of that validation and for tools that relay records.
    #[doc(hidden)]
    pub async fn publish_bytes(&self, bytes: Vec<u8>) -> Result<(), NetError> {
        self.publish_raw(Topic::Records, bytes).await
    }

    /// Gossips raw bytes on `topic` without any local check (tests of validation and load).
    #[doc(hidden)]
    pub async fn publish_raw(&self, topic: Topic, bytes: Vec<u8>) -> Result<(), NetError> {
        self.ask(|reply| Command::PublishBytes {
            topic,
            bytes,
            reply,
        })
        .await?
    }

    /// Reports the verdict on a gossiped record ([`super::NetEvent::Record`]): accepted
    /// records are forwarded, rejected ones count against the sender.
    pub async fn report_record(
        &self,
        ticket: GossipTicket,
        verdict: GossipVerdict,
    ) -> Result<(), NetError> {
        self.send(Command::ReportRecord { ticket, verdict }).await
    }

    /// Every peer known, with liveness.
    pub async fn peers(&self) -> Result<Vec<PeerStatus>, NetError> {
        self.ask(|reply| Command::Peers { reply }).await
    }

    /// Addresses the node listens on.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NetError> {
        self.ask(|reply| Command::ListenAddrs { reply }).await
    }

    /// What AutoNAT concluded about this node's reachability.
    pub async fn nat_status(&self) -> Result<NatStatus, NetError> {
        self.ask(|reply| Command::NatStatus { reply }).await
    }

    /// Declares an address at which others can reach this node.
    pub async fn add_external_address(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.send(Command::AddExternalAddress { addr }).await
    }

    /// Dials an address.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NetError> {
        self.ask(|reply| Command::Dial { addr, reply }).await?
    }

    /// Announces in the DHT that this node serves `model`.
    pub async fn provide_model(&self, model: ModelId) -> Result<(), NetError> {
        self.ask(|reply| Command::Provide { model, reply }).await?
    }

    /// Peers that announced serving `model`.
    pub async fn find_providers(&self, model: ModelId) -> Result<HashSet<PeerId>, NetError> {
        self.ask(|reply| Command::FindProviders { model, reply })
            .await
    }

    /// Starts an anti-entropy round with every connected peer now.
    pub async fn sync_now(&self) -> Result<(), NetError> {
        self.send(Command::SyncNow).await
    }

    /// What the transport has done since it started (heartbeats taken in, connections
    /// opened and closed, queries sent and answered).
    pub async fn counters(&self) -> Result<super::NetCounters, NetError> {
        self.ask(|reply| Command::Counters { reply }).await
    }

    /// Heartbeats this node took in (from gossip and state answers) since it started.
    pub async fn heartbeats_received(&self) -> Result<u64, NetError> {
        Ok(self.counters().await?.heartbeats_received)
    }

    /// Asks `peer` for its state now (`/metainf/state/1`): its heartbeat as of the answer,
    /// checked, and kept as its state where newer.
    pub async fn query_state(&self, peer: PeerId) -> Result<Heartbeat, NetError> {
        self.ask(|reply| Command::QueryState { peer, reply })
            .await?
    }

    /// Sends a sync request (digests, a summary page, evidence) and waits for the answer.
    /// Pulls of records go through [`Client::pull`], which keeps them flow-controlled. A peer
    /// distrusted for broken promises is not asked ([`NetError::Peer`]).
    pub async fn sync_call(
        &self,
        peer: PeerId,
        request: SyncRequest,
    ) -> Result<SyncResponse, NetError> {
        self.ask(|reply| Command::SyncCall {
            peer,
            request: Box::new(request),
            reply,
        })
        .await?
    }

    /// Gossips a proof of equivocation this node verified and stored.
    /// Having no peers is not an error: anti-entropy spreads it when they come.
    pub async fn gossip_evidence(&self, bytes: Vec<u8>) -> Result<(), NetError> {
        self.ask(|reply| Command::Gossip {
            topic: Topic::Evidence,
            bytes,
            reply,
        })
        .await?
    }

    /// Bans a peer convicted of equivocation (see [`super`]'s docs). Banning oneself is a
    /// no-op.
    pub async fn ban(&self, peer: PeerId) -> Result<(), NetError> {
        self.send(Command::Ban { peer }).await
    }

    /// Pulls `origin`'s records after `after` from `peer`, a page at a time
    /// ([`super::NetEvent::SyncPage`]); one pull per origin at a time, a few in flight.
    pub async fn pull(&self, peer: PeerId, origin: PeerId, after: u64) -> Result<(), NetError> {
        self.send(Command::Pull {
            peer,
            origin,
            after,
        })
        .await
    }

    /// Reports that a pulled page was handled; `next_after` (when the page was stored whole
    /// and there is more) asks for the next one.
    pub async fn page_stored(
        &self,
        peer: PeerId,
        origin: PeerId,
        next_after: Option<u64>,
    ) -> Result<(), NetError> {
        self.send(Command::PageStored {
            peer,
            origin,
            next_after,
        })
        .await
    }

    /// Announces in every heartbeat what `offer` holds at the time.
    pub async fn set_offer(&self, offer: watch::Receiver<Offer>) -> Result<(), NetError> {
        self.send(Command::SetOffer { offer }).await
    }

    /// Announces in every heartbeat the highest sequence number of this node's own records.
    pub async fn set_records_seq(&self, seq: watch::Receiver<u64>) -> Result<(), NetError> {
        self.send(Command::SetRecordsSeq { seq }).await
    }

    /// Runs a job on `peer` and waits for its answer; text deltas of a streaming job go to
    /// `deltas`. Fails with [`NetError::Peer`] when the peer cannot be reached or the
    /// connection closes before the answer.
    pub async fn call_job(
        &self,
        peer: PeerId,
        call: JobCall,
        deltas: Option<mpsc::Sender<JobDelta>>,
    ) -> Result<JobReply, NetError> {
        self.ask(|reply| Command::CallJob {
            peer,
            call: Box::new(call),
            deltas,
            reply,
        })
        .await?
    }

    /// Gives up on a job call to `peer` (it timed out): a late answer is dropped, and the host
    /// is told to stop at its next delta.
    pub async fn abandon_job(&self, peer: PeerId, job: JobId) -> Result<(), NetError> {
        self.send(Command::AbandonJob { peer, job }).await
    }

    /// Sends a text delta of a streaming job back to the node that forwarded it, and waits
    /// for its acknowledgement.
    pub async fn send_delta(&self, peer: PeerId, delta: JobDelta) -> Result<DeltaAck, NetError> {
        self.ask(|reply| Command::SendDelta { peer, delta, reply })
            .await?
    }
}
