//! The HA actor: one per node, the addressable mailbox of the node's HA driver. Checkpoints,
//! application updates, seals and takeover orders for the pairs this node follows, and (on the
//! leader) heartbeats and takeover answers, arrive here and are handed to [`HaHost`]; a VM's HA
//! status is answered here too (the standby has no VM actor). It holds no state of its own.

use std::sync::Arc;

use actix::{Actor, Context, Handler, ResponseFuture};
use haven_proto::vm::{VmMessage, VmRequest};
use haven_proto::{ActorMessage, ActorReply, ErrorCode, WireError};

use super::Deliver;
use crate::ha::host::HaHost;

pub struct HaActor {
    host: Arc<HaHost>,
    node: haven_proto::NodeId,
}

impl HaActor {
    pub fn new(host: Arc<HaHost>, node: haven_proto::NodeId) -> Self {
        Self { host, node }
    }
}

impl Actor for HaActor {
    type Context = Context<Self>;
}

impl Handler<Deliver> for HaActor {
    type Result = ResponseFuture<Result<ActorReply, WireError>>;

    fn handle(&mut self, Deliver(msg): Deliver, _ctx: &mut Context<Self>) -> Self::Result {
        let (host, node) = (self.host.clone(), self.node);
        Box::pin(async move {
            match msg {
                ActorMessage::Ping { nonce } => Ok(ActorReply::Pong { nonce, from: node }),
                ActorMessage::Describe => Ok(ActorReply::Description {
                    node,
                    kind: "ha".into(),
                    handled: 0,
                    uptime_ms: 0,
                    incarnation: super::incarnation(),
                }),
                // The driver's step is short (a capture copies dirty pages): a blocking thread.
                ActorMessage::Ha { from, msg } => {
                    match tokio::task::spawn_blocking(move || host.on_message(from, msg)).await {
                        Ok(()) => Ok(ActorReply::HaTaken),
                        Err(e) => Err(WireError::new(ErrorCode::Internal, format!("HA task failed: {e}"))),
                    }
                }
                ActorMessage::Vm(VmMessage::Client(
                    req @ (VmRequest::AppPut { .. } | VmRequest::AppGet { .. } | VmRequest::HaStatus { .. }),
                )) => host.request(req).await.map(ActorReply::Vm).map_err(WireError::from),
                other => Err(WireError::new(
                    ErrorCode::InvalidRequest,
                    format!("the HA actor takes only HA messages and HA status requests (got {other:?})"),
                )),
            }
        })
    }
}
