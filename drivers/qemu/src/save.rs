//! Saving a running domain's memory and device state to a file or a block
//! device and restoring it, the managed save a later start resumes from,
//! and the domain job (QEMU's migration stream) that carries the state,
//! which another `strata` can watch or cancel through its own monitor.
//!
//! The stream goes through a descriptor passed over the monitor socket
//! (`getfd`, `migrate fd:`): no shell, no `exec:` (seed 003). A saved
//! image is a header holding the domain XML, then QEMU's stream.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;
use strata_core::driver::{
    Connection, DefineFlags, DomainJobInfo, DomainJobOperation, DomainState, SaveFlags, SaveOptions,
};
use strata_core::options::SnapshotCreateFlags;
use strata_core::store::DomainLock;
use strata_core::xml::Domain;
use strata_core::{Error, ErrorKind, Result};

use crate::live::{self, LiveStatus};
use crate::memory_stream::{is_active, migrate_from_fd, migrate_to_fd, migration_status, query_migrate, UNCAPPED};
use crate::migrate::cancel_disk_copies;
use crate::stream_intent::StreamIntent;
use crate::{QemuConnection, StartMode};
use strata_qemu_block::monitor::{qmp_error, Monitor};

/// The first bytes of a saved image.
const MAGIC: &[u8; 16] = b"StrataSavedState";
const VERSION: u32 = 1;
/// QEMU's stream starts at a multiple of this, past the header.
const ALIGN: u64 = 4096;

/// What a saved image holds before QEMU's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SaveHeader {
    /// The guest ran when it was saved.
    pub running: bool,
    pub xml: String,
}

impl SaveHeader {
    /// Magic, version, flags, XML length, XML, zeroes up to [`ALIGN`].
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.xml.len() + ALIGN as usize);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&u32::from(self.running).to_le_bytes());
        out.extend_from_slice(&(self.xml.len() as u64).to_le_bytes());
        out.extend_from_slice(self.xml.as_bytes());
        out.resize(stream_offset(self.xml.len() as u64) as usize, 0);
        out
    }

    /// Reads the header of the image at `path` from `file`; returns it and
    /// the offset of QEMU's stream.
    fn read(file: &mut File, path: &Path) -> Result<(SaveHeader, u64)> {
        let not_saved = || Error::invalid_arg(format!("'{}' is not a saved domain image", path.display()));
        let mut fixed = [0u8; 32];
        file.read_exact(&mut fixed).map_err(|_| not_saved())?;
        if &fixed[..16] != MAGIC {
            return Err(not_saved());
        }
        let word = |at: usize| u32::from_le_bytes([fixed[at], fixed[at + 1], fixed[at + 2], fixed[at + 3]]);
        if word(16) != VERSION {
            return Err(Error::new(
                ErrorKind::ConfigUnsupported,
                format!(
                    "saved image '{}' has format version {}, this Strata reads {VERSION}",
                    path.display(),
                    word(16)
                ),
            ));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&fixed[24..32]);
        let len = u64::from_le_bytes(len);
        if len > strata_core::xml::MAX_DOCUMENT_BYTES as u64 {
            return Err(not_saved());
        }
        let mut xml = vec![0u8; len as usize];
        file.read_exact(&mut xml).map_err(|_| not_saved())?;
        let xml = String::from_utf8(xml).map_err(|_| not_saved())?;
        Ok((SaveHeader { running: word(20) != 0, xml }, stream_offset(len)))
    }
}

fn stream_offset(xml_len: u64) -> u64 {
    (32 + xml_len).div_ceil(ALIGN) * ALIGN
}

/// Where a save writes. A block device is written in place: opened
/// without truncation or append (`>>` fails on a device) and never
/// unlinked. A regular file is written beside its name and renamed over
/// it only once complete, so a failed save leaves what was there.
enum SaveTarget {
    Device { path: PathBuf, file: File },
    Regular { path: PathBuf, partial: PathBuf, file: File },
}

impl SaveTarget {
    /// The partial file a save to `path` writes: `None` for a block
    /// device, written in place.
    fn partial_for(path: &Path) -> Result<Option<PathBuf>> {
        match std::fs::metadata(path) {
            Ok(meta) if meta.file_type().is_block_device() => Ok(None),
            Ok(meta) if !meta.is_file() => {
                Err(Error::invalid_arg(format!("'{}' is neither a regular file nor a block device", path.display())))
            }
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("open", path, e)),
            _ => {
                let name = path
                    .file_name()
                    .ok_or_else(|| Error::invalid_arg(format!("'{}' names no file", path.display())))?;
                Ok(Some(path.with_file_name(format!(".{}.{}.partial", name.to_string_lossy(), std::process::id()))))
            }
        }
    }

    /// Opens the target [`SaveTarget::partial_for`] chose.
    fn open(path: &Path, partial: Option<PathBuf>) -> Result<SaveTarget> {
        match partial {
            None => {
                let file =
                    std::fs::OpenOptions::new().write(true).open(path).map_err(|e| Error::io("open", path, e))?;
                Ok(SaveTarget::Device { path: path.to_path_buf(), file })
            }
            Some(partial) => {
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&partial)
                    .map_err(|e| Error::io("create", &partial, e))?;
                Ok(SaveTarget::Regular { path: path.to_path_buf(), partial, file })
            }
        }
    }

    fn file(&self) -> &File {
        match self {
            SaveTarget::Device { file, .. } | SaveTarget::Regular { file, .. } => file,
        }
    }

    fn write_header(&mut self, header: &SaveHeader) -> Result<()> {
        let (file, path) = match self {
            SaveTarget::Device { file, path } => (file, path),
            SaveTarget::Regular { file, partial, .. } => (file, partial),
        };
        file.write_all(&header.encode()).map_err(|e| Error::io("write", path, e))
    }

    /// Makes the saved image durable and, for a file, puts it in place.
    fn commit(self, bypass_cache: bool) -> Result<()> {
        let file = self.file();
        match &self {
            SaveTarget::Device { path, .. } => file.sync_all().map_err(|e| Error::io("sync", path, e))?,
            SaveTarget::Regular { path, partial, .. } => {
                file.sync_all().map_err(|e| Error::io("sync", partial, e))?;
                std::fs::rename(partial, path).map_err(|e| Error::io("rename", partial, e))?;
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("sync", dir, e))?;
                }
            }
        }
        if bypass_cache {
            // QEMU writes its stream in pieces O_DIRECT refuses, so the
            // written (and synced) pages are dropped from the cache instead.
            // SAFETY: posix_fadvise on a descriptor this function owns.
            unsafe {
                libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            }
        }
        Ok(())
    }

    /// A failed save: a partial file is removed, a device left as it is.
    fn discard(self) {
        if let SaveTarget::Regular { partial, .. } = self {
            let _ = std::fs::remove_file(partial);
        }
    }
}

impl QemuConnection {
    /// The running domain, refused while a block job runs on it (the
    /// stream would carry a half-made disk state) or a save or migration
    /// already streams its memory.
    pub(crate) async fn running_without_job(&self, domain: &str) -> Result<(LiveStatus, Arc<Monitor>)> {
        let (status, monitor) = self.running(domain).await?;
        if let Some(job) = status.jobs.first() {
            return Err(Error::new(
                ErrorKind::BlockCopyActive,
                format!("disk '{}' already in active block job", job.disk),
            ));
        }
        if migration_status(&monitor.client).await.is_some_and(|s| is_active(&s)) {
            return Err(Error::operation_invalid(format!("domain '{domain}' has a save or migration in progress")));
        }
        Ok((status, monitor))
    }

    /// The image a managed save keeps for the domain.
    pub(crate) fn managed_image(&self, domain: &str) -> Result<PathBuf> {
        Ok(self.store().domain_dir(domain)?.join("managed.save"))
    }

    /// Saves the running domain to `path` and stops it. The guest is
    /// paused first (its disks and memory then stay of one instant), and
    /// runs again if anything fails.
    pub(crate) async fn save_domain(&self, domain: &str, path: &Path, opts: &SaveOptions) -> Result<()> {
        opts.flags.validate()?;
        let (status, monitor) = self.running_without_job(domain).await?;
        let operation = self.stream_operation(domain).await?;
        let client = &monitor.client;
        let xml_override = match &opts.xml {
            Some(xml) => Some(checked_replacement(status.domain.get()?, xml)?),
            None => None,
        };
        let run = client.query_status().await.map_err(|e| qmp_error(domain, e))?;
        let partial = SaveTarget::partial_for(path)?;
        let record = StreamIntent::Save { running: run.running, partial: partial.clone(), committed: false };
        record.write(self.store(), domain)?;
        let mut target = match SaveTarget::open(path, partial) {
            Ok(target) => target,
            Err(e) => {
                StreamIntent::clear(self.store(), domain)?;
                return Err(e);
            }
        };
        if let Err(e) = client.execute("stop", None).await {
            target.discard();
            StreamIntent::clear(self.store(), domain)?;
            return Err(qmp_error(domain, e));
        }
        let saved = async {
            if opts.flags.disk_set {
                self.snapshot_disk_set(domain, &operation).await?;
            }
            let xml = match xml_override {
                Some(xml) => xml,
                None => self.running(domain).await?.0.domain.get()?.to_xml(),
            };
            let running = if opts.flags.running || opts.flags.paused { opts.flags.running } else { run.running };
            target.write_header(&SaveHeader { running, xml })?;
            let bandwidth = opts.bandwidth_mib.map_or(UNCAPPED, |mib| mib << 20);
            migrate_to_fd(client, domain, target.file().as_fd(), bandwidth).await
        }
        .await;
        let committed = match saved {
            Ok(()) => target.commit(opts.flags.bypass_cache),
            Err(e) => {
                target.discard();
                Err(e)
            }
        };
        if let Err(e) = committed {
            // The source goes on: a stream that did not finish is
            // cancelled, and a guest QEMU left paused by a completed one
            // (postmigrate) or that was paused for the save runs again.
            let _ = client.execute("migrate_cancel", None).await;
            if run.running {
                let _ = client.execute("cont", None).await;
            }
            StreamIntent::clear(self.store(), domain)?;
            return Err(e);
        }
        // The image is in place: the next command stops the source.
        record.committed().write(self.store(), domain)?;
        strata_core::crash_point("save:committed");
        self.stop_saved(domain).await?;
        StreamIntent::clear(self.store(), domain)
    }

    /// Stops the domain whose state is saved, shut off for that reason.
    pub(crate) async fn stop_saved(&self, domain: &str) -> Result<()> {
        if live::reconcile(self.store(), domain)?.is_some_and(|s| s.is_vm()) {
            Connection::destroy(self, domain).await?;
        }
        self.record_shutoff_reason(domain, "saved")
    }

    /// Seed 004's save flag: an external disk-only snapshot of the disk
    /// set, taken by the snapshot engine while the guest is paused, so the
    /// overlays start at the instant the memory is saved.
    async fn snapshot_disk_set(&self, domain: &str, operation: &DomainLock) -> Result<()> {
        let name = format!(
            "save-{}",
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
        );
        let xml = format!("<domainsnapshot><name>{name}</name></domainsnapshot>");
        let flags = SnapshotCreateFlags { disk_only: true, atomic: true, disk_set: true, ..Default::default() };
        let snapshots = strata_engine::snapshot::SnapshotEngine::over(self);
        snapshots.snapshot_create_holding(domain, &xml, flags, operation).await.map(|_| ())
    }

    /// Starts the domain saved at `path`; returns its name. A domain not
    /// defined here is defined from the image; one that is must have the
    /// image's UUID and be shut off. The domain runs on the image's XML,
    /// or on `xml` (`restore --xml`), which must describe the same domain.
    pub(crate) async fn restore_domain(&self, path: &Path, xml: Option<&str>, flags: SaveFlags) -> Result<String> {
        flags.validate()?;
        let mut file = File::open(path).map_err(|e| Error::io("open", path, e))?;
        let (header, offset) = SaveHeader::read(&mut file, path)?;
        let dom = Domain::parse(&header.xml)?;
        let dom = match xml {
            Some(xml) => Domain::parse(&checked_replacement(&dom, xml)?)?,
            None => dom,
        };
        let name = dom.name();
        let defined_here = match strata_engine::definitions::load(self.store(), &name) {
            Ok(existing) => {
                if existing.uuid() != dom.uuid() {
                    return Err(Error::operation_failed(format!(
                        "domain '{name}' already exists with uuid {}",
                        existing.uuid().unwrap_or_default()
                    )));
                }
                false
            }
            Err(e) if e.kind() == ErrorKind::NoDomain => {
                let mut persistent = dom.clone();
                persistent.set_id(None);
                strata_engine::definitions::define(self.store(), &persistent.to_xml(), DefineFlags::default())?;
                true
            }
            Err(e) => return Err(e),
        };
        let restored = self.load_image(&name, dom, &mut file, offset).await;
        if let Err(e) = restored {
            if defined_here {
                let _ = strata_engine::definitions::undefine(self.store(), &name, false);
            }
            return Err(e);
        }
        let running = if flags.running || flags.paused { flags.running } else { header.running };
        let (_, monitor) = self.running(&name).await?;
        if running {
            monitor.client.execute("cont", None).await.map_err(|e| qmp_error(&name, e))?;
            self.record_reason(&name, DomainState::Running, "restored")?;
        } else {
            self.record_reason(&name, DomainState::Paused, "migrating")?;
        }
        Ok(name)
    }

    /// Starts QEMU paused on `dom` and loads the stream at `offset` of
    /// `file`; a failure stops that QEMU again.
    async fn load_image(&self, name: &str, dom: Domain, file: &mut File, offset: u64) -> Result<()> {
        {
            let _lock = strata_engine::blocking::lock_domain(self.store(), name).await?;
            if live::reconcile(self.store(), name)?.is_some() {
                return Err(Error::operation_invalid(format!("domain '{name}' is already active")));
            }
            self.launch(name, StartMode::Incoming, dom).await?;
        }
        let loaded = async {
            file.seek(SeekFrom::Start(offset)).map_err(|e| Error::io("seek", Path::new(name), e))?;
            let (_, monitor) = self.running(name).await?;
            migrate_from_fd(&monitor.client, name, file.as_fd()).await
        }
        .await;
        if loaded.is_err() {
            let _ = Connection::destroy(self, name).await;
        }
        loaded
    }

    pub(crate) fn saved_image_xml(&self, path: &Path) -> Result<String> {
        let mut file = File::open(path).map_err(|e| Error::io("open", path, e))?;
        Ok(SaveHeader::read(&mut file, path)?.0.xml)
    }

    /// Starts the domain from its managed save, which is removed once the
    /// domain runs from it.
    pub(crate) async fn start_from_managed_save(&self, domain: &str, paused: bool) -> Result<()> {
        let image = self.managed_image(domain)?;
        let flags = SaveFlags { paused, ..Default::default() };
        self.restore_domain(&image, None, flags).await?;
        std::fs::remove_file(&image).map_err(|e| Error::io("remove", &image, e))
    }

    /// The save or migration running on the domain: its memory stream
    /// and, for a migration, its disk copies.
    pub(crate) async fn domain_job_info(&self, domain: &str) -> Result<Option<DomainJobInfo>> {
        let (_, monitor) = self.running(domain).await?;
        let info = query_migrate(&monitor.client, domain).await?;
        let streaming = info.get("status").and_then(Value::as_str).is_some_and(is_active);
        let running = self.stream_in_progress(domain)?;
        let operation = match running {
            Some(StreamIntent::Save { .. }) => DomainJobOperation::Save,
            _ => DomainJobOperation::MigrationOut,
        };
        let memory = streaming.then(|| memory_job_info(operation, &info));
        match running {
            Some(StreamIntent::Migrate { started_ms, .. }) => {
                self.migration_job_info(domain, &monitor.client, memory, started_ms).await.map(Some)
            }
            _ => Ok(memory),
        }
    }

    /// Cancels the stream; the strata running the save or migration sees
    /// it end, removes what it wrote and lets the domain run on.
    pub(crate) async fn domain_job_abort(&self, domain: &str) -> Result<()> {
        let (_, monitor) = self.running(domain).await?;
        let info = query_migrate(&monitor.client, domain).await?;
        if !info.get("status").and_then(Value::as_str).is_some_and(is_active) {
            if let Some(StreamIntent::Migrate { targets, .. }) = self.stream_in_progress(domain)? {
                return cancel_disk_copies(&monitor.client, domain, &targets).await;
            }
            return Err(Error::operation_invalid("no job is active on the domain"));
        }
        monitor.client.execute("migrate_cancel", None).await.map_err(|e| qmp_error(domain, e))?;
        Ok(())
    }
}

/// A memory stream's progress as `query-migrate` reports it.
fn memory_job_info(operation: DomainJobOperation, info: &Value) -> DomainJobInfo {
    let ram = |field: &str| info.pointer(&format!("/ram/{field}")).and_then(Value::as_f64).unwrap_or(0.0);
    DomainJobInfo {
        operation,
        elapsed_ms: info.get("total-time").and_then(Value::as_u64).unwrap_or(0),
        data_processed: ram("transferred") as u64,
        data_remaining: ram("remaining") as u64,
        data_total: ram("total") as u64,
        // QEMU reports megabits per second.
        memory_bandwidth: (ram("mbps") * 1_000_000.0 / 8.0) as u64,
        disks: None,
    }
}

/// `save --xml`, `restore --xml`: the document must describe the same
/// domain as the one saved.
fn checked_replacement(saved: &Domain, xml: &str) -> Result<String> {
    let dom = Domain::parse(xml)?;
    if dom.name() != saved.name() || dom.uuid() != saved.uuid() {
        return Err(Error::invalid_arg(format!(
            "the XML given for the saved image describes domain '{}', not '{}' (name and UUID must match)",
            dom.name(),
            saved.name()
        )));
    }
    Ok(dom.to_xml())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_reads_back_and_ends_where_the_stream_starts() {
        let header = SaveHeader { running: true, xml: "<domain><name>vm1</name></domain>".into() };
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("vm1.save");
        let mut bytes = header.encode();
        assert_eq!(bytes.len() as u64 % ALIGN, 0);
        let offset = bytes.len() as u64;
        bytes.extend_from_slice(b"QEVM");
        std::fs::write(&path, &bytes).expect("write");
        let mut file = File::open(&path).expect("open");
        assert_eq!(SaveHeader::read(&mut file, &path).expect("a saved image"), (header, offset));

        std::fs::write(&path, b"QEVM\0\0\0\x03").expect("write");
        let refused = SaveHeader::read(&mut File::open(&path).expect("open"), &path).expect_err("no header");
        assert_eq!(refused.message(), format!("'{}' is not a saved domain image", path.display()));
    }
}
