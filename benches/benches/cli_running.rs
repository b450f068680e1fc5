//! `cargo bench -p strata-benches --bench cli_running`
//!
//! Times whole `strata` invocations (process start to exit) against a
//! running QEMU domain in an embedded state root: `list --all`,
//! `dominfo vm`, `domblklist vm` and `dumpxml vm`, plus `strata --version`
//! as the bare process start-up cost, and each median's ratio to virsh's.
//! virsh is measured in the same run, alternating with strata, on a
//! libvirt domain of the same XML on its own copy of the chain, where a
//! libvirtd answers (`$STRATA_BENCH_VIRSH_URI`, default `qemu:///system`;
//! see benches/README.md); otherwise the ratio is to virsh 9.0's medians
//! measured with hyperfine on this kind of machine
//! (research/libvirt-9.0/REPORT.md).
//!
//! Uses the `strata` binary already built in this target directory
//! (`cargo build --release -p strata-cli`), or `$STRATA_BENCH_BIN`;
//! `STRATA_BENCH_BEFORE=/path/to/strata` also times an older build on the
//! same domain, alternating run by run, for a before/after table.
//! `STRATA_BENCH_QUICK=1` runs fewer repetitions.

use std::process::ExitCode;

use serde_json::json;
use strata_benches::{
    domain_xml, libvirt_xml, ms, path_str, qcow2_chain, quick_suffix, time, BackingNames, DomainBench, DomainGuard,
    Leftover, Stats, Strata, Virsh, VirshDomain, RUNNING_DOMAIN_TOOLS,
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
    // libvirt's domain: the same XML on its own copy of the chain.
    let virsh = Virsh::reachable("cli_running").map(|virsh| {
        let dir = env.dir.path().join("virsh");
        let chain = qcow2_chain(&dir, &["base.qcow2", "mid.qcow2", "top.qcow2"], "64M", BackingNames::Relative);
        let name = VirshDomain::name_for("cli_running");
        let xml = dir.join("vm.xml");
        std::fs::write(&xml, libvirt_xml(&domain_xml(&name, env.kind, &chain[2..])))
            .expect("write libvirt's domain XML");
        println!("virsh:  {} (domain '{name}'), measured in this run", virsh.uri);
        VirshDomain::start(&virsh, &name, &xml).unwrap_or_else(|e| panic!("libvirt did not start '{name}': {e}"))
    });
    guard.wait_for_idle();
    if let Some(domain) = &virsh {
        domain.wait_for_idle();
    }
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
    for (label, args, check, reference) in cases {
        let mut binaries: Vec<(&str, Runner)> =
            before.iter().map(|b| ("before", Runner::Strata(b))).chain([("strata", Runner::Strata(cli))]).collect();
        // virsh has no `--version` start-up case worth comparing.
        if let Some(domain) = virsh.as_ref().filter(|_| args[0] != "--version") {
            binaries.push(("virsh", Runner::Virsh(domain)));
        }
        for (_, bin) in &binaries {
            let out = bin.ok(args);
            assert!(check(&out), "{args:?} printed something unexpected:\n{out}");
            for _ in 1..WARMUP {
                bin.ok(args);
            }
        }
        // Alternating, so that load on the machine falls on all alike.
        let mut samples = vec![Vec::new(); binaries.len()];
        for _ in 0..runs {
            for (i, (_, bin)) in binaries.iter().enumerate() {
                samples[i].push(time(|| bin.ok(args)).0);
            }
        }
        let measured_virsh =
            binaries.iter().position(|(b, _)| *b == "virsh").map(|i| ms(Stats::of(&samples[i]).median));
        let virsh_ms = measured_virsh.or(reference);
        for ((binary, _), samples) in binaries.iter().zip(samples) {
            let s = Stats::of(&samples);
            let ratio = virsh_ms.filter(|_| *binary != "virsh").map(|v| v / ms(s.median));
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
                "virsh_ms": virsh_ms,
                "virsh_measured": measured_virsh.is_some(),
                "virsh_over_strata": ratio,
            }));
        }
    }
    if virsh.is_none() {
        println!(
            "\nvirsh medians (REPORT.md, hyperfine, NOT measured now: no libvirtd answered): list {VIRSH_LIST_MS} ms, \
             domblklist {VIRSH_DOMBLKLIST_MS} ms, dumpxml {VIRSH_DUMPXML_MS} ms"
        );
    }
    println!("goal: virsh/strata >= 6 for list, dominfo, domblklist");
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

/// What runs a case: a strata build on the bench's state root, or virsh
/// on libvirt's copy of the domain (named differently: the case's domain
/// name is replaced by libvirt's).
enum Runner<'a> {
    Strata(&'a Strata),
    Virsh(&'a VirshDomain),
}

impl Runner<'_> {
    fn ok(&self, args: &[&str]) -> String {
        match self {
            Runner::Strata(cli) => cli.ok(args),
            Runner::Virsh(domain) => {
                let args: Vec<&str> =
                    args.iter().map(|a| if *a == DOMAIN { domain.name.as_str() } else { a }).collect();
                // The listing names libvirt's domain; the checks look for the case's.
                domain.virsh.ok(&args).replace(&domain.name, DOMAIN)
            }
        }
    }
}

/// virsh 9.0 against libvirtd on this kind of machine (2 shared vCPUs),
/// hyperfine medians from research/libvirt-9.0/REPORT.md.
const VIRSH_LIST_MS: f64 = 18.7;
const VIRSH_DOMBLKLIST_MS: f64 = 21.6;
const VIRSH_DUMPXML_MS: f64 = 17.4;
