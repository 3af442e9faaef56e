//! Replication streams: one long-lived QUIC bulk stream per (volume, peer host) from a primary to
//! each replica it feeds (in-sync replicas, and resyncing or async copies), carrying writes,
//! range zeroings and WAL syncs one way and their acknowledgements the other
//! (`haven_proto::replication`).
//!
//! Per volume rather than per host pair: the replica binds the stream to one device engine when
//! it opens (checked once), acknowledgements are matched by the volume's own write-order points,
//! and a broken stream fails only that volume's writes in flight; QUIC already multiplexes the
//! streams of every volume on the one bulk connection between two hosts, with one congestion
//! window, so a second layer of multiplexing would only add head-of-line blocking between
//! volumes.
//!
//! **Primary side** ([`Links`]): a write registers its point with the peer's [`Link`] and queues
//! its frame (encoded once, shared by every link); the link's writer task sends every frame queued
//! while it was busy in one write, its reader task resolves each acknowledged point. A link whose
//! stream breaks (or cannot open) fails every write in flight on it (the caller then drops that
//! replica from the in-sync set, as for any missed write) and the next write opens a new one.
//! **Replica side** ([`serve`]): frames are validated, admitted to the sequencer in stream order,
//! and answered as they complete, every answer ready at the same time in one frame, runs of
//! consecutive applied points as one [`ReplAck::Applied`]. Bytes admitted but not yet answered
//! are capped per stream, so a sender cannot make a replica hold more.
//!
//! This module owns the streams and their framing; it must not decide what a write's
//! acknowledgement means (`core::ack`, `replica`) or apply anything itself (the engine does).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use haven_client::wire;
use haven_proto::frame::{FrameHeader, FRAME_HEADER_LEN, MAX_FRAME_LEN};
use haven_proto::replication::{self, ReplAck, ReplAcks, ReplRequest, MAX_ACKS_PER_FRAME};
use haven_proto::volume::DeviceMessage;
use haven_proto::{ActorAddr, ActorKind, ActorMessage, Body, NodeId, ProtoError, VolumeId};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use super::host::VolumeHost;
use super::replica::VolumeReplica;
use crate::actors::ActorRegistry;

/// A frame's body must arrive within this long of its header.
const FRAME_DEADLINE: Duration = Duration::from_secs(10);
/// Most frames one write to the stream carries.
const MAX_FRAMES_PER_WRITE: usize = 256;
/// Bytes of request frames a replica holds admitted but unanswered, per stream.
const MAX_UNANSWERED_BYTES: usize = 64 << 20;
/// QUIC stream error code: the replica refused the stream or a frame on it.
const RESET_REFUSED: u32 = 0x4856_0101;

/// One request frame, encoded once and shared by every link that sends it.
#[derive(Clone)]
pub(crate) struct Frame {
    header: [u8; FRAME_HEADER_LEN],
    body: Bytes,
}

/// Encode `req` as a frame.
pub(crate) fn encode(req: &ReplRequest) -> Result<Frame, String> {
    let body = replication::encode_request(req).map_err(|e| e.to_string())?;
    let header = FrameHeader::encode(body.len()).map_err(|e| e.to_string())?;
    Ok(Frame { header, body: Bytes::from_owner(body) })
}

/// What an acknowledgement answers: a write-order point, or a WAL sync's tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Key {
    Point(u64),
    Sync(u64),
}

/// A request's outcome as the replica reports it (`Err`: refused or failed, with the reason).
pub(crate) type Outcome = Result<(), String>;

/// What a link is waiting for (pure: waiters of any type, no I/O).
#[derive(Debug)]
pub(crate) struct Inflight<W> {
    waiting: BTreeMap<Key, Vec<W>>,
    broken: Option<String>,
}

impl<W> Default for Inflight<W> {
    fn default() -> Self {
        Self { waiting: BTreeMap::new(), broken: None }
    }
}

impl<W> Inflight<W> {
    /// Wait for `key`; refused once the link broke (the request would never be answered).
    pub(crate) fn register(&mut self, key: Key, waiter: W) -> Result<(), String> {
        if let Some(why) = &self.broken {
            return Err(why.clone());
        }
        self.waiting.entry(key).or_default().push(waiter);
        Ok(())
    }

    /// The waiters `ack` answers, with their outcome. Acknowledgements of nothing awaited (late,
    /// after a timeout) answer nobody.
    pub(crate) fn resolve(&mut self, ack: ReplAck) -> Vec<(W, Outcome)> {
        let (keys, outcome): (Vec<Key>, Outcome) = match ack {
            ReplAck::Applied { first, last } => {
                (self.waiting.range(Key::Point(first)..=Key::Point(last)).map(|(k, _)| *k).collect(), Ok(()))
            }
            ReplAck::Refused { seq, reason } => (vec![Key::Point(seq)], Err(reason)),
            ReplAck::Synced { tag } => (vec![Key::Sync(tag)], Ok(())),
            ReplAck::SyncFailed { tag, reason } => (vec![Key::Sync(tag)], Err(reason)),
        };
        let mut out = Vec::new();
        for k in keys {
            for w in self.waiting.remove(&k).unwrap_or_default() {
                out.push((w, outcome.clone()));
            }
        }
        out
    }

    /// The link broke: every waiter fails with `why`, and so does every later registration.
    pub(crate) fn break_all(&mut self, why: String) -> Vec<(W, Outcome)> {
        self.broken.get_or_insert(why.clone());
        let waiting = std::mem::take(&mut self.waiting);
        waiting.into_values().flatten().map(|w| (w, Err(why.clone()))).collect()
    }

    /// Drop the waiters of `key` that `gone` says no longer wait (their caller timed out).
    pub(crate) fn forget(&mut self, key: Key, gone: impl Fn(&W) -> bool) {
        if let Some(ws) = self.waiting.get_mut(&key) {
            ws.retain(|w| !gone(w));
            if ws.is_empty() {
                self.waiting.remove(&key);
            }
        }
    }

    pub(crate) fn is_broken(&self) -> bool {
        self.broken.is_some()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.waiting.len()
    }
}

/// The acknowledgements for the outcomes that completed together: consecutive applied points
/// joined into runs (each point in a run was applied, none is implied), refusals and syncs one
/// by one. Pure.
pub(crate) fn ack_runs(mut done: Vec<(Key, Outcome)>) -> Vec<ReplAck> {
    done.sort_by_key(|(k, _)| *k);
    let mut out: Vec<ReplAck> = Vec::new();
    for (key, outcome) in done {
        let ack = match (key, outcome) {
            (Key::Point(seq), Ok(())) => {
                if let Some(ReplAck::Applied { last, .. }) = out.last_mut() {
                    if seq == *last || seq == *last + 1 {
                        *last = seq;
                        continue;
                    }
                }
                ReplAck::Applied { first: seq, last: seq }
            }
            (Key::Point(seq), Err(r)) => ReplAck::Refused { seq, reason: replication::short_reason(&r) },
            (Key::Sync(tag), Ok(())) => ReplAck::Synced { tag },
            (Key::Sync(tag), Err(r)) => ReplAck::SyncFailed { tag, reason: replication::short_reason(&r) },
        };
        out.push(ack);
    }
    out
}

type Waiter = oneshot::Sender<Outcome>;

/// One primary → replica stream of one volume.
pub(crate) struct Link {
    frames: mpsc::UnboundedSender<Frame>,
    inflight: Arc<Mutex<Inflight<Waiter>>>,
}

fn answer(answers: Vec<(Waiter, Outcome)>) {
    for (w, outcome) in answers {
        let _ = w.send(outcome);
    }
}

fn break_link(inflight: &Mutex<Inflight<Waiter>>, why: String) {
    let answers = inflight.lock().expect("inflight lock").break_all(why);
    answer(answers);
}

/// A primary's replication streams of one volume, one per peer host.
pub(crate) struct Links {
    vol: VolumeId,
    registry: ActorRegistry,
    links: Mutex<HashMap<NodeId, Arc<Link>>>,
    next_tag: AtomicU64,
}

impl Links {
    pub(crate) fn new(vol: VolumeId, registry: ActorRegistry) -> Self {
        Self { vol, registry, links: Mutex::default(), next_tag: AtomicU64::new(1) }
    }

    /// The live link to `host`, opening one if there is none or the last one broke.
    fn link(&self, host: NodeId) -> Arc<Link> {
        let mut links = self.links.lock().expect("links lock");
        if let Some(l) = links.get(&host) {
            if !l.inflight.lock().expect("inflight lock").is_broken() {
                return l.clone();
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let link = Arc::new(Link { frames: tx, inflight: Arc::default() });
        let addr = ActorAddr { node: host, kind: ActorKind::Device, id: self.vol.0 };
        tokio::spawn(run_link(self.registry.clone(), addr, rx, link.inflight.clone()));
        links.insert(host, link.clone());
        metrics::counter!("haven_volume_replication_streams_opened_total").increment(1);
        link
    }

    /// Close every stream (this host stopped being primary); writes in flight still get their
    /// answers or fail when their stream ends.
    pub(crate) fn close_all(&self) {
        self.links.lock().expect("links lock").clear();
    }

    /// Send write `seq`'s frame to `host` and wait for its acknowledgement, at most `timeout`.
    pub(crate) async fn point(&self, host: NodeId, seq: u64, frame: Frame, timeout: Duration) -> Outcome {
        self.request(host, Key::Point(seq), frame, timeout).await
    }

    /// Fsync `host`'s WAL (after every frame sent to it before), at most `timeout`.
    pub(crate) async fn sync(&self, host: NodeId, epoch: u64, timeout: Duration) -> Outcome {
        let tag = self.next_tag.fetch_add(1, Ordering::Relaxed);
        let frame = encode(&ReplRequest::Sync { epoch, tag })?;
        self.request(host, Key::Sync(tag), frame, timeout).await
    }

    async fn request(&self, host: NodeId, key: Key, frame: Frame, timeout: Duration) -> Outcome {
        let link = self.link(host);
        let (tx, rx) = oneshot::channel();
        link.inflight.lock().expect("inflight lock").register(key, tx)?;
        if link.frames.send(frame).is_err() {
            break_link(&link.inflight, "the replication stream's writer ended".into());
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => Err("the replication stream ended".into()),
            Err(_) => {
                link.inflight.lock().expect("inflight lock").forget(key, |w| w.is_closed());
                Err(format!("{host} did not acknowledge within {timeout:?}"))
            }
        }
    }
}

/// A link's writer: open the stream, then send what is queued, every frame queued while a write
/// was under way in the next single write. Ends when the link is dropped (the stream is then
/// finished) or breaks.
async fn run_link(
    registry: ActorRegistry,
    addr: ActorAddr,
    mut frames: mpsc::UnboundedReceiver<Frame>,
    inflight: Arc<Mutex<Inflight<Waiter>>>,
) {
    let hello = ActorMessage::Device(DeviceMessage::ReplicationStream { volume: haven_proto::VolumeId(addr.id) });
    let (mut send, recv) = match registry.open_stream(addr, hello).await {
        Ok(s) => s,
        Err(e) => {
            warn!(%addr, error = %e, "cannot open a replication stream");
            return break_link(&inflight, format!("cannot open a replication stream to {}: {e}", addr.node));
        }
    };
    // Ahead of migration pages on the shared bulk connection.
    let _ = send.set_priority(0);
    let mut reader = tokio::spawn(read_acks(recv, inflight.clone(), addr.node));
    let mut batch = Vec::with_capacity(MAX_FRAMES_PER_WRITE);
    loop {
        let n = tokio::select! {
            n = frames.recv_many(&mut batch, MAX_FRAMES_PER_WRITE) => n,
            _ = &mut reader => return,
        };
        if n == 0 {
            let _ = send.finish();
            return;
        }
        let mut chunks: Vec<Bytes> = Vec::with_capacity(2 * batch.len());
        for f in batch.drain(..) {
            chunks.push(Bytes::copy_from_slice(&f.header));
            chunks.push(f.body);
        }
        metrics::histogram!("haven_volume_replication_frames_per_write").record(n as f64);
        if let Err(e) = send.write_all_chunks(&mut chunks).await {
            reader.abort();
            return break_link(&inflight, format!("replication stream to {} broke: {e}", addr.node));
        }
    }
}

/// A link's reader: resolve the waiters each acknowledgement frame answers, until the stream
/// ends; then the link is broken (nothing more will be answered on it).
async fn read_acks(mut recv: quinn::RecvStream, inflight: Arc<Mutex<Inflight<Waiter>>>, host: NodeId) {
    let why = loop {
        let buf = match read_frame(&mut recv, |_| async {}).await {
            Ok(Some((buf, ()))) => buf,
            Ok(None) => break format!("{host} closed the replication stream"),
            Err(e) => break format!("replication stream from {host}: {e}"),
        };
        match replication::decode_acks(&buf) {
            Ok(acks) => {
                let answers = {
                    let mut inflight = inflight.lock().expect("inflight lock");
                    acks.acks.into_iter().flat_map(|a| inflight.resolve(a)).collect::<Vec<_>>()
                };
                answer(answers);
            }
            Err(e) => {
                warn!(%host, error = %e, "bad acknowledgement frame; closing the replication stream");
                metrics::counter!("haven_volume_replication_bad_frames_total").increment(1);
                let _ = recv.stop(RESET_REFUSED.into());
                break format!("{host} sent a bad acknowledgement frame: {e}");
            }
        }
    };
    debug!(%host, why, "replication stream reader ended");
    break_link(&inflight, why);
}

/// Why reading a frame failed.
#[derive(Debug, thiserror::Error)]
enum FrameError {
    #[error("{0}")]
    Proto(#[from] ProtoError),
    #[error("read failed: {0}")]
    Read(String),
    #[error("frame body not received within the deadline")]
    TooSlow,
}

/// Read one frame: `Ok(None)` at a clean end between frames. `reserve` runs once the length is
/// known and before the body is read (a replica takes in-flight room there); its value is
/// returned with the body, which must arrive within [`FRAME_DEADLINE`] of the header.
async fn read_frame<T, F: std::future::Future<Output = T>>(
    recv: &mut quinn::RecvStream,
    reserve: impl FnOnce(usize) -> F,
) -> Result<Option<(rkyv::util::AlignedVec, T)>, FrameError> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(got)) => {
            return Err(ProtoError::Truncated { expected: FRAME_HEADER_LEN, got }.into())
        }
        Err(quinn::ReadExactError::ReadError(e)) => return Err(FrameError::Read(e.to_string())),
    }
    let len = FrameHeader::parse(header, MAX_FRAME_LEN)?.len;
    let reserved = reserve(len).await;
    match tokio::time::timeout(FRAME_DEADLINE, wire::read_body(recv, len)).await {
        Ok(Ok(buf)) => Ok(Some((buf, reserved))),
        Ok(Err(wire::WireIoError::Proto(p))) => Err(p.into()),
        Ok(Err(e)) => Err(FrameError::Read(e.to_string())),
        Err(_) => Err(FrameError::TooSlow),
    }
}

/// Route an inbound bulk stream that opened with a `ReplicationStream` envelope.
pub fn stream_handler(host: Arc<VolumeHost>) -> crate::transport::StreamHandler {
    Arc::new(move |env, send, recv| {
        let host = host.clone();
        Box::pin(async move {
            match env.body {
                Body::Actor(ActorMessage::Device(DeviceMessage::ReplicationStream { volume }))
                    if env.dest.kind == ActorKind::Device && env.dest.id == volume.0 =>
                {
                    serve(host, env.sender, volume, send, recv).await
                }
                other => {
                    warn!(kind = other.kind().as_str(), "unexpected device stream; refused");
                    refuse(send, recv);
                }
            }
        })
    })
}

fn refuse(mut send: quinn::SendStream, mut recv: quinn::RecvStream) {
    let _ = send.reset(RESET_REFUSED.into());
    let _ = recv.stop(RESET_REFUSED.into());
}

/// One request admitted on a replica, and the in-flight room its frame holds until answered.
type Admitted = BoxFuture<'static, (Key, Outcome)>;

/// Replica side of one stream: apply what `from` sends for `vol` until the stream ends.
pub async fn serve(
    host: Arc<VolumeHost>,
    from: NodeId,
    vol: VolumeId,
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) {
    let Some(engine) = wait_for_engine(&host, vol).await else {
        warn!(%vol, %from, "replication stream for a volume this host does not hold; refused");
        return refuse(send, recv);
    };
    let room = Arc::new(Semaphore::new(MAX_UNANSWERED_BYTES));
    let (tx, rx) = mpsc::unbounded_channel::<Admitted>();
    let mut responder = tokio::spawn(respond(send, rx));
    loop {
        let reserve = |len: usize| {
            let room = room.clone();
            async move { room.acquire_many_owned(len as u32).await.expect("never closed") }
        };
        let read = tokio::select! {
            r = read_frame(&mut recv, reserve) => r,
            _ = &mut responder => return,
        };
        let (buf, permit) = match read {
            Ok(Some(got)) => got,
            Ok(None) => break,
            Err(e) => {
                if matches!(e, FrameError::Proto(_)) {
                    warn!(%vol, %from, error = %e, "bad replication frame; closing the stream");
                    metrics::counter!("haven_volume_replication_bad_frames_total").increment(1);
                }
                responder.abort();
                let _ = recv.stop(RESET_REFUSED.into());
                return;
            }
        };
        match replication::decode_request(&buf) {
            Ok(req) => {
                drop(buf);
                let _ = tx.send(admit(&engine, req, permit));
            }
            Err(e) => {
                warn!(%vol, %from, error = %e, "bad replication frame; closing the stream");
                metrics::counter!("haven_volume_replication_bad_frames_total").increment(1);
                responder.abort();
                let _ = recv.stop(RESET_REFUSED.into());
                return;
            }
        }
    }
    drop(tx);
    let _ = responder.await;
}

/// Admit `req` to the engine now (in stream order) and return the future of its answer.
fn admit(engine: &Arc<VolumeReplica>, req: ReplRequest, permit: OwnedSemaphorePermit) -> Admitted {
    let key = match &req {
        ReplRequest::Write { seq, .. } | ReplRequest::Zero { seq, .. } => Key::Point(*seq),
        ReplRequest::Sync { tag, .. } => Key::Sync(*tag),
    };
    let applying = engine.replicated(req);
    async move {
        let outcome = applying.await.map_err(|e| e.to_string());
        drop(permit);
        (key, outcome)
    }
    .boxed()
}

/// The engine of `vol` on this host, waiting a moment for one the host has not started yet (it
/// polls the catalog, and a new primary may open its stream first).
async fn wait_for_engine(host: &VolumeHost, vol: VolumeId) -> Option<Arc<VolumeReplica>> {
    let deadline = tokio::time::Instant::now() + Duration::from_millis(host.tunables.replica_ack_timeout_ms);
    loop {
        if let Some(e) = host.engine(vol) {
            return Some(e);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Answer admitted requests as they complete: whatever completed together goes out in one
/// frame. Finishes the stream once the reader is done and every request is answered.
async fn respond(mut send: quinn::SendStream, mut admitted: mpsc::UnboundedReceiver<Admitted>) {
    let mut pending = FuturesUnordered::new();
    let mut open = true;
    while open || !pending.is_empty() {
        tokio::select! {
            got = admitted.recv(), if open => match got {
                Some(f) => pending.push(f),
                None => open = false,
            },
            Some(first) = pending.next(), if !pending.is_empty() => {
                let mut done = vec![first];
                while let Some(Some(d)) = pending.next().now_or_never() {
                    done.push(d);
                }
                if let Err(e) = write_acks(&mut send, ack_runs(done)).await {
                    debug!(error = %e, "replication stream closed while answering");
                    return;
                }
            }
        }
    }
    let _ = send.finish();
}

async fn write_acks(send: &mut quinn::SendStream, acks: Vec<ReplAck>) -> Result<(), String> {
    let mut chunks = Vec::new();
    for part in acks.chunks(MAX_ACKS_PER_FRAME) {
        let body = replication::encode_acks(&ReplAcks { acks: part.to_vec() }).map_err(|e| e.to_string())?;
        let header = FrameHeader::encode(body.len()).map_err(|e| e.to_string())?;
        chunks.push(Bytes::copy_from_slice(&header));
        chunks.push(Bytes::from_owner(body));
    }
    send.write_all_chunks(&mut chunks).await.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(seq: u64) -> (Key, Outcome) {
        (Key::Point(seq), Ok(()))
    }

    #[test]
    fn completed_points_are_acknowledged_as_runs_of_what_was_applied() {
        let done =
            vec![ok(7), ok(5), ok(6), (Key::Point(8), Err("stale".into())), ok(9), ok(11), (Key::Sync(3), Ok(()))];
        assert_eq!(
            ack_runs(done),
            vec![
                ReplAck::Applied { first: 5, last: 7 },
                ReplAck::Refused { seq: 8, reason: "stale".into() },
                ReplAck::Applied { first: 9, last: 9 },
                ReplAck::Applied { first: 11, last: 11 },
                ReplAck::Synced { tag: 3 },
            ]
        );
        // A point sent twice (to an in-sync replica and as a forward) stays one run.
        assert_eq!(ack_runs(vec![ok(2), ok(2), ok(3)]), vec![ReplAck::Applied { first: 2, last: 3 }]);
        assert!(ack_runs(vec![]).is_empty());
    }

    #[test]
    fn a_run_answers_only_the_points_waited_for_inside_it() {
        let mut f: Inflight<u32> = Inflight::default();
        for (i, seq) in [4, 5, 6, 9].into_iter().enumerate() {
            f.register(Key::Point(seq), i as u32).unwrap();
        }
        f.register(Key::Sync(5), 99).unwrap();
        let got = f.resolve(ReplAck::Applied { first: 5, last: 8 });
        assert_eq!(got, vec![(1, Ok(())), (2, Ok(()))]);
        assert_eq!(f.resolve(ReplAck::Refused { seq: 9, reason: "no".into() }), vec![(3, Err("no".into()))]);
        assert!(f.resolve(ReplAck::Applied { first: 5, last: 5 }).is_empty(), "a late duplicate answers nobody");
        assert_eq!(f.resolve(ReplAck::Synced { tag: 5 }), vec![(99, Ok(()))]);
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn a_broken_link_fails_what_waits_and_refuses_what_comes() {
        let mut f: Inflight<u32> = Inflight::default();
        f.register(Key::Point(1), 1).unwrap();
        f.register(Key::Point(1), 2).unwrap();
        f.register(Key::Sync(1), 3).unwrap();
        let failed = f.break_all("gone".into());
        assert_eq!(failed.len(), 3);
        assert!(failed.iter().all(|(_, o)| o == &Err("gone".to_string())));
        assert_eq!(f.register(Key::Point(2), 4), Err("gone".into()));
        assert!(f.is_broken());
    }

    #[test]
    fn a_timed_out_waiter_is_forgotten() {
        let mut f: Inflight<u32> = Inflight::default();
        f.register(Key::Point(1), 1).unwrap();
        f.register(Key::Point(1), 2).unwrap();
        f.forget(Key::Point(1), |w| *w == 1);
        assert_eq!(f.resolve(ReplAck::Applied { first: 1, last: 1 }), vec![(2, Ok(()))]);
        f.register(Key::Point(3), 3).unwrap();
        f.forget(Key::Point(3), |_| true);
        assert_eq!(f.len(), 0);
    }
}
