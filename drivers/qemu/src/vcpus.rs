//! `vcpuinfo`: each vCPU thread QEMU reports (`query-cpus-fast`), read from
//! the host as libvirt reads it: the CPU it last ran on and its CPU time
//! from `/proc/TID/stat`, its affinity from sched_getaffinity(2) over every
//! host CPU present, online or not, as the host CPU seam lists them (seed
//! 003: an offline CPU must not shorten the mask, and shows as `-`).

use std::path::Path;

use serde_json::Value;
use strata_core::driver::VcpuInfo;
use strata_core::hostcpu::HostCpuMap;
use strata_core::{Error, Result};

use crate::live::qmp_error;
use crate::QemuConnection;

impl QemuConnection {
    pub(crate) async fn vcpus(&self, name: &str) -> Result<Vec<VcpuInfo>> {
        let (_, monitor) = self.running(name).await?;
        let reply = monitor.client.execute("query-cpus-fast", None).await.map_err(|e| qmp_error(name, e))?;
        let host = HostCpuMap::read(&self.host_cpus)?;
        let cpus = reply.as_array().ok_or_else(|| Error::internal("query-cpus-fast did not return a list"))?;
        cpus.iter().map(|cpu| vcpu(cpu, &host)).collect()
    }
}

fn vcpu(cpu: &Value, host: &HostCpuMap) -> Result<VcpuInfo> {
    let field = |key: &str| {
        cpu.get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| Error::internal(format!("query-cpus-fast gave a vCPU without '{key}': {cpu}")))
    };
    let number = u32::try_from(field("cpu-index")?).map_err(|_| Error::internal("vCPU index out of range"))?;
    let tid = i32::try_from(field("thread-id")?).map_err(|_| Error::internal("vCPU thread id out of range"))?;
    let (cpu_time_ns, last_cpu) = thread_times(tid)?;
    Ok(VcpuInfo { number, cpu: last_cpu, state: "running".into(), cpu_time_ns, affinity: affinity(tid, host)? })
}

/// A thread's CPU time (user + system, in ns) and the CPU it last ran on,
/// from `/proc/TID/stat`.
fn thread_times(tid: i32) -> Result<(u64, u32)> {
    let path = format!("/proc/{tid}/stat");
    let stat = std::fs::read_to_string(&path).map_err(|e| Error::io("read", Path::new(&path), e))?;
    // Fields after the command name (which may hold spaces), from field 3.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let number = |field: usize| fields.get(field - 3).and_then(|f| f.parse::<u64>().ok());
    let (Some(utime), Some(stime), Some(processor)) = (number(14), number(15), number(39)) else {
        return Err(Error::internal(format!("{path} is not a thread's stat line: {stat}")));
    };
    // SAFETY: sysconf(3) reads a system constant and has no other effect.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let ticks = u64::try_from(ticks).ok().filter(|t| *t > 0).unwrap_or(100);
    let ns = (utime + stime).saturating_mul(1_000_000_000) / ticks;
    Ok((ns, u32::try_from(processor).unwrap_or(u32::MAX)))
}

/// Where a thread may run, one entry per host CPU up to the highest
/// present one; an offline CPU is never allowed.
fn affinity(tid: i32, host: &HostCpuMap) -> Result<Vec<bool>> {
    // SAFETY: cpu_set_t is a plain bit array, for which all zeroes is valid.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity(2) writes at most the given size into `set`.
    let rc = unsafe { libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        return Err(
            Error::operation_failed(format!("cannot read the CPU affinity of vCPU thread {tid}")).with_source(err)
        );
    }
    // A cpu_set_t holds CPU_SETSIZE CPUs: beyond, none is allowed.
    let in_set = host.mask_len().min(libc::CPU_SETSIZE as usize);
    // SAFETY: CPU_ISSET reads one bit of `set`, an index below its size.
    let allowed = (0..host.mask_len())
        .map(|cpu| cpu < in_set && unsafe { libc::CPU_ISSET(cpu, &set) } && host.is_online(cpu as u32));
    Ok(allowed.collect())
}
