//! `vcpuinfo`: each vCPU thread QEMU reports (`query-cpus-fast`), read from
//! the host as libvirt reads it: the CPU it last ran on and its CPU time
//! from `/proc/TID/stat`, its affinity from sched_getaffinity(2) over every
//! host CPU present, online or not, as the host CPU seam lists them (seed
//! 003: an offline CPU must not shorten the mask, and shows as `-`).
//! And `setvcpus --live`: vCPUs plugged into the slots QEMU offers
//! (`query-hotpluggable-cpus`) with `device_add`.

use std::path::Path;

use serde_json::{Map, Value};
use strata_core::driver::VcpuInfo;
use strata_core::hostcpu::{HostCpuMap, SysfsCpus};
use strata_core::{Error, Result};
use strata_qemu_block::monitor::qmp_error;
use strata_qmp::QmpClient;

use crate::affinity::thread_affinity;

/// One vCPU of a running QEMU and the host thread that runs it.
pub(crate) struct VcpuThread {
    pub index: u32,
    pub tid: i32,
}

/// Each vCPU of the domain whose monitor is `client`, on the host whose
/// CPUs `host_cpus` lists.
pub(crate) async fn vcpu_info(client: &QmpClient, name: &str, host_cpus: &SysfsCpus) -> Result<Vec<VcpuInfo>> {
    let threads = vcpu_threads(client, name).await?;
    let host = HostCpuMap::read(host_cpus)?;
    threads.iter().map(|thread| vcpu(thread, &host)).collect()
}

/// The vCPU threads QEMU reports (`query-cpus-fast`), in its order.
pub(crate) async fn vcpu_threads(client: &QmpClient, name: &str) -> Result<Vec<VcpuThread>> {
    let reply = client.execute("query-cpus-fast", None).await.map_err(|e| qmp_error(name, e))?;
    let cpus = reply.as_array().ok_or_else(|| Error::internal("query-cpus-fast did not return a list"))?;
    cpus.iter().map(vcpu_thread).collect()
}

fn vcpu_thread(cpu: &Value) -> Result<VcpuThread> {
    let field = |key: &str| {
        cpu.get(key)
            .and_then(Value::as_u64)
            .ok_or_else(|| Error::internal(format!("query-cpus-fast gave a vCPU without '{key}': {cpu}")))
    };
    let index = u32::try_from(field("cpu-index")?).map_err(|_| Error::internal("vCPU index out of range"))?;
    let tid = i32::try_from(field("thread-id")?).map_err(|_| Error::internal("vCPU thread id out of range"))?;
    Ok(VcpuThread { index, tid })
}

/// Plugs vCPUs into the domain whose monitor is `client` until `count` are
/// online: `device_add` of the free slots QEMU lists, in socket, die, core
/// and thread order, each with the driver and ids QEMU gives it.
pub(crate) async fn plug_vcpus(client: &QmpClient, name: &str, count: u32) -> Result<()> {
    let reply = client.execute("query-hotpluggable-cpus", None).await.map_err(|e| qmp_error(name, e))?;
    let slots = reply.as_array().ok_or_else(|| Error::internal("query-hotpluggable-cpus did not return a list"))?;
    let online = slots.iter().filter(|slot| slot.get("qom-path").is_some()).count();
    let mut free: Vec<&Value> = slots.iter().filter(|slot| slot.get("qom-path").is_none()).collect();
    free.sort_by_key(|slot| slot_position(slot));
    let wanted = usize::try_from(count).unwrap_or(usize::MAX).saturating_sub(online);
    for (number, slot) in (online..).zip(free.into_iter().take(wanted)) {
        let driver = slot.get("type").and_then(Value::as_str);
        let props = slot.get("props").and_then(Value::as_object);
        let (Some(driver), Some(props)) = (driver, props) else {
            return Err(Error::internal(format!("query-hotpluggable-cpus gave a slot without type or props: {slot}")));
        };
        let mut args: Map<String, Value> = props.clone();
        args.insert("driver".into(), driver.into());
        args.insert("id".into(), format!("vcpu{number}").into());
        client.execute("device_add", Some(Value::Object(args))).await.map_err(|e| qmp_error(name, e))?;
    }
    Ok(())
}

/// Where a hotpluggable CPU slot sits: its socket, die, core and thread.
fn slot_position(slot: &Value) -> [u64; 4] {
    let id = |key: &str| slot.get("props").and_then(|props| props.get(key)).and_then(Value::as_u64).unwrap_or(0);
    [id("socket-id"), id("die-id"), id("core-id"), id("thread-id")]
}

fn vcpu(thread: &VcpuThread, host: &HostCpuMap) -> Result<VcpuInfo> {
    let (cpu_time_ns, last_cpu) = thread_times(thread.tid)?;
    let affinity = thread_affinity(thread.tid, host)?;
    Ok(VcpuInfo { number: thread.index, cpu: last_cpu, state: "running".into(), cpu_time_ns, affinity })
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
