//! A whole NBD connection — greeting, option haggling, transmission — served by the real server
//! code over an in-memory pipe, against in-memory exports. The input is everything the client
//! sends; the client then closes its side and reads until the server hangs up.
//!
//! Properties: no panic and no hang; every call reaching an export is in range, aligned, within
//! the payload limit and never modifies the read-only export (asserted inside the backend);
//! the read-only export's bytes are unchanged afterwards; the server's output is exactly what it
//! owes (see `haven_fuzz::nbd_model::check_session`): the greeting, the right replies to each
//! complete option, then exactly one simple reply per complete request with the errno
//! validation dictates and a read's data; peak allocation stays within a fixed budget
//! (connection buffers plus in-flight payloads), whatever lengths the client announces.
#![no_main]

use haven_fuzz::nbd_model::{check_session, Exports, MAX_PAYLOAD};
use haven_fuzz::{assert_alloc_bounded, measure, runtime};
use haven_node::fuzz_api::nbd_serve_connection;
use haven_node::nbd::NbdServerConfig;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fuzz_target!(init: haven_fuzz::seeds::write_if_asked("nbd_session"), |data: &[u8]| {
    let exports = Exports::new();
    let ro_before = exports.ro.data.lock().unwrap().clone();
    let config = NbdServerConfig { max_payload: MAX_PAYLOAD, max_connections: 1, ..NbdServerConfig::default() };
    let (output, peak) = measure(|| {
        runtime().block_on(async {
            let (client, server) = tokio::io::duplex(64 * 1024);
            let (mut crd, mut cwr) = tokio::io::split(client);
            let serve = nbd_serve_connection(server, exports.clone(), config);
            let send = async {
                // The server may hang up before reading everything; that is its right.
                let _ = cwr.write_all(data).await;
                let _ = cwr.shutdown().await;
                drop(cwr);
            };
            let receive = async {
                let mut out = Vec::new();
                crd.read_to_end(&mut out).await.expect("reading the server's replies");
                out
            };
            let ((), (), out) = tokio::join!(serve, send, receive);
            out
        })
    });
    // Read buffer (128 KiB), pipe (2 x 64 KiB), option data (64 KiB) and payloads in flight.
    assert_alloc_bounded("NBD session", peak, data.len(), 4, 4 << 20);
    assert_eq!(*exports.ro.data.lock().unwrap(), ro_before, "the read-only export changed");
    if let Err(e) = check_session(data, &output, &exports) {
        panic!("NBD session: {e}\ninput {} bytes, output {} bytes", data.len(), output.len());
    }
});
