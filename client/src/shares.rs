//! The SDK's share API (C2, differential sharing): create, list, resize and delete shared
//! datasets; put, get and watch keys at any member; each member's sync state.
//!
//! Catalog changes (which hosts are members) go through Raft; reads and writes of the data go to
//! a member through any node, and members sync with each other on their own.

use std::time::Duration;

use haven_proto::share::{
    ShareAck, ShareMemberStatus, ShareOutcome, ShareQuery, ShareQueryResult, ShareRecord, ShareRequest, ShareResponse,
};
use haven_proto::{
    CatalogQuery, ClientCommand, ClientRequest, ClientResponse, ClientShareCommand, CommandOutcome, NodeId,
    QueryResult, ShareId,
};

use crate::error::ClientError;
use crate::HavenClient;

/// A member's copy of a share (or of one key of it), as a `get` or `watch` returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareDoc {
    pub member: NodeId,
    pub live_version: u64,
    pub entries: Vec<(String, Vec<u8>)>,
}

impl HavenClient {
    async fn share_command(&self, cmd: ClientShareCommand) -> Result<ShareOutcome, ClientError> {
        cmd.validate().map_err(|m| ClientError::refused(m, false))?;
        match self.write(ClientCommand::Share(cmd)).await? {
            (_, CommandOutcome::Share(ShareOutcome::Refused { reason, not_found })) => {
                Err(ClientError::refused(reason, not_found))
            }
            (_, CommandOutcome::Share(o)) => Ok(o),
            (_, other) => Err(ClientError::unexpected(other)),
        }
    }

    async fn share_request(&self, req: ShareRequest) -> Result<ShareResponse, ClientError> {
        match self.call(ClientRequest::Share(req)).await? {
            ClientResponse::Share(r) => Ok(r),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// A new share on `members` (the first is its hub).
    pub async fn create_share(&self, name: &str, members: &[NodeId]) -> Result<ShareRecord, ClientError> {
        let cmd = ClientShareCommand::Create { name: name.into(), members: members.to_vec() };
        match self.share_command(cmd).await? {
            ShareOutcome::Share(s) => Ok(s),
            other => Err(ClientError::unexpected(other)),
        }
    }

    pub async fn delete_share(&self, share: ShareId) -> Result<(), ClientError> {
        self.share_command(ClientShareCommand::Delete { share }).await.map(|_| ())
    }

    /// Replace the member set (a compare-and-set on the share's generation).
    pub async fn set_share_members(&self, share: &ShareRecord, members: &[NodeId]) -> Result<ShareRecord, ClientError> {
        let cmd = ClientShareCommand::SetMembers {
            share: share.id,
            members: members.to_vec(),
            expected_generation: share.generation,
        };
        match self.share_command(cmd).await? {
            ShareOutcome::Share(s) => Ok(s),
            other => Err(ClientError::unexpected(other)),
        }
    }

    pub async fn shares(&self) -> Result<Vec<ShareRecord>, ClientError> {
        match self.read(CatalogQuery::Share(ShareQuery::Shares), true).await? {
            QueryResult::Share(ShareQueryResult::Shares(s)) => Ok(s),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// A share by name, `share-N` or `N`; a clear `NotFound` error if there is none.
    pub async fn share(&self, name_or_id: &str) -> Result<ShareRecord, ClientError> {
        let q = CatalogQuery::Share(ShareQuery::Share { name_or_id: name_or_id.into() });
        match self.read(q, true).await? {
            QueryResult::Share(ShareQueryResult::Share(Some(s))) => Ok(s),
            QueryResult::Share(ShareQueryResult::Share(None)) => {
                Err(ClientError::refused(format!("no share {name_or_id:?}"), true))
            }
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// Set `key` to `value` (`None`: delete) at `member` (default: the node the client reaches
    /// if it is a member, else the hub). Answered once durable there and reflected by the hub
    /// (`ShareAck::Hub`) or held by every member (`ShareAck::AllMembers`); returns the member's
    /// live version after the change.
    pub async fn share_put(
        &self,
        share: ShareId,
        member: Option<NodeId>,
        key: &str,
        value: Option<Vec<u8>>,
        ack: ShareAck,
    ) -> Result<u64, ClientError> {
        haven_proto::share::validate_key(key).map_err(|m| ClientError::refused(m, false))?;
        let req = ShareRequest::Put { share, member, key: key.into(), value, ack };
        match self.share_request(req).await? {
            ShareResponse::Put { live_version, .. } => Ok(live_version),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// `member`'s copy (one key, or all), at once; with `after_version`, once the member's live
    /// version is past it or `wait` elapsed, whichever comes first (`watch`).
    pub async fn share_get(
        &self,
        share: ShareId,
        member: Option<NodeId>,
        key: Option<&str>,
        after_version: Option<u64>,
        wait: Duration,
    ) -> Result<ShareDoc, ClientError> {
        let wait_ms = wait.as_millis().min(u32::MAX as u128) as u32;
        let req = ShareRequest::Get { share, member, key: key.map(str::to_string), after_version, wait_ms };
        match self.share_request(req).await? {
            ShareResponse::Doc { member, live_version, entries } => Ok(ShareDoc { member, live_version, entries }),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// Every member's sync state (a member that does not answer is listed unreachable).
    pub async fn share_members(&self, share: ShareId) -> Result<Vec<ShareMemberStatus>, ClientError> {
        match self.share_request(ShareRequest::Members { share }).await? {
            ShareResponse::Members(m) => Ok(m),
            other => Err(ClientError::unexpected(other)),
        }
    }
}
