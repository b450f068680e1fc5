//! The host's CPUs as the kernel lists them: which are present and which of
//! those are online. Masks are sized by the *present* CPUs and show an
//! offline one as `-` (seed 003: sizing them by the online count gave `y-`
//! instead of `y-y` once cpu1 went offline, and made CPU 2 unpinnable).
//!
//! The two sysfs lists are read through [`HostCpus`], so a test can present
//! a host that is not the one it runs on.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Where the kernel lists the host's CPUs.
const SYSFS_CPU_DIR: &str = "/sys/devices/system/cpu";

/// The source of the host's two CPU lists, each in the kernel's cpulist
/// syntax (`0-2,4`).
pub trait HostCpus {
    /// The CPUs present, online or not (`present`).
    fn present(&self) -> Result<String>;
    /// The CPUs online (`online`).
    fn online(&self) -> Result<String>;
    /// Where an online CPU sits: its socket (package) and core ids, when
    /// the host says.
    fn topology(&self, cpu: u32) -> Option<CpuTopology> {
        let _ = cpu;
        None
    }
}

/// The socket and core one host CPU belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct CpuTopology {
    pub package: u32,
    pub core: u32,
}

/// The lists read from a sysfs CPU directory (`/sys/devices/system/cpu` on
/// the real host).
pub struct SysfsCpus {
    dir: PathBuf,
}

impl SysfsCpus {
    /// The running host's CPUs.
    pub fn host() -> SysfsCpus {
        SysfsCpus::at(Path::new(SYSFS_CPU_DIR))
    }

    /// The lists of another directory laid out as sysfs's.
    pub fn at(dir: &Path) -> SysfsCpus {
        SysfsCpus { dir: dir.to_path_buf() }
    }

    fn read(&self, file: &str) -> Result<String> {
        let path = self.dir.join(file);
        std::fs::read_to_string(&path).map_err(|e| Error::io("read", &path, e))
    }
}

impl HostCpus for SysfsCpus {
    fn present(&self) -> Result<String> {
        self.read("present")
    }

    fn online(&self) -> Result<String> {
        self.read("online")
    }

    fn topology(&self, cpu: u32) -> Option<CpuTopology> {
        let id = |file: &str| {
            let text = std::fs::read_to_string(self.dir.join(format!("cpu{cpu}/topology/{file}"))).ok()?;
            text.trim().parse::<u32>().ok()
        };
        Some(CpuTopology { package: id("physical_package_id")?, core: id("core_id")? })
    }
}

/// Lists given as they are, for a host described rather than read.
pub struct FixedHostCpus {
    pub present: String,
    pub online: String,
}

impl HostCpus for FixedHostCpus {
    fn present(&self) -> Result<String> {
        Ok(self.present.clone())
    }

    fn online(&self) -> Result<String> {
        Ok(self.online.clone())
    }
}

/// The host's CPUs: present ones and, among them, online ones. Its serde
/// form is the two lists; one read back must hold that shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "CpuLists")]
pub struct HostCpuMap {
    present: Vec<u32>,
    online: Vec<u32>,
}

impl HostCpuMap {
    /// Reads both lists. An online CPU that is not present is dropped, as
    /// the kernel cannot run anything on it.
    pub fn read(cpus: &dyn HostCpus) -> Result<HostCpuMap> {
        let present = parse_cpulist(&cpus.present()?).map_err(|e| e.context("host CPUs present"))?;
        if present.is_empty() {
            return Err(Error::internal("the host lists no CPU present"));
        }
        let online = parse_cpulist(&cpus.online()?).map_err(|e| e.context("host CPUs online"))?;
        let online = online.into_iter().filter(|cpu| present.binary_search(cpu).is_ok()).collect();
        Ok(HostCpuMap { present, online })
    }

    pub fn present(&self) -> &[u32] {
        &self.present
    }

    pub fn online(&self) -> &[u32] {
        &self.online
    }

    /// How many entries a CPU mask has: one per CPU up to the highest
    /// present one, so an offline CPU keeps its place.
    pub fn mask_len(&self) -> usize {
        self.present.last().map_or(0, |last| *last as usize + 1)
    }

    pub fn is_online(&self, cpu: u32) -> bool {
        self.online.binary_search(&cpu).is_ok()
    }

    /// The online CPUs as a mask, `y` online and `-` offline or absent
    /// (`y-y` for CPUs 0-2 with cpu1 offline).
    pub fn online_mask(&self) -> String {
        mask((0..self.mask_len() as u32).map(|cpu| self.is_online(cpu)))
    }

    /// Checks that every CPU of a list to pin to is present and online.
    pub fn check_pinnable(&self, cpus: &[u32]) -> Result<()> {
        if cpus.is_empty() {
            return Err(Error::invalid_arg("the CPU list is empty"));
        }
        for &cpu in cpus {
            if self.present.binary_search(&cpu).is_err() {
                return Err(Error::invalid_arg(format!(
                    "CPU {cpu} is not present on this host (present: {})",
                    format_cpulist(&self.present)
                )));
            }
            if !self.is_online(cpu) {
                return Err(Error::invalid_arg(format!("CPU {cpu} is offline")));
            }
        }
        Ok(())
    }
}

/// [`HostCpuMap`] as read from elsewhere (a plugin's reply), not yet checked.
#[derive(Deserialize)]
struct CpuLists {
    present: Vec<u32>,
    online: Vec<u32>,
}

impl TryFrom<CpuLists> for HostCpuMap {
    type Error = Error;
    /// Holds the invariants [`HostCpuMap::read`] gives: some CPU present,
    /// both lists ascending without repeats, every online CPU present.
    fn try_from(lists: CpuLists) -> Result<HostCpuMap> {
        let ascending = |cpus: &[u32]| cpus.windows(2).all(|pair| pair[0] < pair[1]);
        if lists.present.is_empty() || !ascending(&lists.present) || !ascending(&lists.online) {
            return Err(Error::invalid_arg("host CPU lists must be ascending, with some CPU present"));
        }
        if let Some(cpu) = lists.online.iter().find(|cpu| lists.present.binary_search(cpu).is_err()) {
            return Err(Error::invalid_arg(format!("host CPU {cpu} is listed online but not present")));
        }
        Ok(HostCpuMap { present: lists.present, online: lists.online })
    }
}

/// What `nodeinfo` reports of the host, as libvirt's `virNodeInfo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The host's architecture (`x86_64`), as libvirt names its model.
    pub model: String,
    /// CPUs online.
    pub cpus: u32,
    /// The CPUs' frequency; 0 when the host does not say.
    pub mhz: u32,
    /// NUMA cells (1 for a uniform host).
    pub nodes: u32,
    /// Sockets per NUMA cell.
    pub sockets: u32,
    pub cores: u32,
    pub threads: u32,
    pub memory_kib: u64,
}

impl NodeInfo {
    /// Reads the running host, its CPUs through `cpus`. The topology comes
    /// from each online CPU's socket and core ids; when those are missing
    /// or do not multiply out to the online CPUs, it is given as libvirt
    /// then gives it: one socket of one-thread cores.
    pub fn read(cpus: &dyn HostCpus) -> Result<NodeInfo> {
        let map = HostCpuMap::read(cpus)?;
        let online = u32::try_from(map.online().len()).unwrap_or(u32::MAX);
        let nodes = numa_nodes();
        let topology: Option<Vec<CpuTopology>> = map.online().iter().map(|cpu| cpus.topology(*cpu)).collect();
        let fitted = topology
            .and_then(|topology| sockets_cores_threads(&topology, nodes))
            .filter(|(sockets, cores, threads)| nodes * sockets * cores * threads == online);
        let (nodes, sockets, cores, threads) = match fitted {
            Some((sockets, cores, threads)) => (nodes, sockets, cores, threads),
            None => (1, 1, online, 1),
        };
        Ok(NodeInfo {
            model: std::env::consts::ARCH.to_string(),
            cpus: online,
            mhz: cpu_mhz(),
            nodes,
            sockets,
            cores,
            threads,
            memory_kib: memory_kib()?,
        })
    }
}

/// Sockets per NUMA cell, cores per socket and threads per core of the
/// online CPUs; `None` when they do not divide evenly.
fn sockets_cores_threads(topology: &[CpuTopology], nodes: u32) -> Option<(u32, u32, u32)> {
    let mut cores = topology.to_vec();
    cores.sort_unstable();
    cores.dedup();
    let mut packages: Vec<u32> = cores.iter().map(|c| c.package).collect();
    packages.dedup();
    let count = |n: usize| u32::try_from(n).ok();
    let (threads, cores, packages) = (count(topology.len())?, count(cores.len())?, count(packages.len())?);
    let even = |a: u32, b: u32| (b > 0 && a.is_multiple_of(b)).then(|| a / b);
    Some((even(packages, nodes)?, even(cores, packages)?, even(threads, cores)?))
}

fn numa_nodes() -> u32 {
    let Ok(entries) = std::fs::read_dir("/sys/devices/system/node") else { return 1 };
    let is_node =
        |name: &str| name.strip_prefix("node").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    let count = entries.filter_map(|e| e.ok()).filter(|e| is_node(&e.file_name().to_string_lossy())).count();
    u32::try_from(count).unwrap_or(1).max(1)
}

/// The first CPU's `cpu MHz` in `/proc/cpuinfo`, 0 when there is none.
fn cpu_mhz() -> u32 {
    let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") else { return 0 };
    cpuinfo
        .lines()
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            (key.trim() == "cpu MHz").then(|| value.trim().parse::<f64>().ok())?
        })
        .map_or(0, |mhz| mhz as u32)
}

/// `MemTotal` of `/proc/meminfo`, in KiB.
fn memory_kib() -> Result<u64> {
    let path = Path::new("/proc/meminfo");
    let meminfo = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:")?.trim().strip_suffix("kB")?.trim().parse().ok())
        .ok_or_else(|| Error::internal("/proc/meminfo gives no MemTotal"))
}

/// A mask as virsh prints one: `y` for a set entry, `-` for a clear one.
pub fn mask(entries: impl IntoIterator<Item = bool>) -> String {
    entries.into_iter().map(|set| if set { 'y' } else { '-' }).collect()
}

/// Parses the kernel's cpulist syntax (`0-2,4`, also `^3` exclusions as
/// libvirt's cpuset attributes allow) into sorted, distinct CPU numbers.
pub fn parse_cpulist(text: &str) -> Result<Vec<u32>> {
    let bad = |why: &str| Error::invalid_arg(format!("invalid CPU list '{}': {why}", text.trim()));
    let number = |s: &str| s.trim().parse::<u32>().map_err(|_| bad(&format!("'{}' is not a CPU number", s.trim())));
    let mut cpus = Vec::new();
    let mut excluded = Vec::new();
    for item in text.trim().split(',') {
        let item = item.trim();
        if item.is_empty() {
            return Err(bad("empty entry"));
        }
        if let Some(cpu) = item.strip_prefix('^') {
            excluded.push(number(cpu)?);
        } else if let Some((first, last)) = item.split_once('-') {
            let (first, last) = (number(first)?, number(last)?);
            if first > last {
                return Err(bad(&format!("range {first}-{last} is reversed")));
            }
            cpus.extend(first..=last);
        } else {
            cpus.push(number(item)?);
        }
    }
    cpus.retain(|cpu| !excluded.contains(cpu));
    cpus.sort_unstable();
    cpus.dedup();
    Ok(cpus)
}

/// Formats sorted CPU numbers in cpulist syntax, runs as ranges (`0-2,4`).
pub fn format_cpulist(cpus: &[u32]) -> String {
    let mut runs: Vec<(u32, u32)> = Vec::new();
    for &cpu in cpus {
        match runs.last_mut() {
            Some((_, last)) if cpu == *last + 1 => *last = cpu,
            _ => runs.push((cpu, cpu)),
        }
    }
    let run = |(first, last): (u32, u32)| if first == last { first.to_string() } else { format!("{first}-{last}") };
    runs.into_iter().map(run).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::ErrorKind;

    /// The seed's host: CPUs 0-2 present, cpu1 taken offline.
    fn seed_host() -> HostCpuMap {
        HostCpuMap::read(&FixedHostCpus { present: "0-2\n".into(), online: "0,2\n".into() }).expect("ok")
    }

    #[test]
    fn cpulists_parse_and_format_as_the_kernel_writes_them() {
        assert_eq!(parse_cpulist("0-2,4\n").expect("ok"), vec![0, 1, 2, 4]);
        assert_eq!(parse_cpulist("0").expect("ok"), vec![0]);
        assert_eq!(parse_cpulist("3,0-1,1").expect("ok"), vec![0, 1, 3]);
        assert_eq!(parse_cpulist("0-3,^1").expect("ok"), vec![0, 2, 3]);
        assert_eq!(format_cpulist(&[0, 1, 2, 4]), "0-2,4");
        assert_eq!(format_cpulist(&[0, 2]), "0,2");
        assert_eq!(format_cpulist(&[]), "");
    }

    #[test]
    fn a_bad_cpulist_is_refused_naming_what_is_wrong() {
        for (text, why) in [("", "empty entry"), ("0,,2", "empty entry"), ("a", "'a'"), ("3-1", "reversed")] {
            let err = parse_cpulist(text).expect_err("refused");
            assert_eq!(err.kind(), ErrorKind::InvalidArg);
            assert!(err.message().contains(why), "{text:?}: {}", err.message());
        }
    }

    #[test]
    fn the_seed_host_mask_keeps_the_offline_cpu_in_place() {
        let host = seed_host();
        assert_eq!(host.present(), &[0, 1, 2]);
        assert_eq!(host.online(), &[0, 2]);
        assert_eq!(host.mask_len(), 3);
        assert_eq!(host.online_mask(), "y-y");
    }

    #[test]
    fn pinning_on_the_seed_host_takes_online_cpus_only() {
        let host = seed_host();
        host.check_pinnable(&parse_cpulist("0,2").expect("ok")).expect("ok");
        let offline = host.check_pinnable(&[1]).expect_err("refused");
        assert_eq!(offline.kind(), ErrorKind::InvalidArg);
        assert_eq!(offline.message(), "CPU 1 is offline");
        let absent = host.check_pinnable(&[0, 7]).expect_err("refused");
        assert_eq!(absent.message(), "CPU 7 is not present on this host (present: 0-2)");
    }

    #[test]
    fn the_sysfs_source_reads_the_two_lists_from_its_directory() {
        let dir = std::env::temp_dir().join(format!("strata-hostcpu-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("ok");
        std::fs::write(dir.join("present"), "0-3\n").expect("ok");
        std::fs::write(dir.join("online"), "0-1,3\n").expect("ok");
        let host = HostCpuMap::read(&SysfsCpus::at(&dir));
        std::fs::remove_dir_all(&dir).expect("ok");
        assert_eq!(host.expect("ok").online_mask(), "yy-y");
    }

    #[test]
    fn topology_multiplies_out_to_the_online_cpus() {
        let t = |package, core| CpuTopology { package, core };
        // Two sockets of two cores of two threads.
        let topology = [t(0, 0), t(0, 0), t(0, 1), t(0, 1), t(1, 0), t(1, 0), t(1, 1), t(1, 1)];
        assert_eq!(sockets_cores_threads(&topology, 1), Some((2, 2, 2)));
        assert_eq!(sockets_cores_threads(&topology, 2), Some((1, 2, 2)));
        // Three threads on two cores do not divide evenly.
        assert_eq!(sockets_cores_threads(&[t(0, 0), t(0, 0), t(0, 1)], 1), None);
    }

    #[test]
    fn a_host_without_topology_is_one_socket_of_single_thread_cores() {
        let info = NodeInfo::read(&FixedHostCpus { present: "0-2".into(), online: "0,2".into() }).expect("read");
        assert_eq!((info.cpus, info.sockets, info.cores, info.threads), (2, 1, 2, 1));
        assert!(info.memory_kib > 0);
    }

    #[test]
    fn the_real_host_has_cpu0_present_and_online() {
        let host = HostCpuMap::read(&SysfsCpus::host()).expect("ok");
        assert!(host.present().contains(&0));
        assert!(host.is_online(0));
    }

    #[test]
    fn a_host_cpu_map_that_breaks_its_shape_is_refused() {
        for lists in [
            json!({ "present": [], "online": [] }),
            json!({ "present": [2, 0], "online": [0] }),
            json!({ "present": [0, 1], "online": [0, 3] }),
        ] {
            assert!(serde_json::from_value::<HostCpuMap>(lists.clone()).is_err(), "{lists} accepted");
        }
        let seed_003: HostCpuMap = serde_json::from_value(json!({ "present": [0, 1, 2], "online": [0, 2] }))
            .expect("a map of seed 003's host");
        assert_eq!(seed_003.online_mask(), "y-y");
    }
}
