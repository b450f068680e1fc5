//! `cargo bench -p strata-benches --bench cli_running`
//!
//! Times whole `strata` invocations (process start to exit) against a
//! running QEMU domain in an embedded state root: `list --all`,
//! `dominfo vm` and `dumpxml vm`, plus `strata --version` as the bare
//! process start-up cost.
//!
//! Uses the `strata` binary already built in this target directory
//! (`cargo build --release -p strata-cli`), or `$STRATA_BENCH_BIN`.
//! `STRATA_BENCH_QUICK=1` runs fewer repetitions.

use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;
use strata_benches::{
    domain_xml, ms, path_str, qcow2_chain, quick_suffix, time, BackingNames, DomainBench, DomainGuard, Leftover, Stats,
    Strata, RUNNING_DOMAIN_TOOLS,
};

const DOMAIN: &str = "vm";
const WARMUP: usize = 2;

fn main() -> ExitCode {
    let Some(env) = DomainBench::setup("cli_running", &RUNNING_DOMAIN_TOOLS) else {
        return ExitCode::FAILURE;
    };
    let runs = if env.quick { 10 } else { 30 };

    let state = env.dir.path().join("state");
    // base.qcow2 ← mid.qcow2 ← top.qcow2 (64 MiB, relative backing names).
    let chain = qcow2_chain(env.dir.path(), &["base.qcow2", "mid.qcow2", "top.qcow2"], "64M", BackingNames::Relative);
    let xml_path = env.dir.path().join("vm.xml");
    std::fs::write(&xml_path, domain_xml(DOMAIN, env.kind, &chain[2..])).expect("write the domain XML");

    let cli = Strata::embedded(&env.strata, &state);
    cli.ok(&["define", path_str(&xml_path)]);
    // From here on the domain is destroyed however this function ends.
    let guard = DomainGuard::new(cli, DOMAIN, "cli_running", Leftover::Qemu);
    let cli = &guard.cli;
    let uri = &cli.uri;
    let (start_time, _) = time(|| cli.ok(&["start", DOMAIN]));

    println!("strata on a running domain{}: wall time per invocation (process start to exit)", quick_suffix(env.quick));
    println!("binary: {}", env.strata.display());
    println!("domain: '{DOMAIN}', type {}, 128 MiB, q35, one virtio disk on a 3-layer qcow2 chain", env.kind);
    println!("uri:    {uri}");
    println!("start:  {:.1} ms (once)\n", ms(start_time));

    let cases: [Case; 4] = [
        ("--version (start-up only)", &["--version"], |_| true),
        ("list --all", &["list", "--all"], |out| out.contains(DOMAIN) && out.contains("running")),
        ("dominfo vm", &["dominfo", DOMAIN], |out| out.contains("running")),
        ("dumpxml vm", &["dumpxml", DOMAIN], |out| out.contains("<domain") && out.contains("id='")),
    ];
    println!("{:<28} {:>5} {:>10} {:>10} {:>10}", "command", "runs", "min ms", "median ms", "p90 ms");
    let mut rows = Vec::new();
    for (label, args, check) in cases {
        let out = cli.ok(args);
        assert!(check(&out), "strata {args:?} printed something unexpected:\n{out}");
        for _ in 1..WARMUP {
            cli.ok(args);
        }
        let samples: Vec<Duration> = (0..runs).map(|_| time(|| cli.ok(args)).0).collect();
        let s = Stats::of(&samples);
        println!("{label:<28} {:>5} {:>10.2} {:>10.2} {:>10.2}", s.runs, ms(s.min), ms(s.median), ms(s.p90));
        rows.push(json!({
            "command": args.join(" "),
            "runs": s.runs,
            "min_ms": ms(s.min),
            "median_ms": ms(s.median),
            "p90_ms": ms(s.p90),
        }));
    }

    println!(
        "\nSame measurement against libvirt (optional; needs libvirtd and images libvirt's qemu user can read):\n  \
         virsh -c qemu:///system define vm.xml && virsh -c qemu:///system start vm\n  \
         for c in 'list --all' 'dominfo vm' 'dumpxml vm'; do echo \"$c\"; \
         time (for i in $(seq {runs}); do virsh -c qemu:///system $c >/dev/null; done); done\n  \
         (or: hyperfine -N --runs {runs} 'virsh -c qemu:///system list --all')\n  \
         virsh -c qemu:///system destroy vm; virsh -c qemu:///system undefine vm"
    );
    let result = json!({
        "bench": "cli_running",
        "quick": env.quick,
        "domain_type": env.kind,
        "start_ms": ms(start_time),
        "commands": rows,
    });
    println!("RESULT {result}");
    ExitCode::SUCCESS
}

/// A timed command: label, arguments, and a check of its first output.
type Case = (&'static str, &'static [&'static str], fn(&str) -> bool);
