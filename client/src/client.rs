//! [`HavenClient`]: the async SDK. It sends each request to the node it believes is the leader
//! (any node for reads of local status), follows `NotLeader` hints, and retries on other nodes
//! while the deadline allows — but only when the failure proves the request was not applied.
//! A write whose outcome is unknown is reported as [`ClientError::Indeterminate`], never retried
//! blindly.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use haven_proto::{
    ActorAddr, ActorMessage, ActorReply, Body, Caller, CatalogQuery, CertificateInfo, ClientCommand, ClientRequest,
    ClientResponse, CommandOutcome, Envelope, ErrorCode, HostRecord, MemberSpec, NodeId, NodeStatus, QueryResult,
};

use crate::config::ClusterConfig;
use crate::error::ClientError;
use crate::wire::{client_endpoint, Connector, WireIoError};

/// Longest a single attempt at one node may take before we consider it failed.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

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
        })
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

    /// Send one request to one node, without retries or redirects.
    pub async fn call_node(&self, addr: SocketAddr, request: ClientRequest) -> Result<ClientResponse, ClientError> {
        self.attempt(addr, &request, self.deadline).await.map_err(|f| f.into_error())
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
            match self.attempt(target, &request, budget).await {
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
                Err(Failure::Unknown(reason)) => {
                    *self.leader.lock().expect("leader lock") = None;
                    if request_is_idempotent(&request) {
                        last = format!("{target}: {reason}");
                        maybe_applied |= !request_is_read_only(&request);
                    } else {
                        return Err(ClientError::Indeterminate(format!("{target}: {reason}")));
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
    ) -> Result<ClientResponse, Failure> {
        let env = Envelope::new(
            self.connector.next_msg_id(),
            NodeId(0),
            ActorAddr::node(NodeId(0)),
            Body::Client(request.clone()),
        );
        let reply = match self.connector.request(addr, &env, ATTEMPT_TIMEOUT.min(budget)).await {
            Ok(done) => done.reply,
            Err(e @ (WireIoError::Connect { .. } | WireIoError::BackingOff { .. } | WireIoError::Tls(_))) => {
                return Err(Failure::NotApplied { reason: e.to_string(), leader: None })
            }
            Err(e) => return Err(Failure::Unknown(e.to_string())),
        };
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
                    ErrorCode::Timeout => Err(Failure::Unknown(err.message)),
                    _ => Err(Failure::Final(ClientError::Server(err))),
                }
            }
            other => {
                Err(Failure::Final(ClientError::Protocol(format!("expected a client reply, got {:?}", other.kind()))))
            }
        }
    }
}

/// How an attempt at one node failed.
enum Failure {
    /// The request certainly had no effect; safe to retry elsewhere.
    NotApplied { reason: String, leader: Option<SocketAddr> },
    /// The request may have had an effect.
    Unknown(String),
    /// Retrying cannot help.
    Final(ClientError),
}

impl Failure {
    fn into_error(self) -> ClientError {
        match self {
            Failure::NotApplied { reason, .. } => ClientError::Unreachable { tried: 1, last: reason },
            Failure::Unknown(r) => ClientError::Indeterminate(r),
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
