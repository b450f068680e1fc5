//! A live disk snapshot in a running QEMU or storage daemon: each new
//! overlay created and added as nodes by QMP, then every device switched
//! in one `transaction`, so that all devices' snapshots are of one
//! instant (the QEMU driver's `SnapshotBackend` calls this for a VM; a
//! container's storage daemon takes it the same way). What a snapshot
//! means and records is `strata_engine::snapshot`'s.

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::{json, Value};
use strata_core::image::UnsyncedOverlay;
use strata_core::{Error, Result};
use strata_engine::blocking::on_own_thread;
use strata_engine::image_work::{path_str, write_overlay};
use strata_engine::snapshot::{DiskPlan, NewTops};
use strata_qmp::{HeldCommands, QmpClient, QmpError};

use crate::monitor::qmp_error;
use crate::nodes::node_prefix;

/// Takes the `plans` of snapshot `name` in the process `client` talks to
/// (serving `domain`): [`prepare_snapshot_live`], then
/// [`PreparedSnapshot::switch`]; `held`: what [`hold_overlay_additions`]
/// held for it. Returns each device's new root node. On
/// failure the nodes added are removed and the overlays it made deleted. The caller holds the unattached-nodes lock
/// ([`crate::jobs::lock_unattached_nodes`]) from before until it has
/// recorded the new roots.
#[allow(clippy::too_many_arguments)]
pub async fn snapshot_live(
    client: &QmpClient,
    domain: &str,
    plans: &[DiskPlan],
    name: &str,
    number: u64,
    created: &[PathBuf],
    root: impl Fn(&str) -> Result<String>,
    held: Option<HeldCommands>,
) -> Result<NewTops> {
    let prepared = prepare_snapshot_live(client, domain, plans, name, number, created, root, held).await?;
    strata_core::crash_point("snapshot-create:overlays");
    strata_core::pause_point("snapshot-create:overlays");
    prepared.switch(client, domain).await
}

/// The root node each external plan of `plans` gets when their overlays
/// are numbered from `number` (as [`prepare_snapshot_live`] numbers
/// them), known before QEMU is asked anything.
pub fn new_roots(plans: &[DiskPlan], number: u64) -> NewTops {
    plans
        .iter()
        .filter(|p| p.mode == "external")
        .zip(number..)
        .map(|(p, n)| (p.target.clone(), overlay_nodes(&p.target, n).0))
        .collect()
}

/// The format and protocol node names of overlay `number` of device
/// `target`.
fn overlay_nodes(target: &str, number: u64) -> (String, String) {
    let prefix = node_prefix(target);
    (format!("{prefix}-o{number}-fmt"), format!("{prefix}-o{number}-file"))
}

/// The `blockdev-add` arguments of overlay `overlay` as nodes `fmt_node`
/// and `file_node`. The protocol node is given inline (it goes with its
/// format node, see `nodes::inline_parent`): one command where two were,
/// and QEMU reads a command's JSON a byte at a time (about 5 µs each
/// here). Quirk 2: "backing": null, or QEMU opens the header's backing
/// file a second time and fails on its lock.
fn overlay_addition(fmt_node: &str, file_node: &str, overlay: &str) -> Value {
    json!({"driver": "qcow2", "node-name": fmt_node, "backing": null,
           "file": {"driver": "file", "node-name": file_node, "filename": overlay}})
}

/// Writes the `blockdev-add` commands of the overlays of `plans` (their
/// nodes numbered from `number`) to `client` but their last bytes (see
/// [`QmpClient::hold`]), so that QEMU reads them while the snapshot's
/// intent is written and its overlays made; [`snapshot_live`] with the
/// same plans and number runs them. `None` when no plan is external.
pub async fn hold_overlay_additions(
    client: &QmpClient,
    domain: &str,
    plans: &[DiskPlan],
    number: u64,
) -> Result<Option<HeldCommands>> {
    let mut commands = Vec::new();
    for (p, n) in plans.iter().filter(|p| p.mode == "external").zip(number..) {
        let overlay = p.overlay.as_ref().ok_or_else(|| Error::internal("external plan without overlay"))?;
        let (fmt_node, file_node) = overlay_nodes(&p.target, n);
        commands.push(("blockdev-add", Some(overlay_addition(&fmt_node, &file_node, path_str(overlay)?))));
    }
    if commands.is_empty() {
        return Ok(None);
    }
    client.hold(commands).await.map(Some).map_err(|e| qmp_error(domain, e))
}

/// A live snapshot readied before its intent was written: the first of its
/// reserved node numbers and its held `blockdev-add` commands (see
/// [`hold_overlay_additions`]), for snapshot `name` of `plans`.
pub struct ReadiedSnapshot {
    name: String,
    plans: Vec<DiskPlan>,
    number: u64,
    held: HeldCommands,
}

impl ReadiedSnapshot {
    pub fn new(name: &str, plans: &[DiskPlan], number: u64, held: HeldCommands) -> ReadiedSnapshot {
        ReadiedSnapshot { name: name.to_string(), plans: plans.to_vec(), number, held }
    }

    /// Its node numbers and held commands, if it was readied for snapshot
    /// `name` of `plans`.
    pub fn take_for(self, name: &str, plans: &[DiskPlan]) -> Option<(u64, HeldCommands)> {
        (self.name == name && self.plans == plans).then_some((self.number, self.held))
    }
}

/// A live snapshot's nodes added to one process, not yet switched in:
/// what can fail short of the process itself (a node name taken, an
/// overlay that cannot be opened) has not.
pub struct PreparedSnapshot {
    new_roots: NewTops,
    added: Vec<String>,
    /// The command that switches the devices, and its arguments.
    switch: (String, Value),
    /// That command, held (see [`QmpClient::hold`]): QEMU has read it
    /// while it added the nodes and the overlays were synced.
    held_switch: Option<HeldCommands>,
    /// The overlay files made for it.
    created: Vec<PathBuf>,
}

/// The one command that takes `actions` at once: a `transaction`, or the
/// action's own command when there is one (QEMU runs it as a transaction
/// of one, and the shorter JSON is read sooner).
fn switch_command(actions: Vec<Value>) -> (String, Value) {
    match <[Value; 1]>::try_from(actions) {
        Ok([mut action]) => (action["type"].as_str().unwrap_or_default().to_string(), action["data"].take()),
        Err(actions) => ("transaction".to_string(), json!({"actions": actions})),
    }
}

/// Prepares the `plans` of snapshot `name` in the process `client` talks
/// to (serving `domain`): an internal snapshot of each `internal` device's
/// root node (`root` gives a device's), and for each `external` one its
/// overlay (when it is among `created`: made here with its qcow2 header
/// naming the frozen image as its backing file) added as nodes numbered
/// from `number`, all in one write, or by running `held` when it holds
/// those very commands. On failure the nodes added are removed and the
/// overlays made here deleted.
#[allow(clippy::too_many_arguments)]
pub async fn prepare_snapshot_live(
    client: &QmpClient,
    domain: &str,
    plans: &[DiskPlan],
    name: &str,
    mut number: u64,
    created: &[PathBuf],
    root: impl Fn(&str) -> Result<String>,
    held: Option<HeldCommands>,
) -> Result<PreparedSnapshot> {
    let mut new_roots = HashMap::new();
    let mut added: Vec<String> = Vec::new();
    let mut actions: Vec<Value> = Vec::new();
    // The files this call made: only those are deleted on failure (one that
    // appeared since the plan was made is someone else's).
    let mut made: Vec<PathBuf> = Vec::new();
    let mut unsynced: Vec<UnsyncedOverlay> = Vec::new();
    let mut switch = (String::new(), Value::Null);
    let mut held_switch = None;
    let outcome = async {
        // Every overlay's nodes, added in one write once the files exist
        // (QEMU takes the commands in order): (node name, arguments).
        let mut additions: Vec<(String, Value)> = Vec::new();
        for p in plans {
            match p.mode.as_str() {
                "internal" => actions.push(json!({
                    "type": "blockdev-snapshot-internal-sync",
                    "data": {"device": root(&p.target)?, "name": name},
                })),
                "external" => {
                    let overlay = p.overlay.as_ref().ok_or_else(|| Error::internal("external plan without overlay"))?;
                    let (fmt_node, file_node) = overlay_nodes(&p.target, number);
                    number += 1;
                    new_roots.insert(p.target.clone(), fmt_node.clone());
                    let ov = path_str(overlay)?;
                    if created.contains(overlay) {
                        // The overlay is made here, natively, instead of by
                        // QEMU's `blockdev-create` jobs (a job, its events and
                        // its dismissal per overlay; QEMU's qcow2 creation
                        // alone took about 5 ms): an exclusive create, so that
                        // no file is taken over, then the header that names
                        // the frozen image and its format (QMP's
                        // blockdev-snapshot never writes the backing name into
                        // the overlay, recipe book quirk 3). The intent
                        // already names the file for recovery. Its sync runs
                        // while QEMU adds its nodes (below).
                        std::fs::OpenOptions::new().write(true).create_new(true).open(overlay).map_err(|e| {
                            Error::operation_failed(format!("cannot create '{}': {e}", overlay.display()))
                        })?;
                        made.push(overlay.clone());
                        unsynced.push(write_overlay(&p.image, &p.format, overlay)?);
                    }
                    additions.push((fmt_node.clone(), overlay_addition(&fmt_node, &file_node, ov)));
                    actions.push(json!({
                        "type": "blockdev-snapshot",
                        "data": {"node": root(&p.target)?, "overlay": fmt_node},
                    }));
                }
                _ => {}
            }
        }
        let commands: Vec<_> = additions.iter().map(|(_, args)| ("blockdev-add", Some(args.clone()))).collect();
        switch = switch_command(std::mem::take(&mut actions));
        // The switch is held behind them: QEMU reads it once it has added
        // the nodes, while the overlays' sync (which the switch waits
        // for) ends.
        let (command, arguments) = &switch;
        let adding = async {
            // Held commands that are not these are dropped, and the write
            // of these aborts them.
            let sent = match held.filter(|h| h.on(client) && h.are(&commands)) {
                Some(held) => held.send().await,
                None => client.send_in_order(commands).await,
            };
            let held_switch = client.hold(vec![(command.as_str(), Some(arguments.clone()))]).await.ok();
            (sent.replies().await, held_switch)
        };
        // QEMU reads the new overlays from the page cache while they are
        // synced; the transaction that lets the guest write to them comes
        // only once they are on disk.
        let overlays = std::mem::take(&mut unsynced);
        let syncing = async {
            if overlays.is_empty() {
                return Ok(());
            }
            on_own_thread(move || overlays.into_iter().try_for_each(UnsyncedOverlay::sync)).await
        };
        let ((replies, held), synced) = tokio::join!(adding, syncing);
        held_switch = held;
        // Each node QEMU added is recorded for removal on failure, also
        // after the first refusal (a later disk's nodes may have gone in).
        let mut refused = None;
        for ((node, _), reply) in additions.into_iter().zip(replies) {
            match reply {
                Ok(_) => added.push(node),
                Err(e) => {
                    refused.get_or_insert(qmp_error(domain, e));
                }
            }
        }
        refused.map_or(synced, Err)
    }
    .await;
    let prepared = PreparedSnapshot { new_roots, added, switch, held_switch, created: made };
    match outcome {
        Ok(()) => Ok(prepared),
        Err(e) => {
            prepared.discard(client).await;
            Err(e)
        }
    }
}

impl PreparedSnapshot {
    /// Switches every prepared device to its overlay (and takes the
    /// internal snapshots) in one `transaction` (one action alone is its
    /// own command); returns each device's new root node. On failure the nodes are removed and the files made for
    /// it deleted.
    pub async fn switch(mut self, client: &QmpClient, domain: &str) -> Result<NewTops> {
        let (command, arguments) = self.switch.clone();
        let held = self.held_switch.take().filter(|h| h.on(client) && h.are(&[(&command, Some(arguments.clone()))]));
        let switched = match held {
            Some(held) => held.run().await.pop().unwrap_or(Err(QmpError::Disconnected)),
            None => client.execute(&command, Some(arguments)).await,
        };
        match switched {
            Ok(_) => Ok(self.new_roots),
            Err(e) => {
                let e = qmp_error(domain, e);
                self.discard(client).await;
                Err(e)
            }
        }
    }

    /// Removes the nodes added and deletes the files made for it.
    pub async fn discard(self, client: &QmpClient) {
        for node in self.added.iter().rev() {
            let _ = client.execute("blockdev-del", Some(json!({"node-name": node}))).await;
        }
        for f in &self.created {
            let _ = std::fs::remove_file(f);
        }
    }
}
