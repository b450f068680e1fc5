//! The host's CPUs as the kernel lists them: which are present and which of
//! those are online. Masks are sized by the *present* CPUs and show an
//! offline one as `-` (seed 003: sizing them by the online count gave `y-`
//! instead of `y-y` once cpu1 went offline, and made CPU 2 unpinnable).
//!
//! The two sysfs lists are read through [`HostCpus`], so a test can present
//! a host that is not the one it runs on.

use std::path::{Path, PathBuf};

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

/// The host's CPUs: present ones and, among them, online ones.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    fn the_real_host_has_cpu0_present_and_online() {
        let host = HostCpuMap::read(&SysfsCpus::host()).expect("ok");
        assert!(host.present().contains(&0));
        assert!(host.is_online(0));
    }
}
