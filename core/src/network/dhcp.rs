//! A network's DHCP server: `dnsmasq`, bound to the network's bridge
//! alone, with no DNS on the host's port 53, its files in the network's
//! directory of the store. It is started like every server Strata runs
//! (`crate::process::spawn`: held between fork and exec until its pid and
//! start time are recorded), so that `net-destroy`, and the next network
//! command after a killed `net-start`, stop exactly it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::driver::NetworkLease;
use crate::error::{Error, Result};
use crate::process::{self, Liveness, ProcessId};

use super::def::{NetworkDef, NetworkIp};

/// How long a started dnsmasq may take to bind its socket and write its
/// pid file (a hang guard: it takes milliseconds).
const READY_LIMIT: Duration = Duration::from_secs(30);

/// The files of a network's dnsmasq, in the network's directory.
pub struct DhcpFiles {
    dir: PathBuf,
}

impl DhcpFiles {
    pub fn new(dir: PathBuf) -> DhcpFiles {
        DhcpFiles { dir }
    }

    pub fn leases(&self) -> PathBuf {
        self.dir.join("dnsmasq.leases")
    }

    fn hosts(&self) -> PathBuf {
        self.dir.join("dnsmasq.hosts")
    }

    fn pid(&self) -> PathBuf {
        self.dir.join("dnsmasq.pid")
    }

    fn log(&self) -> PathBuf {
        self.dir.join("dnsmasq.log")
    }

    /// Removes what a stopped dnsmasq left (its log stays, for a later
    /// look at why it stopped).
    pub fn remove(&self) -> Result<()> {
        for file in [self.leases(), self.hosts(), self.pid()] {
            match std::fs::remove_file(&file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(Error::io("remove", &file, e)),
                _ => {}
            }
        }
        Ok(())
    }
}

/// The dnsmasq binary: on `PATH`, or in `/usr/sbin` where Debian puts it
/// (outside a user's `PATH`).
pub fn dnsmasq_binary() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .map(|dir| dir.join("dnsmasq"))
        .find(|candidate| candidate.is_file())
}

/// `MAC,IP[,NAME]` lines for `--dhcp-hostsfile`.
fn hosts_file(ip: &NetworkIp) -> String {
    ip.dhcp_hosts
        .iter()
        .map(|h| match &h.name {
            Some(name) => format!("{},{},{name}\n", h.mac, h.ip),
            None => format!("{},{}\n", h.mac, h.ip),
        })
        .collect()
}

/// dnsmasq's arguments: DHCP only (`--port=0`), on the bridge only, no
/// configuration file but these, its files under `files`. It runs as root
/// (`--user=root`): the store's directories are root's alone, and the
/// hosts file is read after dnsmasq would have dropped to `nobody`.
fn arguments(
    def: &NetworkDef,
    ip: &NetworkIp,
    (start, end): (std::net::Ipv4Addr, std::net::Ipv4Addr),
    files: &DhcpFiles,
) -> Vec<String> {
    let path = |p: PathBuf| p.display().to_string();
    let range_size = u32::from(end).saturating_sub(u32::from(start)) + 1;
    let lease_max = range_size as usize + ip.dhcp_hosts.len();
    vec![
        "--keep-in-foreground".into(),
        "--log-facility=-".into(),
        "--conf-file=".into(),
        "--user=root".into(),
        "--port=0".into(),
        "--bind-interfaces".into(),
        format!("--interface={}", def.bridge),
        "--except-interface=lo".into(),
        format!("--pid-file={}", path(files.pid())),
        format!("--dhcp-leasefile={}", path(files.leases())),
        format!("--dhcp-hostsfile={}", path(files.hosts())),
        format!("--dhcp-range={start},{end},{}", ip.netmask()),
        format!("--dhcp-lease-max={lease_max}"),
        "--dhcp-no-override".into(),
        "--dhcp-authoritative".into(),
    ]
}

/// Starts the network's dnsmasq when its `<ip>` has a `<dhcp><range>`;
/// `record` writes its identity down before it runs. Returns once it
/// serves (its pid file written), or the reason it stopped.
pub fn start(
    def: &NetworkDef,
    files: &DhcpFiles,
    record: impl FnOnce(ProcessId) -> Result<()>,
) -> Result<Option<ProcessId>> {
    let Some(ip) = &def.ip else { return Ok(None) };
    let Some(range) = ip.dhcp_range else { return Ok(None) };
    let binary = dnsmasq_binary().ok_or_else(|| {
        Error::operation_failed(format!(
            "network '{}' has a DHCP range, but dnsmasq, its DHCP server, is not installed (apt-get install dnsmasq-base)",
            def.name
        ))
    })?;
    crate::store::atomic_write(&files.hosts(), hosts_file(ip).as_bytes())?;
    let _ = std::fs::remove_file(files.pid());
    let binary = binary.display().to_string();
    let spawned = process::spawn(&binary, &arguments(def, ip, range, files), &[], &files.log(), record)?;
    crate::crash_point("net-start-dnsmasq");
    wait_until_serving(def, files, spawned.id)?;
    Ok(Some(spawned.id))
}

fn wait_until_serving(def: &NetworkDef, files: &DhcpFiles, id: ProcessId) -> Result<()> {
    let deadline = Instant::now() + READY_LIMIT;
    loop {
        let written = std::fs::read_to_string(files.pid()).ok();
        if written.is_some_and(|p| p.trim() == id.pid.to_string()) {
            return Ok(());
        }
        if id.liveness() == Liveness::Gone || Instant::now() >= deadline {
            return Err(Error::operation_failed(format!(
                "dnsmasq for network '{}' did not start serving DHCP on {}: {}",
                def.name,
                def.bridge,
                process::log_tail(&files.log(), 5)
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The leases of dnsmasq's lease file (`EXPIRY MAC IP HOSTNAME CLIENTID`
/// per line, `*` for none), as `net-dhcp-leases` and `domifaddr --source
/// lease` list them.
pub fn read_leases(def: &NetworkDef, files: &DhcpFiles) -> Result<Vec<NetworkLease>> {
    let file = files.leases();
    let text = match std::fs::read_to_string(&file) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(Error::io("read", &file, e)),
    };
    let prefix = def.ip.as_ref().map_or(0, |ip| ip.prefix);
    Ok(parse_leases(&text, &def.bridge, prefix))
}

fn parse_leases(text: &str, bridge: &str, prefix: u8) -> Vec<NetworkLease> {
    let named = |field: &str| (field != "*").then(|| field.to_string());
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let &[expiry, mac, ip, hostname, ref rest @ ..] = fields.as_slice() else { return None };
            ip.parse::<std::net::Ipv4Addr>().ok()?;
            Some(NetworkLease {
                interface: bridge.to_string(),
                expiry_time: expiry.parse().ok()?,
                mac: mac.to_lowercase(),
                address: ip.to_string(),
                prefix: u32::from(prefix),
                hostname: named(hostname),
                client_id: rest.first().and_then(|c| named(c)),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dnsmasq_serves_dhcp_alone_on_the_bridge_and_its_leases_are_read() {
        let xml = "<network><name>n</name><bridge name='virbr7'/><ip address='10.9.0.1' prefix='24'><dhcp>\
                   <range start='10.9.0.10' end='10.9.0.19'/><host mac='52:54:00:AA:00:01' ip='10.9.0.5' name='web'/>\
                   </dhcp></ip></network>";
        let def = NetworkDef::parse(xml, String::new).expect("parse");
        let ip = def.ip.clone().expect("ip");
        let files = DhcpFiles::new(PathBuf::from("/s/networks/n"));
        let args = arguments(&def, &ip, ip.dhcp_range.expect("range"), &files);
        for wanted in [
            "--port=0",
            "--bind-interfaces",
            "--interface=virbr7",
            "--except-interface=lo",
            "--conf-file=",
            "--dhcp-range=10.9.0.10,10.9.0.19,255.255.255.0",
            "--dhcp-lease-max=11",
            "--dhcp-leasefile=/s/networks/n/dnsmasq.leases",
            "--dhcp-hostsfile=/s/networks/n/dnsmasq.hosts",
            "--pid-file=/s/networks/n/dnsmasq.pid",
        ] {
            assert!(args.iter().any(|a| a == wanted), "{wanted} missing from {args:?}");
        }
        assert_eq!(hosts_file(&ip), "52:54:00:aa:00:01,10.9.0.5,web\n");

        let leases = parse_leases(
            "1733400000 52:54:00:AA:00:02 10.9.0.12 guest 01:52:54:00:aa:00:02\n\
             1733400100 52:54:00:aa:00:03 10.9.0.13 * *\nduid 00:01:00:01\n",
            "virbr7",
            24,
        );
        assert_eq!(leases.len(), 2, "{leases:?}");
        assert_eq!((leases[0].mac.as_str(), leases[0].address.as_str()), ("52:54:00:aa:00:02", "10.9.0.12"));
        assert_eq!((leases[0].hostname.as_deref(), leases[0].prefix), (Some("guest"), 24));
        assert_eq!((leases[1].hostname.as_deref(), leases[1].client_id.as_deref()), (None, None));
    }
}
