//! `cargo bench -p strata-benches --bench cli_running`
//!
//! Times whole `strata` invocations (process start to exit) against a
//! running QEMU domain in an embedded state root: `list --all`,
//! `dominfo vm`, `domblklist vm` and `dumpxml vm`, plus `strata --version`
//! as the bare process start-up cost, and prints each median's ratio to
//! virsh 9.0's (measured with hyperfine on this kind of machine, in
//! research/libvirt-9.0/REPORT.md; libvirtd does not run here).
//!
//! Uses the `strata` binary already built in this target directory
//! (`cargo build --release -p strata-cli`), or `$STRATA_BENCH_BIN`;
//! `STRATA_BENCH_BEFORE=/path/to/strata` also times an older build on the
//! same domain, alternating run by run, for a before/after table.
//! `STRATA_BENCH_QUICK=1` runs fewer repetitions.

use std::process::ExitCode;

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

    // The same state root, read by an older build too.
    let before = std::env::var_os("STRATA_BENCH_BEFORE").map(|bin| cli.with_bin(bin.as_ref()));
    let cases: [Case; 5] = [
        ("--version (start-up only)", &["--version"], |_| true, None),
        ("list --all", &["list", "--all"], |out| out.contains(DOMAIN) && out.contains("running"), Some(VIRSH_LIST_MS)),
        ("dominfo vm", &["dominfo", DOMAIN], |out| out.contains("running"), None),
        ("domblklist vm", &["domblklist", DOMAIN], |out| out.contains("vda"), Some(VIRSH_DOMBLKLIST_MS)),
        (
            "dumpxml vm",
            &["dumpxml", DOMAIN],
            |out| out.contains("<domain") && out.contains("id='"),
            Some(VIRSH_DUMPXML_MS),
        ),
    ];
    println!(
        "{:<8} {:<28} {:>5} {:>10} {:>10} {:>10} {:>14}",
        "binary", "command", "runs", "min ms", "median ms", "p90 ms", "virsh/strata"
    );
    let mut rows = Vec::new();
    for (label, args, check, virsh) in cases {
        let binaries: Vec<(&str, &Strata)> = before.iter().map(|b| ("before", b)).chain([("strata", cli)]).collect();
        for (_, bin) in &binaries {
            let out = bin.ok(args);
            assert!(check(&out), "strata {args:?} printed something unexpected:\n{out}");
            for _ in 1..WARMUP {
                bin.ok(args);
            }
        }
        // Alternating, so that load on the machine falls on both alike.
        let mut samples = vec![Vec::new(); binaries.len()];
        for _ in 0..runs {
            for (i, (_, bin)) in binaries.iter().enumerate() {
                samples[i].push(time(|| bin.ok(args)).0);
            }
        }
        for ((binary, _), samples) in binaries.iter().zip(samples) {
            let s = Stats::of(&samples);
            let ratio = virsh.map(|v| v / ms(s.median));
            println!(
                "{binary:<8} {label:<28} {:>5} {:>10.2} {:>10.2} {:>10.2} {:>14}",
                s.runs,
                ms(s.min),
                ms(s.median),
                ms(s.p90),
                ratio.map_or("-".to_string(), |r| format!("{r:.1}x"))
            );
            rows.push(json!({
                "binary": binary,
                "command": args.join(" "),
                "runs": s.runs,
                "min_ms": ms(s.min),
                "median_ms": ms(s.median),
                "p90_ms": ms(s.p90),
                "virsh_reference_ms": virsh,
                "virsh_over_strata": ratio,
            }));
        }
    }
    println!(
        "\nvirsh medians (REPORT.md, hyperfine, NOT measured now): list {VIRSH_LIST_MS} ms, domblklist \
         {VIRSH_DOMBLKLIST_MS} ms, dumpxml {VIRSH_DUMPXML_MS} ms; goal: virsh/strata >= 6"
    );

    println!(
        "\nSame measurement against libvirt (optional; needs libvirtd and images libvirt's qemu user can read):\n  \
         virsh -c qemu:///system define vm.xml && virsh -c qemu:///system start vm\n  \
         for c in 'list --all' 'dominfo vm' 'domblklist vm' 'dumpxml vm'; do echo \"$c\"; \
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

/// A timed command: label, arguments, a check of its first output, and
/// virsh's median for it (ms), where the research report has one.
type Case = (&'static str, &'static [&'static str], fn(&str) -> bool, Option<f64>);

/// virsh 9.0 against libvirtd on this kind of machine (2 shared vCPUs),
/// hyperfine medians from research/libvirt-9.0/REPORT.md.
const VIRSH_LIST_MS: f64 = 18.7;
const VIRSH_DOMBLKLIST_MS: f64 = 21.6;
const VIRSH_DUMPXML_MS: f64 = 17.4;
