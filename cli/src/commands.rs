//! The commands: parsed with clap, run against a connection, printed.
//! This is the clap root and the dispatch, on top of the crate's modules:
//! it uses the subcommand modules (`blockjobs`, `snapshots`, `pools`,
//! `help`), and none of them uses it.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use clap::{ArgAction, Args, CommandFactory, Parser, Subcommand};
use serde_json::json;
use strata_core::capabilities::{DriverCapabilities, RevertTo, RevertedGuest};
use strata_core::chain::{Backing, Chain};
use strata_core::driver::{
    Connection, DefineFlags, DiskSetOutcome, DumpXmlFlags, PinScope, StartFlags, UndefineFlags, VcpuCounts,
};
use strata_core::hostcpu::{format_cpulist, parse_cpulist};
use strata_core::ifaddr::{self, AddressSource};
use strata_core::xml::{interface_from_options, Domain};
use strata_core::ErrorKind;

use crate::output;
use crate::shared::{format_timestamp, read_document, CommandFailure};
use crate::table::format_table;
use crate::virsh_args::BY_POSITION;

/// Settings that apply to every command of one invocation.
pub struct Session {
    pub uri: String,
    pub quiet: bool,
    pub json: bool,
    conn: Option<Box<dyn Connection>>,
}

impl Session {
    pub fn new(uri: String, quiet: bool, json: bool) -> Session {
        Session { uri, quiet, json, conn: None }
    }

    /// Opens the connection on first use, so `version` and `help` need none.
    fn conn(&mut self) -> Result<&dyn Connection> {
        if self.conn.is_none() {
            let conn = strata_core::registry::open(&self.uri)
                .map_err(|e| anyhow!(e).context("failed to connect to the hypervisor"))?;
            self.conn = Some(conn);
        }
        self.conn.as_deref().ok_or_else(|| anyhow!("failed to connect to the hypervisor"))
    }
}

#[derive(Parser, Debug)]
#[command(name = "strata", no_binary_name = true, disable_help_subcommand = true)]
pub struct CommandLine {
    #[command(subcommand)]
    pub command: Command,
}

/// A domain, given as `--domain NAME` or by position, as virsh allows.
#[derive(Args, Debug, Clone)]
pub struct DomainArg {
    /// Domain name.
    #[arg(id = "domain", long = "domain", value_name = "DOMAIN", help_heading = BY_POSITION)]
    name: String,
}

impl DomainArg {
    fn name(&self) -> &str {
        &self.name
    }
}

/// virsh's `dumpxml` flags that change nothing in Strata's XML, accepted
/// so that virsh command lines run: Strata records no host CPU model to
/// update, no secret to hide, and nothing a migration would drop.
#[derive(Args, Debug, Clone, Copy)]
pub struct UnchangedXmlFlags {
    /// Accepted; changes nothing.
    #[arg(long = "update-cpu")]
    _update_cpu: bool,
    /// Accepted; changes nothing.
    #[arg(long = "security-info")]
    _security_info: bool,
    /// Accepted; changes nothing.
    #[arg(long = "migratable")]
    _migratable: bool,
}

#[derive(Args, Debug, Clone, Copy)]
pub struct JsonFlag {
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

/// virsh's `--live`, `--config` and `--current` of `vcpupin` and
/// `emulatorpin`.
#[derive(Args, Debug, Clone, Copy)]
pub struct PinScopeFlags {
    /// The running domain.
    #[arg(long)]
    live: bool,
    /// The persistent definition.
    #[arg(long)]
    config: bool,
    /// The running domain when it runs, else the persistent definition
    /// (the default).
    #[arg(long, conflicts_with_all = ["live", "config"])]
    current: bool,
}

/// The one count `vcpucount` prints when given options: the maximum or
/// the current count of the definition `scope` names (`--current`: the
/// live one while the domain runs).
fn selected_vcpu_count(counts: &VcpuCounts, maximum: bool, scope: PinScope) -> Result<u32> {
    let definition = match (scope.config, counts.live) {
        (true, _) => counts.config,
        (false, Some(live)) => live,
        (false, None) if scope.live => {
            return Err(anyhow!(strata_core::Error::operation_invalid("domain is not running")))
        }
        (false, None) => counts.config,
    };
    Ok(if maximum { definition.maximum } else { definition.current })
}

/// virsh's `--persistent`: the running domain and its definition when it
/// runs, else the definition; otherwise the scope the flags give.
async fn modification_scope(
    session: &mut Session,
    name: &str,
    persistent: bool,
    flags: PinScopeFlags,
) -> Result<PinScope> {
    if !persistent {
        return Ok(flags.scope());
    }
    let running = session.conn()?.domain_info(name).await.map_err(|e| lookup_error(e, name))?.summary.id.is_some();
    Ok(PinScope { live: running, config: true })
}

impl PinScopeFlags {
    fn scope(self) -> PinScope {
        PinScope { live: self.live, config: self.config }
    }
}

/// Each command's options are added only when that command is parsed
/// (`defer`): adding every command's took most of what a short command
/// such as `list` spends before it reaches the driver. Code that reads a
/// command's options reads them from `virsh_args::built_subcommand`.
#[derive(Subcommand, Debug)]
#[command(defer = true)]
pub enum Command {
    /// Print the connection URI.
    Uri {
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Print Strata's version.
    Version {
        #[command(flatten)]
        json: JsonFlag,
    },
    /// The host's CPUs, sockets, cores, threads, NUMA cells and memory.
    Nodeinfo {
        #[command(flatten)]
        json: JsonFlag,
    },
    /// The host's CPUs present and online, and the map of online ones
    /// (`y` online, `-` offline or absent).
    Nodecpumap {
        /// Print the online CPUs as a list (`0,2`) rather than a map.
        #[arg(long)]
        pretty: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// What the connected driver supports; with --all, every driver this
    /// strata can open, built in or plugin, without connecting.
    Capabilities {
        /// List every driver (built-in and plugin) with its ABI version and URI schemes.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Define (but do not start) a domain from an XML file.
    Define {
        /// The domain's XML file.
        #[arg(long, value_name = "FILE", help_heading = BY_POSITION)]
        file: String,
        /// Probe every disk's chain even when the XML gives one, and refuse a mismatch.
        #[arg(long)]
        validate: bool,
    },
    /// Undefine a domain.
    Undefine {
        #[command(flatten)]
        domain: DomainArg,
        /// Also remove the domain's snapshot records (their images stay).
        #[arg(long)]
        snapshots_metadata: bool,
        /// Accepted; changes nothing: Strata keeps no managed save image.
        #[arg(long = "managed-save")]
        _managed_save: bool,
        /// Accepted; changes nothing: Strata keeps no checkpoint records.
        #[arg(long = "checkpoints-metadata")]
        _checkpoints_metadata: bool,
    },
    /// List domains.
    List {
        /// List inactive and active domains.
        #[arg(long)]
        all: bool,
        /// List inactive domains only.
        #[arg(long)]
        inactive: bool,
        /// List domain names only.
        #[arg(long)]
        name: bool,
        /// List domain UUIDs only.
        #[arg(long)]
        uuid: bool,
        /// Accepted; changes nothing: the table is the default layout.
        #[arg(long)]
        _table: bool,
        /// Show an inactive domain with a managed save image as `saved`.
        #[arg(long)]
        managed_save: bool,
        /// List domains with a managed save image only.
        #[arg(long, conflicts_with = "without_managed_save")]
        with_managed_save: bool,
        /// List domains without a managed save image only.
        #[arg(long)]
        without_managed_save: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Domain information.
    Dominfo {
        #[command(flatten)]
        domain: DomainArg,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// The running domain's virtual CPUs: where each last ran, its CPU
    /// time, and the host CPUs it may run on (every CPU present, online or
    /// not, is shown).
    Vcpuinfo {
        #[command(flatten)]
        domain: DomainArg,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Show or set which host CPUs a domain's vCPUs may run on.
    Vcpupin {
        #[command(flatten)]
        domain: DomainArg,
        /// The vCPU number (all vCPUs are shown when absent).
        #[arg(long, value_name = "NUMBER", help_heading = BY_POSITION)]
        vcpu: Option<u32>,
        /// Host CPUs to pin the vCPU to (`0,2`, `0-3,^1`); without it the
        /// pinning is shown.
        #[arg(long, value_name = "CPULIST", help_heading = BY_POSITION)]
        cpulist: Option<String>,
        #[command(flatten)]
        scope: PinScopeFlags,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// A domain's vCPU counts: the most it can have and the ones it runs
    /// with, in its persistent definition and while it runs. Without
    /// options, virsh's table; with any, one count.
    Vcpucount {
        #[command(flatten)]
        domain: DomainArg,
        /// The most vCPUs the domain can have.
        #[arg(long, conflicts_with = "active")]
        maximum: bool,
        /// The vCPUs the domain runs with.
        #[arg(long)]
        active: bool,
        #[command(flatten)]
        scope: PinScopeFlags,
        /// The guest agent's count (not supported: Strata talks to no guest agent).
        #[arg(long)]
        guest: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Set a domain's vCPU count: plugged into the running domain
    /// (`--live`), in its persistent definition (`--config`), or the most
    /// it can have (`--maximum`, persistent only).
    Setvcpus {
        #[command(flatten)]
        domain: DomainArg,
        /// The vCPU count.
        #[arg(long, value_name = "COUNT", help_heading = BY_POSITION)]
        count: u32,
        /// Set the most vCPUs the domain can have.
        #[arg(long)]
        maximum: bool,
        #[command(flatten)]
        scope: PinScopeFlags,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Show or set which host CPUs a domain's emulator threads may run on.
    Emulatorpin {
        #[command(flatten)]
        domain: DomainArg,
        /// Host CPUs to pin the emulator threads to; without it the pinning
        /// is shown.
        #[arg(long, value_name = "CPULIST", help_heading = BY_POSITION)]
        cpulist: Option<String>,
        #[command(flatten)]
        scope: PinScopeFlags,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Domain state.
    Domstate {
        #[command(flatten)]
        domain: DomainArg,
        /// Also print the reason for the state.
        #[arg(long)]
        reason: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Domain XML, with each disk's backing chain.
    Dumpxml {
        #[command(flatten)]
        domain: DomainArg,
        /// The persistent definition, even while the domain runs.
        #[arg(long)]
        inactive: bool,
        /// Re-read the image files and record the chains they describe.
        #[arg(long = "refresh-chain")]
        refresh_chain: bool,
        #[command(flatten)]
        unchanged: UnchangedXmlFlags,
    },
    /// List a domain's block devices.
    Domblklist {
        #[command(flatten)]
        domain: DomainArg,
        /// Also show the disk type and device.
        #[arg(long)]
        details: bool,
        /// The persistent definition's disks, even while the domain runs.
        #[arg(long)]
        inactive: bool,
        /// Draw each disk's backing tree.
        #[arg(long)]
        chain: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// List a domain's network interfaces; a running domain's MACs are the
    /// ones its hypervisor reports.
    Domiflist {
        #[command(flatten)]
        domain: DomainArg,
        /// The persistent definition's interfaces, even while the domain runs.
        #[arg(long)]
        inactive: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Attach a network interface to a domain, running (--live) or in its
    /// definition (--config).
    AttachInterface {
        #[command(flatten)]
        domain: DomainArg,
        /// Network interface type: network, bridge, direct, ethernet or user.
        #[arg(long = "type", value_name = "TYPE", help_heading = BY_POSITION)]
        iface_type: String,
        /// Source of the interface: the network, the bridge, the host
        /// device of a direct interface, an ethernet interface's tap.
        #[arg(long, value_name = "SOURCE", help_heading = BY_POSITION)]
        source: String,
        /// The host device the interface runs on.
        #[arg(long)]
        target: Option<String>,
        /// MAC address.
        #[arg(long)]
        mac: Option<String>,
        /// Model type (virtio, e1000, rtl8139, …).
        #[arg(long)]
        model: Option<String>,
        /// The running domain and, when it runs, the definition too.
        #[arg(long, conflicts_with_all = ["live", "config", "current"])]
        persistent: bool,
        #[command(flatten)]
        scope: PinScopeFlags,
    },
    /// Detach a network interface from a domain, running (--live) or in
    /// its definition (--config).
    DetachInterface {
        #[command(flatten)]
        domain: DomainArg,
        /// Network interface type.
        #[arg(long = "type", value_name = "TYPE", help_heading = BY_POSITION)]
        iface_type: String,
        /// MAC address of the interface (needed when several have the type).
        #[arg(long)]
        mac: Option<String>,
        /// The running domain and, when it runs, the definition too.
        #[arg(long, conflicts_with_all = ["live", "config", "current"])]
        persistent: bool,
        #[command(flatten)]
        scope: PinScopeFlags,
    },
    /// List a running domain's IP addresses: from the host's neighbour
    /// table for the interfaces' MACs (`--source arp`), or from the DHCP
    /// leases of the networks its `type='network'` interfaces are on
    /// (`lease`, the default).
    Domifaddr {
        #[command(flatten)]
        domain: DomainArg,
        /// Only the interface running on this host device.
        #[arg(long, value_name = "INTERFACE", help_heading = BY_POSITION)]
        interface: Option<String>,
        /// Where the addresses come from: lease, arp or agent.
        #[arg(long, default_value = "lease")]
        source: String,
        /// Name and MAC on every row, not only the first of an interface
        /// (accepted; each interface's rows are already labelled).
        #[arg(long)]
        full: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Compare recorded backing chains with the image files.
    Domblkcheck {
        #[command(flatten)]
        domain: DomainArg,
        /// Only this disk: its target or the path of its active image.
        #[arg(long = "disk", visible_alias = "path", value_name = "DISK", help_heading = BY_POSITION)]
        disk: Option<String>,
        /// Record what the image files say (correction mode).
        #[arg(long)]
        fix: bool,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Start a defined domain.
    Start {
        #[command(flatten)]
        domain: DomainArg,
        /// Leave the guest paused.
        #[arg(long)]
        paused: bool,
        /// Accepted; changes nothing: every start is a fresh boot (Strata
        /// keeps no managed save image to restore or bypass the cache for).
        #[arg(long = "force-boot")]
        _force_boot: bool,
        /// Accepted; changes nothing (see --force-boot).
        #[arg(long = "bypass-cache")]
        _bypass_cache: bool,
    },
    /// Stop a domain at once.
    Destroy {
        #[command(flatten)]
        domain: DomainArg,
    },
    /// Ask a domain to shut down.
    Shutdown {
        #[command(flatten)]
        domain: DomainArg,
    },
    /// Pause a domain.
    Suspend {
        #[command(flatten)]
        domain: DomainArg,
    },
    /// Resume a paused domain.
    Resume {
        #[command(flatten)]
        domain: DomainArg,
    },
    /// Add a disk (or all disks) to the domain's disk set.
    #[command(name = "diskset-add")]
    DisksetAdd {
        #[command(flatten)]
        domain: DomainArg,
        /// The disk: its target or the path of its active image.
        #[arg(long = "disk", visible_alias = "path", value_name = "DISK", required_unless_present = "all", help_heading = BY_POSITION)]
        disk: Option<String>,
        /// Every disk of the domain.
        #[arg(long, conflicts_with = "disk")]
        all: bool,
    },
    /// Remove a disk (or all disks) from the domain's disk set.
    #[command(name = "diskset-remove")]
    DisksetRemove {
        #[command(flatten)]
        domain: DomainArg,
        /// The disk: its target or the path of its active image.
        #[arg(long = "disk", visible_alias = "path", value_name = "DISK", required_unless_present = "all", help_heading = BY_POSITION)]
        disk: Option<String>,
        /// Every disk of the domain.
        #[arg(long, conflicts_with = "disk")]
        all: bool,
    },
    /// List the disks in the domain's disk set.
    #[command(name = "diskset-list")]
    DisksetList {
        #[command(flatten)]
        domain: DomainArg,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Number of disks in the domain's disk set.
    #[command(name = "diskset-size")]
    DisksetSize {
        #[command(flatten)]
        domain: DomainArg,
        #[command(flatten)]
        json: JsonFlag,
    },
    /// Pull backing data into the active layer.
    Blockpull(crate::blockjobs::PullArgs),
    /// Commit layers of a disk's chain into a lower one.
    Blockcommit(crate::blockjobs::CommitArgs),
    /// Copy a disk to a new image while the domain runs.
    Blockcopy(crate::blockjobs::CopyArgs),
    /// Show, throttle, pivot or abort a disk's block job.
    Blockjob(crate::blockjobs::JobArgs),
    /// Create a snapshot from XML (or an empty description).
    #[command(name = "snapshot-create")]
    SnapshotCreate(crate::snapshots::CreateArgs),
    /// Create a snapshot from options.
    #[command(name = "snapshot-create-as")]
    SnapshotCreateAs(crate::snapshots::CreateAsArgs),
    /// List snapshots.
    #[command(name = "snapshot-list")]
    SnapshotList(crate::snapshots::ListArgs),
    /// Snapshot information.
    #[command(name = "snapshot-info")]
    SnapshotInfo(crate::snapshots::NameArgs),
    /// Snapshot XML.
    #[command(name = "snapshot-dumpxml")]
    SnapshotDumpxml(crate::snapshots::DumpxmlArgs),
    /// Show or set the current snapshot.
    #[command(name = "snapshot-current")]
    SnapshotCurrent(crate::snapshots::CurrentArgs),
    /// A snapshot's parent.
    #[command(name = "snapshot-parent")]
    SnapshotParent(crate::snapshots::NameArgs),
    /// Revert the domain to a snapshot.
    #[command(name = "snapshot-revert")]
    SnapshotRevert(crate::snapshots::RevertArgs),
    /// Delete a snapshot.
    #[command(name = "snapshot-delete")]
    SnapshotDelete(crate::snapshots::DeleteArgs),
    /// Print a domain's events as they happen.
    Event(EventArgs),
    #[command(flatten)]
    Pools(Box<crate::pools::PoolCommand>),
    #[command(flatten)]
    Save(Box<crate::save::SaveCommand>),
    #[command(flatten)]
    Networks(Box<crate::networks::NetworkCommand>),
    /// Send a command to the domain's monitor and print its reply.
    ///
    /// The command is QMP JSON (`{"execute":"query-block"}`), passed through
    /// as it is; with --hmp, a human monitor command (`info block`). The
    /// reply is printed as the monitor gave it; --pretty indents a JSON reply.
    #[command(name = "qemu-monitor-command")]
    QemuMonitor {
        #[command(flatten)]
        domain: DomainArg,
        /// The command is a human monitor command.
        #[arg(long)]
        hmp: bool,
        /// Indent the JSON reply.
        #[arg(long, conflicts_with = "hmp")]
        pretty: bool,
        /// Print only the reply's "return" value.
        #[arg(long = "return-value", conflicts_with = "hmp")]
        return_value: bool,
        /// The command; several words are joined by spaces.
        #[arg(long, value_name = "CMD", required = true, action = ArgAction::Append, help_heading = BY_POSITION)]
        cmd: Vec<String>,
    },
    /// Serve this connection's wire calls, one JSON line each, on standard
    /// input and output: the far side of a `DRIVER+ext://` URI.
    #[command(name = "serve-wire", hide = true)]
    ServeWire,
    /// Run a command inside a container's namespaces.
    ///
    /// The command (after `--`) runs in the container's mount, pid, uts,
    /// ipc and net namespaces and its cgroup, at its root, with strata's
    /// standard input, output and error; strata exits with its status.
    #[command(name = "lxc-enter-namespace")]
    LxcEnterNamespace {
        #[command(flatten)]
        domain: DomainArg,
        /// Accepted as virsh takes it: Strata gives containers no security label.
        #[arg(long)]
        noseclabel: bool,
        /// The program and its arguments.
        #[arg(long, value_name = "CMD", required = true, action = ArgAction::Append, help_heading = BY_POSITION)]
        cmd: Vec<String>,
    },
    /// Print help: the commands by group, a group's commands, or one
    /// command's synopsis and options.
    Help {
        /// A command, or a group's help keyword.
        #[arg(long, value_name = "COMMAND", help_heading = BY_POSITION)]
        command: Option<String>,
        #[command(flatten)]
        json: JsonFlag,
    },
}

/// `event`: virsh's options. Without a domain, every running domain is
/// watched, including those that start while the command waits.
#[derive(Args, Debug)]
pub struct EventArgs {
    /// Only this domain's events.
    #[arg(long, value_name = "DOMAIN", help_heading = BY_POSITION)]
    domain: Option<String>,
    /// Only this event: block-job or lifecycle.
    #[arg(long)]
    event: Option<String>,
    /// Every event type (the default with a domain).
    #[arg(long)]
    all: bool,
    /// Keep printing events until interrupted or --timeout.
    #[arg(long = "loop")]
    keep_going: bool,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<u64>,
    /// Prefix each event with its time.
    #[arg(long)]
    timestamp: bool,
    /// List the event names and exit.
    #[arg(long)]
    list: bool,
    #[command(flatten)]
    json: JsonFlag,
}

/// How often `event` without a domain looks for domains that started.
const EVENT_RESCAN: Duration = Duration::from_secs(1);

/// How long one wait for a domain's next event lasts when several
/// domains are watched in turn (their events queue meanwhile).
const EVENT_SLICE_SHARED: Duration = Duration::from_millis(100);

/// Waits for events and prints each as it comes; returns virsh's summary.
/// Every wait sleeps on a domain's event stream or a timer, and ends at
/// `--timeout`. As virsh's, the command fails (with no message) when no
/// event came.
async fn watch_events(conn: &dyn Connection, args: EventArgs, json: bool) -> Result<String> {
    if let Some(e) = &args.event {
        if e != "block-job" && e != "lifecycle" {
            return Err(anyhow!("unknown event type '{e}' (known: block-job, lifecycle)"));
        }
        if args.all {
            return Err(anyhow!("Options --all and --event are mutually exclusive"));
        }
    }
    let named = args.domain;
    if named.is_none() && !args.all && args.event.is_none() {
        return Err(anyhow!("one of --list, --all, or --event <type> is required"));
    }
    let deadline = args.timeout.map(|t| Instant::now() + Duration::from_secs(t));
    let mut watched: Vec<String> = named.iter().cloned().collect();
    let mut rescan_at = Instant::now();
    let mut received = 0usize;
    let timed_out = 'wait: loop {
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d) {
            break true;
        }
        if named.is_none() && now >= rescan_at {
            watched = conn.list_domains().await?.into_iter().filter(|d| d.state.is_active()).map(|d| d.name).collect();
            rescan_at = now + EVENT_RESCAN;
        }
        // This turn ends at the deadline, or at the next look for new domains.
        let turn_end = [deadline, named.is_none().then_some(rescan_at)].into_iter().flatten().min();
        if watched.is_empty() {
            if let Some(end) = turn_end {
                tokio::time::sleep_until(end.into()).await;
            }
            continue;
        }
        let slice = if watched.len() == 1 { EVENT_RESCAN } else { EVENT_SLICE_SHARED };
        let mut stopped = Vec::new();
        for dom in &watched {
            let left = turn_end.map_or(slice, |end| end.saturating_duration_since(Instant::now()).min(slice));
            if left.is_zero() {
                break;
            }
            let ev = match conn.next_event(dom, left.as_millis() as u64).await {
                Ok(Some(ev)) => ev,
                Ok(None) => continue,
                // Watching every domain: one that stopped is looked for again.
                Err(_) if named.is_none() => {
                    stopped.push(dom.clone());
                    continue;
                }
                Err(e) => return Err(lookup_error(e, dom)),
            };
            if args.event.as_deref().is_some_and(|e| e != ev.event) {
                continue;
            }
            received += 1;
            if json {
                output::out(&format!("{}\n", serde_json::to_string(&ev)?));
            } else {
                let stamp =
                    if args.timestamp { format!("{}: ", format_timestamp(ev.timestamp_us)) } else { String::new() };
                output::out(&format!("{stamp}event '{}' for domain '{}': {}\n", ev.event, ev.domain, ev.detail));
            }
            if !args.keep_going {
                break 'wait false;
            }
        }
        watched.retain(|d| !stopped.contains(d));
    };
    let mut summary = String::new();
    if !json {
        if timed_out {
            summary.push_str("event loop timed out\n");
        }
        writeln!(summary, "events received: {received}\n")?;
    }
    if received == 0 {
        return Err(CommandFailure { message: String::new(), output: summary }.into());
    }
    Ok(summary)
}

/// Runs a block-job or snapshot command: the capability trait it needs,
/// then the command, with an unknown domain reported as virsh does.
macro_rules! with_ops {
    // A command that checks its request against the driver's capabilities
    // takes the connection, and asks it for the ops itself.
    ($session:expr, connection, $args:expr, $run:path $(, $extra:expr)*) => {{
        let domain = $args.domain.clone();
        let conn = $session.conn()?;
        $run(conn, $args $(, $extra)*).await.map_err(|e| job_error(e, &domain))?
    }};
    ($session:expr, $require:ident, $args:expr, $run:path $(, $extra:expr)*) => {{
        let domain = $args.domain.clone();
        let ops = $session.conn()?.$require()?;
        $run(ops, $args $(, $extra)*).await.map_err(|e| job_error(e, &domain))?
    }};
}

/// Runs one parsed command, returning what it prints on stdout.
pub async fn run(session: &mut Session, cmd: Command) -> Result<String> {
    let global_json = session.json;
    let quiet = session.quiet;
    let wants_json = |f: JsonFlag| f.json || global_json;
    let mut out = String::new();
    match cmd {
        Command::Uri { json } => {
            let uri = session.conn()?.uri().to_string();
            if wants_json(json) {
                writeln!(out, "{}", json!({ "uri": uri }))?;
            } else {
                writeln!(out, "{uri}\n")?;
            }
        }
        Command::Version { json } => {
            let version = env!("CARGO_PKG_VERSION");
            if wants_json(json) {
                writeln!(out, "{}", json!({ "strata": version }))?;
            } else {
                writeln!(out, "Compiled against library: strata {version}")?;
                writeln!(out, "Using library: strata {version}\n")?;
            }
        }
        Command::Nodeinfo { json } => {
            let info = session.conn()?.require_cpu_placement()?.node_info().await?;
            if wants_json(json) {
                writeln!(out, "{}", serde_json::to_string_pretty(&info)?)?;
            } else {
                writeln!(out, "{:<20} {}", "CPU model:", info.model)?;
                writeln!(out, "{:<20} {}", "CPU(s):", info.cpus)?;
                if info.mhz > 0 {
                    writeln!(out, "{:<20} {} MHz", "CPU frequency:", info.mhz)?;
                }
                writeln!(out, "{:<20} {}", "CPU socket(s):", info.sockets)?;
                writeln!(out, "{:<20} {}", "Core(s) per socket:", info.cores)?;
                writeln!(out, "{:<20} {}", "Thread(s) per core:", info.threads)?;
                writeln!(out, "{:<20} {}", "NUMA cell(s):", info.nodes)?;
                writeln!(out, "{:<20} {} KiB\n", "Memory size:", info.memory_kib)?;
            }
        }
        Command::Nodecpumap { pretty, json } => {
            let map = session.conn()?.require_cpu_placement()?.node_cpu_map().await?;
            let online = format_cpulist(map.online());
            if wants_json(json) {
                let report = json!({
                    "present": map.mask_len(),
                    "online": map.online().len(),
                    "map": map.online_mask(),
                    "online_cpus": online,
                });
                writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
            } else {
                writeln!(out, "{:<15} {}", "CPUs present:", map.mask_len())?;
                writeln!(out, "{:<15} {}", "CPUs online:", map.online().len())?;
                let shown = if pretty { online } else { map.online_mask() };
                writeln!(out, "{:<15} {shown}\n", "CPU map:")?;
            }
        }
        Command::Capabilities { all: true, json } => out = list_drivers(wants_json(json))?,
        Command::Capabilities { all: false, json } => {
            let caps = session.conn()?.capabilities();
            if wants_json(json) {
                writeln!(out, "{}", serde_json::to_string_pretty(&caps)?)?;
            } else {
                writeln!(out, "Driver:      {}", caps.driver)?;
                writeln!(out, "URI:         {}", caps.uri)?;
                writeln!(out, "Hypervisor:  {}", caps.hypervisor)?;
                for (label, families) in capability_lines(&caps) {
                    writeln!(out, "{:<13}{families}", format!("{label}:"))?;
                }
                writeln!(out, "Honoured:    {}", caps.honoured_elements.join(", "))?;
                writeln!(out, "Unhonoured:  {}", caps.unhonoured_elements.join(", "))?;
                for note in &caps.notes {
                    writeln!(out, "Note:        {note}")?;
                }
                writeln!(out, "Drivers:     {}", strata_core::registry::known_schemes().join(", "))?;
                out.push('\n');
            }
        }
        Command::Define { file, validate } => {
            let xml = read_document(&file)?;
            let outcome = session
                .conn()?
                .define_xml(&xml, DefineFlags { validate })
                .await
                .map_err(|e| anyhow!(e).context(format!("Failed to define domain from {file}")))?;
            for w in &outcome.warnings {
                output::err(&format!("warning: {w}\n"));
            }
            writeln!(out, "Domain '{}' defined from {file}\n", outcome.name)?;
        }
        Command::Undefine { domain, snapshots_metadata, .. } => {
            let name = domain.name();
            let flags = UndefineFlags { snapshots_metadata };
            session
                .conn()?
                .undefine(name, flags)
                .await
                .map_err(|e| domain_error(e, name, "Failed to undefine domain"))?;
            writeln!(out, "Domain '{name}' has been undefined\n")?;
        }
        Command::List {
            all,
            inactive,
            name,
            uuid,
            json,
            managed_save,
            with_managed_save,
            without_managed_save,
            ..
        } => {
            let conn = session.conn()?;
            let domains = conn.list_domains().await?;
            for reason in domains.iter().filter_map(|d| d.damaged.as_ref()) {
                eprintln!("warning: {reason}");
            }
            let mut shown = Vec::new();
            for d in domains {
                if !(if inactive { !d.state.is_active() } else { all || d.state.is_active() }) {
                    continue;
                }
                let saved = if managed_save || with_managed_save || without_managed_save {
                    d.damaged.is_none() && conn.domain_info(&d.name).await?.managed_save
                } else {
                    false
                };
                if (with_managed_save && !saved) || (without_managed_save && saved) {
                    continue;
                }
                shown.push((d, saved && managed_save));
            }
            let shown_saved: Vec<bool> = shown.iter().map(|(_, saved)| *saved).collect();
            let shown: Vec<_> = shown.into_iter().map(|(d, _)| d).collect();
            if wants_json(json) {
                writeln!(out, "{}", serde_json::to_string_pretty(&shown)?)?;
            } else if name || uuid {
                for d in &shown {
                    match (uuid, name) {
                        (true, true) => writeln!(out, "{}  {}", d.uuid, d.name)?,
                        (true, false) => writeln!(out, "{}", d.uuid)?,
                        _ => writeln!(out, "{}", d.name)?,
                    }
                }
                out.push('\n');
            } else {
                let rows: Vec<Vec<String>> = shown
                    .iter()
                    .zip(&shown_saved)
                    .map(|(d, saved)| {
                        vec![
                            d.id.map(|i| i.to_string()).unwrap_or_else(|| "-".into()),
                            d.name.clone(),
                            // virsh's --managed-save state word.
                            if *saved { "saved".into() } else { d.state.as_virsh().to_string() },
                        ]
                    })
                    .collect();
                out.push_str(&format_table(&["Id", "Name", "State"], &rows, quiet));
                out.push('\n');
            }
        }
        Command::Dominfo { domain, json } => {
            let name = domain.name();
            let info = session.conn()?.domain_info(name).await.map_err(|e| lookup_error(e, name))?;
            if wants_json(json) {
                writeln!(out, "{}", serde_json::to_string_pretty(&info)?)?;
            } else {
                let s = &info.summary;
                let rows = [
                    ("Id", s.id.map(|i| i.to_string()).unwrap_or_else(|| "-".into())),
                    ("Name", s.name.clone()),
                    ("UUID", s.uuid.clone()),
                    ("OS Type", info.os_type.clone()),
                    ("State", s.state.as_virsh().to_string()),
                    ("CPU(s)", info.vcpus.to_string()),
                    ("Max memory", format!("{} KiB", info.max_memory_kib)),
                    ("Used memory", format!("{} KiB", info.used_memory_kib)),
                    ("Persistent", if s.persistent { "yes" } else { "no" }.into()),
                    ("Autostart", if info.autostart { "enable" } else { "disable" }.into()),
                    ("Managed save", if info.managed_save { "yes" } else { "no" }.into()),
                    ("Security model", "none".into()),
                    ("Security DOI", "0".into()),
                ];
                out.push_str(&crate::table::format_fields(&rows));
            }
        }
        Command::Vcpuinfo { domain, json } => {
            let name = domain.name();
            let vcpus = session.conn()?.vcpu_info(name).await.map_err(|e| lookup_error(e, name))?;
            if wants_json(json) {
                writeln!(out, "{}", serde_json::to_string_pretty(&vcpus)?)?;
            } else {
                for v in &vcpus {
                    let affinity: String = v.affinity.iter().map(|allowed| if *allowed { 'y' } else { '-' }).collect();
                    writeln!(out, "{:<15} {}", "VCPU:", v.number)?;
                    writeln!(out, "{:<15} {}", "CPU:", v.cpu)?;
                    writeln!(out, "{:<15} {}", "State:", v.state)?;
                    writeln!(out, "{:<15} {:.1}s", "CPU time:", v.cpu_time_ns as f64 / 1e9)?;
                    writeln!(out, "{:<15} {affinity}\n", "CPU Affinity:")?;
                }
            }
        }
        Command::Vcpupin { domain, vcpu, cpulist, scope, json } => {
            let name = domain.name();
            let placement = session.conn()?.require_cpu_placement()?;
            if let Some(cpulist) = cpulist {
                let vcpu = vcpu.ok_or_else(|| anyhow!("vcpupin: Missing vCPU number in pin mode."))?;
                let cpus = parse_cpulist(&cpulist)?;
                placement.pin_vcpu(name, vcpu, &cpus, scope.scope()).await.map_err(|e| lookup_error(e, name))?;
                if wants_json(json) {
                    writeln!(out, "{}", json!({ "vcpu": vcpu, "cpus": format_cpulist(&cpus) }))?;
                }
            } else {
                let pins = placement.vcpu_pins(name, scope.scope()).await.map_err(|e| lookup_error(e, name))?;
                if let Some(vcpu) = vcpu.filter(|v| *v as usize >= pins.len()) {
                    return Err(anyhow!(strata_core::Error::invalid_arg(format!(
                        "vcpu {vcpu} is out of range of cpu count {}",
                        pins.len()
                    ))));
                }
                let rows: Vec<(usize, String)> = pins
                    .iter()
                    .enumerate()
                    .filter(|(number, _)| vcpu.is_none_or(|v| v as usize == *number))
                    .map(|(number, cpus)| (number, format_cpulist(cpus)))
                    .collect();
                if wants_json(json) {
                    let rows: Vec<_> = rows.iter().map(|(vcpu, cpus)| json!({ "vcpu": vcpu, "cpus": cpus })).collect();
                    writeln!(out, "{}", serde_json::to_string_pretty(&rows)?)?;
                } else {
                    let rows: Vec<Vec<String>> =
                        rows.into_iter().map(|(vcpu, cpus)| vec![vcpu.to_string(), cpus]).collect();
                    writeln!(out, "{}", format_table(&["VCPU", "CPU Affinity"], &rows, session.quiet))?;
                }
            }
        }
        Command::Vcpucount { domain, maximum, active, scope, guest, json } => {
            if guest {
                return Err(anyhow!(strata_core::Error::new(
                    ErrorKind::ArgumentUnsupported,
                    "vcpucount --guest needs a guest agent, which Strata does not talk to"
                )));
            }
            if scope.live && scope.config {
                return Err(anyhow!("Options --live and --config are mutually exclusive"));
            }
            let name = domain.name();
            let placement = session.conn()?.require_cpu_placement()?;
            let counts = placement.vcpu_counts(name).await.map_err(|e| lookup_error(e, name))?;
            if maximum || active || scope.live || scope.config || scope.current {
                let count = selected_vcpu_count(&counts, maximum, scope.scope())?;
                match wants_json(json) {
                    true => writeln!(out, "{}", json!({ "count": count }))?,
                    false => writeln!(out, "{count}")?,
                }
            } else if wants_json(json) {
                writeln!(out, "{}", serde_json::to_string_pretty(&counts)?)?;
            } else {
                let live = counts.live;
                let rows = [
                    ("maximum", "config", Some(counts.config.maximum)),
                    ("maximum", "live", live.map(|l| l.maximum)),
                    ("current", "config", Some(counts.config.current)),
                    ("current", "live", live.map(|l| l.current)),
                ];
                for (which, definition, count) in rows {
                    if let Some(count) = count {
                        writeln!(out, "{which:<12} {definition:<12} {count:>3}")?;
                    }
                }
            }
        }
        Command::Setvcpus { domain, count, maximum, scope, json } => {
            let name = domain.name();
            let conn = session.conn()?;
            conn.capabilities().check_vcpu_change(scope.live)?;
            let placement = conn.require_cpu_placement()?;
            placement.set_vcpus(name, count, scope.scope(), maximum).await.map_err(|e| lookup_error(e, name))?;
            if wants_json(json) {
                writeln!(out, "{}", json!({ "count": count, "maximum": maximum }))?;
            }
        }
        Command::Emulatorpin { domain, cpulist, scope, json } => {
            let name = domain.name();
            let placement = session.conn()?.require_cpu_placement()?;
            let cpus = match cpulist {
                Some(cpulist) => {
                    let cpus = parse_cpulist(&cpulist)?;
                    placement.pin_emulator(name, &cpus, scope.scope()).await.map_err(|e| lookup_error(e, name))?;
                    wants_json(json).then_some(cpus)
                }
                None => Some(placement.emulator_pin(name, scope.scope()).await.map_err(|e| lookup_error(e, name))?),
            };
            match cpus {
                Some(cpus) if wants_json(json) => writeln!(out, "{}", json!({ "emulator": format_cpulist(&cpus) }))?,
                Some(cpus) => {
                    writeln!(out, "emulator: CPU Affinity")?;
                    writeln!(out, "----------------------------------")?;
                    writeln!(out, "       *: {}\n", format_cpulist(&cpus))?;
                }
                None => {}
            }
        }
        Command::Domstate { domain, reason, json } => {
            let name = domain.name();
            let info = session.conn()?.domain_info(name).await.map_err(|e| lookup_error(e, name))?;
            let s = &info.summary;
            if wants_json(json) {
                writeln!(out, "{}", json!({ "state": s.state, "reason": s.reason }))?;
            } else if reason {
                writeln!(out, "{} ({})\n", s.state.as_virsh(), s.reason.as_deref().unwrap_or("unknown"))?;
            } else {
                writeln!(out, "{}\n", s.state.as_virsh())?;
            }
        }
        Command::Dumpxml { domain, inactive, refresh_chain, .. } => {
            let name = domain.name();
            let xml = session
                .conn()?
                .dump_xml(name, DumpXmlFlags { inactive, refresh_chain })
                .await
                .map_err(|e| lookup_error(e, name))?;
            writeln!(out, "{xml}")?;
        }
        Command::Domblklist { domain, details, inactive, chain, json } => {
            let disks = listed_domain(session, domain.name(), inactive).await?.disks()?;
            if wants_json(json) {
                let list: Vec<_> = disks
                    .iter()
                    .map(|d| {
                        json!({
                            "type": d.disk_type,
                            "device": d.device,
                            "target": d.target,
                            "source": d.source().map(|s| s.to_string()),
                            "format": d.format,
                            "selected": d.selected,
                            "chain": d.chain.as_ref().map(chain_json),
                        })
                    })
                    .collect();
                writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
            } else {
                let header: &[&str] =
                    if details { &["Type", "Device", "Target", "Source"] } else { &["Target", "Source"] };
                let mut rows = Vec::new();
                for d in &disks {
                    let source = d.source().map(|s| s.to_string()).unwrap_or_else(|| "-".into());
                    let mut row = Vec::new();
                    if details {
                        row.push(d.disk_type.clone());
                        row.push(d.device.clone());
                    }
                    row.push(d.target.clone());
                    if chain {
                        row.push(format!("{source} ({})", d.format.as_deref().unwrap_or("raw")));
                    } else {
                        row.push(source);
                    }
                    rows.push(row);
                    if let (true, Some(c)) = (chain, &d.chain) {
                        for line in chain_tree_lines(c) {
                            let mut r = vec![String::new(); header.len() - 1];
                            r.push(line);
                            rows.push(r);
                        }
                    }
                }
                out.push_str(&format_table(header, &rows, quiet));
                out.push('\n');
            }
        }
        Command::AttachInterface { domain, iface_type, source, target, mac, model, persistent, scope } => {
            let name = domain.name();
            let xml =
                interface_from_options(&iface_type, &source, target.as_deref(), mac.as_deref(), model.as_deref())?
                    .to_xml();
            let scope = modification_scope(session, name, persistent, scope).await?;
            session
                .conn()?
                .attach_interface(name, &xml, scope)
                .await
                .map_err(|e| lookup_error(e, name).context("Failed to attach interface"))?;
            writeln!(out, "Interface attached successfully\n")?;
        }
        Command::DetachInterface { domain, iface_type, mac, persistent, scope } => {
            let name = domain.name();
            let scope = modification_scope(session, name, persistent, scope).await?;
            session
                .conn()?
                .detach_interface(name, &iface_type, mac.as_deref(), scope)
                .await
                .map_err(|e| lookup_error(e, name).context("Failed to detach interface"))?;
            writeln!(out, "Interface detached successfully\n")?;
        }
        Command::Domiflist { domain, inactive, json } => {
            let interfaces = listed_domain(session, domain.name(), inactive).await?.interfaces()?;
            if wants_json(json) {
                writeln!(out, "{}", serde_json::to_string_pretty(&interfaces)?)?;
            } else {
                let cell = |value: &Option<String>| value.clone().unwrap_or_else(|| "-".into());
                let rows: Vec<Vec<String>> = interfaces
                    .iter()
                    .map(|i| {
                        vec![cell(&i.target_dev), i.iface_type.clone(), cell(&i.source), cell(&i.model), cell(&i.mac)]
                    })
                    .collect();
                out.push_str(&format_table(&["Interface", "Type", "Source", "Model", "MAC"], &rows, quiet));
                out.push('\n');
            }
        }
        Command::Domifaddr { domain, interface, source, full: _, json } => {
            let name = domain.name();
            let source = AddressSource::parse(&source)?;
            if source == AddressSource::Agent {
                return Err(anyhow!(strata_core::Error::new(
                    ErrorKind::ArgumentUnsupported,
                    "domifaddr --source agent needs a guest agent, which Strata does not talk to"
                )));
            }
            let dom = listed_domain(session, name, false).await?;
            if dom.element().attr("id").is_none() {
                return Err(anyhow!(strata_core::Error::operation_invalid("domain is not running")));
            }
            let interfaces: Vec<_> = dom
                .interfaces()?
                .into_iter()
                .filter(|i| interface.as_ref().is_none_or(|wanted| i.target_dev.as_ref() == Some(wanted)))
                .collect();
            let addresses = match source {
                AddressSource::Arp => ifaddr::arp_addresses(&interfaces, &ifaddr::read_arp_table()?),
                AddressSource::Lease => {
                    let networks = session.conn()?.require_networks()?;
                    let mut addresses = Vec::new();
                    for iface in interfaces.iter().filter(|i| i.iface_type == "network") {
                        let Some(network) = &iface.source else { continue };
                        let leases = networks.net_dhcp_leases(network).await?;
                        addresses.extend(ifaddr::lease_addresses(iface, &leases));
                    }
                    addresses
                }
                AddressSource::Agent => Vec::new(),
            };
            if wants_json(json) {
                writeln!(out, "{}", serde_json::to_string_pretty(&addresses)?)?;
            } else {
                out.push_str(&ifaddr::format_addresses(&addresses));
            }
        }
        Command::Domblkcheck { domain, disk, fix, json } => {
            let name = domain.name();
            let disk = match disk {
                Some(d) => Some(disk_target(session, name, &d).await?),
                None => None,
            };
            let checks =
                session.conn()?.check_chains(name, disk.as_deref(), fix).await.map_err(|e| lookup_error(e, name))?;
            let unresolved =
                checks.iter().filter(|c| c.error.is_some() || (!c.differences.is_empty() && !c.fixed)).count();
            if wants_json(json) {
                writeln!(out, "{}", serde_json::to_string_pretty(&checks)?)?;
            } else {
                for c in &checks {
                    if let Some(e) = &c.error {
                        writeln!(out, "{}: cannot probe the images: {e}", c.disk)?;
                    } else if c.differences.is_empty() {
                        writeln!(out, "{}: recorded chain matches the images", c.disk)?;
                    } else {
                        for d in &c.differences {
                            writeln!(out, "{}: {}", c.disk, d.what)?;
                        }
                        if c.fixed {
                            writeln!(out, "{}: recorded chain replaced by the one the images describe", c.disk)?;
                        }
                    }
                }
                out.push('\n');
            }
            if unresolved > 0 {
                return Err(CommandFailure {
                    message: format!(
                        "backing chain mismatch: {unresolved} disk(s) of domain '{name}' differ from their images{}",
                        if fix { "" } else { "; run domblkcheck --fix to record what the images say" }
                    ),
                    output: out,
                }
                .into());
            }
        }
        Command::Start { domain, paused, .. } => {
            let name = domain.name();
            let outcome = session
                .conn()?
                .start(name, StartFlags { paused })
                .await
                .map_err(|e| domain_error(e, name, "Failed to start domain"))?;
            for w in &outcome.warnings {
                eprintln!("warning: {w}");
            }
            writeln!(out, "Domain '{name}' started\n")?;
        }
        Command::Destroy { domain } => {
            let name = domain.name();
            session.conn()?.destroy(name).await.map_err(|e| domain_error(e, name, "Failed to destroy domain"))?;
            writeln!(out, "Domain '{name}' destroyed\n")?;
        }
        Command::Shutdown { domain } => {
            let name = domain.name();
            session.conn()?.shutdown(name).await.map_err(|e| domain_error(e, name, "Failed to shutdown domain"))?;
            writeln!(out, "Domain '{name}' is being shutdown\n")?;
        }
        Command::Suspend { domain } => {
            let name = domain.name();
            session.conn()?.suspend(name).await.map_err(|e| domain_error(e, name, "Failed to suspend domain"))?;
            writeln!(out, "Domain '{name}' suspended\n")?;
        }
        Command::Resume { domain } => {
            let name = domain.name();
            session.conn()?.resume(name).await.map_err(|e| domain_error(e, name, "Failed to resume domain"))?;
            writeln!(out, "Domain '{name}' resumed\n")?;
        }
        Command::DisksetAdd { domain, disk, all } => {
            let name = domain.name();
            let sets = session.conn()?.require_disk_sets()?;
            if all {
                let size = sets.diskset_add_all(name).await.map_err(|e| lookup_error(e, name))?;
                writeln!(out, "All disks of domain '{name}' selected ({size} in the disk set)")?;
            } else {
                let disk = disk.ok_or_else(|| anyhow!("command requires <disk> option or --all"))?;
                let disk = disk_target(session, name, &disk).await?;
                let sets = session.conn()?.require_disk_sets()?;
                let outcome = sets.diskset_add(name, &disk).await.map_err(|e| lookup_error(e, name))?;
                writeln!(out, "{}", diskset_message(&disk, outcome))?;
            }
        }
        Command::DisksetRemove { domain, disk, all } => {
            let name = domain.name();
            let sets = session.conn()?.require_disk_sets()?;
            if all {
                let removed = sets.diskset_remove_all(name).await.map_err(|e| lookup_error(e, name))?;
                writeln!(out, "All disks of domain '{name}' deselected ({removed} removed from the disk set)")?;
            } else {
                let disk = disk.ok_or_else(|| anyhow!("command requires <disk> option or --all"))?;
                let disk = disk_target(session, name, &disk).await?;
                let sets = session.conn()?.require_disk_sets()?;
                let outcome = sets.diskset_remove(name, &disk).await.map_err(|e| lookup_error(e, name))?;
                writeln!(out, "{}", diskset_message(&disk, outcome))?;
            }
        }
        Command::DisksetList { domain, json } => {
            let name = domain.name();
            let list =
                session.conn()?.require_disk_sets()?.diskset_list(name).await.map_err(|e| lookup_error(e, name))?;
            if wants_json(json) {
                writeln!(out, "{}", serde_json::to_string_pretty(&list)?)?;
            } else {
                for d in &list {
                    writeln!(out, "{d}")?;
                }
                out.push('\n');
            }
        }
        Command::Blockpull(mut a) => {
            a.disk = disk_target(session, &a.domain, &a.disk).await?;
            out = with_ops!(session, connection, a, crate::blockjobs::blockpull)
        }
        Command::Blockcommit(mut a) => {
            a.disk = disk_target(session, &a.domain, &a.disk).await?;
            out = with_ops!(session, connection, a, crate::blockjobs::blockcommit)
        }
        Command::Blockcopy(mut a) => {
            a.disk = disk_target(session, &a.domain, &a.disk).await?;
            out = with_ops!(session, connection, a, crate::blockjobs::blockcopy)
        }
        Command::Blockjob(mut a) => {
            a.disk = disk_target(session, &a.domain, &a.disk).await?;
            out = with_ops!(session, connection, a, crate::blockjobs::blockjob, global_json)
        }
        Command::SnapshotCreate(a) => out = with_ops!(session, connection, a, crate::snapshots::create),
        Command::SnapshotCreateAs(a) => out = with_ops!(session, connection, a, crate::snapshots::create_as),
        Command::SnapshotList(a) => {
            out = with_ops!(session, require_snapshots, a, crate::snapshots::list, quiet, global_json)
        }
        Command::SnapshotInfo(a) => out = with_ops!(session, require_snapshots, a, crate::snapshots::info, global_json),
        Command::SnapshotDumpxml(a) => out = with_ops!(session, require_snapshots, a, crate::snapshots::dumpxml),
        Command::SnapshotCurrent(a) => {
            out = with_ops!(session, require_snapshots, a, crate::snapshots::current, global_json)
        }
        Command::SnapshotParent(a) => {
            out = with_ops!(session, require_snapshots, a, crate::snapshots::parent, global_json)
        }
        Command::SnapshotRevert(a) => out = with_ops!(session, connection, a, crate::snapshots::revert),
        Command::SnapshotDelete(a) => out = with_ops!(session, connection, a, crate::snapshots::delete),
        Command::Event(args) => {
            if args.list {
                return Ok("block-job\nlifecycle\n".into());
            }
            let json = wants_json(args.json);
            out = watch_events(session.conn()?, args, json).await?;
        }
        Command::Pools(command) => {
            let pools = session.conn()?.require_storage_pools()?;
            out = crate::pools::run(pools.as_ref(), *command, global_json, quiet).await?;
        }
        Command::Save(command) => {
            let domain = command.domain().map(str::to_string);
            let ran = crate::save::run(session.conn()?, *command, global_json).await;
            // An unknown domain is virsh's lookup failure; any other error
            // keeps the command's own context ("Failed to save domain …").
            let no_domain = |e: &anyhow::Error| {
                e.downcast_ref::<strata_core::Error>().is_some_and(|core| core.kind() == ErrorKind::NoDomain)
            };
            out = match (ran, domain) {
                (Err(e), Some(domain)) if no_domain(&e) => return Err(job_error(e, &domain)),
                (ran, _) => ran?,
            };
        }
        Command::Networks(command) => {
            let networks = session.conn()?.require_networks()?;
            out = crate::networks::run(networks.as_ref(), *command, global_json, quiet).await?;
        }
        Command::QemuMonitor { domain, hmp, pretty, return_value, cmd } => {
            let name = domain.name();
            let reply = session
                .conn()?
                .require_monitor()?
                .monitor_command(name, &cmd.join(" "), hmp)
                .await
                .map_err(|e| lookup_error(e, name))?;
            if pretty || return_value {
                let mut value: serde_json::Value = serde_json::from_str(&reply)?;
                if return_value {
                    value = value.get_mut("return").map(serde_json::Value::take).ok_or_else(|| {
                        CommandFailure::new(format!("the monitor's reply has no return value: {reply}"))
                    })?;
                }
                let text = if pretty { serde_json::to_string_pretty(&value)? } else { value.to_string() };
                writeln!(out, "{text}")?;
            } else {
                writeln!(out, "{reply}")?;
            }
        }
        Command::ServeWire => strata_core::remote::serve_stdio(session.conn()?).await?,
        Command::LxcEnterNamespace { domain, noseclabel: _, cmd } => {
            let name = domain.name();
            let status = session.conn()?.enter_namespace(name, &cmd).await.map_err(|e| lookup_error(e, name))?;
            if status != 0 {
                // The command's own status, as virsh passes it on; its
                // output went straight to this process's stdout and stderr.
                std::process::exit(status);
            }
        }
        Command::Help { command, json } => match command {
            None => out = crate::help::overview(&CommandLine::command(), wants_json(json)),
            Some(name) => {
                out = crate::help::topic(&CommandLine::command(), &name)
                    .ok_or_else(|| CommandFailure::new(format!("command or command group '{name}' doesn't exist")))?
            }
        },
        Command::DisksetSize { domain, json } => {
            let name = domain.name();
            let size =
                session.conn()?.require_disk_sets()?.diskset_size(name).await.map_err(|e| lookup_error(e, name))?;
            if wants_json(json) {
                writeln!(out, "{}", json!({ "size": size }))?;
            } else {
                writeln!(out, "{size}\n")?;
            }
        }
    }
    Ok(out)
}

/// The domain whose devices a listing (`domblklist`, `domiflist`) shows:
/// the live definition while it runs, else (or with `inactive`) the
/// persistent one.
async fn listed_domain(session: &mut Session, name: &str, inactive: bool) -> Result<Domain> {
    let flags = DumpXmlFlags { inactive, refresh_chain: false };
    let xml = session.conn()?.dump_xml(name, flags).await.map_err(|e| lookup_error(e, name))?;
    Ok(Domain::parse(&xml)?)
}

/// The target of the domain's disk that a command line names, as a target
/// or an image path.
async fn disk_target(session: &mut Session, domain: &str, disk: &str) -> Result<String> {
    session.conn()?.disk_target(domain, disk).await.map_err(|e| lookup_error(e, domain))
}

fn diskset_message(disk: &str, outcome: DiskSetOutcome) -> String {
    match outcome {
        DiskSetOutcome::Added => format!("Disk '{disk}' added to the disk set"),
        DiskSetOutcome::AlreadyPresent => format!("Disk '{disk}' is already in the disk set"),
        DiskSetOutcome::Removed => format!("Disk '{disk}' removed from the disk set"),
        DiskSetOutcome::AlreadyAbsent => format!("Disk '{disk}' is already absent from the disk set"),
    }
}

/// virsh reports an unknown domain as "failed to get domain 'NAME'".
fn lookup_error(e: strata_core::Error, name: &str) -> anyhow::Error {
    if e.kind() == strata_core::ErrorKind::NoDomain {
        anyhow!(CommandFailure::new(format!("failed to get domain '{name}'")))
    } else {
        anyhow!(e)
    }
}

/// `capabilities --all`: every driver, built in or plugin, and each
/// plugin library that was refused, with why.
fn list_drivers(json: bool) -> Result<String> {
    let drivers = strata_core::registry::drivers();
    let refused: Vec<String> =
        strata_core::registry::plugins().refused.iter().map(|e| e.message().to_string()).collect();
    if json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&json!({ "drivers": drivers, "refused": refused }))?));
    }
    let rows: Vec<Vec<String>> = drivers
        .iter()
        .map(|d| {
            vec![
                d.name.clone(),
                d.schemes.join(", "),
                d.origin.to_string(),
                d.abi_version.to_string(),
                d.library.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut out = format_table(&["Driver", "Schemes", "Origin", "ABI", "Library"], &rows, false);
    for why in refused {
        writeln!(out, "Refused: {why}")?;
    }
    out.push('\n');
    Ok(out)
}

/// `capabilities`' line for each capability family: the names of what the
/// driver has, in groups separated by `;`, or `none`.
fn capability_lines(caps: &DriverCapabilities) -> Vec<(&'static str, String)> {
    let listed = |groups: &[&[(bool, &str)]]| {
        let named: Vec<String> = groups
            .iter()
            .map(|group| group.iter().filter(|(has, _)| *has).map(|(_, name)| *name).collect::<Vec<_>>().join(", "))
            .filter(|group| !group.is_empty())
            .collect();
        if named.is_empty() {
            "none".to_string()
        } else {
            named.join("; ")
        }
    };
    let (domains, snapshots, jobs, storage) = (caps.domains, caps.snapshots, caps.block_jobs, caps.storage);
    let (kinds, creation, revert, delete) = (snapshots.kinds, snapshots.creation, snapshots.revert, snapshots.delete);
    let any_snapshot = revert.to == RevertTo::AnySnapshot;
    let running_guest = revert.guest == RevertedGuest::RunningOrPaused;
    vec![
        (
            "Domains",
            listed(&[&[
                (domains.run, "run"),
                (domains.events, "events"),
                (domains.vcpu_info, "vCPU information"),
                (domains.monitor, "monitor commands"),
                (domains.cpu_placement, "CPU placement"),
                (domains.vcpu_hotplug, "vCPU hotplug"),
                (domains.save_restore, "save and restore"),
                (domains.migration, "migration"),
            ]]),
        ),
        (
            "Snapshots",
            listed(&[
                &[
                    (kinds.internal_disk, "internal disk"),
                    (kinds.external_disk, "external disk"),
                    (kinds.internal_memory, "internal memory"),
                    (kinds.external_memory, "external memory"),
                ],
                &[(creation.live, "live"), (creation.offline, "offline")],
            ]),
        ),
        (
            "Revert",
            listed(&[
                &[(any_snapshot, "any snapshot"), (!any_snapshot, "the current snapshot only")],
                &[(revert.external, "external snapshots too")],
                &[
                    (running_guest, "to a running, paused or stopped guest"),
                    (!running_guest, "to a stopped guest only"),
                ],
            ]),
        ),
        (
            "Delete",
            listed(&[&[
                (delete.internal, "internal"),
                (delete.external_by_commit, "external by commit"),
                (delete.external_by_pull, "external by pull"),
                (delete.metadata_only, "metadata only"),
                (delete.children, "children"),
            ]]),
        ),
        (
            "Block jobs",
            listed(&[
                &[
                    (jobs.kinds.pull, "pull"),
                    (jobs.kinds.intermediate_commit, "intermediate commit"),
                    (jobs.kinds.active_commit, "active commit"),
                    (jobs.kinds.copy, "copy"),
                ],
                &[
                    (jobs.copy.shallow, "shallow copy"),
                    (jobs.copy.raw, "raw copy"),
                    (jobs.copy.reuse_external, "copy into an existing destination"),
                ],
                &[(jobs.bandwidth, "bandwidth"), (jobs.ready_pivot, "ready and pivot")],
            ]),
        ),
        ("Storage", listed(&[&[(storage.disk_sets, "disk sets"), (storage.storage_pools, "storage pools")]])),
    ]
}

/// Block-job failures: an unknown domain reads as virsh says it.
fn job_error(e: anyhow::Error, domain: &str) -> anyhow::Error {
    match e.downcast::<strata_core::Error>() {
        Ok(core) => lookup_error(core, domain),
        Err(other) => other,
    }
}

fn domain_error(e: strata_core::Error, name: &str, what: &str) -> anyhow::Error {
    if e.kind() == strata_core::ErrorKind::NoDomain {
        return lookup_error(e, name);
    }
    anyhow!(e).context(format!("{what} {name}"))
}

fn chain_json(chain: &Chain) -> serde_json::Value {
    let layers: Vec<_> = chain
        .walk()
        .into_iter()
        .map(|(id, depth)| {
            let l = &chain.layers[id];
            json!({
                "index": l.index,
                "depth": depth,
                "type": l.source.type_name(),
                "source": l.source.to_string(),
                "format": l.format,
                "backing": match &l.backing {
                    Backing::Unknown => json!(null),
                    Backing::End => json!([]),
                    Backing::Layers(v) => json!(v.iter().map(|c| chain.layers[*c].index).collect::<Vec<_>>()),
                },
            })
        })
        .collect();
    json!(layers)
}

/// Lines drawing a disk's backing tree below its active layer, one level
/// of indentation per layer up to [`MAX_TREE_INDENT`] so that a 10,000-layer
/// chain stays readable.
fn chain_tree_lines(chain: &Chain) -> Vec<String> {
    let mut lines = Vec::new();
    if chain.layers.first().is_some_and(|l| l.backing == Backing::Unknown) {
        lines.push("└─ (backing chain not probed yet)".to_string());
    }
    // (layer id, depth below the active layer, is the last sibling)
    let mut stack: Vec<(usize, usize, bool)> = Vec::new();
    let push_children = |stack: &mut Vec<(usize, usize, bool)>, id: usize, depth: usize| {
        let kids = chain.backing_of(id);
        for (i, k) in kids.iter().enumerate().rev() {
            stack.push((*k, depth + 1, i + 1 == kids.len()));
        }
    };
    push_children(&mut stack, 0, 0);
    while let Some((id, depth, last)) = stack.pop() {
        let l = &chain.layers[id];
        let mark = if last { "└─" } else { "├─" };
        let mut line = format!(
            "{}{mark} [{}] {} ({})",
            "   ".repeat((depth - 1).min(MAX_TREE_INDENT)),
            l.index,
            l.source,
            l.format.as_deref().unwrap_or("unknown format")
        );
        if l.backing == Backing::Unknown {
            line.push_str(" …");
        }
        lines.push(line);
        push_children(&mut stack, id, depth);
    }
    lines
}

const MAX_TREE_INDENT: usize = 8;
