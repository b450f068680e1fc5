//! `<domainsnapshot>`: the typed fields Strata acts on, with the embedded
//! `<domain>`, `<inactiveDomain>`, `<cookie>` and anything unknown kept whole.

use serde::Serialize;

use super::disk::{parse_source, source_element};
use super::tree::{Element, Node};
use crate::chain::StorageSource;
use crate::error::{Error, Result};

const SNAPSHOT_CHILD_ORDER: &[&str] = &[
    "name",
    "description",
    "state",
    "parent",
    "creationTime",
    "memory",
    "disks",
    "active",
    "domain",
    "inactiveDomain",
    "cookie",
];

/// `<memory snapshot=… file=…/>`
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotMemory {
    /// `no`, `internal` or `external`.
    pub snapshot: String,
    pub file: Option<String>,
}

/// One `<disks><disk …/>` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotDisk {
    pub name: String,
    /// `no`, `internal`, `external` or `manual`.
    pub snapshot: Option<String>,
    pub driver_type: Option<String>,
    pub source: Option<StorageSource>,
}

/// A snapshot definition, as given to `snapshot-create` or stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotDef {
    pub name: Option<String>,
    pub description: Option<String>,
    pub state: Option<String>,
    pub creation_time: Option<i64>,
    pub parent: Option<String>,
    pub memory: Option<SnapshotMemory>,
    pub disks: Vec<SnapshotDisk>,
    /// The full domain definition at the time of the snapshot.
    pub domain: Option<Element>,
    pub inactive_domain: Option<Element>,
    pub active: Option<bool>,
    pub cookie: Option<Element>,
    /// Children Strata does not model, kept for the next write.
    pub unknown: Vec<Element>,
}

impl SnapshotDef {
    pub fn parse(xml: &str) -> Result<SnapshotDef> {
        let mut root = Element::parse(xml)?;
        if root.name != "domainsnapshot" {
            return Err(Error::xml(format!("expected a <domainsnapshot> document, found <{}>", root.name)));
        }
        let domain = root.take_child("domain");
        let inactive_domain = root.take_child("inactiveDomain");
        let mut def = SnapshotDef {
            name: root.child_text("name"),
            description: root.child("description").map(|d| d.text()),
            state: root.child_text("state"),
            creation_time: None,
            parent: root.child("parent").and_then(|p| p.child_text("name")),
            memory: None,
            disks: Vec::new(),
            domain,
            inactive_domain,
            active: None,
            cookie: root.child("cookie").cloned(),
            unknown: root.elements().filter(|e| !SNAPSHOT_CHILD_ORDER.contains(&e.name.as_ref())).cloned().collect(),
        };
        if let Some(name) = &def.name {
            crate::store::validate_name("snapshot", name)?;
        }
        if let Some(t) = root.child_text("creationTime") {
            def.creation_time =
                Some(t.parse().map_err(|_| Error::xml(format!("snapshot creationTime '{t}' is not a number")))?);
        }
        if let Some(a) = root.child_text("active") {
            def.active = Some(a == "1");
        }
        if let Some(m) = root.child("memory") {
            let snapshot =
                m.attr("snapshot").ok_or_else(|| Error::xml("snapshot <memory> needs a 'snapshot' attribute"))?;
            check_mode("memory", snapshot, &["no", "internal", "external"])?;
            def.memory =
                Some(SnapshotMemory { snapshot: snapshot.to_string(), file: m.attr("file").map(str::to_string) });
        }
        if let Some(disks) = root.child("disks") {
            for d in disks.children_named("disk") {
                let name =
                    d.attr("name").ok_or_else(|| Error::xml("snapshot <disk> needs a 'name' attribute"))?.to_string();
                let snapshot = d.attr("snapshot").map(str::to_string);
                if let Some(s) = &snapshot {
                    check_mode(&format!("disk '{name}'"), s, &["no", "internal", "external", "manual"])?;
                }
                let kind = d.attr("type").unwrap_or("file");
                def.disks.push(SnapshotDisk {
                    name,
                    snapshot,
                    driver_type: d.child("driver").and_then(|x| x.attr("type")).map(str::to_string),
                    source: parse_source(kind, d.child("source"))?,
                });
            }
        }
        Ok(def)
    }

    /// The record's own elements, without the definitions and other
    /// subtrees it carries (see [`SnapshotDef::write_xml`]).
    fn shell(&self) -> Element {
        let mut root = Element::new("domainsnapshot");
        let mut push = |el: Element| root.children.push(Node::Element(el));
        if let Some(n) = &self.name {
            push(Element::new("name").with_text(n.clone()));
        }
        if let Some(d) = &self.description {
            push(Element::new("description").with_text(d.clone()));
        }
        if let Some(s) = &self.state {
            push(Element::new("state").with_text(s.clone()));
        }
        if let Some(p) = &self.parent {
            push(Element::new("parent").with_child(Element::new("name").with_text(p.clone())));
        }
        if let Some(t) = self.creation_time {
            push(Element::new("creationTime").with_text(t.to_string()));
        }
        if let Some(m) = &self.memory {
            let mut el = Element::new("memory").with_attr("snapshot", m.snapshot.clone());
            if let Some(f) = &m.file {
                el.set_attr("file", f.clone());
            }
            push(el);
        }
        if !self.disks.is_empty() {
            let mut disks = Element::new("disks");
            for d in &self.disks {
                let mut el = Element::new("disk").with_attr("name", d.name.clone());
                if let Some(s) = &d.snapshot {
                    el.set_attr("snapshot", s.clone());
                }
                if let Some(src) = &d.source {
                    el.set_attr("type", src.type_name());
                }
                if let Some(t) = &d.driver_type {
                    el = el.with_child(Element::new("driver").with_attr("type", t.clone()));
                }
                if let Some(src) = &d.source {
                    el = el.with_child(source_element(src));
                }
                disks = disks.with_child(el);
            }
            push(disks);
        }
        if let Some(a) = self.active {
            push(Element::new("active").with_text(if a { "1" } else { "0" }));
        }
        root
    }

    pub fn to_xml(&self) -> String {
        let mut out = String::new();
        self.write_xml(&mut out, 0);
        out
    }

    /// Appends the record to `out` as an element at `depth`. The domain
    /// it embeds (with its chains, 370 KB at 1,000 layers) is written from
    /// where it is, not copied into a tree first.
    pub fn write_xml(&self, out: &mut String, depth: usize) {
        self.shell().write_with_more(out, depth, |out, depth| {
            let subtrees = [&self.domain, &self.inactive_domain, &self.cookie].into_iter().flatten();
            for el in subtrees.chain(&self.unknown) {
                el.write_at(out, depth);
            }
        });
    }
}

fn check_mode(what: &str, value: &str, allowed: &[&str]) -> Result<()> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(Error::xml(format!("{what} has snapshot='{value}'; expected one of {}", allowed.join(", "))))
    }
}
