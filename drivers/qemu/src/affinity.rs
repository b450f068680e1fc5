//! Where a host thread may run: sched_getaffinity(2) and
//! sched_setaffinity(2) over the host's CPUs as the host CPU seam lists
//! them. A leaf: `placement` pins with it, `vcpus` reports with it.

use strata_core::hostcpu::{format_cpulist, HostCpuMap};
use strata_core::{Error, Result};

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
