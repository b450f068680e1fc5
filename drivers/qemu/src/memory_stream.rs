//! QEMU's migration stream into and out of a descriptor passed over the
//! monitor socket (`getfd`, `migrate fd:`, `migrate-incoming fd:`): no
//! shell, no `exec:` (seed 003). Saves and memory snapshots write it,
//! restores and reverts read it, and any process can watch or cancel it
//! through its own monitor.

use std::os::fd::BorrowedFd;
use std::time::Duration;

use serde_json::{json, Value};
use strata_core::{Error, ErrorKind, Result};
use strata_qmp::QmpClient;

use strata_qemu_block::monitor::qmp_error;

/// As fast as the host allows: QEMU's default cap (128 MiB/s) also
/// throttles a migration into a file (recipe book, quirk 8).
pub(crate) const UNCAPPED: u64 = 10 << 30;
/// The descriptor's name in QEMU.
const FD_NAME: &str = "strata-migration";

/// Migrates the guest's state into `fd`, capped at `bandwidth` bytes/s.
pub(crate) async fn migrate_to_fd(client: &QmpClient, domain: &str, fd: BorrowedFd<'_>, bandwidth: u64) -> Result<()> {
    client.send_fd(FD_NAME, fd).await.map_err(|e| qmp_error(domain, e))?;
    client
        .execute("migrate-set-parameters", Some(json!({"max-bandwidth": bandwidth})))
        .await
        .map_err(|e| qmp_error(domain, e))?;
    client.execute("migrate", Some(json!({"uri": format!("fd:{FD_NAME}")}))).await.map_err(|e| qmp_error(domain, e))?;
    wait_transfer(client, domain).await
}

/// Loads a guest's state from `fd` (read from its current offset) into a
/// QEMU started with `-incoming defer`.
pub(crate) async fn migrate_from_fd(client: &QmpClient, domain: &str, fd: BorrowedFd<'_>) -> Result<()> {
    client.send_fd(FD_NAME, fd).await.map_err(|e| qmp_error(domain, e))?;
    client
        .execute("migrate-incoming", Some(json!({"uri": format!("fd:{FD_NAME}")})))
        .await
        .map_err(|e| qmp_error(domain, e))?;
    wait_transfer(client, domain).await
}

/// Waits for the migration stream's end; a cancelled one is an aborted
/// operation, as libvirt reports it.
async fn wait_transfer(client: &QmpClient, domain: &str) -> Result<()> {
    match wait_migration(client, domain).await {
        Err(e) if migration_status(client).await.as_deref() == Some("cancelled") => Err(Error::new(
            ErrorKind::OperationAborted,
            format!("operation aborted: migration job: canceled by client ({})", e.message()),
        )),
        other => other,
    }
}

pub(crate) async fn query_migrate(client: &QmpClient, domain: &str) -> Result<Value> {
    client.execute("query-migrate", None).await.map_err(|e| qmp_error(domain, e))
}

pub(crate) async fn migration_status(client: &QmpClient) -> Option<String> {
    let info = client.execute("query-migrate", None).await.ok()?;
    info.get("status").and_then(Value::as_str).map(str::to_string)
}

/// A migration in one of these states is still moving data.
pub(crate) fn is_active(status: &str) -> bool {
    !matches!(status, "none" | "completed" | "failed" | "cancelled")
}

/// Waits for an outgoing or incoming migration to end.
async fn wait_migration(client: &QmpClient, domain: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(600);
    loop {
        let info = client.execute("query-migrate", None).await.map_err(|e| qmp_error(domain, e))?;
        match info.get("status").and_then(|s| s.as_str()) {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => {
                let why = info.get("error-desc").and_then(|e| e.as_str()).unwrap_or("unknown reason");
                return Err(Error::operation_failed(format!("saving or loading the VM state failed: {why}")));
            }
            _ => {}
        }
        if std::time::Instant::now() >= deadline {
            return Err(Error::new(ErrorKind::OperationTimeout, "the VM state transfer took over 10 minutes"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
