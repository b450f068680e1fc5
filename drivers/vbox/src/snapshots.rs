//! Snapshots, which VirtualBox owns: taken, restored and deleted through
//! the console of a locked session, each waiting on its IProgress; the
//! tree is read from ISnapshot.

use strata_core::driver::SnapshotSummary;
use strata_core::xml::SnapshotDef;
use strata_core::{Error, ErrorKind, Result};

use crate::ffi::ISnapshotVtbl;
use crate::machines::Machine;
use crate::xpcom::{get, get_array, get_obj, get_str, Com, Ctx, VBOX_E_OBJECT_NOT_FOUND};

type Snapshot = Com<ISnapshotVtbl>;

/// One snapshot as read from VirtualBox.
#[derive(Debug, Clone)]
pub struct SnapshotEntry {
    pub id: String,
    pub name: String,
    pub description: String,
    pub parent: Option<String>,
    pub time_secs: i64,
    pub online: bool,
    pub current: bool,
}

impl SnapshotEntry {
    pub fn summary(&self) -> SnapshotSummary {
        SnapshotSummary {
            name: self.name.clone(),
            parent: self.parent.clone(),
            creation_time: self.time_secs,
            state: if self.online { "running" } else { "shutoff" }.into(),
            current: self.current,
            location: "internal".into(),
        }
    }
}

fn no_snapshot(domain: &str, snapshot: &str) -> Error {
    Error::new(
        ErrorKind::NoDomainSnapshot,
        format!("no domain snapshot with matching name '{snapshot}' in domain '{domain}'"),
    )
}

impl Ctx {
    fn find_snapshot(&self, machine: &Machine, domain: &str, snapshot: &str) -> Result<Snapshot> {
        let wanted = self.utf16(snapshot)?;
        match get_obj!(machine.FindSnapshot(wanted.ptr())) {
            Ok(Some(s)) => Ok(s),
            Ok(None) => Err(no_snapshot(domain, snapshot)),
            Err(f) if f.code == VBOX_E_OBJECT_NOT_FOUND => Err(no_snapshot(domain, snapshot)),
            Err(f) => Err(f.into()),
        }
    }

    /// Every snapshot, parents before children.
    pub fn snapshots(&self, machine: &Machine) -> Result<Vec<SnapshotEntry>> {
        let current = match get_obj!(machine.GetCurrentSnapshot())? {
            Some(c) => Some(get_str!(self, c.GetId())?),
            None => None,
        };
        let root = match get_obj!(machine.FindSnapshot(std::ptr::null())) {
            Ok(root) => root,
            Err(f) if f.code == VBOX_E_OBJECT_NOT_FOUND => None,
            Err(f) => return Err(f.into()),
        };
        let mut out = Vec::new();
        let mut pending: Vec<(Snapshot, Option<String>)> = root.into_iter().map(|r| (r, None)).collect();
        while let Some((s, parent)) = pending.pop() {
            let id = get_str!(self, s.GetId())?;
            let name = get_str!(self, s.GetName())?;
            let time_ms: i64 = get!(s.GetTimeStamp)?;
            let online: i32 = get!(s.GetOnline)?;
            for child in get_array!(self, s.GetChildren)?.into_iter().rev() {
                pending.push((child, Some(name.clone())));
            }
            out.push(SnapshotEntry {
                current: current.as_deref() == Some(id.as_str()),
                description: get_str!(self, s.GetDescription())?,
                id,
                name,
                parent,
                time_secs: time_ms / 1000,
                online: online != 0,
            });
        }
        Ok(out)
    }

    pub fn snapshot_create(&mut self, domain: &str, def: &SnapshotDef) -> Result<String> {
        let machine = self.find_machine(domain)?;
        let name = match &def.name {
            Some(n) => n.clone(),
            None => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs().to_string())
                .unwrap_or_default(),
        };
        if self.snapshots(&machine)?.iter().any(|s| s.name == name) {
            return Err(Error::operation_invalid(format!("domain '{domain}' already has a snapshot named '{name}'")));
        }
        let description = def.description.clone().unwrap_or_default();
        self.with_session(&machine, domain, |ctx, _| {
            let session = &ctx.session;
            let console =
                get_obj!(session.GetConsole())?.ok_or_else(|| Error::internal("the session has no console"))?;
            let (n, d) = (ctx.utf16(&name)?, ctx.utf16(&description)?);
            let progress = get_obj!(console.TakeSnapshot(n.ptr(), d.ptr()))?;
            ctx.wait_for(domain, progress, &format!("taking snapshot '{name}' of '{domain}'"))
        })?;
        Ok(name)
    }

    pub fn snapshot_xml(&self, domain: &str, snapshot: &str) -> Result<String> {
        let machine = self.find_machine(domain)?;
        let all = self.snapshots(&machine)?;
        let s = all.iter().find(|s| s.name == snapshot).ok_or_else(|| no_snapshot(domain, snapshot))?;
        let def = SnapshotDef {
            name: Some(s.name.clone()),
            description: (!s.description.is_empty()).then(|| s.description.clone()),
            state: Some(s.summary().state),
            creation_time: Some(s.time_secs),
            parent: s.parent.clone(),
            memory: None,
            disks: Vec::new(),
            domain: None,
            inactive_domain: None,
            active: None,
            cookie: None,
            unknown: Vec::new(),
        };
        Ok(def.to_xml())
    }

    /// Restores `snapshot`; the guest is started afterwards when `start`.
    pub fn snapshot_revert(&mut self, domain: &str, snapshot: &str, start: bool) -> Result<()> {
        let machine = self.find_machine(domain)?;
        let target = self.find_snapshot(&machine, domain, snapshot)?;
        self.with_session(&machine, domain, |ctx, _| {
            let session = &ctx.session;
            let console =
                get_obj!(session.GetConsole())?.ok_or_else(|| Error::internal("the session has no console"))?;
            let progress = get_obj!(console.RestoreSnapshot(target.raw()))?;
            ctx.wait_for(domain, progress, &format!("reverting '{domain}' to snapshot '{snapshot}'"))
        })?;
        if start {
            self.start(domain)?;
        }
        Ok(())
    }

    /// Deletes `snapshot` (unless `children_only`) and, with `children`,
    /// its descendants, leaves first.
    pub fn snapshot_delete(&mut self, domain: &str, snapshot: &str, children: bool, children_only: bool) -> Result<()> {
        let machine = self.find_machine(domain)?;
        let all = self.snapshots(&machine)?;
        let target = all.iter().find(|s| s.name == snapshot).ok_or_else(|| no_snapshot(domain, snapshot))?;
        // Parents precede children in `all`, so the subtree in reverse is leaves first.
        let mut subtree = vec![target.name.clone()];
        if children || children_only {
            for s in &all {
                if s.parent.as_ref().is_some_and(|p| subtree.contains(p)) {
                    subtree.push(s.name.clone());
                }
            }
        }
        if children_only {
            subtree.remove(0);
        }
        for name in subtree.iter().rev() {
            let id = all.iter().find(|s| &s.name == name).map(|s| s.id.clone()).unwrap_or_default();
            self.with_session(&machine, domain, |ctx, _| {
                let session = &ctx.session;
                let console =
                    get_obj!(session.GetConsole())?.ok_or_else(|| Error::internal("the session has no console"))?;
                let id = ctx.utf16(&id)?;
                let progress = get_obj!(console.DeleteSnapshot(id.ptr()))?;
                ctx.wait_for(domain, progress, &format!("deleting snapshot '{name}' of '{domain}'"))
            })?;
        }
        Ok(())
    }
}
