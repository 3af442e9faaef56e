//! The host agent: one actor per node that speaks for the host itself (liveness, description)
//! and takes host-level VM work: the group operations of migration plans
//! ([`haven_proto::vm::VmMessage::Group`]), handed to the node's [`VmHost`] on the Tokio pool.
//! It must not touch Raft or the catalog directly; controllers tell it what to do by message.

use std::sync::Arc;
use std::time::Instant;

use actix::{Actor, Context, Handler, ResponseFuture};
use haven_proto::vm::VmMessage;
use haven_proto::{ActorMessage, ActorReply, ErrorCode, NodeId, WireError};

use super::Deliver;
use crate::vm::host::VmHost;

pub struct HostAgent {
    node: NodeId,
    started: Instant,
    handled: u64,
    vms: Option<Arc<VmHost>>,
}

impl HostAgent {
    /// `vms`: the node's VM host, which runs group operations (none: they are refused).
    pub fn new(node: NodeId, vms: Option<Arc<VmHost>>) -> Self {
        Self { node, started: Instant::now(), handled: 0, vms }
    }
}

impl Actor for HostAgent {
    type Context = Context<Self>;
}

impl Handler<Deliver> for HostAgent {
    type Result = ResponseFuture<Result<ActorReply, WireError>>;

    fn handle(&mut self, Deliver(msg): Deliver, _ctx: &mut Context<Self>) -> Self::Result {
        self.handled += 1;
        let reply = match msg {
            ActorMessage::Ping { nonce } => Ok(ActorReply::Pong { nonce, from: self.node }),
            ActorMessage::Describe => Ok(ActorReply::Description {
                node: self.node,
                kind: "host_agent".into(),
                handled: self.handled,
                uptime_ms: self.started.elapsed().as_millis() as u64,
                incarnation: super::incarnation(),
            }),
            ActorMessage::Vm(VmMessage::Group(req)) => match self.vms.clone() {
                Some(vms) => {
                    return Box::pin(async move {
                        match tokio::spawn(async move { vms.group(req).await }).await {
                            Ok(r) => r
                                .map(|g| ActorReply::Vm(haven_proto::vm::VmResponse::Group(g)))
                                .map_err(WireError::from),
                            Err(e) => Err(WireError::new(ErrorCode::Internal, format!("group task failed: {e}"))),
                        }
                    })
                }
                None => Err(WireError::new(ErrorCode::Unavailable, "VMs are not running on this host")),
            },
            ActorMessage::Vm(_) => Err(WireError::new(
                ErrorCode::InvalidRequest,
                "the host agent takes only group VM messages; others go to the VM's actor",
            )),
            ActorMessage::Share(_) | ActorMessage::Ha { .. } => {
                Err(WireError::new(ErrorCode::InvalidRequest, "share messages go to the node's share actor"))
            }
            ActorMessage::Device(m) => Err(WireError::new(
                ErrorCode::InvalidRequest,
                format!("the host agent takes no device messages (got one for {})", m.volume()),
            )),
        };
        Box::pin(async move { reply })
    }
}
