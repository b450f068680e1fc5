//! The host's CPUs as QEMU guests run on them: `nodeinfo` and
//! `nodecpumap`, read through the [`HostCpus`] seam so a test can present
//! a host other than the one it runs on.

use std::path::Path;

use async_trait::async_trait;
use strata_core::driver::CpuPlacementOps;
use strata_core::hostcpu::{HostCpuMap, NodeInfo, SysfsCpus};
use strata_core::Result;

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

#[async_trait]
impl CpuPlacementOps for QemuConnection {
    async fn node_info(&self) -> Result<NodeInfo> {
        NodeInfo::read(&self.host_cpus)
    }

    async fn node_cpu_map(&self) -> Result<HostCpuMap> {
        HostCpuMap::read(&self.host_cpus)
    }
}
