//! The commands that move a running domain's state, with virsh's syntax
//! and messages: `save`, `restore`, `save-image-dumpxml`, `managedsave`,
//! `managedsave-remove`, `migrate`, and `domjobinfo`/`domjobabort` for
//! the save or migration in progress.

use std::fmt::Write as _;
use std::io::Write as _;
use std::time::Duration;

use anyhow::{anyhow, Result};
use clap::{Args, Subcommand};
use serde_json::json;
use strata_core::driver::{
    Connection, DomainJobInfo, MigrateFlags, MigrateOptions, SaveFlags, SaveMigrateOps, SaveOptions,
};

use crate::shared::{binary_units, read_document};
use crate::virsh_args::BY_POSITION;

#[derive(Subcommand, Debug)]
// Options added when the command is parsed: see `commands::Command`.
#[command(defer = true)]
pub enum SaveCommand {
    /// Save a running domain's state to a file or block device and stop it.
    Save(SaveArgs),
    /// Start a domain from a saved state file.
    Restore(RestoreArgs),
    /// Print the domain XML a saved state file holds.
    #[command(name = "save-image-dumpxml")]
    SaveImageDumpxml(ImageArgs),
    /// Save a running domain's state for its next start to resume from.
    Managedsave(ManagedSaveArgs),
    /// Remove a domain's managed save image.
    #[command(name = "managedsave-remove")]
    ManagedsaveRemove(DomainArgs),
    /// Print the progress of a domain's running save or migration.
    Domjobinfo(JobInfoArgs),
    /// Cancel a domain's running save or migration; the domain keeps running.
    Domjobabort(DomainArgs),
    /// Move a running domain to another connection.
    Migrate(MigrateArgs),
}

impl SaveCommand {
    /// The domain the command names, for virsh's "failed to get domain".
    pub fn domain(&self) -> Option<&str> {
        match self {
            SaveCommand::Save(a) => Some(&a.domain),
            SaveCommand::Managedsave(a) => Some(&a.domain),
            SaveCommand::ManagedsaveRemove(a) | SaveCommand::Domjobabort(a) => Some(&a.domain),
            SaveCommand::Domjobinfo(a) => Some(&a.domain),
            SaveCommand::Migrate(a) => Some(&a.domain),
            SaveCommand::Restore(_) | SaveCommand::SaveImageDumpxml(_) => None,
        }
    }
}

/// How the domain is left when restored.
#[derive(Args, Debug, Clone, Copy)]
pub struct RestoredState {
    /// Restore it running, whatever it was when saved.
    #[arg(long, conflicts_with = "paused")]
    running: bool,
    /// Restore it paused.
    #[arg(long)]
    paused: bool,
}

#[derive(Args, Debug)]
pub struct SaveArgs {
    /// Domain name.
    #[arg(long, value_name = "DOMAIN", help_heading = BY_POSITION)]
    domain: String,
    /// Where to save: a regular file (written beside it and renamed into
    /// place when complete) or a block device (written in place).
    #[arg(long, value_name = "FILE", help_heading = BY_POSITION)]
    file: String,
    /// Keep the saved state out of the host's page cache.
    #[arg(long = "bypass-cache")]
    bypass_cache: bool,
    /// A domain XML file to record in the image instead (same name and UUID).
    #[arg(long, value_name = "FILE")]
    xml: Option<String>,
    #[command(flatten)]
    state: RestoredState,
    /// Print the save's progress.
    #[arg(long)]
    verbose: bool,
    /// Cap the transfer at this many MiB/s (Strata's own; default: none).
    #[arg(long, value_name = "MiB")]
    bandwidth: Option<u64>,
    /// Take an external disk-only snapshot of the domain's disk set at the
    /// instant the memory is saved (seed 004).
    #[arg(long = "disk-set")]
    disk_set: bool,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// The saved state file or block device.
    #[arg(long, value_name = "FILE", help_heading = BY_POSITION)]
    file: String,
    /// Accepted; the image is read once.
    #[arg(long = "bypass-cache")]
    _bypass_cache: bool,
    /// A domain XML file to restore the domain with instead of the image's
    /// (same name and UUID).
    #[arg(long, value_name = "FILE")]
    xml: Option<String>,
    #[command(flatten)]
    state: RestoredState,
}

#[derive(Args, Debug)]
pub struct ImageArgs {
    /// The saved state file or block device.
    #[arg(long, value_name = "FILE", help_heading = BY_POSITION)]
    file: String,
    /// Accepted; changes nothing.
    #[arg(long = "security-info")]
    _security_info: bool,
}

#[derive(Args, Debug)]
pub struct ManagedSaveArgs {
    /// Domain name.
    #[arg(long, value_name = "DOMAIN", help_heading = BY_POSITION)]
    domain: String,
    /// Keep the saved state out of the host's page cache.
    #[arg(long = "bypass-cache")]
    bypass_cache: bool,
    #[command(flatten)]
    state: RestoredState,
    /// Print the save's progress.
    #[arg(long)]
    verbose: bool,
}

#[derive(Args, Debug)]
pub struct DomainArgs {
    /// Domain name.
    #[arg(long, value_name = "DOMAIN", help_heading = BY_POSITION)]
    domain: String,
}

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// Domain name.
    #[arg(long, value_name = "DOMAIN", help_heading = BY_POSITION)]
    domain: String,
    /// The destination connection's URI: a Strata connection of the same
    /// driver on this machine, or on another host through a remote
    /// transport (qemu+ext://ADDRESS/embed?root=DIR&command=CMD).
    #[arg(long, value_name = "URI", help_heading = BY_POSITION)]
    desturi: String,
    /// Migrate while the guest runs (otherwise it is paused for the move).
    #[arg(long)]
    live: bool,
    /// Copy the disks of the domain's disk set; the others must be on
    /// storage shared with the destination (seed 004).
    #[arg(long = "copy-storage-disk-set", conflicts_with_all = ["copy_storage_all", "copy_storage_inc"])]
    copy_storage_disk_set: bool,
    /// Copy every disk.
    #[arg(long = "copy-storage-all", conflicts_with = "copy_storage_inc")]
    copy_storage_all: bool,
    /// Copy every disk's top image, the destination sharing the rest.
    #[arg(long = "copy-storage-inc")]
    copy_storage_inc: bool,
    /// Define the domain at the destination.
    #[arg(long)]
    persistent: bool,
    /// Undefine the domain at the source once it runs at the destination.
    #[arg(long)]
    undefinesource: bool,
    /// Cap the transfer at this many MiB/s.
    #[arg(long, value_name = "MiB")]
    bandwidth: Option<u64>,
    /// Print the migration's progress.
    #[arg(long)]
    verbose: bool,
    /// Pause the guest after this many seconds of live migration.
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<u64>,
    /// Where the destination receives the memory stream: tcp:HOST[:PORT]
    /// (default: the destination URI's host, a free port).
    #[arg(long, value_name = "URI")]
    migrateuri: Option<String>,
    /// Where the destination serves the copied disks: tcp:HOST[:PORT]
    /// (default: the memory stream's host, a free port).
    #[arg(long = "disks-uri", value_name = "URI")]
    disks_uri: Option<String>,
    /// Abort the migration on an I/O error (Strata always does).
    #[arg(long = "abort-on-error")]
    abort_on_error: bool,
}

#[derive(Args, Debug)]
pub struct JobInfoArgs {
    /// Domain name.
    #[arg(long, value_name = "DOMAIN", help_heading = BY_POSITION)]
    domain: String,
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

pub async fn run(conn: &dyn Connection, cmd: SaveCommand, global_json: bool) -> Result<String> {
    let ops = conn.require_save_migrate()?;
    let mut out = String::new();
    match cmd {
        SaveCommand::Save(a) => {
            let flags = save_flags(a.bypass_cache, a.state, a.disk_set);
            let xml = a.xml.as_deref().map(read_document).transpose()?;
            let opts = SaveOptions { xml, bandwidth_mib: a.bandwidth, flags };
            let saved = with_progress(ops, &a.domain, "Save", a.verbose, ops.save(&a.domain, &a.file, &opts));
            saved
                .await
                .map_err(|e| anyhow!(e).context(format!("Failed to save domain '{}' to {}", a.domain, a.file)))?;
            writeln!(out, "\nDomain '{}' saved to {}\n", a.domain, a.file)?;
        }
        SaveCommand::Restore(a) => {
            let flags = save_flags(false, a.state, false);
            let xml = a.xml.as_deref().map(read_document).transpose()?;
            ops.restore(&a.file, xml.as_deref(), flags)
                .await
                .map_err(|e| anyhow!(e).context(format!("Failed to restore domain from {}", a.file)))?;
            writeln!(out, "Domain restored from {}\n", a.file)?;
        }
        SaveCommand::SaveImageDumpxml(a) => out = ops.save_image_xml(&a.file).await?,
        SaveCommand::Managedsave(a) => {
            let opts = SaveOptions { flags: save_flags(a.bypass_cache, a.state, false), ..Default::default() };
            let saved = with_progress(ops, &a.domain, "Managedsave", a.verbose, ops.managed_save(&a.domain, &opts));
            saved.await.map_err(|e| anyhow!(e).context(format!("Failed to save domain '{}' state", a.domain)))?;
            writeln!(out, "\nDomain '{}' state saved by Strata\n", a.domain)?;
        }
        SaveCommand::ManagedsaveRemove(a) => {
            if conn.domain_info(&a.domain).await?.managed_save {
                ops.managed_save_remove(&a.domain).await?;
                writeln!(out, "Removed managedsave image for domain '{}'", a.domain)?;
            } else {
                writeln!(out, "Domain '{}' has no manage save image; removal skipped", a.domain)?;
            }
        }
        SaveCommand::Domjobinfo(a) => {
            let info = ops.job_info(&a.domain).await?;
            if a.json || global_json {
                writeln!(out, "{}", serde_json::to_string_pretty(&json!({ "job": info }))?)?;
            } else {
                out = job_info_text(info.as_ref());
            }
        }
        SaveCommand::Domjobabort(a) => ops.job_abort(&a.domain).await?,
        SaveCommand::Migrate(a) => {
            let flags = MigrateFlags {
                live: a.live,
                persist_dest: a.persistent,
                undefine_source: a.undefinesource,
                copy_storage_all: a.copy_storage_all,
                copy_storage_inc: a.copy_storage_inc,
                abort_on_error: a.abort_on_error,
                copy_storage_disk_set: a.copy_storage_disk_set,
            };
            let opts = MigrateOptions {
                bandwidth_mib: a.bandwidth,
                timeout_s: a.timeout,
                migrate_uri: a.migrateuri,
                disks_uri: a.disks_uri,
                flags,
            };
            let migrated =
                with_progress(ops, &a.domain, "Migration", a.verbose, ops.migrate(&a.domain, &a.desturi, &opts));
            migrated.await.map_err(|e| anyhow!(e).context(format!("Failed to migrate domain '{}'", a.domain)))?;
        }
    }
    Ok(out)
}

fn save_flags(bypass_cache: bool, state: RestoredState, disk_set: bool) -> SaveFlags {
    SaveFlags { bypass_cache, running: state.running, paused: state.paused, disk_set }
}

/// Runs `job`; with `verbose`, prints virsh's `Save: [ NN %]` from the
/// domain's job while it runs (virsh's `label`), and `[100 %]` once done.
async fn with_progress<T>(
    ops: &dyn SaveMigrateOps,
    domain: &str,
    label: &str,
    verbose: bool,
    job: impl std::future::Future<Output = strata_core::Result<T>>,
) -> strata_core::Result<T> {
    if !verbose {
        return job.await;
    }
    tokio::pin!(job);
    let outcome = loop {
        tokio::select! {
            outcome = &mut job => break outcome,
            () = tokio::time::sleep(Duration::from_millis(500)) => {
                if let Ok(Some(info)) = ops.job_info(domain).await {
                    let done = (info.data_processed * 100).checked_div(info.data_total).unwrap_or(0).min(99);
                    eprint!("\r{label}: [{done:3} %]");
                    let _ = std::io::stderr().flush();
                }
            }
        }
    };
    if outcome.is_ok() {
        eprintln!("\r{label}: [100 %]");
    }
    outcome
}

/// virsh's `domjobinfo` layout: labels in 17 columns.
fn job_info_text(info: Option<&DomainJobInfo>) -> String {
    let Some(info) = info else { return format!("{:<17} {:<12}\n\n", "Job type:", "None") };
    let size = |bytes: u64| {
        let (value, unit) = binary_units(bytes);
        format!("{value:.3} {unit}")
    };
    let mut out = String::new();
    let mut line = |label: &str, value: String| out.push_str(&format!("{label:<17} {value}\n"));
    line("Job type:", "Unbounded".into());
    line("Operation:", info.operation.as_virsh().into());
    line("Time elapsed:", format!("{:<12} ms", info.elapsed_ms));
    line("Data processed:", size(info.data_processed));
    line("Data remaining:", size(info.data_remaining));
    line("Data total:", size(info.data_total));
    line("Memory bandwidth:", format!("{}/s", size(info.memory_bandwidth)));
    if let Some(disks) = info.disks {
        line("File processed:", size(disks.processed));
        line("File remaining:", size(disks.remaining));
        line("File total:", size(disks.total));
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use strata_core::driver::{DiskCopyProgress, DomainJobOperation};

    use super::*;

    #[test]
    fn job_info_has_virsh_layout() {
        let info = DomainJobInfo {
            operation: DomainJobOperation::Save,
            elapsed_ms: 1500,
            data_processed: 3 << 20,
            data_remaining: 1 << 19,
            data_total: 128 << 20,
            memory_bandwidth: 1 << 20,
            disks: None,
        };
        assert_eq!(
            job_info_text(Some(&info)),
            "Job type:         Unbounded\n\
             Operation:        Save\n\
             Time elapsed:     1500         ms\n\
             Data processed:   3.000 MiB\n\
             Data remaining:   512.000 KiB\n\
             Data total:       128.000 MiB\n\
             Memory bandwidth: 1.000 MiB/s\n\n"
        );
        assert_eq!(job_info_text(None), "Job type:         None        \n\n");

        // A migration copying disks: data counts memory and disks, the
        // disks alone are virsh's File lines.
        let disks = DiskCopyProgress { processed: 1 << 20, remaining: 3 << 20, total: 4 << 20 };
        let migration = DomainJobInfo {
            operation: DomainJobOperation::MigrationOut,
            data_processed: 1 << 20,
            data_remaining: 3 << 20,
            data_total: 4 << 20,
            memory_bandwidth: 0,
            disks: Some(disks),
            ..info
        };
        assert!(job_info_text(Some(&migration)).ends_with(
            "Memory bandwidth: 0.000 B/s\n\
             File processed:   1.000 MiB\n\
             File remaining:   3.000 MiB\n\
             File total:       4.000 MiB\n\n"
        ));
    }
}
