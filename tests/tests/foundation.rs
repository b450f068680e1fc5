//! Foundation tests: the persistent side of the QEMU driver through the real
//! `strata` command, against images made with real qemu-img.
//!
//! Covered: backing-chain probing on define (relative names, missing backing
//! formats, fake headers in raw disks, loops, 10,000-layer chains), chain
//! checks and repairs, the store's locking, preservation of XML Strata does
//! not model, JSON output, batches and error reporting, disks whose images do
//! not exist yet, and disk sets. No guest is ever started.
//!
//! The XML Strata prints is read with a small parser of this file's own (not
//! Strata's), and every document it prints is checked against libvirt's
//! schemas with `virt-xml-validate`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{
    domain_xml, make_chain, qemu_chain, qemu_img, validate_xml, DiskSpec, TestEnv, NVME_DISK, VHOSTUSER_DISK,
    VHOSTVDPA_DISK,
};

// ---------------------------------------------------------------------------
// A minimal XML reader, independent of Strata's own.
// ---------------------------------------------------------------------------

mod xmlq {
    //! Reads the XML documents Strata prints into an arena of elements (no
    //! recursion, so 10,000-deep documents are fine). Comments and
    //! declarations are skipped; whitespace-only text is dropped.

    #[derive(Debug)]
    pub struct El {
        pub name: String,
        pub attrs: Vec<(String, String)>,
        pub kids: Vec<usize>,
        pub text: String,
    }

    #[derive(Debug)]
    pub struct Doc {
        pub els: Vec<El>,
    }

    pub const ROOT: usize = 0;

    impl Doc {
        pub fn parse(s: &str) -> Doc {
            let b = s.as_bytes();
            let mut els: Vec<El> = Vec::new();
            let mut stack: Vec<usize> = Vec::new();
            let mut pos = 0;
            while pos < s.len() {
                let Some(off) = s[pos..].find('<') else {
                    assert!(s[pos..].trim().is_empty(), "text after the root element");
                    break;
                };
                let lt = pos + off;
                let text = &s[pos..lt];
                if !text.trim().is_empty() {
                    let top = *stack.last().expect("text outside any element");
                    els[top].text.push_str(&unescape(text));
                }
                let rest = &s[lt..];
                if rest.starts_with("<?") {
                    pos = lt + rest.find("?>").expect("unterminated declaration") + 2;
                    continue;
                }
                if rest.starts_with("<!--") {
                    pos = lt + rest.find("-->").expect("unterminated comment") + 3;
                    continue;
                }
                if let Some(close) = rest.strip_prefix("</") {
                    let gt = close.find('>').expect("unterminated closing tag");
                    let name = close[..gt].trim();
                    let open = stack.pop().unwrap_or_else(|| panic!("closing tag </{name}> without an open element"));
                    assert_eq!(els[open].name, name, "mismatched closing tag");
                    pos = lt + 2 + gt + 1;
                    continue;
                }
                // A start tag: find its '>' outside quoted attribute values.
                let mut i = lt + 1;
                let mut quote: Option<u8> = None;
                loop {
                    let c = *b.get(i).expect("unterminated start tag");
                    match quote {
                        Some(q) if c == q => quote = None,
                        Some(_) => {}
                        None if c == b'\'' || c == b'"' => quote = Some(c),
                        None if c == b'>' => break,
                        None => {}
                    }
                    i += 1;
                }
                let inner = &s[lt + 1..i];
                let (inner, self_closing) = match inner.strip_suffix('/') {
                    Some(x) => (x, true),
                    None => (inner, false),
                };
                let (name, attrs) = parse_tag(inner);
                let id = els.len();
                els.push(El { name, attrs, kids: Vec::new(), text: String::new() });
                match stack.last() {
                    Some(&parent) => els[parent].kids.push(id),
                    None => assert_eq!(id, ROOT, "more than one root element"),
                }
                if !self_closing {
                    stack.push(id);
                }
                pos = i + 1;
            }
            assert!(stack.is_empty(), "unclosed elements at the end of the document");
            assert!(!els.is_empty(), "empty document");
            Doc { els }
        }

        pub fn name(&self, id: usize) -> &str {
            &self.els[id].name
        }

        pub fn attr(&self, id: usize, name: &str) -> Option<&str> {
            self.els[id].attrs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
        }

        pub fn text(&self, id: usize) -> String {
            self.els[id].text.trim().to_string()
        }

        pub fn kids(&self, id: usize) -> &[usize] {
            &self.els[id].kids
        }

        pub fn kid_names(&self, id: usize) -> Vec<&str> {
            self.kids(id).iter().map(|&k| self.name(k)).collect()
        }

        pub fn children(&self, id: usize, name: &str) -> Vec<usize> {
            self.kids(id).iter().copied().filter(|&k| self.name(k) == name).collect()
        }

        pub fn child(&self, id: usize, name: &str) -> Option<usize> {
            self.children(id, name).into_iter().next()
        }

        /// Elements reached from the root by a path of child names.
        pub fn at(&self, path: &[&str]) -> Vec<usize> {
            let mut cur = vec![ROOT];
            for step in path {
                cur = cur.iter().flat_map(|&id| self.children(id, step)).collect();
            }
            cur
        }

        /// A canonical text of a (shallow) subtree: attributes sorted,
        /// text trimmed, children in order.
        pub fn canon(&self, id: usize) -> String {
            let el = &self.els[id];
            let mut attrs = el.attrs.clone();
            attrs.sort();
            let attrs: Vec<String> = attrs.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
            let kids: Vec<String> = el.kids.iter().map(|&k| self.canon(k)).collect();
            format!("<{} {}>{:?}[{}]", el.name, attrs.join(" "), el.text.trim(), kids.join(","))
        }
    }

    fn parse_tag(inner: &str) -> (String, Vec<(String, String)>) {
        let inner = inner.trim();
        let name_end = inner.find(|c: char| c.is_whitespace()).unwrap_or(inner.len());
        let name = inner[..name_end].to_string();
        let mut rest = inner[name_end..].trim_start();
        let mut attrs = Vec::new();
        while !rest.is_empty() {
            let eq = rest.find('=').unwrap_or_else(|| panic!("attribute without a value in <{name}>"));
            let key = rest[..eq].trim().to_string();
            let after = rest[eq + 1..].trim_start();
            let q = after.chars().next().expect("attribute value");
            assert!(q == '\'' || q == '"', "unquoted attribute value in <{name}>");
            let end = after[1..].find(q).expect("unterminated attribute value") + 1;
            attrs.push((key, unescape(&after[1..end])));
            rest = after[end + 1..].trim_start();
        }
        (name, attrs)
    }

    pub fn unescape(s: &str) -> String {
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        while let Some(amp) = rest.find('&') {
            out.push_str(&rest[..amp]);
            let semi = rest[amp..].find(';').expect("unterminated entity") + amp;
            let ent = &rest[amp + 1..semi];
            match ent {
                "lt" => out.push('<'),
                "gt" => out.push('>'),
                "amp" => out.push('&'),
                "apos" => out.push('\''),
                "quot" => out.push('"'),
                _ => {
                    let code = match ent.strip_prefix("#x") {
                        Some(hex) => u32::from_str_radix(hex, 16).expect("hex entity"),
                        None => ent.strip_prefix('#').expect("known entity").parse().expect("numeric entity"),
                    };
                    out.push(char::from_u32(code).expect("valid character reference"));
                }
            }
            rest = &rest[semi + 1..];
        }
        out.push_str(rest);
        out
    }
}

use xmlq::Doc;

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn stdout_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// Writes `xml` to NAME.xml in the test directory and runs `define` on it,
/// whatever the outcome.
fn try_define(env: &TestEnv, name: &str, xml: &str, extra: &[&str]) -> Output {
    let file = env.path(&format!("{name}.xml"));
    std::fs::write(&file, xml).expect("write domain xml");
    let mut args = vec!["define", p(&file)];
    args.extend_from_slice(extra);
    env.strata(&args)
}

/// `dumpxml` with extra flags; the document is schema-checked and parsed.
fn dumpxml(env: &TestEnv, dom: &str, flags: &[&str]) -> (String, Doc) {
    let mut args = vec!["dumpxml", dom];
    args.extend_from_slice(flags);
    let xml = env.ok(&args);
    validate_xml(&xml);
    let doc = Doc::parse(&xml);
    (xml, doc)
}

/// Names listed by `list --all --name`.
fn domain_names(env: &TestEnv) -> Vec<String> {
    env.ok(&["list", "--all", "--name"]).lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect()
}

/// The `<disk>` element whose target is `target`.
fn disk(doc: &Doc, target: &str) -> usize {
    doc.at(&["devices", "disk"])
        .into_iter()
        .find(|&d| doc.child(d, "target").and_then(|t| doc.attr(t, "dev")) == Some(target))
        .unwrap_or_else(|| panic!("no disk with target '{target}' in the XML"))
}

/// One `<backingStore>` layer as the XML records it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Layer {
    index: Option<String>,
    kind: Option<String>,
    format: Option<String>,
    file: Option<String>,
}

/// What the XML says lies below a disk's active layer.
#[derive(Debug, PartialEq, Eq)]
struct Recorded {
    layers: Vec<Layer>,
    /// Whether the chain ends in an empty `<backingStore/>`; false when it
    /// stops without one (unknown below).
    ends: bool,
}

/// Walks the nested `<backingStore>` elements of a disk, iteratively.
fn recorded_chain(doc: &Doc, disk_el: usize) -> Recorded {
    let mut layers = Vec::new();
    let mut cur = disk_el;
    loop {
        let stores = doc.children(cur, "backingStore");
        match stores.as_slice() {
            [] => return Recorded { layers, ends: false },
            [one] => {
                let one = *one;
                if doc.els[one].attrs.is_empty() && doc.kids(one).is_empty() {
                    return Recorded { layers, ends: true };
                }
                layers.push(Layer {
                    index: doc.attr(one, "index").map(str::to_string),
                    kind: doc.attr(one, "type").map(str::to_string),
                    format: doc.child(one, "format").and_then(|f| doc.attr(f, "type")).map(str::to_string),
                    file: doc.child(one, "source").and_then(|s| doc.attr(s, "file")).map(str::to_string),
                });
                cur = one;
            }
            more => panic!("{} sibling <backingStore> elements in one chain", more.len()),
        }
    }
}

fn disk_source(doc: &Doc, disk_el: usize) -> Option<String> {
    doc.child(disk_el, "source").and_then(|s| doc.attr(s, "file")).map(str::to_string)
}

fn disk_format(doc: &Doc, disk_el: usize) -> Option<String> {
    doc.child(disk_el, "driver").and_then(|d| doc.attr(d, "type")).map(str::to_string)
}

/// Expected backing layers, numbered 1.. below the active layer.
fn file_layers(layers: &[(&Path, &str)]) -> Vec<Layer> {
    layers
        .iter()
        .enumerate()
        .map(|(i, (path, format))| Layer {
            index: Some((i + 1).to_string()),
            kind: Some("file".to_string()),
            format: Some(format.to_string()),
            file: Some(p(path).to_string()),
        })
        .collect()
}

/// Asserts a disk's active layer and complete chain.
fn assert_chain(doc: &Doc, target: &str, top: &Path, top_format: &str, below: &[(&Path, &str)]) {
    let d = disk(doc, target);
    assert_eq!(disk_source(doc, d).as_deref(), Some(p(top)), "active layer of {target}");
    assert_eq!(disk_format(doc, d).as_deref(), Some(top_format), "driver type of {target}");
    assert_eq!(
        recorded_chain(doc, d),
        Recorded { layers: file_layers(below), ends: true },
        "backing chain of {target}"
    );
}

/// The chain as qemu-img sees it, compared with what the XML records for a
/// disk: same files, same formats, same order.
fn assert_matches_qemu(doc: &Doc, target: &str, top: &Path) {
    let d = disk(doc, target);
    let rec = recorded_chain(doc, d);
    assert!(rec.ends, "chain of {target} should be complete");
    let mut ours = vec![(disk_source(doc, d).expect("disk source"), disk_format(doc, d).expect("disk format"))];
    ours.extend(
        rec.layers.iter().map(|l| (l.file.clone().expect("layer file"), l.format.clone().expect("layer format"))),
    );
    assert_eq!(ours, qemu_chain(top), "Strata's chain of {target} vs qemu-img's");
}

/// Turns the backing-format header extension of a qcow2 image into an
/// unknown (ignored) extension, as if the image had been made by an old
/// qemu-img without -F. qemu-img 7.2 refuses to create such images.
fn strip_backing_format(path: &Path) {
    let mut bytes = std::fs::read(path).expect("read qcow2");
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"));
    assert_eq!(&bytes[..4], b"QFI\xfb", "not a qcow2 image");
    assert_eq!(be32(&bytes, 4), 3, "expected a qcow2 version 3 image");
    let mut at = be32(&bytes, 100) as usize; // header length: extensions follow
    loop {
        let kind = be32(&bytes, at);
        let len = be32(&bytes, at + 4) as usize;
        assert_ne!(kind, 0, "no backing format extension in {}", path.display());
        if kind == 0xe279_2aca {
            bytes[at..at + 4].copy_from_slice(&0x5354_5241u32.to_be_bytes()); // "STRA": unknown
            break;
        }
        at += 8 + len.next_multiple_of(8);
    }
    std::fs::write(path, bytes).expect("write qcow2");
    let info = qemu_img(&["info", "-U", p(path)]);
    assert!(info.contains("backing file:"), "{info}");
    assert!(!info.contains("backing file format"), "backing format still recorded:\n{info}");
}

/// `qemu-img info --output=json` of one image (no chain).
fn qemu_info(path: &Path) -> serde_json::Value {
    serde_json::from_str(&qemu_img(&["info", "-U", "--output=json", p(path)])).expect("qemu-img json")
}

fn raw_image(path: &Path) {
    qemu_img(&["create", "-q", "-f", "raw", p(path), "1M"]);
}

/// A domain named `name` over the given single qcow2/raw top image.
fn one_disk_domain(name: &str, top: &Path, format: &str) -> String {
    domain_xml(name, &[DiskSpec { target: "vda", format, path: top, extra: "" }])
}

/// Runs strata, killing it (and reporting None) if it does not end in time.
fn strata_with_timeout(env: &TestEnv, args: &[&str], limit: Duration) -> Option<Output> {
    let mut child = env.spawn(args);
    let start = Instant::now();
    loop {
        if child.try_wait().expect("poll strata").is_some() {
            return Some(child.wait_with_output().expect("strata output"));
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Builds a chain of `depth` qcow2 overlays over one base in `dir`:
/// l00000.qcow2 (top) ← … where l{i} names l{i+1} (format qcow2) and
/// l{depth} is the base. Overlays are copies of one qemu-img-made template
/// whose backing-name bytes are patched (same length), which is fast.
/// Returns the paths, top first.
fn build_deep_chain(dir: &Path, depth: usize) -> Vec<PathBuf> {
    assert!(depth <= 99_999);
    let name = |i: usize| format!("l{i:05}.qcow2");
    let base = dir.join(name(depth));
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", "cluster_size=512", p(&base), "1M"]);
    let template = dir.join("template.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=512",
        "-u",
        "-b",
        &name(1),
        "-F",
        "qcow2",
        p(&template),
        "1M",
    ]);
    let bytes = std::fs::read(&template).expect("read template");
    let offset = u64::from_be_bytes(bytes[8..16].try_into().expect("8 bytes")) as usize;
    let len = u32::from_be_bytes(bytes[16..20].try_into().expect("4 bytes")) as usize;
    assert_eq!(&bytes[offset..offset + len], name(1).as_bytes(), "template backing name");
    std::fs::remove_file(&template).expect("remove template");
    let mut paths = Vec::with_capacity(depth + 1);
    for i in 0..depth {
        let mut layer = bytes.clone();
        layer[offset..offset + len].copy_from_slice(name(i + 1).as_bytes());
        let path = dir.join(name(i));
        std::fs::write(&path, &layer).expect("write layer");
        paths.push(path);
    }
    paths.push(base);
    paths
}

// ---------------------------------------------------------------------------
// 1. Probing on define
// ---------------------------------------------------------------------------

#[test]
fn define_probes_three_deep_relative_chain() {
    let env = TestEnv::new();
    let chain = make_chain(env.dir.path(), &["base.qcow2", "mid.qcow2", "top.qcow2"]);
    let (base, mid, top) = (&chain[0], &chain[1], &chain[2]);
    // The headers hold relative names: Strata must resolve them.
    assert_eq!(qemu_info(top)["backing-filename"], "mid.qcow2");
    let data = env.path("data.raw");
    raw_image(&data);
    let xml = domain_xml(
        "vm1",
        &[
            DiskSpec { target: "vda", format: "qcow2", path: top, extra: "" },
            DiskSpec { target: "vdb", format: "raw", path: &data, extra: "" },
        ],
    );
    assert!(!xml.contains("backingStore"));
    env.define("vm1", &xml);

    for flags in [&[][..], &["--inactive"][..]] {
        let (text, doc) = dumpxml(&env, "vm1", flags);
        assert_chain(&doc, "vda", top, "qcow2", &[(mid, "qcow2"), (base, "qcow2")]);
        assert_matches_qemu(&doc, "vda", top);
        // The raw disk ends at once, right after its source.
        let vdb = disk(&doc, "vdb");
        assert_eq!(recorded_chain(&doc, vdb), Recorded { layers: vec![], ends: true }, "{text}");
        let names = doc.kid_names(vdb);
        let src = names.iter().position(|n| *n == "source").expect("source");
        assert_eq!(names.get(src + 1), Some(&"backingStore"), "{names:?}");
    }

    // What dumpxml prints can be defined again and comes back the same.
    let (first, _) = dumpxml(&env, "vm1", &[]);
    env.define("vm1-again", &first);
    let (second, _) = dumpxml(&env, "vm1", &[]);
    assert_eq!(first, second);
}

/// A backing name with QEMU's `file:` prefix is the file QEMU opens: the
/// rest of the name, taken literally (colons too). A relative rest, which
/// QEMU opens from its own working directory rather than the image's, is
/// refused.
#[test]
fn file_prefixed_backing_names_are_the_files_qemu_opens() {
    let env = TestEnv::new();
    let base = env.path("base.qcow2");
    let colon = env.path("b:c.qcow2");
    for image in [&base, &colon] {
        qemu_img(&["create", "-q", "-f", "qcow2", p(image), "1M"]);
    }
    std::fs::create_dir(env.path("sub")).expect("mkdir sub");
    let overlay = |name: &str, backing: &str| {
        let path = env.path(&format!("sub/{name}"));
        qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-F", "qcow2", "-b", backing, p(&path), "1M"]);
        path
    };
    let abs = overlay("abs.qcow2", &format!("file:{}", p(&base)));
    let with_colon = overlay("colon.qcow2", &format!("file:{}", p(&colon)));
    let relative = overlay("rel.qcow2", "file:base.qcow2");

    let xml = domain_xml(
        "fp",
        &[
            DiskSpec { target: "vda", format: "qcow2", path: &abs, extra: "" },
            DiskSpec { target: "vdb", format: "qcow2", path: &with_colon, extra: "" },
        ],
    );
    env.define("fp", &xml);
    let (_, doc) = dumpxml(&env, "fp", &[]);
    assert_chain(&doc, "vda", &abs, "qcow2", &[(&base, "qcow2")]);
    assert_matches_qemu(&doc, "vda", &abs);
    assert_chain(&doc, "vdb", &with_colon, "qcow2", &[(&colon, "qcow2")]);
    assert_matches_qemu(&doc, "vdb", &with_colon);

    let out = try_define(&env, "fr", &one_disk_domain("fr", &relative, "qcow2"), &[]);
    assert_eq!(out.status.code(), Some(1), "a relative file: name was accepted: {out:?}");
    let err = stderr_of(&out);
    assert!(err.contains("'file:base.qcow2'") && err.contains("relative file after 'file:'"), "{err}");
    assert_eq!(domain_names(&env), ["fp"]);
}

#[test]
fn seed000_missing_backing_format_is_refused_with_fix() {
    let env = TestEnv::new();
    let base = env.path("base.qcow2");
    let mid = env.path("mid.qcow2");
    let top = env.path("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&base), "64M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", p(&mid)]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", p(&top)]);
    strip_backing_format(&top);
    assert!(qemu_info(&top).get("backing-filename-format").is_none());

    let out = try_define(&env, "vm", &one_disk_domain("vm", &top, "qcow2"), &[]);
    assert_eq!(out.status.code(), Some(1), "define must be refused: {}", stdout_of(&out));
    let err = stderr_of(&out);
    assert!(err.starts_with("error:"), "{err}");
    assert!(err.contains(p(&top)), "names the top image: {err}");
    assert!(err.contains(p(&mid)), "names the backing image: {err}");
    // What QEMU would do: probe mid and go on to open base.
    assert!(err.contains("QEMU") && err.to_lowercase().contains("probe"), "{err}");
    assert!(err.contains("base.qcow2"), "says QEMU would open base: {err}");
    assert!(!domain_names(&env).contains(&"vm".to_string()));

    let expected_fix = format!("qemu-img rebase -u -F qcow2 -b mid.qcow2 {}", top.display());
    assert!(err.contains(&expected_fix), "exact fix missing; expected `{expected_fix}` in:\n{err}");
    // Run the command exactly as printed.
    let start = err.find("qemu-img rebase").expect("fix command");
    let line = err[start..].lines().next().expect("fix line").trim();
    let words: Vec<&str> = line.split_whitespace().collect();
    let status = Command::new(words[0]).args(&words[1..]).status().expect("run the fix");
    assert!(status.success(), "the printed fix failed: {line}");
    assert_eq!(qemu_info(&top)["backing-filename-format"], "qcow2");

    env.define("vm", &one_disk_domain("vm", &top, "qcow2"));
    let (_, doc) = dumpxml(&env, "vm", &[]);
    assert_chain(&doc, "vda", &top, "qcow2", &[(&mid, "qcow2"), (&base, "qcow2")]);
    assert_matches_qemu(&doc, "vda", &top);
}

#[test]
fn raw_disk_with_fake_qcow2_header_is_never_followed() {
    let env = TestEnv::new();
    // A raw disk whose guest wrote a qcow2 header naming /etc/shadow.
    let fake = env.path("fake.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", "/etc/shadow", "-F", "raw", p(&fake), "1M"]);
    let disk_raw = env.path("disk.raw");
    std::fs::copy(&fake, &disk_raw).expect("copy header into the raw disk");
    // The trap is real: probing the file finds qcow2 with that backing file.
    assert_eq!(qemu_info(&disk_raw)["backing-filename"], "/etc/shadow");

    // (a) The raw disk itself, with type='raw' and with no driver type.
    let xml = domain_xml(
        "rawvm",
        &[
            DiskSpec { target: "vda", format: "raw", path: &disk_raw, extra: "" },
            DiskSpec { target: "vdb", format: "NOTYPE", path: &disk_raw, extra: "" },
        ],
    )
    .replace("      <driver name='qemu' type='NOTYPE'/>\n", "");
    let out = try_define(&env, "rawvm", &xml, &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("warning:"), "no driver type deserves a warning");
    let (text, doc) = dumpxml(&env, "rawvm", &[]);
    assert!(!text.contains("/etc/shadow"), "{text}");
    for target in ["vda", "vdb"] {
        let d = disk(&doc, target);
        assert_eq!(recorded_chain(&doc, d), Recorded { layers: vec![], ends: true }, "{target}");
        let names = doc.kid_names(d);
        let src = names.iter().position(|n| *n == "source").expect("source");
        assert_eq!(names.get(src + 1), Some(&"backingStore"), "{target}: {names:?}");
    }
    let out = env.ok(&["domblklist", "rawvm", "--json"]);
    assert!(!out.contains("/etc/shadow"), "{out}");

    // (b) A qcow2 top recording the raw disk as raw: the chain stops there.
    let top_raw = env.path("top-raw.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", "disk.raw", "-F", "raw", p(&top_raw), "1M"]);
    env.define("qraw", &one_disk_domain("qraw", &top_raw, "qcow2"));
    let (text, doc) = dumpxml(&env, "qraw", &[]);
    assert!(!text.contains("/etc/shadow"), "{text}");
    assert_chain(&doc, "vda", &top_raw, "qcow2", &[(&disk_raw, "raw")]);
    assert_matches_qemu(&doc, "vda", &top_raw);

    // (c) A qcow2 top naming the raw disk without a format: QEMU would
    // probe it, find qcow2 and open /etc/shadow. Refused.
    let top_probe = env.path("top-probe.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", "disk.raw", "-F", "raw", p(&top_probe), "1M"]);
    strip_backing_format(&top_probe);
    let out = try_define(&env, "qprobe", &one_disk_domain("qprobe", &top_probe, "qcow2"), &[]);
    assert_eq!(out.status.code(), Some(1), "must be refused: {}", stdout_of(&out));
    let err = stderr_of(&out);
    assert!(err.starts_with("error:") && err.contains(p(&disk_raw)), "{err}");
    assert!(!domain_names(&env).contains(&"qprobe".to_string()));
    let out = env.strata(&["dumpxml", "qprobe"]);
    assert_eq!(out.status.code(), Some(1));

    // Controls: an unrecorded format is probed when that is safe — a plain
    // qcow2 without a backing file, or a file that is raw by content.
    let plain = env.path("plain.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&plain), "1M"]);
    let zeros = env.path("zeros.img");
    raw_image(&zeros);
    for (name, backing, format) in [("ok-qcow2", &plain, "qcow2"), ("ok-raw", &zeros, "raw")] {
        let top = env.path(&format!("{name}.qcow2"));
        let backing_name = backing.file_name().and_then(|n| n.to_str()).expect("name");
        qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-b", backing_name, "-F", format, p(&top), "1M"]);
        strip_backing_format(&top);
        env.define(name, &one_disk_domain(name, &top, "qcow2"));
        let (_, doc) = dumpxml(&env, name, &[]);
        assert_chain(&doc, "vda", &top, "qcow2", &[(backing, format)]);
    }
}

#[test]
fn self_reference_and_two_image_cycle_are_errors() {
    let env = TestEnv::new();
    let selfie = env.path("self.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&selfie), "1M"]);
    qemu_img(&["rebase", "-u", "-b", "self.qcow2", "-F", "qcow2", p(&selfie)]);
    assert_eq!(qemu_info(&selfie)["backing-filename"], "self.qcow2");

    let a = env.path("a.qcow2");
    let b = env.path("b.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&a), "1M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", p(&b)]);
    qemu_img(&["rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", p(&a)]);

    let out = try_define(&env, "loop-self", &one_disk_domain("loop-self", &selfie, "qcow2"), &[]);
    assert_eq!(out.status.code(), Some(1), "self loop must be refused");
    let err = stderr_of(&out);
    assert!(err.starts_with("error:") && err.contains(p(&selfie)), "{err}");
    assert!(err.contains("itself") || err.contains("loop") || err.contains("cycle"), "names the loop: {err}");

    for (name, top) in [("loop-a", &a), ("loop-b", &b)] {
        let out = try_define(&env, name, &one_disk_domain(name, top, "qcow2"), &[]);
        assert_eq!(out.status.code(), Some(1), "{name}: cycle must be refused");
        let err = stderr_of(&out);
        assert!(err.contains(p(&a)) && err.contains(p(&b)), "both images of the loop named: {err}");
        assert!(err.contains("loop") || err.contains("cycle"), "{err}");
    }

    let names = domain_names(&env);
    for name in ["loop-self", "loop-a", "loop-b"] {
        assert!(!names.contains(&name.to_string()), "{name} was defined: {names:?}");
        let err = env.fails(&["dominfo", name]);
        assert!(err.contains(&format!("error: failed to get domain '{name}'")), "{err}");
    }
}

#[test]
fn ten_thousand_deep_chain_is_probed() {
    const DEPTH: usize = 10_000;
    let env = TestEnv::new();
    let started = Instant::now();
    let paths = build_deep_chain(env.dir.path(), DEPTH);
    // qemu-img agrees on a few layers, and on the bottom of the chain.
    for i in [0, 1, 4_999, DEPTH - 1] {
        let info = qemu_info(&paths[i]);
        assert_eq!(info["format"], "qcow2");
        assert_eq!(info["backing-filename"], format!("l{:05}.qcow2", i + 1));
        assert_eq!(info["backing-filename-format"], "qcow2");
    }
    assert!(qemu_info(&paths[DEPTH]).get("backing-filename").is_none());
    let tail = qemu_chain(&paths[DEPTH - 10]);
    assert_eq!(tail.len(), 11);
    assert_eq!(tail[10].0, p(&paths[DEPTH]));
    eprintln!("built {DEPTH} layers in {:?}", started.elapsed());

    // libxml2 (and so virt-xml-validate) refuses documents nested deeper
    // than 256 elements, so the schema check runs on a 200-layer suffix of
    // the same chain. (Defined first: define reads every other definition.)
    let top200 = &paths[DEPTH - 200];
    env.define("deep200", &one_disk_domain("deep200", top200, "qcow2"));
    let (_, doc) = dumpxml(&env, "deep200", &[]);
    let below: Vec<(&Path, &str)> = paths[DEPTH - 199..].iter().map(|p| (p.as_path(), "qcow2")).collect();
    assert_chain(&doc, "vda", top200, "qcow2", &below);

    let t = Instant::now();
    env.define("deep", &one_disk_domain("deep", &paths[0], "qcow2"));
    eprintln!("define: {:?}", t.elapsed());
    let t = Instant::now();
    let xml = dumpxml_unindented(&env, "deep");
    eprintln!("dumpxml: {:?}", t.elapsed());
    let doc = Doc::parse(&xml);
    let d = disk(&doc, "vda");
    assert_eq!(disk_source(&doc, d).as_deref(), Some(p(&paths[0])));
    let rec = recorded_chain(&doc, d);
    assert!(rec.ends, "the chain must end in <backingStore/>");
    assert_eq!(rec.layers.len(), DEPTH);
    for (i, layer) in rec.layers.iter().enumerate() {
        let want = Layer {
            index: Some((i + 1).to_string()),
            kind: Some("file".into()),
            format: Some("qcow2".into()),
            file: Some(p(&paths[i + 1]).to_string()),
        };
        assert_eq!(layer, &want, "layer {}", i + 1);
    }
    eprintln!("whole test: {:?}", started.elapsed());
}

/// `dumpxml` with each line's indentation removed on the way (by sed, as
/// the indentation of a 10,000-deep document is hundreds of MB that this
/// unoptimised test build would crawl through).
fn dumpxml_unindented(env: &TestEnv, dom: &str) -> String {
    let mut strata = Command::new(env!("CARGO_BIN_EXE_strata-test-cli"))
        .args(["-c", &env.uri, "dumpxml", dom])
        .env_remove("STRATA_LOG")
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn strata");
    let pipe = strata.stdout.take().expect("strata stdout");
    let sed = Command::new("sed").arg("s/^[[:space:]]*//").stdin(Stdio::from(pipe)).output().expect("run sed");
    let status = strata.wait().expect("wait strata");
    assert!(status.success(), "dumpxml {dom} failed: {status}");
    assert!(sed.status.success());
    String::from_utf8(sed.stdout).expect("utf-8 XML")
}

/// The XML of a chain of N layers must grow like N, not N²: a 10,000-layer
/// chain is recorded in every definition and re-read by every command
/// (even `list`).
#[test]
fn deep_chain_xml_grows_linearly_with_depth() {
    let env = TestEnv::new();
    let paths = build_deep_chain(env.dir.path(), 2_000);
    env.define("d1000", &one_disk_domain("d1000", &paths[1_000], "qcow2"));
    env.define("d2000", &one_disk_domain("d2000", &paths[0], "qcow2"));
    let small = env.ok(&["dumpxml", "d1000"]);
    let large = env.ok(&["dumpxml", "d2000"]);
    assert_eq!(small.matches("<backingStore").count(), 1_001);
    assert_eq!(large.matches("<backingStore").count(), 2_001);
    let ratio = large.len() as f64 / small.len() as f64;
    assert!(
        ratio < 2.5,
        "doubling the chain depth multiplied the XML size by {ratio:.2} ({} -> {} bytes, {} bytes per layer at 2,000 layers); \
         at 10,000 layers that is hundreds of MB",
        small.len(),
        large.len(),
        large.len() / 2_000
    );
}

// ---------------------------------------------------------------------------
// 2. Checking and repairing recorded chains
// ---------------------------------------------------------------------------

#[test]
fn domblkcheck_detects_rebase_behind_back_and_fix_repairs() {
    let env = TestEnv::new();
    let chain = make_chain(env.dir.path(), &["base.qcow2", "mid.qcow2", "top.qcow2"]);
    let (base, mid, top) = (&chain[0], &chain[1], &chain[2]);
    let data = env.path("data.raw");
    raw_image(&data);
    let xml = domain_xml(
        "vm",
        &[
            DiskSpec { target: "vda", format: "qcow2", path: top, extra: "" },
            DiskSpec { target: "vdb", format: "raw", path: &data, extra: "" },
        ],
    );
    env.define("vm", &xml);
    env.ok(&["domblkcheck", "vm"]);

    // Someone drops mid from the chain behind Strata's back.
    qemu_img(&["rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", p(top)]);
    assert_eq!(qemu_chain(top).len(), 2);

    let out = env.strata(&["domblkcheck", "vm"]);
    assert_eq!(out.status.code(), Some(1), "mismatch must fail: {}", stdout_of(&out));
    assert!(stderr_of(&out).contains("error: backing chain mismatch"), "{}", stderr_of(&out));
    let report = stdout_of(&out);
    let vda_lines: Vec<&str> = report.lines().filter(|l| l.starts_with("vda")).collect();
    assert!(!vda_lines.is_empty(), "{report}");
    assert!(vda_lines.iter().any(|l| l.contains(p(mid))), "the dropped layer is named: {report}");
    let json_out = env.strata(&["domblkcheck", "vm", "--json"]);
    assert_eq!(json_out.status.code(), Some(1));
    let checks: serde_json::Value = serde_json::from_str(&stdout_of(&json_out)).expect("domblkcheck json");
    let vda = checks.as_array().expect("array").iter().find(|c| c["disk"] == "vda").expect("vda check");
    assert!(!vda["differences"].as_array().expect("differences").is_empty());
    let vdb = checks.as_array().expect("array").iter().find(|c| c["disk"] == "vdb").expect("vdb check");
    assert!(vdb["differences"].as_array().expect("differences").is_empty());

    // Checking changes nothing.
    let (_, doc) = dumpxml(&env, "vm", &[]);
    assert_chain(&doc, "vda", top, "qcow2", &[(mid, "qcow2"), (base, "qcow2")]);

    let out = env.strata(&["domblkcheck", "vm", "--fix"]);
    assert_eq!(out.status.code(), Some(0), "--fix repairs: {}", stderr_of(&out));
    let (_, doc) = dumpxml(&env, "vm", &[]);
    assert_chain(&doc, "vda", top, "qcow2", &[(base, "qcow2")]);
    assert_matches_qemu(&doc, "vda", top);
    assert_eq!(recorded_chain(&doc, disk(&doc, "vdb")), Recorded { layers: vec![], ends: true });
    let (_, doc) = dumpxml(&env, "vm", &["--inactive"]);
    assert_chain(&doc, "vda", top, "qcow2", &[(base, "qcow2")]);
    env.ok(&["domblkcheck", "vm"]);
}

// ---------------------------------------------------------------------------
// 3. The store
// ---------------------------------------------------------------------------

#[test]
fn concurrent_processes_lose_no_update() {
    const TARGETS: [&str; 8] = ["vda", "vdb", "vdc", "vdd", "vde", "vdf", "vdg", "vdh"];
    let env = TestEnv::new();
    let files: Vec<PathBuf> = TARGETS.iter().map(|t| env.path(&format!("{t}.raw"))).collect();
    for f in &files {
        raw_image(f);
    }
    let specs: Vec<DiskSpec> =
        TARGETS.iter().zip(&files).map(|(t, f)| DiskSpec { target: t, format: "raw", path: f, extra: "" }).collect();
    env.define("vm", &domain_xml("vm", &specs));

    let selected = |env: &TestEnv| -> Vec<String> {
        let list: Vec<String> =
            serde_json::from_str(&env.ok(&["diskset-list", "vm", "--json"])).expect("diskset-list json");
        list
    };
    let run_all = |cmd: &str| {
        let children: Vec<_> = TARGETS.iter().map(|t| env.spawn(&[cmd, "vm", t])).collect();
        for (t, child) in TARGETS.iter().zip(children) {
            let out = child.wait_with_output().expect("wait strata");
            assert!(out.status.success(), "{cmd} {t}: {}", stderr_of(&out));
        }
    };
    for round in 0..5 {
        run_all("diskset-add");
        assert_eq!(selected(&env), TARGETS, "round {round}: an add was lost");
        run_all("diskset-remove");
        assert!(selected(&env).is_empty(), "round {round}: a remove was lost: {:?}", selected(&env));
    }
    let (_, doc) = dumpxml(&env, "vm", &[]);
    assert_eq!(doc.at(&["devices", "disk"]).len(), 8);
}

#[test]
fn undefine_removes_domain() {
    let env = TestEnv::new();
    let data = env.path("data.raw");
    raw_image(&data);
    env.define("gone", &one_disk_domain("gone", &data, "raw"));
    env.define("stays", &one_disk_domain("stays", &data, "raw"));
    let out = strata_with_timeout(&env, &["undefine", "gone"], Duration::from_secs(10))
        .expect("`undefine gone` did not finish within 10 s (hung)");
    assert!(out.status.success(), "{}", stderr_of(&out));
    assert_eq!(domain_names(&env), ["stays"]);
    let err = env.fails(&["dumpxml", "gone"]);
    assert!(err.contains("error: failed to get domain 'gone'"), "{err}");
    let out = strata_with_timeout(&env, &["undefine", "gone"], Duration::from_secs(10))
        .expect("`undefine` of an unknown domain did not finish within 10 s (hung)");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("error: failed to get domain 'gone'"), "{}", stderr_of(&out));
}

/// Every file an XML argument names is refused, before it is read in full,
/// when it is not a regular file or is over the 10 MiB limit, and a document
/// of too many elements is refused as soon as the count is passed (before,
/// `define /dev/zero` read until the kernel killed it, a FIFO with no writer
/// hung, and 10 MiB of empty elements was stored for every later `list` to
/// parse).
#[test]
fn xml_files_are_bounded() {
    let env = TestEnv::new();
    let data = env.path("data.raw");
    raw_image(&data);
    env.define("vm", &one_disk_domain("vm", &data, "raw"));
    let fifo = env.path("fifo.xml");
    let made = Command::new("mkfifo").arg(&fifo).status().expect("run mkfifo");
    assert!(made.success());
    let big = env.path("big.xml");
    let padding = " ".repeat(10 * 1024 * 1024);
    std::fs::write(&big, one_disk_domain("big", &data, "raw").replace("</domain>", &format!("{padding}</domain>")))
        .expect("write");
    let flood = env.path("flood.xml");
    let elements = "<x/>".repeat(10 * 1024 * 1024 / 4 - 1024);
    std::fs::write(
        &flood,
        one_disk_domain("flood", &data, "raw").replace("</domain>", &format!("{elements}</domain>")),
    )
    .expect("write");

    // Each with a hang guard: a FIFO nobody writes blocks a plain open.
    let refused = |args: &[&str], why: &str| {
        let out = strata_with_timeout(&env, args, Duration::from_secs(60))
            .unwrap_or_else(|| panic!("strata {args:?} did not end within 60 s"));
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", stdout_of(&out));
        let err = stderr_of(&out);
        assert!(err.starts_with("error: ") && err.contains(why), "{args:?}: {err}");
    };
    refused(&["define", p(&fifo)], "it is a FIFO, not a regular file");
    refused(&["define", p(env.dir.path())], "it is a directory, not a regular file");
    refused(&["define", p(&big)], "larger than 10 MiB");
    refused(
        &["define", p(&flood)],
        "error: XML error: the document has more than 250000 elements, attributes and comments",
    );
    refused(&["define", "/dev/zero"], "it is a character device, not a regular file");
    refused(&["snapshot-create", "vm", p(&fifo)], "it is a FIFO");
    refused(&["blockcopy", "vm", "vda", "--xml", p(&fifo)], "it is a FIFO");
    assert_eq!(domain_names(&env), ["vm"]);
    assert!(env.ok(&["snapshot-list", "vm", "--name"]).trim().is_empty());
}

/// A directory the store makes (a new domain's; the one its first
/// snapshot's record goes in) is synced into its parent before a record is
/// renamed into it: a crash could otherwise lose the directory, and the
/// record with it, after the command said it was done.
#[test]
fn a_new_store_directory_is_synced_into_its_parent_before_a_record_goes_in() {
    let env = TestEnv::new();
    let data = env.path("data.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", p(&data), "16M"]);
    let xml = env.path("vm.xml");
    std::fs::write(&xml, one_disk_domain("vm", &data, "qcow2")).expect("write xml");
    // (call, its first path, rename's target) of each call that succeeded.
    let traced = |args: &[&str]| -> Vec<(String, String, String)> {
        let log = env.path("dirs.strace");
        let cli = env.command(args);
        let mut strace = Command::new("strace");
        strace.args(["-f", "-qq", "-y", "-e", "trace=mkdir,fsync,rename", "-o", p(&log)]).arg(cli.get_program());
        let out = strace.args(cli.get_args()).env_remove("STRATA_LOG").output().expect("run strata under strace");
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        common::strace_calls(&std::fs::read_to_string(&log).expect("strace log"))
    };
    let check = |calls: &[(String, String, String)], made: &Path, record: &Path| {
        let at = |call: &str, path: &Path, target: bool| {
            calls.iter().position(|(c, first, to)| c == call && (if target { to } else { first }) == p(path))
        };
        let mkdir = at("mkdir", made, false).unwrap_or_else(|| panic!("{} was not made: {calls:?}", made.display()));
        let parent = made.parent().expect("a parent");
        let synced = calls[mkdir..].iter().position(|(c, first, _)| c == "fsync" && first == p(parent));
        let renamed = at("rename", record, true).unwrap_or_else(|| panic!("{} was not written", record.display()));
        let synced =
            synced.map(|i| i + mkdir).unwrap_or_else(|| panic!("{} was not synced: {calls:?}", parent.display()));
        assert!(synced < renamed, "{} went in before {} was synced: {calls:?}", record.display(), made.display());
    };

    env.ok(&["list", "--all"]);
    let dir = env.state_root().join("domains").join("vm");
    check(&traced(&["define", p(&xml)]), &dir, &dir.join("domain.xml"));
    let snapshots = dir.join("snapshots");
    check(&traced(&["snapshot-create-as", "vm", "s1", "--disk-only"]), &snapshots, &snapshots.join("s1.xml"));
    // A directory already there is not synced again.
    let again = traced(&["snapshot-create-as", "vm", "s2", "--disk-only"]);
    assert!(!again.iter().any(|(c, _, _)| c == "mkdir"), "{again:?}");
}

/// The table row of `list --all` for a domain: its columns.
fn list_row(env: &TestEnv, name: &str) -> Vec<String> {
    let table = env.ok(&["list", "--all"]);
    let row = table.lines().map(|l| l.split_whitespace().collect::<Vec<_>>()).find(|cols| cols.get(1) == Some(&name));
    row.unwrap_or_else(|| panic!("'{name}' not listed:\n{table}")).into_iter().map(str::to_string).collect()
}

/// A definition that is empty, garbage, too large or names another domain
/// is shown as damaged (with its path and why) while every other domain
/// lists and defines as before; `undefine` removes it and `define`
/// replaces it (before, it made `list --all`, `undefine` and every
/// `define` fail).
#[test]
fn damaged_definition_is_listed_alone_and_can_be_removed_or_replaced() {
    let env = TestEnv::new();
    let data = env.path("data.raw");
    raw_image(&data);
    for name in ["a", "b", "c"] {
        env.define(name, &one_disk_domain(name, &data, "raw"));
    }
    let stored = env.state_root().join("domains").join("b").join("domain.xml");
    let oversized = format!("{}{}", one_disk_domain("b", &data, "raw"), " ".repeat(11 * 1024 * 1024));
    let damages: [(&[u8], &str); 4] = [
        (b"", "empty XML document"),
        (b"\xff\xfe not XML <<<", "cannot read"),
        (oversized.as_bytes(), "larger than 10 MiB"),
        (b"<domain type='qemu'><name>other</name></domain>", "it defines domain 'other'"),
    ];
    let mut names = vec!["a".to_string(), "b".to_string(), "c".to_string()];
    for (i, (content, why)) in damages.iter().enumerate() {
        std::fs::write(&stored, content).expect("damage domain.xml");
        let out = env.strata(&["list", "--all"]);
        assert!(out.status.success(), "{why}: {}", stderr_of(&out));
        let warning = stderr_of(&out);
        assert!(warning.starts_with("warning: ") && warning.contains(p(&stored)) && warning.contains(why), "{warning}");
        assert_eq!(list_row(&env, "a")[2..], ["shut", "off"]);
        assert_eq!(list_row(&env, "b")[2..], ["damaged"]);
        assert_eq!(domain_names(&env), names);
        let listed: serde_json::Value = serde_json::from_str(&env.ok(&["--json", "list", "--all"])).expect("list json");
        let b = listed.as_array().expect("array").iter().find(|d| d["name"] == "b").expect("b listed");
        assert_eq!(b["state"], "damaged");
        assert!(b["damaged"].as_str().is_some_and(|r| r.contains(p(&stored)) && r.contains(why)), "{b}");

        let err = env.fails(&["dominfo", "b"]);
        assert!(err.contains(p(&stored)) && err.contains(why), "{err}");
        let err = env.fails(&["dumpxml", "b"]);
        assert!(err.contains(p(&stored)) && err.contains(why), "{err}");
        // Other domains define (their UUIDs checked against the rest).
        let other = format!("d{i}");
        env.define(&other, &one_disk_domain(&other, &data, "raw"));
        names.push(other);

        let file = env.path("b.xml");
        let out = env.strata(&["define", p(&file)]);
        assert!(out.status.success(), "{}", stderr_of(&out));
        let warning = stderr_of(&out);
        assert!(warning.contains("replacing the damaged definition") && warning.contains(why), "{warning}");
        assert_eq!(list_row(&env, "b")[2..], ["shut", "off"]);
        let (_, doc) = dumpxml(&env, "b", &[]);
        assert_eq!(disk_source(&doc, disk(&doc, "vda")).as_deref(), Some(p(&data)));
    }
    std::fs::write(&stored, "").expect("damage domain.xml");
    env.ok(&["undefine", "b"]);
    assert_eq!(domain_names(&env), ["a", "c", "d0", "d1", "d2", "d3"]);
    assert!(!stored.exists());
}

/// A damaged domain with snapshots keeps today's rule: its snapshot
/// records go only with `--snapshots-metadata`, and never an image.
#[test]
fn damaged_definition_with_snapshots_needs_snapshots_metadata_to_go() {
    let env = TestEnv::new();
    let chain = make_chain(env.dir.path(), &["base.qcow2", "top.qcow2"]);
    env.define("vm", &one_disk_domain("vm", &chain[1], "qcow2"));
    env.ok(&["snapshot-create-as", "vm", "s1", "--disk-only"]);
    let overlay = env.path("top.s1");
    assert_eq!(qemu_chain(&overlay).len(), 3, "the snapshot's overlay is on the chain");
    let stored = env.state_root().join("domains").join("vm").join("domain.xml");
    std::fs::write(&stored, "garbage").expect("damage domain.xml");
    let err = env.fails(&["undefine", "vm"]);
    assert!(err.contains("--snapshots-metadata"), "{err}");
    assert_eq!(domain_names(&env), ["vm"]);
    env.ok(&["undefine", "vm", "--snapshots-metadata"]);
    assert!(domain_names(&env).is_empty());
    assert!(!env.state_root().join("domains").join("vm").exists());
    assert_eq!(qemu_chain(&overlay).len(), 3, "images stay");
}

/// No domain name makes a lock of another domain its own (before,
/// `vm.operation`'s domain lock was `vm`'s operation lock, so a snapshot
/// operation on `vm` blocked every change to `vm.operation`).
#[test]
fn a_domain_never_shares_another_domains_lock() {
    let env = TestEnv::new();
    let data = env.path("data.raw");
    raw_image(&data);
    env.define("vm", &one_disk_domain("vm", &data, "raw"));
    for purpose in ["operation", "nodes"] {
        let other = format!("vm.{purpose}");
        env.define(&other, &one_disk_domain(&other, &data, "raw"));
        let _held = common::hold_domain_lock(&env, "vm", purpose);
        let out = strata_with_timeout(&env, &["diskset-add", &other, "vda"], Duration::from_secs(30))
            .unwrap_or_else(|| panic!("diskset-add on '{other}' waited for vm's {purpose} lock"));
        assert!(out.status.success(), "{}", stderr_of(&out));
        assert_eq!(env.ok(&["diskset-list", &other]).trim(), "vda");
    }
}

/// Every file and directory under `root`, sorted.
fn files_under(root: &Path) -> Vec<PathBuf> {
    let mut pending = vec![root.to_path_buf()];
    let mut all = Vec::new();
    while let Some(dir) = pending.pop() {
        for entry in std::fs::read_dir(&dir).expect("list") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                pending.push(path.clone());
            }
            all.push(path);
        }
    }
    all.sort();
    all
}

/// Commands on a domain that does not exist fail as virsh's do and leave
/// no file behind (before, several created a lock file for it).
#[test]
fn commands_on_an_unknown_domain_create_no_file() {
    let env = TestEnv::new();
    let data = env.path("data.raw");
    raw_image(&data);
    env.define("vm", &one_disk_domain("vm", &data, "raw"));
    let before = files_under(&env.state_root());
    let commands: [&[&str]; 22] = [
        &["dominfo", "nosuch"],
        &["domstate", "nosuch"],
        &["dumpxml", "nosuch"],
        &["dumpxml", "nosuch", "--refresh-chain"],
        &["domblklist", "nosuch"],
        &["domblkcheck", "nosuch"],
        &["domblkcheck", "nosuch", "--fix"],
        &["diskset-list", "nosuch"],
        &["diskset-add", "nosuch", "vda"],
        &["snapshot-list", "nosuch"],
        &["snapshot-current", "nosuch"],
        &["snapshot-info", "nosuch", "s1"],
        &["snapshot-create-as", "nosuch", "s1", "--disk-only"],
        &["snapshot-delete", "nosuch", "s1"],
        &["blockjob", "nosuch", "vda"],
        &["blockjob", "nosuch", "vda", "--abort"],
        &["blockpull", "nosuch", "vda"],
        &["event", "nosuch", "--timeout", "1"],
        &["start", "nosuch"],
        &["destroy", "nosuch"],
        &["suspend", "nosuch"],
        &["undefine", "nosuch"],
    ];
    for args in commands {
        let err = env.fails(args);
        assert!(err.contains("error: failed to get domain 'nosuch'"), "{args:?}: {err}");
        assert_eq!(files_under(&env.state_root()), before, "{args:?} left files behind");
    }
}

/// The XML of a domain with the given name and UUID over the top of a
/// chain deep enough that probing it takes a while.
fn domain_with_uuid(name: &str, uuid: &str, top: &Path) -> String {
    one_disk_domain(name, top, "qcow2").replace("</name>", &format!("</name>\n  <uuid>{uuid}</uuid>"))
}

/// `define` of each file at once, one process per file; their outputs.
fn define_at_once(env: &TestEnv, files: &[PathBuf]) -> Vec<Output> {
    let children: Vec<_> = files.iter().map(|f| env.spawn(&["define", p(f)])).collect();
    children.into_iter().map(|c| c.wait_with_output().expect("wait strata")).collect()
}

/// Eight defines at once of one UUID under eight names leave one domain
/// with it, and of one name with eight UUIDs leave the first one's, the
/// others refused as a sequential define is (before, several domains could
/// end up sharing the UUID).
#[test]
fn concurrent_defines_keep_names_and_uuids_unique() {
    const AT_ONCE: usize = 8;
    let env = TestEnv::new();
    // Probing a 100-layer chain is the part of define that takes time.
    let chain = build_deep_chain(env.dir.path(), 100);
    let top = &chain[0];
    for round in 0..4 {
        let uuid = format!("6c0a8d3e-0000-4000-8000-{round:012}");
        let files: Vec<PathBuf> = (0..AT_ONCE)
            .map(|i| {
                let name = format!("r{round}-{i}");
                let file = env.path(&format!("{name}.xml"));
                std::fs::write(&file, domain_with_uuid(&name, &uuid, top)).expect("write xml");
                file
            })
            .collect();
        let outs = define_at_once(&env, &files);
        let defined: Vec<&Output> = outs.iter().filter(|o| o.status.success()).collect();
        assert_eq!(defined.len(), 1, "round {round}: {} defines of one UUID succeeded", defined.len());
        for out in outs.iter().filter(|o| !o.status.success()) {
            let err = stderr_of(out);
            assert!(err.contains(&format!("already exists with uuid {uuid}")), "round {round}: {err}");
        }
        let listed: serde_json::Value = serde_json::from_str(&env.ok(&["--json", "list", "--all"])).expect("list json");
        let holders = listed.as_array().expect("array").iter().filter(|d| d["uuid"] == uuid.as_str()).count();
        assert_eq!(holders, 1, "round {round}: {listed}");

        let name = format!("same{round}");
        let files: Vec<PathBuf> = (0..AT_ONCE)
            .map(|i| {
                let file = env.path(&format!("{name}-{i}.xml"));
                let uuid = format!("6c0a8d3e-1111-4000-8000-{:06}{i:06}", round);
                std::fs::write(&file, domain_with_uuid(&name, &uuid, top)).expect("write xml");
                file
            })
            .collect();
        let outs = define_at_once(&env, &files);
        let winners: Vec<usize> = (0..AT_ONCE).filter(|&i| outs[i].status.success()).collect();
        assert_eq!(winners.len(), 1, "round {round}: {} defines of '{name}' succeeded", winners.len());
        for out in outs.iter().filter(|o| !o.status.success()) {
            let err = stderr_of(out);
            assert!(err.contains(&format!("domain '{name}' is already defined with uuid")), "round {round}: {err}");
        }
        let (_, doc) = dumpxml(&env, &name, &[]);
        let kept = doc.at(&["uuid"]).first().map(|&u| doc.text(u));
        let winner_uuid = format!("6c0a8d3e-1111-4000-8000-{:06}{:06}", round, winners[0]);
        assert_eq!(kept.as_deref(), Some(winner_uuid.as_str()), "round {round}");
    }
}

// ---------------------------------------------------------------------------
// 4. XML Strata does not model
// ---------------------------------------------------------------------------

/// A schema-valid domain with much that Strata does not model.
fn rich_domain(name: &str, top: &Path) -> String {
    format!(
        "<domain type='{ty}'>
  <name>{name}</name>
  <uuid>0b7f3c4e-5a7d-4c1e-9a43-2f6f0c1d2e3a</uuid>
  <metadata>
    <app:info xmlns:app='http://example.org/app/1'>
      <app:owner team='storage'>alice &amp; bob</app:owner>
    </app:info>
  </metadata>
  <memory unit='MiB'>128</memory>
  <currentMemory unit='MiB'>96</currentMemory>
  <vcpu placement='static'>2</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features>
    <acpi/>
    <apic/>
  </features>
  <cpu mode='custom' match='exact'>
    <model fallback='allow'>qemu64</model>
    <feature policy='require' name='x2apic'/>
    <feature policy='disable' name='svm'/>
  </cpu>
  <clock offset='utc'>
    <timer name='rtc' tickpolicy='catchup'/>
    <timer name='pit' tickpolicy='delay'/>
  </clock>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>preserve</on_crash>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none' discard='unmap'/>
      <source file='{top}'>
        <seclabel model='dac' relabel='no'/>
      </source>
      <target dev='vda' bus='virtio'/>
      <serial>disk-serial-1</serial>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>
    </disk>
    <controller type='usb' index='0' model='qemu-xhci'/>
    <controller type='pci' index='0' model='pcie-root'/>
    <serial type='pty'>
      <target port='0'/>
    </serial>
    <graphics type='vnc' port='-1' autoport='yes' listen='127.0.0.1'/>
    <memballoon model='none'/>
  </devices>
</domain>
",
        ty = common::domain_type(),
        top = top.display()
    )
}

/// Canonical texts of the parts of a document that Strata must not touch.
fn unmodeled_parts(doc: &Doc) -> Vec<(String, String)> {
    let mut parts = Vec::new();
    for path in [
        &["uuid"][..],
        &["metadata"],
        &["memory"],
        &["currentMemory"],
        &["vcpu"],
        &["os"],
        &["features"],
        &["cpu"],
        &["clock"],
        &["on_poweroff"],
        &["on_reboot"],
        &["on_crash"],
        &["devices", "controller"],
        &["devices", "serial"],
        &["devices", "graphics"],
        &["devices", "memballoon"],
        &["devices", "disk", "target"],
        &["devices", "disk", "serial"],
        &["devices", "disk", "address"],
        &["devices", "disk", "source", "seclabel"],
    ] {
        let found = doc.at(path);
        assert!(!found.is_empty(), "missing {path:?}");
        for id in found {
            parts.push((path.join("/"), doc.canon(id)));
        }
    }
    let driver = doc.at(&["devices", "disk", "driver"]);
    assert_eq!(driver.len(), 1);
    for attr in ["name", "cache", "discard"] {
        parts.push((format!("driver@{attr}"), doc.attr(driver[0], attr).unwrap_or("<missing>").to_string()));
    }
    parts
}

#[test]
fn unmodeled_xml_survives() {
    let env = TestEnv::new();
    let chain = make_chain(env.dir.path(), &["base.qcow2", "mid.qcow2", "top.qcow2"]);
    let (base, top) = (&chain[0], &chain[2]);
    let input = rich_domain("keep", top);
    validate_xml(&input);
    let want = unmodeled_parts(&Doc::parse(&input));

    env.define("keep", &input);
    let check = |when: &str| -> Doc {
        let (text, doc) = dumpxml(&env, "keep", &[]);
        let got = unmodeled_parts(&doc);
        for (w, g) in want.iter().zip(&got) {
            assert_eq!(w, g, "{when}: changed\n{text}");
        }
        assert_eq!(want.len(), got.len(), "{when}");
        doc
    };
    check("after define");

    env.ok(&["diskset-add", "keep", "vda"]);
    let doc = check("after diskset-add");
    assert_eq!(doc.attr(disk(&doc, "vda"), "selected"), Some("yes"));

    // A real rewrite of the disk's chain.
    qemu_img(&["rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", p(top)]);
    let out = env.strata(&["domblkcheck", "keep", "--fix"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let doc = check("after domblkcheck --fix");
    assert_chain(&doc, "vda", top, "qcow2", &[(base, "qcow2")]);
    assert_eq!(doc.attr(disk(&doc, "vda"), "selected"), Some("yes"));

    let (_, _) = dumpxml(&env, "keep", &["--refresh-chain"]);
    check("after dumpxml --refresh-chain");
    env.ok(&["diskset-remove", "keep", "vda"]);
    check("after diskset-remove");
}

#[test]
fn unmodeled_non_schema_xml_survives() {
    let env = TestEnv::new();
    let chain = make_chain(env.dir.path(), &["base.qcow2", "mid.qcow2", "top.qcow2"]);
    let (base, top) = (&chain[0], &chain[2]);
    let input = one_disk_domain("odd", top, "qcow2")
        .replacen("<domain type=", "<domain x-root='r1' type=", 1)
        .replace("<disk type='file' device='disk'>", "<disk type='file' x-mine='1' device='disk'>")
        .replace("      <target dev='vda'", "      <x-note level='2'>keep me</x-note>\n      <target dev='vda'")
        .replace("  <devices>\n", "  <x-extension><x-inner a='b'/></x-extension>\n  <devices>\n");
    let parts = |doc: &Doc| -> Vec<String> {
        let d = disk(doc, "vda");
        vec![
            doc.attr(xmlq::ROOT, "x-root").unwrap_or("<missing>").to_string(),
            doc.attr(d, "x-mine").unwrap_or("<missing>").to_string(),
            doc.child(d, "x-note").map(|n| doc.canon(n)).unwrap_or_default(),
            doc.at(&["x-extension"]).first().map(|&n| doc.canon(n)).unwrap_or_default(),
        ]
    };
    let want = parts(&Doc::parse(&input));
    env.define("odd", &input);
    let steps: [(&str, &[&str]); 3] = [
        ("define", &[]),
        ("diskset-add", &["diskset-add", "odd", "vda"]),
        ("domblkcheck --fix", &["domblkcheck", "odd", "--fix"]),
    ];
    for (when, args) in steps {
        if when == "domblkcheck --fix" {
            qemu_img(&["rebase", "-u", "-b", "base.qcow2", "-F", "qcow2", p(top)]);
        }
        if !args.is_empty() {
            env.ok(args);
        }
        // Not schema-valid on purpose, so not validated.
        let text = env.ok(&["dumpxml", "odd"]);
        let doc = Doc::parse(&text);
        assert_eq!(parts(&doc), want, "after {when}:\n{text}");
        if when == "domblkcheck --fix" {
            assert_chain(&doc, "vda", top, "qcow2", &[(base, "qcow2")]);
        }
    }
}

// ---------------------------------------------------------------------------
// 5. Output for scripts, batches, errors
// ---------------------------------------------------------------------------

#[test]
fn json_outputs_parse() {
    let env = TestEnv::new();
    let chain = make_chain(env.dir.path(), &["base.qcow2", "mid.qcow2", "top.qcow2"]);
    let data = env.path("data.raw");
    raw_image(&data);
    let xml = domain_xml(
        "jvm",
        &[
            DiskSpec { target: "vda", format: "qcow2", path: &chain[2], extra: "" },
            DiskSpec { target: "vdb", format: "raw", path: &data, extra: "" },
        ],
    )
    .replace("<vcpu placement='static'>1</vcpu>", "<vcpu placement='static'>3</vcpu>");
    env.define("jvm", &xml);
    env.define("other", &one_disk_domain("other", &data, "raw"));
    let (_, doc) = dumpxml(&env, "jvm", &[]);
    let uuid = doc.at(&["uuid"]).first().map(|&u| doc.text(u)).expect("uuid assigned on define");
    let parse = |text: String| -> serde_json::Value {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}):\n{text}"))
    };

    for list in [parse(env.ok(&["list", "--all", "--json"])), parse(env.ok(&["--json", "list", "--all"]))] {
        let list = list.as_array().expect("list is an array").clone();
        let names: Vec<&str> = list.iter().map(|d| d["name"].as_str().expect("name")).collect();
        assert_eq!(names, ["jvm", "other"]);
        let jvm = &list[0];
        assert_eq!(jvm["uuid"], uuid.as_str());
        assert_eq!(jvm["state"], "shutoff");
        assert!(jvm["id"].is_null(), "an inactive domain has no id");
    }
    // Without --all, inactive domains are not listed.
    assert_eq!(parse(env.ok(&["list", "--json"])), serde_json::json!([]));

    for info in [parse(env.ok(&["dominfo", "jvm", "--json"])), parse(env.ok(&["--json", "dominfo", "jvm"]))] {
        assert_eq!(info["name"], "jvm");
        assert_eq!(info["uuid"], uuid.as_str());
        assert_eq!(info["vcpus"], 3);
        assert_eq!(info["max_memory_kib"], 128 * 1024);
        assert_eq!(info["os_type"], "hvm");
        assert_eq!(info["persistent"], true);
    }

    for disks in [parse(env.ok(&["domblklist", "jvm", "--json"])), parse(env.ok(&["--json", "domblklist", "jvm"]))] {
        let disks = disks.as_array().expect("array");
        let targets: Vec<&str> = disks.iter().map(|d| d["target"].as_str().expect("target")).collect();
        assert_eq!(targets, ["vda", "vdb"]);
        let vda = &disks[0];
        assert_eq!(vda["source"], p(&chain[2]));
        assert_eq!(vda["format"], "qcow2");
        let layers: Vec<(u64, String, String)> = vda["chain"]
            .as_array()
            .expect("chain layers")
            .iter()
            .map(|l| {
                (
                    l["index"].as_u64().expect("index"),
                    l["source"].as_str().expect("source").to_string(),
                    l["format"].as_str().expect("format").to_string(),
                )
            })
            .collect();
        let want: Vec<(u64, String, String)> = [(0, &chain[2]), (1, &chain[1]), (2, &chain[0])]
            .iter()
            .map(|(i, path)| (*i, p(path).to_string(), "qcow2".to_string()))
            .collect();
        assert_eq!(layers, want);
        let vdb_chain = disks[1]["chain"].as_array().expect("vdb chain");
        assert_eq!(vdb_chain.len(), 1);
        assert_eq!(vdb_chain[0]["format"], "raw");
        assert_eq!(vdb_chain[0]["source"], p(&data));
    }

    assert_eq!(parse(env.ok(&["diskset-list", "jvm", "--json"])), serde_json::json!([]));
    env.ok(&["diskset-add", "jvm", "vdb"]);
    assert_eq!(parse(env.ok(&["diskset-list", "jvm", "--json"])), serde_json::json!(["vdb"]));
    assert_eq!(parse(env.ok(&["--json", "diskset-list", "jvm"])), serde_json::json!(["vdb"]));
}

#[test]
fn batches_and_errors() {
    let env = TestEnv::new();
    let data = env.path("data.raw");
    raw_image(&data);
    let file = env.path("vm1.xml");
    std::fs::write(&file, one_disk_domain("vm1", &data, "raw")).expect("write xml");

    // Two commands in one argument.
    let batch = format!("define '{}'; dumpxml vm1", file.display());
    let out = env.ok(&[batch.as_str()]);
    let start = out.find("<domain").expect("dumpxml output after define");
    assert!(out[..start].contains("vm1"), "define reported first: {out}");
    let xml = &out[start..];
    validate_xml(xml);
    let doc = Doc::parse(xml);
    assert_eq!(doc.at(&["name"]).first().map(|&n| doc.text(n)).as_deref(), Some("vm1"));
    assert_eq!(disk_source(&doc, disk(&doc, "vda")).as_deref(), Some(p(&data)));

    // Unknown domain, for several commands.
    for args in [&["dumpxml", "nope"][..], &["dominfo", "nope"], &["domblklist", "nope"], &["diskset-list", "nope"]] {
        let err = env.fails(args);
        assert!(err.contains("error: failed to get domain 'nope'"), "{args:?}: {err}");
    }

    // Malformed XML.
    let bad = env.path("bad.xml");
    std::fs::write(&bad, "<domain type='qemu'><name>broken</name><devices>").expect("write");
    let err = env.fails(&["define", p(&bad)]);
    assert!(err.starts_with("error:"), "{err}");
    assert!(!domain_names(&env).contains(&"broken".to_string()));

    // Unknown URI scheme: the message lists the drivers there are.
    let out = Command::new(env!("CARGO_BIN_EXE_strata-test-cli"))
        .args(["-c", "foo:///x", "list"])
        .output()
        .expect("run strata");
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(err.starts_with("error:") && err.contains("foo"), "{err}");
    assert!(err.contains("qemu"), "known drivers listed: {err}");

    // A domain name that would escape the state directory.
    for bad_name in ["../x", "..", "a/b"] {
        let xml = one_disk_domain("PLACEHOLDER", &data, "raw")
            .replace("<name>PLACEHOLDER</name>", &format!("<name>{bad_name}</name>"));
        let out = try_define(&env, "traversal", &xml, &[]);
        assert_eq!(out.status.code(), Some(1), "name {bad_name:?} accepted");
        assert!(stderr_of(&out).contains(bad_name), "{}", stderr_of(&out));
    }
    assert!(!env.dir.path().join("x").exists());
    assert!(!env.state_root().join("x").exists());
    assert_eq!(domain_names(&env), ["vm1"]);
}

/// Command lines that cannot run read as virsh words them, naming what is
/// wrong. As in virsh, a batch holding one is refused before any of its
/// commands runs (status 1), while a command that fails when it runs does
/// not stop the batch; the batch then fails (virsh would return the last
/// command's status).
#[test]
fn bad_command_lines_read_like_virsh_and_stop_a_batch() {
    let env = TestEnv::new();
    for (args, message) in [
        (&["dominfo"][..], "error: command 'dominfo' requires <domain> option"),
        (&["blockpull", "vm1"], "error: command 'blockpull' requires <path> option"),
        (&["blockcopy", "vm1"], "error: command 'blockcopy' requires <path> option"),
        (&["list", "--bogus"], "error: command 'list' doesn't support option --bogus"),
        (&["bogus"], "error: unknown command: 'bogus'"),
        (&["list", "extra"], "error: unexpected data 'extra'"),
    ] {
        assert_eq!(env.fails(args).trim_end(), message, "{args:?}");
    }

    let out = env.strata(&["list --name; dominfo; list --name"]);
    assert_eq!(out.status.code(), Some(1), "a batch with a command that cannot run: {out:?}");
    assert_eq!(stdout_of(&out), "", "no command of the batch ran");
    assert_eq!(stderr_of(&out).trim_end(), "error: command 'dominfo' requires <domain> option");

    let out = env.strata(&["list --name; dominfo nope; uri"]);
    assert_eq!(out.status.code(), Some(1), "a batch whose middle command failed: {out:?}");
    assert!(stderr_of(&out).contains("error: failed to get domain 'nope'"), "{out:?}");
    assert!(stdout_of(&out).contains(&env.uri), "the batch went on after the failure: {out:?}");
    let err = env.fails(&["uri; dominfo nope"]);
    assert!(err.contains("error: failed to get domain 'nope'"), "{err}");
}

/// An OS error gives its reason once, completing the line it explains, as
/// libvirt prints a system error.
#[test]
fn os_errors_give_their_reason_once() {
    // /proc takes no new directory, so the state root cannot be made.
    let out = Command::new(env!("CARGO_BIN_EXE_strata-test-cli"))
        .args(["-c", "qemu:///embed?root=/proc/strata-no-root", "list"])
        .output()
        .expect("run strata");
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(
        err.contains(
            "error: system error: cannot create the state directory '/proc/strata-no-root': No such file or directory\n"
        ),
        "{err}"
    );
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

/// Output into a pipe nobody reads any more (`strata list | head -0`)
/// ends the command as it ends other tools: no panic and no message, with
/// the status a shell shows for a tool SIGPIPE ended.
#[test]
fn output_into_a_closed_pipe_stops_quietly() {
    let env = TestEnv::new();
    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = env.command(&["list", "--all"]).stdout(writer).output().expect("run strata");
    assert_eq!(stderr_of(&out), "", "nothing said about the closed pipe");
    assert_eq!(out.status.code(), Some(141), "{out:?}");
}

/// `event --all --timeout 2` with no domain running waits quietly, asleep,
/// and ends at its timeout with virsh's words and status (1: no event came).
#[test]
fn event_with_nothing_running_sleeps_until_its_timeout() {
    let env = TestEnv::new();
    for extra in [&[][..], &["--loop"]] {
        let mut args = vec!["event", "--all", "--timeout", "2"];
        args.extend_from_slice(extra);
        let (out, used) = env.run_with_usage(env.command(&args), Duration::from_secs(60));
        let cpu = used.cpu;
        assert_eq!(stdout_of(&out), "event loop timed out\nevents received: 0\n\n", "{args:?}");
        assert_eq!(stderr_of(&out), "", "{args:?}");
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(cpu < Duration::from_millis(500), "{args:?} used {cpu:?} of CPU to wait 2 s");
    }
}

// ---------------------------------------------------------------------------
// 6. Images that do not exist (yet), and trusted vs validated chains
// ---------------------------------------------------------------------------

#[test]
fn disk_files_need_not_exist() {
    let env = TestEnv::new();
    let ghost_top = env.path("nowhere/top.qcow2");
    let ghost_base = env.path("nowhere/base.qcow2");
    let later = env.path("later.qcow2");
    let backing = env.path("later-base.qcow2");
    let given = format!(
        "      <backingStore type='file'>\n        <format type='qcow2'/>\n        <source file='{}'/>\n        <backingStore/>\n      </backingStore>\n",
        ghost_base.display()
    );
    let xml = domain_xml(
        "ghost",
        &[
            DiskSpec { target: "vda", format: "qcow2", path: &ghost_top, extra: &given },
            DiskSpec { target: "vdb", format: "qcow2", path: &later, extra: "" },
        ],
    );
    let out = try_define(&env, "ghost", &xml, &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let warn = stderr_of(&out);
    assert!(warn.contains("warning:") && warn.contains(p(&later)), "missing image warned about: {warn}");
    assert!(!warn.contains(p(&ghost_top)), "a disk with a given chain needs no warning: {warn}");

    let (_, doc) = dumpxml(&env, "ghost", &[]);
    assert_chain(&doc, "vda", &ghost_top, "qcow2", &[(&ghost_base, "qcow2")]);
    let vdb = disk(&doc, "vdb");
    assert_eq!(disk_source(&doc, vdb).as_deref(), Some(p(&later)));
    assert_eq!(recorded_chain(&doc, vdb), Recorded { layers: vec![], ends: false });

    // The image appears, with a backing file.
    qemu_img(&["create", "-q", "-f", "qcow2", p(&backing), "16M"]);
    qemu_img(&["create", "-q", "-f", "qcow2", "-b", "later-base.qcow2", "-F", "qcow2", p(&later)]);
    let (_, doc) = dumpxml(&env, "ghost", &["--refresh-chain"]);
    assert_chain(&doc, "vdb", &later, "qcow2", &[(&backing, "qcow2")]);
    assert_chain(&doc, "vda", &ghost_top, "qcow2", &[(&ghost_base, "qcow2")]);
    // …and it is recorded.
    let (_, doc) = dumpxml(&env, "ghost", &[]);
    assert_chain(&doc, "vdb", &later, "qcow2", &[(&backing, "qcow2")]);
    assert_matches_qemu(&doc, "vdb", &later);
}

#[test]
fn define_validate_refuses_mismatch() {
    let env = TestEnv::new();
    let chain = make_chain(env.dir.path(), &["base.qcow2", "mid.qcow2", "top.qcow2"]);
    let (base, mid, top) = (&chain[0], &chain[1], &chain[2]);
    // The XML claims top sits directly on base.
    let claimed = format!(
        "      <backingStore type='file'>\n        <format type='qcow2'/>\n        <source file='{}'/>\n        <backingStore/>\n      </backingStore>\n",
        base.display()
    );
    let xml = domain_xml("claim", &[DiskSpec { target: "vda", format: "qcow2", path: top, extra: &claimed }]);

    let out = try_define(&env, "claim", &xml, &["--validate"]);
    assert_eq!(out.status.code(), Some(1), "--validate must refuse: {}", stdout_of(&out));
    let err = stderr_of(&out);
    assert!(err.starts_with("error:") && err.contains("vda"), "{err}");
    assert!(err.contains(p(mid)), "the difference (mid is the real layer 1) is named: {err}");
    assert!(!domain_names(&env).contains(&"claim".to_string()));

    // Trusted without --validate, kept as given.
    let out = try_define(&env, "claim", &xml, &[]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let (_, doc) = dumpxml(&env, "claim", &[]);
    assert_chain(&doc, "vda", top, "qcow2", &[(base, "qcow2")]);

    // A correct chain passes --validate.
    let right = format!(
        "      <backingStore type='file'>\n        <format type='qcow2'/>\n        <source file='{}'/>\n        <backingStore type='file'>\n          <format type='qcow2'/>\n          <source file='{}'/>\n          <backingStore/>\n        </backingStore>\n      </backingStore>\n",
        mid.display(),
        base.display()
    );
    let xml = domain_xml("right", &[DiskSpec { target: "vda", format: "qcow2", path: top, extra: &right }]);
    let out = try_define(&env, "right", &xml, &["--validate"]);
    assert!(out.status.success(), "{}", stderr_of(&out));
    let (_, doc) = dumpxml(&env, "right", &[]);
    assert_chain(&doc, "vda", top, "qcow2", &[(mid, "qcow2"), (base, "qcow2")]);
}

// ---------------------------------------------------------------------------
// 7. Disk sets
// ---------------------------------------------------------------------------

#[test]
fn diskset_outcomes() {
    let env = TestEnv::new();
    let a = env.path("a.raw");
    let b = env.path("b.raw");
    raw_image(&a);
    raw_image(&b);
    let xml = domain_xml(
        "ds",
        &[
            DiskSpec { target: "vda", format: "raw", path: &a, extra: "" },
            DiskSpec { target: "vdb", format: "raw", path: &b, extra: "" },
        ],
    );
    env.define("ds", &xml);
    let size =
        |env: &TestEnv| -> usize { env.ok(&["diskset-size", "ds"]).trim().parse().expect("diskset-size number") };
    let listed = |env: &TestEnv| -> Vec<String> {
        env.ok(&["diskset-list", "ds"]).lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_string).collect()
    };
    let selected_attr = |env: &TestEnv, target: &str| -> Option<String> {
        let (_, doc) = dumpxml(env, "ds", &[]);
        doc.attr(disk(&doc, target), "selected").map(str::to_string)
    };
    assert_eq!(size(&env), 0);

    let out = env.ok(&["diskset-add", "ds", "vda"]).to_lowercase();
    assert!(out.contains("vda") && out.contains("added"), "{out}");
    assert_eq!(selected_attr(&env, "vda").as_deref(), Some("yes"));
    assert_ne!(selected_attr(&env, "vdb").as_deref(), Some("yes"));
    let out = env.ok(&["diskset-add", "ds", "vda"]).to_lowercase();
    assert!(out.contains("already") && !out.contains("absent"), "{out}");
    assert_eq!(size(&env), 1);
    assert_eq!(listed(&env), ["vda"]);

    // By source path, as virsh accepts.
    let out = env.ok(&["diskset-add", "ds", p(&b)]).to_lowercase();
    assert!(out.contains("added"), "{out}");
    assert_eq!(listed(&env), ["vda", "vdb"]);
    assert_eq!(size(&env), 2);

    let out = env.ok(&["diskset-remove", "ds", "vda"]).to_lowercase();
    assert!(out.contains("removed"), "{out}");
    let out = env.ok(&["diskset-remove", "ds", "vda"]).to_lowercase();
    assert!(out.contains("already absent"), "{out}");
    assert_eq!(listed(&env), ["vdb"]);
    assert_eq!(selected_attr(&env, "vda"), None);

    let err = env.fails(&["diskset-add", "ds", "vdz"]);
    assert!(err.starts_with("error:") && err.contains("vdz"), "{err}");
    let err = env.fails(&["diskset-remove", "ds", "vdz"]);
    assert!(err.contains("vdz"), "{err}");
    let err = env.fails(&["diskset-add", "nope", "vda"]);
    assert!(err.contains("error: failed to get domain 'nope'"), "{err}");
    assert_eq!(listed(&env), ["vdb"], "failed commands change nothing");

    let out = env.ok(&["diskset-add", "ds", "--all"]);
    assert!(out.contains('2'), "reports the set's size: {out}");
    assert_eq!(size(&env), 2);
    assert_eq!(selected_attr(&env, "vda").as_deref(), Some("yes"));
    assert_eq!(selected_attr(&env, "vdb").as_deref(), Some("yes"));
    env.ok(&["diskset-remove", "ds", "--all"]);
    assert_eq!(size(&env), 0);
    assert!(listed(&env).is_empty());
    let out = env.ok(&["diskset-remove", "ds", "--all"]);
    assert!(out.contains('0'), "nothing left to remove: {out}");
    assert_eq!(selected_attr(&env, "vdb"), None);

    // `--all` and a disk together make no sense; neither does no disk.
    env.fails(&["diskset-add", "ds", "vda", "--all"]);
    env.fails(&["diskset-add", "ds"]);
}

#[test]
fn every_disk_type_in_libvirts_schema_round_trips_through_define() {
    let env = TestEnv::new();
    let raw = env.path("data.raw");
    raw_image(&raw);
    let share = env.path("share");
    std::fs::create_dir(&share).expect("mkdir share");
    let devices = format!(
        "    <disk type='file' device='disk'>
      <driver name='qemu' type='raw'/>
      <source file='{raw}'>
        <slices>
          <slice type='storage' offset='512' size='4096'/>
        </slices>
      </source>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='{dev}'/>
      <backingStore/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='dir' device='disk'>
      <driver name='qemu' type='fat'/>
      <source dir='{share}'/>
      <backingStore/>
      <target dev='vdc' bus='virtio'/>
    </disk>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='rbd' name='pool/image'>
        <host name='mon1.example.org' port='6789'/>
        <host name='mon2.example.org'/>
        <snapshot name='snap1'/>
        <config file='/etc/ceph/ceph.conf'/>
      </source>
      <target dev='vdd' bus='virtio'/>
    </disk>
    <disk type='volume' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source pool='default' volume='img1.qcow2'/>
      <target dev='vde' bus='virtio'/>
    </disk>
{NVME_DISK}{VHOSTUSER_DISK}{VHOSTVDPA_DISK}",
        raw = p(&raw),
        dev = p(&env.path("no-such-device")),
        share = p(&share),
    );
    let xml = domain_xml("types", &[]).replace("    <graphics", &format!("{devices}    <graphics"));
    validate_xml(&xml.replace(VHOSTVDPA_DISK, ""));
    env.define("types", &xml);

    let out = env.ok(&["dumpxml", "types"]);
    assert!(out.contains(VHOSTVDPA_DISK), "the vhostvdpa disk changed:\n{out}");
    validate_xml(&out.replace(VHOSTVDPA_DISK, ""));
    let (given, shown) = (Doc::parse(&xml), Doc::parse(&out));
    for target in ["vda", "vdb", "vdc", "vdd", "vde", "vdf", "vdg", "vdh"] {
        assert_eq!(shown.canon(disk(&shown, target)), given.canon(disk(&given, target)), "disk {target}");
    }
    // A rewrite of every chain keeps them too.
    env.ok(&["dumpxml", "types", "--refresh-chain"]);
    let doc = Doc::parse(&env.ok(&["dumpxml", "types"]));
    for target in ["vda", "vdb", "vdc", "vdd", "vde", "vdf", "vdg", "vdh"] {
        assert_eq!(doc.canon(disk(&doc, target)), given.canon(disk(&given, target)), "disk {target} after a refresh");
    }
}

#[test]
fn network_backing_strings_are_recorded_as_libvirt_records_them() {
    let env = TestEnv::new();
    let cases = [
        ("nbd:example.org:6000:exportname=blah", "<source protocol='nbd' name='blah'><host name='example.org' port='6000'/></source>"),
        (
            "nbd+unix:///exp?socket=/run/nbd.sock",
            "<source protocol='nbd' name='exp'><host transport='unix' socket='/run/nbd.sock'/></source>",
        ),
        (
            "https://example.org/dir/a%20b.img?token=x",
            "<source protocol='https' name='dir/a b.img' query='token=x'><host name='example.org' port='443'/></source>",
        ),
        (
            r#"json:{"file.driver":"gluster","file.volume":"vol","file.path":"img","file.server":[{"type":"tcp","host":"g1"},{"type":"unix","path":"/run/g.sock"}]}"#,
            "<source protocol='gluster' name='vol/img'><host name='g1' port='24007'/>\
             <host transport='unix' socket='/run/g.sock'/></source>",
        ),
    ];
    for (i, (backing, want)) in cases.iter().enumerate() {
        let name = format!("net{i}");
        let top = env.path(&format!("{name}.qcow2"));
        qemu_img(&["create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", backing, p(&top), "1M"]);
        assert_eq!(qemu_info(&top)["backing-filename"].as_str(), Some(*backing), "the header holds the string");
        env.define(&name, &one_disk_domain(&name, &top, "qcow2"));
        let (_, doc) = dumpxml(&env, &name, &[]);
        let store = doc.child(disk(&doc, "vda"), "backingStore").expect("a recorded backing layer");
        assert_eq!(doc.attr(store, "type"), Some("network"), "{backing}");
        assert_eq!(doc.child(store, "format").and_then(|f| doc.attr(f, "type")), Some("raw"), "{backing}");
        let source = doc.child(store, "source").expect("source");
        assert_eq!(doc.canon(source), Doc::parse(want).canon(xmlq::ROOT), "{backing}");
        assert!(doc.children(store, "backingStore").is_empty(), "a network layer is not followed: {backing}");
    }
}
