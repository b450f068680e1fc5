//! The storage pool and volume commands, with virsh's syntax, tables and
//! `key: value` listings.
//!
//! As in virsh, the options that name a command's pool, volume, file or
//! size are declared under [`BY_POSITION`], in virsh's order, so each may
//! be given by name or by position (see [`crate::virsh_args`]):
//! `pool-define-as p dir - - - - /srv/p` is `--target /srv/p`, and a `-`
//! leaves a source option empty, as in virsh.

use std::fmt::Write as _;

use anyhow::{anyhow, Context, Result};
use clap::{Args, Subcommand};
use strata_core::driver::{PoolBuildFlags, PoolInfo, PoolState, StoragePoolOps, VolumeInfo, VolumeResizeFlags};
use strata_core::pool::{parse_scaled, pool_xml_from_parts};
use strata_core::xml::Element;
use strata_core::ErrorKind;

use crate::shared::{binary_units, read_document};
use crate::table::{format_fields, format_table};
use crate::virsh_args::BY_POSITION;

#[derive(Subcommand, Debug)]
// Options added when the command is parsed: see `commands::Command`.
#[command(defer = true)]
pub enum PoolCommand {
    /// Define a pool from a set of args.
    #[command(name = "pool-define-as")]
    PoolDefineAs(DefineAsArgs),
    /// Define (but do not start) a pool from an XML file.
    #[command(name = "pool-define")]
    PoolDefine(FileArgs),
    /// Build a pool: its directory, and with a flag an fs pool's filesystem.
    #[command(name = "pool-build")]
    PoolBuild(BuildArgs),
    /// Start a (previously defined) inactive pool.
    #[command(name = "pool-start")]
    PoolStart(StartArgs),
    /// Destroy (stop) a pool; the data in it is untouched.
    #[command(name = "pool-destroy")]
    PoolDestroy(PoolArgs),
    /// Undefine an inactive pool.
    #[command(name = "pool-undefine")]
    PoolUndefine(PoolArgs),
    /// Refresh a pool.
    #[command(name = "pool-refresh")]
    PoolRefresh(PoolArgs),
    /// List pools.
    #[command(name = "pool-list")]
    PoolList(PoolListArgs),
    /// Storage pool information.
    #[command(name = "pool-info")]
    PoolInfo(PoolInfoArgs),
    /// Pool information in XML.
    #[command(name = "pool-dumpxml")]
    PoolDumpxml(PoolDumpxmlArgs),
    /// Autostart a pool.
    #[command(name = "pool-autostart")]
    PoolAutostart(AutostartArgs),
    /// List volumes of a pool.
    #[command(name = "vol-list")]
    VolList(VolListArgs),
    /// Storage volume information.
    #[command(name = "vol-info")]
    VolInfo(VolInfoArgs),
    /// Volume information in XML, with the whole backing chain.
    #[command(name = "vol-dumpxml")]
    VolDumpxml(VolArgs),
    /// Create a volume from a set of args.
    #[command(name = "vol-create-as")]
    VolCreateAs(CreateAsArgs),
    /// Create a volume from an XML file.
    #[command(name = "vol-create")]
    VolCreate(VolCreateArgs),
    /// Delete a volume.
    #[command(name = "vol-delete")]
    VolDelete(VolArgs),
    /// Return the path of a volume.
    #[command(name = "vol-path")]
    VolPath(VolArgs),
    /// Resize a volume.
    #[command(name = "vol-resize")]
    VolResize(ResizeArgs),
    /// Clone a volume.
    #[command(name = "vol-clone")]
    VolClone(CloneArgs),
}

/// `pool-define-as NAME TYPE [SOURCE-HOST] [SOURCE-PATH] [SOURCE-DEV] [SOURCE-NAME] [TARGET]`.
#[derive(Args, Debug)]
pub struct DefineAsArgs {
    /// Name of the pool.
    #[arg(long, value_name = "NAME", help_heading = BY_POSITION)]
    name: String,
    /// Type of the pool: dir or fs.
    #[arg(long = "type", value_name = "TYPE", help_heading = BY_POSITION)]
    pool_type: String,
    /// Accepted as virsh does; no pool type Strata has uses a source host.
    #[arg(long = "source-host", value_name = "HOST", help_heading = BY_POSITION)]
    _source_host: Option<String>,
    /// Accepted as virsh does; no pool type Strata has uses a source path.
    #[arg(long = "source-path", value_name = "PATH", help_heading = BY_POSITION)]
    _source_path: Option<String>,
    /// The device of an fs pool ('-' for none).
    #[arg(long = "source-dev", value_name = "DEVICE", help_heading = BY_POSITION)]
    source_dev: Option<String>,
    /// Accepted as virsh does; no pool type Strata has uses a source name.
    #[arg(long = "source-name", value_name = "NAME", help_heading = BY_POSITION)]
    _source_name: Option<String>,
    /// The directory holding the volumes, an fs pool's mount point ('-' for none).
    #[arg(long, value_name = "DIR", help_heading = BY_POSITION)]
    target: Option<String>,
    /// An fs pool's filesystem type (ext4, xfs, …, auto).
    #[arg(long = "source-format")]
    source_format: Option<String>,
    /// Print the XML instead of defining the pool.
    #[arg(long = "print-xml")]
    print_xml: bool,
}

/// `pool-define FILE`.
#[derive(Args, Debug)]
pub struct FileArgs {
    /// A <pool> XML file.
    #[arg(long, value_name = "FILE", help_heading = BY_POSITION)]
    file: String,
}

/// The pool a command acts on.
#[derive(Args, Debug)]
pub struct PoolArgs {
    /// Pool name.
    #[arg(long, value_name = "POOL", help_heading = BY_POSITION)]
    pool: String,
}

#[derive(Args, Debug)]
pub struct BuildArgs {
    #[command(flatten)]
    pool: PoolArgs,
    /// Make the fs pool's filesystem, replacing any on the device.
    #[arg(long)]
    overwrite: bool,
    /// Make the fs pool's filesystem only if the device holds none.
    #[arg(long = "no-overwrite")]
    no_overwrite: bool,
}

#[derive(Args, Debug)]
pub struct StartArgs {
    #[command(flatten)]
    build: BuildArgs,
    /// Build the pool first.
    #[arg(long = "build")]
    build_first: bool,
}

#[derive(Args, Debug)]
pub struct PoolListArgs {
    /// List inactive and active pools.
    #[arg(long)]
    all: bool,
    /// List inactive pools only.
    #[arg(long)]
    inactive: bool,
    /// Only persistent pools (every pool Strata defines is).
    #[arg(long)]
    persistent: bool,
    /// Only transient pools (Strata has none).
    #[arg(long)]
    transient: bool,
    /// Only pools marked to start at boot.
    #[arg(long)]
    autostart: bool,
    /// Only pools not marked to start at boot.
    #[arg(long = "no-autostart")]
    no_autostart: bool,
    /// Only pools of these types (comma-separated).
    #[arg(long = "type", value_name = "TYPES")]
    pool_type: Option<String>,
    /// Also show each pool's persistence and sizes.
    #[arg(long)]
    details: bool,
    /// List pool names only.
    #[arg(long)]
    name: bool,
    /// List pool UUIDs only.
    #[arg(long)]
    uuid: bool,
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct PoolInfoArgs {
    #[command(flatten)]
    pool: PoolArgs,
    /// Sizes in bytes.
    #[arg(long)]
    bytes: bool,
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct PoolDumpxmlArgs {
    #[command(flatten)]
    pool: PoolArgs,
    /// The definition without the sizes of the running pool.
    #[arg(long)]
    inactive: bool,
}

#[derive(Args, Debug)]
pub struct AutostartArgs {
    #[command(flatten)]
    pool: PoolArgs,
    /// Unmark the pool: it no longer starts at boot.
    #[arg(long)]
    disable: bool,
}

#[derive(Args, Debug)]
pub struct VolListArgs {
    #[command(flatten)]
    pool: PoolArgs,
    /// Also show each volume's type and sizes.
    #[arg(long)]
    details: bool,
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

/// A volume: its name with `--pool`, or its path.
#[derive(Args, Debug)]
pub struct VolArgs {
    /// Volume name (with --pool) or path.
    #[arg(long, value_name = "VOL", help_heading = BY_POSITION)]
    vol: String,
    /// The pool holding the volume named by --vol.
    #[arg(long, value_name = "POOL", help_heading = BY_POSITION)]
    pool: Option<String>,
}

#[derive(Args, Debug)]
pub struct VolInfoArgs {
    #[command(flatten)]
    vol: VolArgs,
    /// Sizes in bytes.
    #[arg(long)]
    bytes: bool,
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

/// `vol-create-as POOL NAME CAPACITY`.
#[derive(Args, Debug)]
pub struct CreateAsArgs {
    /// The pool to create the volume in.
    #[arg(long, value_name = "POOL", help_heading = BY_POSITION)]
    pool: String,
    /// Name of the volume.
    #[arg(long, value_name = "NAME", help_heading = BY_POSITION)]
    name: String,
    /// Size with an optional unit (64M, 1GiB, …).
    #[arg(long, value_name = "SIZE", help_heading = BY_POSITION)]
    capacity: String,
    /// Accepted as virsh does; images are created sparse.
    #[arg(long, value_name = "SIZE")]
    allocation: Option<String>,
    /// raw (the default), qcow2, …
    #[arg(long, value_name = "FORMAT")]
    format: Option<String>,
    /// The backing volume: a name in the pool, or a path.
    #[arg(long = "backing-vol", value_name = "VOL")]
    backing_vol: Option<String>,
    /// The backing volume's format (raw, qcow2, …).
    #[arg(long = "backing-vol-format", value_name = "FORMAT")]
    backing_vol_format: Option<String>,
    /// Accepted as virsh does; qemu-img writes the metadata anyway.
    #[arg(long = "prealloc-metadata")]
    prealloc_metadata: bool,
    /// Print the XML instead of creating the volume.
    #[arg(long = "print-xml")]
    print_xml: bool,
}

/// `vol-create POOL FILE`.
#[derive(Args, Debug)]
pub struct VolCreateArgs {
    /// The pool to create the volume in.
    #[arg(long, value_name = "POOL", help_heading = BY_POSITION)]
    pool: String,
    /// A <volume> XML file.
    #[arg(long, value_name = "FILE", help_heading = BY_POSITION)]
    file: String,
}

/// `vol-resize VOL CAPACITY [POOL]`.
#[derive(Args, Debug)]
pub struct ResizeArgs {
    /// Volume name (with --pool) or path.
    #[arg(long, value_name = "VOL", help_heading = BY_POSITION)]
    vol: String,
    /// The new size, with an optional unit (64M, 1GiB, …).
    #[arg(long, value_name = "SIZE", help_heading = BY_POSITION)]
    capacity: String,
    /// The pool holding the volume named by --vol.
    #[arg(long, value_name = "POOL", help_heading = BY_POSITION)]
    pool: Option<String>,
    /// Add the capacity to the current one.
    #[arg(long)]
    delta: bool,
    /// Allow the volume to become smaller.
    #[arg(long)]
    shrink: bool,
    /// Accepted as virsh does; images stay sparse.
    #[arg(long)]
    allocate: bool,
}

/// `vol-clone VOL NEWNAME [POOL]`.
#[derive(Args, Debug)]
pub struct CloneArgs {
    /// Volume name (with --pool) or path.
    #[arg(long, value_name = "VOL", help_heading = BY_POSITION)]
    vol: String,
    /// Name of the clone.
    #[arg(long, value_name = "NAME", help_heading = BY_POSITION)]
    newname: String,
    /// The pool holding the volume named by --vol.
    #[arg(long, value_name = "POOL", help_heading = BY_POSITION)]
    pool: Option<String>,
}

/// An unknown pool or volume as virsh reports it: `failed to get pool 'p'`
/// and then libvirt's error; other failures under `context`, if any.
fn lookup_error(
    e: strata_core::Error,
    pool: Option<&str>,
    vol: Option<&str>,
    context: Option<String>,
) -> anyhow::Error {
    let lookup = match (e.kind(), pool, vol) {
        (ErrorKind::NoStoragePool, Some(p), _) => Some(format!("failed to get pool '{p}'")),
        (ErrorKind::NoStorageVol, _, Some(v)) => Some(format!("failed to get vol '{v}'")),
        _ => context,
    };
    match lookup {
        Some(line) => anyhow!(e).context(line),
        None => anyhow!(e),
    }
}

/// virsh's size with a binary unit: `64.00 MiB`.
fn pretty_size(bytes: u64) -> String {
    let (value, unit) = binary_units(bytes);
    format!("{value:.2} {unit}")
}

fn size_text(bytes: u64, exact: bool) -> String {
    if exact {
        format!("{bytes} bytes")
    } else {
        pretty_size(bytes)
    }
}

pub(crate) fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

fn running(info: &PoolInfo) -> bool {
    info.state == PoolState::Running
}

/// The commands that name a pool and nothing else.
enum PoolChange {
    Destroy,
    Undefine,
    Refresh,
}

async fn change_pool(pools: &dyn StoragePoolOps, a: PoolArgs, change: PoolChange) -> Result<String> {
    let (verb, done) = match change {
        PoolChange::Destroy => ("destroy", "destroyed"),
        PoolChange::Undefine => ("undefine", "has been undefined"),
        PoolChange::Refresh => ("refresh", "refreshed"),
    };
    let name = a.pool;
    let result = match change {
        PoolChange::Destroy => pools.pool_destroy(&name).await,
        PoolChange::Undefine => pools.pool_undefine(&name).await,
        PoolChange::Refresh => pools.pool_refresh(&name).await,
    };
    result.map_err(|e| lookup_error(e, Some(&name), None, Some(format!("Failed to {verb} pool {name}"))))?;
    Ok(format!("Pool {name} {done}\n\n"))
}

/// Runs one pool or volume command; returns what it prints.
pub async fn run(pools: &dyn StoragePoolOps, cmd: PoolCommand, global_json: bool, quiet: bool) -> Result<String> {
    let mut out = String::new();
    match cmd {
        PoolCommand::PoolDefineAs(a) => {
            let DefineAsArgs { name, pool_type, source_dev, target, .. } = &a;
            // As in virsh, `-` (given by position to reach a later option)
            // leaves an option empty.
            fn given(v: &Option<String>) -> Option<&str> {
                v.as_deref().filter(|s| *s != "-")
            }
            let xml =
                pool_xml_from_parts(name, pool_type, given(source_dev), a.source_format.as_deref(), given(target));
            if a.print_xml {
                out.push_str(&xml);
            } else {
                pools
                    .pool_define_xml(&xml)
                    .await
                    .map_err(|e| anyhow!(e).context(format!("Failed to define pool {name}")))?;
                writeln!(out, "Pool {name} defined\n")?;
            }
        }
        PoolCommand::PoolDefine(a) => {
            let file = a.file;
            let xml = read_document(&file)?;
            let name = pools
                .pool_define_xml(&xml)
                .await
                .map_err(|e| anyhow!(e).context(format!("Failed to define pool from {file}")))?;
            writeln!(out, "Pool {name} defined from {file}\n")?;
        }
        PoolCommand::PoolBuild(a) => {
            let flags = PoolBuildFlags { overwrite: a.overwrite, no_overwrite: a.no_overwrite };
            let name = a.pool.pool;
            pools
                .pool_build(&name, flags)
                .await
                .map_err(|e| lookup_error(e, Some(&name), None, Some(format!("Failed to build pool {name}"))))?;
            writeln!(out, "Pool {name} built\n")?;
        }
        PoolCommand::PoolStart(a) => {
            let flags = PoolBuildFlags { overwrite: a.build.overwrite, no_overwrite: a.build.no_overwrite };
            let build = a.build_first || flags.overwrite || flags.no_overwrite;
            let name = a.build.pool.pool;
            let context = || format!("Failed to start pool {name}");
            if build {
                pools
                    .pool_build(&name, flags)
                    .await
                    .map_err(|e| lookup_error(e, Some(&name), None, Some(context())))?;
            }
            pools.pool_start(&name).await.map_err(|e| lookup_error(e, Some(&name), None, Some(context())))?;
            writeln!(out, "Pool {name} started\n")?;
        }
        PoolCommand::PoolDestroy(a) => out = change_pool(pools, a, PoolChange::Destroy).await?,
        PoolCommand::PoolUndefine(a) => out = change_pool(pools, a, PoolChange::Undefine).await?,
        PoolCommand::PoolRefresh(a) => out = change_pool(pools, a, PoolChange::Refresh).await?,
        PoolCommand::PoolList(a) => {
            let shown: Vec<PoolInfo> = pools
                .pool_list()
                .await?
                .into_iter()
                .filter(|p| if a.inactive { !running(p) } else { a.all || running(p) })
                .filter(|p| {
                    !(a.persistent || a.transient) || (a.persistent && p.persistent) || (a.transient && !p.persistent)
                })
                .filter(|p| {
                    !(a.autostart || a.no_autostart) || (a.autostart && p.autostart) || (a.no_autostart && !p.autostart)
                })
                .filter(|p| {
                    a.pool_type.as_deref().is_none_or(|types| types.split(',').any(|t| t.trim() == p.pool_type))
                })
                .collect();
            if a.json || global_json {
                writeln!(out, "{}", serde_json::to_string_pretty(&shown)?)?;
            } else if a.name || a.uuid {
                for p in &shown {
                    writeln!(out, "{}", if a.uuid { &p.uuid } else { &p.name })?;
                }
                out.push('\n');
            } else if a.details {
                let size = |s: Option<u64>| s.map_or_else(|| "-".to_string(), pretty_size);
                let rows: Vec<Vec<String>> = shown
                    .iter()
                    .map(|p| {
                        vec![
                            p.name.clone(),
                            if running(p) { "running" } else { "inactive" }.to_string(),
                            yes_no(p.autostart),
                            yes_no(p.persistent),
                            size(p.capacity),
                            size(p.allocation),
                            size(p.available),
                        ]
                    })
                    .collect();
                let header = ["Name", "State", "Autostart", "Persistent", "Capacity", "Allocation", "Available"];
                out.push_str(&format_table(&header, &rows, quiet));
                out.push('\n');
            } else {
                let rows: Vec<Vec<String>> = shown
                    .iter()
                    .map(|p| {
                        vec![
                            p.name.clone(),
                            if running(p) { "active" } else { "inactive" }.to_string(),
                            yes_no(p.autostart),
                        ]
                    })
                    .collect();
                out.push_str(&format_table(&["Name", "State", "Autostart"], &rows, quiet));
                out.push('\n');
            }
        }
        PoolCommand::PoolInfo(a) => {
            let name = a.pool.pool;
            let info = pools.pool_info(&name).await.map_err(|e| lookup_error(e, Some(&name), None, None))?;
            if a.json || global_json {
                writeln!(out, "{}", serde_json::to_string_pretty(&info)?)?;
            } else {
                let mut rows = vec![
                    ("Name", info.name.clone()),
                    ("UUID", info.uuid.clone()),
                    ("State", if running(&info) { "running" } else { "inactive" }.to_string()),
                    ("Persistent", yes_no(info.persistent)),
                    ("Autostart", yes_no(info.autostart)),
                ];
                for (key, value) in
                    [("Capacity", info.capacity), ("Allocation", info.allocation), ("Available", info.available)]
                {
                    if let Some(v) = value {
                        rows.push((key, size_text(v, a.bytes)));
                    }
                }
                out.push_str(&format_fields(&rows));
            }
        }
        PoolCommand::PoolDumpxml(a) => {
            let name = a.pool.pool;
            let xml = pools.pool_xml(&name, a.inactive).await.map_err(|e| lookup_error(e, Some(&name), None, None))?;
            out.push_str(&xml);
        }
        PoolCommand::PoolAutostart(a) => {
            let name = a.pool.pool;
            let word = if a.disable { "unmark" } else { "mark" };
            pools.pool_set_autostart(&name, !a.disable).await.map_err(|e| {
                lookup_error(e, Some(&name), None, Some(format!("failed to {word} pool {name} as autostarted")))
            })?;
            writeln!(out, "Pool {name} {word}ed as autostarted\n")?;
        }
        PoolCommand::VolList(a) => {
            let name = a.pool.pool;
            let vols = pools.vol_list(&name).await.map_err(|e| lookup_error(e, Some(&name), None, None))?;
            if a.json || global_json {
                writeln!(out, "{}", serde_json::to_string_pretty(&vols)?)?;
            } else if a.details {
                let rows: Vec<Vec<String>> = vols
                    .iter()
                    .map(|v| {
                        vec![
                            v.name.clone(),
                            v.path.clone(),
                            v.volume_type.clone(),
                            pretty_size(v.capacity),
                            pretty_size(v.allocation),
                        ]
                    })
                    .collect();
                out.push_str(&format_table(&["Name", "Path", "Type", "Capacity", "Allocation"], &rows, quiet));
                out.push('\n');
            } else {
                let rows: Vec<Vec<String>> = vols.iter().map(|v| vec![v.name.clone(), v.path.clone()]).collect();
                out.push_str(&format_table(&["Name", "Path"], &rows, quiet));
                out.push('\n');
            }
        }
        PoolCommand::VolInfo(a) => {
            let VolArgs { vol, pool } = a.vol;
            let info: VolumeInfo = pools
                .vol_info(pool.as_deref(), &vol)
                .await
                .map_err(|e| lookup_error(e, pool.as_deref(), Some(&vol), None))?;
            if a.json || global_json {
                writeln!(out, "{}", serde_json::to_string_pretty(&info)?)?;
            } else {
                out.push_str(&format_fields(&[
                    ("Name", info.name.clone()),
                    ("Type", info.volume_type.clone()),
                    ("Capacity", size_text(info.capacity, a.bytes)),
                    ("Allocation", size_text(info.allocation, a.bytes)),
                ]));
            }
        }
        PoolCommand::VolDumpxml(a) => {
            let VolArgs { vol, pool } = a;
            let xml = pools
                .vol_xml(pool.as_deref(), &vol)
                .await
                .map_err(|e| lookup_error(e, pool.as_deref(), Some(&vol), None))?;
            out.push_str(&xml);
        }
        PoolCommand::VolCreateAs(a) => {
            let CreateAsArgs { pool, name, capacity, .. } = &a;
            let bytes = parse_scaled(capacity, 1).with_context(|| format!("Malformed size {capacity}"))?;
            let mut vol = Element::new("volume")
                .with_child(Element::new("name").with_text(name.clone()))
                .with_child(Element::new("capacity").with_text(bytes.to_string()));
            if let Some(f) = &a.format {
                vol = vol.with_child(Element::new("target").with_child(Element::new("format").with_attr("type", f)));
            }
            if let Some(backing) = &a.backing_vol {
                // virsh looks the backing volume up in the pool, then by path.
                let found = match pools.vol_info(Some(pool), backing).await {
                    Ok(info) => info,
                    Err(_) => {
                        pools.vol_info(None, backing).await.map_err(|e| lookup_error(e, None, Some(backing), None))?
                    }
                };
                let mut store = Element::new("backingStore").with_child(Element::new("path").with_text(found.path));
                if let Some(f) = &a.backing_vol_format {
                    store = store.with_child(Element::new("format").with_attr("type", f));
                }
                vol = vol.with_child(store);
            }
            let xml = vol.to_xml();
            if a.print_xml {
                out.push_str(&xml);
            } else {
                pools
                    .vol_create_xml(pool, &xml)
                    .await
                    .map_err(|e| lookup_error(e, Some(pool), None, Some(format!("Failed to create vol {name}"))))?;
                writeln!(out, "Vol {name} created\n")?;
            }
        }
        PoolCommand::VolCreate(a) => {
            let VolCreateArgs { pool, file } = a;
            let xml = read_document(&file)?;
            let name = pools
                .vol_create_xml(&pool, &xml)
                .await
                .map_err(|e| lookup_error(e, Some(&pool), None, Some(format!("Failed to create vol from {file}"))))?;
            writeln!(out, "Vol {name} created from {file}\n")?;
        }
        PoolCommand::VolDelete(a) => {
            let VolArgs { vol, pool } = a;
            pools.vol_delete(pool.as_deref(), &vol).await.map_err(|e| {
                lookup_error(e, pool.as_deref(), Some(&vol), Some(format!("Failed to delete vol {vol}")))
            })?;
            writeln!(out, "Vol {vol} deleted\n")?;
        }
        PoolCommand::VolPath(a) => {
            let VolArgs { vol, pool } = a;
            let info = pools
                .vol_info(pool.as_deref(), &vol)
                .await
                .map_err(|e| lookup_error(e, pool.as_deref(), Some(&vol), None))?;
            writeln!(out, "{}\n", info.path)?;
        }
        PoolCommand::VolResize(a) => {
            let ResizeArgs { vol, capacity, pool, .. } = &a;
            let bytes = parse_scaled(capacity, 1).with_context(|| format!("Malformed size {capacity}"))?;
            let flags = VolumeResizeFlags { delta: a.delta, shrink: a.shrink };
            pools.vol_resize(pool.as_deref(), vol, bytes, flags).await.map_err(|e| {
                lookup_error(
                    e,
                    pool.as_deref(),
                    Some(vol),
                    Some(format!("Failed to change size of volume '{vol}' to {capacity}")),
                )
            })?;
            writeln!(out, "Size of volume '{vol}' successfully changed to {capacity}\n")?;
        }
        PoolCommand::VolClone(a) => {
            let CloneArgs { vol, newname: new_name, pool } = a;
            pools.vol_clone(pool.as_deref(), &vol, &new_name).await.map_err(|e| {
                lookup_error(e, pool.as_deref(), Some(&vol), Some(format!("Failed to clone vol from {vol}")))
            })?;
            writeln!(out, "Vol {new_name} cloned from {vol}\n")?;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_as_virsh_prints_them() {
        assert_eq!(pretty_size(0), "0.00 B");
        assert_eq!(pretty_size(64 << 20), "64.00 MiB");
        assert_eq!(pretty_size(1536), "1.50 KiB");
    }
}
