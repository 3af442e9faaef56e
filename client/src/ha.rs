//! The SDK's HA-pair API (C6): protect a VM with a standby on another host, switch its mode
//! (redundant checkpointing or multi-operation), unprotect it, read the pairs, and wait until a
//! standby could take over.
//!
//! Pair changes go through Raft as `ClientHaCommand`s; each host's view of a pair
//! (`HavenClient::ha_status`, in `vms`) and the VM's application state (`app_put`, `app_get`)
//! are live VM requests answered on the host.

use std::time::{Duration, Instant};

use haven_proto::ha::{HaMode, HaOutcome, HaPairRecord, HaQuery, HaQueryResult, HaVmStatus};
use haven_proto::{
    CatalogQuery, ClientCommand, ClientHaCommand, CommandOutcome, ErrorCode, NodeId, QueryResult, VmId, WireError,
};

use crate::error::ClientError;
use crate::HavenClient;

/// The role a standby reports once it holds a complete copy it could start the VM from.
pub const STANDBY_READY: &str = "standby-ready";

/// How often [`HavenClient::wait_ha_ready`] asks the standby.
const READY_POLL: Duration = Duration::from_millis(100);

impl HavenClient {
    async fn ha_command(&self, cmd: ClientHaCommand) -> Result<HaOutcome, ClientError> {
        cmd.validate().map_err(|m| ClientError::refused(m, false))?;
        match self.write(ClientCommand::Ha(cmd)).await? {
            (_, CommandOutcome::Ha(HaOutcome::Refused { reason, not_found })) => {
                Err(ClientError::refused(reason, not_found))
            }
            (_, CommandOutcome::Ha(o)) => Ok(o),
            (_, other) => Err(ClientError::unexpected(other)),
        }
    }

    async fn ha_query(&self, q: HaQuery) -> Result<HaQueryResult, ClientError> {
        match self.read(CatalogQuery::Ha(q), true).await? {
            QueryResult::Ha(r) => Ok(r),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// Protect `vm` with a standby on `standby` (`None`: the cluster picks one; the pair is
    /// degraded until it does). The primary is the VM's current host.
    pub async fn create_ha_pair(
        &self,
        vm: VmId,
        standby: Option<NodeId>,
        mode: HaMode,
    ) -> Result<HaPairRecord, ClientError> {
        let primary = self.vm(&vm.to_string()).await?.host;
        let cmd = ClientHaCommand::Create { vm, primary, standby, mode };
        pair_after(self.ha_command(cmd).await?)
    }

    /// Unprotect `vm`: its standby drops its copy; the VM keeps running on its primary.
    pub async fn delete_ha_pair(&self, vm: VmId) -> Result<(), ClientError> {
        self.ha_command(ClientHaCommand::Delete { vm }).await.map(|_| ())
    }

    /// Switch the pair's mode live (a compare-and-set on its generation, retried once if the
    /// pair changed between the read and the write).
    pub async fn set_ha_mode(&self, vm: VmId, mode: HaMode) -> Result<HaPairRecord, ClientError> {
        match self.try_set_ha_mode(vm, mode).await {
            Err(e) if is_generation_refusal(&e) => self.try_set_ha_mode(vm, mode).await,
            other => other,
        }
    }

    async fn try_set_ha_mode(&self, vm: VmId, mode: HaMode) -> Result<HaPairRecord, ClientError> {
        let pair = self.ha_pair(vm).await?;
        let cmd = ClientHaCommand::SetMode { vm, mode, expected_generation: pair.generation };
        pair_after(self.ha_command(cmd).await?)
    }

    /// Every HA pair, in VM order.
    pub async fn ha_pairs(&self) -> Result<Vec<HaPairRecord>, ClientError> {
        match self.ha_query(HaQuery::List).await? {
            HaQueryResult::Pairs(p) => Ok(p),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// The pair protecting `vm`; a clear `NotFound` error if it has none.
    pub async fn ha_pair(&self, vm: VmId) -> Result<HaPairRecord, ClientError> {
        match self.ha_query(HaQuery::Get { vm }).await? {
            HaQueryResult::Pair(Some(p)) => Ok(p),
            HaQueryResult::Pair(None) => Err(ClientError::refused(format!("{vm} has no HA pair"), true)),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// Wait until the pair's standby reports `standby-ready` at the pair's current generation
    /// (or a newer one), polling its host; a `Timeout` error, with the last answer, once
    /// `timeout` has passed. Fails at once if `vm` has no pair.
    pub async fn wait_ha_ready(&self, vm: VmId, timeout: Duration) -> Result<HaVmStatus, ClientError> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.standby_probe(vm).await? {
                Ok(s) => return Ok(s),
                Err(why) => why,
            };
            if Instant::now() >= deadline {
                let msg = format!("the standby of {vm} was not ready after {timeout:?} ({last})");
                return Err(ClientError::Server(WireError::new(ErrorCode::Timeout, msg)));
            }
            tokio::time::sleep(READY_POLL).await;
        }
    }

    /// One look at the standby: its status if ready, else why not (the outer error: no pair).
    async fn standby_probe(&self, vm: VmId) -> Result<Result<HaVmStatus, String>, ClientError> {
        let pair = self.ha_pair(vm).await?;
        let Some(standby) = pair.standby else {
            return Ok(Err(format!("no standby yet, pair {:?}", pair.state)));
        };
        Ok(match self.ha_status(vm, Some(standby)).await {
            Ok(s) if s.role == STANDBY_READY && s.generation >= pair.generation => Ok(s),
            Ok(s) => Err(format!("{standby} is {} at generation {} of {}", s.role, s.generation, pair.generation)),
            Err(e) => Err(format!("{standby}: {e}")),
        })
    }
}

/// The record a create or mode switch answered with.
fn pair_after(outcome: HaOutcome) -> Result<HaPairRecord, ClientError> {
    match outcome {
        HaOutcome::Pair(Some(p)) => Ok(p),
        other => Err(ClientError::unexpected(other)),
    }
}

/// The catalog refused a compare-and-set because the pair moved on ("… is at generation N, not
/// M"): worth one more read and try.
fn is_generation_refusal(e: &ClientError) -> bool {
    matches!(e, ClientError::Server(w) if w.code == ErrorCode::InvalidRequest && w.message.contains(" is at generation "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_refusals_are_recognized() {
        let stale = ClientError::refused("the pair of vm-1 is at generation 4, not 3".into(), false);
        assert!(is_generation_refusal(&stale));
        let failing = ClientError::refused("the pair of vm-1 is failing over".into(), false);
        assert!(!is_generation_refusal(&failing));
        let gone = ClientError::refused("vm-1 has no HA pair".into(), true);
        assert!(!is_generation_refusal(&gone));
    }

    #[test]
    fn only_a_record_is_a_pair() {
        assert!(pair_after(HaOutcome::Pair(None)).is_err());
        let r = HaPairRecord {
            vm: VmId(1),
            primary: NodeId(1),
            standby: None,
            mode: HaMode::MultiOperation,
            state: haven_proto::ha::PairState::Degraded,
            generation: 1,
            failovers: 0,
            last_failover: None,
        };
        assert_eq!(pair_after(HaOutcome::Pair(Some(r.clone()))).ok(), Some(r));
    }
}
