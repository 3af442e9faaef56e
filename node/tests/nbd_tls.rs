//! NBD trust end to end: real `haven-node` processes (one-node clusters) serving volumes with
//! `tls = "required"` and `tls = "optional"`, stock `qemu-io` and `qemu-nbd --list` with
//! `--object tls-creds-x509,...,endpoint=client`, client certificates issued by
//! `haven-node issue-cert` from the cluster's CA, and a raw client (plain, or TLS through
//! rustls) for what qemu will not send: options before STARTTLS, and writes to an export the
//! server advertised read-only.
//!
//! The qemu tools are required: a missing tool fails the test (CI installs qemu-utils). Only
//! behaviour both qemu 7.2 and 10.0 share is asserted.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use haven_client::devcluster::{DevClusterSpec, LocalCluster};
use haven_client::volumes::VolumeSpec;
use haven_client::HavenClient;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const HEALTHY: Duration = Duration::from_secs(30);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const MIB: u64 = 1 << 20;

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
const REP_ERR_POLICY: u32 = 0x8000_0002;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
const TF_READ_ONLY: u16 = 2;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const EPERM: u32 = 1;

// ---------------------------------------------------------------------------------------------
// A one-node cluster, certificates, and the qemu tools.

/// Start a one-node cluster under `dir` whose NBD server runs with `tls` (`HAVEN_NBD_TLS`).
fn cluster(dir: &Path, tls: &str) -> LocalCluster {
    let mut spec = DevClusterSpec::new(dir.join("cluster"), 1);
    spec.node_bin = env!("CARGO_BIN_EXE_haven-node").into();
    spec.env.insert("HAVEN_NBD_TLS".into(), tls.into());
    let mut c = LocalCluster::create(&spec).expect("create cluster");
    c.start_all().expect("start cluster");
    c
}

async fn healthy(c: &mut LocalCluster) -> HavenClient {
    let client = c.client().unwrap();
    c.wait_healthy(&client, &[1], HEALTHY).await.expect("cluster healthy");
    client
}

/// Create `name` (one replica) and wait until its device is up, so NBD can serve it.
async fn volume(client: &HavenClient, name: &str) -> haven_client::proto::VolumeId {
    let deadline = Instant::now() + HEALTHY;
    let v = loop {
        match client.create_volume(&VolumeSpec::new(name, 16 * MIB, 1)).await {
            Ok(v) => break v,
            // The host registers with the leader shortly after the election.
            Err(e) if Instant::now() < deadline => {
                eprintln!("create volume {name}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("create volume {name}: {e}"),
        }
    };
    while client.read_volume(v.id, 0, 4096, None).await.is_err() {
        assert!(Instant::now() < deadline, "volume {name} never became readable");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    v.id
}

fn nbd_addr(c: &LocalCluster) -> SocketAddr {
    c.node(1).unwrap().nbd.expect("nbd address")
}

/// A client certificate from the cluster CA (`haven-node issue-cert`), laid out as qemu's
/// `tls-creds-x509` expects: `ca-cert.pem`, `client-cert.pem`, `client-key.pem`. `role: None`
/// lays out the CA certificate alone (a client without a certificate).
fn qemu_creds(c: &LocalCluster, out: &Path, role: Option<&str>, name: &str) -> PathBuf {
    let dir = out.join(format!("qemu-{name}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(c.dir().join("ca/ca.pem"), dir.join("ca-cert.pem")).unwrap();
    if let Some(role) = role {
        let issued = out.join(format!("issued-{name}"));
        let status = Command::new(env!("CARGO_BIN_EXE_haven-node"))
            .args(["issue-cert", "--ca-dir"])
            .arg(c.dir().join("ca"))
            .arg("--out")
            .arg(&issued)
            .args(["--role", role, "--name", name])
            .status()
            .expect("run haven-node issue-cert");
        assert!(status.success(), "issue-cert --role {role} --name {name} failed");
        std::fs::copy(issued.join(format!("{name}.pem")), dir.join("client-cert.pem")).unwrap();
        std::fs::copy(issued.join(format!("{name}.key")), dir.join("client-key.pem")).unwrap();
    }
    dir
}

fn run(mut cmd: Command) -> (bool, String) {
    let out = cmd.output().expect("the qemu tools must be installed (Debian: qemu-utils)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let lower = text.to_lowercase();
    let ok = out.status.success() && !lower.contains("failed") && !lower.contains("error");
    (ok, text)
}

/// `qemu-io` on `export` at `localhost` (the name the node certificate carries), through TLS
/// with the credentials in `creds`, or in the clear without.
fn qemu_io(nbd: SocketAddr, export: &str, creds: Option<&Path>, opts: &[&str], cmds: &[&str]) -> (bool, String) {
    let mut cmd = Command::new("qemu-io");
    let mut image = format!("driver=nbd,host=localhost,port={},export={export}", nbd.port());
    if let Some(dir) = creds {
        cmd.arg("--object").arg(format!("tls-creds-x509,id=tls0,dir={},endpoint=client", dir.display()));
        image.push_str(",tls-creds=tls0");
    }
    cmd.args(opts).arg("--image-opts").arg(image);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    run(cmd)
}

/// `qemu-nbd --list`: the export names the server showed, or the tool's output on failure.
fn qemu_nbd_list(nbd: SocketAddr, creds: Option<&Path>) -> Result<Vec<String>, String> {
    let mut cmd = Command::new("qemu-nbd");
    cmd.args(["--list", "--bind", "localhost", "--port", &nbd.port().to_string()]);
    if let Some(dir) = creds {
        cmd.arg("--object").arg(format!("tls-creds-x509,id=tls0,dir={},endpoint=client", dir.display()));
        cmd.args(["--tls-creds", "tls0"]);
    }
    let (ok, text) = run(cmd);
    if !ok {
        return Err(text);
    }
    let mut names: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("export: '")?.strip_suffix('\'').map(str::to_string))
        .collect();
    names.sort();
    Ok(names)
}

// ---------------------------------------------------------------------------------------------
// A raw NBD client, in the clear or inside TLS after STARTTLS.

struct Raw<S> {
    s: S,
}

async fn timed<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(IO_TIMEOUT, f).await.unwrap_or_else(|_| panic!("timed out: {what}"))
}

impl Raw<TcpStream> {
    /// Connect and do the greeting (fixed newstyle, no zeroes).
    async fn connect(addr: SocketAddr) -> Self {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut greeting = [0u8; 18];
        timed("greeting", s.read_exact(&mut greeting)).await.unwrap();
        assert_eq!(&greeting[0..16], b"NBDMAGICIHAVEOPT");
        s.write_all(&3u32.to_be_bytes()).await.unwrap();
        Self { s }
    }

    /// NBD_OPT_STARTTLS, then a TLS handshake presenting the certificate in `creds` (a
    /// `qemu_creds` directory).
    async fn starttls(mut self, creds: &Path) -> Raw<tokio_rustls::client::TlsStream<TcpStream>> {
        self.send_option(OPT_STARTTLS, &[]).await;
        assert_eq!(self.option_reply().await.1, REP_ACK, "STARTTLS refused");
        let read = |f: &str| std::fs::read(creds.join(f)).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(&read("ca-cert.pem")).unwrap()).unwrap();
        let chain = vec![CertificateDer::from_pem_slice(&read("client-cert.pem")).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(&read("client-key.pem")).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let tls = timed("TLS handshake", tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, self.s))
            .await
            .expect("TLS handshake");
        Raw { s: tls }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Raw<S> {
    async fn send(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
        self.s.flush().await.unwrap();
    }

    async fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut msg = IHAVEOPT.to_be_bytes().to_vec();
        msg.extend_from_slice(&option.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(data);
        self.send(&msg).await;
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

    /// NBD_OPT_LIST: the names, or the error reply type.
    async fn list(&mut self) -> Result<Vec<String>, u32> {
        self.send_option(OPT_LIST, &[]).await;
        let mut names = Vec::new();
        loop {
            let (opt, ty, data) = self.option_reply().await;
            assert_eq!(opt, OPT_LIST);
            match ty {
                REP_SERVER => {
                    let len = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
                    names.push(String::from_utf8(data[4..4 + len].to_vec()).unwrap());
                }
                REP_ACK => {
                    names.sort();
                    return Ok(names);
                }
                err => return Err(err),
            }
        }
    }

    /// NBD_OPT_INFO or NBD_OPT_GO for `name`: `Ok(transmission flags)` or `Err((type, message))`.
    async fn info_or_go(&mut self, option: u32, name: &str) -> Result<u16, (u32, String)> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.send_option(option, &d).await;
        let mut flags = None;
        loop {
            let (opt, ty, data) = self.option_reply().await;
            assert_eq!(opt, option);
            match ty {
                REP_INFO if data[0..2] == [0, 0] => flags = Some(u16::from_be_bytes([data[10], data[11]])),
                REP_INFO => {}
                REP_ACK => return Ok(flags.expect("NBD_INFO_EXPORT before the ACK")),
                err => return Err((err, String::from_utf8_lossy(&data).into_owned())),
            }
        }
    }

    /// One request and its reply: the error, and a successful read's data.
    async fn call(&mut self, kind: u16, offset: u64, len: u32, payload: &[u8]) -> (u32, Vec<u8>) {
        let mut msg = REQUEST_MAGIC.to_be_bytes().to_vec();
        msg.extend_from_slice(&0u16.to_be_bytes());
        msg.extend_from_slice(&kind.to_be_bytes());
        msg.extend_from_slice(&77u64.to_be_bytes());
        msg.extend_from_slice(&offset.to_be_bytes());
        msg.extend_from_slice(&len.to_be_bytes());
        msg.extend_from_slice(payload);
        self.send(&msg).await;
        let mut h = [0u8; 16];
        timed("simple reply", self.s.read_exact(&mut h)).await.unwrap();
        assert_eq!(u32::from_be_bytes(h[0..4].try_into().unwrap()), SIMPLE_REPLY_MAGIC);
        assert_eq!(u64::from_be_bytes(h[8..16].try_into().unwrap()), 77);
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let mut data = Vec::new();
        if kind == CMD_READ && err == 0 {
            data = vec![0u8; len as usize];
            timed("read data", self.s.read_exact(&mut data)).await.unwrap();
        }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_required_admin_writes_reader_reads_others_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cluster(tmp.path(), "required");
    let client = healthy(&mut c).await;
    let vol = volume(&client, "disk1").await;
    client.snapshot(vol, "s1", None).await.expect("snapshot");
    let nbd = nbd_addr(&c);
    let admin = qemu_creds(&c, tmp.path(), Some("admin"), "ops");
    let reader = qemu_creds(&c, tmp.path(), Some("reader"), "ro");
    let no_cert = qemu_creds(&c, tmp.path(), None, "anonymous");

    // admin: a pattern written and read back over TLS.
    let (ok, out) = qemu_io(
        nbd,
        "disk1",
        Some(&admin),
        &[],
        &["write -P 0xab 0 1M", "write -P 0xcd 4M 64k", "flush", "read -P 0xab 0 1M", "read -P 0xcd 4M 64k"],
    );
    assert!(ok, "admin over TLS:\n{out}");
    assert_eq!(client.read_volume(vol, 4 * MIB, 4096, None).await.unwrap(), vec![0xcd; 4096]);

    // reader: reads the pattern; opening for writing fails (the export is advertised read-only).
    let (ok, out) = qemu_io(nbd, "disk1", Some(&reader), &["-r"], &["read -P 0xab 0 1M", "read -P 0xcd 4M 64k"]);
    assert!(ok, "reader over TLS:\n{out}");
    let (ok, out) = qemu_io(nbd, "disk1", Some(&reader), &[], &["write -P 0x11 0 64k"]);
    assert!(!ok, "a reader must not open a volume for writing:\n{out}");
    eprintln!("reader opening disk1 for writing, refused:\n{out}");

    // No client certificate: the TLS handshake is refused.
    let (ok, out) = qemu_io(nbd, "disk1", Some(&no_cert), &["-r"], &["read 0 4k"]);
    assert!(!ok, "TLS without a client certificate must be refused:\n{out}");
    eprintln!("TLS without a client certificate, refused:\n{out}");
    // No TLS at all: refused, and qemu says why.
    let (ok, out) = qemu_io(nbd, "disk1", None, &["-r"], &["read 0 4k"]);
    assert!(!ok && out.contains("TLS"), "NBD without TLS must be refused with a TLS error:\n{out}");
    eprintln!("no TLS, refused:\n{out}");
    assert!(qemu_nbd_list(nbd, None).is_err(), "listing without TLS must be refused");
    assert!(qemu_nbd_list(nbd, Some(&no_cert)).is_err(), "listing without a client certificate must be refused");

    // LIST over TLS: every export the certificate may open (readers read volumes and snapshots).
    let all = vec!["disk1".to_string(), "disk1@s1".to_string()];
    assert_eq!(qemu_nbd_list(nbd, Some(&admin)).unwrap(), all);
    assert_eq!(qemu_nbd_list(nbd, Some(&reader)).unwrap(), all);

    // By hand, in the clear: every option but STARTTLS and ABORT is refused with TLS_REQD.
    let mut raw = Raw::connect(nbd).await;
    assert_eq!(raw.list().await, Err(REP_ERR_TLS_REQD));
    for option in [OPT_GO, OPT_INFO] {
        assert_eq!(raw.info_or_go(option, "disk1").await.unwrap_err().0, REP_ERR_TLS_REQD);
    }
    raw.send_option(OPT_STRUCTURED_REPLY, &[]).await;
    assert_eq!(raw.option_reply().await.1, REP_ERR_TLS_REQD);
    raw.send_option(OPT_STARTTLS, b"x").await;
    assert_eq!(raw.option_reply().await.1, REP_ERR_INVALID, "STARTTLS carries no data");
    raw.send_option(OPT_ABORT, &[]).await;
    assert_eq!(raw.option_reply().await.1, REP_ACK);
    raw.assert_closed().await;
    // NBD_OPT_EXPORT_NAME cannot be refused with a reply: the server hangs up.
    let mut raw = Raw::connect(nbd).await;
    raw.send_option(OPT_EXPORT_NAME, b"disk1").await;
    raw.assert_closed().await;

    // By hand, inside TLS as a reader: the volume is advertised read-only, and a client that
    // writes anyway gets EPERM for every modifying command; nothing changes.
    let mut ro = Raw::connect(nbd).await.starttls(&reader).await;
    ro.send_option(OPT_STARTTLS, &[]).await;
    assert_eq!(ro.option_reply().await.1, REP_ERR_INVALID, "a second STARTTLS is invalid");
    assert_eq!(ro.list().await.unwrap(), all);
    let flags = ro.info_or_go(OPT_GO, "disk1").await.expect("reader may open the volume");
    assert_ne!(flags & TF_READ_ONLY, 0, "the volume must be advertised read-only to a reader");
    assert_eq!(ro.call(CMD_WRITE, 0, 4096, &[0x11; 4096]).await.0, EPERM);
    assert_eq!(ro.call(CMD_WRITE_ZEROES, 0, 4096, &[]).await.0, EPERM);
    assert_eq!(ro.call(CMD_TRIM, 0, 4096, &[]).await.0, EPERM);
    assert_eq!(ro.call(CMD_READ, 0, 4096, &[]).await, (0, vec![0xab; 4096]));
    // As admin the same volume is writable.
    let mut rw = Raw::connect(nbd).await.starttls(&admin).await;
    let flags = rw.info_or_go(OPT_GO, "disk1").await.expect("admin may open the volume");
    assert_eq!(flags & TF_READ_ONLY, 0, "the volume must be writable for an admin");
    assert_eq!(rw.call(CMD_WRITE, 8 * MIB, 4096, &[0x22; 4096]).await.0, 0);

    assert_eq!(client.read_volume(vol, 0, 4096, None).await.unwrap(), vec![0xab; 4096], "reader changed data");
    assert_eq!(client.read_volume(vol, 8 * MIB, 4096, None).await.unwrap(), vec![0x22; 4096]);
    c.stop_all(Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_optional_serves_only_snapshots_in_the_clear() {
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cluster(tmp.path(), "optional");
    let client = healthy(&mut c).await;
    let vol = volume(&client, "disk2").await;
    client.write_volume(vol, 0, &[0x5a; 4096]).await.expect("write");
    client.snapshot(vol, "s1", None).await.expect("snapshot");
    let nbd = nbd_addr(&c);
    let admin = qemu_creds(&c, tmp.path(), Some("admin"), "ops");

    // In the clear: LIST shows only the read-only export, which can be read; the volume is
    // refused with TLS_REQD.
    assert_eq!(qemu_nbd_list(nbd, None).unwrap(), vec!["disk2@s1".to_string()]);
    let (ok, out) = qemu_io(nbd, "disk2@s1", None, &["-r"], &["read -P 0x5a 0 4k"]);
    assert!(ok, "snapshot in the clear:\n{out}");
    let (ok, out) = qemu_io(nbd, "disk2", None, &["-r"], &["read 0 4k"]);
    assert!(!ok, "a volume must not be served without TLS:\n{out}");
    eprintln!("optional mode, volume without TLS, refused:\n{out}");
    let mut raw = Raw::connect(nbd).await;
    assert_eq!(raw.list().await.unwrap(), vec!["disk2@s1".to_string()]);
    assert_eq!(raw.info_or_go(OPT_GO, "disk2").await.unwrap_err().0, REP_ERR_TLS_REQD);
    let flags = raw.info_or_go(OPT_GO, "disk2@s1").await.expect("snapshot in the clear");
    assert_ne!(flags & TF_READ_ONLY, 0);
    assert_eq!(raw.call(CMD_READ, 0, 4096, &[]).await, (0, vec![0x5a; 4096]));

    // With TLS and an admin certificate: everything listed, the volume writable.
    assert_eq!(qemu_nbd_list(nbd, Some(&admin)).unwrap(), vec!["disk2".to_string(), "disk2@s1".to_string()]);
    let (ok, out) = qemu_io(nbd, "disk2", Some(&admin), &[], &["write -P 0x77 0 64k", "read -P 0x77 0 64k"]);
    assert!(ok, "admin over TLS:\n{out}");
    c.stop_all(Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_without_identity_is_refused_inside_tls() {
    // A certificate chaining to the cluster CA but naming no haven:// identity passes the TLS
    // handshake; every option is then refused by policy.
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cluster(tmp.path(), "required");
    let client = healthy(&mut c).await;
    volume(&client, "disk3").await;
    let nbd = nbd_addr(&c);
    let dir = tmp.path().join("anon");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(c.dir().join("ca/ca.pem"), dir.join("ca-cert.pem")).unwrap();
    // Signed by the cluster CA with rcgen directly: `issue-cert` always names an identity.
    let ca_cert = std::fs::read_to_string(c.dir().join("ca/ca.pem")).unwrap();
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(c.dir().join("ca/ca.key")).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_cert, ca_key).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    std::fs::write(dir.join("client-cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("client-key.pem"), key.serialize_pem()).unwrap();
    let mut raw = Raw::connect(nbd).await.starttls(&dir).await;
    assert_eq!(raw.list().await, Err(REP_ERR_POLICY));
    let (ty, message) = raw.info_or_go(OPT_GO, "disk3").await.unwrap_err();
    assert_eq!(ty, REP_ERR_POLICY);
    assert!(message.contains("haven://"), "the refusal should say what the certificate lacks: {message}");
    c.stop_all(Duration::from_secs(5));
}
