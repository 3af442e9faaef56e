//! NBD server end to end: the stock qemu tools (`qemu-io`, `qemu-img`) against an in-memory
//! export, and a small hand-written raw-socket client for the malformed requests no well-behaved
//! client sends. The raw client encodes bytes itself rather than through `nbd::protocol`, so the
//! server's encoder and the test cannot share a mistake.
//!
//! The qemu tools are required: a missing tool fails the test (CI installs qemu-utils).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use haven_node::nbd::{
    serve, BackendError, ExportBackend, ExportInfo, ExportListing, ExportResolver, NbdErrno, NbdServerConfig,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;
const DISK_SIZE: usize = 4 * MIB;
const RO_SIZE: usize = MIB;
const BLOCK: u32 = 512;
/// Small enough that an oversized write is cheap to provoke.
const MAX_PAYLOAD: u32 = MIB as u32;
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

// Wire values, spelled out independently of `haven_node::nbd::protocol`.
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;
const REP_ERR_TOO_BIG: u32 = 0x8000_0009;
const INFO_EXPORT: u16 = 0;
const INFO_NAME: u16 = 1;
const INFO_DESCRIPTION: u16 = 2;
const INFO_BLOCK_SIZE: u16 = 3;
const TF_HAS_FLAGS: u16 = 1;
const TF_READ_ONLY: u16 = 2;
const TF_SEND_FLUSH: u16 = 4;
const TF_SEND_FUA: u16 = 8;
const TF_SEND_TRIM: u16 = 32;
const TF_SEND_WRITE_ZEROES: u16 = 64;
const TF_CAN_MULTI_CONN: u16 = 256;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_FLAG_FUA: u16 = 1;
const CMD_FLAG_DF: u16 = 4;
const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const EOVERFLOW: u32 = 75;

// ---------------------------------------------------------------------------------------------
// In-memory export and resolver.

#[derive(Default)]
struct Counters {
    reads: AtomicUsize,
    writes: AtomicUsize,
    fua_writes: AtomicUsize,
    zeroes: AtomicUsize,
    trims: AtomicUsize,
    flushes: AtomicUsize,
    /// Calls the server should have refused before reaching the backend.
    violations: AtomicUsize,
}

struct MemInner {
    data: Mutex<Vec<u8>>,
    info: ExportInfo,
    counters: Counters,
}

#[derive(Clone)]
struct MemExport(Arc<MemInner>);

impl MemExport {
    fn new(size: usize, fill: u8, read_only: bool, description: &str) -> Self {
        Self(Arc::new(MemInner {
            data: Mutex::new(vec![fill; size]),
            info: ExportInfo { size: size as u64, block_size: BLOCK, read_only, description: description.into() },
            counters: Counters::default(),
        }))
    }

    fn snapshot(&self) -> Vec<u8> {
        self.0.data.lock().unwrap().clone()
    }

    fn set(&self, data: &[u8]) {
        self.0.data.lock().unwrap().copy_from_slice(data);
    }

    fn count(&self, f: impl Fn(&Counters) -> &AtomicUsize) -> usize {
        f(&self.0.counters).load(Ordering::SeqCst)
    }

    /// The checks the server promises to make before calling us.
    fn check(&self, offset: u64, len: u64, modifies: bool) -> Result<std::ops::Range<usize>, BackendError> {
        let info = &self.0.info;
        let ok = len > 0
            && offset.is_multiple_of(u64::from(BLOCK))
            && len.is_multiple_of(u64::from(BLOCK))
            && offset.checked_add(len).is_some_and(|end| end <= info.size)
            && !(modifies && info.read_only);
        if !ok {
            self.0.counters.violations.fetch_add(1, Ordering::SeqCst);
            return Err(BackendError::new(NbdErrno::Io, "request should have been refused by the server"));
        }
        Ok(offset as usize..(offset + len) as usize)
    }
}

impl ExportBackend for MemExport {
    fn info(&self) -> ExportInfo {
        self.0.info.clone()
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'static, Result<Vec<u8>, BackendError>> {
        let this = self.clone();
        Box::pin(async move {
            let range = this.check(offset, len.into(), false)?;
            this.0.counters.reads.fetch_add(1, Ordering::SeqCst);
            Ok(this.0.data.lock().unwrap()[range].to_vec())
        })
    }

    fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> BoxFuture<'static, Result<(), BackendError>> {
        let this = self.clone();
        Box::pin(async move {
            let range = this.check(offset, data.len() as u64, true)?;
            this.0.counters.writes.fetch_add(1, Ordering::SeqCst);
            if fua {
                this.0.counters.fua_writes.fetch_add(1, Ordering::SeqCst);
            }
            this.0.data.lock().unwrap()[range].copy_from_slice(&data);
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u32, _fua: bool) -> BoxFuture<'static, Result<(), BackendError>> {
        let this = self.clone();
        Box::pin(async move {
            let range = this.check(offset, len.into(), true)?;
            this.0.counters.zeroes.fetch_add(1, Ordering::SeqCst);
            this.0.data.lock().unwrap()[range].fill(0);
            Ok(())
        })
    }

    fn trim(&self, offset: u64, len: u32) -> BoxFuture<'static, Result<(), BackendError>> {
        let this = self.clone();
        Box::pin(async move {
            let range = this.check(offset, len.into(), true)?;
            this.0.counters.trims.fetch_add(1, Ordering::SeqCst);
            // Trimmed blocks read back as zeroes in this backend.
            this.0.data.lock().unwrap()[range].fill(0);
            Ok(())
        })
    }

    fn flush(&self) -> BoxFuture<'static, Result<(), BackendError>> {
        let this = self.clone();
        Box::pin(async move {
            this.0.counters.flushes.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
    }
}

struct Resolver {
    exports: HashMap<String, MemExport>,
}

impl ExportResolver for Resolver {
    fn list(&self) -> BoxFuture<'static, Result<Vec<ExportListing>, BackendError>> {
        let mut exports: Vec<ExportListing> = self
            .exports
            .iter()
            .map(|(name, e)| ExportListing { name: name.clone(), read_only: e.0.info.read_only })
            .collect();
        exports.sort_by(|a, b| a.name.cmp(&b.name));
        Box::pin(async move { Ok(exports) })
    }

    fn open(&self, name: &str) -> BoxFuture<'static, Result<Arc<dyn ExportBackend>, BackendError>> {
        let found = self.exports.get(name).cloned();
        let name = name.to_string();
        Box::pin(async move {
            match found {
                Some(export) => Ok(Arc::new(export) as Arc<dyn ExportBackend>),
                None => Err(BackendError::new(NbdErrno::Inval, format!("no export named '{name}'"))),
            }
        })
    }
}

/// A running server with a read-write export "disk" (4 MiB, zeroes) and a read-only export
/// "ro" (1 MiB of 0x5a).
struct Harness {
    addr: SocketAddr,
    disk: MemExport,
    ro: MemExport,
    stop: Option<oneshot::Sender<()>>,
    server: JoinHandle<()>,
}

impl Harness {
    async fn start() -> Self {
        Self::start_with(NbdServerConfig { max_payload: MAX_PAYLOAD, ..NbdServerConfig::default() }).await
    }

    async fn start_with(config: NbdServerConfig) -> Self {
        let disk = MemExport::new(DISK_SIZE, 0, false, "test disk");
        let ro = MemExport::new(RO_SIZE, 0x5a, true, "");
        let resolver =
            Resolver { exports: HashMap::from([("disk".to_string(), disk.clone()), ("ro".to_string(), ro.clone())]) };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, Arc::new(resolver), config, async move {
            let _ = stopped.await;
        }));
        Self { addr, disk, ro, stop: Some(stop), server }
    }

    fn url(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.addr)
    }

    fn assert_no_violations(&self) {
        assert_eq!(self.disk.count(|c| &c.violations), 0, "backend saw a request the server should have refused");
        assert_eq!(self.ro.count(|c| &c.violations), 0, "backend saw a request the server should have refused");
    }

    async fn shutdown(mut self) {
        self.assert_no_violations();
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(IO_TIMEOUT, self.server).await.expect("server did not stop").unwrap();
    }
}

// ---------------------------------------------------------------------------------------------
// Running the qemu tools.

async fn tool(program: &str, args: &[&str]) -> Output {
    let child = tokio::process::Command::new(program).args(args).kill_on_drop(true).output();
    match tokio::time::timeout(TOOL_TIMEOUT, child).await {
        Err(_) => panic!("{program} {args:?} timed out"),
        Ok(Err(e)) => panic!("cannot run {program} (is qemu-utils installed? it is required): {e}"),
        Ok(Ok(out)) => out,
    }
}

fn text(out: &Output) -> String {
    format!(
        "status: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The tool succeeded and reported no failure in its output.
fn assert_ok(out: &Output) {
    let all = text(out);
    let lower =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)).to_lowercase();
    assert!(out.status.success(), "tool failed:\n{all}");
    assert!(!lower.contains("pattern verification failed"), "pattern mismatch:\n{all}");
    assert!(!lower.contains("error"), "tool reported an error:\n{all}");
    assert!(!lower.contains("failed"), "tool reported a failure:\n{all}");
}

async fn qemu_io(extra: &[&str], url: &str, cmds: &[&str]) -> Output {
    let mut args: Vec<&str> = extra.to_vec();
    args.extend(["-f", "raw", url]);
    for c in cmds {
        args.extend(["-c", c]);
    }
    tool("qemu-io", &args).await
}

// ---------------------------------------------------------------------------------------------
// A raw NBD client for what qemu will not send.

struct Raw {
    s: TcpStream,
}

async fn timed<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(IO_TIMEOUT, f).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}

impl Raw {
    /// Connect and do the greeting with the given client flags (1 = fixed newstyle, 2 = no zeroes).
    async fn connect_with_flags(addr: SocketAddr, flags: u32) -> Self {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut greeting = [0u8; 18];
        timed("greeting", s.read_exact(&mut greeting)).await.unwrap();
        assert_eq!(&greeting[0..8], b"NBDMAGIC");
        assert_eq!(&greeting[8..16], b"IHAVEOPT");
        let hs_flags = u16::from_be_bytes([greeting[16], greeting[17]]);
        assert_eq!(hs_flags & 3, 3, "server must offer FIXED_NEWSTYLE and NO_ZEROES");
        s.write_all(&flags.to_be_bytes()).await.unwrap();
        Self { s }
    }

    async fn connect(addr: SocketAddr) -> Self {
        Self::connect_with_flags(addr, 3).await
    }

    /// Connect with a small receive buffer, so the kernel cannot soak up many unread replies.
    async fn connect_small_window(addr: SocketAddr) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(16 * KIB as u32).unwrap();
        let mut s = socket.connect(addr).await.unwrap();
        let mut greeting = [0u8; 18];
        timed("greeting", s.read_exact(&mut greeting)).await.unwrap();
        s.write_all(&3u32.to_be_bytes()).await.unwrap();
        Self { s }
    }

    async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut msg = IHAVEOPT.to_be_bytes().to_vec();
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        self.s.write_all(&msg).await.unwrap();
    }

    /// One option reply: (option, reply type, data).
    async fn option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        timed("option reply", self.s.read_exact(&mut h)).await.unwrap();
        assert_eq!(u64::from_be_bytes(h[0..8].try_into().unwrap()), OPT_REPLY_MAGIC);
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        timed("option reply data", self.s.read_exact(&mut data)).await.unwrap();
        (option, ty, data)
    }

    fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// NBD_OPT_INFO or NBD_OPT_GO; `Ok` with every NBD_REP_INFO (type, data) up to the ACK, or
    /// `Err((reply type, message))`.
    async fn info_or_go(
        &mut self,
        option: u32,
        name: &str,
        infos: &[u16],
    ) -> Result<Vec<(u16, Vec<u8>)>, (u32, String)> {
        self.send_option(option, &Self::info_data(name, infos)).await;
        let mut got = Vec::new();
        loop {
            let (opt, ty, data) = self.option_reply().await;
            assert_eq!(opt, option);
            match ty {
                REP_INFO => got.push((u16::from_be_bytes([data[0], data[1]]), data[2..].to_vec())),
                REP_ACK => return Ok(got),
                err => return Err((err, String::from_utf8(data).unwrap())),
            }
        }
    }

    /// NBD_OPT_GO; returns (size, transmission flags).
    async fn go(&mut self, name: &str) -> (u64, u16) {
        let infos = self.info_or_go(OPT_GO, name, &[INFO_BLOCK_SIZE]).await.expect("GO refused");
        let export = infos.iter().find(|(t, _)| *t == INFO_EXPORT).expect("no NBD_INFO_EXPORT");
        let size = u64::from_be_bytes(export.1[0..8].try_into().unwrap());
        let flags = u16::from_be_bytes(export.1[8..10].try_into().unwrap());
        (size, flags)
    }

    async fn open(addr: SocketAddr, name: &str) -> Self {
        let mut raw = Self::connect(addr).await;
        raw.go(name).await;
        raw
    }

    fn request_bytes(kind: u16, flags: u16, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut r = REQUEST_MAGIC.to_be_bytes().to_vec();
        r.extend_from_slice(&flags.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&handle.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&len.to_be_bytes());
        r
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    /// A simple reply header: (error, handle).
    async fn reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        timed("simple reply", self.s.read_exact(&mut h)).await.unwrap();
        assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), SIMPLE_REPLY_MAGIC);
        (u32::from_be_bytes(h[4..8].try_into().unwrap()), u64::from_be_bytes(h[8..16].try_into().unwrap()))
    }

    async fn read_data(&mut self, len: usize) -> Vec<u8> {
        let mut d = vec![0u8; len];
        timed("read data", self.s.read_exact(&mut d)).await.unwrap();
        d
    }

    /// One request, waiting for its reply: the error, and the data of a successful read.
    async fn call(&mut self, kind: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> (u32, Vec<u8>) {
        let mut msg = Self::request_bytes(kind, flags, 77, offset, len);
        msg.extend_from_slice(payload);
        self.send(&msg).await;
        let (err, handle) = self.reply().await;
        assert_eq!(handle, 77);
        let data = if kind == CMD_READ && err == 0 { self.read_data(len as usize).await } else { Vec::new() };
        (err, data)
    }

    /// The server closed the connection: EOF (or a reset) within the timeout.
    async fn assert_closed(&mut self) {
        let mut buf = [0u8; 64];
        match timed("connection close", self.s.read(&mut buf)).await {
            Ok(0) => {}
            Ok(n) => panic!("expected the connection to be closed, got {n} more bytes: {:?}", &buf[..n]),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "unexpected error {e}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Tests with the stock tools.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_write_read_flush_zeroes_discard() {
    let h = Harness::start().await;
    let url = h.url("disk");
    let out = qemu_io(
        &["-d", "unmap"],
        &url,
        &[
            "write -P 0xab 0 64k",
            "read -P 0xab 0 64k",
            "write -f -P 0xcd 64k 64k",
            "flush",
            "write -z 64k 32k",
            "read -P 0 64k 32k",
            "read -P 0xcd 96k 32k",
            "write -P 0xee 1M 1M",
            "read -P 0xee 1M 1M",
            "discard 1M 64k",
            "read -P 0 1M 64k",
            "read -P 0xee 1088k 960k",
        ],
    )
    .await;
    assert_ok(&out);

    let data = h.disk.snapshot();
    assert!(data[..64 * KIB].iter().all(|b| *b == 0xab));
    assert!(data[64 * KIB..96 * KIB].iter().all(|b| *b == 0));
    assert!(data[96 * KIB..128 * KIB].iter().all(|b| *b == 0xcd));
    assert!(data[128 * KIB..MIB].iter().all(|b| *b == 0));
    assert!(data[MIB..MIB + 64 * KIB].iter().all(|b| *b == 0));
    assert!(data[MIB + 64 * KIB..2 * MIB].iter().all(|b| *b == 0xee));
    assert!(data[2 * MIB..].iter().all(|b| *b == 0));
    assert!(h.disk.count(|c| &c.fua_writes) >= 1, "write -f should arrive with FUA");
    assert!(h.disk.count(|c| &c.flushes) >= 1, "flush should reach the backend");
    assert!(h.disk.count(|c| &c.zeroes) >= 1, "write -z should arrive as NBD_CMD_WRITE_ZEROES");
    assert!(h.disk.count(|c| &c.trims) >= 1, "discard should arrive as NBD_CMD_TRIM");
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_compare_and_info() {
    let h = Harness::start().await;
    let url = h.url("disk");
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let back = dir.path().join("back.raw");
    // Pseudo-random data with a zero stretch in the middle (exercises zero detection).
    let mut image = vec![0u8; DISK_SIZE];
    let mut x: u32 = 0x1234_5678;
    for (i, b) in image.iter_mut().enumerate() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        if !(MIB..2 * MIB).contains(&i) {
            *b = x as u8;
        }
    }
    std::fs::write(&src, &image).unwrap();
    let src_s = src.to_str().unwrap();
    let back_s = back.to_str().unwrap();

    let info = tool("qemu-img", &["info", "-f", "raw", &url]).await;
    assert_ok(&info);
    let info_text = String::from_utf8_lossy(&info.stdout);
    assert!(info_text.contains("virtual size: 4 MiB"), "unexpected qemu-img info:\n{info_text}");

    assert_ok(&tool("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", src_s, &url]).await);
    assert!(h.disk.snapshot() == image, "export content differs from the converted image");
    assert_ok(&tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", src_s, &url]).await);
    assert_ok(&tool("qemu-img", &["convert", "-f", "raw", "-O", "raw", &url, back_s]).await);
    assert!(std::fs::read(&back).unwrap() == image, "image copied out differs");

    // A difference is noticed (compare exits 1).
    h.disk.0.data.lock().unwrap()[3 * MIB] ^= 0xff;
    let cmp = tool("qemu-img", &["compare", "-f", "raw", "-F", "raw", src_s, &url]).await;
    assert_eq!(cmp.status.code(), Some(1), "compare should see the difference:\n{}", text(&cmp));
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_connections() {
    let h = Harness::start().await;
    let url = h.url("disk");
    let (a, b) = tokio::join!(
        qemu_io(&[], &url, &["write -P 0x11 0 1M", "read -P 0x11 0 1M", "flush", "read -P 0x11 0 1M"]),
        qemu_io(&[], &url, &["write -P 0x22 1M 1M", "read -P 0x22 1M 1M", "flush", "read -P 0x22 1M 1M"]),
    );
    assert_ok(&a);
    assert_ok(&b);
    let data = h.disk.snapshot();
    assert!(data[..MIB].iter().all(|x| *x == 0x11));
    assert!(data[MIB..2 * MIB].iter().all(|x| *x == 0x22));

    // And two raw connections at once, each with a pipeline of requests in flight.
    let mut image = vec![0u8; DISK_SIZE];
    for (i, block) in image.chunks_mut(64 * KIB).enumerate() {
        block.fill(i as u8);
    }
    h.disk.set(&image);
    let (mut c1, mut c2) = tokio::join!(Raw::open(h.addr, "disk"), Raw::open(h.addr, "disk"));
    tokio::join!(pipelined_reads(&mut c1, 0, &image), pipelined_reads(&mut c2, 32, &image));
    h.shutdown().await;
}

/// 32 reads of 64 KiB blocks `start..start + 32` sent in one write; replies may come in any order.
async fn pipelined_reads(raw: &mut Raw, start: usize, image: &[u8]) {
    let mut msg = Vec::new();
    for i in 0..32u64 {
        msg.extend(Raw::request_bytes(CMD_READ, 0, i, (start as u64 + i) * 64 * KIB as u64, 64 * KIB as u32));
    }
    raw.send(&msg).await;
    let mut seen = [false; 32];
    for _ in 0..32 {
        let (err, handle) = raw.reply().await;
        assert_eq!(err, 0);
        let data = raw.read_data(64 * KIB).await;
        let block = start + handle as usize;
        assert!(data == image[block * 64 * KIB..(block + 1) * 64 * KIB], "wrong data for handle {handle}");
        assert!(!seen[handle as usize], "duplicate reply for handle {handle}");
        seen[handle as usize] = true;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_export_fails_cleanly() {
    let h = Harness::start().await;
    let out = qemu_io(&[], &h.url("nope"), &["read 0 4k"]).await;
    assert!(!out.status.success(), "qemu-io on an unknown export should fail:\n{}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no export named 'nope'"), "the resolver's message should reach the client:\n{stderr}");

    // By hand: NBD_REP_ERR_UNKNOWN with the message, and the connection stays usable.
    let mut raw = Raw::connect(h.addr).await;
    let err = raw.info_or_go(OPT_GO, "nope", &[]).await.unwrap_err();
    assert_eq!(err, (REP_ERR_UNKNOWN, "no export named 'nope'".to_string()));
    let err = raw.info_or_go(OPT_INFO, "also-nope", &[]).await.unwrap_err();
    assert_eq!(err.0, REP_ERR_UNKNOWN);
    raw.send_option(OPT_LIST, &[]).await;
    let mut names = Vec::new();
    loop {
        let (opt, ty, data) = raw.option_reply().await;
        assert_eq!(opt, OPT_LIST);
        match ty {
            REP_SERVER => {
                let len = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
                names.push(String::from_utf8(data[4..4 + len].to_vec()).unwrap());
            }
            REP_ACK => break,
            other => panic!("unexpected reply {other:#x} to NBD_OPT_LIST"),
        }
    }
    assert_eq!(names, ["disk", "ro"]);
    let (size, _) = raw.go("disk").await;
    assert_eq!(size, DISK_SIZE as u64);
    assert_eq!(raw.call(CMD_READ, 0, 0, 512, &[]).await, (0, vec![0; 512]));

    // The server still serves qemu afterwards.
    assert_ok(&qemu_io(&[], &h.url("disk"), &["read -P 0 0 4k"]).await);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_export_refuses_writes() {
    let h = Harness::start().await;
    let url = h.url("ro");
    assert_ok(&qemu_io(&["-r"], &url, &["read -P 0x5a 0 64k", "read -P 0x5a 960k 64k"]).await);
    let out = qemu_io(&[], &url, &["write -P 0x00 0 4k"]).await;
    // qemu sees NBD_FLAG_READ_ONLY and refuses to open the export for writing.
    assert!(!out.status.success(), "opening a read-only export for writing must fail:\n{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"), "{}", text(&out));

    let mut raw = Raw::connect(h.addr).await;
    let (size, flags) = raw.go("ro").await;
    assert_eq!(size, RO_SIZE as u64);
    assert_ne!(flags & TF_READ_ONLY, 0, "read-only export must advertise NBD_FLAG_READ_ONLY");
    assert_eq!(raw.call(CMD_WRITE, 0, 0, 4096, &[0u8; 4096]).await.0, EPERM);
    assert_eq!(raw.call(CMD_WRITE, CMD_FLAG_FUA, 4096, 512, &[1u8; 512]).await.0, EPERM);
    assert_eq!(raw.call(CMD_TRIM, 0, 0, 4096, &[]).await.0, EPERM);
    assert_eq!(raw.call(CMD_WRITE_ZEROES, 0, 0, 4096, &[]).await.0, EPERM);
    // The refused payloads were consumed: the stream is still framed.
    assert_eq!(raw.call(CMD_READ, 0, 0, 4096, &[]).await, (0, vec![0x5a; 4096]));
    assert_eq!(raw.call(CMD_FLUSH, 0, 0, 0, &[]).await.0, 0);
    raw.send(&Raw::request_bytes(CMD_DISC, 0, 1, 0, 0)).await;
    raw.assert_closed().await;

    assert!(h.ro.snapshot().iter().all(|b| *b == 0x5a), "read-only data changed");
    assert_eq!(h.ro.count(|c| &c.writes) + h.ro.count(|c| &c.trims) + h.ro.count(|c| &c.zeroes), 0);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_are_refused() {
    let h = Harness::start().await;
    let mut image = vec![0u8; DISK_SIZE];
    for (i, b) in image.iter_mut().enumerate() {
        *b = (i / 512) as u8;
    }
    h.disk.set(&image);
    let size = DISK_SIZE as u64;
    let mut raw = Raw::open(h.addr, "disk").await;

    // (what, kind, flags, offset, len, payload bytes to send, expected error)
    let cases: Vec<(&str, u16, u16, u64, u32, usize, u32)> = vec![
        ("unaligned read offset", CMD_READ, 0, 1, 512, 0, EINVAL),
        ("unaligned read length", CMD_READ, 0, 0, 100, 0, EINVAL),
        ("zero-length read", CMD_READ, 0, 0, 0, 0, EINVAL),
        ("read past end", CMD_READ, 0, size, 512, 0, EINVAL),
        ("read straddling end", CMD_READ, 0, size - 512, 1024, 0, EINVAL),
        ("read offset overflow", CMD_READ, 0, u64::MAX - 511, 512, 0, EINVAL),
        ("read over max payload", CMD_READ, 0, 0, MAX_PAYLOAD + 512, 0, EOVERFLOW),
        ("read with DF (not negotiated)", CMD_READ, CMD_FLAG_DF, 0, 512, 0, EINVAL),
        ("unaligned write", CMD_WRITE, 0, 3, 512, 512, EINVAL),
        ("write past end", CMD_WRITE, 0, size - 512, 1024, 1024, ENOSPC),
        ("write at end", CMD_WRITE, 0, size, 4096, 4096, ENOSPC),
        ("zero-length write", CMD_WRITE, 0, 0, 0, 0, EINVAL),
        ("write-zeroes past end", CMD_WRITE_ZEROES, 0, size, 512, 0, ENOSPC),
        ("unaligned write-zeroes", CMD_WRITE_ZEROES, 0, 256, 512, 0, EINVAL),
        ("trim past end", CMD_TRIM, 0, size - 512, 1024, 0, EINVAL),
        ("unknown command", 42, 0, 0, 512, 0, EINVAL),
        ("block status (not negotiated)", 7, 0, 0, 512, 0, EINVAL),
    ];
    // One at a time, each checked...
    for (what, kind, flags, offset, len, payload, want) in &cases {
        let (err, _) = raw.call(*kind, *flags, *offset, *len, &vec![0xffu8; *payload]).await;
        assert_eq!(err, *want, "{what}");
    }
    // ...then all pipelined in one write, with good reads mixed in.
    let mut msg = Vec::new();
    let mut expected = HashMap::new();
    for (i, (_, kind, flags, offset, len, payload, want)) in cases.iter().enumerate() {
        msg.extend(Raw::request_bytes(*kind, *flags, i as u64, *offset, *len));
        msg.extend(vec![0xffu8; *payload]);
        expected.insert(i as u64, (*want, 0usize));
        let good = 1000 + i as u64;
        msg.extend(Raw::request_bytes(CMD_READ, 0, good, i as u64 * 4096, 4096));
        expected.insert(good, (0, 4096));
    }
    raw.send(&msg).await;
    for _ in 0..expected.len() {
        let (err, handle) = raw.reply().await;
        let (want, data_len) = expected.remove(&handle).unwrap_or_else(|| panic!("unexpected handle {handle}"));
        assert_eq!(err, want, "pipelined request {handle}");
        if data_len > 0 {
            let off = (handle - 1000) as usize * 4096;
            assert!(raw.read_data(data_len).await == image[off..off + 4096], "bad data for handle {handle}");
        }
    }
    // A good request still works and nothing was written.
    assert_eq!(raw.call(CMD_READ, 0, 0, 1024, &[]).await, (0, image[..1024].to_vec()));
    assert!(h.disk.snapshot() == image, "refused requests changed the data");
    assert_eq!(h.disk.count(|c| &c.writes) + h.disk.count(|c| &c.zeroes) + h.disk.count(|c| &c.trims), 0);

    // Bad magic: framing is lost, so the server hangs up...
    let mut bad = Raw::request_bytes(CMD_READ, 0, 5, 0, 512);
    bad[0] = 0x99;
    raw.send(&bad).await;
    raw.assert_closed().await;
    // ...but a new connection is served.
    let mut again = Raw::open(h.addr, "disk").await;
    assert_eq!(again.call(CMD_READ, 0, 512, 512, &[]).await, (0, image[512..1024].to_vec()));
    assert_eq!(again.call(CMD_WRITE, CMD_FLAG_FUA, 0, 512, &[7u8; 512]).await.0, 0);
    assert!(h.disk.snapshot()[..512].iter().all(|b| *b == 7));
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_write_closes_the_connection() {
    let h = Harness::start().await;
    let mut raw = Raw::open(h.addr, "disk").await;
    // Only the header: the server must not wait for (or try to skip) 2 MiB of payload.
    raw.send(&Raw::request_bytes(CMD_WRITE, 0, 9, 0, 2 * MAX_PAYLOAD)).await;
    assert_eq!(raw.reply().await, (EOVERFLOW, 9));
    raw.assert_closed().await;
    assert!(h.disk.snapshot().iter().all(|b| *b == 0));
    assert_eq!(h.disk.count(|c| &c.writes), 0);
    let mut again = Raw::open(h.addr, "disk").await;
    assert_eq!(again.call(CMD_FLUSH, 0, 0, 0, &[]).await.0, 0);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn option_haggling() {
    let h = Harness::start().await;

    // Without FIXED_NEWSTYLE, or with unknown client flags, the server hangs up.
    let mut raw = Raw::connect_with_flags(h.addr, 0).await;
    raw.assert_closed().await;
    let mut raw = Raw::connect_with_flags(h.addr, 1 | 8).await;
    raw.assert_closed().await;

    let mut raw = Raw::connect(h.addr).await;
    for option in [0x1234, OPT_STARTTLS, OPT_STRUCTURED_REPLY] {
        raw.send_option(option, &[]).await;
        let (opt, ty, _) = raw.option_reply().await;
        assert_eq!((opt, ty), (option, REP_ERR_UNSUP), "option {option}");
    }
    raw.send_option(OPT_LIST, b"junk").await;
    assert_eq!(raw.option_reply().await.1, REP_ERR_INVALID);
    // GO whose info count does not match its length.
    let mut bad_go = Raw::info_data("disk", &[INFO_NAME]);
    bad_go.push(0);
    raw.send_option(OPT_GO, &bad_go).await;
    assert_eq!(raw.option_reply().await.1, REP_ERR_INVALID);
    // GO whose name runs past the data.
    raw.send_option(OPT_GO, &[0, 0, 0, 50, b'd']).await;
    assert_eq!(raw.option_reply().await.1, REP_ERR_INVALID);

    // INFO: export, name, description and block size, then ACK; haggling continues.
    let infos = raw.info_or_go(OPT_INFO, "disk", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]).await.unwrap();
    let get = |t: u16| infos.iter().find(|(ty, _)| *ty == t).map(|(_, d)| d.clone()).unwrap();
    let export = get(INFO_EXPORT);
    assert_eq!(u64::from_be_bytes(export[0..8].try_into().unwrap()), DISK_SIZE as u64);
    let flags = u16::from_be_bytes(export[8..10].try_into().unwrap());
    let want = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_CAN_MULTI_CONN;
    assert_eq!(flags & want, want);
    assert_eq!(flags & TF_READ_ONLY, 0);
    assert_eq!(get(INFO_NAME), b"disk");
    assert_eq!(get(INFO_DESCRIPTION), b"test disk");
    let bs = get(INFO_BLOCK_SIZE);
    let words: Vec<u32> = bs.chunks(4).map(|c| u32::from_be_bytes(c.try_into().unwrap())).collect();
    assert_eq!(words, [BLOCK, BLOCK, MAX_PAYLOAD]);

    // ABORT: ACK, then the server closes.
    raw.send_option(OPT_ABORT, &[]).await;
    assert_eq!(raw.option_reply().await.1, REP_ACK);
    raw.assert_closed().await;

    // Oversized option data: refused, then closed.
    let mut raw = Raw::connect(h.addr).await;
    let mut header = IHAVEOPT.to_be_bytes().to_vec();
    header.extend_from_slice(&OPT_GO.to_be_bytes());
    header.extend_from_slice(&(1u32 << 20).to_be_bytes());
    raw.send(&header).await;
    assert_eq!(raw.option_reply().await.1, REP_ERR_TOO_BIG);
    raw.assert_closed().await;

    // Bad option magic: closed.
    let mut raw = Raw::connect(h.addr).await;
    raw.send(&[0u8; 16]).await;
    raw.assert_closed().await;

    // Old-style NBD_OPT_EXPORT_NAME, with and without the 124 zero bytes.
    for (client_flags, reply_len) in [(3u32, 10usize), (1, 134)] {
        let mut raw = Raw::connect_with_flags(h.addr, client_flags).await;
        raw.send_option(OPT_EXPORT_NAME, b"ro").await;
        let reply = raw.read_data(reply_len).await;
        assert_eq!(u64::from_be_bytes(reply[0..8].try_into().unwrap()), RO_SIZE as u64);
        assert_ne!(u16::from_be_bytes(reply[8..10].try_into().unwrap()) & TF_READ_ONLY, 0);
        assert!(reply[10..].iter().all(|b| *b == 0));
        assert_eq!(raw.call(CMD_READ, 0, 0, 512, &[]).await, (0, vec![0x5a; 512]));
    }
    // An unknown name there cannot be answered with an error: the server hangs up.
    let mut raw = Raw::connect(h.addr).await;
    raw.send_option(OPT_EXPORT_NAME, b"nope").await;
    raw.assert_closed().await;
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_connections_and_stops_accepting() {
    let h = Harness::start().await;
    let addr = h.addr;
    let mut busy = Raw::open(addr, "disk").await;
    assert_eq!(busy.call(CMD_WRITE, 0, 0, 512, &[1u8; 512]).await.0, 0);
    let mut haggling = Raw::connect(addr).await;
    h.shutdown().await;
    busy.assert_closed().await;
    haggling.assert_closed().await;
    assert!(TcpStream::connect(addr).await.is_err(), "the listener should be closed");
}

// ---------------------------------------------------------------------------------------------
// Limits: the byte budget against a client that does not read, idle and handshake timeouts.

/// Poll `f` until it returns the same value twice `settle` apart; that value.
async fn settled(settle: Duration, f: impl Fn() -> usize) -> usize {
    let mut last = f();
    loop {
        tokio::time::sleep(settle).await;
        let now = f();
        if now == last {
            return now;
        }
        last = now;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unread_replies_hold_the_server_to_its_byte_budget() {
    const BUDGET: usize = 4 * MIB;
    const READS: usize = 96;
    let h = Harness::start_with(NbdServerConfig {
        max_payload: MAX_PAYLOAD,
        max_bytes_in_flight: BUDGET as u64,
        ..NbdServerConfig::default()
    })
    .await;
    let mut image = vec![0u8; DISK_SIZE];
    for (i, b) in image.iter_mut().enumerate() {
        *b = (i / MIB) as u8 + 1;
    }
    h.disk.set(&image);
    let mut raw = Raw::connect_small_window(h.addr).await;
    raw.go("disk").await;
    // 96 MiB of reads, none of whose replies the client reads for now.
    let mut msg = Vec::new();
    for i in 0..READS as u64 {
        msg.extend(Raw::request_bytes(CMD_READ, 0, i, (i % 4) * MIB as u64, MIB as u32));
    }
    raw.send(&msg).await;
    let executed = settled(Duration::from_millis(500), || h.disk.count(|c| &c.reads)).await;
    // Each 1 MiB read holds budget until its reply is on the socket; beyond the budget only what
    // the kernel's socket buffers took (a few MiB on loopback) can have been read. Releasing the
    // budget when a reply is merely queued would let every read run (96).
    eprintln!("{executed} of {READS} reads ran while the client read no reply (budget {} MiB)", BUDGET / MIB);
    let bound = BUDGET / MIB + 12;
    assert!(executed <= bound, "{executed} reads ran while the client read no reply (bound {bound})");
    assert!(executed >= BUDGET / MIB, "only {executed} reads ran: the budget should allow {}", BUDGET / MIB);

    // Once the client reads, every reply arrives, correct.
    let mut seen = [false; READS];
    for _ in 0..READS {
        let (err, handle) = raw.reply().await;
        assert_eq!(err, 0);
        let data = raw.read_data(MIB).await;
        let block = (handle % 4) as usize;
        assert!(data == image[block * MIB..(block + 1) * MIB], "wrong data for handle {handle}");
        assert!(!std::mem::replace(&mut seen[handle as usize], true), "duplicate reply {handle}");
    }
    assert_eq!(h.disk.count(|c| &c.reads), READS);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_disconnected() {
    let idle = Duration::from_millis(800);
    let h = Harness::start_with(NbdServerConfig {
        max_payload: MAX_PAYLOAD,
        max_bytes_in_flight: 2 * MIB as u64,
        idle_timeout: idle,
        ..NbdServerConfig::default()
    })
    .await;
    let mut raw = Raw::connect_small_window(h.addr).await;
    raw.go("disk").await;
    let mut msg = Vec::new();
    for i in 0..64u64 {
        msg.extend(Raw::request_bytes(CMD_READ, 0, i, 0, MIB as u32));
    }
    raw.send(&msg).await;
    tokio::time::sleep(idle * 4).await;
    // The server gave up on the stalled writer and closed: reading now drains what the kernel
    // buffered and then meets the end of the stream, well short of 64 MiB.
    let mut got = 0usize;
    let mut buf = vec![0u8; 256 * KIB];
    loop {
        match timed("drain to the end of the stream", raw.s.read(&mut buf)).await {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "unexpected error {e}");
                break;
            }
        }
    }
    assert!(got < 32 * MIB, "{got} bytes arrived from a connection that should have been closed");
    // The server still serves others.
    let mut again = Raw::open(h.addr, "disk").await;
    assert_eq!(again.call(CMD_FLUSH, 0, 0, 0, &[]).await.0, 0);
    h.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_and_slow_handshakes_are_closed() {
    let idle = Duration::from_millis(600);
    let h = Harness::start_with(NbdServerConfig {
        max_payload: MAX_PAYLOAD,
        idle_timeout: idle,
        handshake_timeout: Duration::from_millis(600),
        ..NbdServerConfig::default()
    })
    .await;
    // A connection that keeps sending requests more often than the idle timeout stays open...
    let mut busy = Raw::open(h.addr, "disk").await;
    for _ in 0..6 {
        tokio::time::sleep(idle / 3).await;
        assert_eq!(busy.call(CMD_READ, 0, 0, 512, &[]).await, (0, vec![0; 512]));
    }
    // ...and is closed once it goes quiet.
    let quiet_from = std::time::Instant::now();
    busy.assert_closed().await;
    assert!(quiet_from.elapsed() >= idle / 2, "closed after {:?}, before the idle timeout", quiet_from.elapsed());

    // A client that connects and never finishes haggling is closed too.
    let mut slow = Raw::connect(h.addr).await;
    slow.assert_closed().await;
    // So is one that stops in the middle of a request header.
    let mut half = Raw::open(h.addr, "disk").await;
    half.send(&Raw::request_bytes(CMD_READ, 0, 1, 0, 512)[..10]).await;
    half.assert_closed().await;
    h.shutdown().await;
}
