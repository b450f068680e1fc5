//! What QEMU has open, read from its block graph: the chain of each
//! device (a VM's disk, a storage daemon's export) as a core `Chain` with
//! the format node of each layer.

use std::collections::HashMap;
use std::path::PathBuf;

use strata_core::chain::{Chain, StorageSource};
use strata_core::{Error, Result};
use strata_qmp::QmpClient;

use crate::monitor::qmp_error;
use crate::nodes::{device_of_prefix, transient_node};

/// A disk as QEMU has it open: its chain and the format node of each layer
/// (same order as `chain.layers`).
#[derive(Debug, Clone)]
pub struct LiveDisk {
    pub chain: Chain,
    pub nodes: Vec<String>,
}

impl LiveDisk {
    pub fn root(&self) -> Option<&str> {
        self.nodes.first().map(String::as_str)
    }
}

/// The chain QEMU has open for each disk target, read from its block
/// graph: the device's root node, then `backing` edges down, each format
/// node's driver and its protocol child's file name. A transient disk's
/// throwaway overlay is looked through: the disk's chain is its image's.
///
/// Devices are found as the graph's block backends, not by `query-block`,
/// whose reply nests each layer's image in the one above it: a chain
/// 1,000 deep nests deeper than a JSON reader should follow.
pub async fn live_chains(client: &QmpClient, domain: &str) -> Result<HashMap<String, LiveDisk>> {
    let graph = BlockGraph::query(client, domain).await?;
    let devices = graph.device_roots();
    let mut out = HashMap::new();
    for (qdev, root) in &devices {
        let Some(target) = qdev.strip_prefix("/machine/peripheral/").and_then(|r| r.split('/').next()) else {
            continue;
        };
        let mut root = root.clone();
        if root == transient_node(target) {
            root = graph
                .child(&root, "backing")
                .ok_or_else(|| Error::internal(format!("transient disk '{target}' has no image below its overlay")))?;
        }
        out.insert(target.to_string(), graph.chain_from(&root, target)?);
    }
    // A storage daemon has no devices; each device is an export named
    // after its node prefix, whose node follows a pivot as a device's would.
    if devices.is_empty() {
        let exports = client.execute("query-block-exports", None).await.map_err(|e| qmp_error(domain, e))?;
        for e in exports.as_array().into_iter().flatten() {
            let (Some(id), Some(node)) =
                (e.get("id").and_then(|v| v.as_str()), e.get("node-name").and_then(|v| v.as_str()))
            else {
                continue;
            };
            let device = device_of_prefix(id);
            out.insert(device.clone(), graph.chain_from(node, &device)?);
        }
    }
    Ok(out)
}

/// QEMU's block graph: nodes by name, and named edges between them.
pub struct BlockGraph {
    nodes: HashMap<String, strata_qmp::types::NamedBlockNode>,
    names: HashMap<u64, String>,
    ids: HashMap<String, u64>,
    edges: Vec<(u64, u64, String)>,
    /// Each parent's child by edge name (the first such edge), so that a
    /// walk down a chain is linear in its depth.
    children: HashMap<(u64, String), u64>,
    /// Block backends: (the device QEMU names for each, as `query-block`'s
    /// `qdev`; its id).
    backends: Vec<(String, u64)>,
}

impl BlockGraph {
    pub async fn query(client: &QmpClient, domain: &str) -> Result<BlockGraph> {
        let nodes = client.query_named_block_nodes().await.map_err(|e| qmp_error(domain, e))?;
        let graph = client.execute("x-debug-query-block-graph", None).await.map_err(|e| qmp_error(domain, e))?;
        let mut g = BlockGraph::parse(&graph)?;
        g.nodes = nodes.into_iter().map(|n| (n.node_name.clone(), n)).collect();
        Ok(g)
    }

    /// Node names that exist.
    pub fn node_names(&self) -> impl Iterator<Item = &str> {
        self.nodes.keys().map(String::as_str)
    }

    /// Nodes with a parent of any kind (a device, a job, another node).
    pub fn has_parent(&self, node: &str) -> bool {
        self.ids.get(node).is_some_and(|id| self.edges.iter().any(|(_, c, _)| c == id))
    }

    /// The chain below format node `root`.
    pub fn chain_from(&self, root: &str, target: &str) -> Result<LiveDisk> {
        let mut chain: Option<Chain> = None;
        let mut nodes = Vec::new();
        let mut parent: Option<usize> = None;
        let mut current = Some(root.to_string());
        while let Some(node_name) = current.take() {
            if nodes.len() > self.nodes.len() {
                return Err(Error::internal(format!("QEMU's block graph for '{target}' loops")));
            }
            let node = self
                .nodes
                .get(&node_name)
                .ok_or_else(|| Error::internal(format!("QEMU node '{node_name}' is not in query-named-block-nodes")))?;
            let file_node = self.child(&node_name, "file").and_then(|f| self.nodes.get(&f));
            let filename = file_node.map(|f| f.file.clone()).unwrap_or_else(|| node.file.clone());
            let source = match file_node.map(|f| f.drv.as_str()) {
                Some("host_device") => StorageSource::Block { dev: PathBuf::from(&filename) },
                _ => StorageSource::File { path: PathBuf::from(&filename) },
            };
            let format = Some(node.drv.clone());
            let id = match (&mut chain, parent) {
                (None, _) => {
                    chain = Some(Chain::single(source, format));
                    0
                }
                (Some(c), Some(p)) => c.push_backing(p, source, format),
                (Some(_), None) => return Err(Error::internal("QEMU block graph walk lost its place")),
            };
            nodes.push(node_name.clone());
            parent = Some(id);
            current = self.child(&node_name, "backing");
            if current.is_none() {
                if let Some(c) = &mut chain {
                    c.end_at(id);
                }
            }
        }
        let mut chain = chain.ok_or_else(|| Error::internal(format!("no QEMU node for disk '{target}'")))?;
        chain.renumber();
        Ok(LiveDisk { chain, nodes })
    }

    fn parse(v: &serde_json::Value) -> Result<BlockGraph> {
        let bad = || Error::internal("x-debug-query-block-graph returned an unexpected shape");
        let mut names = HashMap::new();
        let mut ids = HashMap::new();
        let mut backends = Vec::new();
        for n in v.get("nodes").and_then(|n| n.as_array()).ok_or_else(bad)? {
            let id = n.get("id").and_then(|i| i.as_u64()).ok_or_else(bad)?;
            let name = n.get("name").and_then(|i| i.as_str()).unwrap_or("").to_string();
            match n.get("type").and_then(|t| t.as_str()) {
                Some("block-driver") => {
                    ids.insert(name.clone(), id);
                }
                Some("block-backend") if !name.is_empty() => backends.push((name.clone(), id)),
                _ => {}
            }
            names.insert(id, name);
        }
        let mut edges = Vec::new();
        let mut children = HashMap::new();
        for e in v.get("edges").and_then(|n| n.as_array()).ok_or_else(bad)? {
            let parent = e.get("parent").and_then(|i| i.as_u64()).ok_or_else(bad)?;
            let child = e.get("child").and_then(|i| i.as_u64()).ok_or_else(bad)?;
            let name = e.get("name").and_then(|i| i.as_str()).unwrap_or("").to_string();
            children.entry((parent, name.clone())).or_insert(child);
            edges.push((parent, child, name));
        }
        Ok(BlockGraph { nodes: HashMap::new(), names, ids, edges, children, backends })
    }

    /// The node name of `node`'s child on edge `edge` (`file`, `backing`).
    pub fn child(&self, node: &str, edge: &str) -> Option<String> {
        let id = self.ids.get(node)?;
        self.children.get(&(*id, edge.to_string())).and_then(|c| self.names.get(c).cloned())
    }

    /// Each block backend attached to a device: (the device, as
    /// `query-block` names it; the node on its `root` edge). A filter QEMU
    /// put there itself (a running mirror's or commit's, which only QEMU
    /// names: `#blockN`, while Strata names every node it adds) is looked
    /// through to the node below it, as `query-block` does.
    fn device_roots(&self) -> Vec<(String, String)> {
        let below = |node: u64| {
            self.children.get(&(node, "backing".to_string())).or_else(|| self.children.get(&(node, "file".to_string())))
        };
        self.backends
            .iter()
            .filter_map(|(device, id)| {
                let mut root = *self.children.get(&(*id, "root".to_string()))?;
                for _ in 0..self.names.len() {
                    match self.names.get(&root) {
                        Some(name) if name.starts_with('#') => root = *below(root)?,
                        _ => break,
                    }
                }
                Some((device.clone(), self.names.get(&root)?.clone()))
            })
            .collect()
    }
}
