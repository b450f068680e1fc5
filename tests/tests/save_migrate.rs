//! save, restore, managedsave and the domain job (domjobinfo, domjobabort)
//! against real QEMU: guest RAM written through QEMU's gdb stub and
//! compared with `pmemsave` dumps, saved images on files, loop block
//! devices and full targets.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// The guest RAM of the fixture's domain.
const RAM_BYTES: u64 = 128 << 20;
/// Where the tests write guest RAM, and how much: far above what the
/// firmware uses, and enough to make a save take seconds at 1 MiB/s.
const FILL_AT: u64 = 64 << 20;
const FILL_BYTES: usize = 8 << 20;

/// Bytes that do not compress or repeat (xorshift), different per seed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A domain `name` with one 16 MiB qcow2 disk, started; destroyed when
/// the guard drops.
fn running_domain<'a>(env: &'a TestEnv, name: &str) -> (DomainGuard<'a>, PathBuf) {
    let disk = env.path(&format!("{name}.qcow2"));
    qemu_img(&["create", "-q", "-f", "qcow2", disk.to_str().expect("utf8"), "16M"]);
    env.define(name, &domain_xml(name, &[DiskSpec { target: "vda", format: "qcow2", path: &disk, extra: "" }]));
    env.ok(&["start", name]);
    (DomainGuard { env, name: name.to_string() }, disk)
}

/// One gdb remote-protocol exchange: sends `body` as a packet and returns
/// the reply's payload. Stop replies (`T…`: the stub stops the guest when
/// a debugger attaches and says so unasked) are read and passed over.
fn gdb_packet(stream: &mut UnixStream, body: &str) -> String {
    let sum = body.bytes().fold(0u8, u8::wrapping_add);
    stream.write_all(format!("${body}#{sum:02x}").as_bytes()).expect("send to the gdb stub");
    loop {
        let reply = gdb_reply(stream);
        if !reply.starts_with('T') {
            return reply;
        }
    }
}

/// Reads one `$payload#xx` packet (skipping acks) and acknowledges it.
fn gdb_reply(stream: &mut UnixStream) -> String {
    let mut packet = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        stream.read_exact(&mut byte).expect("read from the gdb stub");
        if packet.is_empty() && byte[0] != b'$' {
            continue;
        }
        packet.push(byte[0]);
        if packet.len() >= 3 && packet[packet.len() - 3] == b'#' {
            break;
        }
    }
    stream.write_all(b"+").expect("ack the gdb stub");
    String::from_utf8_lossy(&packet[1..packet.len() - 3]).into_owned()
}

/// Writes `data` into guest RAM at `addr` (linear = physical: the firmware
/// runs without paging) through QEMU's gdb stub, which pauses the guest
/// while a debugger is attached and resumes it when it detaches.
fn write_guest_ram(env: &TestEnv, name: &str, addr: u64, data: &[u8]) {
    let sock = env.path(&format!("{name}-gdb.sock"));
    let start = format!("gdbserver unix:{},server=on,wait=off", sock.display());
    env.ok(&["qemu-monitor-command", name, "--hmp", &start]);
    let mut stream = UnixStream::connect(&sock).expect("connect to the gdb stub");
    stream.set_read_timeout(Some(Duration::from_secs(60))).expect("timeout");
    for (i, chunk) in data.chunks(1024).enumerate() {
        let hex: String = chunk.iter().map(|b| format!("{b:02x}")).collect();
        let at = addr + (i * 1024) as u64;
        assert_eq!(gdb_packet(&mut stream, &format!("M{at:x},{:x}:{hex}", chunk.len())), "OK");
    }
    assert_eq!(gdb_packet(&mut stream, "D"), "OK");
    drop(stream);
    env.ok(&["qemu-monitor-command", name, "--hmp", "gdbserver none"]);
}

/// Guest RAM as `pmemsave` dumps it.
fn guest_ram(env: &TestEnv, name: &str, dump: &str) -> Vec<u8> {
    let file = env.path(dump);
    let cmd = serde_json::json!({"execute": "pmemsave", "arguments": {"val": 0, "size": RAM_BYTES, "filename": file}});
    env.ok(&["qemu-monitor-command", name, &cmd.to_string()]);
    let ram = std::fs::read(&file).expect("read the RAM dump");
    assert_eq!(ram.len() as u64, RAM_BYTES);
    ram
}

/// Where the guest's RAM is compared from: below 1 MiB, QEMU's kvmvapic
/// option ROM (copied there by the firmware) has its state bytes rewritten
/// by QEMU itself when a migration stream is loaded, whatever the stream.
const COMPARED_FROM: usize = 1 << 20;

/// Guest RAM dumped after a restore is the RAM dumped before the save.
fn assert_same_ram(before: &[u8], after: &[u8]) {
    let differing = (COMPARED_FROM..after.len()).find(|&i| after[i] != before[i]);
    assert_eq!(differing, None, "restored RAM differs from saved RAM (first at this offset)");
}

/// Fills guest RAM with noise, pauses the guest (so its RAM stays as it
/// is) and returns a dump, checked to hold the noise.
fn filled_and_paused(env: &TestEnv, name: &str, seed: u64) -> Vec<u8> {
    let data = noise(seed, FILL_BYTES);
    write_guest_ram(env, name, FILL_AT, &data);
    env.ok(&["suspend", name]);
    let ram = guest_ram(env, name, "before.ram");
    assert!(ram[FILL_AT as usize..FILL_AT as usize + FILL_BYTES] == data[..], "the RAM write did not happen");
    ram
}

/// QEMU's own run state (`query-status`).
fn qemu_status(env: &TestEnv, name: &str) -> String {
    let reply = env.ok(&["qemu-monitor-command", name, r#"{"execute":"query-status"}"#]);
    let value: serde_json::Value = serde_json::from_str(&reply).expect("QMP reply");
    value["return"]["status"].as_str().expect("a status").to_string()
}

fn domstate(env: &TestEnv, name: &str) -> String {
    env.ok(&["domstate", name]).trim().to_string()
}

/// Waits until `domjobinfo` shows the domain's `operation` running (a
/// 60 s hang guard) and returns what it printed.
fn job_running(env: &TestEnv, name: &str, operation: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let info = env.ok(&["domjobinfo", name]);
        if info.contains(&format!("Operation:        {operation}")) {
            return info;
        }
        assert!(Instant::now() < deadline, "no {operation} job seen: {info}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes `data` into vm1's RAM and saves vm1 to `file` at 1 MiB/s in the
/// background; returns once `domjobinfo` shows the save, with what it
/// printed.
fn throttled_save(env: &TestEnv, data: &[u8], file: &Path) -> (Background, String) {
    write_guest_ram(env, "vm1", FILL_AT, data);
    let save = Background::spawn(env, &["save", "vm1", file.to_str().expect("utf8"), "--bandwidth", "1"]);
    let info = job_running(env, "vm1", "Save");
    (save, info)
}

/// The names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A loop block device on a file of `bytes` the test makes; detached by
/// its path on drop.
struct LoopDevice {
    path: String,
}

impl LoopDevice {
    fn attach(env: &TestEnv, name: &str, bytes: u64) -> LoopDevice {
        let backing = env.path(name);
        std::fs::File::create(&backing).and_then(|f| f.set_len(bytes)).expect("backing file");
        let out = Command::new("losetup").arg("-f").arg("--show").arg(&backing).output().expect("run losetup");
        assert!(out.status.success(), "losetup failed: {}", String::from_utf8_lossy(&out.stderr));
        LoopDevice { path: String::from_utf8_lossy(&out.stdout).trim().to_string() }
    }

    fn is_block_device(&self) -> bool {
        std::fs::metadata(&self.path).is_ok_and(|m| m.file_type().is_block_device())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

#[test]
fn save_to_a_file_and_restore_keeps_ram_and_leaves_the_disk() {
    let env = TestEnv::new();
    let (_guard, disk) = running_domain(&env, "vm1");
    let before = filled_and_paused(&env, "vm1", 1);
    let disk_before = env.path("disk-before.raw");
    qemu_img(&["convert", "-U", "-O", "raw", disk.to_str().expect("utf8"), disk_before.to_str().expect("utf8")]);

    let saves = env.path("saves");
    std::fs::create_dir(&saves).expect("mkdir");
    let file = saves.join("vm1.save");
    let file = file.to_str().expect("utf8");
    let out = env.ok(&["save", "vm1", file]);
    assert!(out.contains(&format!("Domain 'vm1' saved to {file}")), "{out}");
    assert_eq!(domstate(&env, "vm1"), "shut off");
    assert_eq!(listing(&saves), ["vm1.save"], "only the image, renamed into place");
    assert!(env.ok(&["save-image-dumpxml", file]).contains("<name>vm1</name>"));
    let same = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "qcow2",
        disk_before.to_str().expect("utf8"),
        disk.to_str().expect("utf8"),
    ]);
    assert!(same.contains("identical"), "{same}");

    let out = env.ok(&["restore", file]);
    assert!(out.contains(&format!("Domain restored from {file}")), "{out}");
    // Saved paused, restored paused: the RAM stays as it was.
    assert_eq!(domstate(&env, "vm1"), "paused");
    assert_same_ram(&before, &guest_ram(&env, "vm1", "after.ram"));
    env.ok(&["resume", "vm1"]);
    assert_eq!(qemu_status(&env, "vm1"), "running");
}

#[test]
fn save_to_a_loop_block_device_and_restore() {
    let env = TestEnv::new();
    let (_guard, _disk) = running_domain(&env, "vm1");
    let device = LoopDevice::attach(&env, "loop-backing", 64 << 20);
    let before = filled_and_paused(&env, "vm1", 2);

    let out = env.ok(&["save", "vm1", &device.path, "--running"]);
    assert!(out.contains(&format!("Domain 'vm1' saved to {}", device.path)), "{out}");
    assert!(device.is_block_device(), "the device node is still there");
    assert!(env.ok(&["save-image-dumpxml", &device.path]).contains("<name>vm1</name>"));

    env.ok(&["restore", &device.path, "--paused"]);
    assert_eq!(domstate(&env, "vm1"), "paused");
    assert_same_ram(&before, &guest_ram(&env, "vm1", "after.ram"));
    // Without a flag, the state recorded by `save --running`.
    env.ok(&["destroy", "vm1"]);
    env.ok(&["restore", &device.path]);
    assert_eq!(qemu_status(&env, "vm1"), "running");
}

#[test]
fn a_save_that_fills_its_target_leaves_the_device_node_the_file_and_the_running_domain() {
    let env = TestEnv::new();
    let (_guard, _disk) = running_domain(&env, "vm1");
    write_guest_ram(&env, "vm1", FILL_AT, &noise(3, FILL_BYTES));
    assert_eq!(qemu_status(&env, "vm1"), "running");

    let device = LoopDevice::attach(&env, "small-backing", 1 << 20);
    let err = env.fails(&["save", "vm1", &device.path]);
    assert!(err.contains(&format!("error: Failed to save domain 'vm1' to {}", device.path)), "{err}");
    assert!(device.is_block_device(), "a failed save must not remove the device node");
    assert_eq!(qemu_status(&env, "vm1"), "running");
    assert_eq!(domstate(&env, "vm1"), "running");

    let tiny = Tmpfs::mount(env.path("tiny"), "1M");
    let file = tiny.path.join("vm1.save");
    std::fs::write(&file, "an earlier save").expect("write");
    let err = env.fails(&["save", "vm1", file.to_str().expect("utf8")]);
    assert!(err.contains("Failed to save domain 'vm1'"), "{err}");
    assert_eq!(listing(&tiny.path), ["vm1.save"], "the partial image is removed");
    assert_eq!(std::fs::read_to_string(&file).expect("read"), "an earlier save");
    assert_eq!(qemu_status(&env, "vm1"), "running");
}

#[test]
fn managedsave_and_start_resume_with_ram_identical() {
    let env = TestEnv::new();
    let (_guard, _disk) = running_domain(&env, "vm1");
    let before = filled_and_paused(&env, "vm1", 4);

    let out = env.ok(&["managedsave", "vm1"]);
    assert!(out.contains("Domain 'vm1' state saved by Strata"), "{out}");
    assert_eq!(domstate(&env, "vm1"), "shut off");
    assert!(env.ok(&["dominfo", "vm1"]).contains("Managed save:   yes"));

    env.ok(&["start", "vm1"]);
    assert_eq!(domstate(&env, "vm1"), "paused", "saved paused, resumed paused");
    assert_same_ram(&before, &guest_ram(&env, "vm1", "after.ram"));
    assert!(env.ok(&["dominfo", "vm1"]).contains("Managed save:   no"));

    // A second managed save, removed: the next start boots afresh.
    env.ok(&["resume", "vm1"]);
    env.ok(&["managedsave", "vm1"]);
    assert!(env.ok(&["managedsave-remove", "vm1"]).contains("Removed managedsave image for domain 'vm1'"));
    assert!(env.ok(&["dominfo", "vm1"]).contains("Managed save:   no"));
    env.ok(&["start", "vm1"]);
    assert!(guest_ram(&env, "vm1", "booted.ram")[FILL_AT as usize..FILL_AT as usize + FILL_BYTES]
        .iter()
        .all(|&b| b == 0));
}

#[test]
fn domjobabort_cancels_a_throttled_save_and_the_domain_runs_on() {
    let env = TestEnv::new();
    let (_guard, _disk) = running_domain(&env, "vm1");
    let saves = env.path("saves");
    std::fs::create_dir(&saves).expect("mkdir");
    let (save, info) = throttled_save(&env, &noise(5, FILL_BYTES), &saves.join("vm1.save"));
    assert!(info.starts_with("Job type:         Unbounded"), "{info}");
    assert!(info.contains("Data total:"), "{info}");
    let json: serde_json::Value = serde_json::from_str(&env.ok(&["domjobinfo", "vm1", "--json"])).expect("JSON");
    assert_eq!(json["job"]["operation"], "save");

    env.ok(&["domjobabort", "vm1"]);
    let out = save.finish(Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("operation aborted"), "{err}");
    assert_eq!(qemu_status(&env, "vm1"), "running");
    assert!(listing(&saves).is_empty(), "the partial image is removed: {:?}", listing(&saves));
    assert!(env.ok(&["domjobinfo", "vm1"]).starts_with("Job type:         None"));
    assert!(env.fails(&["domjobabort", "vm1"]).contains("no job is active on the domain"));
}

#[test]
fn a_save_killed_mid_stream_is_undone_by_the_next_command() {
    let env = TestEnv::new();
    let (_guard, _disk) = running_domain(&env, "vm1");
    let data = noise(8, FILL_BYTES);
    let saves = env.path("saves");
    std::fs::create_dir(&saves).expect("mkdir");
    let (save, _) = throttled_save(&env, &data, &saves.join("vm1.save"));
    let partial = listing(&saves);
    assert!(partial.len() == 1 && partial[0].ends_with(".partial"), "the save writes a partial image: {partial:?}");
    // SIGKILL, as the OOM killer would end it, mid-stream.
    drop(save);

    assert_eq!(domstate(&env, "vm1"), "running");
    assert_eq!(qemu_status(&env, "vm1"), "running");
    assert!(listing(&saves).is_empty(), "the partial image is removed: {:?}", listing(&saves));
    assert!(env.ok(&["domjobinfo", "vm1"]).starts_with("Job type:         None"));
    env.ok(&["suspend", "vm1"]);
    let ram = guest_ram(&env, "vm1", "after.ram");
    assert!(ram[FILL_AT as usize..FILL_AT as usize + FILL_BYTES] == data[..], "guest RAM changed");
}

#[test]
fn a_save_killed_once_its_image_is_in_place_is_finished_by_the_next_command() {
    let env = TestEnv::new();
    let (_guard, _disk) = running_domain(&env, "vm1");
    let before = filled_and_paused(&env, "vm1", 9);
    let file = env.path("vm1.save");

    killed_at(&env, &["save", "vm1", file.to_str().expect("utf8")], "save:committed");
    // Read without strata, which would finish the save first.
    let pid = qemu_pid(&env, "vm1").expect("killed before the source QEMU was stopped");
    assert!(process_runs(pid), "the source QEMU runs");

    assert_eq!(env.ok(&["list", "--all", "--name"]).trim(), "vm1");
    assert_eq!(domstate(&env, "vm1"), "shut off");
    assert!(qemu_pid(&env, "vm1").is_none(), "the source QEMU is stopped");
    assert!(!process_runs(pid), "the source QEMU is gone");
    env.ok(&["restore", file.to_str().expect("utf8")]);
    assert_same_ram(&before, &guest_ram(&env, "vm1", "after.ram"));
}

/// A domain `vm1` on `src` with vda (in the disk set, to be copied) and
/// vdb on `shared/` (a running pool of `dest` holds that directory), and,
/// with `private`, vdc neither copied nor shared; every disk holds a
/// pattern the guest wrote. Started; destroyed when the guard drops.
fn migratable_domain<'a>(src: &'a TestEnv, dest: &TestEnv, private: bool) -> DomainGuard<'a> {
    let shared = src.path("shared");
    std::fs::create_dir(&shared).expect("mkdir");
    dest.ok(&["pool-define-as", "shared", "dir", "--target", shared.to_str().expect("utf8")]);
    dest.ok(&["pool-start", "shared"]);
    let vda = src.path("copied.qcow2");
    let vdb = shared.join("shared.qcow2");
    let vdc = src.path("private.qcow2");
    let mut disks = vec![(vda, "vda"), (vdb, "vdb")];
    if private {
        disks.push((vdc, "vdc"));
    }
    for (path, _) in &disks {
        qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().expect("utf8"), "16M"]);
    }
    let specs: Vec<DiskSpec> =
        disks.iter().map(|(path, target)| DiskSpec { target, format: "qcow2", path, extra: "" }).collect();
    src.define("vm1", &domain_xml("vm1", &specs));
    src.ok(&["diskset-add", "vm1", "vda"]);
    src.ok(&["start", "vm1"]);
    for (i, (_, target)) in disks.iter().enumerate() {
        let write = format!("qemu-io -d {target}/virtio-backend \"write -P {:#x} 1M 2M\"", 0x51 + i);
        assert_eq!(src.ok(&["qemu-monitor-command", "vm1", "--hmp", &write]).trim(), "");
    }
    DomainGuard { env: src, name: "vm1".into() }
}

/// The destination has no trace of a migration: no domain, no QEMU, no
/// copied image.
fn assert_destination_clean(dest: &TestEnv) {
    assert_eq!(dest.ok(&["list", "--all", "--name"]).trim(), "", "no domain at the destination");
    let images = dest.state_root().join("images");
    let left: Vec<String> = std::fs::read_dir(&images)
        .map(|d| d.flatten().map(|e| e.path().display().to_string()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "copied images left at the destination: {left:?}");
    assert_no_stray_processes(dest, "after a migration that did not happen");
}

/// Two network namespaces joined by a veth pair, acting as two hosts:
/// `a` at 10.254.0.1 and `b` at 10.254.0.2, named after this test process
/// and the test's tag; deleted by those names on drop, even after a
/// failure (the veth pair goes with them).
struct TwoHosts {
    a: String,
    b: String,
}

const HOST_B_ADDRESS: &str = "10.254.0.2";

impl TwoHosts {
    fn new(tag: &str) -> TwoHosts {
        let pid = std::process::id();
        let hosts = TwoHosts { a: format!("strata-{pid}-{tag}-a"), b: format!("strata-{pid}-{tag}-b") };
        let (veth_a, veth_b) = (format!("sv{pid}{tag}a"), format!("sv{pid}{tag}b"));
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("run ip (iproute2)");
            assert!(out.status.success(), "ip {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        };
        ip(&["netns", "add", &hosts.a]);
        ip(&["netns", "add", &hosts.b]);
        ip(&["link", "add", &veth_a, "netns", &hosts.a, "type", "veth", "peer", "name", &veth_b, "netns", &hosts.b]);
        for (ns, veth, address) in [(&hosts.a, &veth_a, "10.254.0.1/24"), (&hosts.b, &veth_b, "10.254.0.2/24")] {
            ip(&["-n", ns, "addr", "add", address, "dev", veth]);
            ip(&["-n", ns, "link", "set", veth, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        hosts
    }

    /// A source world whose every `strata` runs in host a, and a
    /// destination reached from it as the Strata host at b's address,
    /// whose `strata` (and so QEMU) runs in host b.
    fn envs(&self) -> (TestEnv, TestEnv) {
        (host_env(&self.a, ""), host_env(&self.b, HOST_B_ADDRESS))
    }
}

impl TwoHosts {
    /// The TCP sockets listening in host b, as `ss -Hltn` lists them.
    fn listening_in_b(&self) -> String {
        let out = Command::new("ip").args(["netns", "exec", &self.b, "ss", "-Hltn"]).output().expect("run ss");
        assert!(out.status.success(), "ss failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A world on the Strata host `netns`: its URI runs `strata` there
/// through the ext transport, the host reached at `address`.
fn host_env(netns: &str, address: &str) -> TestEnv {
    let mut env = TestEnv::new();
    let command = format!("ip netns exec {netns} {}", env!("CARGO_BIN_EXE_strata-test-cli"));
    env.uri = format!(
        "qemu+ext://{address}/embed?root={}&command={}",
        env.state_root().display(),
        command.replace(' ', "%20")
    );
    env
}

/// Whether the domain's QEMU runs in network namespace `netns`.
fn runs_in(env: &TestEnv, name: &str, netns: &str) -> bool {
    let pid = qemu_pid(env, name).expect("a running QEMU");
    let ino = |path: String| std::fs::metadata(&path).map(|m| std::os::unix::fs::MetadataExt::ino(&m)).expect(&path);
    ino(format!("/proc/{pid}/ns/net")) == ino(format!("/run/netns/{netns}"))
}

#[test]
fn migrate_copies_the_disk_set_shares_the_rest_and_keeps_ram() {
    migrates_the_disk_set_keeping_ram(&TestEnv::new(), &TestEnv::new(), None);
}

#[test]
fn migrate_to_another_host_over_tcp_copies_the_disk_set_and_keeps_ram() {
    let hosts = TwoHosts::new("m");
    let (src, dest) = hosts.envs();
    migrates_the_disk_set_keeping_ram(&src, &dest, Some(&hosts));
}

/// A disk-set migration of vm1 from `src` to `dest` (on `hosts` when
/// given: its QEMU in host a before, in host b after): the guest's RAM
/// and disks arrive, the source is undefined.
fn migrates_the_disk_set_keeping_ram(src: &TestEnv, dest: &TestEnv, hosts: Option<&TwoHosts>) {
    let _guard = migratable_domain(src, dest, false);
    let _dest_guard = DomainGuard { env: dest, name: "vm1".into() };
    if let Some(hosts) = hosts {
        assert!(runs_in(src, "vm1", &hosts.a), "the source QEMU runs in host a");
    }
    // The firmware of a running guest keeps changing its own RAM, so the
    // guest is paused for the dumps; it arrives paused and is resumed.
    let before = filled_and_paused(src, "vm1", 6);

    src.ok(&["migrate", "vm1", &dest.uri, "--live", "--copy-storage-disk-set", "--persistent", "--undefinesource"]);
    if let Some(hosts) = hosts {
        assert!(runs_in(dest, "vm1", &hosts.b), "the destination QEMU runs in host b");
    }
    assert_eq!(qemu_status(dest, "vm1"), "paused");
    assert_eq!(src.ok(&["list", "--all", "--name"]).trim(), "", "undefined at the source");
    assert!(!src.state_root().join("domains/vm1").exists(), "nothing of it is left at the source");
    assert_same_ram(&before, &guest_ram(dest, "vm1", "after.ram"));
    dest.ok(&["resume", "vm1"]);
    assert_eq!(qemu_status(dest, "vm1"), "running");

    let blklist = dest.ok(&["domblklist", "vm1"]);
    let copied = dest.state_root().join("images/vm1/copied.qcow2");
    let shared = src.path("shared/shared.qcow2");
    assert!(blklist.contains(&copied.display().to_string()), "{blklist}");
    assert!(blklist.contains(&shared.display().to_string()), "{blklist}");
    let source = src.path("copied.qcow2");
    let same = qemu_img(&["compare", "-U", source.to_str().expect("utf8"), copied.to_str().expect("utf8")]);
    assert!(same.contains("identical"), "{same}");
    // What the guest wrote before the move is on the destination's disks.
    let read = |image: &Path, pattern: u8| {
        qemu_io(&[
            "-U",
            "-r",
            "-f",
            "qcow2",
            "-c",
            &format!("read -P {pattern:#x} 1M 2M"),
            image.to_str().expect("utf8"),
        ])
    };
    assert!(!read(&copied, 0x51).contains("Pattern verification failed"));
    assert!(!read(&shared, 0x52).contains("Pattern verification failed"));
    assert!(dest.ok(&["dumpxml", "vm1", "--inactive"]).contains("<name>vm1</name>"), "defined at the destination");
}

#[test]
fn a_running_guest_migrates_running() {
    running_guest_arrives_running(&TestEnv::new(), &TestEnv::new());
}

#[test]
fn a_running_guest_migrates_running_to_another_host() {
    let hosts = TwoHosts::new("g");
    let (src, dest) = hosts.envs();
    running_guest_arrives_running(&src, &dest);
}

/// A running vm1 moved from `src` to `dest` with every disk copied runs
/// there, its state's reason `migrated`, and is shut off at the source.
fn running_guest_arrives_running(src: &TestEnv, dest: &TestEnv) {
    let (_guard, disk) = running_domain(src, "vm1");
    let _dest_guard = DomainGuard { env: dest, name: "vm1".into() };
    src.ok(&["migrate", "vm1", &dest.uri, "--live", "--copy-storage-all"]);
    assert_eq!(qemu_status(dest, "vm1"), "running");
    assert_eq!(dest.ok(&["domstate", "vm1", "--reason"]).trim(), "running (migrated)");
    assert_eq!(domstate(src, "vm1"), "shut off");
    let copied = dest.state_root().join("images/vm1").join(disk.file_name().expect("a file name"));
    let same = qemu_img(&["compare", "-U", disk.to_str().expect("utf8"), copied.to_str().expect("utf8")]);
    assert!(same.contains("identical"), "{same}");
}

#[test]
fn migrate_refuses_a_disk_neither_copied_nor_shared_before_anything_starts() {
    refuses_an_unshared_disk(&TestEnv::new(), &TestEnv::new());
}

#[test]
fn migrate_to_another_host_refuses_a_disk_neither_copied_nor_shared_before_anything_starts() {
    let hosts = TwoHosts::new("r");
    let (src, dest) = hosts.envs();
    refuses_an_unshared_disk(&src, &dest);
}

/// vm1 with a disk neither copied nor on storage `dest` shares is not
/// migrated: refused before anything starts, naming the disk.
fn refuses_an_unshared_disk(src: &TestEnv, dest: &TestEnv) {
    let _guard = migratable_domain(src, dest, true);
    let err = src.fails(&["migrate", "vm1", &dest.uri, "--live", "--copy-storage-disk-set"]);
    let private = src.path("private.qcow2");
    assert!(
        err.contains(&format!("disk 'vdc' is not copied and '{}' is not on storage shared with", private.display())),
        "{err}"
    );
    assert_eq!(qemu_status(src, "vm1"), "running");
    assert_eq!(domstate(src, "vm1"), "running");
    assert_destination_clean(dest);
}

#[test]
fn domjobabort_cancels_a_throttled_migration_leaving_the_source_running_and_the_destination_clean() {
    let src = TestEnv::new();
    let dest = TestEnv::new();
    let _guard = migratable_domain(&src, &dest, false);
    write_guest_ram(&src, "vm1", FILL_AT, &noise(7, FILL_BYTES));

    let args = ["migrate", "vm1", &dest.uri, "--live", "--copy-storage-disk-set", "--bandwidth", "1"];
    let migration = Background::spawn(&src, &args);
    job_running(&src, "vm1", "Outgoing migration");
    src.ok(&["domjobabort", "vm1"]);
    let out = migration.finish(Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Failed to migrate domain 'vm1'") && err.contains("operation aborted"), "{err}");
    assert_eq!(qemu_status(&src, "vm1"), "running");
    assert_destination_clean(&dest);
    // The source can still be saved: the migration left no capability behind.
    src.ok(&["save", "vm1", src.path("after-abort.save").to_str().expect("utf8")]);
}

/// The source's block jobs as `query-block-jobs` lists them.
fn block_jobs(env: &TestEnv, name: &str) -> Vec<serde_json::Value> {
    let reply = env.ok(&["qemu-monitor-command", name, r#"{"execute":"query-block-jobs"}"#]);
    let value: serde_json::Value = serde_json::from_str(&reply).expect("QMP reply");
    value["return"].as_array().expect("a job list").clone()
}

/// Writes 9 MiB more into vm1's copied disk (vda), then migrates vm1 to
/// `dest` at 1 MiB/s in the background (with `extra` options); returns
/// once the copy of vda runs (a 60 s hang guard), with its
/// `query-block-jobs` entry. QEMU's mirror copies one dirty extent per
/// step and pays for it in delay after it, so the copy is ready only
/// after the delays of every extent but the last: the 8 MiB extent has a
/// 1 MiB one after it, or a test slowed down by more than the first
/// extent's 2 s (seen under load) would find the copy ready.
fn throttled_disk_copy(src: &TestEnv, dest: &TestEnv, extra: &[&str]) -> (Background, serde_json::Value) {
    for write in [
        "qemu-io -d vda/virtio-backend \"write -P 0x61 4M 8M\"",
        "qemu-io -d vda/virtio-backend \"write -P 0x62 14M 1M\"",
    ] {
        assert_eq!(src.ok(&["qemu-monitor-command", "vm1", "--hmp", write]).trim(), "");
    }
    let mut args = vec!["migrate", "vm1", &dest.uri, "--live", "--copy-storage-disk-set", "--bandwidth", "1"];
    args.extend_from_slice(extra);
    let migration = Background::spawn(src, &args);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let jobs = block_jobs(src, "vm1");
        if let Some(copy) = jobs.iter().find(|j| j["device"] == "strata-migrate-vda") {
            return (migration, copy.clone());
        }
        assert!(Instant::now() < deadline, "no copy of vda started: {jobs:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_throttled_migration_caps_its_disk_copy_and_domjobabort_cancels_it() {
    aborts_a_throttled_disk_copy(&TestEnv::new(), &TestEnv::new());
}

#[test]
fn domjobabort_cancels_a_throttled_migration_to_another_host_leaving_the_destination_clean() {
    let hosts = TwoHosts::new("a");
    let (src, dest) = hosts.envs();
    aborts_a_throttled_disk_copy(&src, &dest);
}

/// A migration of vm1 from `src` to `dest` at 1 MiB/s copies its disk at
/// that speed, and domjobabort ends it there: the source runs on, the
/// destination has nothing of it.
fn aborts_a_throttled_disk_copy(src: &TestEnv, dest: &TestEnv) {
    let _guard = migratable_domain(src, dest, false);
    let (migration, copy) = throttled_disk_copy(src, dest, &[]);
    assert_eq!(copy["type"], "mirror", "{copy}");
    assert_eq!(copy["speed"], 1 << 20, "the disk copy runs at the migration's bandwidth: {copy}");
    // Its first burst may reach the end; the rate limit then holds it
    // back from ready.
    assert!(copy["status"] == "running" && copy["ready"] == false, "the copy is still running: {copy}");

    src.ok(&["domjobabort", "vm1"]);
    let out = migration.finish(Duration::from_secs(120));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("operation aborted: migration job: canceled by client"), "{err}");
    assert_eq!(block_jobs(src, "vm1"), Vec::<serde_json::Value>::new(), "the copy is gone");
    assert_eq!(qemu_status(src, "vm1"), "running");
    assert_eq!(domstate(src, "vm1"), "running");
    assert_destination_clean(dest);
}

#[test]
fn migrateuri_and_disks_uri_choose_where_the_destination_host_listens() {
    let hosts = TwoHosts::new("u");
    let (src, dest) = hosts.envs();
    let _guard = migratable_domain(&src, &dest, false);
    let err = src.fails(&["migrate", "vm1", &dest.uri, "--live", "--copy-storage-all", "--migrateuri", "unix:/run/m"]);
    assert!(err.contains("'unix:/run/m' is not a migration URI of the form tcp:HOST[:PORT]"), "{err}");
    assert_destination_clean(&dest);

    let uris = ["--migrateuri", "tcp:10.254.0.2:49252", "--disks-uri", "tcp://10.254.0.2:49253"];
    let (migration, _) = throttled_disk_copy(&src, &dest, &uris);
    let listening = hosts.listening_in_b();
    assert!(listening.contains("10.254.0.2:49252"), "the memory stream's port: {listening}");
    assert!(listening.contains("10.254.0.2:49253"), "the disks' port: {listening}");
    src.ok(&["domjobabort", "vm1"]);
    assert_eq!(migration.finish(Duration::from_secs(120)).status.code(), Some(1));
    assert_eq!(qemu_status(&src, "vm1"), "running");
    assert_destination_clean(&dest);
    assert!(!hosts.listening_in_b().contains("10.254.0.2:4925"), "nothing listens any more");
}

/// A `domjobinfo` line's value.
fn job_field(info: &str, label: &str) -> String {
    let line = info.lines().find(|l| l.starts_with(label)).unwrap_or_else(|| panic!("no '{label}' in {info}"));
    line[label.len()..].trim().to_string()
}

/// A `domjobinfo` size (`1.500 MiB`) in bytes.
fn job_bytes(info: &str, label: &str) -> f64 {
    let value = job_field(info, label);
    let (number, unit) = value.split_once(' ').unwrap_or_else(|| panic!("no unit in '{value}'"));
    let scale = ["B", "KiB", "MiB", "GiB"].iter().position(|u| *u == unit).expect("a binary unit");
    number.parse::<f64>().expect("a number") * 1024f64.powi(scale as i32)
}

#[test]
fn domjobinfo_of_a_migration_copying_its_disks_shows_its_time_and_the_disks_progress() {
    let src = TestEnv::new();
    let dest = TestEnv::new();
    let _guard = migratable_domain(&src, &dest, false);
    let args = ["migrate", "vm1", &dest.uri, "--live", "--copy-storage-disk-set"];
    let migration = Background::spawn_paused_at(&src, &args, "migrate:disks-copying").expect("paused at the disk copy");
    let elapsed = |info: &str| -> u64 {
        job_field(info, "Time elapsed:").trim_end_matches("ms").trim().parse().expect("milliseconds")
    };
    let first = src.ok(&["domjobinfo", "vm1"]);
    std::thread::sleep(Duration::from_millis(200));
    let second = src.ok(&["domjobinfo", "vm1"]);
    assert!(elapsed(&first) > 0, "{first}");
    assert!(elapsed(&second) > elapsed(&first), "{first}\n{second}");
    for info in [&first, &second] {
        assert_eq!(job_field(info, "Operation:"), "Outgoing migration");
        let total = job_bytes(info, "File total:");
        assert!(total > 0.0, "{info}");
        assert!(job_bytes(info, "File processed:") <= total, "{info}");
        assert!(job_bytes(info, "Data processed:") <= job_bytes(info, "Data total:"), "{info}");
    }
    let json: serde_json::Value = serde_json::from_str(&src.ok(&["domjobinfo", "vm1", "--json"])).expect("JSON");
    let disks = &json["job"]["disks"];
    assert!(disks["total"].as_u64() > Some(0) && disks["processed"].as_u64() <= disks["total"].as_u64(), "{json}");

    src.ok(&["domjobabort", "vm1"]);
    migration.resume();
    assert_eq!(migration.finish(Duration::from_secs(300)).status.code(), Some(1));
    assert_eq!(qemu_status(&src, "vm1"), "running");
    assert_destination_clean(&dest);
}

#[test]
fn save_with_disk_set_puts_overlays_on_the_set_at_the_saved_instant() {
    let env = TestEnv::new();
    let set = env.path("set.qcow2");
    let other = env.path("other.qcow2");
    for path in [&set, &other] {
        qemu_img(&["create", "-q", "-f", "qcow2", path.to_str().expect("utf8"), "16M"]);
    }
    let disks = [
        DiskSpec { target: "vda", format: "qcow2", path: &set, extra: "" },
        DiskSpec { target: "vdb", format: "qcow2", path: &other, extra: "" },
    ];
    env.define("vm1", &domain_xml("vm1", &disks));
    env.ok(&["diskset-add", "vm1", "vda"]);
    env.ok(&["start", "vm1"]);
    let _guard = DomainGuard { env: &env, name: "vm1".into() };
    let write = "qemu-io -d vda/virtio-backend \"write -P 0x61 0 1M\"";
    assert_eq!(env.ok(&["qemu-monitor-command", "vm1", "--hmp", write]).trim(), "");

    let file = env.path("vm1.save");
    let file = file.to_str().expect("utf8");
    env.ok(&["save", "vm1", file, "--disk-set"]);
    let snapshots = env.ok(&["snapshot-list", "vm1", "--name"]);
    assert_eq!(snapshots.lines().filter(|l| !l.trim().is_empty()).count(), 1, "{snapshots}");

    // The image holds the domain on a new overlay of vda only.
    let saved = strata_core::xml::Domain::parse(&env.ok(&["save-image-dumpxml", file])).expect("domain XML");
    let top = |target: &str| {
        let disk = saved.find_disk(target).expect("disk");
        let chain = disk.chain.expect("chain");
        chain.top().and_then(|l| l.source.local_path()).expect("a file").to_path_buf()
    };
    let overlay = top("vda");
    assert_ne!(overlay, set);
    assert_eq!(top("vdb"), other);
    let chain = qemu_chain(&overlay);
    assert_eq!(chain.iter().map(|(f, _)| PathBuf::from(f)).collect::<Vec<_>>(), [overlay.clone(), set.clone()]);
    // The frozen image holds what the guest wrote before the save.
    let read = qemu_io(&["-U", "-r", "-f", "qcow2", "-c", "read -P 0x61 0 1M", set.to_str().expect("utf8")]);
    assert!(!read.contains("Pattern verification failed"), "{read}");

    env.ok(&["restore", file]);
    let blklist = env.ok(&["domblklist", "vm1"]);
    assert!(blklist.contains(&overlay.display().to_string()), "{blklist}");
    assert_eq!(qemu_status(&env, "vm1"), "running");
}

#[test]
fn save_with_xml_records_that_document_and_refuses_another_domain_leaving_it_running() {
    let env = TestEnv::new();
    let (_guard, _disk) = running_domain(&env, "vm1");
    let live = env.ok(&["dumpxml", "vm1"]);
    let other = env.path("other.xml");
    std::fs::write(&other, live.replace("<name>vm1</name>", "<name>vm2</name>")).expect("write");
    let file = env.path("vm1.save");
    let file = file.to_str().expect("utf8");
    let err = env.fails(&["save", "vm1", file, "--xml", other.to_str().expect("utf8")]);
    assert!(err.contains("describes domain 'vm2', not 'vm1'"), "{err}");
    assert_eq!(qemu_status(&env, "vm1"), "running");
    assert!(!Path::new(file).exists());

    let described = env.path("described.xml");
    let with_description =
        live.replacen("<name>vm1</name>", "<name>vm1</name>\n  <description>saved on purpose</description>", 1);
    std::fs::write(&described, with_description).expect("write");
    env.ok(&["save", "vm1", file, "--xml", described.to_str().expect("utf8")]);
    assert!(env.ok(&["save-image-dumpxml", file]).contains("<description>saved on purpose</description>"));
    env.ok(&["restore", file]);
    assert!(env.ok(&["dumpxml", "vm1"]).contains("<description>saved on purpose</description>"));
}

#[test]
fn a_migration_killed_mid_stream_is_undone_by_the_next_command_on_the_source() {
    killed_migration_is_undone(&TestEnv::new(), &TestEnv::new());
}

#[test]
fn a_migration_to_another_host_killed_mid_stream_is_undone_through_its_transport() {
    let hosts = TwoHosts::new("k");
    let (src, dest) = hosts.envs();
    killed_migration_is_undone(&src, &dest);
}

/// A migration of vm1 from `src` to `dest` SIGKILLed mid-stream is undone
/// by the next command on the source: the guest runs on with its RAM, the
/// destination (reached as the record names it) has nothing of it.
fn killed_migration_is_undone(src: &TestEnv, dest: &TestEnv) {
    let _guard = migratable_domain(src, dest, false);
    let data = noise(10, FILL_BYTES);
    write_guest_ram(src, "vm1", FILL_AT, &data);

    let args = ["migrate", "vm1", &dest.uri, "--live", "--copy-storage-disk-set", "--bandwidth", "1"];
    let migration = Background::spawn(src, &args);
    job_running(src, "vm1", "Outgoing migration");
    // The job shows from the moment the migration is recorded, before the
    // destination is prepared: wait for the destination's QEMU (under load
    // it comes a while later), so the kill lands mid-stream.
    let deadline = Instant::now() + Duration::from_secs(60);
    while qemu_pid(dest, "vm1").is_none() {
        assert!(Instant::now() < deadline, "the destination QEMU never ran");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(dest.state_root().join("images/vm1/copied.qcow2").exists(), "the copied image is made");
    // SIGKILL mid-stream (a strata reached through a transport dies with
    // the one that started it).
    drop(migration);

    src.ok(&["list", "--all"]);
    assert_eq!(qemu_status(src, "vm1"), "running");
    assert!(src.ok(&["domjobinfo", "vm1"]).starts_with("Job type:         None"));
    assert_destination_clean(dest);
    src.ok(&["suspend", "vm1"]);
    let ram = guest_ram(src, "vm1", "after.ram");
    assert!(ram[FILL_AT as usize..FILL_AT as usize + FILL_BYTES] == data[..], "guest RAM changed");
    // The source can be saved: the killed migration left no job or capability behind.
    src.ok(&["save", "vm1", src.path("after-kill.save").to_str().expect("utf8")]);
}

#[test]
fn a_running_save_refuses_snapshots_and_block_jobs_and_a_snapshot_operation_refuses_a_save() {
    let env = TestEnv::new();
    let (_guard, disk) = running_domain(&env, "vm1");
    let file = env.path("vm1.save");
    let (save, _) = throttled_save(&env, &noise(11, FILL_BYTES), &file);
    let busy = "cannot acquire state change lock: domain 'vm1' has a save job running";
    let err = env.fails(&["snapshot-create-as", "vm1", "s1", "--disk-only"]);
    assert!(err.contains(busy), "{err}");
    let err = env.fails(&["blockpull", "vm1", "vda"]);
    assert!(err.contains(busy), "{err}");
    env.ok(&["domjobabort", "vm1"]);
    assert_eq!(save.finish(Duration::from_secs(120)).status.code(), Some(1));
    assert_eq!(env.ok(&["snapshot-list", "vm1", "--name"]).trim(), "", "no snapshot was taken");
    assert_eq!(qemu_chain(&disk).len(), 1, "no overlay was made");

    // A snapshot operation in progress (its lock held) refuses a save.
    let operation = hold_domain_lock(&env, "vm1", "operation");
    let err = env.fails(&["save", "vm1", file.to_str().expect("utf8")]);
    assert!(
        err.contains("cannot acquire state change lock: a snapshot operation or block job holds domain 'vm1'"),
        "{err}"
    );
    drop(operation);
    assert_eq!(qemu_status(&env, "vm1"), "running");
    assert!(!file.exists(), "no image made");
}

#[test]
fn a_migration_copying_its_disks_shows_in_domjobinfo_refuses_snapshots_and_is_aborted_by_domjobabort() {
    let src = TestEnv::new();
    let dest = TestEnv::new();
    let _guard = migratable_domain(&src, &dest, false);

    let args = ["migrate", "vm1", &dest.uri, "--live", "--copy-storage-disk-set"];
    let migration = Background::spawn_paused_at(&src, &args, "migrate:disks-copying").expect("paused at the disk copy");
    let info = src.ok(&["domjobinfo", "vm1"]);
    assert!(info.contains("Operation:        Outgoing migration"), "{info}");
    assert!(info.contains("Data total:"), "{info}");
    let err = src.fails(&["snapshot-create-as", "vm1", "s1", "--disk-only"]);
    assert!(
        err.contains("cannot acquire state change lock: domain 'vm1' has an outgoing migration job running"),
        "{err}"
    );
    src.ok(&["domjobabort", "vm1"]);
    migration.resume();
    let out = migration.finish(Duration::from_secs(300));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("operation aborted: migration job: canceled by client"), "{err}");
    assert_eq!(qemu_status(&src, "vm1"), "running");
    assert_destination_clean(&dest);
}

#[test]
fn a_saved_domain_is_shut_off_saved_and_list_marks_managed_saves_as_virsh_does() {
    let env = TestEnv::new();
    let (_guard1, _disk1) = running_domain(&env, "vm1");
    let (_guard2, _disk2) = running_domain(&env, "vm2");
    let file = env.path("vm1.save");

    env.ok(&["save", "vm1", file.to_str().expect("utf8")]);
    assert_eq!(env.ok(&["domstate", "vm1", "--reason"]).trim(), "shut off (saved)");
    env.ok(&["managedsave", "vm2"]);
    assert_eq!(env.ok(&["domstate", "vm2", "--reason"]).trim(), "shut off (saved)");

    let table = env.ok(&["list", "--all", "--managed-save"]);
    let state_of = |name: &str| {
        let row = table.lines().find(|l| l.split_whitespace().nth(1) == Some(name)).expect("a row");
        row.split_whitespace().skip(2).collect::<Vec<_>>().join(" ")
    };
    assert_eq!(state_of("vm1"), "shut off", "{table}");
    assert_eq!(state_of("vm2"), "saved", "{table}");
    assert_eq!(env.ok(&["list", "--all", "--with-managed-save", "--name"]).trim(), "vm2");
    assert_eq!(env.ok(&["list", "--all", "--without-managed-save", "--name"]).trim(), "vm1");

    // Running again, and stopped otherwise, the reason is no longer the save.
    env.ok(&["restore", file.to_str().expect("utf8")]);
    assert_eq!(env.ok(&["domstate", "vm1", "--reason"]).trim(), "running (restored)");
    env.ok(&["destroy", "vm1"]);
    assert_eq!(env.ok(&["domstate", "vm1", "--reason"]).trim(), "shut off (unknown)");
}

#[test]
fn restore_with_xml_runs_that_document_and_refuses_another_domain_leaving_the_image() {
    let env = TestEnv::new();
    let (_guard, _disk) = running_domain(&env, "vm1");
    let before = filled_and_paused(&env, "vm1", 12);
    let file = env.path("vm1.save");
    let file = file.to_str().expect("utf8");
    env.ok(&["save", "vm1", file]);
    let saved = env.ok(&["save-image-dumpxml", file]);

    let other = env.path("other.xml");
    std::fs::write(&other, saved.replace("<name>vm1</name>", "<name>vm2</name>")).expect("write");
    let err = env.fails(&["restore", file, "--xml", other.to_str().expect("utf8")]);
    assert!(err.contains("describes domain 'vm2', not 'vm1'"), "{err}");
    assert_eq!(domstate(&env, "vm1"), "shut off");
    assert_eq!(env.ok(&["save-image-dumpxml", file]), saved, "the image is left as it was");

    let described = env.path("described.xml");
    let with_description =
        saved.replacen("<name>vm1</name>", "<name>vm1</name>\n  <description>restored on purpose</description>", 1);
    std::fs::write(&described, with_description).expect("write");
    env.ok(&["restore", file, "--xml", described.to_str().expect("utf8")]);
    assert!(env.ok(&["dumpxml", "vm1"]).contains("<description>restored on purpose</description>"));
    assert_same_ram(&before, &guest_ram(&env, "vm1", "after.ram"));
}
