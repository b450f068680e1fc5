//! `<volume>`: one image and its backing chain, as `vol-dumpxml` shows it.
//!
//! libvirt's schema allows one `<backingStore>` level; Strata nests one per
//! layer (listed in docs/xml.md as an extension) so the whole chain shows.

use super::tree::Element;
use crate::chain::{Backing, Chain};
use crate::error::{Error, Result};

/// Formats the volume for the top layer of `chain` with `capacity` bytes.
pub fn volume_element(name: &str, chain: &Chain, capacity: u64) -> Result<Element> {
    let top = chain.top().ok_or_else(|| Error::invalid_arg("an empty chain has no volume"))?;
    let path =
        top.source.local_path().ok_or_else(|| Error::invalid_arg(format!("volume '{name}' is not a local file")))?;
    let mut vol = Element::new("volume")
        .with_attr("type", top.source.type_name())
        .with_child(Element::new("name").with_text(name))
        .with_child(Element::new("key").with_text(path.to_string_lossy()))
        .with_child(Element::new("capacity").with_attr("unit", "bytes").with_text(capacity.to_string()));
    let mut target = Element::new("target").with_child(Element::new("path").with_text(path.to_string_lossy()));
    if let Some(f) = &top.format {
        target = target.with_child(Element::new("format").with_attr("type", f.clone()));
    }
    vol = vol.with_child(target);
    // Build the nested stores bottom-up along the main line.
    let line = chain.main_line();
    let mut below: Option<Element> = None;
    for layer in line.iter().skip(1).rev() {
        let Some(p) = layer.source.local_path() else { continue };
        let mut store = Element::new("backingStore").with_child(Element::new("path").with_text(p.to_string_lossy()));
        if let Some(f) = &layer.format {
            store = store.with_child(Element::new("format").with_attr("type", f.clone()));
        }
        if let Some(b) = below.take() {
            store = store.with_child(b);
        }
        below = Some(store);
    }
    if let Some(b) = below {
        vol = vol.with_child(b);
    }
    Ok(vol)
}

/// Reads a `<volume>` back into a chain of local files.
pub fn chain_from_volume(vol: &Element) -> Result<Chain> {
    if vol.name != "volume" {
        return Err(Error::xml(format!("expected a <volume> document, found <{}>", vol.name)));
    }
    let target = vol.child("target").ok_or_else(|| Error::xml("the volume has no <target>"))?;
    let path = target.child_text("path").ok_or_else(|| Error::xml("the volume <target> has no <path>"))?;
    let fmt = |el: &Element| el.child("format").and_then(|f| f.attr("type")).map(str::to_string);
    let mut chain = Chain::single(crate::chain::StorageSource::local(path.into()), fmt(target));
    let mut cursor = vol;
    let mut parent = 0;
    while let Some(store) = cursor.child("backingStore") {
        let Some(p) = store.child_text("path") else { break };
        parent = chain.push_backing(parent, crate::chain::StorageSource::local(p.into()), fmt(store));
        cursor = store;
    }
    if chain.layers[parent].backing == Backing::Unknown {
        chain.end_at(parent);
    }
    Ok(chain)
}
