//! `qemu-storage-daemon`: its binary, the command line that serves storage
//! devices' chains with the same node graph a VM's start builds. The
//! daemon is started through `strata_engine::process::spawn`, recorded
//! before it opens an image.

use strata_core::xml::StorageDevice;
use strata_core::Result;

use crate::nodes::{device_blockdevs, node_prefix, read_only};
use crate::runtime::{RuntimePaths, MONITORS};

/// `$STRATA_QEMU_STORAGE_DAEMON` or `qemu-storage-daemon` on `PATH`.
pub fn storage_daemon_binary() -> String {
    std::env::var("STRATA_QEMU_STORAGE_DAEMON").unwrap_or_else(|_| "qemu-storage-daemon".to_string())
}

/// `qemu-storage-daemon`'s arguments for `devices`: the node graph of each
/// one's chain, each root exported over NBD (so the daemon keeps a parent
/// for it that follows a pivot, as a guest device does) under the
/// device's [`node_prefix`], and [`MONITORS`] monitors in `paths`. A
/// read-only device (a transient disk too: no job writes it) is opened
/// and exported read-only.
pub fn storage_daemon_command_line(devices: &[StorageDevice], paths: &RuntimePaths) -> Result<Vec<String>> {
    let mut args = Vec::new();
    let mut exports = Vec::new();
    for device in devices {
        if let Some(root) = device_blockdevs(device, "--blockdev", &mut args, None)? {
            let writable = if read_only(device) { "off" } else { "on" };
            exports.push(format!("type=nbd,id={},node-name={root},writable={writable}", node_prefix(device.name())));
        }
    }
    args.push("--nbd-server".into());
    args.push(format!("addr.type=unix,addr.path={}", paths.dir.join("nbd.sock").display()));
    for e in exports {
        args.push("--export".into());
        args.push(e);
    }
    args.extend(monitor_args(paths));
    Ok(args)
}

/// `--chardev` and `--monitor` for each of the daemon's [`MONITORS`].
pub(crate) fn monitor_args(paths: &RuntimePaths) -> Vec<String> {
    let mut args = Vec::new();
    for n in 0..MONITORS {
        args.push("--chardev".into());
        args.push(format!("socket,id=qmp{n},path={},server=on,wait=off", paths.monitor_socket(n).display()));
        args.push("--monitor".into());
        args.push(format!("chardev=qmp{n}"));
    }
    args
}
