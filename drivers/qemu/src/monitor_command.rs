//! `qemu-monitor-command`: a QMP command (or, with `human`, an HMP command
//! line) passed through to a running domain's QEMU on the driver's own
//! monitor connection, as virsh does it.

use serde_json::{json, Value};
use strata_core::{Error, Result};
use strata_qemu_block::monitor::qmp_error;
use strata_qmp::{QmpClient, QmpError};

/// Sends `command` on `client`, the monitor of `domain`, and returns the
/// reply as virsh prints it.
pub(crate) async fn run(client: &QmpClient, domain: &str, command: &str, human: bool) -> Result<String> {
    if human {
        return client.human_monitor_command(command).await.map_err(|e| qmp_error(domain, e));
    }
    let request: Value = serde_json::from_str(command)
        .map_err(|e| Error::invalid_arg(format!("the monitor command is not QMP JSON: {e}")))?;
    let execute = request
        .get("execute")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::invalid_arg("the monitor command has no \"execute\" member naming a QMP command"))?;
    let reply = match client.execute(execute, request.get("arguments").cloned()).await {
        Ok(value) => json!({ "return": value }),
        // QEMU's refusal is its reply, printed as virsh prints it.
        Err(QmpError::Command { class, desc, .. }) => json!({ "error": { "class": class, "desc": desc } }),
        Err(e) => return Err(qmp_error(domain, e)),
    };
    Ok(reply.to_string())
}
