//! `cargo bench -p strata-benches --bench block_jobs`
//!
//! Times Strata's block jobs end to end and sets them against QEMU's own
//! job duration (from the `JOB_STATUS_CHANGE` events `strata --debug`
//! logs with QEMU's timestamps):
//!
//! 1. `blockpull vm vda --wait` on a running domain (64 MiB, 3-layer chain);
//! 2. `blockcommit vm vda --active --pivot` on a running domain (same chain);
//! 3. a 1 GiB active commit of 256 MiB of data on a SHUT-OFF domain (run by
//!    qemu-storage-daemon) against `qemu-img commit -d`, in MiB/s.
//!
//! Every run gets fresh images. Uses the `strata` binary already built in
//! this target directory (`cargo build --release -p strata-cli`), or
//! `$STRATA_BENCH_BIN`. `STRATA_BENCH_QUICK=1` runs fewer repetitions.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;
use strata_benches::{
    copy_images, domain_xml, ms, path_str, pid_attr, qcow2_chain, qemu_io, quick_suffix, run_tool, time, wait_for_idle,
    BackingNames, DomainBench, DomainGuard, Leftover, Stats, Strata, Tools,
};

const DOMAIN: &str = "vm";
/// Block jobs on a shut-off domain run in qemu-storage-daemon; qemu-io
/// writes the images' data.
const TOOLS: Tools = Tools {
    programs: &["qemu-img", "qemu-io", "qemu-system-x86_64", "qemu-storage-daemon"],
    packages: "qemu-utils qemu-system-x86 qemu-block-extra",
};
/// Data the 1 GiB commit moves (the top's written range).
const BIG_COMMIT_MIB: f64 = 256.0;
/// `virsh blockpull --wait` on the same chain, from the libvirt-9.0
/// research (virsh polls the job every 500 ms); not measured by this bench.
const VIRSH_PULL_REFERENCE_MS: f64 = 525.0;

fn main() -> ExitCode {
    let Some(env) = DomainBench::setup("block_jobs", &TOOLS) else {
        return ExitCode::FAILURE;
    };
    let runs = if env.quick { 2 } else { 9 };

    let root = env.dir.path();
    let state = root.join("state");

    // Templates, made once; every run works on fresh copies of them.
    let tpl_small = root.join("tpl-small");
    let tpl_big = root.join("tpl-big");
    let (setup_time, ()) = time(|| {
        make_small_chain(&tpl_small);
        make_big_chain(&tpl_big);
    });
    let live_dir = root.join("live");
    let strata_dir = root.join("s");
    let qemu_img_dir = root.join("q");
    let live_xml = root.join("live.xml");
    let offline_xml = root.join("offline.xml");
    std::fs::write(&live_xml, domain_xml(DOMAIN, env.kind, &[live_dir.join("top.qcow2")]))
        .expect("write the domain XML");
    std::fs::write(&offline_xml, domain_xml(DOMAIN, env.kind, &[strata_dir.join("top.qcow2")]))
        .expect("write the domain XML");

    // NO_COLOR: the job times are read from strata's debug log.
    let cli = Strata::embedded(&env.strata, &state).without_color();
    copy_images(&tpl_small, &live_dir);
    cli.ok(&["define", path_str(&live_xml)]);
    // From here on the domain is destroyed (and a QEMU or storage daemon it
    // leaves behind killed) however this function ends.
    let guard = DomainGuard::new(cli, DOMAIN, "block_jobs", Leftover::Process);
    let cli = &guard.cli;
    let uri = &cli.uri;

    println!("strata block jobs{}: median of {runs} runs, fresh images each run", quick_suffix(env.quick));
    println!("binary: {}", env.strata.display());
    println!("domain: '{DOMAIN}', type {}, 128 MiB, q35, one virtio disk", env.kind);
    println!("uri:    {uri}");
    println!("images: {:.1} s to make the templates (once)\n", setup_time.as_secs_f64());

    // 1 and 2: a running domain on a fresh 64 MiB 3-layer chain.
    let pull =
        (0..runs).map(|i| live_job(cli, &live_dir, &tpl_small, &live_xml, LiveJob::Pull, i == 0)).collect::<Vec<_>>();
    let commit = (0..runs)
        .map(|i| live_job(cli, &live_dir, &tpl_small, &live_xml, LiveJob::ActiveCommit, i == 0))
        .collect::<Vec<_>>();
    cli.ok(&["destroy", DOMAIN]);

    // 3: 1 GiB active commit on the shut-off domain vs qemu-img commit.
    let mut offline = Vec::new();
    let mut qemu_img = Vec::new();
    for i in 0..runs {
        // Both copies exist (written and fsynced) before either is timed.
        copy_images(&tpl_big, &strata_dir);
        copy_images(&tpl_big, &qemu_img_dir);
        cli.ok(&["define", path_str(&offline_xml)]);
        let st = cli.ok(&["domstate", DOMAIN]);
        assert!(st.contains("shut off"), "the domain should be shut off for the offline commit, domstate says: {st}");
        // Alternate which one goes first: neither always gets the quieter disk.
        let strata_first = i % 2 == 0;
        if !strata_first {
            qemu_img.push(qemu_img_commit(&qemu_img_dir));
        }
        offline.push(timed_job(cli, &["blockcommit", DOMAIN, "vda", "--active", "--pivot"], "Successfully pivoted"));
        if strata_first {
            qemu_img.push(qemu_img_commit(&qemu_img_dir));
        }
        if i == 0 {
            verify_offline_commit(cli, &strata_dir, &qemu_img_dir, &tpl_big);
        }
    }

    let pull_row = Row::of("blockpull vda --wait", &pull);
    let commit_row = Row::of("blockcommit --active --pivot", &commit);
    println!("running domain, 64 MiB 3-layer qcow2 chain (32/16/8 MiB of data):");
    println!(
        "{:<30} {:>5} {:>11} {:>11} {:>12} {:>16}",
        "command", "runs", "strata ms", "QEMU job ms", "overhead ms", "overhead min ms"
    );
    for r in [&pull_row, &commit_row] {
        println!(
            "{:<30} {:>5} {:>11.1} {:>11.1} {:>12.1} {:>16.1}",
            r.label,
            runs,
            ms(r.wall),
            ms(r.job),
            ms(r.overhead),
            ms(r.overhead_min)
        );
    }
    let ready = Stats::of(&commit.iter().map(|s| s.job.ready.expect("checked when parsed")).collect::<Vec<_>>()).median;
    println!(
        "  strata ms: the whole `strata --debug …` process; QEMU job ms: JOB_STATUS_CHANGE \
         'created' → 'concluded' (QEMU's timestamps); overhead: the median of each run's\n  \
         difference. \
         The overhead includes the strata process start, its QMP queries and the fsyncs of its \
         state files; it grows on a busy machine."
    );
    println!(
        "  active commit: QEMU reached 'ready' after {:.1} ms; its job time also holds Strata's \
         reaction to BLOCK_JOB_READY (job-complete).",
        ms(ready)
    );
    println!(
        "  reference (not measured now): virsh 9.0 blockpull --wait on this chain ≈ {VIRSH_PULL_REFERENCE_MS:.0} ms \
         (libvirt-9.0 research; virsh polls the job every 500 ms)."
    );

    let off_wall = Stats::of(&offline.iter().map(|s| s.wall).collect::<Vec<_>>()).median;
    let off_job = Stats::of(&offline.iter().map(|s| s.job.total).collect::<Vec<_>>()).median;
    let img = Stats::of(&qemu_img).median;
    let rate = |d: Duration| BIG_COMMIT_MIB / d.as_secs_f64();
    println!("\nshut-off domain, 1 GiB base (512 MiB data) ← top (256 MiB data at [128M,384M)):");
    println!("{:<48} {:>5} {:>10} {:>8}", "command", "runs", "median s", "MiB/s");
    println!(
        "{:<48} {:>5} {:>10.3} {:>8.0}",
        "strata blockcommit --active --pivot (qsd)",
        runs,
        off_wall.as_secs_f64(),
        rate(off_wall)
    );
    println!(
        "{:<48} {:>5} {:>10.3} {:>8.0}",
        "  of which the QEMU job (created → concluded)",
        runs,
        off_job.as_secs_f64(),
        rate(off_job)
    );
    println!(
        "{:<48} {:>5} {:>10.3} {:>8.0}",
        "qemu-img commit -d -f qcow2 top.qcow2",
        runs,
        img.as_secs_f64(),
        rate(img)
    );
    println!(
        "  MiB/s = 256 MiB / time. Images copied and fsynced before timing (page cache kept); \
         the order alternates per run.\n  checked once: strata's base == qemu-img's base == the \
         original chain (qemu-img compare)."
    );

    let result = json!({
        "bench": "block_jobs",
        "quick": env.quick,
        "runs": runs,
        "domain_type": env.kind,
        "running": [pull_row.json(), commit_row.json()],
        "active_commit_ready_ms": ms(ready),
        "virsh_9_0_blockpull_reference_ms": VIRSH_PULL_REFERENCE_MS,
        "offline_commit_1g": {
            "data_mib": BIG_COMMIT_MIB,
            "strata_s": off_wall.as_secs_f64(),
            "strata_mib_s": rate(off_wall),
            "strata_qemu_job_s": off_job.as_secs_f64(),
            "qemu_img_s": img.as_secs_f64(),
            "qemu_img_mib_s": rate(img),
            "verified_identical": true,
        },
    });
    println!("RESULT {result}");
    ExitCode::SUCCESS
}

#[derive(Clone, Copy, PartialEq)]
enum LiveJob {
    Pull,
    ActiveCommit,
}

/// One timed job: the strata process's wall time and QEMU's job times.
struct Sample {
    wall: Duration,
    job: JobTimes,
}

/// Medians of one command's samples.
struct Row {
    label: &'static str,
    wall: Duration,
    wall_min: Duration,
    job: Duration,
    /// The median of each run's wall time less its QEMU job time: QEMU's
    /// job time varies from run to run by more than the overhead does.
    overhead: Duration,
    overhead_min: Duration,
}

impl Row {
    fn of(label: &'static str, samples: &[Sample]) -> Row {
        let wall = Stats::of(&samples.iter().map(|s| s.wall).collect::<Vec<_>>());
        let overhead = Stats::of(&samples.iter().map(|s| s.wall.saturating_sub(s.job.total)).collect::<Vec<_>>());
        Row {
            label,
            wall: wall.median,
            wall_min: wall.min,
            job: Stats::of(&samples.iter().map(|s| s.job.total).collect::<Vec<_>>()).median,
            overhead: overhead.median,
            overhead_min: overhead.min,
        }
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "command": self.label,
            "strata_ms": ms(self.wall),
            "strata_min_ms": ms(self.wall_min),
            "qemu_job_ms": ms(self.job),
            "overhead_ms": ms(self.overhead),
            "overhead_min_ms": ms(self.overhead_min),
        })
    }
}

/// Restarts the domain on fresh copies of the small chain and times one
/// job on it; the first run also checks the resulting chain.
fn live_job(cli: &Strata, live_dir: &Path, tpl: &Path, xml: &Path, job: LiveJob, check: bool) -> Sample {
    // Not running the first time: the failure is expected and harmless.
    let _ = cli.run(&["destroy", DOMAIN]);
    copy_images(tpl, live_dir);
    // A pivot rewrites the definition; define the original chain again.
    cli.ok(&["define", path_str(xml)]);
    cli.ok(&["start", DOMAIN]);
    let status = std::fs::read_to_string(cli.state.join("domains").join(DOMAIN).join("status.xml")).ok();
    if let Some(pid) = status.as_deref().and_then(pid_attr) {
        wait_for_idle(pid);
    }
    let sample = match job {
        LiveJob::Pull => timed_job(cli, &["blockpull", DOMAIN, "vda", "--wait"], "Pull complete"),
        LiveJob::ActiveCommit => {
            timed_job(cli, &["blockcommit", DOMAIN, "vda", "--active", "--pivot"], "Successfully pivoted")
        }
    };
    if check {
        let list = cli.ok(&["domblklist", DOMAIN]);
        // The active image after the job, which stands alone now.
        let want = match job {
            LiveJob::Pull => "top.qcow2",
            LiveJob::ActiveCommit => "base.qcow2",
        };
        assert!(list.contains(&*live_dir.join(want).to_string_lossy()), "after the job vda should be {want}:\n{list}");
        // -U: the running QEMU holds the image.
        let info = run_tool("qemu-img", &["info", "-U", "--output=json", path_str(&live_dir.join(want))]);
        assert!(!info.contains("backing-filename"), "{want} should have no backing file after the job:\n{info}");
    }
    sample
}

/// Runs `strata --debug ARGS` (must succeed and print `expect`), timing
/// the whole process, and reads QEMU's job times from its debug log.
fn timed_job(cli: &Strata, args: &[&str], expect: &str) -> Sample {
    let mut full = vec!["--debug"];
    full.extend_from_slice(args);
    let (wall, out) = time(|| cli.run(&full));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains(expect),
        "strata {args:?} failed or did not print {expect:?} ({}):\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    let job = job_times(&stderr).unwrap_or_else(|| {
        panic!(
            "no complete JOB_STATUS_CHANGE created → concluded sequence in `strata --debug {}`'s \
             log:\n{stderr}",
            args.join(" ")
        )
    });
    if args.contains(&"--active") {
        assert!(job.ready.is_some(), "an active commit should report 'ready':\n{stderr}");
    }
    Sample { wall, job }
}

/// `qemu-img commit -d -f qcow2 DIR/top.qcow2`, timed.
fn qemu_img_commit(dir: &Path) -> Duration {
    let top = dir.join("top.qcow2");
    time(|| run_tool("qemu-img", &["commit", "-q", "-d", "-f", "qcow2", path_str(&top)])).0
}

/// After the first offline commit: the domain now uses the base alone, and
/// the base equals both qemu-img's committed base and the original chain.
fn verify_offline_commit(cli: &Strata, strata_dir: &Path, qemu_img_dir: &Path, tpl: &Path) {
    let xml = cli.ok(&["dumpxml", "--inactive", DOMAIN]);
    let base = strata_dir.join("base.qcow2");
    assert!(
        xml.contains(&format!("file='{}'", base.display())),
        "after the pivot the definition should use {}:\n{xml}",
        base.display()
    );
    let compare = |a: &Path, b: &Path| {
        let out = run_tool("qemu-img", &["compare", "-f", "qcow2", "-F", "qcow2", path_str(a), path_str(b)]);
        assert!(out.contains("Images are identical"), "qemu-img compare {} {}: {out}", a.display(), b.display());
    };
    compare(&base, &qemu_img_dir.join("base.qcow2"));
    compare(&base, &tpl.join("top.qcow2"));
}

/// QEMU's timestamps of one job, relative to its 'created' event.
#[derive(Debug)]
struct JobTimes {
    /// 'created' → 'concluded'.
    total: Duration,
    /// 'created' → 'ready' (two-phase jobs only).
    ready: Option<Duration>,
}

/// Reads `QMP event event=JOB_STATUS_CHANGE data={…} timestamp=(S, US)`
/// lines from `strata --debug`'s log; the job is the first one 'created'.
fn job_times(log: &str) -> Option<JobTimes> {
    let mut id: Option<String> = None;
    let (mut created, mut ready, mut concluded) = (None, None, None);
    for line in log.lines() {
        let line = strip_ansi(line);
        if !line.contains("QMP event") || !line.contains("event=JOB_STATUS_CHANGE") {
            continue;
        }
        let Some(data_at) = line.find("data=") else {
            continue;
        };
        let Some(ts_at) = line.find(" timestamp=(") else {
            continue;
        };
        let Ok(data) = serde_json::from_str::<serde_json::Value>(&line[data_at + 5..ts_at]) else {
            continue;
        };
        let ts = &line[ts_at + " timestamp=(".len()..];
        let Some((secs, rest)) = ts.split_once(',') else {
            continue;
        };
        let Some(usecs) = rest.trim().split(')').next() else {
            continue;
        };
        let (Ok(secs), Ok(usecs)) = (secs.trim().parse::<u64>(), usecs.parse::<u64>()) else {
            continue;
        };
        let at = secs * 1_000_000 + usecs;
        let (Some(job), Some(status)) = (data["id"].as_str(), data["status"].as_str()) else {
            continue;
        };
        if status == "created" && id.is_none() {
            id = Some(job.to_string());
            created = Some(at);
        }
        if id.as_deref() != Some(job) {
            continue;
        }
        match status {
            "ready" if ready.is_none() => ready = Some(at),
            "concluded" => concluded = Some(at),
            _ => {}
        }
    }
    let (created, concluded) = (created?, concluded?);
    let since = |t: u64| Duration::from_micros(t.saturating_sub(created));
    Some(JobTimes { total: since(concluded), ready: ready.map(since) })
}

/// The line without terminal colour sequences (`ESC [ … m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// base.qcow2 (64 MiB, 32 MiB of 0x11) ← mid.qcow2 (16 MiB of 0x22) ←
/// top.qcow2 (8 MiB of 0x33), relative backing names.
fn make_small_chain(dir: &Path) {
    let names = ["base.qcow2", "mid.qcow2", "top.qcow2"];
    let chain = qcow2_chain(dir, &names, "64M", BackingNames::Relative);
    for (image, cmd) in chain.iter().zip(["write -P 0x11 0 32M", "write -P 0x22 0 16M", "write -P 0x33 0 8M"]) {
        qemu_io(image, cmd);
    }
}

/// base.qcow2 (1 GiB, 512 MiB of 0x11) ← top.qcow2 (256 MiB of 0x5a at
/// [128M, 384M)), relative backing names.
fn make_big_chain(dir: &Path) {
    let chain = qcow2_chain(dir, &["base.qcow2", "top.qcow2"], "1G", BackingNames::Relative);
    qemu_io(&chain[0], "write -P 0x11 0 512M");
    qemu_io(&chain[1], "write -P 0x5a 128M 256M");
}
