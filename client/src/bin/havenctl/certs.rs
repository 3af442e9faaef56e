//! `havenctl cluster certs`: the cluster CA's and every member's certificate, asked of each
//! member, with days left before expiry; and the identity this client connected as.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use haven_client::proto::CertificateInfo;
use haven_client::{ClusterConfig, HavenClient};
use serde_json::json;

use crate::output::Output;

/// Days left at which a certificate is flagged as expiring soon.
const WARN_DAYS: i64 = 30;

pub async fn cluster_certs(client: &HavenClient, config: &ClusterConfig, out: &Output) -> anyhow::Result<()> {
    let me = client.whoami().await.context("asking who this client is")?;
    let status = client.status().await.context("asking for the members")?;
    let now_s = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    let mut certs: Vec<CertificateInfo> = Vec::new();
    let mut unreachable = Vec::new();
    for m in &status.members {
        let Ok(addr) = m.addr.parse() else {
            unreachable.push(format!("{} ({} is not an address this machine can dial)", m.id, m.addr));
            continue;
        };
        match client.clone().with_deadline(Duration::from_secs(3)).certificates_of(addr).await {
            Ok(list) => {
                for c in list {
                    // Every member reports the CA; list it once.
                    if !certs.iter().any(|k| k.sha256 == c.sha256) {
                        certs.push(c);
                    }
                }
            }
            Err(e) => unreachable.push(format!("{} ({e})", m.id)),
        }
    }
    let rows = certs
        .iter()
        .map(|c| {
            vec![
                c.identity.clone(),
                c.subject.clone(),
                c.serial.clone(),
                expiry(c.not_after_unix_s, now_s),
                c.sha256[..16].to_string(),
            ]
        })
        .collect();
    out.headline(&format!("connected as {me} with {}", config.cert.display()));
    for u in &unreachable {
        out.headline(&format!("not reachable: {u}"));
    }
    out.table(
        &["identity", "subject", "serial", "expires", "sha256"],
        rows,
        json!({"client": me, "certificates": certs, "unreachable": unreachable}),
    );
    Ok(())
}

/// "in 812 days", "EXPIRED 3 days ago", with a warning inside [`WARN_DAYS`].
fn expiry(not_after_s: i64, now_s: i64) -> String {
    let days = (not_after_s - now_s).div_euclid(86_400);
    match days {
        d if d < 0 => format!("EXPIRED {} days ago", -d),
        d if d < WARN_DAYS => format!("in {d} days (renew soon)"),
        d => format!("in {d} days"),
    }
}

#[cfg(test)]
mod tests {
    use super::expiry;

    #[test]
    fn expiry_reads_well() {
        assert_eq!(expiry(100 * 86_400, 0), "in 100 days");
        assert_eq!(expiry(86_400 * 5, 0), "in 5 days (renew soon)");
        assert_eq!(expiry(0, 3 * 86_400), "EXPIRED 3 days ago");
    }
}
