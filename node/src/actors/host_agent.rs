//! The host agent: one actor per node that speaks for the host itself (liveness, description).
//! Later issues give it inventory (capacity, devices, memory banks). It must not touch Raft or
//! the catalog directly; controllers tell it what to do by message.

use std::time::Instant;

use actix::{Actor, Context, Handler};
use haven_proto::{ActorMessage, ActorReply, NodeId, WireError};

use super::Deliver;

pub struct HostAgent {
    node: NodeId,
    started: Instant,
    handled: u64,
}

impl HostAgent {
    pub fn new(node: NodeId) -> Self {
        Self { node, started: Instant::now(), handled: 0 }
    }
}

impl Actor for HostAgent {
    type Context = Context<Self>;
}

impl Handler<Deliver> for HostAgent {
    type Result = Result<ActorReply, WireError>;

    fn handle(&mut self, Deliver(msg): Deliver, _ctx: &mut Context<Self>) -> Self::Result {
        self.handled += 1;
        Ok(match msg {
            ActorMessage::Ping { nonce } => ActorReply::Pong { nonce, from: self.node },
            ActorMessage::Describe => ActorReply::Description {
                node: self.node,
                kind: "host_agent".into(),
                handled: self.handled,
                uptime_ms: self.started.elapsed().as_millis() as u64,
            },
            ActorMessage::Vm(_) => {
                return Err(WireError::new(
                    haven_proto::ErrorCode::InvalidRequest,
                    "the host agent takes no VM messages",
                ))
            }
            ActorMessage::Device(m) => {
                return Err(WireError::new(
                    haven_proto::ErrorCode::InvalidRequest,
                    format!("the host agent takes no device messages (got one for {})", m.volume()),
                ))
            }
        })
    }
}
