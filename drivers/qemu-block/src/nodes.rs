//! Node names and `-blockdev` JSON for a storage device's chain: one
//! format node over one protocol node per layer, with explicit `backing`
//! links, so that QEMU opens exactly the chain recorded in the XML and
//! never follows image headers on its own. The same graph serves a VM's
//! disk and a container's `<filesystem>` image.

use std::path::Path;

use serde_json::{json, Value};
use strata_core::chain::{Backing, StorageSource};
use strata_core::xml::StorageDevice;
use strata_core::{Error, Result};

/// The prefix of a storage device's node names, and its export id in a
/// storage daemon: the device's identifier (`vda`, `fs.` for `/`, `fs.data`
/// for `/data`), since node names hold only letters, digits, `-`, `.` and `_`.
pub use strata_core::xml::device_identifier as node_prefix;
/// The device name whose [`node_prefix`] is `prefix`.
pub use strata_core::xml::device_of_identifier as device_of_prefix;

/// The format node of a device's active layer as a start names it.
pub fn root_node(device: &str) -> String {
    node_name(device, 0, "fmt")
}

/// Node names are limited to 31 characters; targets are short (`vda`).
fn node_name(device: &str, layer: usize, kind: &str) -> String {
    format!("{}-{layer}-{kind}", node_prefix(device))
}

/// The format node of a transient disk's throwaway overlay, the device's
/// root; readers of the live chain look through it (see `graph`).
pub fn transient_node(target: &str) -> String {
    format!("{target}-transient-fmt")
}

/// For a protocol node given inline, inside its format node's options (a
/// layer's `PREFIX-N-file` and `TARGET-transient-file` from
/// [`device_nodes`], a live snapshot's `PREFIX-oN-file`): that format
/// node, with which QEMU removes it. Nodes added on their own (a copy's
/// `PREFIX-copy-file`, and a snapshot's `PREFIX-sN-file` in a QEMU a build
/// from before inline overlays served) have none and need a `blockdev-del`
/// of their own.
pub fn inline_parent(node: &str) -> Option<String> {
    let stem = node.strip_suffix("-file")?;
    let (_, last) = stem.rsplit_once('-')?;
    let number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let given_inline = last == "transient" || number(last) || last.strip_prefix('o').is_some_and(number);
    given_inline.then(|| format!("{stem}-fmt"))
}

/// Whether the guest (or a job) must not write the device's own image.
pub fn read_only(device: &StorageDevice) -> bool {
    device.readonly() || device.as_disk().is_some_and(|d| d.device == "cdrom" || d.transient)
}

/// A filesystem's target dir must map to node names one way and back.
fn check_nameable(device: &StorageDevice) -> Result<()> {
    let name = device.name();
    if device.as_filesystem().is_some()
        && !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '/' | '-' | '_'))
    {
        return Err(Error::config_unsupported(format!(
            "{device}: QEMU's block layer can serve a filesystem only at a target dir of letters, digits, '-', \
             '_' and '/'"
        )));
    }
    Ok(())
}

/// Appends `flag JSON` (`-blockdev` for a VM, `--blockdev` for a storage
/// daemon) for each of [`device_nodes`]; returns the root node, `None` for
/// a device without an image.
pub fn device_blockdevs(
    device: &StorageDevice,
    flag: &str,
    args: &mut Vec<String>,
    transient_overlay: Option<&Path>,
) -> Result<Option<String>> {
    let Some(nodes) = device_nodes(device, transient_overlay)? else { return Ok(None) };
    for node in &nodes.nodes {
        args.push(flag.to_string());
        args.push(node.to_string());
    }
    Ok(Some(nodes.root))
}

/// The format nodes (each with its protocol node inline) that open a
/// device's chain, in the order they must be added.
#[derive(Debug, Clone)]
pub struct DeviceNodes {
    /// `blockdev-add` arguments, backing layers first.
    pub nodes: Vec<Value>,
    /// The node a device or an export attaches to.
    pub root: String,
}

/// The nodes of each layer of `device`'s chain, backing layers first so
/// that every `backing` reference names an existing node, and for a
/// transient disk started with `transient_overlay` that overlay on top;
/// `None` for a device without an image.
pub fn device_nodes(device: &StorageDevice, transient_overlay: Option<&Path>) -> Result<Option<DeviceNodes>> {
    let Some(chain) = device.chain() else { return Ok(None) };
    let mut nodes = Vec::new();
    check_nameable(device)?;
    let name = device.name();
    // Storage this driver cannot open is refused before anything else.
    let mut protocols = chain
        .layers
        .iter()
        .enumerate()
        .map(|(id, layer)| protocol_node(&layer.source, &node_name(name, id, "file"), device))
        .collect::<Result<Vec<_>>>()?;
    if !chain.is_complete() {
        return Err(Error::operation_invalid(format!(
            "{device} has no complete backing chain recorded; run dumpxml --refresh-chain or domblkcheck"
        )));
    }
    for id in (0..chain.layers.len()).rev() {
        let layer = &chain.layers[id];
        let readonly = id > 0 || read_only(device);
        let protocol = std::mem::take(&mut protocols[id]);
        let format = layer.format.as_deref().unwrap_or("raw");
        let mut fmt = json!({
            "driver": format,
            "node-name": node_name(name, id, "fmt"),
            "file": protocol,
            "read-only": readonly,
        });
        if let Some(slice) = layer.slice {
            // QEMU's raw driver opens the slice itself; no other format does.
            if format != "raw" {
                return Err(Error::config_unsupported(format!(
                    "{device}: layer {} ({}) is a {format} image in a slice of its storage, which this driver \
                     opens only for raw images",
                    layer.index, layer.source
                )));
            }
            fmt["offset"] = json!(slice.offset);
            if let Some(size) = slice.size {
                fmt["size"] = json!(size);
            }
        }
        if format != "raw" {
            fmt["backing"] = match &layer.backing {
                Backing::Layers(v) => {
                    v.first().map(|c| Value::String(node_name(name, *c, "fmt"))).unwrap_or(Value::Null)
                }
                _ => Value::Null,
            };
        }
        nodes.push(fmt);
    }
    let image_root = node_name(name, 0, "fmt");
    let Some(overlay) = transient_overlay else { return Ok(Some(DeviceNodes { nodes, root: image_root })) };
    let root = transient_node(name);
    let overlay = json!({
        "driver": "qcow2",
        "node-name": root,
        "file": protocol_node(&StorageSource::local(overlay.to_path_buf()), &format!("{name}-transient-file"), device)?,
        "backing": image_root,
        "read-only": false,
    });
    nodes.push(overlay);
    Ok(Some(DeviceNodes { nodes, root }))
}

fn protocol_node(source: &StorageSource, node: &str, device: &StorageDevice) -> Result<Value> {
    Ok(match source {
        StorageSource::File { path } => json!({
            "driver": "file", "node-name": node, "filename": path_str(path)?,
            "auto-read-only": true, "discard": "unmap",
        }),
        StorageSource::Block { dev } => json!({
            "driver": "host_device", "node-name": node, "filename": path_str(dev)?,
            "auto-read-only": true, "discard": "unmap",
        }),
        StorageSource::Network(n) if n.protocol == "nbd" => {
            let host = n.hosts.first().cloned().unwrap_or_default();
            let server = match (&host.transport, &host.socket) {
                (Some(t), Some(sock)) if t == "unix" => json!({"type": "unix", "path": sock}),
                _ => json!({
                    "type": "inet",
                    "host": host.name.clone().unwrap_or_else(|| "localhost".into()),
                    "port": host.port.unwrap_or(10809).to_string(),
                }),
            };
            let mut v = json!({"driver": "nbd", "node-name": node, "server": server});
            if let Some(export) = &n.name {
                v["export"] = Value::String(export.clone());
            }
            v
        }
        StorageSource::Network(n) => {
            return Err(Error::config_unsupported(format!(
                "{device}: network storage '{n}' uses protocol '{}', which the QEMU driver cannot start \
                 (it starts nbd)",
                n.protocol
            )))
        }
        other => {
            return Err(Error::config_unsupported(format!(
                "{device}: storage '{other}' of type '{}' cannot be started by the QEMU driver \
                 (it starts file, block and nbd network storage)",
                other.type_name()
            )))
        }
    })
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().ok_or_else(|| Error::invalid_arg(format!("path '{}' is not valid UTF-8", p.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_core::xml::Domain;

    /// A disk and a filesystem, each on the same 3-deep qcow2 chain.
    const THREE_DEEP: &str = "<domain><name>t</name><devices>\
        <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/i/top.qcow2'/>\
        <backingStore type='file'><format type='qcow2'/><source file='/i/mid.qcow2'/>\
        <backingStore type='file'><format type='qcow2'/><source file='/i/base.qcow2'/><backingStore/>\
        </backingStore></backingStore><target dev='vdb' bus='virtio'/></disk>\
        <filesystem type='file'><driver type='loop' format='qcow2'/><source file='/i/top.qcow2'/>\
        <backingStore type='file'><format type='qcow2'/><source file='/i/mid.qcow2'/>\
        <backingStore type='file'><format type='qcow2'/><source file='/i/base.qcow2'/><backingStore/>\
        </backingStore></backingStore><target dir='/'/></filesystem>\
        </devices></domain>";

    fn device(spec: &str) -> StorageDevice {
        Domain::parse(THREE_DEEP).expect("xml").find_storage_device(spec).expect("device")
    }

    fn blockdevs(device: &StorageDevice) -> (Option<String>, Vec<Value>) {
        let mut args = Vec::new();
        let root = device_blockdevs(device, "--blockdev", &mut args, None).expect("blockdevs");
        assert!(args.iter().step_by(2).all(|a| a == "--blockdev"), "{args:?}");
        (root, args.iter().skip(1).step_by(2).map(|j| serde_json::from_str(j).expect("json")).collect())
    }

    #[test]
    fn only_the_protocol_nodes_given_inline_have_an_inline_parent() {
        assert_eq!(inline_parent("vda-2-file").as_deref(), Some("vda-2-fmt"));
        assert_eq!(inline_parent("fs.data-0-file").as_deref(), Some("fs.data-0-fmt"));
        assert_eq!(inline_parent("vda-transient-file").as_deref(), Some("vda-transient-fmt"));
        assert_eq!(inline_parent("vda-o3-file").as_deref(), Some("vda-o3-fmt"));
        for own in ["vda-s3-file", "vda-copy-file1", "vda-s3-fmt", "vda-2-fmt", "file", "-file", "vda-o-file"] {
            assert_eq!(inline_parent(own), None, "{own}");
        }
        // What device_nodes gives inline is what inline_parent names.
        let (_, nodes) = blockdevs(&device("vdb"));
        for fmt in &nodes {
            let file = fmt["file"]["node-name"].as_str().expect("an inline protocol node");
            assert_eq!(inline_parent(file).as_deref(), fmt["node-name"].as_str());
        }
    }

    #[test]
    fn a_three_deep_chain_is_three_node_pairs_linked_base_first() {
        for (spec, prefix) in [("vdb", "vdb"), ("/", "fs.")] {
            let (root, nodes) = blockdevs(&device(spec));
            assert_eq!(root.as_deref(), Some(format!("{prefix}-0-fmt").as_str()));
            let expected = [
                (format!("{prefix}-2-fmt"), "/i/base.qcow2", Value::Null, true),
                (format!("{prefix}-1-fmt"), "/i/mid.qcow2", json!(format!("{prefix}-2-fmt")), true),
                (format!("{prefix}-0-fmt"), "/i/top.qcow2", json!(format!("{prefix}-1-fmt")), false),
            ];
            assert_eq!(nodes.len(), expected.len(), "{nodes:?}");
            for (node, (name, file, backing, read_only)) in nodes.iter().zip(expected) {
                assert_eq!(node["driver"], "qcow2");
                assert_eq!(node["node-name"], json!(name));
                assert_eq!(node["backing"], backing, "{node}");
                assert_eq!(node["read-only"], read_only, "{node}");
                assert_eq!(node["file"]["driver"], "file");
                assert_eq!(node["file"]["filename"], file);
                assert_eq!(node["file"]["node-name"], json!(name.replace("-fmt", "-file")));
            }
        }
    }

    #[test]
    fn a_read_only_filesystem_opens_every_layer_read_only() {
        let dom = Domain::parse(&THREE_DEEP.replace("<target dir='/'/>", "<target dir='/'/><readonly/>")).expect("xml");
        let (_, nodes) = blockdevs(&dom.find_storage_device("/").expect("device"));
        assert!(nodes.iter().all(|n| n["read-only"] == true), "{nodes:?}");
    }

    #[test]
    fn a_filesystem_prefix_maps_back_to_its_target_dir() {
        for dir in ["/", "/data", "/srv/www"] {
            assert_eq!(device_of_prefix(&node_prefix(dir)), dir);
        }
        assert_eq!(node_prefix("/srv/www"), "fs.srv.www");
        assert_eq!(device_of_prefix("vda"), "vda");
        let dotted = Domain::parse(&THREE_DEEP.replace("<target dir='/'/>", "<target dir='/a.b'/>")).expect("xml");
        let err =
            device_blockdevs(&dotted.find_storage_device("/a.b").expect("device"), "--blockdev", &mut Vec::new(), None)
                .expect_err("a dot would map back to a slash");
        assert!(err.to_string().contains("filesystem '/a.b': QEMU's block layer can serve"), "{err}");
    }
}
