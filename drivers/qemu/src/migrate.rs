//! Migration of a running domain to another Strata connection of the QEMU
//! driver (recipe book section 8). The destination QEMU starts paused with
//! `-incoming defer` and exports fresh images of the copied disks over
//! NBD; the source mirrors each copied disk into its export
//! (`write-blocking`), migrates RAM with pause-before-switchover, and only
//! there ends the mirrors, so the disks and the memory the destination
//! resumes are of one instant. A disk that is not copied must be on
//! storage the destination shares: QEMU would otherwise run the guest on
//! whatever image the destination has, without a word. Nothing starts
//! until every disk is accounted for; a failed or cancelled migration
//! leaves the source running and the destination with nothing of it.
//! The domain is defined at the destination whether or not the request
//! asks for it (`--persistent`): Strata has no transient domains.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use strata_core::chain::{Backing, Chain, Layer, StorageSource};
use strata_core::driver::{
    Connection, DefineFlags, DiskCopyProgress, DomainJobInfo, DomainJobOperation, DomainState, IncomingDisk,
    IncomingMigration, MigrateOptions, PreparedMigration, SaveMigrateOps, SharedDisk, StoragePoolOps, TcpListen,
};
use strata_core::pool::PoolManager;
use strata_core::uri::ConnectUri;
use strata_core::xml::Domain;
use strata_core::{Error, ErrorKind, Result};
use strata_engine::image_work::{image_size, path_str};
use strata_qmp::types::JobStatus;
use strata_qmp::QmpClient;

use crate::live;
use crate::memory_stream::{is_active, migration_status, UNCAPPED};
use crate::stream_intent::{remove_regular_file, StreamIntent};
use crate::{QemuConnection, StartMode};
use strata_qemu_block::monitor::qmp_error;

/// A disk the migration copies: its root node at the source.
struct CopiedDisk {
    target: String,
    source_root: String,
}

impl CopiedDisk {
    fn job(&self) -> String {
        mirror_job(&self.target)
    }
    fn nbd_node(&self) -> String {
        nbd_node(&self.target)
    }
}

/// The mirror job copying disk `target` to the destination.
fn mirror_job(target: &str) -> String {
    format!("{MIRROR_JOB_PREFIX}{target}")
}

const MIRROR_JOB_PREFIX: &str = "strata-migrate-";

/// The source's NBD client node of disk `target`'s export.
fn nbd_node(target: &str) -> String {
    format!("strata-migrate-{target}-nbd")
}

impl QemuConnection {
    pub(crate) async fn migrate_domain(&self, domain: &str, dest_uri: &str, opts: &MigrateOptions) -> Result<()> {
        opts.flags.validate()?;
        if opts.flags.copy_storage_inc {
            return Err(Error::no_support(
                "--copy-storage-inc: the qemu driver copies whole disks (--copy-storage-all, --copy-storage-disk-set)",
            ));
        }
        let started_ms = unix_ms();
        let (migration_listen, disks_listen) = listen_addresses(dest_uri, self.store().root(), opts)?;
        let dest_conn = strata_core::registry::open(dest_uri)?;
        let dest = dest_conn.require_save_migrate()?;
        let (status, monitor) = self.running_without_job(domain).await?;
        let _operation = self.stream_operation(domain).await?;
        let client = &monitor.client;
        let persistent = strata_engine::definitions::load(self.store(), domain)?;
        let live = status.domain.get()?;
        let copied = copied_targets(&persistent, live, opts)?;
        let mut incoming = IncomingMigration {
            xml: live.to_xml(),
            copied: Vec::new(),
            shared: Vec::new(),
            migration_listen,
            disks_listen,
        };
        let mut disks = Vec::new();
        for disk in live.disks()? {
            let Some(chain) = disk.chain.as_ref() else { continue };
            if !copied.contains(&disk.target) {
                let images = chain.layers.iter().filter_map(|l| l.source.local_path()).map(|p| p.display().to_string());
                incoming.shared.push(SharedDisk { target: disk.target.clone(), images: images.collect() });
                continue;
            }
            let top = chain.top().ok_or_else(|| Error::internal("a disk chain without layers"))?;
            let path = top.source.local_path().ok_or_else(|| {
                Error::config_unsupported(format!("disk '{}' is not a local image and cannot be copied", disk.target))
            })?;
            let format = top.format.clone().unwrap_or_else(|| "raw".into());
            let file_name = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| Error::internal(format!("image '{}' has no UTF-8 file name", path.display())))?;
            let source_root = status
                .roots
                .get(&disk.target)
                .cloned()
                .ok_or_else(|| Error::internal(format!("no root node recorded for disk '{}'", disk.target)))?;
            incoming.copied.push(IncomingDisk {
                target: disk.target.clone(),
                size: image_size(path, &format)?,
                format,
                file_name: file_name.to_string(),
            });
            disks.push(CopiedDisk { target: disk.target.clone(), source_root });
        }
        dest.migrate_check(&incoming).await?;

        let was_running = client.query_status().await.map_err(|e| qmp_error(domain, e))?.running;
        let images: Vec<String> = incoming.copied.iter().map(|d| d.file_name.clone()).collect();
        let targets: Vec<String> = disks.iter().map(|d| d.target.clone()).collect();
        let uuid = live.uuid();
        let record = StreamIntent::Migrate {
            running: was_running,
            started_ms: Some(started_ms),
            uri: dest_uri.to_string(),
            name: domain.to_string(),
            uuid: uuid.clone(),
            images: images.clone(),
            targets: targets.clone(),
            undefine_source: opts.flags.undefine_source,
            committed: false,
        };
        record.write(self.store(), domain)?;
        let migrated = self.run_migration(domain, client, dest, &incoming, &disks, opts, &record).await;
        if let Err(e) = migrated {
            self.abandon(domain, client, &targets, was_running).await;
            match dest.migrate_cleanup(domain, uuid.as_deref(), &images).await {
                Ok(()) => StreamIntent::clear(self.store(), domain)?,
                // The record stays for the next command to finish the cleanup.
                Err(left) => tracing::warn!(domain, error = %left.report(), "the destination is not cleaned up yet"),
            }
            return Err(e);
        }
        // Committed: from here nothing is undone. The guest runs on at the
        // destination first, then the paused source stops.
        let resumed = if was_running { dest.migrate_finish(domain, true).await } else { Ok(()) };
        Connection::destroy(self, domain).await?;
        // Not resumed: the record stays, for the next command to ask again.
        resumed?;
        StreamIntent::clear(self.store(), domain)?;
        if opts.flags.undefine_source {
            strata_engine::definitions::undefine(self.store(), domain, false)?;
        }
        Ok(())
    }

    /// Everything up to the commit: the destination prepared, the disks
    /// copied, the memory moved, and the destination holding the guest,
    /// paused.
    #[allow(clippy::too_many_arguments)]
    async fn run_migration(
        &self,
        domain: &str,
        client: &QmpClient,
        dest: &dyn SaveMigrateOps,
        incoming: &IncomingMigration,
        disks: &[CopiedDisk],
        opts: &MigrateOptions,
        record: &StreamIntent,
    ) -> Result<()> {
        let prepared = dest.migrate_prepare(incoming).await?;
        let server = match (&prepared.disks_uri, disks.is_empty()) {
            (_, true) => Value::Null,
            (Some(uri), false) => nbd_server(uri)?,
            (None, false) => return Err(Error::internal("the destination serves no disks to copy into")),
        };
        // libvirt caps the disk copies at the migration's bandwidth too.
        let speed = opts.bandwidth_mib.map(|mib| mib << 20);
        for disk in disks {
            client
                .execute(
                    "blockdev-add",
                    Some(
                        json!({"driver": "nbd", "node-name": disk.nbd_node(), "server": server, "export": disk.target}),
                    ),
                )
                .await
                .map_err(|e| qmp_error(domain, e))?;
            let mut mirror = json!({
                "job-id": disk.job(), "device": disk.source_root, "target": disk.nbd_node(),
                "sync": "full", "copy-mode": "write-blocking",
                // Kept once ended, so a cancelled copy tells it was one.
                "auto-dismiss": false,
            });
            if let Some(speed) = speed {
                mirror["speed"] = json!(speed);
            }
            client.execute("blockdev-mirror", Some(mirror)).await.map_err(|e| qmp_error(domain, e))?;
        }
        strata_core::pause_point("migrate:disks-copying");
        for disk in disks {
            wait_job(client, domain, &disk.job(), JobStatus::Ready).await?;
        }
        let events = json!({"capability": "events", "state": true});
        let switchover = json!({"capability": "pause-before-switchover", "state": true});
        client
            .execute("migrate-set-capabilities", Some(json!({"capabilities": [events, switchover]})))
            .await
            .map_err(|e| qmp_error(domain, e))?;
        let bandwidth = speed.unwrap_or(UNCAPPED);
        client
            .execute("migrate-set-parameters", Some(json!({"max-bandwidth": bandwidth})))
            .await
            .map_err(|e| qmp_error(domain, e))?;
        if !opts.flags.live {
            client.execute("stop", None).await.map_err(|e| qmp_error(domain, e))?;
        }
        client
            .execute("migrate", Some(json!({"uri": prepared.migration_uri})))
            .await
            .map_err(|e| qmp_error(domain, e))?;
        wait_migration_state(client, domain, "pre-switchover", opts.timeout_s).await?;
        // The guest is stopped: the mirrors hold every write it made.
        // Ending a ready mirror without a pivot leaves the source on its
        // own image, in case the switchover still fails.
        for disk in disks {
            client
                .execute("block-job-cancel", Some(json!({"device": disk.job()})))
                .await
                .map_err(|e| qmp_error(domain, e))?;
            wait_job(client, domain, &disk.job(), JobStatus::Null).await?;
        }
        client
            .execute("migrate-continue", Some(json!({"state": "pre-switchover"})))
            .await
            .map_err(|e| qmp_error(domain, e))?;
        wait_migration_state(client, domain, "completed", None).await?;
        dest.migrate_finish(domain, false).await?;
        // Both sides hold the guest, paused: from here the next command
        // finishes the migration rather than undoing it.
        record.committed().write(self.store(), domain)
    }

    /// The source after a failed migration: the stream cancelled, the
    /// mirrors and their NBD clients gone, the guest running as before.
    pub(crate) async fn abandon(&self, domain: &str, client: &QmpClient, targets: &[String], resume: bool) {
        let _ = client.execute("migrate_cancel", None).await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while migration_status(client).await.is_some_and(|s| is_active(&s)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // A later save must not stop before its switchover.
        let switchover = json!({"capability": "pause-before-switchover", "state": false});
        let _ = client.execute("migrate-set-capabilities", Some(json!({"capabilities": [switchover]}))).await;
        for target in targets {
            let job = mirror_job(target);
            if client.execute("block-job-cancel", Some(json!({"device": job, "force": true}))).await.is_ok() {
                let _ = wait_job(client, domain, &job, JobStatus::Null).await;
            }
            let _ = client.execute("blockdev-del", Some(json!({"node-name": nbd_node(target)}))).await;
        }
        if resume {
            let _ = client.execute("cont", None).await;
        }
    }

    /// `domjobinfo` of a migration that started at `started_ms`: its
    /// memory stream's progress (`memory`, once the stream runs) and its
    /// disk copies' (their mirror jobs, until the switchover ends them),
    /// the data counting both as libvirt does.
    pub(crate) async fn migration_job_info(
        &self,
        domain: &str,
        client: &QmpClient,
        memory: Option<DomainJobInfo>,
        started_ms: Option<u64>,
    ) -> Result<DomainJobInfo> {
        let jobs = client.query_jobs().await.map_err(|e| qmp_error(domain, e))?;
        let mirrors: Vec<_> = jobs.iter().filter(|j| j.id.starts_with(MIRROR_JOB_PREFIX)).collect();
        let processed: u64 = mirrors.iter().map(|j| j.current_progress).sum();
        let total: u64 = mirrors.iter().map(|j| j.total_progress).sum();
        let mut info = memory.unwrap_or(DomainJobInfo {
            operation: DomainJobOperation::MigrationOut,
            elapsed_ms: 0,
            data_processed: 0,
            data_remaining: 0,
            data_total: 0,
            memory_bandwidth: 0,
            disks: None,
        });
        if let Some(started) = started_ms {
            info.elapsed_ms = unix_ms().saturating_sub(started);
        }
        if !mirrors.is_empty() {
            let remaining = total.saturating_sub(processed);
            info.data_processed += processed;
            info.data_remaining += remaining;
            info.data_total += total;
            info.disks = Some(DiskCopyProgress { processed, remaining, total });
        }
        Ok(info)
    }

    /// The destination's check before anything starts (see
    /// [`SaveMigrateOps::migrate_check`]).
    pub(crate) async fn check_incoming(&self, incoming: &IncomingMigration) -> Result<()> {
        refuse_existing_destination(self, &Domain::parse(&incoming.xml)?)?;
        for disk in &incoming.copied {
            copied_image_name(&disk.file_name)?;
        }
        for disk in &incoming.shared {
            refuse_unshared(self, disk).await?;
        }
        Ok(())
    }

    /// The destination made ready (see [`SaveMigrateOps::migrate_prepare`]):
    /// fresh images of the copied disks under the root's `images/DOMAIN/`,
    /// the domain defined and its QEMU started with `-incoming defer`,
    /// the images exported over NBD and the stream awaited, on Unix
    /// sockets in the run directory or on TCP at `incoming.listen`.
    pub(crate) async fn prepare_incoming(&self, incoming: &IncomingMigration) -> Result<PreparedMigration> {
        self.check_incoming(incoming).await?;
        let mut dom = Domain::parse(&incoming.xml)?;
        let domain = dom.name();
        let images = self.images_dir(&domain);
        for disk in &incoming.copied {
            let image = images.join(copied_image_name(&disk.file_name)?);
            let single = Chain {
                layers: vec![Layer {
                    source: StorageSource::File { path: image.clone() },
                    format: Some(disk.format.clone()),
                    index: 0,
                    backing: Backing::End,
                    slice: None,
                }],
            };
            dom.set_disk_chain(&disk.target, &single)?;
            std::fs::create_dir_all(&images).map_err(|e| Error::io("create", &images, e))?;
            strata_core::tool::run_tool(
                &strata_engine::image_work::qemu_img_binary(),
                &["create", "-q", "-f", &disk.format, path_str(&image)?, &disk.size.to_string()],
            )?;
        }
        let mut persistent = dom.clone();
        persistent.set_id(None);
        strata_engine::definitions::define(self.store(), &persistent.to_xml(), DefineFlags::default())?;
        {
            let _lock = strata_engine::blocking::lock_domain(self.store(), &domain).await?;
            self.launch(&domain, StartMode::Incoming, dom).await?;
        }
        let (status, monitor) = self.running(&domain).await?;
        let client = &monitor.client;
        let run_dir = live::runtime_paths(self.store(), &domain)?.dir;
        let endpoint = |listen: &Option<TcpListen>, socket: &str| -> Result<(String, Value)> {
            match listen {
                None => {
                    let path = run_dir.join(socket);
                    let path = path_str(&path)?;
                    Ok((format!("unix:{path}"), json!({"type": "unix", "data": {"path": path}})))
                }
                Some(TcpListen { host, port }) => {
                    let port = match port {
                        Some(port) => *port,
                        None => free_port(host)?,
                    };
                    let inet = json!({"type": "inet", "data": {"host": host, "port": port.to_string()}});
                    Ok((format!("tcp:{}:{port}", uri_host(host)), inet))
                }
            }
        };
        let mut disks_uri = None;
        if !incoming.copied.is_empty() {
            let (uri, addr) = endpoint(&incoming.disks_listen, "nbd.sock")?;
            client.execute("nbd-server-start", Some(json!({"addr": addr}))).await.map_err(|e| qmp_error(&domain, e))?;
            disks_uri = Some(uri);
        }
        for disk in &incoming.copied {
            let node = status.roots.get(&disk.target).ok_or_else(|| {
                Error::internal(format!("no root node at the destination for disk '{}'", disk.target))
            })?;
            client
                .execute(
                    "block-export-add",
                    Some(json!({"type": "nbd", "id": disk.target, "node-name": node, "name": disk.target, "writable": true})),
                )
                .await
                .map_err(|e| qmp_error(&domain, e))?;
        }
        let events = json!({"capability": "events", "state": true});
        client
            .execute("migrate-set-capabilities", Some(json!({"capabilities": [events]})))
            .await
            .map_err(|e| qmp_error(&domain, e))?;
        let (migration_uri, _) = endpoint(&incoming.migration_listen, "migration.sock")?;
        client
            .execute("migrate-incoming", Some(json!({"uri": migration_uri})))
            .await
            .map_err(|e| qmp_error(&domain, e))?;
        Ok(PreparedMigration { migration_uri, disks_uri })
    }

    /// The stream arrived (see [`SaveMigrateOps::migrate_finish`]).
    pub(crate) async fn finish_incoming(&self, domain: &str, resume: bool) -> Result<()> {
        let (_, monitor) = self.running(domain).await?;
        let client = &monitor.client;
        wait_migration_state(client, domain, "completed", None).await?;
        // The copied images are the guest's own now. A second call finds
        // the server stopped already.
        if let Err(e) = client.execute("nbd-server-stop", None).await {
            tracing::debug!(domain, error = %e, "no NBD server to stop");
        }
        if !resume {
            return self.record_reason(domain, DomainState::Paused, "migration");
        }
        if !client.query_status().await.map_err(|e| qmp_error(domain, e))?.running {
            client.execute("cont", None).await.map_err(|e| qmp_error(domain, e))?;
        }
        self.record_reason(domain, DomainState::Running, "migrated")
    }

    /// The destination after a failed migration (see
    /// [`SaveMigrateOps::migrate_cleanup`]): its QEMU stopped and the
    /// definition removed (only if it is the migrated domain's, by UUID),
    /// and the copied images it made removed.
    pub(crate) async fn remove_migrated(&self, domain: &str, uuid: Option<&str>, images: &[String]) -> Result<()> {
        let ours = match strata_engine::definitions::load(self.store(), domain) {
            Ok(dom) => dom.uuid().as_deref() == uuid,
            Err(e) if e.kind() == ErrorKind::NoDomain => false,
            Err(e) => return Err(e),
        };
        if ours {
            if live::reconcile(self.store(), domain)?.is_some_and(|s| s.is_vm()) {
                Connection::destroy(self, domain).await?;
            }
            strata_engine::definitions::undefine(self.store(), domain, false)?;
        }
        let dir = self.images_dir(domain);
        for name in images {
            remove_regular_file(&dir.join(copied_image_name(name)?))?;
        }
        let _ = std::fs::remove_dir(&dir);
        Ok(())
    }

    /// Where the destination keeps the images it copies a domain's disks to.
    fn images_dir(&self, domain: &str) -> PathBuf {
        self.store().root().join("images").join(domain)
    }
}

/// A copied image's name as the source sends it: a file name, nothing
/// that would reach outside the destination's image directory.
fn copied_image_name(name: &str) -> Result<&str> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') {
        return Err(Error::invalid_arg(format!("'{name}' is not the file name of a copied image")));
    }
    Ok(name)
}

/// Where the destination listens for the memory stream and for the disk
/// copies: `--migrateuri` and `--disks-uri` when given, else the host a
/// remote URI names, else (a destination on this machine) Unix sockets.
/// A local destination must not be the domain's own connection.
fn listen_addresses(
    dest_uri: &str,
    own_root: &Path,
    opts: &MigrateOptions,
) -> Result<(Option<TcpListen>, Option<TcpListen>)> {
    let target = ConnectUri::parse(dest_uri)?;
    if target.transport.is_none() && target.driver == "qemu" && target.state_root().is_ok_and(|root| root == own_root) {
        return Err(Error::invalid_arg(format!("'{dest_uri}' is the domain's own connection")));
    }
    let migration = match (&opts.migrate_uri, &target.transport, &target.host) {
        (Some(uri), _, _) => Some(TcpListen::parse(uri)?),
        (None, None, _) => None,
        (None, Some(_), Some(host)) => Some(TcpListen { host: host.clone(), port: None }),
        (None, Some(_), None) => {
            return Err(Error::invalid_arg(format!(
                "'{dest_uri}' names no host: give the address a remote destination receives the migration on \
                 in its URI (DRIVER+TRANSPORT://ADDRESS/…) or as --migrateuri tcp:ADDRESS[:PORT]"
            )))
        }
    };
    let disks = match &opts.disks_uri {
        Some(uri) => Some(TcpListen::parse(uri)?),
        None => migration.as_ref().map(|m| TcpListen { host: m.host.clone(), port: None }),
    };
    Ok((migration, disks))
}

/// A TCP port free on `host` now, for QEMU to listen on.
fn free_port(host: &str) -> Result<u16> {
    let bound = std::net::TcpListener::bind((host, 0))
        .map_err(|e| Error::operation_failed(format!("cannot listen on '{host}' for the migration: {e}")))?;
    bound.local_addr().map(|a| a.port()).map_err(|e| Error::operation_failed(format!("no port on '{host}': {e}")))
}

/// `host` as a URI writes it: an IPv6 address in brackets.
fn uri_host(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}

/// The NBD client's `server` for a destination's disks URI.
fn nbd_server(uri: &str) -> Result<Value> {
    if let Some(path) = uri.strip_prefix("unix:") {
        return Ok(json!({"type": "unix", "path": path}));
    }
    let address = uri.strip_prefix("tcp:").and_then(|a| a.rsplit_once(':'));
    match address {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            Ok(json!({"type": "inet", "host": host.trim_start_matches('[').trim_end_matches(']'), "port": port}))
        }
        _ => Err(Error::invalid_arg(format!("'{uri}' is not a disks URI (unix:PATH or tcp:HOST:PORT)"))),
    }
}

/// Now, in milliseconds since the Unix epoch.
fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The disks the flags copy: every disk, the disk set, or none.
fn copied_targets(persistent: &Domain, running: &Domain, opts: &MigrateOptions) -> Result<Vec<String>> {
    let flags = opts.flags;
    if flags.copy_storage_all {
        return Ok(running.disks()?.into_iter().filter(|d| d.chain.is_some()).map(|d| d.target).collect());
    }
    if flags.copy_storage_disk_set {
        return strata_core::diskset::selected(persistent);
    }
    Ok(Vec::new())
}

/// A disk that is not copied must be on storage the destination sees at
/// the same path: every image of its chain inside a running storage pool
/// of the destination connection, and there.
async fn refuse_unshared(dest: &QemuConnection, disk: &SharedDisk) -> Result<()> {
    let pools = PoolManager::new(dest.store().clone()).pool_list().await?;
    for image in &disk.images {
        let path = Path::new(image);
        let in_pool = pools
            .iter()
            .filter(|p| p.state == strata_core::driver::PoolState::Running)
            .any(|p| path.starts_with(Path::new(&p.target)));
        let why = if !in_pool {
            "no running storage pool there holds it"
        } else if !path.exists() {
            "it is not there"
        } else {
            continue;
        };
        return Err(Error::new(
            ErrorKind::OperationInvalid,
            format!(
                "disk '{}' is not copied and '{image}' is not on storage shared with '{}' ({why}); copy it \
                 (--copy-storage-disk-set with the disk in the disk set, or --copy-storage-all) or put it in a \
                 pool both sides share",
                disk.target, dest.uri
            ),
        ));
    }
    Ok(())
}

/// The destination must not run or define another domain of that name.
fn refuse_existing_destination(dest: &QemuConnection, dom: &Domain) -> Result<()> {
    let name = dom.name();
    match strata_engine::definitions::load(dest.store(), &name) {
        Ok(_) => Err(Error::operation_invalid(format!("domain '{name}' already exists at the destination"))),
        Err(e) if e.kind() == ErrorKind::NoDomain => Ok(()),
        Err(e) => Err(e),
    }
}

/// Cancels the copies of a migration's disks still mirroring (before its
/// memory stream starts): the migrating strata sees them end before they
/// were ready and undoes the migration.
pub(crate) async fn cancel_disk_copies(client: &QmpClient, domain: &str, targets: &[String]) -> Result<()> {
    for target in targets {
        client
            .execute("block-job-cancel", Some(json!({"device": mirror_job(target), "force": true})))
            .await
            .map_err(|e| qmp_error(domain, e))?;
    }
    Ok(())
}

/// virsh's words for a migration domjobabort ended.
fn canceled_by_client() -> Error {
    Error::new(ErrorKind::OperationAborted, "operation aborted: migration job: canceled by client")
}

/// Waits for block job `id` to reach `wanted` (`Null`: gone), failing if
/// it ends otherwise.
async fn wait_job(client: &QmpClient, domain: &str, id: &str, wanted: JobStatus) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let jobs = client.query_jobs().await.map_err(|e| qmp_error(domain, e))?;
        let job = jobs.iter().find(|j| j.id == id);
        match job {
            None if wanted == JobStatus::Null => return Ok(()),
            Some(j) if j.status == wanted => return Ok(()),
            None => {
                return Err(Error::operation_failed(format!("the copy of a disk ({id}) ended before it was ready")))
            }
            Some(j) if j.status == JobStatus::Concluded => {
                client.execute("job-dismiss", Some(json!({"id": id}))).await.map_err(|e| qmp_error(domain, e))?;
                match j.error.as_deref() {
                    // domjobabort while the disks were still copying.
                    Some("Operation canceled") if wanted != JobStatus::Null => return Err(canceled_by_client()),
                    Some(why) if wanted != JobStatus::Null => {
                        return Err(Error::operation_failed(format!("the copy of a disk ({id}) failed: {why}")))
                    }
                    _ => {}
                }
            }
            Some(j) if j.error.is_some() => {
                return Err(Error::operation_failed(format!(
                    "the copy of a disk ({id}) failed: {}",
                    j.error.clone().unwrap_or_default()
                )))
            }
            Some(_) => {}
        }
        if Instant::now() >= deadline {
            return Err(Error::new(ErrorKind::OperationTimeout, format!("the disk copy {id} took over 10 minutes")));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for the migration to reach `wanted`; a failed or cancelled one is
/// an error. With `suspend_after`, the guest is paused once it has run that
/// many seconds of the migration (virsh's `--timeout`), so it converges.
async fn wait_migration_state(
    client: &QmpClient,
    domain: &str,
    wanted: &str,
    suspend_after: Option<u64>,
) -> Result<()> {
    let start = Instant::now();
    let mut suspended = false;
    loop {
        let info: Value = client.execute("query-migrate", None).await.map_err(|e| qmp_error(domain, e))?;
        match info.get("status").and_then(Value::as_str) {
            Some(s) if s == wanted => return Ok(()),
            Some("cancelled") => return Err(canceled_by_client()),
            Some("failed") => {
                let why = info.get("error-desc").and_then(Value::as_str).unwrap_or("unknown reason");
                return Err(Error::operation_failed(format!("migration failed: {why}")));
            }
            _ => {}
        }
        if let Some(limit) = suspend_after.filter(|_| !suspended) {
            if start.elapsed() >= Duration::from_secs(limit) {
                client.execute("stop", None).await.map_err(|e| qmp_error(domain, e))?;
                suspended = true;
            }
        }
        if start.elapsed() >= Duration::from_secs(3600) {
            return Err(Error::new(ErrorKind::OperationTimeout, "the migration took over an hour"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
