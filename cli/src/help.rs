//! `help`, `help COMMAND|KEYWORD` and `COMMAND --help`, laid out as
//! virsh prints them and generated from the clap definitions: each
//! command's description and options are its clap documentation; only the
//! grouping is listed here.

use std::any::TypeId;
use std::fmt::Write as _;

use clap::Arg;
use serde_json::json;

use crate::virsh_args::by_position;

/// virsh's command groups: (title, help keyword, commands).
const GROUPS: &[(&str, &str, &[&str])] = &[
    (
        "Domain Management",
        "domain",
        &[
            "attach-interface",
            "blockcommit",
            "blockcopy",
            "blockjob",
            "blockpull",
            "define",
            "destroy",
            "detach-interface",
            "domjobabort",
            "dumpxml",
            "emulatorpin",
            "event",
            "lxc-enter-namespace",
            "managedsave",
            "managedsave-remove",
            "migrate",
            "qemu-monitor-command",
            "restore",
            "resume",
            "save",
            "save-image-dumpxml",
            "setvcpus",
            "shutdown",
            "start",
            "suspend",
            "undefine",
            "vcpupin",
        ],
    ),
    (
        "Domain Monitoring",
        "monitor",
        &[
            "domblkcheck",
            "domblklist",
            "domifaddr",
            "domiflist",
            "dominfo",
            "domjobinfo",
            "domstate",
            "list",
            "vcpucount",
            "vcpuinfo",
        ],
    ),
    ("Disk Sets", "diskset", &["diskset-add", "diskset-list", "diskset-remove", "diskset-size"]),
    ("Host and Hypervisor", "host", &["capabilities", "nodecpumap", "nodeinfo", "uri", "version"]),
    (
        "Snapshot",
        "snapshot",
        &[
            "snapshot-create",
            "snapshot-create-as",
            "snapshot-current",
            "snapshot-delete",
            "snapshot-dumpxml",
            "snapshot-info",
            "snapshot-list",
            "snapshot-parent",
            "snapshot-revert",
        ],
    ),
    (
        "Networking",
        "network",
        &[
            "net-autostart",
            "net-create",
            "net-define",
            "net-destroy",
            "net-dhcp-leases",
            "net-dumpxml",
            "net-info",
            "net-list",
            "net-name",
            "net-start",
            "net-undefine",
            "net-uuid",
        ],
    ),
    (
        "Storage Pool",
        "pool",
        &[
            "pool-autostart",
            "pool-build",
            "pool-define",
            "pool-define-as",
            "pool-destroy",
            "pool-dumpxml",
            "pool-info",
            "pool-list",
            "pool-refresh",
            "pool-start",
            "pool-undefine",
        ],
    ),
    (
        "Storage Volume",
        "volume",
        &[
            "vol-clone",
            "vol-create",
            "vol-create-as",
            "vol-delete",
            "vol-dumpxml",
            "vol-info",
            "vol-list",
            "vol-path",
            "vol-resize",
        ],
    ),
    ("Strata itself", "strata", &["help"]),
];

/// The group title for commands no group lists (so that a new command
/// still shows).
const OTHER_GROUP: &str = "Other";

/// Every command of `root` as (name, group title, one-line description),
/// by group.
fn commands(root: &clap::Command) -> Vec<(String, &'static str, String)> {
    let mut all: Vec<(String, &'static str, String)> = root
        .get_subcommands()
        .filter(|c| !c.is_hide_set())
        .map(|c| {
            let name = c.get_name().to_string();
            let group = GROUPS
                .iter()
                .find(|(_, _, cmds)| cmds.contains(&name.as_str()))
                .map_or(OTHER_GROUP, |(title, _, _)| *title);
            (name, group, about(c))
        })
        .collect();
    let rank = |group: &str| GROUPS.iter().position(|(t, _, _)| *t == group).unwrap_or(GROUPS.len());
    all.sort_by(|a, b| (rank(a.1), &a.0).cmp(&(rank(b.1), &b.0)));
    all
}

fn about(cmd: &clap::Command) -> String {
    cmd.get_about().map(|a| a.to_string()).unwrap_or_default()
}

/// `help` with no command: every group, as `virsh help` prints them; with
/// `json`, the list of commands. `root` is the command line that declares
/// the commands.
pub fn overview(root: &clap::Command, json: bool) -> String {
    let all = commands(root);
    if json {
        let list: Vec<_> = all
            .iter()
            .map(|(name, group, description)| json!({ "name": name, "group": group, "description": description }))
            .collect();
        return format!("{}\n", serde_json::Value::Array(list));
    }
    let mut out = String::from("Grouped commands:\n\n");
    let mut titles: Vec<&str> = GROUPS.iter().map(|(t, _, _)| *t).collect();
    titles.push(OTHER_GROUP);
    for title in titles {
        out.push_str(&group_text(title, &all));
    }
    out
}

fn group_text(title: &str, all: &[(String, &'static str, String)]) -> String {
    let rows: Vec<_> = all.iter().filter(|c| c.1 == title).collect();
    if rows.is_empty() {
        return String::new();
    }
    let mut out = match GROUPS.iter().find(|(t, _, _)| *t == title) {
        Some((_, keyword, _)) => format!(" {title} (help keyword '{keyword}'):\n"),
        None => format!(" {title}:\n"),
    };
    for (name, _, description) in rows {
        let _ = writeln!(out, "    {name:<30} {description}");
    }
    out.push('\n');
    out
}

/// `help NAME`: a command's help, or a group's commands by its keyword;
/// None when NAME is neither of `root`'s.
pub fn topic(root: &clap::Command, name: &str) -> Option<String> {
    if let Some((title, _, _)) = GROUPS.iter().find(|(_, keyword, _)| *keyword == name) {
        return Some(group_text(title, &commands(root)));
    }
    crate::virsh_args::built_subcommand(root, name).map(|cmd| command_help(&cmd))
}

/// One command's help as `virsh help COMMAND` prints it: NAME, SYNOPSIS,
/// DESCRIPTION and OPTIONS.
pub fn command_help(cmd: &clap::Command) -> String {
    let name = cmd.get_name();
    let options: Vec<&Arg> =
        cmd.get_arguments().filter(|a| !a.is_hide_set() && a.get_id().as_str() != "help").collect();
    let mut out = format!("  NAME\n    {name} - {}\n\n  SYNOPSIS\n    {name}", about(cmd));
    for arg in &options {
        out.push(' ');
        out.push_str(&synopsis_word(arg));
    }
    let description = cmd.get_long_about().map(|a| a.to_string()).unwrap_or_else(|| about(cmd));
    let _ = write!(out, "\n\n  DESCRIPTION\n    {}\n\n", description.replace('\n', "\n    "));
    if !options.is_empty() {
        out.push_str("  OPTIONS\n");
        for arg in &options {
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            let _ = writeln!(out, "    {:<15}  {help}", option_word(arg));
        }
        out.push('\n');
    }
    out
}

/// virsh's value types: `<number>` or `<string>`.
fn value_word(arg: &Arg) -> &'static str {
    if arg.get_value_parser().type_id() == TypeId::of::<u64>() {
        "<number>"
    } else {
        "<string>"
    }
}

fn long(arg: &Arg) -> String {
    format!("--{}", arg.get_long().unwrap_or(arg.get_id().as_str()))
}

/// How SYNOPSIS shows an option: `<domain>`, `[<snapshotname>]`,
/// `[--base <string>]`, `[--wait]`, `<cmd>...`.
fn synopsis_word(arg: &Arg) -> String {
    let word = if by_position(arg) {
        format!("<{}>", &long(arg)[2..])
    } else if arg.get_action().takes_values() {
        format!("{} {}", long(arg), value_word(arg))
    } else {
        long(arg)
    };
    let many = if matches!(arg.get_action(), clap::ArgAction::Append) { "..." } else { "" };
    if arg.is_required_set() {
        format!("{word}{many}")
    } else {
        format!("[{word}]{many}")
    }
}

/// How OPTIONS shows an option: `[--domain] <string>` for one that may be
/// given by position, `--bandwidth <number>`, `--wait`.
fn option_word(arg: &Arg) -> String {
    let mut word = if by_position(arg) { format!("[{}]", long(arg)) } else { long(arg) };
    if let Some(aliases) = arg.get_visible_aliases() {
        for alias in aliases {
            let _ = write!(word, " (or --{alias})");
        }
    }
    if arg.get_action().takes_values() {
        word.push(' ');
        word.push_str(value_word(arg));
    }
    word
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::GROUPS;
    use crate::commands::CommandLine;

    #[test]
    fn every_option_of_every_command_is_described() {
        let mut root = CommandLine::command();
        // Every command's deferred options added.
        root.build();
        assert!(root.find_subcommand("snapshot-create-as").is_some_and(|c| c.get_arguments().count() > 5));
        let mut undescribed = Vec::new();
        for cmd in root.get_subcommands() {
            if cmd.get_about().is_none() {
                undescribed.push(cmd.get_name().to_string());
            }
            for arg in cmd.get_arguments().filter(|a| !a.is_hide_set() && a.get_help().is_none()) {
                undescribed.push(format!("{} --{}", cmd.get_name(), arg.get_id()));
            }
        }
        assert!(undescribed.is_empty(), "undescribed: {undescribed:?}");
    }

    #[test]
    fn a_commands_help_has_its_own_description_and_its_deferred_options() {
        let root = CommandLine::command();
        // Commands whose options come from a shared struct with a doc
        // comment of its own (the domain, the snapshot, the job options).
        for (name, about, option) in [
            ("domblklist", "domblklist - List a domain's block devices", "--details"),
            ("snapshot-revert", "snapshot-revert - Revert the domain to a snapshot", "--running"),
            ("blockpull", "blockpull - Pull backing data into the active layer", "--wait"),
        ] {
            let help = super::topic(&root, name).expect("a command");
            assert!(help.contains(about), "{help}");
            assert!(help.contains(option), "{help}");
        }
    }

    #[test]
    fn every_command_is_in_one_group_and_every_grouped_command_exists() {
        let root = CommandLine::command();
        for cmd in root.get_subcommands().filter(|c| !c.is_hide_set()) {
            let groups = GROUPS.iter().filter(|(_, _, cmds)| cmds.contains(&cmd.get_name())).count();
            assert_eq!(groups, 1, "command {} is in {groups} groups", cmd.get_name());
        }
        for (_, _, cmds) in GROUPS {
            for name in *cmds {
                assert!(root.find_subcommand(name).is_some(), "group lists unknown command {name}");
            }
        }
    }
}
