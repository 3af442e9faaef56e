//! The VM actor: the addressable mailbox of one VM on its host. Client requests routed to the
//! VM's host and messages from other hosts (a migration's source telling the destination to take
//! over) arrive here and are handed to the node's [`crate::vm::host::VmHost`], which owns the
//! guest. Work runs on the Tokio pool, not on the actix system thread. This actor holds no state
//! of its own.

use std::sync::Arc;

use actix::{Actor, Context, Handler, ResponseFuture};
use haven_proto::{ActorMessage, ActorReply, ErrorCode, VmId, WireError};

use super::Deliver;
use crate::vm::host::VmHost;

pub struct VmActor {
    host: Arc<VmHost>,
    vm: VmId,
}

impl VmActor {
    pub fn new(host: Arc<VmHost>, vm: VmId) -> Self {
        Self { host, vm }
    }
}

impl Actor for VmActor {
    type Context = Context<Self>;
}

impl Handler<Deliver> for VmActor {
    type Result = ResponseFuture<Result<ActorReply, WireError>>;

    fn handle(&mut self, Deliver(msg): Deliver, _ctx: &mut Context<Self>) -> Self::Result {
        let (host, vm) = (self.host.clone(), self.vm);
        Box::pin(async move {
            match msg {
                ActorMessage::Ping { nonce } => Ok(ActorReply::Pong { nonce, from: host.node }),
                ActorMessage::Describe => Ok(ActorReply::Description {
                    node: host.node,
                    kind: format!("vm {vm}"),
                    handled: 0,
                    uptime_ms: 0,
                    incarnation: super::incarnation(),
                }),
                ActorMessage::Vm(m) => match tokio::spawn(async move { host.handle(m).await }).await {
                    // The VM layer's error becomes a wire error here, once.
                    Ok(r) => r.map(ActorReply::Vm).map_err(WireError::from),
                    Err(e) => Err(WireError::new(ErrorCode::Internal, format!("VM task failed: {e}"))),
                },
                ActorMessage::Device(_) | ActorMessage::Share(_) | ActorMessage::Ha { .. } => {
                    Err(WireError::new(ErrorCode::InvalidRequest, "a VM actor takes only VM messages"))
                }
            }
        })
    }
}
