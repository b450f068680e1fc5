//! virsh against a running libvirtd, for benches that set Strata against
//! it in the same run. libvirtd is not part of Strata's dependencies: a
//! bench measures virsh only where one answers (see [`Virsh::reachable`])
//! and prints its reference numbers otherwise. benches/README.md says how
//! to start libvirtd on Debian 12 without systemd.

use std::path::Path;
use std::process::{Command, Output};

use crate::success_stdout;

/// The environment variable naming the libvirt URI to measure
/// (`qemu:///system` when unset); `none` turns the measurement off.
pub const VIRSH_URI_VAR: &str = "STRATA_BENCH_VIRSH_URI";

/// `virsh -c URI`.
#[derive(Clone)]
pub struct Virsh {
    pub uri: String,
}

impl Virsh {
    /// virsh on `$STRATA_BENCH_VIRSH_URI` (default `qemu:///system`) when
    /// it is installed and its daemon answers with a QEMU hypervisor
    /// within 10 s; `None` otherwise, with the reason on stderr.
    pub fn reachable(bench: &str) -> Option<Virsh> {
        let uri = std::env::var(VIRSH_URI_VAR).unwrap_or_else(|_| "qemu:///system".into());
        if uri == "none" {
            return None;
        }
        // `timeout`: a wedged daemon must not hang the bench.
        let out = Command::new("timeout").args(["10", "virsh", "-c", &uri, "version"]).output();
        match out {
            Ok(out)
                if out.status.success()
                    && String::from_utf8_lossy(&out.stdout).contains("Running hypervisor: QEMU") =>
            {
                Some(Virsh { uri })
            }
            Ok(out) => {
                let why = String::from_utf8_lossy(&out.stderr);
                eprintln!("{bench}: virsh -c {uri} does not answer ({}); using reference numbers", why.trim());
                None
            }
            Err(e) => {
                eprintln!("{bench}: cannot run virsh ({e}); using reference numbers");
                None
            }
        }
    }

    /// `virsh -c URI ARGS…`, not started yet.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("virsh");
        cmd.arg("-c").arg(&self.uri).args(args);
        cmd
    }

    /// Runs to the end, capturing stdout and stderr.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap_or_else(|e| panic!("cannot run virsh: {e}"))
    }

    /// Runs and requires success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        success_stdout("virsh", args, &self.run(args))
    }
}

/// A libvirt domain a bench defined and started (from a domain XML file),
/// destroyed and undefined with its snapshot metadata when dropped, also
/// when the bench panics. Its name carries the bench's pid, so that it
/// never meets a user's domain.
pub struct VirshDomain {
    pub virsh: Virsh,
    pub name: String,
}

impl VirshDomain {
    /// Defines the domain `name` from the XML file `xml` and starts it;
    /// Err(virsh's message) when either fails (nothing is left defined).
    pub fn start(virsh: &Virsh, name: &str, xml: &Path) -> Result<VirshDomain, String> {
        let failure = |out: Output| String::from_utf8_lossy(&out.stderr).trim().to_string();
        let defined = virsh.run(&["define", crate::path_str(xml)]);
        if !defined.status.success() {
            return Err(failure(defined));
        }
        // Undefined by its drop from here on.
        let domain = VirshDomain { virsh: virsh.clone(), name: name.to_string() };
        let started = virsh.run(&["start", name]);
        if !started.status.success() {
            return Err(failure(started));
        }
        Ok(domain)
    }

    /// Waits until the domain's QEMU is idle ([`crate::wait_for_idle`]),
    /// found by the pid file libvirtd keeps for a system URI.
    pub fn wait_for_idle(&self) {
        let pid_file = format!("/run/libvirt/qemu/{}.pid", self.name);
        if let Some(pid) = std::fs::read_to_string(pid_file).ok().and_then(|p| p.trim().parse().ok()) {
            crate::wait_for_idle(pid);
        }
    }

    /// The name of this process's libvirt domain for `bench`.
    pub fn name_for(bench: &str) -> String {
        format!("strata-bench-{bench}-{}", std::process::id())
    }
}

/// A bench's domain XML ([`crate::domain_xml`]) as libvirt takes it: the
/// `<cpu>` element goes, since libvirt checks the model's features
/// against the host's (qemu64 names AMD's `svm`, which an Intel host
/// lacks) where QEMU only warns; without it libvirt gives QEMU its default
/// model. Nothing else differs: the guest runs no OS either way.
pub fn libvirt_xml(xml: &str) -> String {
    match (xml.find("<cpu"), xml.find("</cpu>")) {
        (Some(start), Some(end)) if start < end => {
            let end = end + "</cpu>".len();
            // With the line's indentation and line break.
            let start = xml[..start].rfind('\n').map_or(start, |n| n + 1);
            let end = if xml[end..].starts_with('\n') { end + 1 } else { end };
            format!("{}{}", &xml[..start], &xml[end..])
        }
        _ => xml.to_string(),
    }
}

impl Drop for VirshDomain {
    fn drop(&mut self) {
        let _ = self.virsh.run(&["destroy", &self.name]);
        let out = self.virsh.run(&["undefine", &self.name, "--snapshots-metadata"]);
        if !out.status.success() {
            eprintln!("virsh undefine {} failed: {}", self.name, String::from_utf8_lossy(&out.stderr).trim());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libvirt_xml_drops_only_the_cpu_element() {
        let xml = crate::domain_xml("vm", "kvm", &["/a.qcow2"]);
        let out = libvirt_xml(&xml);
        assert!(xml.contains("<cpu") && !out.contains("<cpu") && !out.contains("</cpu>"), "{out}");
        assert_eq!(out.lines().count(), xml.lines().count() - 3, "{out}");
        assert!(out.contains("<source file='/a.qcow2'/>") && out.contains("</os>\n  <on_poweroff>"), "{out}");
    }
}
