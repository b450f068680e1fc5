//! What QEMU has open, read from its block graph: the chain of each
//! device (a VM's disk, a storage daemon's export) as a core `Chain` with
//! the format node of each layer.

use std::collections::HashMap;
use std::path::PathBuf;

use serde_json::Value;
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
    chains_in(&graph, client, domain).await
}

/// [`live_chains`] read from a graph already queried.
pub async fn chains_in(graph: &BlockGraph, client: &QmpClient, domain: &str) -> Result<HashMap<String, LiveDisk>> {
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

/// QEMU's block graph: nodes by name, and the named edges between them.
pub struct BlockGraph {
    nodes: HashMap<String, strata_qmp::types::NamedBlockNode>,
    names: HashMap<u64, String>,
    ids: HashMap<String, u64>,
    /// Each parent's child by edge name (the first such edge), so that a
    /// walk down a chain is linear in its depth.
    children: HashMap<(u64, String), u64>,
    /// How many edges (from a device, a job or another node) lead to each
    /// node that has a parent.
    parents: HashMap<u64, usize>,
    /// Every edge's child, by parent.
    edges_from: HashMap<u64, Vec<u64>>,
    /// Block backends: (the device QEMU names for each, as `query-block`'s
    /// `qdev`; its id).
    backends: Vec<(String, u64)>,
}

impl BlockGraph {
    pub async fn query(client: &QmpClient, domain: &str) -> Result<BlockGraph> {
        // Both queries in flight at once: one round trip instead of two.
        let (nodes, graph) =
            tokio::join!(client.query_named_block_nodes(), client.execute("x-debug-query-block-graph", None));
        let nodes = nodes.map_err(|e| qmp_error(domain, e))?;
        let graph = graph.map_err(|e| qmp_error(domain, e))?;
        BlockGraph::from_parts(nodes, &graph)
    }

    /// The graph from the replies to `query-named-block-nodes` (flat) and
    /// `x-debug-query-block-graph`, sent by the caller.
    pub fn from_replies(nodes: Value, graph: &Value) -> Result<BlockGraph> {
        let nodes = serde_json::from_value(nodes)
            .map_err(|e| Error::internal(format!("unexpected query-named-block-nodes reply: {e}")))?;
        BlockGraph::from_parts(nodes, graph)
    }

    fn from_parts(nodes: Vec<strata_qmp::types::NamedBlockNode>, graph: &Value) -> Result<BlockGraph> {
        let mut g = BlockGraph::parse(graph)?;
        g.nodes = nodes.into_iter().map(|n| (n.node_name.clone(), n)).collect();
        Ok(g)
    }

    /// Node names that exist.
    pub fn node_names(&self) -> impl Iterator<Item = &str> {
        self.nodes.keys().map(String::as_str)
    }

    /// The nodes named `PREFIX…` that nothing uses, and then those that
    /// only they use, in an order QEMU can remove them in (each before the
    /// nodes it uses): what one look at the graph tells about a dropped
    /// chain, where removing one layer at a time took a query per layer.
    pub fn unused_nodes(&self, prefix: &str) -> Vec<String> {
        let named = |id: &u64| self.names.get(id).filter(|n| n.starts_with(prefix) && self.ids.contains_key(*n));
        let mut parents = self.parents.clone();
        let mut ready: Vec<&String> = self
            .ids
            .iter()
            .filter(|(n, id)| n.starts_with(prefix) && !parents.contains_key(id))
            .map(|(n, _)| n)
            .collect();
        // Largest name last, popped first: a stable order from one graph.
        ready.sort_unstable();
        let mut order = Vec::new();
        while let Some(name) = ready.pop() {
            order.push(name.clone());
            let Some(id) = self.ids.get(name) else { continue };
            for child in self.edges_from.get(id).into_iter().flatten() {
                let Some(count) = parents.get_mut(child) else { continue };
                *count -= 1;
                if *count == 0 {
                    parents.remove(child);
                    ready.extend(named(child));
                }
            }
        }
        order
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
        let mut parents: HashMap<u64, usize> = HashMap::new();
        let mut edges_from: HashMap<u64, Vec<u64>> = HashMap::new();
        let mut children = HashMap::new();
        for e in v.get("edges").and_then(|n| n.as_array()).ok_or_else(bad)? {
            let parent = e.get("parent").and_then(|i| i.as_u64()).ok_or_else(bad)?;
            let child = e.get("child").and_then(|i| i.as_u64()).ok_or_else(bad)?;
            let name = e.get("name").and_then(|i| i.as_str()).unwrap_or("").to_string();
            children.entry((parent, name)).or_insert(child);
            *parents.entry(child).or_default() += 1;
            edges_from.entry(parent).or_default().push(child);
        }
        Ok(BlockGraph { nodes: HashMap::new(), names, ids, children, parents, edges_from, backends })
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

#[cfg(test)]
mod tests {
    use super::BlockGraph;

    /// Device `vda` on `vda-s2-fmt`, backed by `vda-base-fmt`; a dropped
    /// chain `vda-s1-fmt` → `vda-s0-fmt` → `vda-base-fmt` (still used by
    /// the active layer); an unused node of another disk.
    fn graph() -> BlockGraph {
        let node = |id: u64, kind: &str, name: &str| serde_json::json!({"id": id, "type": kind, "name": name});
        let edge =
            |parent: u64, child: u64, name: &str| serde_json::json!({"parent": parent, "child": child, "name": name});
        let v = serde_json::json!({
            "nodes": [
                node(1, "block-backend", "vda"),
                node(2, "block-driver", "vda-s2-fmt"), node(3, "block-driver", "vda-s2-file"),
                node(4, "block-driver", "vda-base-fmt"), node(5, "block-driver", "vda-base-file"),
                node(6, "block-driver", "vda-s1-fmt"), node(7, "block-driver", "vda-s1-file"),
                node(8, "block-driver", "vda-s0-fmt"), node(9, "block-driver", "vda-s0-file"),
                node(10, "block-driver", "vdb-s1-fmt"),
            ],
            "edges": [
                edge(1, 2, "root"), edge(2, 3, "file"), edge(2, 4, "backing"), edge(4, 5, "file"),
                edge(6, 7, "file"), edge(6, 8, "backing"), edge(8, 9, "file"), edge(8, 4, "backing"),
            ],
        });
        BlockGraph::parse(&v).expect("graph")
    }

    #[test]
    fn unused_nodes_come_each_before_the_nodes_it_uses_and_spare_the_used() {
        let order = graph().unused_nodes("vda-");
        let at = |n: &str| order.iter().position(|o| o == n).unwrap_or_else(|| panic!("{n} missing from {order:?}"));
        assert_eq!(order.len(), 4, "{order:?}");
        assert!(at("vda-s1-fmt") < at("vda-s1-file") && at("vda-s1-fmt") < at("vda-s0-fmt"), "{order:?}");
        assert!(at("vda-s0-fmt") < at("vda-s0-file"), "{order:?}");
        assert!(graph().unused_nodes("vdc-").is_empty());
        assert_eq!(graph().unused_nodes("vdb-"), ["vdb-s1-fmt"]);
    }
}
