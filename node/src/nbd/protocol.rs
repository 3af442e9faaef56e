//! The NBD wire format: constants, and encoding/decoding of every message the server sends or
//! receives (greeting, client flags, option requests and replies, `NBD_REP_INFO` payloads,
//! transmission requests, simple and structured replies), and which option requests the TLS
//! rules let through ([`gate_option`]).
//!
//! Everything here is a pure function over byte buffers: no I/O, no policy. Decoders check what
//! the format itself fixes (magic numbers, lengths, string rules) and return a typed
//! [`ProtocolError`]; whether a well-formed request is *acceptable* (in range, aligned, allowed
//! on this export) is the server's decision, not this module's. Nothing here may panic on
//! network data. Values follow the NBD protocol document (`doc/proto.md` in the nbd project);
//! all integers are big-endian.

use thiserror::Error;

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second 8 bytes of the greeting, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every transmission request (`NBD_REQUEST_MAGIC`).
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply (`NBD_SIMPLE_REPLY_MAGIC`).
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk (`NBD_STRUCTURED_REPLY_MAGIC`).
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;

/// Client flag: the client speaks fixed newstyle (required by this server).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags (16 bits, sent with the export size).
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_READ_ONLY: u16 = 1 << 1;
pub const FLAG_SEND_FLUSH: u16 = 1 << 2;
pub const FLAG_SEND_FUA: u16 = 1 << 3;
pub const FLAG_ROTATIONAL: u16 = 1 << 4;
pub const FLAG_SEND_TRIM: u16 = 1 << 5;
pub const FLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const FLAG_SEND_DF: u16 = 1 << 7;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Option types.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply types. Errors have bit 31 set.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

/// `NBD_REP_INFO` information types.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command types.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flag: last chunk of the reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Structured reply chunk types.
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// Server greeting: `NBDMAGIC`, `IHAVEOPT`, 16-bit handshake flags.
pub const GREETING_LEN: usize = 18;
/// Client flags after the greeting.
pub const CLIENT_FLAGS_LEN: usize = 4;
/// Option request header: magic, option, data length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Option reply header: magic, option, reply type, data length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Transmission request header: magic, flags, type, handle, offset, length.
pub const REQUEST_LEN: usize = 28;
/// Simple reply: magic, error, handle.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Structured reply chunk header: magic, flags, type, handle, payload length.
pub const STRUCTURED_REPLY_HEADER_LEN: usize = 20;
/// Zero padding after the `NBD_OPT_EXPORT_NAME` reply unless `NO_ZEROES` was negotiated.
pub const EXPORT_NAME_ZEROES: usize = 124;
/// Largest option payload the server accepts; larger ones are refused with `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION_DATA: u32 = 64 * 1024;
/// Longest string (export name, message) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;

/// A message that does not follow the wire format.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtocolError {
    #[error("message too short: need {need} bytes, got {got}")]
    Short { need: usize, got: usize },
    #[error("bad magic {found:#x}, expected {expected:#x}")]
    BadMagic { expected: u64, found: u64 },
    #[error("client did not set NBD_FLAG_C_FIXED_NEWSTYLE (flags {0:#x})")]
    NotFixedNewstyle(u32),
    #[error("client set unknown flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("string of {0} bytes is longer than the protocol allows")]
    StringTooLong(usize),
    #[error("string is not valid UTF-8 or contains NUL")]
    BadString,
    #[error("option data is malformed: {0}")]
    BadOptionData(&'static str),
}

fn be_u16(buf: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([buf[at], buf[at + 1]])
}

fn be_u32(buf: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

fn be_u64(buf: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    u64::from_be_bytes(b)
}

fn need(buf: &[u8], len: usize) -> Result<(), ProtocolError> {
    if buf.len() < len {
        return Err(ProtocolError::Short { need: len, got: buf.len() });
    }
    Ok(())
}

/// Decode a protocol string: UTF-8, no NUL, at most [`MAX_STRING_LEN`] bytes.
pub fn decode_string(bytes: &[u8]) -> Result<String, ProtocolError> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(ProtocolError::StringTooLong(bytes.len()));
    }
    if bytes.contains(&0) {
        return Err(ProtocolError::BadString);
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| ProtocolError::BadString)
}

/// `s` cut to at most [`MAX_STRING_LEN`] bytes on a character boundary (for messages we send).
pub fn clamp_string(s: &str) -> &str {
    if s.len() <= MAX_STRING_LEN {
        return s;
    }
    let mut end = MAX_STRING_LEN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, and `FIXED_NEWSTYLE | NO_ZEROES`.
pub fn encode_greeting() -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// What the client asked for in its flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    /// The 124 zero bytes after `NBD_OPT_EXPORT_NAME` must be left out.
    pub no_zeroes: bool,
}

/// Decode the client's 32-bit flags. Fixed newstyle is required and unknown bits are refused
/// (the protocol says the server must then drop the connection).
pub fn decode_client_flags(buf: &[u8]) -> Result<ClientFlags, ProtocolError> {
    need(buf, CLIENT_FLAGS_LEN)?;
    let flags = be_u32(buf, 0);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtocolError::UnknownClientFlags(flags));
    }
    if flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(ProtocolError::NotFixedNewstyle(flags));
    }
    Ok(ClientFlags { no_zeroes: flags & FLAG_C_NO_ZEROES != 0 })
}

/// An option request header; `len` bytes of option data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// Decode an option request header (checks the `IHAVEOPT` magic).
pub fn decode_option_header(buf: &[u8]) -> Result<OptionHeader, ProtocolError> {
    need(buf, OPTION_HEADER_LEN)?;
    let magic = be_u64(buf, 0);
    if magic != IHAVEOPT {
        return Err(ProtocolError::BadMagic { expected: IHAVEOPT, found: magic });
    }
    Ok(OptionHeader { option: be_u32(buf, 8), len: be_u32(buf, 12) })
}

/// Encode an option request (the client side; used by tests).
pub fn encode_option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OPTION_HEADER_LEN + data.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

/// Append an option reply (header and data) to `out`.
pub fn put_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// An option reply header, as a client reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub len: u32,
}

/// Decode an option reply header (the client side; used by tests).
pub fn decode_option_reply_header(buf: &[u8]) -> Result<OptionReplyHeader, ProtocolError> {
    need(buf, OPTION_REPLY_HEADER_LEN)?;
    let magic = be_u64(buf, 0);
    if magic != OPTION_REPLY_MAGIC {
        return Err(ProtocolError::BadMagic { expected: OPTION_REPLY_MAGIC, found: magic });
    }
    Ok(OptionReplyHeader { option: be_u32(buf, 8), reply_type: be_u32(buf, 12), len: be_u32(buf, 16) })
}

/// Data of an `NBD_OPT_INFO` or `NBD_OPT_GO`: an export name and the info types requested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

/// Decode `NBD_OPT_INFO` / `NBD_OPT_GO` data: 32-bit name length, name, 16-bit count, and that
/// many 16-bit info types, with nothing left over.
pub fn decode_info_request(data: &[u8]) -> Result<InfoRequest, ProtocolError> {
    if data.len() < 4 {
        return Err(ProtocolError::BadOptionData("missing export name length"));
    }
    let name_len = be_u32(data, 0) as usize;
    if name_len > MAX_STRING_LEN {
        return Err(ProtocolError::StringTooLong(name_len));
    }
    let rest = &data[4..];
    if rest.len() < name_len {
        return Err(ProtocolError::BadOptionData("export name runs past the option data"));
    }
    let name = decode_string(&rest[..name_len])?;
    let rest = &rest[name_len..];
    if rest.len() < 2 {
        return Err(ProtocolError::BadOptionData("missing information request count"));
    }
    let count = be_u16(rest, 0) as usize;
    let rest = &rest[2..];
    if rest.len() != count * 2 {
        return Err(ProtocolError::BadOptionData("information request count does not match the option length"));
    }
    let requests = rest.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
    Ok(InfoRequest { name, requests })
}

/// Encode `NBD_OPT_INFO` / `NBD_OPT_GO` data (the client side; used by tests).
pub fn encode_info_request(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + name.len() + 2 * requests.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        out.extend_from_slice(&r.to_be_bytes());
    }
    out
}

/// `NBD_REP_INFO` data for `NBD_INFO_EXPORT`: size and transmission flags.
pub fn encode_info_export(size: u64, transmission_flags: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
    out
}

/// `NBD_REP_INFO` data for `NBD_INFO_NAME` (the string is clamped to the protocol limit).
pub fn encode_info_name(name: &str) -> Vec<u8> {
    encode_info_string(INFO_NAME, name)
}

/// `NBD_REP_INFO` data for `NBD_INFO_DESCRIPTION` (the string is clamped to the protocol limit).
pub fn encode_info_description(description: &str) -> Vec<u8> {
    encode_info_string(INFO_DESCRIPTION, description)
}

fn encode_info_string(info: u16, s: &str) -> Vec<u8> {
    let s = clamp_string(s);
    let mut out = Vec::with_capacity(2 + s.len());
    out.extend_from_slice(&info.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    out
}

/// `NBD_REP_INFO` data for `NBD_INFO_BLOCK_SIZE`: minimum, preferred and maximum block sizes.
pub fn encode_info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(14);
    out.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    out.extend_from_slice(&minimum.to_be_bytes());
    out.extend_from_slice(&preferred.to_be_bytes());
    out.extend_from_slice(&maximum.to_be_bytes());
    out
}

/// `NBD_REP_SERVER` data: 32-bit name length and the name.
pub fn encode_rep_server(name: &str) -> Vec<u8> {
    let name = clamp_string(name);
    let mut out = Vec::with_capacity(4 + name.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out
}

/// The reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags, then 124 zero bytes unless the
/// client negotiated `NO_ZEROES`.
pub fn encode_export_name_reply(size: u64, transmission_flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut out = Vec::with_capacity(10 + EXPORT_NAME_ZEROES);
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&transmission_flags.to_be_bytes());
    if !no_zeroes {
        out.resize(out.len() + EXPORT_NAME_ZEROES, 0);
    }
    out
}

/// Where option haggling stands with respect to TLS (the NBD document's "TLS support" section).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPhase {
    /// The server has no TLS: `NBD_OPT_STARTTLS` is unsupported, everything else proceeds.
    Unavailable,
    /// TLS is offered but not required, and not negotiated yet ("selective TLS": whether a given
    /// export needs it is decided when it is opened).
    Offered,
    /// TLS is required and not negotiated yet ("forced TLS").
    Required,
    /// `NBD_OPT_STARTTLS` succeeded; haggling continues inside TLS.
    Established,
}

/// What to do with one option request before looking at what it asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionGate {
    /// Handle the option normally.
    Proceed,
    /// Reply `NBD_REP_ACK` to `NBD_OPT_STARTTLS`, then run the TLS handshake as the server.
    StartTls,
    /// Reply with this error type and keep haggling.
    Refuse(u32),
    /// Close the connection without a reply (`NBD_OPT_EXPORT_NAME` cannot carry an error).
    Close,
}

/// Gate an option request (`option` with `data_len` bytes of data) by the TLS phase:
///
/// - `NBD_OPT_STARTTLS` starts TLS when it is offered or required (its data must be empty,
///   else `NBD_REP_ERR_INVALID`); once TLS is up it is `NBD_REP_ERR_INVALID`; without TLS
///   support it is `NBD_REP_ERR_UNSUP`.
/// - While TLS is required and not negotiated, every option other than `NBD_OPT_STARTTLS` and
///   `NBD_OPT_ABORT` is refused with `NBD_REP_ERR_TLS_REQD`, except `NBD_OPT_EXPORT_NAME`, after
///   which the server closes the connection.
/// - Everything else proceeds.
pub fn gate_option(option: u32, data_len: u32, phase: TlsPhase) -> OptionGate {
    match (option, phase) {
        (OPT_STARTTLS, TlsPhase::Unavailable) => OptionGate::Refuse(REP_ERR_UNSUP),
        (OPT_STARTTLS, TlsPhase::Established) => OptionGate::Refuse(REP_ERR_INVALID),
        (OPT_STARTTLS, _) if data_len != 0 => OptionGate::Refuse(REP_ERR_INVALID),
        (OPT_STARTTLS, _) => OptionGate::StartTls,
        (OPT_ABORT, _) => OptionGate::Proceed,
        (OPT_EXPORT_NAME, TlsPhase::Required) => OptionGate::Close,
        (_, TlsPhase::Required) => OptionGate::Refuse(REP_ERR_TLS_REQD),
        _ => OptionGate::Proceed,
    }
}

/// A transmission request header. For `NBD_CMD_WRITE`, `len` bytes of data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub kind: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

/// Decode a request header. Bad magic means framing is lost: the caller must close.
pub fn decode_request(buf: &[u8]) -> Result<Request, ProtocolError> {
    need(buf, REQUEST_LEN)?;
    let magic = be_u32(buf, 0);
    if magic != REQUEST_MAGIC {
        return Err(ProtocolError::BadMagic { expected: REQUEST_MAGIC.into(), found: magic.into() });
    }
    Ok(Request {
        flags: be_u16(buf, 4),
        kind: be_u16(buf, 6),
        handle: be_u64(buf, 8),
        offset: be_u64(buf, 16),
        len: be_u32(buf, 24),
    })
}

/// Encode a request header (the client side; used by tests).
pub fn encode_request(req: &Request) -> [u8; REQUEST_LEN] {
    let mut out = [0u8; REQUEST_LEN];
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&req.flags.to_be_bytes());
    out[6..8].copy_from_slice(&req.kind.to_be_bytes());
    out[8..16].copy_from_slice(&req.handle.to_be_bytes());
    out[16..24].copy_from_slice(&req.offset.to_be_bytes());
    out[24..28].copy_from_slice(&req.len.to_be_bytes());
    out
}

/// A simple reply header (`error` 0 is success). A successful read's data follows it.
pub fn encode_simple_reply(error: u32, handle: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out
}

/// A decoded simple reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SimpleReply {
    pub error: u32,
    pub handle: u64,
}

/// Decode a simple reply header (the client side; used by tests).
pub fn decode_simple_reply(buf: &[u8]) -> Result<SimpleReply, ProtocolError> {
    need(buf, SIMPLE_REPLY_LEN)?;
    let magic = be_u32(buf, 0);
    if magic != SIMPLE_REPLY_MAGIC {
        return Err(ProtocolError::BadMagic { expected: SIMPLE_REPLY_MAGIC.into(), found: magic.into() });
    }
    Ok(SimpleReply { error: be_u32(buf, 4), handle: be_u64(buf, 8) })
}

/// A structured reply chunk header; `len` bytes of payload follow it.
pub fn encode_structured_header(
    flags: u16,
    reply_type: u16,
    handle: u64,
    len: u32,
) -> [u8; STRUCTURED_REPLY_HEADER_LEN] {
    let mut out = [0u8; STRUCTURED_REPLY_HEADER_LEN];
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&reply_type.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out[16..20].copy_from_slice(&len.to_be_bytes());
    out
}

/// A complete `NBD_REPLY_TYPE_NONE` chunk with `NBD_REPLY_FLAG_DONE` (a successful reply).
pub fn encode_structured_done(handle: u64) -> [u8; STRUCTURED_REPLY_HEADER_LEN] {
    encode_structured_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, handle, 0)
}

/// The header and offset of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk carrying `data_len` bytes;
/// the data follows. `data_len` must be at least 1 and at most `u32::MAX - 8`.
pub fn encode_structured_data_header(done: bool, handle: u64, offset: u64, data_len: u32) -> Vec<u8> {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    let mut out = Vec::with_capacity(STRUCTURED_REPLY_HEADER_LEN + 8);
    out.extend_from_slice(&encode_structured_header(flags, REPLY_TYPE_OFFSET_DATA, handle, data_len.saturating_add(8)));
    out.extend_from_slice(&offset.to_be_bytes());
    out
}

/// A complete, final `NBD_REPLY_TYPE_ERROR` chunk with a message (clamped to what fits).
pub fn encode_structured_error(handle: u64, error: u32, message: &str) -> Vec<u8> {
    let message = clamp_string(message);
    let payload_len = 6 + message.len();
    let mut out = Vec::with_capacity(STRUCTURED_REPLY_HEADER_LEN + payload_len);
    out.extend_from_slice(&encode_structured_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, handle, payload_len as u32));
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_is_nbdmagic_ihaveopt_and_flags() {
        let g = encode_greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..18], &[0, 3]);
    }

    #[test]
    fn client_flags_table() {
        let cases: &[(&[u8], Result<ClientFlags, ProtocolError>)] = &[
            (&[0, 0, 0, 1], Ok(ClientFlags { no_zeroes: false })),
            (&[0, 0, 0, 3], Ok(ClientFlags { no_zeroes: true })),
            (&[0, 0, 0, 0], Err(ProtocolError::NotFixedNewstyle(0))),
            (&[0, 0, 0, 2], Err(ProtocolError::NotFixedNewstyle(2))),
            (&[0, 0, 0, 5], Err(ProtocolError::UnknownClientFlags(5))),
            (&[0x80, 0, 0, 1], Err(ProtocolError::UnknownClientFlags(0x8000_0001))),
            (&[0, 0, 1], Err(ProtocolError::Short { need: 4, got: 3 })),
        ];
        for (bytes, want) in cases {
            assert_eq!(&decode_client_flags(bytes), want, "input {bytes:?}");
        }
    }

    #[test]
    fn option_header_roundtrip_and_bad_magic() {
        let bytes = encode_option(OPT_GO, b"abc");
        assert_eq!(bytes.len(), OPTION_HEADER_LEN + 3);
        assert_eq!(decode_option_header(&bytes).unwrap(), OptionHeader { option: OPT_GO, len: 3 });

        let mut bad = bytes.clone();
        bad[0] ^= 0xff;
        assert!(matches!(decode_option_header(&bad), Err(ProtocolError::BadMagic { .. })));
        assert_eq!(decode_option_header(&bytes[..15]), Err(ProtocolError::Short { need: 16, got: 15 }));
    }

    #[test]
    fn option_reply_roundtrip() {
        let mut out = Vec::new();
        put_option_reply(&mut out, OPT_LIST, REP_SERVER, &encode_rep_server("disk"));
        let h = decode_option_reply_header(&out).unwrap();
        assert_eq!(h, OptionReplyHeader { option: OPT_LIST, reply_type: REP_SERVER, len: 8 });
        assert_eq!(&out[OPTION_REPLY_HEADER_LEN..], &[0, 0, 0, 4, b'd', b'i', b's', b'k']);
        assert_eq!(&out[0..8], &[0x00, 0x03, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9]);
    }

    #[test]
    fn info_request_roundtrip() {
        let data = encode_info_request("vol-1", &[INFO_NAME, INFO_BLOCK_SIZE]);
        let req = decode_info_request(&data).unwrap();
        assert_eq!(req, InfoRequest { name: "vol-1".into(), requests: vec![INFO_NAME, INFO_BLOCK_SIZE] });
        let empty = decode_info_request(&encode_info_request("", &[])).unwrap();
        assert_eq!(empty, InfoRequest { name: String::new(), requests: vec![] });
    }

    #[test]
    fn malformed_info_requests_table() {
        let mut long_name = (MAX_STRING_LEN as u32 + 1).to_be_bytes().to_vec();
        long_name.extend(std::iter::repeat_n(b'a', MAX_STRING_LEN + 1));
        long_name.extend_from_slice(&[0, 0]);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("short length", vec![0, 0, 0]),
            ("name past end", vec![0, 0, 0, 9, b'a']),
            ("huge name length", vec![0xff, 0xff, 0xff, 0xff, b'a']),
            ("missing count", vec![0, 0, 0, 1, b'a']),
            ("half a count", vec![0, 0, 0, 1, b'a', 0]),
            ("count too big", vec![0, 0, 0, 1, b'a', 0, 2, 0, 3]),
            ("count too small", vec![0, 0, 0, 1, b'a', 0, 0, 0, 3]),
            ("odd trailing byte", vec![0, 0, 0, 1, b'a', 0, 1, 0, 3, 9]),
            ("NUL in name", vec![0, 0, 0, 2, b'a', 0, 0, 0]),
            ("invalid UTF-8", vec![0, 0, 0, 2, 0xc3, 0x28, 0, 0]),
            ("name too long", long_name),
        ];
        for (what, data) in cases {
            assert!(decode_info_request(&data).is_err(), "{what} should be refused");
        }
    }

    #[test]
    fn info_payloads() {
        assert_eq!(encode_info_export(0x0102, FLAG_HAS_FLAGS | FLAG_READ_ONLY), [0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 0, 3]);
        assert_eq!(encode_info_name("x"), [0, 1, b'x']);
        assert_eq!(encode_info_description("d"), [0, 2, b'd']);
        assert_eq!(encode_info_block_size(512, 4096, 1 << 25), [0, 3, 0, 0, 2, 0, 0, 0, 0x10, 0, 2, 0, 0, 0]);
        // Strings longer than the protocol allows are clamped on a char boundary.
        let long = "é".repeat(MAX_STRING_LEN);
        let enc = encode_info_description(&long);
        assert!(enc.len() - 2 <= MAX_STRING_LEN);
        assert!(std::str::from_utf8(&enc[2..]).is_ok());
    }

    #[test]
    fn export_name_reply_honours_no_zeroes() {
        let with = encode_export_name_reply(1 << 20, FLAG_HAS_FLAGS, false);
        assert_eq!(with.len(), 10 + EXPORT_NAME_ZEROES);
        assert!(with[10..].iter().all(|b| *b == 0));
        let without = encode_export_name_reply(1 << 20, FLAG_HAS_FLAGS, true);
        assert_eq!(without, [0, 0, 0, 0, 0, 0x10, 0, 0, 0, 1]);
    }

    #[test]
    fn tls_gate_table() {
        use OptionGate::*;
        use TlsPhase::*;
        let cases: &[(u32, u32, TlsPhase, OptionGate)] = &[
            // No TLS support: STARTTLS unsupported, everything else as usual.
            (OPT_STARTTLS, 0, Unavailable, Refuse(REP_ERR_UNSUP)),
            (OPT_GO, 9, Unavailable, Proceed),
            (OPT_LIST, 0, Unavailable, Proceed),
            (OPT_EXPORT_NAME, 4, Unavailable, Proceed),
            // Offered: STARTTLS starts it; other options go on in the clear.
            (OPT_STARTTLS, 0, Offered, StartTls),
            (OPT_STARTTLS, 1, Offered, Refuse(REP_ERR_INVALID)),
            (OPT_GO, 9, Offered, Proceed),
            (OPT_LIST, 0, Offered, Proceed),
            (OPT_EXPORT_NAME, 4, Offered, Proceed),
            // Required: only STARTTLS and ABORT before TLS.
            (OPT_STARTTLS, 0, Required, StartTls),
            (OPT_STARTTLS, 3, Required, Refuse(REP_ERR_INVALID)),
            (OPT_ABORT, 0, Required, Proceed),
            (OPT_GO, 9, Required, Refuse(REP_ERR_TLS_REQD)),
            (OPT_INFO, 9, Required, Refuse(REP_ERR_TLS_REQD)),
            (OPT_LIST, 0, Required, Refuse(REP_ERR_TLS_REQD)),
            (OPT_STRUCTURED_REPLY, 0, Required, Refuse(REP_ERR_TLS_REQD)),
            (0x1234, 0, Required, Refuse(REP_ERR_TLS_REQD)),
            (OPT_EXPORT_NAME, 4, Required, Close),
            // Inside TLS: a second STARTTLS is invalid, the rest proceeds.
            (OPT_STARTTLS, 0, Established, Refuse(REP_ERR_INVALID)),
            (OPT_GO, 9, Established, Proceed),
            (OPT_LIST, 0, Established, Proceed),
            (OPT_EXPORT_NAME, 4, Established, Proceed),
            (OPT_ABORT, 0, Established, Proceed),
        ];
        for &(option, len, phase, want) in cases {
            assert_eq!(gate_option(option, len, phase), want, "option {option} ({len} bytes) in {phase:?}");
        }
    }

    #[test]
    fn request_roundtrip() {
        let req = Request { flags: CMD_FLAG_FUA, kind: CMD_WRITE, handle: 0xdead_beef, offset: 4096, len: 512 };
        let bytes = encode_request(&req);
        assert_eq!(&bytes[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(decode_request(&bytes).unwrap(), req);
    }

    #[test]
    fn malformed_requests_table() {
        let good = encode_request(&Request { flags: 0, kind: CMD_READ, handle: 1, offset: 0, len: 512 });
        let mut bad_magic = good;
        bad_magic[3] = 0x14;
        let mut reply_magic = good;
        reply_magic[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("truncated", good[..27].to_vec()),
            ("bad magic", bad_magic.to_vec()),
            ("reply magic", reply_magic.to_vec()),
            ("zeroes", vec![0; REQUEST_LEN]),
        ];
        for (what, bytes) in cases {
            assert!(decode_request(&bytes).is_err(), "{what} should be refused");
        }
    }

    #[test]
    fn simple_reply_roundtrip() {
        let bytes = encode_simple_reply(22, 7);
        assert_eq!(&bytes[0..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(decode_simple_reply(&bytes).unwrap(), SimpleReply { error: 22, handle: 7 });
        assert!(decode_simple_reply(&bytes[..10]).is_err());
        let mut bad = bytes;
        bad[0] = 0;
        assert!(decode_simple_reply(&bad).is_err());
    }

    #[test]
    fn structured_replies() {
        let done = encode_structured_done(9);
        assert_eq!(&done[0..4], &[0x66, 0x8e, 0x33, 0xef]);
        assert_eq!(&done[4..8], &[0, 1, 0, 0]);
        assert_eq!(&done[16..20], &[0, 0, 0, 0]);

        let data = encode_structured_data_header(true, 9, 4096, 512);
        assert_eq!(data.len(), STRUCTURED_REPLY_HEADER_LEN + 8);
        assert_eq!(&data[6..8], &REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        assert_eq!(&data[16..20], &520u32.to_be_bytes());
        assert_eq!(&data[20..28], &4096u64.to_be_bytes());

        let err = encode_structured_error(9, 22, "bad");
        assert_eq!(&err[6..8], &[0x80, 0x01]);
        assert_eq!(&err[16..20], &9u32.to_be_bytes());
        assert_eq!(&err[20..24], &22u32.to_be_bytes());
        assert_eq!(&err[24..26], &3u16.to_be_bytes());
        assert_eq!(&err[26..], b"bad");
    }

    #[test]
    fn strings() {
        assert_eq!(decode_string(b"disk").unwrap(), "disk");
        assert_eq!(decode_string(b"a\0b"), Err(ProtocolError::BadString));
        assert_eq!(decode_string(&[0xff]), Err(ProtocolError::BadString));
        assert_eq!(decode_string(&vec![b'a'; MAX_STRING_LEN + 1]), Err(ProtocolError::StringTooLong(4097)));
        assert_eq!(clamp_string("abc"), "abc");
    }
}
