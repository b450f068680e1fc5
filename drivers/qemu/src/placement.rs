//! The host's CPUs as QEMU guests run on them: `nodeinfo`, `nodecpumap`,
//! and where a domain's threads may run (`vcpupin`, `emulatorpin`), set
//! with sched_setaffinity(2) on the vCPU threads QEMU reports and on its
//! other (emulator) threads, and recorded in `<cputune>` with `--config`;
//! and how many vCPUs a domain has (`vcpucount`, `setvcpus`).
//! Host CPUs are read through the [`strata_core::hostcpu::HostCpus`] seam, so a test can present
//! a host other than the one it runs on; every CPU pinned to must be
//! present and online there.

use std::path::Path;
use std::sync::Arc;

use strata_core::driver::{PinScope, VcpuCount, VcpuCounts};
use strata_core::hostcpu::{format_cpulist, parse_cpulist, HostCpuMap, NodeInfo, SysfsCpus};
use strata_core::store::Store;
use strata_core::xml::Domain;
use strata_core::{Error, ErrorKind, Result};
use strata_qemu_block::monitor::Monitor;
use strata_qmp::QmpClient;

use crate::affinity::{set_thread_affinity, thread_affinity};
use crate::live::{edit_status_async, LiveStatus};
use crate::vcpus::{plug_vcpus, vcpu_threads, VcpuThread};
use strata_engine::definitions as persistent;

/// The host's CPU lists: from `$STRATA_HOST_CPU_DIR` (a directory laid
/// out as `/sys/devices/system/cpu`, for tests that present another host)
/// or from sysfs.
pub(crate) fn host_cpus() -> SysfsCpus {
    match std::env::var_os("STRATA_HOST_CPU_DIR") {
        Some(dir) => SysfsCpus::at(Path::new(&dir)),
        None => SysfsCpus::host(),
    }
}

/// The running domain a pin (or an attach or detach) acts on (with its
/// QEMU and monitor), and whether it changes the persistent definition too.
pub(crate) struct PinTargets {
    pub live: Option<(LiveStatus, Arc<Monitor>)>,
    pub config: bool,
}

/// Resolves virsh's `--live`/`--config`/`--current` for a domain that
/// `running` serves now (its QEMU and monitor), or that is shut off.
pub(crate) fn pin_targets(running: Option<(LiveStatus, Arc<Monitor>)>, scope: PinScope) -> Result<PinTargets> {
    let (live, config) = match (scope.live, scope.config) {
        (false, false) => (running.is_some(), running.is_none()),
        scope => scope,
    };
    let live = match (live, running) {
        (false, _) => None,
        (true, Some(running)) => Some(running),
        (true, None) => return Err(Error::operation_invalid("domain is not running")),
    };
    Ok(PinTargets { live, config })
}

/// Refuses a query that names both definitions (checked before the
/// domain is looked at): a query reads one.
pub(crate) fn refuse_query_of_both(scope: PinScope) -> Result<()> {
    if scope.live && scope.config {
        return Err(Error::invalid_arg("a query reads either --live or --config, not both"));
    }
    Ok(())
}

/// Where a connection's domains run: its store and the host's CPU lists.
/// Each call takes the domain's QEMU as the connection found it (`None`
/// when it is not running).
pub(crate) struct Placement<'a> {
    pub store: &'a Store,
    pub host_cpus: &'a SysfsCpus,
}

impl Placement<'_> {
    fn host_map(&self) -> Result<HostCpuMap> {
        HostCpuMap::read(self.host_cpus)
    }

    pub(crate) fn node_info(&self) -> Result<NodeInfo> {
        NodeInfo::read(self.host_cpus)
    }

    pub(crate) fn node_cpu_map(&self) -> Result<HostCpuMap> {
        self.host_map()
    }

    /// After [`refuse_query_of_both`].
    pub(crate) async fn vcpu_pins(
        &self,
        domain: &str,
        scope: PinScope,
        running: Option<(LiveStatus, Arc<Monitor>)>,
    ) -> Result<Vec<Vec<u32>>> {
        let target = pin_targets(running, scope)?;
        let host = self.host_map()?;
        match target.live {
            Some((_, monitor)) => {
                let mut threads = vcpu_threads(&monitor.client, domain).await?;
                threads.sort_by_key(|thread| thread.index);
                threads.iter().map(|thread| Ok(allowed_cpus(&thread_affinity(thread.tid, &host)?))).collect()
            }
            None => {
                let dom = persistent::load(self.store, domain)?;
                (0..dom.vcpus()).map(|vcpu| configured_cpus(dom.vcpu_pin(vcpu), &dom, &host)).collect()
            }
        }
    }

    pub(crate) async fn pin_vcpu(
        &self,
        domain: &str,
        vcpu: u32,
        cpus: &[u32],
        scope: PinScope,
        running: Option<(LiveStatus, Arc<Monitor>)>,
    ) -> Result<()> {
        let target = pin_targets(running, scope)?;
        self.host_map()?.check_pinnable(cpus)?;
        let thread = match &target.live {
            Some((_, monitor)) => {
                let threads = vcpu_threads(&monitor.client, domain).await?;
                let count = threads.len();
                let thread = threads.into_iter().find(|thread| thread.index == vcpu);
                Some(thread.ok_or_else(|| {
                    Error::invalid_arg(format!("vcpu {vcpu} is out of range of live cpu count {count}"))
                })?)
            }
            None => None,
        };
        if target.config {
            let count = persistent::load(self.store, domain)?.vcpus();
            if vcpu >= count {
                return Err(Error::invalid_arg(format!("vcpu {vcpu} is out of range of persistent cpu count {count}")));
            }
        }
        if let Some(thread) = thread {
            set_thread_affinity(thread.tid, cpus)?;
        }
        if target.config {
            persistent::edit(self.store, domain, |dom| {
                dom.set_vcpu_pin(vcpu, &format_cpulist(cpus));
                Ok(())
            })?;
        }
        Ok(())
    }

    /// After [`refuse_query_of_both`].
    pub(crate) fn emulator_pin(
        &self,
        domain: &str,
        scope: PinScope,
        running: Option<(LiveStatus, Arc<Monitor>)>,
    ) -> Result<Vec<u32>> {
        let target = pin_targets(running, scope)?;
        let host = self.host_map()?;
        match target.live {
            Some((status, _)) => Ok(allowed_cpus(&thread_affinity(status.run.process.pid, &host)?)),
            None => {
                let dom = persistent::load(self.store, domain)?;
                configured_cpus(dom.emulator_pin(), &dom, &host)
            }
        }
    }

    pub(crate) async fn pin_emulator(
        &self,
        domain: &str,
        cpus: &[u32],
        scope: PinScope,
        running: Option<(LiveStatus, Arc<Monitor>)>,
    ) -> Result<()> {
        let target = pin_targets(running, scope)?;
        self.host_map()?.check_pinnable(cpus)?;
        if let Some((status, monitor)) = &target.live {
            pin_emulator_threads(&monitor.client, domain, status.run.process.pid, cpus).await?;
        }
        if target.config {
            persistent::edit(self.store, domain, |dom| {
                dom.set_emulator_pin(&format_cpulist(cpus));
                Ok(())
            })?;
        }
        Ok(())
    }

    pub(crate) fn vcpu_counts(&self, domain: &str, running: Option<(LiveStatus, Arc<Monitor>)>) -> Result<VcpuCounts> {
        let count = |dom: &Domain| VcpuCount { maximum: dom.vcpus(), current: dom.current_vcpus() };
        let config = count(&persistent::load(self.store, domain)?);
        let live = running.map(|(status, _)| status.domain.get().map(count)).transpose()?;
        Ok(VcpuCounts { config, live })
    }

    /// `setvcpus`: every request is checked before anything changes; the
    /// live count goes up by plugging vCPUs (x86 unplug needs the guest's
    /// help, so a lower live count is refused rather than waited for).
    pub(crate) async fn set_vcpus(
        &self,
        domain: &str,
        count: u32,
        scope: PinScope,
        maximum: bool,
        running: Option<(LiveStatus, Arc<Monitor>)>,
    ) -> Result<()> {
        if count == 0 {
            return Err(Error::invalid_arg("a domain needs at least 1 vCPU"));
        }
        let target = pin_targets(running, scope)?;
        if let Some((status, _)) = &target.live {
            if maximum {
                return Err(Error::new(
                    ErrorKind::ConfigUnsupported,
                    "maximum vcpu count of a live domain can't be modified",
                ));
            }
            let live = status.domain.get()?;
            refuse_above_maximum(count, live.vcpus(), "live")?;
            let current = live.current_vcpus();
            if count < current {
                return Err(Error::new(
                    ErrorKind::OperationUnsupported,
                    format!(
                        "cannot unplug vCPUs of domain '{domain}' ({current} to {count}): an x86 vCPU leaves only \
                         when the guest OS ejects it, which QEMU cannot complete on its own; lower the count with \
                         --config and restart the domain"
                    ),
                ));
            }
        }
        if target.config && !maximum {
            refuse_above_maximum(count, persistent::load(self.store, domain)?.vcpus(), "persistent")?;
        }
        if let Some((_, monitor)) = &target.live {
            let plugged = plug_vcpus(&monitor.client, domain, count).await;
            // What is online is recorded even when a plug failed part way.
            let online = u32::try_from(vcpu_threads(&monitor.client, domain).await?.len())
                .map_err(|_| Error::internal("vCPU count out of range"))?;
            edit_status_async(self.store, domain, |status| {
                let live = status.domain.get_mut()?;
                live.set_vcpus(live.vcpus(), online);
                Ok(())
            })
            .await?;
            plugged?;
        }
        if target.config {
            persistent::edit(self.store, domain, |dom| {
                match maximum {
                    true => dom.set_vcpus(count, dom.current_vcpus().min(count)),
                    false => dom.set_vcpus(dom.vcpus(), count),
                }
                Ok(())
            })?;
        }
        Ok(())
    }
}

/// libvirt's refusal of more vCPUs than a definition allows.
fn refuse_above_maximum(count: u32, maximum: u32, definition: &str) -> Result<()> {
    if count > maximum {
        return Err(Error::invalid_arg(format!(
            "requested vcpus is greater than max allowable vcpus for the {definition} domain: {count} > {maximum}"
        )));
    }
    Ok(())
}

/// The CPUs a definition gives a thread: its own pin, else `<vcpu
/// cpuset>`, else every CPU present (as libvirt reports an unpinned one).
fn configured_cpus(pin: Option<String>, dom: &Domain, host: &HostCpuMap) -> Result<Vec<u32>> {
    match pin.or_else(|| dom.vcpu_cpuset()) {
        Some(cpuset) => parse_cpulist(&cpuset),
        None => Ok(host.present().to_vec()),
    }
}

/// Pins every thread of QEMU `pid` that runs no vCPU.
async fn pin_emulator_threads(client: &QmpClient, domain: &str, pid: i32, cpus: &[u32]) -> Result<()> {
    let vcpus = vcpu_threads(client, domain).await?;
    pin_threads_but(pid, &vcpus, cpus)
}

/// Pins every thread of QEMU `pid` but the vCPU threads `vcpus`.
fn pin_threads_but(pid: i32, vcpus: &[VcpuThread], cpus: &[u32]) -> Result<()> {
    let tasks = Path::new("/proc").join(pid.to_string()).join("task");
    let entries = std::fs::read_dir(&tasks).map_err(|e| Error::io("read", &tasks, e))?;
    let tids = entries.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<i32>().ok());
    for tid in tids.filter(|tid| vcpus.iter().all(|vcpu| vcpu.tid != *tid)) {
        match set_thread_affinity(tid, cpus) {
            // A thread that ended since the listing needs no pin.
            Err(_) if !tasks.join(tid.to_string()).exists() => {}
            other => other?,
        }
    }
    Ok(())
}

/// Applies a definition's placement to its QEMU `pid`, started paused:
/// each vCPU thread to its `<cputune><vcpupin>`, else `<vcpu cpuset>`;
/// the other threads to `<emulatorpin>`, else `<vcpu cpuset>`. A CPU set
/// with an offline or absent CPU is refused, naming the element.
pub(crate) async fn apply_defined_placement(
    client: &QmpClient,
    name: &str,
    pid: i32,
    dom: &Domain,
    host: &HostCpuMap,
) -> Result<()> {
    let cpus_for = |pin: Option<String>, element: &str| -> Result<Option<Vec<u32>>> {
        let Some(cpuset) = pin.or_else(|| dom.vcpu_cpuset()) else { return Ok(None) };
        let cpus = parse_cpulist(&cpuset).and_then(|cpus| host.check_pinnable(&cpus).map(|()| cpus));
        cpus.map(Some).map_err(|e| e.context(format!("{element} of domain '{name}'")))
    };
    let threads = vcpu_threads(client, name).await?;
    for thread in &threads {
        if let Some(cpus) = cpus_for(dom.vcpu_pin(thread.index), &format!("vcpupin of vCPU {}", thread.index))? {
            set_thread_affinity(thread.tid, &cpus)?;
        }
    }
    if let Some(cpus) = cpus_for(dom.emulator_pin(), "emulatorpin")? {
        pin_threads_but(pid, &threads, &cpus)?;
    }
    Ok(())
}

/// The CPU numbers set in a mask.
fn allowed_cpus(mask: &[bool]) -> Vec<u32> {
    (0u32..).zip(mask).filter(|(_, allowed)| **allowed).map(|(cpu, _)| cpu).collect()
}
