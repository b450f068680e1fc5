//! The intent record of a multi-step snapshot operation.
//!
//! Creation, revert and delete each write what they are about to do into
//! the domain's intent file before touching an image, and clear it when
//! done. A `strata` killed midway leaves the record behind, and the next
//! snapshot call on the domain reads it to finish or undo the operation
//! (see `snapshot/recover.rs`). One file per domain: the operations of a domain
//! are serialised by that recovery running first.

use std::path::PathBuf;

use strata_core::store::Store;
use strata_core::xml::{Element, SnapshotDef};
use strata_core::{Error, Result};

use crate::process::{Liveness, ProcessId};

const INTENT_FILE: &str = "snapshot-intent.xml";

/// What an interrupted operation was doing.
#[derive(Debug, Clone, PartialEq)]
pub enum Intent {
    /// A creation: the files it makes and the record it saves (`None` in a
    /// record written by hand or by an older Strata: then only the files
    /// are rolled back).
    Create { files: Vec<PathBuf>, record: Option<Box<SnapshotDef>>, no_metadata: bool },
    /// A revert to `snapshot`, ending running and/or paused as recorded,
    /// with the branch overlays it creates.
    Revert { snapshot: String, running: bool, paused: bool, overlays: Vec<PathBuf> },
    /// A delete of `snapshots` in this order, with the plan chosen for each
    /// external disk once it was chosen (so a resumed delete does what the
    /// interrupted one started, whatever the images look like halfway).
    Delete { snapshots: Vec<String>, metadata_only: bool, plans: Vec<DeletePlan> },
}

/// How an external snapshot's point leaves one disk's chain.
#[derive(Debug, Clone, PartialEq)]
pub struct DeletePlan {
    pub snapshot: String,
    pub disk: String,
    pub method: DeleteMethod,
    /// The image that was active after the snapshot (its overlay).
    pub overlay: PathBuf,
    /// The image the snapshot froze.
    pub frozen: PathBuf,
    /// The frozen image's backing file, if any.
    pub below: Option<PathBuf>,
    /// Every image backed by the frozen one when the plan was made.
    pub children: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteMethod {
    /// Seed 003 method 1: commit the overlay into the frozen image.
    Commit,
    /// Seed 003 method 2: pull the frozen image into each child.
    Pull,
}

/// A flag as intent records spell it.
pub fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

fn file_elements(root: Element, name: &'static str, paths: &[PathBuf]) -> Element {
    paths.iter().fold(root, |r, p| r.with_child(Element::new(name).with_attr("path", p.to_string_lossy())))
}

fn paths_of(el: &Element, name: &str) -> Vec<PathBuf> {
    el.children_named(name).filter_map(|f| f.attr("path")).map(PathBuf::from).collect()
}

fn required<'a>(el: &'a Element, attr: &str) -> Result<&'a str> {
    el.attr(attr).ok_or_else(|| Error::operation_failed(format!("intent record: <{}> lacks '{attr}'", el.name)))
}

impl DeletePlan {
    fn to_element(&self) -> Element {
        let mut el = Element::new("disk")
            .with_attr("snapshot", &*self.snapshot)
            .with_attr("name", &*self.disk)
            .with_attr(
                "method",
                match self.method {
                    DeleteMethod::Commit => "commit",
                    DeleteMethod::Pull => "pull",
                },
            )
            .with_attr("overlay", self.overlay.to_string_lossy())
            .with_attr("frozen", self.frozen.to_string_lossy());
        if let Some(b) = &self.below {
            el = el.with_attr("below", b.to_string_lossy());
        }
        file_elements(el, "child", &self.children)
    }

    fn from_element(el: &Element) -> Result<DeletePlan> {
        let method = match required(el, "method")? {
            "commit" => DeleteMethod::Commit,
            "pull" => DeleteMethod::Pull,
            other => return Err(Error::operation_failed(format!("intent record: unknown delete method '{other}'"))),
        };
        Ok(DeletePlan {
            snapshot: required(el, "snapshot")?.to_string(),
            disk: required(el, "name")?.to_string(),
            method,
            overlay: PathBuf::from(required(el, "overlay")?),
            frozen: PathBuf::from(required(el, "frozen")?),
            below: el.attr("below").map(PathBuf::from),
            children: paths_of(el, "child"),
        })
    }
}

fn read_root(store: &Store, domain: &str) -> Result<Option<Element>> {
    let Some(text) = store.read_domain_file(domain, INTENT_FILE)? else { return Ok(None) };
    if text.trim().is_empty() {
        return Ok(None);
    }
    Element::parse(&text).map(Some).map_err(|e| e.context(format!("intent record '{INTENT_FILE}'")))
}

/// A creation's intent without its record, which is written after it.
fn create_root(files: &[PathBuf], no_metadata: bool) -> Element {
    let root = Element::new("intent").with_attr("op", "snapshot-create").with_attr("metadata", yes_no(!no_metadata));
    file_elements(root, "file", files)
}

/// Writes an intent record naming this process as the one carrying the
/// operation out, with `record` (a creation's) as its last child.
fn write_root(store: &Store, domain: &str, mut root: Element, record: Option<&SnapshotDef>) -> Result<()> {
    ProcessId::this()?.set_attrs(&mut root, "owner");
    store.write_domain_file(domain, INTENT_FILE, &document(&root, record))
}

fn document(root: &Element, record: Option<&SnapshotDef>) -> String {
    match record {
        Some(record) => {
            let mut out = String::new();
            root.write_with_more(&mut out, 0, |out, depth| record.write_xml(out, depth));
            out
        }
        None => root.to_xml(),
    }
}

impl Intent {
    /// The record without a creation's snapshot record, which
    /// [`write_root`] appends.
    fn to_element(&self) -> Element {
        match self {
            Intent::Create { files, no_metadata, .. } => create_root(files, *no_metadata),
            Intent::Revert { snapshot, running, paused, overlays } => {
                let root = Element::new("intent")
                    .with_attr("op", "snapshot-revert")
                    .with_attr("snapshot", &**snapshot)
                    .with_attr("running", yes_no(*running))
                    .with_attr("paused", yes_no(*paused));
                file_elements(root, "file", overlays)
            }
            Intent::Delete { snapshots, metadata_only, plans } => {
                let root = Element::new("intent")
                    .with_attr("op", "snapshot-delete")
                    .with_attr("metadata-only", yes_no(*metadata_only));
                let root =
                    snapshots.iter().fold(root, |r, n| r.with_child(Element::new("snapshot").with_attr("name", &**n)));
                plans.iter().fold(root, |r, p| r.with_child(p.to_element()))
            }
        }
    }

    fn from_element(root: &Element) -> Result<Intent> {
        match root.attr("op") {
            Some("snapshot-create") => Ok(Intent::Create {
                files: paths_of(root, "file"),
                record: match root.child("domainsnapshot") {
                    Some(el) => Some(Box::new(SnapshotDef::parse(&el.to_xml())?)),
                    None => None,
                },
                no_metadata: root.attr("metadata") == Some("no"),
            }),
            Some("snapshot-revert") => Ok(Intent::Revert {
                snapshot: required(root, "snapshot")?.to_string(),
                running: root.attr("running") == Some("yes"),
                paused: root.attr("paused") == Some("yes"),
                overlays: paths_of(root, "file"),
            }),
            Some("snapshot-delete") => Ok(Intent::Delete {
                snapshots: root.children_named("snapshot").filter_map(|s| s.attr("name")).map(String::from).collect(),
                metadata_only: root.attr("metadata-only") == Some("yes"),
                plans: root.children_named("disk").map(DeletePlan::from_element).collect::<Result<_>>()?,
            }),
            other => Err(Error::operation_failed(format!(
                "intent record of an unknown operation {other:?}; remove '{INTENT_FILE}' from the domain's state \
                 directory once its images are checked by hand"
            ))),
        }
    }

    /// Writes (or replaces) the domain's intent record, naming this process
    /// as the one carrying the operation out.
    pub fn write(&self, store: &Store, domain: &str) -> Result<()> {
        let record = match self {
            Intent::Create { record, .. } => record.as_deref(),
            _ => None,
        };
        write_root(store, domain, self.to_element(), record)
    }

    /// [`Intent::write`] of an [`Intent::Create`] with `record`, from a
    /// record the caller keeps (it embeds the whole domain definition,
    /// which need not be copied to be written).
    pub fn write_create(
        store: &Store,
        domain: &str,
        files: &[PathBuf],
        record: &SnapshotDef,
        no_metadata: bool,
    ) -> Result<()> {
        write_root(store, domain, create_root(files, no_metadata), Some(record))
    }

    /// The domain's pending intent, if an operation was interrupted.
    pub fn read(store: &Store, domain: &str) -> Result<Option<Intent>> {
        read_root(store, domain)?.map(|root| Intent::from_element(&root)).transpose()
    }

    /// Whether an operation's intent is recorded (done or not), without
    /// reading it: for a reader that trusts the recorded state only when
    /// no operation may be halfway through changing it.
    pub fn is_recorded(store: &Store, domain: &str) -> Result<bool> {
        let path = store.domain_dir(domain)?.join(INTENT_FILE);
        match std::fs::metadata(&path) {
            // An empty record is a cleared one, as `read` takes it.
            Ok(meta) => Ok(meta.len() > 0),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("stat", &path, e)),
        }
    }

    /// Whether the process that wrote the pending intent is known to be
    /// gone (a record without an owner names none).
    pub fn owner_gone(store: &Store, domain: &str) -> Result<bool> {
        Ok(read_root(store, domain)?
            .and_then(|root| ProcessId::from_attrs(&root, "owner"))
            .is_some_and(|owner| owner.liveness() == Liveness::Gone))
    }

    /// Marks the operation done.
    /// Removes the record: one unlink and a directory fsync, where writing
    /// an empty record took a file fsync as well.
    pub fn clear(store: &Store, domain: &str) -> Result<()> {
        store.remove_domain_file(domain, INTENT_FILE)
    }
}

#[cfg(test)]
// A failed unwrap is how these tests report a decoding failure.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn round_trip(intent: Intent) {
        let record = match &intent {
            Intent::Create { record, .. } => record.as_deref(),
            _ => None,
        };
        let xml = document(&intent.to_element(), record);
        let back = Intent::from_element(&Element::parse(&xml).unwrap()).unwrap();
        assert_eq!(back, intent, "{xml}");
    }

    #[test]
    fn every_kind_round_trips() {
        round_trip(Intent::Create { files: vec!["/i/a.s1".into()], record: None, no_metadata: true });
        let record = SnapshotDef::parse(
            "<domainsnapshot><name>s1</name><disks><disk name='vda' snapshot='external'/></disks>\
             <domain type='kvm'><name>vm</name><devices><disk type='file'><source file='/i/a'/>\
             <backingStore type='file'><source file='/i/b'/></backingStore></disk></devices></domain>\
             <cookie><x/></cookie></domainsnapshot>",
        )
        .expect("a snapshot record");
        round_trip(Intent::Create {
            files: vec!["/i/a.s1".into()],
            record: Some(Box::new(record)),
            no_metadata: false,
        });
        round_trip(Intent::Revert {
            snapshot: "s1".into(),
            running: true,
            paused: false,
            overlays: vec!["/i/top.s1.branch1".into()],
        });
        round_trip(Intent::Delete {
            snapshots: vec!["s2".into(), "s1".into()],
            metadata_only: false,
            plans: vec![
                DeletePlan {
                    snapshot: "s2".into(),
                    disk: "vda".into(),
                    method: DeleteMethod::Pull,
                    overlay: "/i/top.s2".into(),
                    frozen: "/i/top.s1".into(),
                    below: Some("/i/top.qcow2".into()),
                    children: vec!["/i/top.s2".into(), "/i/top.s1.branch1".into()],
                },
                DeletePlan {
                    snapshot: "s1".into(),
                    disk: "vda".into(),
                    method: DeleteMethod::Commit,
                    overlay: "/i/top.s1".into(),
                    frozen: "/i/top.qcow2".into(),
                    below: None,
                    children: vec![],
                },
            ],
        });
    }

    #[test]
    fn unknown_operation_is_refused_with_the_file_named() {
        let root = Element::parse("<intent op='snapshot-frobnicate'/>").unwrap();
        let err = Intent::from_element(&root).unwrap_err();
        assert!(err.to_string().contains(INTENT_FILE), "{err}");
    }
}
