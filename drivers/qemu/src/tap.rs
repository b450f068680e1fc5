//! The host side of a guest's network interfaces, opened by Strata and
//! handed to QEMU by descriptor number: QEMU never opens `/dev/net/tun`,
//! `/dev/vhost-net` or a macvtap's `/dev/tapN` itself.
//!
//! A tap is created without `TUNSETPERSIST`, so the kernel deletes it when
//! the last descriptor closes: if `strata` dies before QEMU runs, or QEMU
//! dies (even by SIGKILL), the tap goes with it. The names Strata created
//! are still recorded in the live status before QEMU runs and deleted at
//! cleanup in case something made one persistent; a tap named by
//! `<target dev>` that existed before is used and left alone (libvirt's
//! `managed='no'`). A macvtap does outlive its descriptors, so it is
//! deleted on every failed start and at cleanup.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use strata_core::network::NetworkManager;
use strata_core::tool::run_tool;
use strata_core::xml::{Domain, Element, Interface};
use strata_core::{Error, Result};

const TUN_DEVICE: &str = "/dev/net/tun";
const VHOST_NET_DEVICE: &str = "/dev/vhost-net";
/// The name the kernel completes with the first free number.
const TAP_NAME_PATTERN: &str = "vnet%d";
const IFNAMSIZ: usize = 16;
/// How long cleanup waits for a dead QEMU's exiting threads to let go of
/// a tap (a hang guard: they are usually done within milliseconds).
const TAP_RELEASE_WAIT: Duration = Duration::from_secs(10);

// <linux/if_tun.h> and <linux/sockios.h>.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const SIOCSIFHWADDR: libc::c_ulong = 0x8924;
const SIOCBRADDIF: libc::c_ulong = 0x89a2;
const ARPHRD_ETHER: u16 = 1;

/// `struct ifreq`: a device name and a 24-byte union (flags, index or
/// hardware address, depending on the request).
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    data: [u8; 24],
}

impl IfReq {
    fn named(name: &str) -> IfReq {
        let mut req = IfReq { name: [0; IFNAMSIZ], data: [0; 24] };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req
    }

    fn name(&self) -> String {
        let end = self.name.iter().position(|b| *b == 0).unwrap_or(IFNAMSIZ);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// What kind of host device Strata created for a guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostNicKind {
    Tap,
    Macvtap,
}

impl HostNicKind {
    fn as_str(self) -> &'static str {
        match self {
            HostNicKind::Tap => "tap",
            HostNicKind::Macvtap => "macvtap",
        }
    }
}

/// A host device Strata created for a guest, recorded in its status so
/// that cleanup deletes exactly it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedNic {
    pub name: String,
    pub kind: HostNicKind,
}

impl CreatedNic {
    pub fn to_element(&self) -> Element {
        Element::new("hostnic").with_attr("name", self.name.clone()).with_attr("kind", self.kind.as_str())
    }

    pub fn from_element(el: &Element) -> Option<CreatedNic> {
        let kind = match el.attr("kind")? {
            "tap" => HostNicKind::Tap,
            "macvtap" => HostNicKind::Macvtap,
            _ => return None,
        };
        Some(CreatedNic { name: el.attr("name")?.to_string(), kind })
    }

    /// Deletes the device if it is still there (its QEMU is gone). A tap
    /// someone else holds now cannot be attached to and is left alone.
    pub fn remove(&self) -> Result<()> {
        if !device_exists(&self.name) {
            return Ok(());
        }
        match self.kind {
            HostNicKind::Tap => {
                // A QEMU counts as gone once its main thread is a zombie,
                // while its other threads may still be exiting with the
                // tap attached (busy); it goes with them.
                let deadline = Instant::now() + TAP_RELEASE_WAIT;
                let tun = loop {
                    match tun_set_iff(&self.name, 1) {
                        Ok(tun) => break tun,
                        Err(_) if !device_exists(&self.name) => return Ok(()),
                        Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                            std::thread::sleep(Duration::from_millis(20));
                        }
                        // Still held: not persistent, it goes with its holder.
                        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                            tracing::warn!(
                                device = self.name,
                                "a tap Strata created is still held; left to its holder"
                            );
                            return Ok(());
                        }
                        Err(e) => {
                            return Err(Error::operation_failed(format!("cannot delete tap '{}': {e}", self.name)))
                        }
                    }
                };
                // SAFETY: TUNSETPERSIST takes an integer argument on a tun
                // descriptor this function owns.
                if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETPERSIST, 0 as libc::c_ulong) } < 0 {
                    return Err(os_error(format!("cannot delete tap '{}'", self.name)));
                }
                Ok(())
            }
            HostNicKind::Macvtap => run_tool("ip", &["link", "delete", &self.name]).map(drop),
        }
    }
}

/// The descriptors of one interface's host side, open until QEMU has them.
#[derive(Debug)]
pub struct OpenedNic {
    /// The host device's name.
    pub name: String,
    /// One per queue.
    pub taps: Vec<OwnedFd>,
    /// One per queue when vhost-net is used, else none.
    pub vhosts: Vec<OwnedFd>,
    /// What Strata created (and must delete); `None` for a device that
    /// existed before.
    pub created: Option<CreatedNic>,
}

impl OpenedNic {
    /// QEMU's `-netdev`/`netdev_add` options for these descriptors, as
    /// QEMU will number them (the same numbers, inherited).
    pub fn netdev_options(&self, id: &str) -> String {
        let join = |fds: &[OwnedFd]| fds.iter().map(|f| f.as_raw_fd().to_string()).collect::<Vec<_>>().join(":");
        let mut netdev = format!("tap,id={id},fds={}", join(&self.taps));
        if !self.vhosts.is_empty() {
            netdev.push_str(&format!(",vhost=on,vhostfds={}", join(&self.vhosts)));
        }
        netdev
    }
}

impl Drop for OpenedNic {
    /// A macvtap created for a start that did not happen is deleted (a
    /// tap goes with its descriptors).
    fn drop(&mut self) {
        if let Some(created) = self.created.as_ref().filter(|c| c.kind == HostNicKind::Macvtap) {
            if let Err(e) = created.remove() {
                tracing::warn!(device = created.name, error = %e, "cannot delete a macvtap");
            }
        }
    }
}

/// The host sides of a domain's interfaces, by their index in `<devices>`.
#[derive(Debug, Default)]
pub struct HostNics {
    pub by_index: BTreeMap<usize, OpenedNic>,
}

impl HostNics {
    /// Opens the host side of every interface QEMU reaches through a
    /// host device (`ethernet`, `bridge`, `network`, `direct`); on an
    /// error nothing stays created.
    pub fn open(dom: &Domain, networks: &NetworkManager) -> Result<HostNics> {
        let mut nics = HostNics::default();
        for (index, iface) in dom.interfaces()?.iter().enumerate() {
            if let Some(nic) = open_interface(iface, index, networks)? {
                nics.by_index.insert(index, nic);
            }
        }
        Ok(nics)
    }

    /// Every descriptor QEMU must inherit.
    pub fn descriptors(&self) -> Vec<RawFd> {
        self.by_index.values().flat_map(|n| n.taps.iter().chain(&n.vhosts)).map(AsRawFd::as_raw_fd).collect()
    }

    /// What Strata created, for the status.
    pub fn created(&self) -> Vec<CreatedNic> {
        self.by_index.values().filter_map(|n| n.created.clone()).collect()
    }

    /// Hands the created devices over to the status that now records
    /// them: dropping the descriptors no longer deletes a macvtap.
    pub fn into_recorded(mut self) {
        for nic in self.by_index.values_mut() {
            nic.created = None;
        }
    }
}

/// Opens the host side of one interface; `None` for a type QEMU reaches
/// without a host device (`user`) or that is not started. A `network`
/// interface's tap goes on the bridge of its network, which must be active.
pub fn open_interface(iface: &Interface, index: usize, networks: &NetworkManager) -> Result<Option<OpenedNic>> {
    let what = iface.description(index);
    let queues = iface.driver_queues.unwrap_or(1) as usize;
    match iface.iface_type.as_str() {
        "ethernet" | "bridge" | "network" => {
            let bridge = match iface.iface_type.as_str() {
                "bridge" => Some(existing_bridge(iface, &what)?),
                "network" => {
                    let network = iface
                        .source
                        .as_deref()
                        .ok_or_else(|| Error::config_unsupported(format!("{what} has no <source network='…'>")))?;
                    Some(networks.active_bridge(network)?)
                }
                _ => None,
            };
            // vhost first: a refusal leaves no tap behind.
            let vhosts = open_vhosts(iface, queues, &what)?;
            let nic = open_tap(iface.target_dev.as_deref(), queues, vhosts, &what)?;
            // A tap that existed before is someone else's to configure.
            if nic.created.is_some() {
                set_host_mac(&nic.name, iface.mac.as_deref())?;
            }
            if let Some(bridge) = bridge {
                add_to_bridge(&bridge, &nic.name)?;
            }
            set_up(&nic.name)?;
            Ok(Some(nic))
        }
        "direct" => {
            let vhosts = open_vhosts(iface, queues, &what)?;
            open_macvtap(iface, vhosts, &what).map(Some)
        }
        _ => Ok(None),
    }
}

/// `<source bridge>` when it names a bridge on this host.
fn existing_bridge(iface: &Interface, what: &str) -> Result<String> {
    let bridge =
        iface.source.clone().ok_or_else(|| Error::config_unsupported(format!("{what} has no <source bridge='…'>")))?;
    if !device_exists(&bridge) {
        return Err(Error::config_unsupported(format!("{what}: bridge '{bridge}' does not exist on this host")));
    }
    if !Path::new("/sys/class/net").join(&bridge).join("bridge").exists() {
        return Err(Error::config_unsupported(format!("{what}: host device '{bridge}' is not a bridge")));
    }
    Ok(bridge)
}

/// The vhost-net descriptors: asked for by `<driver name='vhost'>` (a
/// missing `/dev/vhost-net` then fails, naming it), forbidden by
/// `<driver name='qemu'>`, used when present otherwise.
fn open_vhosts(iface: &Interface, queues: usize, what: &str) -> Result<Vec<OwnedFd>> {
    let asked = match iface.driver_name.as_deref() {
        Some("qemu") => return Ok(Vec::new()),
        Some("vhost") => true,
        None => false,
        Some(other) => {
            return Err(Error::config_unsupported(format!(
                "{what} has <driver name='{other}'>; expected 'vhost' or 'qemu'"
            )))
        }
    };
    if !asked && !Path::new(VHOST_NET_DEVICE).exists() {
        return Ok(Vec::new());
    }
    (0..queues)
        .map(|_| {
            open_rw(VHOST_NET_DEVICE).map_err(|e| {
                Error::config_unsupported(format!(
                    "{what} asks for vhost-net (<driver name='vhost'>), but {VHOST_NET_DEVICE} cannot be opened on \
                     this host ({e})"
                ))
            })
        })
        .collect()
}

fn open_rw(path: &str) -> std::io::Result<OwnedFd> {
    OpenOptions::new().read(true).write(true).open(path).map(OwnedFd::from)
}

/// Whether a network device of that name exists on the host.
pub fn device_exists(name: &str) -> bool {
    !name.is_empty() && !name.contains('/') && Path::new("/sys/class/net").join(name).exists()
}

/// A name the kernel accepts for a network device.
fn check_device_name(name: &str, what: &str) -> Result<()> {
    if name.is_empty() || name.len() >= IFNAMSIZ || name.contains(['/', ' ', ':', '%']) || name == "." || name == ".." {
        return Err(Error::config_unsupported(format!(
            "{what} has <target dev='{name}'>, which is not a network device name (1 to 15 characters, no '/', ':', \
             '%' or space)"
        )));
    }
    Ok(())
}

/// One tun descriptor attached to (or creating) tap `name`.
fn attach_tap(name: &str, queues: usize) -> Result<OwnedFd> {
    tun_set_iff(name, queues).map_err(|e| Error::operation_failed(format!("cannot open tap '{name}': {e}")))
}

/// [`attach_tap`] with the system's error, whose number tells a busy tap.
fn tun_set_iff(name: &str, queues: usize) -> std::io::Result<OwnedFd> {
    let tun = open_rw(TUN_DEVICE)?;
    let mut req = IfReq::named(name);
    let mut flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    if queues > 1 {
        flags |= IFF_MULTI_QUEUE;
    }
    req.data[..2].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `req`
    // lays out; the descriptor is open.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(tun)
}

/// The tap named by `<target dev>` (used as it is when it exists, else
/// created), or a new `vnetN`, with one descriptor per queue.
fn open_tap(target: Option<&str>, queues: usize, vhosts: Vec<OwnedFd>, what: &str) -> Result<OpenedNic> {
    if let Some(target) = target {
        check_device_name(target, what)?;
    }
    let existed = target.is_some_and(device_exists);
    let first = attach_tap(target.unwrap_or(TAP_NAME_PATTERN), queues)?;
    // The kernel's name for it: the pattern completed.
    let name = tap_name(&first)?;
    let mut taps = vec![first];
    for _ in 1..queues {
        taps.push(attach_tap(&name, queues)?);
    }
    let created = (!existed).then(|| CreatedNic { name: name.clone(), kind: HostNicKind::Tap });
    Ok(OpenedNic { name, taps, vhosts, created })
}

/// The name of the tap a tun descriptor is attached to (`TUNGETIFF`).
fn tap_name(tun: &OwnedFd) -> Result<String> {
    const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
    let mut req = IfReq::named("");
    // SAFETY: TUNGETIFF fills a `struct ifreq`, which `req` lays out.
    if unsafe { libc::ioctl(tun.as_raw_fd(), TUNGETIFF, &mut req as *mut IfReq) } < 0 {
        return Err(os_error("cannot read the name of a new tap".to_string()));
    }
    Ok(req.name())
}

/// An `AF_INET` datagram socket for interface ioctls.
fn control_socket() -> Result<OwnedFd> {
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(os_error("cannot open a socket for interface settings".to_string()));
    }
    // SAFETY: the descriptor was just created and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn os_error(doing: String) -> Error {
    Error::operation_failed(format!("{doing}: {}", std::io::Error::last_os_error()))
}

/// Gives a tap the guest's MAC with the first octet 0xfe, as libvirt
/// does, so that a bridge never takes the guest's address as its own.
fn set_host_mac(name: &str, guest_mac: Option<&str>) -> Result<()> {
    let Some(mac) = guest_mac else { return Ok(()) };
    let mut octets = [0u8; 6];
    for (octet, text) in octets.iter_mut().zip(mac.split(':')) {
        *octet = u8::from_str_radix(text, 16).map_err(|_| Error::internal(format!("unchecked MAC '{mac}'")))?;
    }
    octets[0] = 0xfe;
    let mut req = IfReq::named(name);
    req.data[..2].copy_from_slice(&ARPHRD_ETHER.to_ne_bytes());
    req.data[2..8].copy_from_slice(&octets);
    let socket = control_socket()?;
    // SAFETY: SIOCSIFHWADDR reads a `struct ifreq` holding a sockaddr.
    if unsafe { libc::ioctl(socket.as_raw_fd(), SIOCSIFHWADDR, &req as *const IfReq) } < 0 {
        return Err(os_error(format!("cannot set the MAC of tap '{name}'")));
    }
    Ok(())
}

/// Adds `device` to `bridge` (`SIOCBRADDIF`).
fn add_to_bridge(bridge: &str, device: &str) -> Result<()> {
    let index = device_index(device)?;
    let mut req = IfReq::named(bridge);
    req.data[..4].copy_from_slice(&index.to_ne_bytes());
    let socket = control_socket()?;
    // SAFETY: SIOCBRADDIF reads a `struct ifreq` holding an ifindex.
    if unsafe { libc::ioctl(socket.as_raw_fd(), SIOCBRADDIF, &req as *const IfReq) } < 0 {
        return Err(os_error(format!("cannot add '{device}' to bridge '{bridge}'")));
    }
    Ok(())
}

fn device_index(name: &str) -> Result<i32> {
    let c_name = std::ffi::CString::new(name).map_err(|_| Error::internal(format!("device name '{name}'")))?;
    // SAFETY: if_nametoindex reads the NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    i32::try_from(index).ok().filter(|i| *i > 0).ok_or_else(|| os_error(format!("cannot find network device '{name}'")))
}

/// Brings a device up (`SIOCSIFFLAGS` with `IFF_UP` added).
fn set_up(name: &str) -> Result<()> {
    let socket = control_socket()?;
    let mut req = IfReq::named(name);
    // SAFETY: SIOCGIFFLAGS fills the flags of a `struct ifreq`.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req as *mut IfReq) } < 0 {
        return Err(os_error(format!("cannot read the flags of '{name}'")));
    }
    let flags = libc::c_short::from_ne_bytes([req.data[0], req.data[1]]) | libc::IFF_UP as libc::c_short;
    req.data[..2].copy_from_slice(&flags.to_ne_bytes());
    // SAFETY: SIOCSIFFLAGS reads the flags of a `struct ifreq`.
    if unsafe { libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &req as *const IfReq) } < 0 {
        return Err(os_error(format!("cannot bring '{name}' up")));
    }
    Ok(())
}

/// `<source mode>` of a `direct` interface, checked.
fn macvtap_mode<'a>(iface_el_mode: Option<&'a str>, what: &str) -> Result<&'a str> {
    match iface_el_mode.unwrap_or("vepa") {
        mode @ ("bridge" | "vepa" | "private" | "passthrough") => Ok(mode),
        other => Err(Error::config_unsupported(format!(
            "{what} has <source mode='{other}'>; expected bridge, vepa, private or passthrough"
        ))),
    }
}

/// The `ip` arguments that create a macvtap `name` on `link` in `mode`.
pub fn macvtap_add_args(link: &str, name: &str, mode: &str, mac: Option<&str>) -> Vec<String> {
    let mut args: Vec<String> = ["link", "add", "link", link, "name", name].iter().map(ToString::to_string).collect();
    if let Some(mac) = mac {
        args.extend(["address".to_string(), mac.to_string()]);
    }
    args.extend(["type", "macvtap", "mode", mode].iter().map(ToString::to_string));
    args
}

/// A macvtap on `<source dev>` in `<source mode>` (named by `<target dev>`
/// or `macvtapN`), up, with one `/dev/tapN` descriptor per queue.
fn open_macvtap(iface: &Interface, vhosts: Vec<OwnedFd>, what: &str) -> Result<OpenedNic> {
    let link =
        iface.source.clone().ok_or_else(|| Error::config_unsupported(format!("{what} has no <source dev='…'>")))?;
    if !device_exists(&link) {
        return Err(Error::config_unsupported(format!("{what}: host device '{link}' does not exist")));
    }
    let mode = macvtap_mode(iface.source_mode.as_deref(), what)?;
    let name = match &iface.target_dev {
        Some(target) => {
            check_device_name(target, what)?;
            target.clone()
        }
        None => (0..).map(|n| format!("macvtap{n}")).find(|n| !device_exists(n)).unwrap_or_default(),
    };
    let add = macvtap_add_args(&link, &name, mode, iface.mac.as_deref());
    run_tool("ip", &add.iter().map(String::as_str).collect::<Vec<_>>()).map_err(|e| {
        let support = if Path::new("/sys/module/macvtap").exists() { "" } else { " (it has no macvtap module)" };
        Error::config_unsupported(format!(
            "{what} needs a macvtap, which this host's kernel cannot create{support}: {e}"
        ))
    })?;
    let mut nic = OpenedNic {
        name: name.clone(),
        taps: Vec::new(),
        vhosts,
        created: Some(CreatedNic { name: name.clone(), kind: HostNicKind::Macvtap }),
    };
    set_up(&name)?;
    let char_device = format!("/dev/tap{}", device_index(&name)?);
    for _ in 0..iface.driver_queues.unwrap_or(1) {
        nic.taps.push(open_rw(&char_device).map_err(|e| Error::io("open", Path::new(&char_device), e))?);
    }
    Ok(nic)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn null() -> OwnedFd {
        open_rw("/dev/null").expect("open /dev/null")
    }

    #[test]
    fn a_macvtap_is_created_on_its_link_in_its_mode_with_the_guest_mac() {
        assert_eq!(
            macvtap_add_args("eth0", "macvtap0", "bridge", Some("52:54:00:00:00:01")).join(" "),
            "link add link eth0 name macvtap0 address 52:54:00:00:00:01 type macvtap mode bridge"
        );
        assert_eq!(macvtap_mode(None, "i").expect("default"), "vepa");
        let err = macvtap_mode(Some("bogus"), "interface 'x'").expect_err("refused").to_string();
        assert!(err.contains("interface 'x' has <source mode='bogus'>"), "{err}");
    }

    #[test]
    fn the_netdev_names_every_queue_and_vhost_descriptor() {
        let nic =
            OpenedNic { name: "vnet0".into(), taps: vec![null(), null()], vhosts: vec![null(), null()], created: None };
        let fd = |f: &OwnedFd| f.as_raw_fd().to_string();
        assert_eq!(
            nic.netdev_options("hostnet0"),
            format!(
                "tap,id=hostnet0,fds={}:{},vhost=on,vhostfds={}:{}",
                fd(&nic.taps[0]),
                fd(&nic.taps[1]),
                fd(&nic.vhosts[0]),
                fd(&nic.vhosts[1])
            )
        );
        let plain = OpenedNic { name: "vnet0".into(), taps: vec![null()], vhosts: Vec::new(), created: None };
        assert_eq!(plain.netdev_options("hostnet1"), format!("tap,id=hostnet1,fds={}", fd(&plain.taps[0])));
    }

    #[test]
    fn a_target_dev_the_kernel_cannot_name_is_refused() {
        for bad in ["", "a/b", "sixteen-chars-xx", "vnet%d"] {
            assert!(check_device_name(bad, "i").is_err(), "{bad}");
        }
        check_device_name("vnet12", "i").expect("a good name");
    }

    #[test]
    fn created_devices_round_trip_through_the_status() {
        let nic = CreatedNic { name: "macvtap3".into(), kind: HostNicKind::Macvtap };
        assert_eq!(CreatedNic::from_element(&nic.to_element()), Some(nic));
    }
}
