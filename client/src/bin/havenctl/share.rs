//! `havenctl share`: shared datasets (C2). A share is a key-value document every member host
//! holds a live copy of; members exchange only diffs, and a change a member reflects from a peer
//! is never sent back to it.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use haven_client::proto::share::{ShareAck, ShareMemberStatus, ShareRecord};
use haven_client::proto::NodeId;
use haven_client::HavenClient;
use serde_json::json;

use crate::output::Output;

#[derive(Subcommand)]
pub enum ShareCmd {
    /// Create a share on two or more hosts; the first is its hub.
    /// Example: `havenctl share create app-state --members 1,2,3`.
    Create {
        name: String,
        /// Member node ids, comma-separated (2 to 8).
        #[arg(long, value_delimiter = ',', required = true)]
        members: Vec<u64>,
    },
    /// List shares with their members and hubs.
    List,
    /// Set KEY to VALUE at a member (default: the hub, or the node reached if it is a member).
    /// Answers once the change is durable there and reflected by the hub (`--ack all`: held by
    /// every member).
    Put(PutArgs),
    /// Delete KEY at a member (as `put`).
    Delete {
        share: String,
        key: String,
        #[arg(long)]
        member: Option<u64>,
    },
    /// Read one KEY, or the whole document, from a member's live copy.
    Get {
        share: String,
        key: Option<String>,
        /// The member to read from (default: the hub, or the node reached if it is a member).
        #[arg(long)]
        member: Option<u64>,
    },
    /// Print a member's copy every time it changes (Ctrl-C to stop; `--count N` to stop after N).
    Watch {
        share: String,
        key: Option<String>,
        #[arg(long)]
        member: Option<u64>,
        /// Stop after this many changes.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Each member's sync state: live version, digest, in sync with the hub, diffs sent and
    /// reflected, echoes (always 0).
    Members { share: String },
    /// Replace the member set (the hub stays if it remains a member).
    SetMembers {
        share: String,
        #[arg(long, value_delimiter = ',', required = true)]
        members: Vec<u64>,
    },
    /// Delete a share; its members drop their copies.
    Remove { share: String },
}

#[derive(Args)]
pub struct PutArgs {
    share: String,
    key: String,
    value: String,
    #[arg(long)]
    member: Option<u64>,
    /// `hub` (durable here and at the hub) or `all` (durable on every member).
    #[arg(long, default_value = "hub", value_parser = ["hub", "all"])]
    ack: String,
}

fn nodes(ids: &[u64]) -> Vec<NodeId> {
    ids.iter().map(|&i| NodeId(i)).collect()
}

fn record_json(s: &ShareRecord) -> serde_json::Value {
    json!({"id": s.id.0, "name": s.name, "members": s.members.iter().map(|m| m.0).collect::<Vec<_>>(),
           "hub": s.hub.0, "generation": s.generation})
}

fn text(v: &[u8]) -> String {
    String::from_utf8_lossy(v).into_owned()
}

pub async fn share(
    cmd: ShareCmd,
    client: &impl Fn() -> anyhow::Result<HavenClient>,
    out: &Output,
) -> anyhow::Result<()> {
    let c = client()?;
    match cmd {
        ShareCmd::Create { name, members } => {
            let s = c.create_share(&name, &nodes(&members)).await?;
            out.done(&format!("share {} ({}) created on {:?}, hub {}", s.name, s.id, members, s.hub), record_json(&s));
        }
        ShareCmd::List => {
            let shares = c.shares().await?;
            out.table(
                &["id", "name", "members", "hub", "generation"],
                shares
                    .iter()
                    .map(|s| {
                        let m: Vec<String> = s.members.iter().map(|m| m.0.to_string()).collect();
                        vec![s.id.to_string(), s.name.clone(), m.join(","), s.hub.to_string(), s.generation.to_string()]
                    })
                    .collect(),
                serde_json::Value::Array(shares.iter().map(record_json).collect()),
            );
        }
        ShareCmd::Put(a) => {
            let s = c.share(&a.share).await?;
            let ack = if a.ack == "all" { ShareAck::AllMembers } else { ShareAck::Hub };
            let member = a.member.map(NodeId);
            let v = c.share_put(s.id, member, &a.key, Some(a.value.into_bytes()), ack).await?;
            out.done(
                &format!("{}/{} written (live version {v}, acknowledged by {})", s.name, a.key, a.ack),
                json!({"share": s.name, "key": a.key, "live_version": v, "ack": a.ack}),
            );
        }
        ShareCmd::Delete { share, key, member } => {
            let s = c.share(&share).await?;
            let v = c.share_put(s.id, member.map(NodeId), &key, None, ShareAck::Hub).await?;
            out.done(
                &format!("{}/{key} deleted (live version {v})", s.name),
                json!({"share": s.name, "key": key, "live_version": v}),
            );
        }
        ShareCmd::Get { share, key, member } => {
            let s = c.share(&share).await?;
            let doc = c.share_get(s.id, member.map(NodeId), key.as_deref(), None, Duration::ZERO).await?;
            if let Some(k) = &key {
                let Some((_, v)) = doc.entries.first() else { bail!("key {k:?} not found in share {}", s.name) };
                out.value(
                    &text(v),
                    json!({"share": s.name, "key": k, "value": text(v), "member": doc.member.0,
                                            "live_version": doc.live_version}),
                );
                return Ok(());
            }
            out.headline(&format!("{} at {} (live version {})", s.name, doc.member, doc.live_version));
            out.table(
                &["key", "value"],
                doc.entries.iter().map(|(k, v)| vec![k.clone(), text(v)]).collect(),
                json!({"share": s.name, "member": doc.member.0, "live_version": doc.live_version,
                       "entries": doc.entries.iter().map(|(k, v)| json!({"key": k, "value": text(v)})).collect::<Vec<_>>()}),
            );
        }
        ShareCmd::Watch { share, key, member, count } => watch(&c, &share, key, member, count, out).await?,
        ShareCmd::Members { share } => {
            let s = c.share(&share).await?;
            let members = c.share_members(s.id).await?;
            out.headline(&format!("{} ({}), hub {}, generation {}", s.name, s.id, s.hub, s.generation));
            out.table(
                &[
                    "member",
                    "role",
                    "live version",
                    "keys",
                    "bytes",
                    "digest",
                    "in sync",
                    "sent",
                    "reflected",
                    "echoes",
                ],
                members.iter().map(|m| member_row(&s, m)).collect(),
                serde_json::to_value(&members)?,
            );
        }
        ShareCmd::SetMembers { share, members } => {
            let s = c.share(&share).await?;
            let s = c.set_share_members(&s, &nodes(&members)).await?;
            out.done(&format!("share {} now on {members:?}, hub {}", s.name, s.hub), record_json(&s));
        }
        ShareCmd::Remove { share } => {
            let s = c.share(&share).await?;
            c.delete_share(s.id).await?;
            out.done(&format!("share {} deleted", s.name), json!({"deleted": s.name}));
        }
    }
    Ok(())
}

fn member_row(s: &ShareRecord, m: &ShareMemberStatus) -> Vec<String> {
    if !m.reachable {
        return vec![
            m.member.to_string(),
            "unreachable".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
            "-".into(),
        ];
    }
    let role = if m.member == s.hub { "hub" } else { "spoke" };
    let digest: String = m.digest.chars().take(12).collect();
    vec![
        m.member.to_string(),
        role.into(),
        m.live_version.to_string(),
        m.keys.to_string(),
        m.bytes.to_string(),
        digest,
        if m.in_sync { "yes" } else { "no" }.into(),
        m.diffs_sent.to_string(),
        m.diffs_reflected.to_string(),
        m.echoes.to_string(),
    ]
}

async fn watch(
    c: &HavenClient,
    share: &str,
    key: Option<String>,
    member: Option<u64>,
    count: Option<u64>,
    out: &Output,
) -> anyhow::Result<()> {
    let s = c.share(share).await?;
    let long = c.clone().with_deadline(Duration::from_secs(40));
    let mut doc = c.share_get(s.id, member.map(NodeId), key.as_deref(), None, Duration::ZERO).await?;
    let mut seen = 0u64;
    loop {
        let entries: Vec<_> = doc.entries.iter().map(|(k, v)| json!({"key": k, "value": text(v)})).collect();
        let human: Vec<String> = doc.entries.iter().map(|(k, v)| format!("{k}={}", text(v))).collect();
        out.value(
            &format!("[{} v{}] {}", doc.member, doc.live_version, human.join(" ")),
            json!({"member": doc.member.0, "live_version": doc.live_version, "entries": entries}),
        );
        if count.is_some_and(|n| seen >= n) {
            return Ok(());
        }
        let after = doc.live_version;
        loop {
            let next = long
                .share_get(s.id, member.map(NodeId), key.as_deref(), Some(after), Duration::from_secs(30))
                .await
                .context("watching")?;
            if next.live_version > after {
                doc = next;
                break;
            }
        }
        seen += 1;
    }
}
