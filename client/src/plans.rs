//! The SDK's migration-plan API (C1): plan a group live migration, list and show plans, follow
//! one until it ends, cancel it; drain a host (plans that move every VM off it) and undrain it.
//!
//! Plans are catalog records driven by the leader; everything here is a catalog command or a
//! linearizable read, so any node can be asked. Times sent with commands come from this
//! machine's clock (the catalog never reads one). This module must not drive plans itself.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use haven_proto::plan::{DrainSkip, MigrationPlan, PlanOutcome, PlanQuery, PlanQueryResult, PlanSettings};
use haven_proto::vm::{VmQuery, VmQueryResult};
use haven_proto::{
    CatalogQuery, ClientCommand, ClientPlanCommand, ClientVmCommand, CommandOutcome, NodeId, QueryResult, VmId,
};

use crate::error::ClientError;
use crate::HavenClient;

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// What `create_plan` needs.
#[derive(Debug, Clone)]
pub struct PlanSpec {
    /// A label for the plan (default `plan-<id>`).
    pub name: Option<String>,
    /// The consistency group: VM names, `vm-N` or `N`, all on one host.
    pub vms: Vec<String>,
    pub to: NodeId,
    pub settings: PlanSettings,
}

/// What `drain_host` did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DrainReport {
    pub host: NodeId,
    /// One plan per destination host.
    pub plans: Vec<MigrationPlan>,
    /// VMs left on the host, and why.
    pub skipped: Vec<DrainSkip>,
}

impl HavenClient {
    async fn plan_command(&self, cmd: ClientPlanCommand) -> Result<PlanOutcome, ClientError> {
        cmd.validate().map_err(|m| ClientError::refused(m, false))?;
        match self.write(ClientCommand::Plan(cmd)).await? {
            (_, CommandOutcome::Plan(PlanOutcome::Refused { reason, not_found })) => {
                Err(ClientError::refused(reason, not_found))
            }
            (_, CommandOutcome::Plan(o)) => Ok(o),
            (_, other) => Err(ClientError::unexpected(other)),
        }
    }

    async fn plan_query(&self, q: PlanQuery) -> Result<PlanQueryResult, ClientError> {
        match self.read(CatalogQuery::Plan(q), true).await? {
            QueryResult::Plan(r) => Ok(r),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// Plan a group live migration. VM names are resolved first; the leader refuses unknown
    /// VMs or hosts, VMs on different hosts, a VM already in a plan, the same source and
    /// destination, a draining destination, or one without room for the group.
    pub async fn create_plan(&self, spec: &PlanSpec) -> Result<MigrationPlan, ClientError> {
        let mut vms = Vec::with_capacity(spec.vms.len());
        for name in &spec.vms {
            vms.push(self.vm(name).await?.id);
        }
        let cmd = ClientPlanCommand::Create {
            name: spec.name.clone(),
            vms,
            to: spec.to,
            settings: spec.settings.clone(),
            at_ms: now_ms(),
        };
        match self.plan_command(cmd).await? {
            PlanOutcome::Plan(p) => Ok(*p),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// Plan a group of VMs given by id.
    pub async fn create_plan_by_id(
        &self,
        name: Option<String>,
        vms: Vec<VmId>,
        to: NodeId,
        settings: PlanSettings,
    ) -> Result<MigrationPlan, ClientError> {
        let cmd = ClientPlanCommand::Create { name, vms, to, settings, at_ms: now_ms() };
        match self.plan_command(cmd).await? {
            PlanOutcome::Plan(p) => Ok(*p),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// Every plan, oldest first.
    pub async fn plans(&self) -> Result<Vec<MigrationPlan>, ClientError> {
        match self.plan_query(PlanQuery::Plans).await? {
            PlanQueryResult::Plans(p) => Ok(p),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// A plan by `plan-N`, `N` or name (the newest with that name); `NotFound` if none.
    pub async fn plan(&self, name_or_id: &str) -> Result<MigrationPlan, ClientError> {
        match self.plan_query(PlanQuery::Plan { name_or_id: name_or_id.into() }).await? {
            PlanQueryResult::Plan(Some(p)) => Ok(*p),
            PlanQueryResult::Plan(None) => Err(ClientError::refused(format!("no plan {name_or_id:?}"), true)),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// Cancel a plan that has not reached consolidation; it fails back.
    pub async fn cancel_plan(&self, id: u64, reason: &str) -> Result<MigrationPlan, ClientError> {
        let cmd = ClientPlanCommand::Cancel { id, reason: reason.into(), at_ms: now_ms() };
        match self.plan_command(cmd).await? {
            PlanOutcome::Plan(p) => Ok(*p),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// Follow plan `id` until it is `Succeeded` or `FailedBack`, calling `progress` with every
    /// version seen. Transient read errors are retried until `timeout`.
    pub async fn wait_plan(
        &self,
        id: u64,
        timeout: Duration,
        mut progress: impl FnMut(&MigrationPlan),
    ) -> Result<MigrationPlan, ClientError> {
        let started = Instant::now();
        loop {
            let last_error = match self.plan(&id.to_string()).await {
                Ok(p) => {
                    progress(&p);
                    if p.state.is_terminal() {
                        return Ok(p);
                    }
                    None
                }
                Err(e) if e.code() == Some(haven_proto::ErrorCode::NotFound) => return Err(e),
                Err(e) => Some(e),
            };
            if started.elapsed() >= timeout {
                return Err(last_error.unwrap_or_else(|| {
                    ClientError::Indeterminate(format!("plan {id} did not end within {timeout:?}"))
                }));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Mark `host` draining and plan moving every running VM off it.
    pub async fn drain_host(&self, host: NodeId, settings: PlanSettings) -> Result<DrainReport, ClientError> {
        match self.plan_command(ClientPlanCommand::Drain { host, settings, at_ms: now_ms() }).await? {
            PlanOutcome::Drained { host, plans, skipped } => Ok(DrainReport { host, plans, skipped }),
            other => Err(ClientError::unexpected(other)),
        }
    }

    /// Clear `host`'s draining mark (plans under way keep going).
    pub async fn undrain_host(&self, host: NodeId) -> Result<(), ClientError> {
        let cmd = ClientVmCommand::SetDraining { host, draining: false };
        match self.write(ClientCommand::Vm(cmd)).await? {
            (_, CommandOutcome::Vm(haven_proto::vm::VmOutcome::Refused { reason, not_found })) => {
                Err(ClientError::refused(reason, not_found))
            }
            (_, CommandOutcome::Vm(_)) => Ok(()),
            (_, other) => Err(ClientError::unexpected(other)),
        }
    }

    /// Hosts marked draining.
    pub async fn draining_hosts(&self) -> Result<Vec<NodeId>, ClientError> {
        match self.read(CatalogQuery::Vm(VmQuery::Draining), true).await? {
            QueryResult::Vm(VmQueryResult::Draining(h)) => Ok(h),
            other => Err(ClientError::unexpected(other)),
        }
    }
}
