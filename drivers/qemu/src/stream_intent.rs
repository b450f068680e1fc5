//! The record of a save or migration in progress, so that a `strata`
//! killed midway leaves nothing the next command cannot find.
//!
//! A save or migration writes (and fsyncs) what it is about to change into
//! the domain's state directory before it changes anything: the partial
//! image a save writes, whether the guest ran, and for a migration the
//! destination's root, domain and copied images. It marks the record
//! committed once the result is in place (the saved image renamed, the
//! destination holding the domain), and removes it at the end. The next
//! command on the domain finds a record whose writer is gone and finishes
//! a committed operation (the source stopped, a migrated guest resumed at
//! the destination) or undoes any other (the stream cancelled, the guest
//! run again, the partial image and the destination's domain removed).

use std::path::{Path, PathBuf};

use strata_core::driver::Connection;
use strata_core::store::{DomainLock, Store};
use strata_core::xml::Element;
use strata_core::{Error, ErrorKind, Result};
use strata_engine::intent::yes_no;
use strata_engine::process::{Liveness, ProcessId};
use strata_qemu_block::monitor::{qmp_error, Monitor};

use crate::memory_stream::{is_active, migration_status};
use crate::{live, QemuConnection};

const RECORD_FILE: &str = "stream-intent.xml";

/// What an interrupted save or migration had started.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum StreamIntent {
    /// A save into `partial` (a regular file written beside its name;
    /// `None` for a block device, written in place).
    Save { running: bool, partial: Option<PathBuf>, committed: bool },
    /// A migration to the domain `name` of the connection `uri`, on the
    /// fresh images (file names) it made there, mirroring the disks
    /// `targets`, started
    /// at `started_ms` (milliseconds since the Unix epoch; `None` in a
    /// record written before Strata kept it).
    Migrate {
        running: bool,
        started_ms: Option<u64>,
        uri: String,
        name: String,
        uuid: Option<String>,
        images: Vec<String>,
        targets: Vec<String>,
        undefine_source: bool,
        committed: bool,
    },
}

impl StreamIntent {
    fn to_element(&self) -> Element {
        match self {
            StreamIntent::Save { running, partial, committed } => {
                let root = Element::new("stream-intent")
                    .with_attr("op", "save")
                    .with_attr("running", yes_no(*running))
                    .with_attr("committed", yes_no(*committed));
                match partial {
                    Some(p) => root.with_child(Element::new("partial").with_attr("path", p.to_string_lossy())),
                    None => root,
                }
            }
            StreamIntent::Migrate {
                running,
                started_ms,
                uri,
                name,
                uuid,
                images,
                targets,
                undefine_source,
                committed,
            } => {
                let mut dest = Element::new("destination").with_attr("uri", &**uri).with_attr("name", &**name);
                if let Some(uuid) = uuid {
                    dest.set_attr("uuid", &**uuid);
                }
                let mut el = Element::new("stream-intent")
                    .with_attr("op", "migrate")
                    .with_attr("running", yes_no(*running))
                    .with_attr("undefine-source", yes_no(*undefine_source))
                    .with_attr("committed", yes_no(*committed))
                    .with_child(dest);
                if let Some(started) = started_ms {
                    el.set_attr("started-ms", started.to_string());
                }
                let el = images.iter().fold(el, |r, i| r.with_child(Element::new("image").with_attr("name", &**i)));
                targets.iter().fold(el, |r, t| r.with_child(Element::new("disk").with_attr("target", &**t)))
            }
        }
    }

    fn from_element(root: &Element) -> Result<StreamIntent> {
        let yes = |attr: &str| root.attr(attr) == Some("yes");
        match root.attr("op") {
            Some("save") => Ok(StreamIntent::Save {
                running: yes("running"),
                partial: root.child("partial").and_then(|p| p.attr("path")).map(PathBuf::from),
                committed: yes("committed"),
            }),
            Some("migrate") => {
                let dest = root.child("destination").ok_or_else(|| damaged("no <destination>"))?;
                Ok(StreamIntent::Migrate {
                    running: yes("running"),
                    started_ms: root.attr("started-ms").and_then(|ms| ms.parse().ok()),
                    uri: destination_uri(dest)?,
                    name: dest.attr("name").ok_or_else(|| damaged("no destination name"))?.to_string(),
                    uuid: dest.attr("uuid").map(String::from),
                    images: root.children_named("image").filter_map(image_name).collect(),
                    targets: root.children_named("disk").filter_map(|d| d.attr("target")).map(String::from).collect(),
                    undefine_source: yes("undefine-source"),
                    committed: yes("committed"),
                })
            }
            other => Err(damaged(&format!("unknown operation {other:?}"))),
        }
    }

    /// Writes (or replaces) the domain's record, naming this process as
    /// the one carrying the operation out. The store writes atomically
    /// and fsyncs.
    pub(crate) fn write(&self, store: &Store, domain: &str) -> Result<()> {
        let mut root = self.to_element();
        ProcessId::this()?.set_attrs(&mut root, "owner");
        store.write_domain_file(domain, RECORD_FILE, &root.to_xml())
    }

    /// The record of the same operation, its result in place.
    pub(crate) fn committed(&self) -> StreamIntent {
        let mut done = self.clone();
        match &mut done {
            StreamIntent::Save { committed, .. } | StreamIntent::Migrate { committed, .. } => *committed = true,
        }
        done
    }

    /// Marks the operation done.
    pub(crate) fn clear(store: &Store, domain: &str) -> Result<()> {
        store.write_domain_file(domain, RECORD_FILE, "")
    }

    /// The domain's record and whether the process that wrote it still
    /// runs, if there is one.
    fn read(store: &Store, domain: &str) -> Result<Option<(StreamIntent, bool)>> {
        let Some(text) = store.read_domain_file(domain, RECORD_FILE)? else { return Ok(None) };
        if text.trim().is_empty() {
            return Ok(None);
        }
        let root = Element::parse(&text).map_err(|e| e.context(format!("save or migration record '{RECORD_FILE}'")))?;
        let alive = ProcessId::from_attrs(&root, "owner").is_some_and(|o| o.liveness() != Liveness::Gone);
        Ok(Some((StreamIntent::from_element(&root)?, alive)))
    }

    /// The record left by a writer that is gone, if any.
    fn abandoned(store: &Store, domain: &str) -> Result<Option<StreamIntent>> {
        Ok(StreamIntent::read(store, domain)?.filter(|(_, alive)| !alive).map(|(intent, _)| intent))
    }

    /// The job, as a refusal names it.
    fn job(&self) -> &'static str {
        match self {
            StreamIntent::Save { .. } => "a save",
            StreamIntent::Migrate { .. } => "an outgoing migration",
        }
    }
}

/// The destination's URI; a record written before Strata kept it names
/// the root of a local connection.
fn destination_uri(dest: &Element) -> Result<String> {
    match (dest.attr("uri"), dest.attr("root")) {
        (Some(uri), _) => Ok(uri.to_string()),
        (None, Some(root)) => Ok(format!("qemu:///embed?root={root}")),
        (None, None) => Err(damaged("no destination URI")),
    }
}

/// A copied image's file name; an older record gives its whole path.
fn image_name(image: &Element) -> Option<String> {
    match (image.attr("name"), image.attr("path")) {
        (Some(name), _) => Some(name.to_string()),
        (None, Some(path)) => Path::new(path).file_name().map(|n| n.to_string_lossy().into_owned()),
        (None, None) => None,
    }
}

fn damaged(why: &str) -> Error {
    Error::operation_failed(format!(
        "save or migration record: {why}; remove '{RECORD_FILE}' from the domain's state directory once the \
         domain and its images are checked by hand"
    ))
}

/// Removes an image an undone save or migration made, if it is (still) a
/// regular file: a block device node is never removed.
pub(crate) fn remove_regular_file(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() => std::fs::remove_file(path).map_err(|e| Error::io("remove", path, e)),
        _ => Ok(()),
    }
}

/// The refusal of an operation while a save or migration holds the
/// domain (libvirt's state change lock timeout).
fn busy(domain: &str, job: &str) -> Error {
    Error::new(
        ErrorKind::OperationTimeout,
        format!(
            "cannot acquire state change lock: domain '{domain}' has {job} job running \
             (domjobinfo shows it, domjobabort ends it)"
        ),
    )
}

impl QemuConnection {
    /// Whether a save or migration of the domain is recorded, running or
    /// left by a process that died.
    pub(crate) fn stream_recorded(&self, domain: &str) -> Result<bool> {
        Ok(StreamIntent::read(self.store(), domain)?.is_some())
    }

    /// The save or migration of the domain a live process runs now.
    pub(crate) fn stream_in_progress(&self, domain: &str) -> Result<Option<StreamIntent>> {
        Ok(StreamIntent::read(self.store(), domain)?.filter(|(_, alive)| *alive).map(|(intent, _)| intent))
    }

    /// Refuses while a save or migration of the domain runs in another
    /// process.
    pub(crate) fn refuse_during_stream(&self, domain: &str) -> Result<()> {
        match self.stream_in_progress(domain)? {
            Some(intent) => Err(busy(domain, intent.job())),
            None => Ok(()),
        }
    }

    /// The domain's operation lock for a save or migration, refused (not
    /// waited for) while a snapshot operation or a block job's start holds
    /// it.
    pub(crate) async fn stream_operation(&self, domain: &str) -> Result<DomainLock> {
        self.refuse_during_stream(domain)?;
        let operation = self.store().try_lock_domain_operation(domain)?.ok_or_else(|| {
            Error::new(
                ErrorKind::OperationTimeout,
                format!("cannot acquire state change lock: a snapshot operation or block job holds domain '{domain}'"),
            )
        })?;
        // One killed while the lock was busy a moment ago, not yet undone:
        // its record must not be overwritten.
        if self.recover_holding(domain).await? {
            return Err(Error::operation_invalid(format!(
                "an interrupted save or migration of domain '{domain}' was just finished or undone; \
                 check the domain's state and try again"
            )));
        }
        Ok(operation)
    }

    /// Finishes or undoes a save or migration of `domain` whose `strata`
    /// was killed; nothing when none was, or when it still runs.
    pub(crate) async fn recover_stream(&self, domain: &str) -> Result<()> {
        if StreamIntent::abandoned(self.store(), domain)?.is_none() {
            return Ok(());
        }
        // A snapshot operation or block-job start holding the lock now
        // leaves the recovery to a later command, rather than making this
        // one (a `list`, say) wait for it.
        let Some(_operation) = self.store().try_lock_domain_operation(domain)? else {
            tracing::debug!(domain, "an interrupted save or migration waits for the operation lock");
            return Ok(());
        };
        self.recover_holding(domain).await.map(|_| ())
    }

    /// [`QemuConnection::recover_stream`] for a caller holding the
    /// operation lock; whether there was anything to recover.
    async fn recover_holding(&self, domain: &str) -> Result<bool> {
        // Read again: another process may have recovered it meanwhile.
        let Some(intent) = StreamIntent::abandoned(self.store(), domain)? else { return Ok(false) };
        tracing::info!(domain, ?intent, "recovering a save or migration whose strata was killed");
        match &intent {
            StreamIntent::Save { committed: true, .. } => self.stop_saved(domain).await?,
            StreamIntent::Save { running, partial, committed: false } => {
                self.resume_source(domain, *running, &[]).await?;
                if let Some(partial) = partial {
                    remove_regular_file(partial)?;
                }
            }
            StreamIntent::Migrate { committed: true, running, uri, name, .. } => {
                self.stop_source(domain).await?;
                let dest = strata_core::registry::open(uri)?;
                // A destination whose QEMU is gone has no guest to resume.
                if let Err(e) = dest.require_save_migrate()?.migrate_finish(name, *running).await {
                    tracing::warn!(domain, error = %e.report(), "the migrated domain was not resumed at the destination");
                }
            }
            StreamIntent::Migrate { committed: false, running, uri, name, uuid, images, targets, .. } => {
                self.resume_source(domain, *running, targets).await?;
                let dest = strata_core::registry::open(uri)?;
                dest.require_save_migrate()?.migrate_cleanup(name, uuid.as_deref(), images).await?;
            }
        }
        StreamIntent::clear(self.store(), domain)?;
        // Last: the record lives in the domain's directory.
        if let StreamIntent::Migrate { committed: true, undefine_source: true, .. } = intent {
            strata_engine::definitions::undefine(self.store(), domain, false)?;
        }
        Ok(true)
    }

    /// The monitor of the domain's QEMU, if one runs.
    async fn vm_monitor(&self, name: &str) -> Result<Option<std::sync::Arc<Monitor>>> {
        match live::reconcile(self.store(), name)?.filter(live::LiveStatus::is_vm) {
            Some(status) => self.attach(name, &status).await,
            None => Ok(None),
        }
    }

    /// A committed save or migration: the source QEMU stops.
    async fn stop_source(&self, domain: &str) -> Result<()> {
        if live::reconcile(self.store(), domain)?.is_some_and(|s| s.is_vm()) {
            Connection::destroy(self, domain).await?;
        }
        Ok(())
    }

    /// An undone save or migration: the stream cancelled, the migration's
    /// mirrors ended, and the guest running again if it ran before.
    async fn resume_source(&self, domain: &str, running: bool, targets: &[String]) -> Result<()> {
        let Some(monitor) = self.vm_monitor(domain).await? else { return Ok(()) };
        let client = &monitor.client;
        if migration_status(client).await.is_some_and(|s| is_active(&s)) || !targets.is_empty() {
            self.abandon(domain, client, targets, running).await;
        } else if running {
            // A save that completed into its partial image left QEMU in
            // postmigrate, one cut short left it paused.
            client.execute("cont", None).await.map_err(|e| qmp_error(domain, e))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(intent: StreamIntent) {
        let xml = intent.to_element().to_xml();
        let back = StreamIntent::from_element(&Element::parse(&xml).expect("XML")).expect("a record");
        assert_eq!(back, intent, "{xml}");
    }

    #[test]
    fn every_kind_round_trips() {
        round_trip(StreamIntent::Save {
            running: true,
            partial: Some("/s/.vm.save.7.partial".into()),
            committed: false,
        });
        round_trip(StreamIntent::Save { running: false, partial: None, committed: true });
        round_trip(StreamIntent::Migrate {
            running: true,
            started_ms: Some(1_796_000_000_123),
            uri: "qemu+ext://10.0.0.2/embed?root=/dest&command=ip%20netns%20exec%20b%20strata".into(),
            name: "vm".into(),
            uuid: Some("0c1e39c6-7b8f-4f4e-9a5e-d3c2a1b0f9e8".into()),
            images: vec!["a.qcow2".into()],
            targets: vec!["vda".into()],
            undefine_source: true,
            committed: false,
        });
    }

    #[test]
    fn an_unknown_operation_names_the_record_to_check() {
        let root = Element::parse("<stream-intent op='teleport'/>").expect("XML");
        let err = StreamIntent::from_element(&root).expect_err("refused");
        assert!(err.to_string().contains(RECORD_FILE), "{err}");
    }
}
