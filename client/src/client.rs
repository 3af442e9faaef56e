//! [`HavenClient`]: the async SDK. It sends each request to the node it believes is the leader
//! (any node for reads of local status), follows `NotLeader` hints, and retries on other nodes
//! while the deadline allows — but only when the failure proves the request was not applied.
//! A write whose outcome is unknown is reported as [`ClientError::Indeterminate`], never retried
//! blindly.
//!
//! A request that gets no reply for a while (its node may have died without closing the
//! connection) is watched as [`crate::stall`] describes: the client asks the members who leads,
//! and once another member is shown to lead in a newer term it stops waiting, points its leader
//! hint at the new leader and, if the stalled node has stopped answering too, closes its
//! connection so no later request reuses it. The stalled request is then handled
//! like a request whose outcome is unknown, except that only a request that changes nothing is
//! re-sent: a stalled write is `Indeterminate` even when idempotent (see [`HavenClient::call`]).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};

use haven_proto::{
    ActorAddr, ActorMessage, ActorReply, Body, Caller, CatalogQuery, CertificateInfo, ClientCommand, ClientRequest,
    ClientResponse, CommandOutcome, Envelope, ErrorCode, HostRecord, MemberSpec, NodeId, NodeStatus, QueryResult,
};

use crate::config::ClusterConfig;
use crate::error::ClientError;
use crate::stall::{LeaderReport, Moved, StallPolicy, StallWatch};
use crate::wire::{self, client_endpoint, Connector, WireIoError};

/// Longest a single attempt at one node may take before we consider it failed.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// QUIC application close code of a connection the client gave up on because its peer stalled
/// while another member leads in a newer term (the node logs it; nothing else reads it).
const STALLED_CLOSE_CODE: u32 = 0x5741;

/// An async client for a Haven cluster. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct HavenClient {
    connector: Connector,
    nodes: Arc<Mutex<Vec<SocketAddr>>>,
    /// The node that last answered a leader-only request (the leader, or a follower that
    /// forwards to it); requests go there first.
    leader: Arc<Mutex<Option<SocketAddr>>>,
    /// Where the rotation over `nodes` continues, shared by all calls so that one dead node is
    /// not every call's first try.
    rotation: Arc<std::sync::atomic::AtomicUsize>,
    deadline: Duration,
    stall: StallPolicy,
    /// Bounds the `Status` probes in flight across all stalled requests of this client.
    probe_permits: Arc<tokio::sync::Semaphore>,
    counters: Arc<StallCounters>,
}

/// What the stall watch has done since the client was created (clones share the counts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StallStats {
    /// Requests that went unanswered for [`StallPolicy::stall_after`] and were watched.
    pub stalled_requests: u64,
    /// `Status` probes sent for them (to the stalled node and to the other members).
    pub probes_sent: u64,
    /// Stalled requests given up on because another member was shown to lead in a newer term;
    /// each moved the leader hint to that member.
    pub leader_moves: u64,
}

#[derive(Default)]
struct StallCounters {
    stalled_requests: AtomicU64,
    probes_sent: AtomicU64,
    leader_moves: AtomicU64,
}

impl HavenClient {
    /// Build a client for the cluster described by `config`. No connection is made yet.
    pub fn new(config: &ClusterConfig) -> Result<Self, ClientError> {
        let tls = config.tls()?;
        let endpoint = client_endpoint(&tls)?;
        Ok(Self {
            connector: Connector::new(endpoint, Duration::from_millis(500), Duration::from_millis(500)),
            nodes: Arc::new(Mutex::new(config.nodes.clone())),
            leader: Arc::new(Mutex::new(None)),
            rotation: Arc::default(),
            deadline: Duration::from_millis(config.deadline_ms),
            stall: StallPolicy::default(),
            probe_permits: Arc::new(tokio::sync::Semaphore::new(StallPolicy::default().max_probes_in_flight)),
            counters: Arc::default(),
        })
    }

    /// Change how stalled requests are watched ([`StallPolicy::disabled`] turns it off).
    pub fn with_stall_policy(mut self, policy: StallPolicy) -> Self {
        self.stall = policy;
        self.probe_permits = Arc::new(tokio::sync::Semaphore::new(policy.max_probes_in_flight));
        self
    }

    /// What the stall watch has done so far.
    pub fn stall_stats(&self) -> StallStats {
        let c = &self.counters;
        StallStats {
            stalled_requests: c.stalled_requests.load(Ordering::Relaxed),
            probes_sent: c.probes_sent.load(Ordering::Relaxed),
            leader_moves: c.leader_moves.load(Ordering::Relaxed),
        }
    }

    /// Where leader-only requests go first: the node that last answered one, or the leader a
    /// `NotLeader` reply or a stall probe named. `None` until learned, and after that node failed.
    pub fn leader_hint(&self) -> Option<SocketAddr> {
        *self.leader.lock().expect("leader lock")
    }

    /// Change the per-request deadline (including retries).
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// The per-request deadline (including retries).
    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// Send one request to one node, without retries, redirects or stall watching.
    pub async fn call_node(&self, addr: SocketAddr, request: ClientRequest) -> Result<ClientResponse, ClientError> {
        self.attempt(addr, &request, self.deadline, Stalls::Wait).await.map_err(|f| f.into_error())
    }

    /// This node's status.
    pub async fn status_of(&self, addr: SocketAddr) -> Result<NodeStatus, ClientError> {
        match self.call_node(addr, ClientRequest::Status).await? {
            ClientResponse::Status(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// Who the cluster sees this client as: the identity and role its certificate carries.
    pub async fn whoami(&self) -> Result<Caller, ClientError> {
        match self.call(ClientRequest::WhoAmI).await? {
            ClientResponse::Identity(c) => Ok(c),
            other => Err(unexpected(&other)),
        }
    }

    /// The certificates the node at `addr` serves with: its own and the cluster CA's.
    pub async fn certificates_of(&self, addr: SocketAddr) -> Result<Vec<CertificateInfo>, ClientError> {
        match self.call_node(addr, ClientRequest::Certificates).await? {
            ClientResponse::Certificates(c) => Ok(c),
            other => Err(unexpected(&other)),
        }
    }

    /// Status from the first node that answers.
    pub async fn status(&self) -> Result<NodeStatus, ClientError> {
        match self.call(ClientRequest::Status).await? {
            ClientResponse::Status(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// The leader's status (with replication progress per member).
    pub async fn leader_status(&self) -> Result<NodeStatus, ClientError> {
        match self.call(ClientRequest::LeaderStatus).await? {
            ClientResponse::Status(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// Apply a catalog command; returns the log index and the outcome.
    pub async fn write(&self, command: ClientCommand) -> Result<(u64, CommandOutcome), ClientError> {
        match self.call(ClientRequest::Write { command }).await? {
            ClientResponse::Written { index, outcome } => Ok((index, outcome)),
            other => Err(unexpected(&other)),
        }
    }

    /// Read catalog state; `linearizable` reads are confirmed by the leader.
    pub async fn read(&self, query: CatalogQuery, linearizable: bool) -> Result<QueryResult, ClientError> {
        match self.call(ClientRequest::Read { query, linearizable }).await? {
            ClientResponse::Read(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn kv_put(&self, key: &str, value: &[u8]) -> Result<u64, ClientError> {
        let (index, _) = self.write(ClientCommand::KvPut { key: key.into(), value: value.to_vec() }).await?;
        Ok(index)
    }

    /// Linearizable get.
    pub async fn kv_get(&self, key: &str) -> Result<Option<Vec<u8>>, ClientError> {
        match self.read(CatalogQuery::KvGet { key: key.into() }, true).await? {
            QueryResult::Value(v) => Ok(v),
            other => Err(ClientError::Protocol(format!("unexpected query result {other:?}"))),
        }
    }

    /// Compare-and-set; returns whether it succeeded and the value now stored.
    pub async fn kv_cas(
        &self,
        key: &str,
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<(bool, Option<Vec<u8>>), ClientError> {
        let cmd = ClientCommand::KvCas {
            key: key.into(),
            expected: expected.map(<[u8]>::to_vec),
            new: new.map(<[u8]>::to_vec),
        };
        match self.write(cmd).await? {
            (_, CommandOutcome::Cas { succeeded, current }) => Ok((succeeded, current)),
            (_, other) => Err(ClientError::Protocol(format!("unexpected outcome {other:?}"))),
        }
    }

    pub async fn kv_delete(&self, key: &str) -> Result<bool, ClientError> {
        match self.write(ClientCommand::KvDelete { key: key.into() }).await? {
            (_, CommandOutcome::Deleted { existed }) => Ok(existed),
            (_, other) => Err(ClientError::Protocol(format!("unexpected outcome {other:?}"))),
        }
    }

    pub async fn kv_scan(&self, prefix: &str, limit: u32) -> Result<Vec<(String, Vec<u8>)>, ClientError> {
        match self.read(CatalogQuery::KvScan { prefix: prefix.into(), limit }, true).await? {
            QueryResult::Entries(e) => Ok(e),
            other => Err(ClientError::Protocol(format!("unexpected query result {other:?}"))),
        }
    }

    pub async fn hosts(&self) -> Result<Vec<HostRecord>, ClientError> {
        match self.read(CatalogQuery::Hosts, true).await? {
            QueryResult::Hosts(h) => Ok(h),
            other => Err(ClientError::Protocol(format!("unexpected query result {other:?}"))),
        }
    }

    /// Add a member (learner first; promoted to voter when `voter`).
    pub async fn add_member(&self, member: MemberSpec, voter: bool) -> Result<u64, ClientError> {
        match self.call(ClientRequest::AddMember { member, voter }).await? {
            ClientResponse::MembershipChanged { index } => Ok(index),
            other => Err(unexpected(&other)),
        }
    }

    pub async fn remove_member(&self, id: NodeId) -> Result<u64, ClientError> {
        match self.call(ClientRequest::RemoveMember { id }).await? {
            ClientResponse::MembershipChanged { index } => Ok(index),
            other => Err(unexpected(&other)),
        }
    }

    /// Send a message to the actor at `dest` through any node; the node routes it to the node that
    /// owns the actor. Retried at another node only when the first could not be reached.
    pub async fn actor(&self, dest: ActorAddr, msg: ActorMessage) -> Result<ActorReply, ClientError> {
        let start = Instant::now();
        let mut tried = 0;
        loop {
            let target = self.pick_target();
            tried += 1;
            let env = Envelope::new(self.connector.next_msg_id(), NodeId(0), dest, Body::Actor(msg.clone()));
            match self.connector.request(target, &env, ATTEMPT_TIMEOUT).await {
                Ok(done) => {
                    return match done.reply.body {
                        Body::ActorReply(r) => Ok(r),
                        Body::Error(e) => Err(ClientError::Server(e)),
                        other => Err(ClientError::Protocol(format!("expected an actor reply, got {:?}", other.kind()))),
                    }
                }
                Err(e @ (WireIoError::Connect { .. } | WireIoError::BackingOff { .. })) => {
                    if start.elapsed() >= self.deadline {
                        return Err(ClientError::Unreachable { tried, last: e.to_string() });
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(ClientError::Indeterminate(e.to_string())),
            }
        }
    }

    /// Send a request to the cluster, retrying at other nodes while the deadline allows.
    pub async fn call(&self, request: ClientRequest) -> Result<ClientResponse, ClientError> {
        let start = Instant::now();
        let mut tried = 0usize;
        let mut pause = Duration::from_millis(20);
        let mut last;
        // An attempt whose outcome is unknown may still take effect, so a request that changes
        // something is then Indeterminate however the later attempts fail.
        let mut maybe_applied = false;
        loop {
            let target = self.pick_target();
            tried += 1;
            let budget = self.deadline.saturating_sub(start.elapsed()).max(Duration::from_millis(50));
            match self.attempt(target, &request, budget, Stalls::Watch).await {
                Ok(resp) => {
                    if matches!(
                        request,
                        ClientRequest::Write { .. }
                            | ClientRequest::AddMember { .. }
                            | ClientRequest::RemoveMember { .. }
                            | ClientRequest::Read { linearizable: true, .. }
                    ) {
                        *self.leader.lock().expect("leader lock") = Some(target);
                    }
                    return Ok(resp);
                }
                Err(Failure::NotApplied { reason, leader }) => {
                    last = format!("{target}: {reason}");
                    *self.leader.lock().expect("leader lock") = leader;
                    if let Some(l) = leader {
                        self.learn_node(l);
                        if leader != Some(target) {
                            // Redirect immediately, no pause.
                            if start.elapsed() < self.deadline {
                                continue;
                            }
                        }
                    }
                }
                Err(f @ Failure::Final(_)) => return Err(f.into_error()),
                Err(Failure::Unknown { reason, moved_to }) => {
                    self.after_unknown(target, moved_to);
                    // A stalled request may still be applied after the client gave up on it (a
                    // node that forwarded it retries on its own). Re-sending a write then lets the
                    // stalled copy land after the caller's next write and undo it, even when the
                    // write is idempotent on its own: only what changes nothing is re-sent.
                    let stalled_change = moved_to.is_some() && !request_is_read_only(&request);
                    if !request_is_idempotent(&request) || stalled_change {
                        return Err(ClientError::Indeterminate(format!("{target}: {reason}")));
                    }
                    last = format!("{target}: {reason}");
                    maybe_applied |= !request_is_read_only(&request);
                    // The stall watch found the new leader: go there now, no pause.
                    if moved_to.is_some() && start.elapsed() < self.deadline {
                        continue;
                    }
                }
            }
            if start.elapsed() + pause >= self.deadline {
                if maybe_applied {
                    return Err(ClientError::Indeterminate(format!(
                        "an earlier attempt may have been applied; last attempt: {last}"
                    )));
                }
                return Err(ClientError::Unreachable { tried, last });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(250));
        }
    }

    fn pick_target(&self) -> SocketAddr {
        if let Some(l) = *self.leader.lock().expect("leader lock") {
            return l;
        }
        let nodes = self.nodes.lock().expect("nodes lock");
        nodes[self.rotation.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % nodes.len()]
    }

    /// After an attempt at `target` ended without knowing its outcome: follow the leader the
    /// stall watch found, else stop preferring `target` — unless another request has already
    /// moved the hint elsewhere (a request that failed on the old leader's closed connection
    /// must not undo the move).
    fn after_unknown(&self, target: SocketAddr, moved_to: Option<SocketAddr>) {
        let mut leader = self.leader.lock().expect("leader lock");
        match moved_to {
            Some(l) => *leader = Some(l),
            None if *leader == Some(target) => *leader = None,
            None => {}
        }
        drop(leader);
        if let Some(l) = moved_to {
            self.learn_node(l);
        }
    }

    fn learn_node(&self, addr: SocketAddr) {
        let mut nodes = self.nodes.lock().expect("nodes lock");
        if !nodes.contains(&addr) {
            nodes.push(addr);
        }
    }

    async fn attempt(
        &self,
        addr: SocketAddr,
        request: &ClientRequest,
        budget: Duration,
        stalls: Stalls,
    ) -> Result<ClientResponse, Failure> {
        let env = Envelope::new(
            self.connector.next_msg_id(),
            NodeId(0),
            ActorAddr::node(NodeId(0)),
            Body::Client(request.clone()),
        );
        let limit = ATTEMPT_TIMEOUT.min(budget);
        let started = Instant::now();
        let conn = self.connect(addr, limit).await?;
        let reply = self.exchange_watched(addr, &conn, &env, limit.saturating_sub(started.elapsed()), stalls).await?;
        match reply.body {
            Body::ClientReply(resp) => Ok(resp),
            Body::Error(err) => {
                let leader = err.leader.as_ref().and_then(|(_, a)| a.parse().ok());
                match err.code {
                    ErrorCode::NotLeader
                    | ErrorCode::NoLeader
                    | ErrorCode::NotInitialized
                    | ErrorCode::Unavailable
                    | ErrorCode::NotPrimary => Err(Failure::NotApplied { reason: err.message.clone(), leader }),
                    ErrorCode::Timeout => Err(Failure::Unknown { reason: err.message, moved_to: None }),
                    _ => Err(Failure::Final(ClientError::Server(err))),
                }
            }
            other => {
                Err(Failure::Final(ClientError::Protocol(format!("expected a client reply, got {:?}", other.kind()))))
            }
        }
    }
}

/// Whether an attempt watches for a stall ([`HavenClient::call`]) or just waits for its reply or
/// its timeout ([`HavenClient::call_node`]: the caller chose the node and handles its failures).
#[derive(Debug, Clone, Copy)]
enum Stalls {
    Watch,
    Wait,
}

/// A `Status` probe's answer: who was asked, and its status if it answered in time.
type ProbeAnswer = (SocketAddr, Option<NodeStatus>);

/// One attempt's exchange, and the stall watch around it.
impl HavenClient {
    /// The connection to `addr`, within `limit`. Failing here proves the request was not sent.
    async fn connect(&self, addr: SocketAddr, limit: Duration) -> Result<quinn::Connection, Failure> {
        let not_sent = |reason: String| Failure::NotApplied { reason, leader: None };
        match tokio::time::timeout(limit, self.connector.connection(addr)).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(not_sent(e.to_string())),
            Err(_) => Err(not_sent(format!("no connection to {addr} within {limit:?}"))),
        }
    }

    /// Send `env` on `conn` and wait up to `limit` for the reply, watching for a stall (see
    /// [`crate::stall`]): once the probes prove another member leads in a newer term, stop
    /// waiting, close the connection and report where the leader moved.
    async fn exchange_watched(
        &self,
        addr: SocketAddr,
        conn: &quinn::Connection,
        env: &Envelope,
        limit: Duration,
        stalls: Stalls,
    ) -> Result<Envelope, Failure> {
        let unknown = |reason: String| Failure::Unknown { reason, moved_to: None };
        let policy = match stalls {
            Stalls::Watch => self.stall,
            Stalls::Wait => StallPolicy::disabled(),
        };
        let exchange = wire::exchange(conn, env);
        let watched = self.watch_stall(addr, conn, exchange, &policy);
        match tokio::time::timeout(limit, watched).await {
            Ok(Ok(Ok((reply, _, _)))) => Ok(reply),
            Ok(Ok(Err(e))) => {
                if matches!(e, WireIoError::Connection(_)) {
                    self.connector.forget(addr, conn);
                }
                Err(unknown(e.to_string()))
            }
            Ok(Err((moved, silent))) => {
                self.leave_stalled(addr, conn, moved, silent);
                Err(Failure::Unknown {
                    reason: format!(
                        "no reply from {addr}, and node {} at {} now leads in term {}",
                        moved.leader_id, moved.leader, moved.term
                    ),
                    moved_to: Some(moved.leader),
                })
            }
            Err(_) => Err(unknown(WireIoError::Timeout { addr, after: limit }.to_string())),
        }
    }

    /// Drive `exchange` to its end, or until the stall watch proves the leader moved (then also
    /// whether the stalled node had gone silent). Probing starts only once the exchange has
    /// stalled, and is paced and bounded by `policy`.
    async fn watch_stall<F: std::future::Future>(
        &self,
        addr: SocketAddr,
        conn: &quinn::Connection,
        exchange: F,
        policy: &StallPolicy,
    ) -> Result<F::Output, (Moved, bool)> {
        tokio::pin!(exchange);
        let mut watch = StallWatch::new(addr, Instant::now(), policy);
        let mut probes: FuturesUnordered<BoxFuture<'static, ProbeAnswer>> = FuturesUnordered::new();
        let mut asked: HashSet<SocketAddr> = HashSet::new();
        loop {
            let next_round = watch.next_round_at();
            tokio::select! {
                done = &mut exchange => return Ok(done),
                Some((peer, status)) = probes.next(), if !probes.is_empty() => {
                    asked.remove(&peer);
                    note_probe(&mut watch, addr, peer, status);
                    if let Some(moved) = watch.verdict() {
                        return Err((moved, watch.stalled_is_silent()));
                    }
                }
                _ = sleep_until(next_round), if next_round.is_some() => {
                    if watch.rounds_done() == 0 {
                        self.counters.stalled_requests.fetch_add(1, Ordering::Relaxed);
                    }
                    watch.round_started();
                    self.start_probes(addr, conn, &mut asked, &mut probes);
                }
            }
        }
    }

    /// One probe round: a `Status` to the stalled node (on the stalled connection, so an answer
    /// shows that path works) and to up to `max_probe_peers` other members; a member whose last
    /// probe is still out is skipped, and so is any probe the client-wide permits do not allow.
    fn start_probes(
        &self,
        stalled: SocketAddr,
        conn: &quinn::Connection,
        asked: &mut HashSet<SocketAddr>,
        probes: &mut FuturesUnordered<BoxFuture<'static, ProbeAnswer>>,
    ) {
        let others: Vec<SocketAddr> = self.nodes.lock().expect("nodes lock").clone();
        let others = others.into_iter().filter(|a| *a != stalled).take(self.stall.max_probe_peers);
        for peer in std::iter::once(stalled).chain(others) {
            if asked.contains(&peer) {
                continue;
            }
            let Ok(permit) = self.probe_permits.clone().try_acquire_owned() else { return };
            asked.insert(peer);
            self.counters.probes_sent.fetch_add(1, Ordering::Relaxed);
            let probe = self.status_probe(peer, (peer == stalled).then(|| conn.clone()));
            probes.push(Box::pin(async move {
                let status = probe.await;
                drop(permit);
                (peer, status)
            }));
        }
    }

    /// Ask `peer` for its local status within the probe timeout; on `conn` when given.
    fn status_probe(
        &self,
        peer: SocketAddr,
        conn: Option<quinn::Connection>,
    ) -> BoxFuture<'static, Option<NodeStatus>> {
        let env = Envelope::new(
            self.connector.next_msg_id(),
            NodeId(0),
            ActorAddr::node(NodeId(0)),
            Body::Client(ClientRequest::Status),
        );
        let (connector, timeout) = (self.connector.clone(), self.stall.probe_timeout);
        Box::pin(async move {
            let reply = match conn {
                Some(conn) => tokio::time::timeout(timeout, wire::exchange(&conn, &env)).await.ok()?.ok()?.0,
                None => connector.request(peer, &env, timeout).await.ok()?.reply,
            };
            match reply.body {
                Body::ClientReply(ClientResponse::Status(s)) => Some(s),
                _ => None,
            }
        })
    }

    /// Stop waiting on `addr` (the caller drops the exchange, which resets its stream). When
    /// `addr` had gone silent, its connection is dead or soon will be: close it, so every request
    /// still waiting on it ends now and the next one dials afresh instead of reusing it (and a
    /// stopped node that resumes learns the client left). A deposed leader that still answers
    /// keeps its connection: it works, and its other requests may yet be answered.
    fn leave_stalled(&self, addr: SocketAddr, conn: &quinn::Connection, moved: Moved, silent: bool) {
        tracing::info!(%addr, silent, leader = %moved.leader, term = moved.term, "request stalled; leader moved");
        if silent {
            conn.close(quinn::VarInt::from_u32(STALLED_CLOSE_CODE), b"stalled; another member leads in a newer term");
            self.connector.forget(addr, conn);
        }
        self.counters.leader_moves.fetch_add(1, Ordering::Relaxed);
    }
}

/// Feed one probe answer to the watch: from the stalled node itself, or from another member.
fn note_probe(watch: &mut StallWatch, stalled: SocketAddr, peer: SocketAddr, status: Option<NodeStatus>) {
    match (peer == stalled, status) {
        (true, Some(s)) => watch.stalled_answered(s.term, s.role == haven_proto::NodeRole::Leader),
        (true, None) => watch.stalled_silent(),
        (false, Some(s)) => watch.report(&LeaderReport::from_status(&s)),
        (false, None) => {}
    }
}

/// Sleep until `at`; never when `at` is `None` (the caller disables the branch then).
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// How an attempt at one node failed.
enum Failure {
    /// The request certainly had no effect; safe to retry elsewhere.
    NotApplied { reason: String, leader: Option<SocketAddr> },
    /// The request may have had an effect. `moved_to`: the attempt stalled and the stall watch
    /// showed this node leads in a newer term.
    Unknown { reason: String, moved_to: Option<SocketAddr> },
    /// Retrying cannot help.
    Final(ClientError),
}

impl Failure {
    fn into_error(self) -> ClientError {
        match self {
            Failure::NotApplied { reason, .. } => ClientError::Unreachable { tried: 1, last: reason },
            Failure::Unknown { reason, .. } => ClientError::Indeterminate(reason),
            Failure::Final(e) => e,
        }
    }
}

/// Requests that change nothing, whatever happens to them.
fn request_is_read_only(request: &ClientRequest) -> bool {
    match request {
        ClientRequest::Volume(r) => r.is_read_only(),
        _ => matches!(request, ClientRequest::Status | ClientRequest::LeaderStatus | ClientRequest::Read { .. }),
    }
}

fn request_is_idempotent(request: &ClientRequest) -> bool {
    match request {
        ClientRequest::Volume(r) => r.is_idempotent(),
        _ => matches!(request, ClientRequest::Status | ClientRequest::LeaderStatus | ClientRequest::Read { .. }),
    }
}

fn unexpected(resp: &ClientResponse) -> ClientError {
    ClientError::Protocol(format!("unexpected response {resp:?}"))
}
