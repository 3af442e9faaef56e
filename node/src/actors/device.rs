//! The device actor: the addressable mailbox of one volume's replica on this host. Messages from
//! other hosts' device actors (snapshots, adopt, resync, integrity checks — replicated writes
//! arrive on the volume's replication stream instead, `volume::stream`) and client requests
//! routed to the primary arrive here and are handed to the replica engine
//! ([`crate::volume::replica::VolumeReplica`]), which owns the volume's local blocks. Handling is
//! asynchronous (each message's work is spawned on the Tokio pool, off the actix system thread)
//! so writes pipeline: write order is fixed by the engine's write-order points, not by mailbox
//! order. This actor must not hold state of its own beyond the engine.

use std::sync::Arc;

use actix::{Actor, Context, Handler, ResponseFuture};
use haven_proto::{ActorMessage, ActorReply, WireError};

use super::Deliver;
use crate::volume::replica::VolumeReplica;

pub struct DeviceActor {
    engine: Arc<VolumeReplica>,
    started: std::time::Instant,
    handled: u64,
}

impl DeviceActor {
    pub fn new(engine: Arc<VolumeReplica>) -> Self {
        Self { engine, started: std::time::Instant::now(), handled: 0 }
    }
}

impl Actor for DeviceActor {
    type Context = Context<Self>;
}

impl Handler<Deliver> for DeviceActor {
    type Result = ResponseFuture<Result<ActorReply, WireError>>;

    fn handle(&mut self, Deliver(msg): Deliver, _ctx: &mut Context<Self>) -> Self::Result {
        self.handled += 1;
        let engine = self.engine.clone();
        match msg {
            ActorMessage::Ping { nonce } => {
                let from = engine.node;
                Box::pin(async move { Ok(ActorReply::Pong { nonce, from }) })
            }
            ActorMessage::Describe => {
                let reply = ActorReply::Description {
                    node: engine.node,
                    kind: format!("device {} ({:?})", engine.vol, engine.role()),
                    handled: self.handled,
                    uptime_ms: self.started.elapsed().as_millis() as u64,
                    incarnation: super::incarnation(),
                };
                Box::pin(async move { Ok(reply) })
            }
            ActorMessage::Vm(_) | ActorMessage::Share(_) | ActorMessage::Ha { .. } => Box::pin(async move {
                Err(WireError::new(haven_proto::ErrorCode::InvalidRequest, "a device actor takes only device messages"))
            }),
            // The engine's work runs on the Tokio pool, not on the actix system thread that polls
            // this mailbox, so one busy volume never holds up another's messages.
            ActorMessage::Device(m) => Box::pin(async move {
                match tokio::spawn(async move { engine.handle(m).await }).await {
                    // The volume layer's error becomes a wire error here, once.
                    Ok(r) => r.map(ActorReply::Device).map_err(WireError::from),
                    Err(e) => Err(WireError::new(haven_proto::ErrorCode::Internal, format!("device task failed: {e}"))),
                }
            }),
        }
    }
}
