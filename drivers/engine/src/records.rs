//! Snapshot records in the store: each snapshot's `<domainsnapshot>` and
//! which one is current.

use std::collections::HashSet;

use strata_core::driver::SnapshotSummary;
use strata_core::store::{StagedFile, Store};
use strata_core::xml::SnapshotDef;
use strata_core::{Error, ErrorKind, Result};

const CURRENT_FILE: &str = "snapshot-current";

pub fn no_snapshot(name: &str) -> Error {
    Error::new(ErrorKind::NoDomainSnapshot, format!("no domain snapshot with matching name '{name}'"))
}

pub fn load(store: &Store, domain: &str, name: &str) -> Result<SnapshotDef> {
    let xml = store.read_snapshot(domain, name)?.ok_or_else(|| no_snapshot(name))?;
    SnapshotDef::parse(&xml).map_err(|e| e.context(format!("stored snapshot '{name}'")))
}

pub fn all(store: &Store, domain: &str) -> Result<Vec<SnapshotDef>> {
    store.list_snapshots(domain)?.iter().map(|n| load(store, domain, n)).collect()
}

pub fn current(store: &Store, domain: &str) -> Result<Option<String>> {
    Ok(store
        .read_domain_file(domain, CURRENT_FILE)?
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty() && store.has_snapshot(domain, s).unwrap_or(false)))
}

pub fn set_current(store: &Store, domain: &str, name: Option<&str>) -> Result<()> {
    store.write_domain_file(domain, CURRENT_FILE, name.unwrap_or(""))
}

pub fn save(store: &Store, domain: &str, def: &SnapshotDef) -> Result<()> {
    let name = def.name.as_deref().ok_or_else(|| Error::internal("snapshot without a name"))?;
    store.write_snapshot(domain, name, &def.to_xml())
}

/// [`save`], staged: written and synced, published later by [`Store::publish`].
pub fn stage(store: &Store, domain: &str, def: &SnapshotDef) -> Result<StagedFile> {
    let name = def.name.as_deref().ok_or_else(|| Error::internal("snapshot without a name"))?;
    store.stage_snapshot(domain, name, &def.to_xml())
}

/// [`set_current`] of `name`, staged (see [`stage`]).
pub fn stage_current(store: &Store, domain: &str, name: &str) -> Result<StagedFile> {
    store.stage_domain_file(domain, CURRENT_FILE, name)
}

/// Where a snapshot's disk data lives.
pub fn location(def: &SnapshotDef) -> &'static str {
    let modes: HashSet<&str> = def.disks.iter().filter_map(|d| d.snapshot.as_deref()).filter(|m| *m != "no").collect();
    match (modes.contains("internal"), modes.contains("external")) {
        (true, true) => "mixed",
        (false, true) => "external",
        _ => "internal",
    }
}

pub fn summaries(store: &Store, domain: &str) -> Result<Vec<SnapshotSummary>> {
    let cur = current(store, domain)?;
    // One record at a time: each embeds its domain, and 10,000 of them
    // parsed at once took about 100 MB.
    let mut out: Vec<SnapshotSummary> = store
        .list_snapshots(domain)?
        .iter()
        .map(|n| {
            let d = load(store, domain, n)?;
            let name = d.name.clone().unwrap_or_default();
            Ok(SnapshotSummary {
                current: cur.as_deref() == Some(name.as_str()),
                parent: d.parent.clone(),
                creation_time: d.creation_time.unwrap_or(0),
                state: d.state.clone().unwrap_or_else(|| "disk-snapshot".into()),
                location: location(&d).to_string(),
                name,
            })
        })
        .collect::<Result<_>>()?;
    out.sort_by(|a, b| a.creation_time.cmp(&b.creation_time).then(a.name.cmp(&b.name)));
    Ok(out)
}
