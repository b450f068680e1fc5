//! virsh's way of reading a command's options, applied before clap parses
//! them: an option declared under [`BY_POSITION`] (a domain, a disk, a
//! snapshot name, …) may be given as `--NAME VALUE`, `--NAME=VALUE` or as a
//! bare word, and each bare word fills the first of those options in their
//! declared order not given so far, as virsh's parser does. So `blockpull
//! --domain d --path vda`, `blockpull d vda` and `blockpull --domain d vda`
//! are one command line. After `--`, every word is a bare word. An option
//! that takes several words (`qemu-monitor-command`'s command) takes every
//! bare word left.

use clap::{Arg, ArgAction};

/// The heading of the options that, as in virsh, may also be given by
/// position: bare words fill them in the order they are declared.
pub const BY_POSITION: &str = "Options also given by position";

/// Whether `arg` may be given by position.
pub fn by_position(arg: &Arg) -> bool {
    arg.get_help_heading() == Some(BY_POSITION)
}

/// The option of `cmd` named `--name` (or one of its aliases).
fn option_named<'a>(cmd: &'a clap::Command, name: &str) -> Option<&'a Arg> {
    cmd.get_arguments()
        .find(|a| a.get_long() == Some(name) || a.get_all_aliases().is_some_and(|aliases| aliases.contains(&name)))
}

/// A copy of `root`'s command `name` (or alias) with its options in
/// place: each command's options are added only when it is parsed
/// (`commands::Command`'s `defer`).
pub fn built_subcommand(root: &clap::Command, name: &str) -> Option<clap::Command> {
    let mut cmd = root.find_subcommand(name)?.clone();
    // The command's description is its variant's: the options' structs'
    // own doc comments, added by the deferred build, would replace it.
    let (about, long_about) = (cmd.get_about().cloned(), cmd.get_long_about().cloned());
    cmd.build();
    let reset = || clap::builder::Resettable::Reset;
    Some(cmd.about(about.map_or_else(reset, Into::into)).long_about(long_about.map_or_else(reset, Into::into)))
}

/// `words` (a command and its options) with every bare word given as the
/// option it fills, `--NAME=WORD`, for clap, whose command line `root`
/// declares the commands. Bare words left over stay as they are, for clap
/// to refuse as virsh does ("unexpected data").
pub fn name_positional_words(root: &clap::Command, words: &[String]) -> Vec<String> {
    let Some((command, rest)) = words.split_first() else { return Vec::new() };
    let Some(cmd) = built_subcommand(root, command) else { return words.to_vec() };
    let cmd = &cmd;
    let slots: Vec<&Arg> = cmd.get_arguments().filter(|a| by_position(a)).collect();
    let mut given = vec![false; slots.len()];
    let mut named = vec![command.clone()];
    let mut all_bare = false;
    let mut rest = rest.iter();
    while let Some(word) = rest.next() {
        if word == "--" && !all_bare {
            all_bare = true;
            continue;
        }
        if all_bare || !word.starts_with("--") {
            // The first option not given so far; one taking several words
            // keeps taking them.
            let slot = slots.iter().zip(&given).find(|(s, given)| !**given || takes_many(s));
            match slot.and_then(|(s, _)| s.get_long()) {
                Some(long) => {
                    named.push(format!("--{long}={word}"));
                    mark_given(&slots, &mut given, long);
                }
                None => named.push(word.clone()),
            }
            continue;
        }
        named.push(word.clone());
        let (name, inline_value) = match word[2..].split_once('=') {
            Some((name, _)) => (name, true),
            None => (&word[2..], false),
        };
        let Some(arg) = option_named(cmd, name) else { continue };
        if let Some(long) = arg.get_long() {
            mark_given(&slots, &mut given, long);
        }
        if !inline_value && arg.get_action().takes_values() {
            named.extend(rest.next().cloned());
        }
    }
    named
}

fn takes_many(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::Append)
}

fn mark_given(slots: &[&Arg], given: &mut [bool], long: &str) {
    if let Some(i) = slots.iter().position(|s| s.get_long() == Some(long)) {
        given[i] = true;
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use crate::commands::CommandLine;

    fn words(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_string).collect()
    }

    fn name_positional_words(words: &[String]) -> Vec<String> {
        super::name_positional_words(&CommandLine::command(), words)
    }

    #[test]
    fn each_bare_word_fills_the_first_option_not_given_so_far() {
        assert_eq!(
            name_positional_words(&words("blockpull --domain d vda --wait")),
            words("blockpull --domain d --path=vda --wait")
        );
        assert_eq!(
            name_positional_words(&words("snapshot-create-as d --description x n")),
            words("snapshot-create-as --domain=d --description x --name=n")
        );
        assert_eq!(name_positional_words(&words("dominfo -- --odd")), words("dominfo --domain=--odd"));
        assert_eq!(name_positional_words(&words("dominfo a b")), words("dominfo --domain=a b"));
        // A bare `-` is a value: pool-define-as reads it as "leave empty".
        assert_eq!(
            name_positional_words(&words("pool-define-as p dir - - - - /srv/p")),
            words(
                "pool-define-as --name=p --type=dir --source-host=- --source-path=- --source-dev=- --source-name=- \
                 --target=/srv/p"
            )
        );
        assert_eq!(
            name_positional_words(&words("vol-create-as --pool p v1 --format qcow2 1M")),
            words("vol-create-as --pool p --name=v1 --format qcow2 --capacity=1M")
        );
    }
}
