//! The NBD session target's world: two in-memory exports that check every call the server makes
//! on them, and a client-side reading of a finished session that says which replies the server
//! owed for the bytes it was sent and checks that it sent exactly those.
//!
//! The expectations come from the NBD protocol as the server documents it (fixed newstyle, simple
//! replies only, every request answered once, refused writes' payloads skipped) and from the
//! public `nbd::protocol` codec and `validate_request`; the server's own control flow is not
//! reused.

use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use haven_node::nbd::protocol as p;
use haven_node::nbd::server::{validate_request, Command};
use haven_node::nbd::{BackendError, ExportBackend, ExportInfo, ExportListing, ExportResolver, NbdErrno};

/// Largest read or write the fuzzed server accepts (small, so one iteration stays cheap).
pub const MAX_PAYLOAD: u32 = 8192;

/// An export held in memory. Every call asserts what the server promises the backend: offsets
/// and lengths checked against the export, payloads within the limit, no modification of a
/// read-only export.
pub struct MemExport {
    pub info: ExportInfo,
    pub data: Mutex<Vec<u8>>,
}

impl MemExport {
    fn new(size: u64, block_size: u32, read_only: bool, description: &str, fill: u8) -> Arc<Self> {
        let data = (0..size).map(|i| fill ^ (i as u8)).collect();
        Arc::new(Self {
            info: ExportInfo { size, block_size, read_only, description: description.into() },
            data: Mutex::new(data),
        })
    }

    fn check(&self, op: &str, offset: u64, len: u64, modifies: bool, payload: bool) {
        let bs = u64::from(self.info.block_size.max(1));
        assert!(len > 0, "backend {op}: zero length reached the backend");
        // Only a trim may be unaligned: it is advisory, and the backend trims whole blocks.
        let aligned = offset % bs == 0 && len % bs == 0;
        assert!(aligned || op == "trim", "backend {op}: unaligned {offset}+{len} (block size {bs})");
        let end = offset.checked_add(len);
        assert!(end.is_some_and(|e| e <= self.info.size), "backend {op}: {offset}+{len} past {}", self.info.size);
        assert!(!payload || len <= u64::from(MAX_PAYLOAD), "backend {op}: {len} bytes above the payload limit");
        assert!(!(modifies && self.info.read_only), "backend {op}: modification of a read-only export");
    }
}

fn done<T: Send + 'static>(v: Result<T, BackendError>) -> BoxFuture<'static, Result<T, BackendError>> {
    Box::pin(std::future::ready(v))
}

impl ExportBackend for MemExport {
    fn info(&self) -> ExportInfo {
        self.info.clone()
    }

    fn read(&self, offset: u64, len: u32) -> BoxFuture<'static, Result<Vec<u8>, BackendError>> {
        self.check("read", offset, len.into(), false, true);
        let data = self.data.lock().unwrap();
        done(Ok(data[offset as usize..offset as usize + len as usize].to_vec()))
    }

    fn write(&self, offset: u64, payload: Vec<u8>, _fua: bool) -> BoxFuture<'static, Result<(), BackendError>> {
        self.check("write", offset, payload.len() as u64, true, true);
        let mut data = self.data.lock().unwrap();
        data[offset as usize..offset as usize + payload.len()].copy_from_slice(&payload);
        done(Ok(()))
    }

    fn write_zeroes(&self, offset: u64, len: u32, _fua: bool) -> BoxFuture<'static, Result<(), BackendError>> {
        self.check("write_zeroes", offset, len.into(), true, false);
        let mut data = self.data.lock().unwrap();
        data[offset as usize..offset as usize + len as usize].fill(0);
        done(Ok(()))
    }

    fn trim(&self, offset: u64, len: u32) -> BoxFuture<'static, Result<(), BackendError>> {
        self.check("trim", offset, len.into(), true, false);
        done(Ok(()))
    }

    fn flush(&self) -> BoxFuture<'static, Result<(), BackendError>> {
        done(Ok(()))
    }
}

/// The exports of one fuzz iteration: `disk` (64 KiB in 512-byte blocks, writable; also the
/// default export, the empty name) and `ro` (16 KiB in 4 KiB blocks, read-only, described).
pub struct Exports {
    pub disk: Arc<MemExport>,
    pub ro: Arc<MemExport>,
}

impl Exports {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            disk: MemExport::new(64 * 1024, 512, false, "", 0x5a),
            ro: MemExport::new(16 * 1024, 4096, true, "read-only", 0xa5),
        })
    }

    /// The export a name opens, if any.
    pub fn get(&self, name: &str) -> Option<&Arc<MemExport>> {
        match name {
            "" | "disk" => Some(&self.disk),
            "ro" => Some(&self.ro),
            _ => None,
        }
    }

    pub const NAMES: [&'static str; 2] = ["disk", "ro"];
}

impl ExportResolver for Exports {
    fn list(&self) -> BoxFuture<'static, Result<Vec<ExportListing>, BackendError>> {
        let listing = |name: &&str| ExportListing { name: name.to_string(), read_only: *name == "ro" };
        done(Ok(Self::NAMES.iter().map(listing).collect()))
    }

    fn open(&self, name: &str) -> BoxFuture<'static, Result<Arc<dyn ExportBackend>, BackendError>> {
        let found = self.get(name).map(|e| e.clone() as Arc<dyn ExportBackend>);
        done(found.ok_or_else(|| BackendError::new(NbdErrno::Inval, format!("no export named {name:?}"))))
    }
}

/// A read position in a byte string.
struct Cur<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Some(head)
    }

    fn need(&mut self, n: usize, ctx: &str) -> Result<&'a [u8], String> {
        let got = self.buf.len();
        self.take(n).ok_or_else(|| format!("{}: {ctx}: needs {n} bytes, {got} left", self.what))
    }
}

fn be_u16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// The server's output must end here.
fn end(out: &Cur<'_>, ctx: &str) -> Result<(), String> {
    if out.buf.is_empty() {
        Ok(())
    } else {
        Err(format!("{} unexpected bytes after {ctx}: {:02x?}", out.buf.len(), &out.buf[..out.buf.len().min(32)]))
    }
}

/// One option reply of `option`; returns its type and data.
fn option_reply<'a>(out: &mut Cur<'a>, option: u32) -> Result<(u32, &'a [u8]), String> {
    let h = p::decode_option_reply_header(out.need(p::OPTION_REPLY_HEADER_LEN, "option reply header")?)
        .map_err(|e| format!("option reply: {e}"))?;
    if h.option != option {
        return Err(format!("reply for option {} while answering option {option}", h.option));
    }
    let data = out.need(h.len as usize, "option reply data")?;
    Ok((h.reply_type, data))
}

fn expect_reply<'a>(out: &mut Cur<'a>, option: u32, want: u32) -> Result<&'a [u8], String> {
    let (t, data) = option_reply(out, option)?;
    if t != want {
        return Err(format!("option {option}: reply type {t:#x}, expected {want:#x}"));
    }
    Ok(data)
}

fn check_flags(flags: u16, export: &MemExport, ctx: &str) -> Result<(), String> {
    if flags & p::FLAG_HAS_FLAGS == 0 || (flags & p::FLAG_READ_ONLY != 0) != export.info.read_only {
        return Err(format!(
            "{ctx}: transmission flags {flags:#x} for an export with read_only={}",
            export.info.read_only
        ));
    }
    Ok(())
}

/// The replies to a successful `NBD_OPT_INFO`/`NBD_OPT_GO`: INFO_EXPORT first, NAME if asked,
/// DESCRIPTION if asked or non-empty, BLOCK_SIZE, then ACK.
fn expect_info(out: &mut Cur<'_>, option: u32, req: &p::InfoRequest, export: &MemExport) -> Result<(), String> {
    let mut seen = Vec::new();
    loop {
        let (t, data) = option_reply(out, option)?;
        if t == p::REP_ACK {
            break;
        }
        if t != p::REP_INFO || data.len() < 2 {
            return Err(format!("option {option}: reply type {t:#x} ({} bytes) among the INFO replies", data.len()));
        }
        let info = be_u16(data);
        match info {
            p::INFO_EXPORT => {
                if data.len() != 12 || be_u64(&data[2..]) != export.info.size {
                    return Err(format!("INFO_EXPORT {data:02x?} for an export of {} bytes", export.info.size));
                }
                check_flags(be_u16(&data[10..]), export, "INFO_EXPORT")?;
            }
            p::INFO_NAME => {
                if &data[2..] != req.name.as_bytes() {
                    return Err(format!("INFO_NAME {:?} for a request of {:?}", &data[2..], req.name));
                }
            }
            p::INFO_DESCRIPTION => {
                if &data[2..] != export.info.description.as_bytes() {
                    return Err("INFO_DESCRIPTION is not the export's description".into());
                }
            }
            p::INFO_BLOCK_SIZE => {
                let bs = export.info.block_size;
                if data.len() != 14 {
                    return Err(format!("INFO_BLOCK_SIZE of {} bytes", data.len()));
                }
                let (min, pref, max) = (be_u32(&data[2..]), be_u32(&data[6..]), be_u32(&data[10..]));
                if min != bs || pref != bs || max % bs != 0 || max > MAX_PAYLOAD.max(bs) {
                    return Err(format!("INFO_BLOCK_SIZE {min}/{pref}/{max} for block size {bs}"));
                }
            }
            other => return Err(format!("unrequested information type {other}")),
        }
        seen.push(info);
    }
    let mut want = vec![p::INFO_EXPORT];
    if req.requests.contains(&p::INFO_NAME) {
        want.push(p::INFO_NAME);
    }
    if !export.info.description.is_empty() || req.requests.contains(&p::INFO_DESCRIPTION) {
        want.push(p::INFO_DESCRIPTION);
    }
    want.push(p::INFO_BLOCK_SIZE);
    if seen != want {
        return Err(format!("information types {seen:?}, expected {want:?}"));
    }
    Ok(())
}

/// Checks that `output` is what the server owes a client that sent `input` and then closed its
/// side: the greeting, the replies to each complete option, and in transmission exactly one
/// reply per complete request.
pub fn check_session(input: &[u8], output: &[u8], exports: &Exports) -> Result<(), String> {
    let mut inp = Cur { buf: input, what: "input" };
    let mut out = Cur { buf: output, what: "output" };
    if out.need(p::GREETING_LEN, "greeting")? != p::encode_greeting() {
        return Err("the server did not start with the fixed-newstyle greeting".into());
    }
    let Some(flags) = inp.take(p::CLIENT_FLAGS_LEN) else { return end(&out, "a short client-flags field") };
    let Ok(client) = p::decode_client_flags(flags) else { return end(&out, "refused client flags") };
    loop {
        let Some(header) = inp.take(p::OPTION_HEADER_LEN) else { return end(&out, "the last option") };
        let Ok(opt) = p::decode_option_header(header) else { return end(&out, "an option with bad magic") };
        if opt.len > p::MAX_OPTION_DATA {
            if opt.option != p::OPT_EXPORT_NAME {
                expect_reply(&mut out, opt.option, p::REP_ERR_TOO_BIG)?;
            }
            return end(&out, "an oversized option");
        }
        let Some(data) = inp.take(opt.len as usize) else { return end(&out, "a truncated option") };
        match opt.option {
            p::OPT_EXPORT_NAME => {
                let Ok(name) = p::decode_string(data) else { return end(&out, "a bad export name") };
                let Some(export) = exports.get(&name) else { return end(&out, "an unknown export name") };
                let reply = out.need(10, "export name reply")?;
                if be_u64(reply) != export.info.size {
                    return Err(format!("export name reply: size {}, export has {}", be_u64(reply), export.info.size));
                }
                check_flags(be_u16(&reply[8..]), export, "export name reply")?;
                if !client.no_zeroes && out.need(p::EXPORT_NAME_ZEROES, "export name padding")?.iter().any(|b| *b != 0)
                {
                    return Err("export name padding is not zero".into());
                }
                return transmission(inp, out, export);
            }
            p::OPT_ABORT => {
                expect_reply(&mut out, opt.option, p::REP_ACK)?;
                return end(&out, "NBD_OPT_ABORT");
            }
            p::OPT_LIST if !data.is_empty() => {
                expect_reply(&mut out, opt.option, p::REP_ERR_INVALID)?;
            }
            p::OPT_LIST => {
                for name in Exports::NAMES {
                    let d = expect_reply(&mut out, opt.option, p::REP_SERVER)?;
                    if d != p::encode_rep_server(name) {
                        return Err(format!("NBD_REP_SERVER {d:02x?} for export {name}"));
                    }
                }
                expect_reply(&mut out, opt.option, p::REP_ACK)?;
            }
            p::OPT_INFO | p::OPT_GO => match p::decode_info_request(data) {
                Err(_) => {
                    expect_reply(&mut out, opt.option, p::REP_ERR_INVALID)?;
                }
                Ok(req) => match exports.get(&req.name) {
                    None => {
                        expect_reply(&mut out, opt.option, p::REP_ERR_UNKNOWN)?;
                    }
                    Some(export) => {
                        expect_info(&mut out, opt.option, &req, export)?;
                        if opt.option == p::OPT_GO {
                            return transmission(inp, out, export);
                        }
                    }
                },
            },
            other => {
                expect_reply(&mut out, other, p::REP_ERR_UNSUP)?;
            }
        }
    }
}

/// A reply the server owes: handle, errno (0 = success) and the data length of a successful read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Owed {
    handle: u64,
    error: u32,
    data: usize,
}

fn transmission(mut inp: Cur<'_>, mut out: Cur<'_>, export: &MemExport) -> Result<(), String> {
    let mut owed: Vec<Owed> = Vec::new();
    while let Some(header) = inp.take(p::REQUEST_LEN) {
        let Ok(req) = p::decode_request(header) else { break };
        let cmd = Command::from_wire(req.kind);
        if cmd == Command::Write && req.len > MAX_PAYLOAD {
            // Its payload cannot be skipped: refused, then the connection closes.
            owed.push(Owed { handle: req.handle, error: NbdErrno::Overflow.code(), data: 0 });
            break;
        }
        let verdict = validate_request(&req, &export.info, MAX_PAYLOAD);
        if cmd == Command::Write && inp.take(req.len as usize).is_none() {
            break; // the payload never arrived: no reply
        }
        match verdict {
            Err(errno) => owed.push(Owed { handle: req.handle, error: errno.code(), data: 0 }),
            Ok(Command::Disc) => break,
            Ok(cmd) => {
                let data = if cmd == Command::Read { req.len as usize } else { 0 };
                owed.push(Owed { handle: req.handle, error: 0, data });
            }
        }
    }
    // Replies arrive in completion order; match them to what is owed by handle and errno.
    while !out.buf.is_empty() {
        let r = p::decode_simple_reply(out.need(p::SIMPLE_REPLY_LEN, "simple reply")?)
            .map_err(|e| format!("transmission reply: {e}"))?;
        let candidates: Vec<usize> =
            (0..owed.len()).filter(|i| owed[*i].handle == r.handle && owed[*i].error == r.error).collect();
        let Some(&first) = candidates.first() else {
            return Err(format!("reply (handle {:#x}, error {}) to no request; owed {owed:?}", r.handle, r.error));
        };
        if candidates.iter().any(|i| owed[*i].data != owed[first].data) {
            // Two outstanding requests share a handle and differ in reply length: which one this
            // is depends on completion order, so the rest cannot be attributed. Stop checking.
            return Ok(());
        }
        let o = owed.remove(first);
        out.need(o.data, "read reply data")?;
    }
    if !owed.is_empty() {
        return Err(format!("requests without a reply: {owed:?}"));
    }
    Ok(())
}
