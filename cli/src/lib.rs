//! strata-cli: the `strata` command, a virsh-compatible command line over
//! Strata's drivers. The binary is a thin wrapper around [`main_entry`], so
//! the workspace tests can build the very same command.
//!
//! `strata [-c URI] [-q] [--json] [--debug] COMMAND [ARGS…]`, or several
//! commands in one argument separated by `;`, or an interactive shell when
//! no command is given.

mod blockjobs;
mod commands;
mod snapshots;
mod table;
mod tokenize;

use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;

use commands::{CommandFailure, CommandLine, Session};

// Link the built-in drivers so their registrations are present.
use strata_qemu as _;

#[derive(Parser, Debug)]
#[command(
    name = "strata",
    about = "Manage the disks of virtual machines and containers: backing chains, snapshots, block jobs, disk sets",
    disable_version_flag = true,
    override_usage = "strata [OPTION]... [COMMAND_STRING]\n       strata [OPTION]... COMMAND [ARG]..."
)]
struct Global {
    /// Hypervisor connection URI (default: $STRATA_DEFAULT_URI, $LIBVIRT_DEFAULT_URI, qemu:///session or qemu:///system for root).
    #[arg(short = 'c', long = "connect", value_name = "URI")]
    connect: Option<String>,
    /// Quiet mode: no table headers or informational messages.
    #[arg(short = 'q', long)]
    quiet: bool,
    /// JSON output for listing and info commands.
    #[arg(long)]
    json: bool,
    /// Show what Strata does (same as STRATA_LOG=debug).
    #[arg(short = 'd', long)]
    debug: bool,
    /// Print the version and exit.
    #[arg(short = 'v', long = "version")]
    version: bool,
    /// A command and its arguments, or several commands separated by ';'.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "COMMAND")]
    command: Vec<String>,
}

fn init_tracing(debug: bool) {
    let filter = if debug {
        tracing_subscriber::EnvFilter::new("debug")
    } else {
        tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"))
    };
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}

/// Runs one command's words; prints its output and errors; returns success.
async fn run_words(session: &mut Session, words: Vec<String>) -> bool {
    let parsed = match CommandLine::try_parse_from(&words) {
        Ok(p) => p,
        Err(e) => {
            use clap::error::ErrorKind as K;
            if matches!(e.kind(), K::DisplayHelp | K::DisplayVersion) {
                print!("{e}");
                return true;
            }
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid command").trim_start_matches("error: ");
            eprintln!("error: {first}");
            return false;
        }
    };
    match commands::run(session, parsed.command).await {
        Ok(out) => {
            print!("{out}");
            true
        }
        Err(err) => {
            if let Some(f) = err.downcast_ref::<CommandFailure>() {
                print!("{}", f.output);
            }
            let _ = std::io::stdout().flush();
            for cause in err.chain() {
                eprintln!("error: {cause}");
            }
            false
        }
    }
}

/// Runs a `;`-separated batch; like virsh, every command runs and the
/// status is that of the last one.
async fn run_batch(session: &mut Session, commands: Vec<Vec<String>>) -> bool {
    let mut ok = true;
    for words in commands {
        if words.is_empty() {
            continue;
        }
        ok = run_words(session, words).await;
    }
    ok
}

async fn interactive(session: &mut Session) -> bool {
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    if tty {
        println!("Welcome to strata, the virtualization disk terminal.\n");
        println!("Type:  'help' for help with commands\n       'quit' to quit\n");
    }
    let mut ok = true;
    let mut line = String::new();
    loop {
        if tty {
            print!("strata # ");
            let _ = std::io::stdout().flush();
        }
        line.clear();
        match stdin.lock().read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                eprintln!("error: cannot read a command: {e}");
                return false;
            }
        }
        let trimmed = line.trim();
        if trimmed == "quit" || trimmed == "exit" {
            break;
        }
        match tokenize::split_commands(trimmed) {
            Ok(cmds) => {
                let cmds = cmds
                    .into_iter()
                    .map(|c| if c.first().map(String::as_str) == Some("help") { vec!["--help".into()] } else { c })
                    .collect();
                ok = run_batch(session, cmds).await;
            }
            Err(e) => {
                eprintln!("error: {e}");
                ok = false;
            }
        }
    }
    ok
}

/// Parses `std::env::args`, runs the command(s) and returns the exit status.
pub fn main_entry() -> ExitCode {
    let global = Global::parse();
    init_tracing(global.debug);
    if global.version {
        println!("{}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let uri = global.connect.clone().unwrap_or_else(strata_core::uri::default_uri);
    tracing::debug!(uri = %uri, "connection URI");
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut session = Session::new(uri, global.quiet, global.json);
    let ok = runtime.block_on(async {
        match global.command.as_slice() {
            [] => interactive(&mut session).await,
            // One argument holding a whole command string, as virsh takes it.
            [one] => match tokenize::split_commands(one) {
                Ok(cmds) => run_batch(&mut session, cmds).await,
                Err(e) => {
                    eprintln!("error: {e}");
                    false
                }
            },
            words => run_words(&mut session, words.to_vec()).await,
        }
    });
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
