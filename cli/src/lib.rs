//! strata-cli: the `strata` command, a virsh-compatible command line over
//! Strata's drivers. The binary is a thin wrapper around [`main_entry`], so
//! the workspace tests can build the very same command.
//!
//! `strata [-c URI] [-q] [--json] [--debug] COMMAND [ARGS…]`, or several
//! commands in one argument separated by `;`, or an interactive shell when
//! no command is given.

mod blockjobs;
#[cfg(test)]
mod capability_refusals;
mod commands;
mod help;
mod networks;
mod output;
mod pools;
mod save;
mod shared;
mod snapshots;
mod table;
mod tokenize;
mod virsh_args;

use std::io::{BufRead, IsTerminal};
use std::process::ExitCode;

use clap::{CommandFactory, Parser};

use commands::{CommandLine, Session};
use shared::CommandFailure;

// Link the built-in drivers so their registrations are present; each is a
// Cargo feature named after its scheme.
#[cfg(feature = "lxc")]
use strata_lxc as _;
#[cfg(feature = "qemu")]
use strata_qemu as _;
#[cfg(feature = "vbox")]
use strata_vbox as _;

#[derive(Parser, Debug)]
#[command(
    name = "strata",
    about = "Manage the disks of virtual machines and containers: backing chains, snapshots, block jobs, disk sets",
    disable_version_flag = true,
    override_usage = "strata [OPTION]... [COMMAND_STRING]\n       strata [OPTION]... COMMAND [ARG]...",
    after_help = "Commands: 'strata help' lists them by group, 'strata help COMMAND' (or 'strata COMMAND --help') \
                  shows one command's synopsis and options, 'strata help KEYWORD' one group's commands."
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

/// One command of a batch, parsed.
enum Parsed {
    Run(commands::Command),
    /// `--help`: clap's text, printed when the batch runs.
    Help(String),
}

/// Parses one command's words, read as virsh reads them (see
/// [`virsh_args`]); a refusal is virsh's message for it.
fn parse_words(words: &[String]) -> Result<Parsed, String> {
    let command = words.first().map(String::as_str).unwrap_or_default();
    let root = CommandLine::command();
    match CommandLine::try_parse_from(virsh_args::name_positional_words(&root, words)) {
        Ok(p) => Ok(Parsed::Run(p.command)),
        Err(e) if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion) => {
            Ok(Parsed::Help(help::topic(&root, command).unwrap_or_else(|| e.to_string())))
        }
        Err(e) => Err(parse_error_message(command, &e)),
    }
}

/// virsh's words for a command line it cannot run: `command 'dominfo'
/// requires <domain> option`, `command 'list' doesn't support option
/// --foo`, `unknown command: 'foo'`; otherwise clap's own sentence.
fn parse_error_message(command: &str, e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind as K};
    let context = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        Some(ContextValue::Strings(v)) => v.first().cloned(),
        _ => None,
    };
    match (e.kind(), context(ContextKind::InvalidArg), context(ContextKind::InvalidSubcommand)) {
        (K::MissingRequiredArgument, Some(arg), _) => {
            format!("command '{command}' requires {} option", virsh_option(command, &arg))
        }
        (K::UnknownArgument, Some(arg), _) if arg.starts_with('-') => {
            format!("command '{command}' doesn't support option {arg}")
        }
        (K::UnknownArgument, Some(arg), _) => format!("unexpected data '{arg}'"),
        (K::InvalidSubcommand, _, Some(name)) => format!("unknown command: '{name}'"),
        (K::ArgumentConflict, Some(arg), _) if e.to_string().contains("cannot be used multiple times") => {
            format!("option {} already seen", arg.split_whitespace().next().unwrap_or(&arg))
        }
        _ => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or_default();
            first.strip_prefix("error: ").unwrap_or(first).to_string()
        }
    }
}

/// How virsh names a missing option: `<domain>` for one that may be given
/// by position, `--dest` for one that must be named. clap describes it as
/// `--domain <DOMAIN>`.
fn virsh_option(command: &str, clap_arg: &str) -> String {
    let option = clap_arg.split_whitespace().next().unwrap_or(clap_arg);
    let root = CommandLine::command();
    let by_position = virsh_args::built_subcommand(&root, command).is_some_and(|cmd| {
        cmd.get_arguments().any(|a| virsh_args::by_position(a) && a.get_long() == option.strip_prefix("--"))
    });
    match option.strip_prefix("--") {
        Some(name) if by_position => format!("<{name}>"),
        _ => option.to_string(),
    }
}

/// Runs one parsed command; prints its output and errors; returns success.
async fn run_parsed(session: &mut Session, parsed: Parsed) -> bool {
    let command = match parsed {
        Parsed::Help(text) => {
            output::out(&text);
            return true;
        }
        Parsed::Run(command) => command,
    };
    match commands::run(session, command).await {
        Ok(out) => {
            output::out(&out);
            true
        }
        Err(err) => {
            if let Some(f) = err.downcast_ref::<CommandFailure>() {
                output::out(&f.output);
            }
            for line in error_lines(&err) {
                output::err(&format!("error: {line}\n"));
            }
            false
        }
    }
}

/// A failure as virsh prints it: one `error:` line per context, with an
/// OS error's reason completing the line it explains, never repeated.
fn error_lines(err: &anyhow::Error) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for cause in err.chain() {
        if let Some(core) = cause.downcast_ref::<strata_core::Error>() {
            // Its report holds its causes: the rest of the chain.
            lines.push(core.report());
            break;
        }
        if let Some(CommandFailure { message, .. }) = cause.downcast_ref::<CommandFailure>() {
            if message.is_empty() {
                continue; // a failure virsh reports with no message
            }
        }
        let text = strata_core::error::os_reason(cause);
        match lines.last_mut() {
            Some(last) if cause.is::<std::io::Error>() => {
                last.push_str(": ");
                last.push_str(&text);
            }
            _ => lines.push(text),
        }
    }
    lines
}

/// Runs a `;`-separated batch: every command is parsed first, and one
/// that cannot be parsed stops the batch before anything runs (status 1),
/// as in virsh; otherwise every command runs, and the batch fails when any
/// of them failed. virsh returns the last command's status instead, which
/// lets a script miss a failed snapshot or block job in the middle.
async fn run_batch(session: &mut Session, commands: Vec<Vec<String>>) -> bool {
    let mut parsed = Vec::new();
    for words in commands.iter().filter(|w| !w.is_empty()) {
        match parse_words(words) {
            Ok(p) => parsed.push(p),
            Err(message) => {
                output::err(&format!("error: {message}\n"));
                return false;
            }
        }
    }
    let mut ok = true;
    for p in parsed {
        ok &= run_parsed(session, p).await;
    }
    ok
}

async fn interactive(session: &mut Session) -> bool {
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    if tty {
        output::out("Welcome to strata, the virtualization disk terminal.\n\n");
        output::out("Type:  'help' for help with commands\n       'quit' to quit\n\n");
    }
    let mut ok = true;
    let mut line = String::new();
    loop {
        if tty {
            output::out("strata # ");
        }
        line.clear();
        match stdin.lock().read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => {
                output::err(&format!("error: cannot read a command: {e}\n"));
                return false;
            }
        }
        let trimmed = line.trim();
        if trimmed == "quit" || trimmed == "exit" {
            break;
        }
        match tokenize::split_commands(trimmed) {
            Ok(cmds) => ok = run_batch(session, cmds).await,
            Err(e) => {
                output::err(&format!("error: {e}\n"));
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
        output::out(concat!(env!("CARGO_PKG_VERSION"), "\n"));
        return ExitCode::SUCCESS;
    }
    let uri = global.connect.clone().unwrap_or_else(strata_core::uri::default_uri);
    tracing::debug!(uri = %uri, "connection URI");
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            output::err(&format!("error: cannot start the async runtime: {e}\n"));
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
                    output::err(&format!("error: {e}\n"));
                    false
                }
            },
            words => run_batch(&mut session, vec![words.to_vec()]).await,
        }
    });
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
