//! The host's CPUs as QEMU guests run on them: `nodeinfo`, `nodecpumap`,
//! and where a domain's threads may run (`vcpupin`, `emulatorpin`), set
//! with sched_setaffinity(2) on the vCPU threads QEMU reports and on its
//! other (emulator) threads, and recorded in `<cputune>` with `--config`.
//! Host CPUs are read through the [`strata_core::hostcpu::HostCpus`] seam, so a test can present
//! a host other than the one it runs on; every CPU pinned to must be
//! present and online there.

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;
use strata_core::driver::{CpuPlacementOps, PinScope};
use strata_core::hostcpu::{format_cpulist, parse_cpulist, HostCpuMap, NodeInfo, SysfsCpus};
use strata_core::xml::Domain;
use strata_core::{Error, Result};
use strata_qmp::QmpClient;

use crate::live::{LiveStatus, Monitor};
use crate::vcpus::{vcpu_threads, VcpuThread};
use strata_engine::definitions as persistent;

use crate::QemuConnection;

/// The host's CPU lists: from `$STRATA_HOST_CPU_DIR` (a directory laid
/// out as `/sys/devices/system/cpu`, for tests that present another host)
/// or from sysfs.
pub(crate) fn host_cpus() -> SysfsCpus {
    match std::env::var_os("STRATA_HOST_CPU_DIR") {
        Some(dir) => SysfsCpus::at(Path::new(&dir)),
        None => SysfsCpus::host(),
    }
}

/// The running domain a pin acts on (with its QEMU and monitor), and
/// whether it changes the persistent definition too.
struct PinTargets {
    live: Option<(LiveStatus, Arc<Monitor>)>,
    config: bool,
}

impl QemuConnection {
    /// Resolves virsh's `--live`/`--config`/`--current` for `domain`.
    async fn pin_targets(&self, domain: &str, scope: PinScope) -> Result<PinTargets> {
        let running = self.serving(domain).await?.filter(|(status, _)| status.is_vm());
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

    /// The one definition a query reads: the running domain's or the
    /// persistent one.
    async fn query_target(&self, domain: &str, scope: PinScope) -> Result<PinTargets> {
        if scope.live && scope.config {
            return Err(Error::invalid_arg("a query reads either --live or --config, not both"));
        }
        self.pin_targets(domain, scope).await
    }

    fn host_map(&self) -> Result<HostCpuMap> {
        HostCpuMap::read(&self.host_cpus)
    }
}

#[async_trait]
impl CpuPlacementOps for QemuConnection {
    async fn node_info(&self) -> Result<NodeInfo> {
        NodeInfo::read(&self.host_cpus)
    }

    async fn node_cpu_map(&self) -> Result<HostCpuMap> {
        self.host_map()
    }

    async fn vcpu_pins(&self, domain: &str, scope: PinScope) -> Result<Vec<Vec<u32>>> {
        let target = self.query_target(domain, scope).await?;
        let host = self.host_map()?;
        match target.live {
            Some((_, monitor)) => {
                let mut threads = vcpu_threads(&monitor.client, domain).await?;
                threads.sort_by_key(|thread| thread.index);
                threads.iter().map(|thread| Ok(allowed_cpus(&thread_affinity(thread.tid, &host)?))).collect()
            }
            None => {
                let dom = persistent::load(&self.store, domain)?;
                (0..dom.vcpus()).map(|vcpu| configured_cpus(dom.vcpu_pin(vcpu), &dom, &host)).collect()
            }
        }
    }

    async fn pin_vcpu(&self, domain: &str, vcpu: u32, cpus: &[u32], scope: PinScope) -> Result<()> {
        let target = self.pin_targets(domain, scope).await?;
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
            let count = persistent::load(&self.store, domain)?.vcpus();
            if vcpu >= count {
                return Err(Error::invalid_arg(format!("vcpu {vcpu} is out of range of persistent cpu count {count}")));
            }
        }
        if let Some(thread) = thread {
            set_thread_affinity(thread.tid, cpus)?;
        }
        if target.config {
            persistent::edit(&self.store, domain, |dom| {
                dom.set_vcpu_pin(vcpu, &format_cpulist(cpus));
                Ok(())
            })?;
        }
        Ok(())
    }

    async fn emulator_pin(&self, domain: &str, scope: PinScope) -> Result<Vec<u32>> {
        let target = self.query_target(domain, scope).await?;
        let host = self.host_map()?;
        match target.live {
            Some((status, _)) => Ok(allowed_cpus(&thread_affinity(status.process.pid, &host)?)),
            None => {
                let dom = persistent::load(&self.store, domain)?;
                configured_cpus(dom.emulator_pin(), &dom, &host)
            }
        }
    }

    async fn pin_emulator(&self, domain: &str, cpus: &[u32], scope: PinScope) -> Result<()> {
        let target = self.pin_targets(domain, scope).await?;
        self.host_map()?.check_pinnable(cpus)?;
        if let Some((status, monitor)) = &target.live {
            pin_emulator_threads(&monitor.client, domain, status.process.pid, cpus).await?;
        }
        if target.config {
            persistent::edit(&self.store, domain, |dom| {
                dom.set_emulator_pin(&format_cpulist(cpus));
                Ok(())
            })?;
        }
        Ok(())
    }
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

/// Where a thread may run, one entry per host CPU up to the highest
/// present one; an offline CPU is never allowed.
pub(crate) fn thread_affinity(tid: i32, host: &HostCpuMap) -> Result<Vec<bool>> {
    // SAFETY: cpu_set_t is a plain bit array, for which all zeroes is valid.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity(2) writes at most the given size into `set`.
    let rc = unsafe { libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        return Err(Error::operation_failed(format!("cannot read the CPU affinity of thread {tid}")).with_source(err));
    }
    // A cpu_set_t holds CPU_SETSIZE CPUs: beyond, none is allowed.
    let in_set = host.mask_len().min(libc::CPU_SETSIZE as usize);
    let allowed = (0..host.mask_len()).map(|cpu| {
        // SAFETY: CPU_ISSET reads one bit of `set`, an index below its size.
        cpu < in_set && unsafe { libc::CPU_ISSET(cpu, &set) } && u32::try_from(cpu).is_ok_and(|c| host.is_online(c))
    });
    Ok(allowed.collect())
}

/// Lets thread `tid` run on `cpus` only (sched_setaffinity(2)).
pub(crate) fn set_thread_affinity(tid: i32, cpus: &[u32]) -> Result<()> {
    // SAFETY: cpu_set_t is a plain bit array, for which all zeroes is valid.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        let cpu = cpu as usize;
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(Error::invalid_arg(format!("CPU {cpu} is beyond the {} a CPU set holds", libc::CPU_SETSIZE)));
        }
        // SAFETY: CPU_SET writes one bit of `set`, an index below its size.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: sched_setaffinity(2) reads the given size from `set`.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        return Err(Error::operation_failed(format!("cannot pin thread {tid} to CPUs {}", format_cpulist(cpus)))
            .with_source(err));
    }
    Ok(())
}
