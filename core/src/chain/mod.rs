//! The backing-chain model: what a disk's layers are, independent of XML.
//!
//! A chain is stored flat (an arena of layers, the active layer first) so
//! that 10,000-layer chains cost linear time and no recursion. Layers form a
//! tree: most formats have one backing file, but a quorum or a multi-parent
//! format has several siblings.

mod probe;
mod source;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use probe::{probe_chain, probe_chain_to_missing, MissingBacking};
pub use source::{
    parse_backing_string, BackingImage, NetworkHost, NetworkSource, NvmeSource, PciAddress, Slice, StorageSource,
};

/// What lies below a layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "layers")]
pub enum Backing {
    /// Not known (never probed, or a network image Strata cannot open).
    Unknown,
    /// Known to have no backing image (`<backingStore/>`).
    End,
    /// Indices into [`Chain::layers`] of the images this one is backed by.
    Layers(Vec<usize>),
}

/// One image in a chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Layer {
    pub source: StorageSource,
    /// Image format (`qcow2`, `raw`, …) when known.
    pub format: Option<String>,
    /// Position for `vda[N]` addressing: 0 for the active layer, then
    /// pre-order, which for an ordinary chain is the depth below the top.
    pub index: usize,
    pub backing: Backing,
    /// The byte range of the storage the image occupies, when not all of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slice: Option<Slice>,
}

/// A disk's backing tree; `layers[0]` is the active layer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Chain {
    pub layers: Vec<Layer>,
}

impl Chain {
    /// A chain of one layer whose backing is not known yet.
    pub fn single(source: StorageSource, format: Option<String>) -> Chain {
        Chain { layers: vec![Layer { source, format, index: 0, backing: Backing::Unknown, slice: None }] }
    }

    pub fn top(&self) -> Option<&Layer> {
        self.layers.first()
    }

    /// Appends a layer as the (only or additional) backing of `parent`.
    pub fn push_backing(&mut self, parent: usize, source: StorageSource, format: Option<String>) -> usize {
        let id = self.layers.len();
        self.layers.push(Layer { source, format, index: id, backing: Backing::Unknown, slice: None });
        if let Some(p) = self.layers.get_mut(parent) {
            match &mut p.backing {
                Backing::Layers(v) => v.push(id),
                other => *other = Backing::Layers(vec![id]),
            }
        }
        id
    }

    /// This chain with a new active layer on top (an external snapshot's
    /// overlay): the old active layer becomes its backing image.
    pub fn with_overlay(&self, source: StorageSource, format: Option<String>) -> Chain {
        let mut layers = Vec::with_capacity(self.layers.len() + 1);
        layers.push(Layer { source, format, index: 0, backing: Backing::Layers(vec![1]), slice: None });
        for l in &self.layers {
            let backing = match &l.backing {
                Backing::Layers(v) => Backing::Layers(v.iter().map(|i| i + 1).collect()),
                other => other.clone(),
            };
            layers.push(Layer { backing, ..l.clone() });
        }
        let mut chain = Chain { layers };
        chain.renumber();
        chain
    }

    /// Marks a layer as having no backing image.
    pub fn end_at(&mut self, layer: usize) {
        if let Some(l) = self.layers.get_mut(layer) {
            l.backing = Backing::End;
        }
    }

    /// The first-backing path from the top down: the ordinary linear chain.
    pub fn main_line(&self) -> Vec<&Layer> {
        let mut out = Vec::new();
        let mut cur = 0;
        while let Some(layer) = self.layers.get(cur) {
            out.push(layer);
            match &layer.backing {
                Backing::Layers(v) if !v.is_empty() => cur = v[0],
                _ => break,
            }
        }
        out
    }

    /// Whether the chain is known all the way down.
    pub fn is_complete(&self) -> bool {
        self.layers.iter().all(|l| l.backing != Backing::Unknown)
    }

    /// Re-numbers `index` in pre-order (the active layer is 0).
    pub fn renumber(&mut self) {
        let mut order = Vec::with_capacity(self.layers.len());
        let mut stack = vec![0usize];
        while let Some(id) = stack.pop() {
            if id >= self.layers.len() {
                continue;
            }
            order.push(id);
            if let Backing::Layers(v) = &self.layers[id].backing {
                stack.extend(v.iter().rev());
            }
        }
        for (n, id) in order.into_iter().enumerate() {
            self.layers[id].index = n;
        }
    }

    /// The layer addressed as `disk[index]`.
    pub fn by_index(&self, index: usize) -> Option<&Layer> {
        self.layers.iter().find(|l| l.index == index)
    }

    /// The layer whose file or device is `path`.
    pub fn by_path(&self, path: &Path) -> Option<&Layer> {
        self.layers.iter().find(|l| l.source.local_path() == Some(path))
    }

    /// Children of a layer (its backing images).
    pub fn backing_of(&self, layer: usize) -> &[usize] {
        match self.layers.get(layer).map(|l| &l.backing) {
            Some(Backing::Layers(v)) => v,
            _ => &[],
        }
    }

    /// Pre-order walk with depth: `(layer id, depth)`; iterative.
    pub fn walk(&self) -> Vec<(usize, usize)> {
        let mut out = Vec::with_capacity(self.layers.len());
        let mut stack = vec![(0usize, 0usize)];
        while let Some((id, depth)) = stack.pop() {
            if id >= self.layers.len() {
                continue;
            }
            out.push((id, depth));
            for child in self.backing_of(id).iter().rev() {
                stack.push((*child, depth + 1));
            }
        }
        out
    }

    /// Differences between a recorded chain (`self`) and what is on disk
    /// (`actual`), one sentence each, along the main line.
    pub fn differences(&self, actual: &Chain) -> Vec<ChainDifference> {
        let recorded = self.main_line();
        let found = actual.main_line();
        let mut out = Vec::new();
        for (depth, pair) in recorded.iter().zip(found.iter()).enumerate() {
            let (r, a) = pair;
            if r.source != a.source {
                out.push(ChainDifference {
                    index: depth,
                    what: format!("layer {depth} is recorded as {} but the image chain has {}", r.source, a.source),
                });
            } else if r.format.is_some() && a.format.is_some() && r.format != a.format {
                out.push(ChainDifference {
                    index: depth,
                    what: format!(
                        "layer {depth} ({}) is recorded as {} but is {}",
                        r.source,
                        r.format.as_deref().unwrap_or("?"),
                        a.format.as_deref().unwrap_or("?")
                    ),
                });
            }
        }
        let (rl, al) = (recorded.len(), found.len());
        let recorded_known = recorded.last().is_some_and(|l| l.backing != Backing::Unknown);
        if rl > al {
            for (depth, layer) in recorded.iter().enumerate().skip(al) {
                out.push(ChainDifference {
                    index: depth,
                    what: format!("layer {depth} ({}) is recorded but is no longer in the image chain", layer.source),
                });
            }
        } else if al > rl && recorded_known {
            for (depth, layer) in found.iter().enumerate().skip(rl) {
                out.push(ChainDifference {
                    index: depth,
                    what: format!("the image chain has layer {depth} ({}) that is not recorded", layer.source),
                });
            }
        }
        out
    }
}

/// One mismatch between a recorded chain and the images.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainDifference {
    pub index: usize,
    pub what: String,
}

/// Removes `.` components lexically. `..` is kept: resolving it without
/// the file system would be wrong where symlinks are involved, and QEMU
/// does not resolve it either.
pub fn clean_path(path: &Path) -> PathBuf {
    path.components().filter(|c| !matches!(c, std::path::Component::CurDir)).collect()
}
