//! The share actor: one per node, the addressable mailbox of every share this node is a member
//! of. Other members' rounds, resets and pokes, and client requests relayed from other nodes,
//! arrive here and are handed to the node's [`ShareHost`] on the Tokio pool. It holds no state of
//! its own.

use std::sync::Arc;

use actix::{Actor, Context, Handler, ResponseFuture};
use haven_proto::{ActorMessage, ActorReply, ErrorCode, WireError};

use super::Deliver;
use crate::share::host::ShareHost;

pub struct ShareActor {
    host: Arc<ShareHost>,
    node: haven_proto::NodeId,
}

impl ShareActor {
    pub fn new(host: Arc<ShareHost>, node: haven_proto::NodeId) -> Self {
        Self { host, node }
    }
}

impl Actor for ShareActor {
    type Context = Context<Self>;
}

impl Handler<Deliver> for ShareActor {
    type Result = ResponseFuture<Result<ActorReply, WireError>>;

    fn handle(&mut self, Deliver(msg): Deliver, _ctx: &mut Context<Self>) -> Self::Result {
        let (host, node) = (self.host.clone(), self.node);
        Box::pin(async move {
            match msg {
                ActorMessage::Ping { nonce } => Ok(ActorReply::Pong { nonce, from: node }),
                ActorMessage::Describe => Ok(ActorReply::Description {
                    node,
                    kind: "share".into(),
                    handled: 0,
                    uptime_ms: 0,
                    incarnation: super::incarnation(),
                }),
                ActorMessage::Share(m) => match tokio::spawn(async move { host.handle(m).await }).await {
                    // The share layer's error becomes a wire error here, once.
                    Ok(r) => r.map(ActorReply::Share).map_err(WireError::from),
                    Err(e) => Err(WireError::new(ErrorCode::Internal, format!("share task failed: {e}"))),
                },
                other => Err(WireError::new(
                    ErrorCode::InvalidRequest,
                    format!("the share actor takes only share messages (got {other:?})"),
                )),
            }
        })
    }
}
