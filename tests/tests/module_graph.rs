//! Every module dependency inside a crate points one way (issue 10): the
//! references between a crate's top-level modules (`crate::MODULE`,
//! `super::MODULE`, and the crate root's own `MODULE::` paths) form no
//! cycle. A `mod tests` (or any `#[cfg(test)]` module) inside a file does
//! not count: tests may reach anywhere. Comments, strings and doc links do
//! not count either. The crate root (`lib.rs`, else `main.rs`) is a module
//! like the others, named `lib` (or `main`): `crate::Item` for an item it
//! defines is a reference to it.
//!
//! And the CLI library links a driver only through the Cargo feature named
//! after its scheme, so that an embedder can leave every driver out.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};

/// One token of Rust source, as much as the module graph needs.
#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    PathSep,
    Punct(char),
}

/// The tokens of `source`, without comments, string and character
/// literals, lifetimes' quotes and numbers.
fn tokens(source: &str) -> Vec<Token> {
    let chars: Vec<char> = source.chars().collect();
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == '"' {
            i = skip_string(&chars, i + 1, false, 0);
        } else if c == '\'' {
            // A character literal ('a', '\n', '\u{2500}'); else a lifetime,
            // whose name is read as an identifier next.
            if at(i + 1) == '\\' {
                i += 3;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                i += 1;
            }
        } else if c.is_ascii_digit() {
            while at(i).is_ascii_alphanumeric() || at(i) == '_' {
                i += 1;
            }
        } else if c.is_alphabetic() || c == '_' {
            let start = i;
            while at(i).is_alphanumeric() || at(i) == '_' {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let hashes = chars[i..].iter().take_while(|c| **c == '#').count();
            if (word == "r" || word == "br") && at(i + hashes) == '"' {
                i = skip_string(&chars, i + hashes + 1, true, hashes);
            } else if word == "r" && hashes == 1 {
                i += 1; // a raw identifier: r#type
            } else {
                out.push(Token::Ident(word));
            }
        } else if c == ':' && at(i + 1) == ':' {
            out.push(Token::PathSep);
            i += 2;
        } else {
            out.push(Token::Punct(c));
            i += 1;
        }
    }
    out
}

/// The index after a string literal whose body starts at `i`, closed by a
/// quote and `hashes` hashes (a raw string has no escapes).
fn skip_string(chars: &[char], mut i: usize, raw: bool, hashes: usize) -> usize {
    while i < chars.len() {
        if chars[i] == '\\' && !raw {
            i += 2;
        } else if chars[i] == '"' && chars[i + 1..].iter().take(hashes).filter(|c| **c == '#').count() == hashes {
            return i + 1 + hashes;
        } else {
            i += 1;
        }
    }
    i
}

fn ident(tokens: &[Token], i: usize) -> Option<&str> {
    match tokens.get(i) {
        Some(Token::Ident(s)) => Some(s),
        _ => None,
    }
}

fn punct(tokens: &[Token], i: usize, c: char) -> bool {
    tokens.get(i) == Some(&Token::Punct(c))
}

/// The index after the bracketed group that opens at `i` (`{`, `[`, `(`).
fn group_end(tokens: &[Token], i: usize) -> usize {
    let mut depth = 0usize;
    for (j, t) in tokens.iter().enumerate().skip(i) {
        match t {
            Token::Punct('{' | '[' | '(') => depth += 1,
            Token::Punct('}' | ']' | ')') => {
                depth = depth.saturating_sub(1);
                if depth == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
    }
    tokens.len()
}

/// Whether the item at `i` carries `#[cfg(test)]` among the attributes
/// just before it.
fn is_cfg_test(tokens: &[Token], attributes: &[(usize, usize)], i: usize) -> bool {
    let mut end = i;
    for &(start, stop) in attributes.iter().rev() {
        if stop != end {
            break;
        }
        let body = &tokens[start..stop];
        let test = [Token::Ident("cfg".into()), Token::Punct('('), Token::Ident("test".into()), Token::Punct(')')];
        if body.windows(test.len()).any(|w| w == test) {
            return true;
        }
        end = start;
    }
    false
}

/// The top-level modules a file's code names, and the modules it declares
/// (`mod NAME;`, not under `#[cfg(test)]`).
#[derive(Default)]
struct FileRefs {
    names: BTreeSet<String>,
    declares: Vec<String>,
}

/// What the file of module `path` (`[]` for the crate root, `[m]` for a
/// top-level module, `[m, sub]` below it) refers to: the first name after
/// each `crate::` and each `super::` that climbs to the root, and in the
/// root itself every path that starts with a module name. `is_module`
/// tells which names are top-level modules (known once the root is read).
fn file_refs(source: &str, path: &[String], is_module: &dyn Fn(&str) -> bool) -> FileRefs {
    let tokens = tokens(source);
    let mut refs = FileRefs::default();
    let mut attributes: Vec<(usize, usize)> = Vec::new();
    // Inline modules open at this point: (name, index where they close).
    let mut inline: Vec<(String, usize)> = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        inline.retain(|(_, close)| *close > i);
        let after_sep = i > 0 && matches!(tokens[i - 1], Token::PathSep | Token::Punct('$' | '.'));
        if punct(&tokens, i, '#') && punct(&tokens, i + 1, '[') {
            let end = group_end(&tokens, i + 1);
            attributes.push((i, end));
            i = end;
            continue;
        }
        let Some(word) = ident(&tokens, i) else {
            i += 1;
            continue;
        };
        if word == "mod" {
            let item_start = item_start(&tokens, i);
            if let Some(name) = ident(&tokens, i + 1) {
                let test_only = is_cfg_test(&tokens, &attributes, item_start) || name == "tests";
                if punct(&tokens, i + 2, '{') {
                    let end = group_end(&tokens, i + 2);
                    if test_only {
                        i = end;
                        continue;
                    }
                    inline.push((name.to_string(), end));
                } else if punct(&tokens, i + 2, ';') && !test_only {
                    refs.declares.push(name.to_string());
                }
            }
            i += 2;
            continue;
        }
        let mut here: Vec<String> = path.to_vec();
        here.extend(inline.iter().map(|(name, _)| name.clone()));
        let from_root = if after_sep {
            None
        } else if word == "crate" && tokens.get(i + 1) == Some(&Token::PathSep) {
            Some(i + 2)
        } else if word == "super" {
            let mut j = i;
            let mut up = 0;
            while ident(&tokens, j) == Some("super") && tokens.get(j + 1) == Some(&Token::PathSep) {
                up += 1;
                j += 2;
            }
            (up == here.len()).then_some(j)
        } else if here.is_empty() && is_module(word) && tokens.get(i + 1) == Some(&Token::PathSep) {
            refs.names.insert(word.to_string());
            None
        } else {
            None
        };
        if let Some(j) = from_root {
            if punct(&tokens, j, '{') {
                let end = group_end(&tokens, j);
                let mut depth = 0;
                let mut first = true;
                for t in &tokens[j + 1..end - 1] {
                    match t {
                        Token::Punct('{' | '(' | '[') => depth += 1,
                        Token::Punct('}' | ')' | ']') => depth -= 1,
                        Token::Punct(',') if depth == 0 => first = true,
                        Token::Ident(name) if first && depth == 0 => {
                            refs.names.insert(name.clone());
                            first = false;
                        }
                        _ => first = false,
                    }
                }
            } else if let Some(name) = ident(&tokens, j) {
                refs.names.insert(name.to_string());
            }
            i = j;
            continue;
        }
        i += 1;
    }
    refs
}

/// Where the item whose keyword is at `i` starts: before `pub`,
/// `pub(crate)` and the like.
fn item_start(tokens: &[Token], mut i: usize) -> usize {
    if i >= 1 && punct(tokens, i - 1, ')') {
        if let Some(open) = (0..i).rev().find(|j| punct(tokens, *j, '(')) {
            if open >= 1 && ident(tokens, open - 1) == Some("pub") {
                i = open - 1;
            }
        }
    } else if i >= 1 && ident(tokens, i - 1) == Some("pub") {
        i -= 1;
    }
    i
}

/// The source files of top-level module `name`: `NAME.rs` or `NAME/mod.rs`,
/// and every file below `NAME/`, each with its module path.
fn module_files(src: &Path, name: &str) -> Vec<(PathBuf, Vec<String>)> {
    let mut files = Vec::new();
    for main in [src.join(format!("{name}.rs")), src.join(name).join("mod.rs")] {
        if main.is_file() {
            files.push((main, vec![name.to_string()]));
        }
    }
    let mut dirs = vec![(src.join(name), vec![name.to_string()])];
    while let Some((dir, path)) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let file = entry.path();
            let Some(stem) = file.file_stem().and_then(|s| s.to_str()).map(str::to_string) else { continue };
            let mut sub = path.clone();
            sub.push(stem.clone());
            if file.is_dir() {
                dirs.push((file, sub));
            } else if file.extension().is_some_and(|e| e == "rs") && stem != "mod" {
                files.push((file, sub));
            }
        }
    }
    files
}

fn read(file: &Path) -> String {
    std::fs::read_to_string(file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()))
}

/// The dependency graph between the top-level modules of the crate whose
/// source directory is `src`: each module (and the root, `lib` or `main`)
/// with the modules it refers to.
fn module_graph(src: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let root_file = ["lib.rs", "main.rs"]
        .into_iter()
        .map(|f| src.join(f))
        .find(|f| f.is_file())
        .unwrap_or_else(|| panic!("{} has neither lib.rs nor main.rs", src.display()));
    let root_name = root_file.file_stem().and_then(|s| s.to_str()).unwrap_or("lib").to_string();
    let root_source = read(&root_file);
    let modules: BTreeSet<String> = file_refs(&root_source, &[], &|_| false).declares.into_iter().collect();
    let is_module = |name: &str| modules.contains(name);
    let target = |name: &str| if is_module(name) { name.to_string() } else { root_name.clone() };
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let root_refs = file_refs(&root_source, &[], &is_module).names;
    graph.insert(root_name.clone(), root_refs.iter().filter(|n| is_module(n)).cloned().collect());
    for module in &modules {
        let mut uses = BTreeSet::new();
        for (file, path) in module_files(src, module) {
            uses.extend(file_refs(&read(&file), &path, &is_module).names.iter().map(|n| target(n)));
        }
        uses.remove(module);
        graph.insert(module.clone(), uses);
    }
    graph
}

/// The cycles between the top-level modules of the crate whose source
/// directory is `src`: for each module in one, the shortest through it,
/// written from the first of its modules by name (`a -> b -> a`), sorted.
fn module_cycles(src: &Path) -> Vec<String> {
    let graph = module_graph(src);
    let mut cycles = BTreeSet::new();
    for start in graph.keys() {
        if let Some(cycle) = shortest_cycle(&graph, start) {
            cycles.insert(cycle);
        }
    }
    cycles.into_iter().collect()
}

/// The shortest way from `start` back to itself, if any, written from its
/// first module by name.
fn shortest_cycle(graph: &BTreeMap<String, BTreeSet<String>>, start: &str) -> Option<String> {
    let mut came_from: BTreeMap<&str, &str> = BTreeMap::new();
    let mut queue = VecDeque::from([start]);
    while let Some(m) = queue.pop_front() {
        for next in graph.get(m).into_iter().flatten().map(String::as_str) {
            if next == start {
                // m, back to start through came_from.
                let mut cycle = vec![m];
                while let Some(prev) = cycle.last().and_then(|last| came_from.get(last)) {
                    cycle.push(prev);
                }
                cycle.reverse();
                let first = cycle.iter().enumerate().min_by_key(|(_, name)| **name).map_or(0, |(i, _)| i);
                cycle.rotate_left(first);
                cycle.push(cycle[0]);
                return Some(cycle.join(" -> "));
            }
            if !came_from.contains_key(next) {
                came_from.insert(next, m);
                queue.push_back(next);
            }
        }
    }
    None
}

/// Fails naming every module cycle of the crate whose source is `src`.
fn assert_no_module_cycles(src: &Path) {
    let cycles = module_cycles(src);
    assert!(cycles.is_empty(), "module cycles in {}: {}", src.display(), cycles.join("; "));
}

fn workspace_dir(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative)
}

#[test]
fn cli_modules_depend_one_way() {
    assert_no_module_cycles(&workspace_dir("cli/src"));
}

#[test]
fn qemu_driver_modules_depend_one_way() {
    assert_no_module_cycles(&workspace_dir("drivers/qemu/src"));
}

#[test]
fn lxc_driver_modules_depend_one_way() {
    assert_no_module_cycles(&workspace_dir("drivers/lxc/src"));
}

#[test]
fn vbox_driver_modules_depend_one_way() {
    assert_no_module_cycles(&workspace_dir("drivers/vbox/src"));
}

/// The workspace crates under `drivers/` that `cargo tree` lists as
/// direct normal dependencies of strata-cli, given `features` flags.
fn cli_driver_dependencies(features: &[&str]) -> Vec<String> {
    let workspace = workspace_dir("").canonicalize().expect("workspace dir");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let out = std::process::Command::new(cargo)
        .args(["tree", "-p", "strata-cli", "-e", "normal", "--depth", "1", "--offline"])
        .args(features)
        .current_dir(&workspace)
        .output()
        .expect("run cargo tree");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "cargo tree failed: {text}{}", String::from_utf8_lossy(&out.stderr));
    let drivers = format!("({}/", workspace.join("drivers").display());
    text.lines()
        .filter(|line| line.contains(&drivers))
        .map(|line| line.trim_start_matches(['├', '└', '─', ' ']).to_string())
        .collect()
}

#[test]
fn cli_links_drivers_only_through_their_features() {
    assert_eq!(cli_driver_dependencies(&["--no-default-features"]), Vec::<String>::new());
    let default = cli_driver_dependencies(&[]);
    let named = |prefix: &str| default.iter().filter(|d| d.starts_with(prefix)).cloned().collect::<Vec<_>>();
    let (qemu, lxc, vbox) = (named("strata-qemu "), named("strata-lxc "), named("strata-vbox "));
    assert!(qemu.len() == 1 && lxc.len() == 1 && vbox.len() == 1, "every driver by default: {default:?}");
    assert_eq!(cli_driver_dependencies(&["--no-default-features", "--features", "qemu"]), qemu);
    assert_eq!(cli_driver_dependencies(&["--no-default-features", "--features", "lxc"]), lxc);
    assert_eq!(cli_driver_dependencies(&["--no-default-features", "--features", "vbox"]), vbox);
    assert_eq!(cli_driver_dependencies(&["--features", "qemu,lxc,vbox"]), default);
}

#[test]
fn a_hand_made_cycle_is_found_and_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let src = dir.path();
    let files = [
        ("lib.rs", "mod a;\npub mod b;\nmod c;\nmod d;\nmod e;\n#[cfg(test)]\nmod test_util;\n\npub struct Root;\nfn go() { e::run() }\n"),
        // a -> b -> a, through `crate::` and through a root-level `super::`.
        ("a.rs", "use crate::{b::{self, Two}, c};\npub fn one() {}\n"),
        ("b.rs", "pub struct Two;\nfn f() { super::a::one() }\n"),
        // c -> d only: d's references back are in a comment, a string, a
        // doc link and its tests.
        ("c.rs", "pub fn three() { crate::d::four() }\n"),
        (
            "d.rs",
            "/// Unlike [`crate::c`].\npub fn four() { let _ = \"crate::c::three\"; } // crate::c\n\
             #[cfg(test)]\nmod tests {\n    use crate::c::three;\n}\n",
        ),
        // e -> lib -> e: the root defines what e uses, and calls e.
        ("e/mod.rs", "mod inner;\npub fn run() {}\n"),
        ("e/inner.rs", "fn root() -> crate::Root { super::super::Root }\n"),
        ("test_util.rs", "use crate::a;\n"),
    ];
    for (name, text) in files {
        let path = src.join(name);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("create dir");
        std::fs::write(&path, text).expect("write source");
    }
    assert_eq!(module_cycles(src), ["a -> b -> a", "e -> lib -> e"]);
    let failure = std::panic::catch_unwind(|| assert_no_module_cycles(src)).expect_err("the check fails");
    let message = failure.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("a -> b -> a; e -> lib -> e"), "{message}");

    // Without the references back, the same crate passes.
    std::fs::write(src.join("b.rs"), "pub struct Two;\n").expect("write b.rs");
    std::fs::write(src.join("e/inner.rs"), "fn root() {}\n").expect("write inner.rs");
    assert_no_module_cycles(src);
}

#[test]
fn qemu_block_modules_depend_one_way() {
    assert_no_module_cycles(&workspace_dir("drivers/qemu-block/src"));
}

#[test]
fn engine_modules_depend_one_way() {
    assert_no_module_cycles(&workspace_dir("drivers/engine/src"));
}
