//! Roles through the CLI only: who havenctl is connected as, the cluster's certificates and their
//! expiry, and a `reader` certificate that reads but cannot write.

use std::process::Command;

mod common;

use common::{bin, fails_with, healthy_cluster, ok, ok_json};

#[test]
fn whoami_certs_and_a_reader_that_cannot_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = healthy_cluster(dir.path());
    let c = cluster.dir().to_path_buf();

    let me = ok_json(&["cluster", "whoami"], &c);
    assert_eq!(me["client"]["role"], "admin", "{me}");

    let certs = ok_json(&["cluster", "certs"], &c);
    let list = certs["certificates"].as_array().expect("certificates");
    let identities: Vec<&str> = list.iter().filter_map(|x| x["identity"].as_str()).collect();
    for want in ["ca", "haven://node/1", "haven://node/2", "haven://node/3"] {
        assert!(identities.contains(&want), "{want} missing from {identities:?}");
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    for cert in list {
        let not_after = cert["not_after_unix_s"].as_i64().unwrap();
        assert!(not_after > now + 300 * 86_400, "{cert} expires too soon");
    }

    ok(&["kv", "put", "greeting", "hello"], &c);
    let ro = dir.path().join("ro");
    let nodes: Vec<String> = cluster.nodes().iter().map(|n| n.addr.to_string()).collect();
    let issued = Command::new(bin().with_file_name("haven-node"))
        .args(["issue-cert", "--ca-dir"])
        .arg(c.join("ca"))
        .arg("--out")
        .arg(ro.join("certs"))
        .args(["--role", "reader", "--name", "dashboard", "--client-config-nodes", &nodes.join(",")])
        .output()
        .unwrap();
    assert!(issued.status.success(), "{}", String::from_utf8_lossy(&issued.stderr));
    let who = ok_json(&["cluster", "whoami"], &ro);
    assert_eq!(who["client"]["role"], "reader", "{who}");
    let got = ok_json(&["kv", "get", "greeting"], &ro);
    assert_eq!(got["value"], "hello");
    fails_with(&["kv", "put", "greeting", "defaced"], &ro, 1, "permission denied");
    fails_with(&["volume", "create", "x", "--size", "1MiB"], &ro, 1, "permission denied");
    assert_eq!(ok_json(&["kv", "get", "greeting"], &c)["value"], "hello");
    cluster.stop_all(std::time::Duration::from_secs(5));
}
