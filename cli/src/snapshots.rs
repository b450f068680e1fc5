//! The snapshot commands, with virsh's syntax, tables and tree.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::future::Future;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use clap::Args;
use strata_core::driver::{Connection, SnapshotOps, SnapshotSummary};
use strata_core::options::{SnapshotCreateFlags, SnapshotDeleteFlags, SnapshotRevertFlags};
use strata_core::xml::Element;

use crate::output::Progress;
use crate::shared::{format_timestamp, read_document};
use crate::table::format_table;
use crate::virsh_args::BY_POSITION;

#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Domain name.
    #[arg(long, value_name = "DOMAIN", help_heading = BY_POSITION)]
    pub domain: String,
    /// A <domainsnapshot> XML file.
    #[arg(long = "xmlfile", value_name = "FILE", help_heading = BY_POSITION)]
    file: Option<String>,
    /// Record the snapshot the XML describes without creating it.
    #[arg(long)]
    redefine: bool,
    /// With --redefine: make it the current snapshot.
    #[arg(long)]
    current: bool,
    /// Create the snapshot without recording it.
    #[arg(long = "no-metadata")]
    no_metadata: bool,
    /// Snapshot the disks only, not the memory.
    #[arg(long = "disk-only")]
    disk_only: bool,
    /// Use existing overlay images instead of creating them.
    #[arg(long = "reuse-external")]
    reuse_external: bool,
    /// All disks or none (Strata's snapshots always are).
    #[arg(long)]
    atomic: bool,
    /// Revert to the XML's <parent> and snapshot on a new branch, in one call.
    #[arg(long)]
    branch: bool,
    /// Snapshot exactly the domain's disk set (seed 004).
    #[arg(long = "disk-set")]
    disk_set: bool,
}

#[derive(Args, Debug)]
pub struct CreateAsArgs {
    /// Domain name.
    #[arg(long, value_name = "DOMAIN", help_heading = BY_POSITION)]
    pub domain: String,
    /// The snapshot's name (default: the time of creation).
    #[arg(long, value_name = "NAME", help_heading = BY_POSITION)]
    name: Option<String>,
    /// The snapshot's description.
    #[arg(long, value_name = "DESCRIPTION", help_heading = BY_POSITION)]
    description: Option<String>,
    /// Snapshot the disks only, not the memory.
    #[arg(long = "disk-only")]
    disk_only: bool,
    /// Create the snapshot without recording it.
    #[arg(long = "no-metadata")]
    no_metadata: bool,
    /// Use existing overlay images instead of creating them.
    #[arg(long = "reuse-external")]
    reuse_external: bool,
    /// All disks or none (Strata's snapshots always are).
    #[arg(long)]
    atomic: bool,
    /// Take the snapshot while the guest runs.
    #[arg(long)]
    live: bool,
    /// DISK[,snapshot=internal|external|no][,driver=qcow2][,file=PATH]
    #[arg(long = "diskspec", value_name = "SPEC")]
    diskspec: Vec<String>,
    /// [file=]PATH[,snapshot=external|internal|no]
    #[arg(long = "memspec", value_name = "SPEC")]
    memspec: Option<String>,
    /// Snapshot exactly the domain's disk set (seed 004).
    #[arg(long = "disk-set")]
    disk_set: bool,
    /// Print the XML instead of creating the snapshot.
    #[arg(long = "print-xml")]
    print_xml: bool,
}

#[derive(Args, Debug, Default)]
pub struct ListArgs {
    /// Domain name.
    #[arg(long, value_name = "DOMAIN", help_heading = BY_POSITION)]
    pub domain: String,
    /// Draw the snapshots as a tree.
    #[arg(long)]
    tree: bool,
    /// Only snapshots without a parent.
    #[arg(long)]
    roots: bool,
    /// Only snapshots without children.
    #[arg(long)]
    leaves: bool,
    /// Only snapshots with children.
    #[arg(long = "no-leaves")]
    no_leaves: bool,
    /// Also show each snapshot's parent.
    #[arg(long)]
    parent: bool,
    /// Only the current snapshot (with --descendants, its descendants).
    #[arg(long)]
    current: bool,
    /// Only the children of this snapshot (with --descendants, all its descendants).
    #[arg(long)]
    from: Option<String>,
    /// With --from or --current: every descendant, not only children.
    #[arg(long)]
    descendants: bool,
    /// Snapshot names only.
    #[arg(long)]
    name: bool,
    /// Only internal snapshots.
    #[arg(long)]
    internal: bool,
    /// Only external snapshots.
    #[arg(long)]
    external: bool,
    /// Only disk-only snapshots.
    #[arg(long = "disk-only")]
    disk_only: bool,
    /// Only snapshots taken while the domain ran.
    #[arg(long)]
    active: bool,
    /// Only snapshots taken while the domain was shut off.
    #[arg(long)]
    inactive: bool,
    /// Parents before their children.
    #[arg(long)]
    topological: bool,
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

/// The snapshot a command acts on: by name (or position), or `--current`.
#[derive(Args, Debug)]
pub struct WhichSnapshot {
    /// Snapshot name.
    #[arg(long = "snapshotname", value_name = "SNAPSHOT", help_heading = BY_POSITION)]
    snapshot: Option<String>,
    /// The current snapshot.
    #[arg(long)]
    current: bool,
}

#[derive(Args, Debug)]
pub struct NameArgs {
    /// Domain name.
    #[arg(long, value_name = "DOMAIN", help_heading = BY_POSITION)]
    pub domain: String,
    #[command(flatten)]
    which: WhichSnapshot,
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
}

/// `snapshot-dumpxml`: a snapshot's XML.
#[derive(Args, Debug)]
pub struct DumpxmlArgs {
    /// Domain name.
    #[arg(long, value_name = "DOMAIN", help_heading = BY_POSITION)]
    pub domain: String,
    #[command(flatten)]
    which: WhichSnapshot,
    /// Accepted; changes nothing: a snapshot's XML holds no secret to hide.
    #[arg(long = "security-info")]
    _security_info: bool,
}

#[derive(Args, Debug)]
pub struct CurrentArgs {
    /// Domain name.
    #[arg(long, value_name = "DOMAIN", help_heading = BY_POSITION)]
    pub domain: String,
    /// Snapshot name.
    #[arg(long = "snapshotname", value_name = "SNAPSHOT", help_heading = BY_POSITION)]
    snapshot: Option<String>,
    /// Print the current snapshot's name only.
    #[arg(long)]
    name: bool,
    /// Accepted; changes nothing: a snapshot's XML holds no secret to hide.
    #[arg(long = "security-info")]
    _security_info: bool,
    /// Print the current snapshot as JSON, as snapshot-list --json lists it.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub struct RevertArgs {
    /// Domain name.
    #[arg(long, value_name = "DOMAIN", help_heading = BY_POSITION)]
    pub domain: String,
    #[command(flatten)]
    which: WhichSnapshot,
    /// Leave the domain running after the revert.
    #[arg(long)]
    running: bool,
    /// Leave the domain paused after the revert.
    #[arg(long)]
    paused: bool,
    /// Revert even where it is risky.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// Domain name.
    #[arg(long, value_name = "DOMAIN", help_heading = BY_POSITION)]
    pub domain: String,
    #[command(flatten)]
    which: WhichSnapshot,
    /// Also delete the snapshot's descendants.
    #[arg(long)]
    children: bool,
    /// Delete the snapshot's descendants only.
    #[arg(long = "children-only")]
    children_only: bool,
    /// Forget the snapshot's record only; no image is changed.
    #[arg(long)]
    metadata: bool,
}

/// Awaits a snapshot operation on `domain`, showing on stderr the progress
/// the driver reports while it runs (a bar on a terminal, else lines).
async fn with_progress<T>(
    snaps: &dyn SnapshotOps,
    domain: &str,
    label: &'static str,
    operation: impl Future<Output = strata_core::Result<T>>,
) -> strata_core::Result<T> {
    let mut operation = std::pin::pin!(operation);
    let mut progress = Progress::new(label, true);
    loop {
        tokio::select! {
            done = &mut operation => {
                match &done {
                    Ok(_) => progress.complete(),
                    Err(_) => progress.finish(),
                }
                return done;
            }
            () = tokio::time::sleep(Duration::from_millis(100)) => {
                if let Ok(Some(percent)) = snaps.snapshot_progress(domain).await {
                    progress.show(u64::from(percent));
                }
            }
        }
    }
}

pub async fn create(conn: &dyn Connection, a: CreateArgs) -> Result<String> {
    let snaps = conn.require_snapshots()?;
    let (xml, from) = match &a.file {
        Some(f) => (read_document(f)?, Some(f.clone())),
        None => ("<domainsnapshot/>".to_string(), None),
    };
    let flags = SnapshotCreateFlags {
        redefine: a.redefine,
        current: a.current,
        no_metadata: a.no_metadata,
        disk_only: a.disk_only,
        reuse_external: a.reuse_external,
        atomic: a.atomic,
        live: false,
        branch: a.branch,
        disk_set: a.disk_set,
    };
    conn.check_snapshot_create(&a.domain, &xml, &flags).await?;
    let name =
        with_progress(snaps, &a.domain, "Snapshot create", snaps.snapshot_create(&a.domain, &xml, flags)).await?;
    Ok(match from {
        Some(f) => format!("Domain snapshot {name} created from '{f}'\n"),
        None => format!("Domain snapshot {name} created\n"),
    })
}

/// `snapshot-create-as`'s options as `<domainsnapshot>` XML, as virsh builds it.
fn create_as_xml(a: &CreateAsArgs) -> Result<String> {
    let mut root = Element::new("domainsnapshot");
    if let Some(n) = &a.name {
        root = root.with_child(Element::new("name").with_text(n.clone()));
    }
    if let Some(d) = &a.description {
        root = root.with_child(Element::new("description").with_text(d.clone()));
    }
    if let Some(spec) = &a.memspec {
        let mut mem = Element::new("memory");
        for (i, part) in split_spec(spec).into_iter().enumerate() {
            match part.split_once('=') {
                Some(("file", v)) => mem.set_attr("file", v),
                Some(("snapshot", v)) => mem.set_attr("snapshot", v),
                None if i == 0 => mem.set_attr("file", part),
                _ => bail!("invalid memspec '{spec}': unknown item '{part}'"),
            }
        }
        if mem.attr("snapshot").is_none() {
            mem.set_attr("snapshot", if mem.attr("file").is_some() { "external" } else { "no" });
        }
        root = root.with_child(mem);
    }
    if !a.diskspec.is_empty() {
        let mut disks = Element::new("disks");
        for spec in &a.diskspec {
            let parts = split_spec(spec);
            let Some(name) = parts.first().filter(|n| !n.is_empty() && !n.contains('=')) else {
                bail!("invalid diskspec '{spec}': it must start with the disk name");
            };
            let mut disk = Element::new("disk").with_attr("name", name.clone());
            let (mut driver, mut file) = (None, None);
            for part in &parts[1..] {
                match part.split_once('=') {
                    Some(("snapshot", v)) => disk.set_attr("snapshot", v),
                    Some(("driver", v)) => driver = Some(v.to_string()),
                    Some(("file", v)) => file = Some(v.to_string()),
                    Some(("stype", v)) => disk.set_attr("type", v),
                    _ => bail!("invalid diskspec '{spec}': unknown item '{part}'"),
                }
            }
            if let Some(d) = driver {
                disk = disk.with_child(Element::new("driver").with_attr("type", d));
            }
            if let Some(f) = file {
                if disk.attr("snapshot").is_none() {
                    disk.set_attr("snapshot", "external");
                }
                disk = disk.with_child(Element::new("source").with_attr("file", f));
            }
            disks = disks.with_child(disk);
        }
        root = root.with_child(disks);
    }
    Ok(root.to_xml())
}

/// Splits on ',' where ",," stands for a literal comma, as virsh does.
fn split_spec(spec: &str) -> Vec<String> {
    let mut out = vec![String::new()];
    let mut chars = spec.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                if let Some(last) = out.last_mut() {
                    last.push(',');
                }
            } else {
                out.push(String::new());
            }
        } else if let Some(last) = out.last_mut() {
            last.push(c);
        }
    }
    out
}

pub async fn create_as(conn: &dyn Connection, a: CreateAsArgs) -> Result<String> {
    let snaps = conn.require_snapshots()?;
    let xml = create_as_xml(&a)?;
    if a.print_xml {
        return Ok(xml);
    }
    let flags = SnapshotCreateFlags {
        no_metadata: a.no_metadata,
        disk_only: a.disk_only,
        reuse_external: a.reuse_external,
        atomic: a.atomic,
        live: a.live,
        disk_set: a.disk_set,
        ..Default::default()
    };
    conn.check_snapshot_create(&a.domain, &xml, &flags).await?;
    let name =
        with_progress(snaps, &a.domain, "Snapshot create", snaps.snapshot_create(&a.domain, &xml, flags)).await?;
    Ok(format!("Domain snapshot {name} created\n"))
}

fn format_time(secs: i64) -> String {
    let stamp = format_timestamp(secs.saturating_mul(1_000_000));
    // "2026-11-23 17:42:45 +0000", as snapshot-list prints it.
    format!("{} +0000", &stamp[..19])
}

pub async fn list(snaps: &dyn SnapshotOps, a: ListArgs, quiet: bool, json: bool) -> Result<String> {
    if a.roots && a.tree {
        bail!("Options --roots and --tree are mutually exclusive");
    }
    if a.tree && (a.internal || a.external) {
        bail!("--{} and --tree are mutually exclusive", if a.internal { "internal" } else { "external" });
    }
    if a.leaves && a.no_leaves {
        bail!("Options --leaves and --no-leaves are mutually exclusive");
    }
    let all = snaps.snapshot_list(&a.domain).await?;
    let shown = select(&all, &a)?;
    if json || a.json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(&shown)?));
    }
    if a.tree {
        // Printed as it is drawn: a 10,000-deep chain draws 400 MB.
        tree(&shown, &mut |chunk| crate::output::out(chunk));
        return Ok(String::new());
    }
    if a.name {
        let mut out = String::new();
        for s in &shown {
            writeln!(out, "{}", s.name)?;
        }
        out.push('\n');
        return Ok(out);
    }
    let mut header = vec!["Name", "Creation Time", "State"];
    if a.parent {
        header.push("Parent");
    }
    let rows: Vec<Vec<String>> = shown
        .iter()
        .map(|s| {
            let mut r = vec![s.name.clone(), format_time(s.creation_time), s.state.clone()];
            if a.parent {
                r.push(s.parent.clone().unwrap_or_default());
            }
            r
        })
        .collect();
    let mut out = format_table(&header, &rows, quiet);
    out.push('\n');
    Ok(out)
}

/// The snapshots `snapshot-list` shows with `a`'s options, in its order.
/// Linear in the number of snapshots: the parent→children index is built
/// once, and each question about the tree (children, descendants, depth)
/// is answered from it.
fn select<'a>(all: &'a [SnapshotSummary], a: &ListArgs) -> Result<Vec<&'a SnapshotSummary>> {
    let family = Family::new(all);
    let current = all.iter().find(|s| s.current).map(|s| s.name.as_str());
    let from = match (&a.from, a.current) {
        (Some(f), _) => {
            if !family.by_name.contains_key(f.as_str()) {
                bail!("Domain snapshot not found: no domain snapshot with matching name '{f}'");
            }
            Some(f.as_str())
        }
        (None, true) if !a.tree => current,
        _ => None,
    };
    let under = match from {
        Some(f) if a.descendants || a.tree => family.descendants(f),
        _ => HashSet::new(),
    };
    let mut shown: Vec<&SnapshotSummary> = all
        .iter()
        .filter(|s| match from {
            Some(f) if a.descendants || a.tree => under.contains(s.name.as_str()) || (a.tree && s.name == f),
            Some(f) => s.parent.as_deref() == Some(f),
            None => !a.current || a.tree,
        })
        .filter(|s| !a.roots || s.parent.is_none())
        .filter(|s| !a.leaves || !family.has_children(&s.name))
        .filter(|s| !a.no_leaves || family.has_children(&s.name))
        .filter(|s| !a.internal || s.location == "internal")
        .filter(|s| !a.external || s.location != "internal")
        .filter(|s| !a.disk_only || s.state == "disk-snapshot")
        .filter(|s| !a.active || s.state == "running" || s.state == "paused")
        .filter(|s| !a.inactive || s.state == "shutoff")
        .collect();
    if a.topological {
        let depths = family.depths();
        shown.sort_by_key(|s| depths.get(s.name.as_str()).copied().unwrap_or(usize::MAX));
    }
    Ok(shown)
}

/// The snapshot tree indexed once: each snapshot by name and the children
/// of each.
struct Family<'a> {
    by_name: HashMap<&'a str, &'a SnapshotSummary>,
    children: HashMap<&'a str, Vec<&'a str>>,
}

impl<'a> Family<'a> {
    fn new(all: &'a [SnapshotSummary]) -> Family<'a> {
        let by_name = all.iter().map(|s| (s.name.as_str(), s)).collect();
        let mut children: HashMap<&str, Vec<&str>> = HashMap::new();
        for s in all {
            if let Some(p) = s.parent.as_deref() {
                children.entry(p).or_default().push(&s.name);
            }
        }
        Family { by_name, children }
    }

    fn children(&self, name: &str) -> &[&'a str] {
        self.children.get(name).map_or(&[], Vec::as_slice)
    }

    fn has_children(&self, name: &str) -> bool {
        !self.children(name).is_empty()
    }

    /// Every snapshot below `root` (not `root` itself), each once even if
    /// the records' parents form a cycle.
    fn descendants(&self, root: &str) -> HashSet<&'a str> {
        let mut found = HashSet::new();
        let mut frontier: Vec<&str> = self.children(root).to_vec();
        while let Some(n) = frontier.pop() {
            if found.insert(n) {
                frontier.extend_from_slice(self.children(n));
            }
        }
        found
    }

    /// Each snapshot's distance from its root (a snapshot whose parent is
    /// not recorded counts as one below a root). Snapshots on a cycle of
    /// parents are left out.
    fn depths(&self) -> HashMap<&'a str, usize> {
        let mut depths = HashMap::with_capacity(self.by_name.len());
        let mut frontier: Vec<(&str, usize)> = Vec::new();
        for (name, s) in &self.by_name {
            match s.parent.as_deref() {
                None => frontier.push((name, 0)),
                Some(p) if !self.by_name.contains_key(p) => frontier.push((name, 1)),
                Some(_) => {}
            }
        }
        while let Some((n, d)) = frontier.pop() {
            if depths.insert(n, d).is_none() {
                frontier.extend(self.children(n).iter().map(|c| (*c, d + 1)));
            }
        }
        depths
    }
}

/// The output of [`tree`] is handed on in pieces of about this size.
const TREE_CHUNK: usize = 1 << 20;

/// virsh's snapshot tree (vshTreePrint), built without recursion so a
/// 10,000-deep tree prints too, and handed to `emit` piece by piece, so
/// that its memory does not grow with the output (which grows with the
/// square of the depth).
fn tree(shown: &[&SnapshotSummary], emit: &mut dyn FnMut(&str)) {
    let names: std::collections::HashSet<&str> = shown.iter().map(|s| s.name.as_str()).collect();
    let mut children: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut roots = Vec::new();
    for s in shown {
        match s.parent.as_deref().filter(|p| names.contains(p)) {
            Some(p) => children.entry(p).or_default().push(&s.name),
            None => roots.push(s.name.as_str()),
        }
    }
    let mut out = String::new();
    for root in roots {
        // Frames: (node, is last sibling, is root, phase); phase 0 prints
        // the node and pushes its children, phase 1 closes it.
        let mut indent = String::new();
        let mut stack: Vec<(&str, bool, bool, bool)> = vec![(root, true, true, false)];
        while let Some((node, last, is_root, closing)) = stack.pop() {
            let kids = children.get(node).cloned().unwrap_or_default();
            if closing {
                indent.truncate(indent.len().saturating_sub(2));
                if kids.is_empty() && last {
                    let _ = writeln!(out, "{indent}");
                }
                if !is_root {
                    indent.truncate(indent.len().saturating_sub(2));
                }
                continue;
            }
            let _ = writeln!(out, "{indent}{}{node}", if is_root { "" } else { "+- " });
            if !is_root {
                indent.push(if last { ' ' } else { '|' });
                indent.push(' ');
            }
            if !kids.is_empty() {
                let _ = writeln!(out, "{indent}  |");
            }
            indent.push_str("  ");
            stack.push((node, last, is_root, true));
            for (i, k) in kids.iter().enumerate().rev() {
                stack.push((k, i + 1 == kids.len(), false, false));
            }
            if out.len() >= TREE_CHUNK {
                emit(&out);
                out.clear();
            }
        }
    }
    out.push('\n');
    emit(&out);
}

impl WhichSnapshot {
    /// The snapshot's name: the one given, or the current one's.
    fn pick(&self, all: &[SnapshotSummary]) -> Result<String> {
        if let Some(n) = &self.snapshot {
            return Ok(n.clone());
        }
        if self.current {
            return all
                .iter()
                .find(|s| s.current)
                .map(|s| s.name.clone())
                .ok_or_else(|| anyhow!("the domain has no current snapshot"));
        }
        bail!("command requires <snapshotname> option or --current")
    }
}

fn find_summary<'a>(all: &'a [SnapshotSummary], name: &str) -> Result<&'a SnapshotSummary> {
    all.iter().find(|s| s.name == name).ok_or_else(|| {
        anyhow!(strata_core::Error::new(
            strata_core::ErrorKind::NoDomainSnapshot,
            format!("no domain snapshot with matching name '{name}'")
        ))
    })
}

pub async fn info(snaps: &dyn SnapshotOps, a: NameArgs, json: bool) -> Result<String> {
    let all = snaps.snapshot_list(&a.domain).await?;
    let name = a.which.pick(&all)?;
    let s = find_summary(&all, &name)?;
    let family = Family::new(&all);
    let children = family.children(&name).len();
    let descendants = family.descendants(&name).len();
    if json || a.json {
        let v = serde_json::json!({
            "name": s.name, "domain": a.domain, "current": s.current, "state": s.state,
            "location": s.location, "parent": s.parent, "children": children,
            "descendants": descendants, "metadata": true, "creation_time": s.creation_time,
        });
        return Ok(format!("{}\n", serde_json::to_string_pretty(&v)?));
    }
    let rows = [
        ("Name", s.name.clone()),
        ("Domain", a.domain.clone()),
        ("Current", if s.current { "yes" } else { "no" }.into()),
        ("State", s.state.clone()),
        ("Location", s.location.clone()),
        ("Parent", s.parent.clone().unwrap_or_else(|| "-".into())),
        ("Children", children.to_string()),
        ("Descendants", descendants.to_string()),
        ("Metadata", "yes".into()),
    ];
    Ok(crate::table::format_fields(&rows))
}

pub async fn dumpxml(snaps: &dyn SnapshotOps, a: DumpxmlArgs) -> Result<String> {
    let all = snaps.snapshot_list(&a.domain).await?;
    let name = a.which.pick(&all)?;
    Ok(format!("{}\n", snaps.snapshot_xml(&a.domain, &name).await?))
}

pub async fn current(snaps: &dyn SnapshotOps, a: CurrentArgs, json: bool) -> Result<String> {
    if let Some(n) = &a.snapshot {
        snaps.snapshot_set_current(&a.domain, n).await?;
        return Ok(format!("Snapshot {n} set as current\n"));
    }
    let all = snaps.snapshot_list(&a.domain).await?;
    let Some(cur) = all.iter().find(|s| s.current) else {
        bail!("Domain snapshot not found: the domain does not have a current snapshot");
    };
    if json || a.json {
        return Ok(format!("{}\n", serde_json::to_string_pretty(cur)?));
    }
    if a.name {
        return Ok(format!("{}\n", cur.name));
    }
    Ok(format!("{}\n", snaps.snapshot_xml(&a.domain, &cur.name).await?))
}

pub async fn parent(snaps: &dyn SnapshotOps, a: NameArgs, json: bool) -> Result<String> {
    let all = snaps.snapshot_list(&a.domain).await?;
    let name = a.which.pick(&all)?;
    let s = find_summary(&all, &name)?;
    match &s.parent {
        Some(p) if json || a.json => Ok(format!("{}\n", serde_json::json!({ "snapshot": name, "parent": p }))),
        Some(p) => Ok(format!("{p}\n")),
        None => bail!("snapshot '{name}' has no parent"),
    }
}

pub async fn revert(conn: &dyn Connection, a: RevertArgs) -> Result<String> {
    let snaps = conn.require_snapshots()?;
    let all = snaps.snapshot_list(&a.domain).await?;
    let name = a.which.pick(&all)?;
    let flags = SnapshotRevertFlags { running: a.running, paused: a.paused, force: a.force };
    let reverted = async {
        conn.capabilities().check_revert(&all, &name, &flags)?;
        with_progress(snaps, &a.domain, "Snapshot revert", snaps.snapshot_revert(&a.domain, &name, flags)).await
    };
    reverted.await.map_err(|e| anyhow!(e).context(format!("Failed to revert snapshot {name}")))?;
    Ok(format!("Domain snapshot {name} reverted\n"))
}

pub async fn delete(conn: &dyn Connection, a: DeleteArgs) -> Result<String> {
    let snaps = conn.require_snapshots()?;
    let all = snaps.snapshot_list(&a.domain).await?;
    let name = a.which.pick(&all)?;
    let flags = SnapshotDeleteFlags { children: a.children, children_only: a.children_only, metadata_only: a.metadata };
    let deleted = async {
        conn.capabilities().check_delete(&all, &name, &flags)?;
        with_progress(snaps, &a.domain, "Snapshot delete", snaps.snapshot_delete(&a.domain, &name, flags)).await
    };
    let notes = deleted.await.map_err(|e| anyhow!(e).context(format!("Failed to delete snapshot {name}")))?;
    let mut out = String::new();
    for n in notes {
        writeln!(out, "{n}")?;
    }
    if a.children {
        writeln!(out, "Domain snapshot {name} and all children deleted")?;
    } else if a.children_only {
        writeln!(out, "Domain snapshot {name} children deleted")?;
    } else {
        writeln!(out, "Domain snapshot {name} deleted")?;
    }
    Ok(out)
}

#[cfg(test)]
// A failed unwrap is how these tests report a listing error.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn s(name: &str, parent: Option<&str>) -> SnapshotSummary {
        SnapshotSummary {
            name: name.into(),
            parent: parent.map(str::to_string),
            creation_time: 0,
            state: "disk-snapshot".into(),
            current: false,
            location: "external".into(),
        }
    }

    #[test]
    fn tree_matches_virsh() {
        let a = [s("s1", None), s("s2", Some("s1")), s("s3", Some("s2"))];
        let refs: Vec<&SnapshotSummary> = a.iter().collect();
        assert_eq!(drawn(&refs), "s1\n  |\n  +- s2\n      |\n      +- s3\n        \n\n");
        let b = [s("r", None), s("a", Some("r")), s("b", Some("r"))];
        let refs: Vec<&SnapshotSummary> = b.iter().collect();
        assert_eq!(drawn(&refs), "r\n  |\n  +- a\n  +- b\n    \n\n");
    }

    fn drawn(shown: &[&SnapshotSummary]) -> String {
        let mut out = String::new();
        tree(shown, &mut |chunk| out.push_str(chunk));
        out
    }

    /// A tree larger than one piece comes out whole, in more than one.
    #[test]
    fn a_large_tree_is_handed_on_in_pieces() {
        let names: Vec<String> = (0..2_000).map(|i| format!("s{i:04}")).collect();
        let snaps: Vec<SnapshotSummary> =
            names.iter().enumerate().map(|(i, n)| s(n, i.checked_sub(1).map(|p| names[p].as_str()))).collect();
        let refs: Vec<&SnapshotSummary> = snaps.iter().collect();
        let mut pieces = Vec::new();
        tree(&refs, &mut |chunk| pieces.push(chunk.to_string()));
        assert!(pieces.len() > 1, "{} piece(s)", pieces.len());
        let whole = pieces.concat();
        assert_eq!(whole, drawn(&refs));
        assert_eq!(whole.lines().filter(|l| l.trim_start().starts_with("+- ")).count(), 1_999);
        assert!(whole.starts_with("s0000\n  |\n  +- s0001\n"));
    }

    fn names(shown: &[&SnapshotSummary]) -> Vec<String> {
        shown.iter().map(|s| s.name.clone()).collect()
    }

    /// 10,000 snapshots in one line: s00000 the root, s09999 the one leaf.
    fn deep_line() -> Vec<SnapshotSummary> {
        let names: Vec<String> = (0..10_000).map(|i| format!("s{i:05}")).collect();
        let mut line: Vec<SnapshotSummary> =
            names.iter().enumerate().map(|(i, n)| s(n, i.checked_sub(1).map(|p| names[p].as_str()))).collect();
        // Listed in the store's (name) order, not parents first, for --topological.
        line.reverse();
        line
    }

    #[test]
    fn listing_a_10000_deep_line_of_snapshots() {
        let line = deep_line();
        let leaves = select(&line, &ListArgs { leaves: true, ..Default::default() }).unwrap();
        assert_eq!(names(&leaves), ["s09999"]);
        let roots = select(&line, &ListArgs { roots: true, ..Default::default() }).unwrap();
        assert_eq!(names(&roots), ["s00000"]);
        let inner = select(&line, &ListArgs { no_leaves: true, ..Default::default() }).unwrap();
        assert_eq!(inner.len(), 9_999);
        assert!(!names(&inner).contains(&"s09999".to_string()));
        let from =
            |name: &str, descendants: bool| ListArgs { from: Some(name.into()), descendants, ..Default::default() };
        let below = select(&line, &from("s05000", true)).unwrap();
        assert_eq!(below.len(), 4_999);
        assert!(below.iter().all(|s| s.name.as_str() > "s05000"), "{:?}", names(&below));
        assert_eq!(names(&select(&line, &from("s05000", false)).unwrap()), ["s05001"]);
        let ordered = select(&line, &ListArgs { topological: true, ..Default::default() }).unwrap();
        let expected: Vec<String> = (0..10_000).map(|i| format!("s{i:05}")).collect();
        assert_eq!(names(&ordered), expected);
    }

    #[test]
    fn listing_10000_children_of_one_root() {
        let mut wide = vec![s("root", None)];
        let kids: Vec<String> = (0..10_000).map(|i| format!("c{i:05}")).collect();
        wide.extend(kids.iter().map(|k| s(k, Some("root"))));
        let leaves = select(&wide, &ListArgs { leaves: true, ..Default::default() }).unwrap();
        assert_eq!(names(&leaves), kids);
        let inner = select(&wide, &ListArgs { no_leaves: true, ..Default::default() }).unwrap();
        assert_eq!(names(&inner), ["root"]);
        let roots = select(&wide, &ListArgs { roots: true, ..Default::default() }).unwrap();
        assert_eq!(names(&roots), ["root"]);
        let children = ListArgs { from: Some("root".into()), ..Default::default() };
        assert_eq!(names(&select(&wide, &children).unwrap()), kids);
        let leaf = ListArgs { from: Some("c00042".into()), descendants: true, ..Default::default() };
        assert!(select(&wide, &leaf).unwrap().is_empty());
        let family = Family::new(&wide);
        assert_eq!((family.children("root").len(), family.descendants("root").len()), (10_000, 10_000));
        let unknown = ListArgs { from: Some("nope".into()), ..Default::default() };
        let err = select(&wide, &unknown).unwrap_err().to_string();
        assert_eq!(err, "Domain snapshot not found: no domain snapshot with matching name 'nope'");
    }

    #[test]
    fn specs_split_like_virsh() {
        assert_eq!(split_spec("vda,snapshot=external,file=/a,,b"), ["vda", "snapshot=external", "file=/a,b"]);
    }
}
