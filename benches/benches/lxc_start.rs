//! `cargo bench -p strata-benches --bench lxc_start`
//!
//! Times `strata start` and `strata destroy` of a busybox container on each
//! root kind the LXC driver mounts: a block device (a loop device this
//! bench attaches, standing in for an LV), a raw image through Strata's own
//! loop device, a 3-deep qcow2 chain served by a `qemu-storage-daemon`
//! over FUSE onto a loop device, a host directory, and memory (with `/bin` bound from the
//! host). `start` includes the driver's one-second watch that the init did
//! not exit at once, so its time above that second is the start itself.
//!
//! Needs root, `mkfs.ext4`, `losetup`, busybox-static, `qemu-img` and
//! `qemu-storage-daemon`. Uses the
//! `strata` binary already built in this target directory (`cargo build
//! --release -p strata-cli`), or `$STRATA_BENCH_BIN`.
//! `STRATA_BENCH_QUICK=1` runs fewer repetitions.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;
use strata_benches::{ms, path_str, quick_suffix, run_tool, strata_for_bench, time, Stats, Strata, CONTAINER_TOOLS};

/// The driver's watch of a new init (`INIT_SETTLE` in strata-lxc).
const INIT_SETTLE: Duration = Duration::from_secs(1);

fn main() -> ExitCode {
    let Some(strata) = strata_for_bench("lxc_start", &CONTAINER_TOOLS) else {
        return ExitCode::FAILURE;
    };
    let quick = strata_benches::quick();
    let runs = if quick { 2 } else { 5 };
    let dir = strata_benches::temp_dir("sl");
    let root = dir.path();
    let (tree, image, lv_image) = (root.join("tree"), root.join("root.raw"), root.join("lv.raw"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/images/make-busybox-root");
    run_tool(path_str(&script), &[path_str(&tree), path_str(&image), "64"]);
    run_tool(path_str(&script), &[path_str(&tree), path_str(&lv_image), "64"]);
    let lv = LoopDevice::attach(&lv_image);
    let [base, mid, top] = [root.join("base.qcow2"), root.join("mid.qcow2"), root.join("top.qcow2")];
    run_tool("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", path_str(&lv_image), path_str(&base)]);
    for (backing, overlay) in [(&base, &mid), (&mid, &top)] {
        run_tool(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", path_str(backing), path_str(overlay)],
        );
    }

    let cli = Strata::embedded_lxc(&strata, &root.join("state"));
    let loop_root = format!(
        "<filesystem type='file'><driver type='loop' format='raw'/><source file='{}'/><target dir='/'/></filesystem>",
        image.display()
    );
    let qcow2_root = format!(
        "<filesystem type='file'><driver type='loop' format='qcow2'/><source file='{}'/><target dir='/'/></filesystem>",
        top.display()
    );
    let block_root = format!("<filesystem type='block'><source dev='{}'/><target dir='/'/></filesystem>", lv.0);
    let dir_root = format!("<filesystem type='mount'><source dir='{}'/><target dir='/'/></filesystem>", tree.display());
    let ram_root = format!(
        "<filesystem type='ram'><source usage='8' units='MiB'/><target dir='/'/></filesystem>\
         <filesystem type='mount'><source dir='{}'/><target dir='/bin'/><readonly/></filesystem>",
        tree.join("bin").display()
    );
    let kinds =
        [("block", block_root), ("file", loop_root), ("qcow2", qcow2_root), ("mount", dir_root), ("ram", ram_root)];

    println!("LXC container start and destroy per root kind{}", quick_suffix(quick));
    println!("binary: {}", strata.display());
    println!("start includes the driver's {} ms watch of the new init\n", ms(INIT_SETTLE));
    println!(
        "{:<8} {:>5} {:>16} {:>16} {:>18}",
        "root", "runs", "start median ms", "start p90 ms", "destroy median ms"
    );
    let mut rows = Vec::new();
    for (kind, filesystems) in &kinds {
        let xml = root.join(format!("{kind}.xml"));
        std::fs::write(
            &xml,
            format!(
                "<domain type='lxc'><name>{kind}</name><memory unit='KiB'>65536</memory>\
                 <os><type>exe</type><init>/bin/sleep</init><initarg>1000</initarg></os>\
                 <devices>{filesystems}</devices></domain>"
            ),
        )
        .expect("write the container XML");
        cli.ok(&["define", path_str(&xml)]);
        let guard = Container { cli: &cli, name: kind };
        let (mut starts, mut destroys) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            starts.push(time(|| cli.ok(&["start", guard.name])).0);
            destroys.push(time(|| cli.ok(&["destroy", guard.name])).0);
        }
        let (s, d) = (Stats::of(&starts), Stats::of(&destroys));
        println!("{kind:<8} {:>5} {:>16.1} {:>16.1} {:>18.1}", s.runs, ms(s.median), ms(s.p90), ms(d.median));
        rows.push(json!({
            "root": kind,
            "runs": s.runs,
            "start_median_ms": ms(s.median),
            "start_p90_ms": ms(s.p90),
            "start_beyond_settle_median_ms": ms(s.median.saturating_sub(INIT_SETTLE)),
            "destroy_median_ms": ms(d.median),
        }));
    }
    let result = json!({ "bench": "lxc_start", "quick": quick, "roots": rows });
    println!("RESULT {result}");
    ExitCode::SUCCESS
}

/// A loop device this bench attached, detached by its path at the end.
struct LoopDevice(String);

impl LoopDevice {
    fn attach(image: &Path) -> LoopDevice {
        LoopDevice(run_tool("losetup", &["--find", "--show", path_str(image)]).trim().to_string())
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = std::process::Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A container destroyed when the bench ends, however it ends.
struct Container<'a> {
    cli: &'a Strata,
    name: &'a str,
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = self.cli.run(&["destroy", self.name]);
    }
}
