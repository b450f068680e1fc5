//! `cargo bench -p strata-benches --bench lxc_snapshot`
//!
//! `snapshot-create-as ct sN --disk-only --atomic` of a RUNNING busybox
//! container whose root is a qcow2 chain of depth 1 and 50 (depth D = D
//! backing files below the active image), served by its
//! `qemu-storage-daemon` over FUSE onto a loop device, while its init
//! appends a line to a file every 10 ms. Per snapshot: the container's
//! pause (cgroup freeze to thaw, `FIFREEZE` and the daemon's `transaction`
//! inside it) as the driver measures and logs it under `--debug`, and the
//! whole command's time (process start to exit). After one untimed
//! warm-up, consecutive snapshots are timed, so the depth grows by one per
//! run.
//!
//! Needs root, `mkfs.ext4`, `losetup`, busybox-static, `qemu-img` and
//! `qemu-storage-daemon`. Uses the `strata` binary already built in this
//! target directory (`cargo build --release -p strata-cli`), or
//! `$STRATA_BENCH_BIN`. `STRATA_BENCH_QUICK=1` runs fewer repetitions.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;
use strata_benches::{
    ms, path_str, quick_suffix, run_tool, strata_for_bench, success_stdout, time, Stats, Strata, CONTAINER_TOOLS,
};

const DEPTHS: [usize; 2] = [1, 50];

/// The container's init: a line appended to /log every 10 ms.
const WRITER: &str = "i=0; while true; do i=$((i+1)); echo $i >> /log; usleep 10000; done";

fn main() -> ExitCode {
    let Some(strata) = strata_for_bench("lxc_snapshot", &CONTAINER_TOOLS) else {
        return ExitCode::FAILURE;
    };
    let quick = strata_benches::quick();
    let runs = if quick { 5 } else { 15 };
    let dir = strata_benches::temp_dir("ss");
    let root = dir.path();
    let (tree, image) = (root.join("tree"), root.join("root.raw"));
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/images/make-busybox-root");
    run_tool(path_str(&script), &[path_str(&tree), path_str(&image), "64"]);

    println!("LXC live snapshot of a running container by chain depth{}", quick_suffix(quick));
    println!("binary: {}", strata.display());
    println!(
        "container: busybox on a qcow2 root served over FUSE, its init appending to a file every 10 ms; \
         {runs} consecutive snapshot-create-as ct sN --disk-only --atomic after one warm-up\n"
    );
    println!(
        "{:>6} {:>16} {:>14} {:>14} {:>18} {:>16}",
        "depth", "pause median ms", "pause min ms", "pause max ms", "command median ms", "command max ms"
    );
    let mut results = Vec::new();
    for depth in DEPTHS {
        let chain_dir = root.join(format!("d{depth}"));
        std::fs::create_dir_all(&chain_dir).expect("create the chain's directory");
        let mut top = chain_dir.join("l0.qcow2");
        run_tool("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", path_str(&image), path_str(&top)]);
        for layer in 1..=depth {
            let overlay = chain_dir.join(format!("l{layer}.qcow2"));
            run_tool(
                "qemu-img",
                &["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", path_str(&top), path_str(&overlay)],
            );
            top = overlay;
        }
        let cli = Strata::embedded_lxc(&strata, &chain_dir.join("state")).without_color();
        let xml = chain_dir.join("ct.xml");
        std::fs::write(
            &xml,
            format!(
                "<domain type='lxc'><name>ct</name><memory unit='KiB'>65536</memory>\
                 <os><type>exe</type><init>/bin/sh</init><initarg>-c</initarg><initarg>{WRITER}</initarg></os>\
                 <devices><filesystem type='file'><driver type='loop' format='qcow2'/><source file='{}'/>\
                 <target dir='/'/></filesystem></devices></domain>",
                top.display()
            ),
        )
        .expect("write the container XML");
        cli.ok(&["define", path_str(&xml)]);
        let container = Container { cli: &cli };
        cli.ok(&["start", "ct"]);
        let (mut pauses, mut commands) = (Vec::new(), Vec::new());
        for n in 0..=runs {
            let name = format!("s{n}");
            let args = ["--debug", "snapshot-create-as", "ct", &name, "--disk-only", "--atomic"];
            let (took, out) = time(|| container.cli.run(&args));
            let stdout = success_stdout("strata", &args, &out);
            assert!(stdout.contains(&format!("Domain snapshot {name} created")), "unexpected output: {stdout}");
            let log = String::from_utf8_lossy(&out.stderr);
            let pause = pause_ms(&log).unwrap_or_else(|| panic!("no pause_ms in strata's --debug log:\n{log}"));
            if n > 0 {
                pauses.push(Duration::from_secs_f64(pause / 1000.0));
                commands.push(took);
            }
        }
        let state = cli.ok(&["domstate", "ct"]);
        assert_eq!(state.trim(), "running", "the container runs on after its snapshots");
        drop(container);
        let (p, c) = (Stats::of(&pauses), Stats::of(&commands));
        println!(
            "{depth:>6} {:>16.1} {:>14.1} {:>14.1} {:>18.1} {:>16.1}",
            ms(p.median),
            ms(p.min),
            ms(p.max),
            ms(c.median),
            ms(c.max)
        );
        results.push(json!({
            "depth": depth, "runs": p.runs,
            "pause_median_ms": ms(p.median), "pause_min_ms": ms(p.min), "pause_max_ms": ms(p.max),
            "command_median_ms": ms(c.median), "command_max_ms": ms(c.max),
        }));
    }
    println!("RESULT {}", json!({ "bench": "lxc_snapshot", "quick": quick, "depths": results }));
    ExitCode::SUCCESS
}

/// The `pause_ms=` value the driver logs for a live snapshot.
fn pause_ms(log: &str) -> Option<f64> {
    let at = log.find("pause_ms=")? + "pause_ms=".len();
    let digits: String = log[at..].chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    digits.parse().ok()
}

/// The container, destroyed when the bench ends, however it ends.
struct Container<'a> {
    cli: &'a Strata,
}

impl Drop for Container<'_> {
    fn drop(&mut self) {
        let _ = self.cli.run(&["destroy", "ct"]);
    }
}
