//! A small lossless element tree for libvirt's XML documents.
//!
//! Strata acts on a few parts of a domain (disks, names, UUIDs); everything
//! else a user wrote must come back out unchanged. So the document itself is
//! the source of truth and the typed models are views over it that patch
//! only the elements they own. Parsing, formatting and dropping are iterative
//! because backing chains nest one element per layer and may be 10,000 deep.

use std::borrow::Cow;
use std::ops::Range;

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use super::limits::{MAX_DOCUMENT_BYTES, MAX_DOCUMENT_NODES};
use crate::error::{Error, Result};

/// A node inside an element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Element(Element),
    Text(String),
    Comment(String),
}

/// An XML element with its attributes in document order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Element {
    /// Names Strata reads and writes often are not allocated (`interned`):
    /// a chain has three elements and four attributes per layer.
    pub name: Cow<'static, str>,
    pub attrs: Vec<(Cow<'static, str>, String)>,
    pub children: Vec<Node>,
}

impl Drop for Element {
    // The derived drop recurses once per nesting level; a 10,000-layer
    // backing chain would overflow a worker thread's stack.
    fn drop(&mut self) {
        let mut pending: Vec<Node> = std::mem::take(&mut self.children);
        while let Some(node) = pending.pop() {
            if let Node::Element(mut el) = node {
                pending.append(&mut el.children);
            }
        }
    }
}

impl Element {
    pub fn new(name: impl Into<Cow<'static, str>>) -> Self {
        Element { name: name.into(), attrs: Vec::new(), children: Vec::new() }
    }

    /// Builder: adds an attribute.
    pub fn with_attr(mut self, name: &str, value: impl Into<String>) -> Self {
        self.set_attr(name, value);
        self
    }

    /// Builder: adds a child element.
    pub fn with_child(mut self, child: Element) -> Self {
        self.children.push(Node::Element(child));
        self
    }

    /// Builder: sets the text content.
    pub fn with_text(mut self, text: impl Into<String>) -> Self {
        self.children.push(Node::Text(text.into()));
        self
    }

    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// Sets an attribute, keeping its position when it already exists.
    pub fn set_attr(&mut self, name: &str, value: impl Into<String>) {
        let value = value.into();
        match self.attrs.iter_mut().find(|(k, _)| k == name) {
            Some((_, v)) => *v = value,
            None => self.attrs.push((interned(name.as_bytes()), value)),
        }
    }

    pub fn remove_attr(&mut self, name: &str) -> Option<String> {
        let pos = self.attrs.iter().position(|(k, _)| k == name)?;
        Some(self.attrs.remove(pos).1)
    }

    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            _ => None,
        })
    }

    pub fn elements_mut(&mut self) -> impl Iterator<Item = &mut Element> {
        self.children.iter_mut().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            _ => None,
        })
    }

    pub fn child(&self, name: &str) -> Option<&Element> {
        self.elements().find(|e| e.name == name)
    }

    pub fn child_mut(&mut self, name: &str) -> Option<&mut Element> {
        self.elements_mut().find(|e| e.name == name)
    }

    pub fn children_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Element> + 'a {
        self.elements().filter(move |e| e.name == name)
    }

    /// The concatenated text content of this element (not of its descendants).
    pub fn text(&self) -> String {
        self.children
            .iter()
            .filter_map(|n| match n {
                Node::Text(t) => Some(t.as_str()),
                _ => None,
            })
            .collect()
    }

    /// Text of the named child, trimmed.
    pub fn child_text(&self, name: &str) -> Option<String> {
        self.child(name).map(|c| c.text().trim().to_string())
    }

    /// Replaces the text content, keeping child elements.
    pub fn set_text(&mut self, text: impl Into<String>) {
        self.children.retain(|n| !matches!(n, Node::Text(_)));
        self.children.push(Node::Text(text.into()));
    }

    /// Removes the first child element with this name and returns it (a
    /// document's subtree taken out without copying it).
    pub fn take_child(&mut self, name: &str) -> Option<Element> {
        let at = self.children.iter().position(|n| matches!(n, Node::Element(e) if e.name == name))?;
        match self.children.remove(at) {
            Node::Element(e) => Some(e),
            _ => None,
        }
    }

    /// Removes every child element with this name; returns how many went.
    pub fn remove_children(&mut self, name: &str) -> usize {
        let before = self.children.len();
        self.children.retain(|n| !matches!(n, Node::Element(e) if e.name == name));
        before - self.children.len()
    }

    /// Inserts `child` where libvirt's element order puts it: after the last
    /// existing child whose name comes earlier in `order`. Children whose
    /// names are not in `order` (things Strata does not model) keep their
    /// places relative to one another.
    pub fn insert_ordered(&mut self, child: Element, order: &[&str]) {
        let rank = |name: &str| order.iter().position(|o| *o == name);
        let my_rank = rank(&child.name);
        let mut insert_at = 0;
        let mut found_before = false;
        for (i, node) in self.children.iter().enumerate() {
            if let Node::Element(e) = node {
                match (rank(&e.name), my_rank) {
                    (Some(r), Some(m)) if r <= m => {
                        insert_at = i + 1;
                        found_before = true;
                    }
                    _ => {}
                }
            }
        }
        if !found_before {
            // Nothing earlier in the order exists: go before the first
            // element that libvirt places after this one, else at the end.
            insert_at = self
                .children
                .iter()
                .position(|n| {
                    matches!(n, Node::Element(e)
                        if matches!((rank(&e.name), my_rank), (Some(r), Some(m)) if r > m))
                })
                .unwrap_or(self.children.len());
        }
        self.children.insert(insert_at, Node::Element(child));
    }

    /// Replaces the first child named like `child` in place, or inserts it in order.
    pub fn replace_or_insert(&mut self, child: Element, order: &[&str]) {
        let pos = self.children.iter().position(|n| matches!(n, Node::Element(e) if e.name == child.name));
        match pos {
            Some(i) => self.children[i] = Node::Element(child),
            None => self.insert_ordered(child, order),
        }
    }

    /// Parses a document and returns its root element. A document over
    /// [`MAX_DOCUMENT_BYTES`] or [`MAX_DOCUMENT_NODES`] is refused, the
    /// latter as soon as the count is passed.
    pub fn parse(xml: &str) -> Result<Element> {
        Ok(Element::parse_keeping(xml, None)?.0)
    }

    /// [`Element::parse`], except that the root's first child element
    /// named `raw_child` is not parsed: where its text is in `xml` (from its
    /// `<` to the `>` of its end tag) is returned instead, so that a large
    /// part a caller seldom needs costs a scan rather than a tree. Only
    /// its tags' nesting is checked here; whoever parses it checks the rest.
    pub fn parse_keeping_raw(xml: &str, raw_child: &str) -> Result<(Element, Option<Range<usize>>)> {
        Element::parse_keeping(xml, Some(raw_child))
    }

    fn parse_keeping(xml: &str, raw_child: Option<&str>) -> Result<(Element, Option<Range<usize>>)> {
        if xml.len() > MAX_DOCUMENT_BYTES {
            return Err(Error::xml(format!("the document is refused: {}", super::limits::too_large())));
        }
        let mut reader = Reader::from_str(xml);
        let mut stack: Vec<Element> = Vec::new();
        let mut root: Option<Element> = None;
        let mut nodes = NodeBudget(MAX_DOCUMENT_NODES);
        let mut raw: Option<Range<usize>> = None;
        loop {
            let before = position(&reader);
            let event = reader
                .read_event()
                .map_err(|e| Error::xml(format!("malformed XML at byte {}: {e}", reader.error_position())))?;
            let kept_raw = |start: &BytesStart<'_>| {
                raw.is_none() && stack.len() == 1 && raw_child.is_some_and(|n| n.as_bytes() == start.name().as_ref())
            };
            match event {
                Event::Start(start) if kept_raw(&start) => {
                    reader
                        .read_to_end(start.name())
                        .map_err(|e| Error::xml(format!("malformed XML at byte {}: {e}", reader.error_position())))?;
                    raw = Some(before..position(&reader));
                }
                Event::Empty(start) if kept_raw(&start) => raw = Some(before..position(&reader)),
                Event::Start(start) => stack.push(element_from_start(&start, &mut nodes)?),
                Event::Empty(start) => {
                    let el = element_from_start(&start, &mut nodes)?;
                    attach(&mut stack, &mut root, el)?;
                }
                Event::End(_) => {
                    let mut el = stack.pop().ok_or_else(|| Error::xml("malformed XML: unexpected closing tag"))?;
                    // Whitespace between child elements is layout, re-made on output.
                    if el.children.iter().any(|n| matches!(n, Node::Element(_))) {
                        el.children.retain(|n| !matches!(n, Node::Text(t) if t.trim().is_empty()));
                    }
                    attach(&mut stack, &mut root, el)?;
                }
                // Whitespace after a child element is layout, dropped at
                // once rather than kept until the parent closes: most text
                // events of a deep chain are indentation.
                Event::Text(text)
                    if text.iter().all(u8::is_ascii_whitespace)
                        && matches!(stack.last().and_then(|p| p.children.last()), Some(Node::Element(_))) => {}
                Event::Text(text) => {
                    let decoded = text.decode().map_err(|e| Error::xml(format!("malformed XML text: {e}")))?;
                    let unescaped = quick_xml::escape::unescape(&decoded)
                        .map_err(|e| Error::xml(format!("malformed XML text: {e}")))?;
                    push_text(&mut stack, &unescaped);
                }
                Event::GeneralRef(r) => {
                    let name = r.decode().map_err(|e| Error::xml(format!("malformed XML entity: {e}")))?;
                    let resolved =
                        resolve_entity(&name).ok_or_else(|| Error::xml(format!("unknown XML entity '&{name};'")))?;
                    push_text(&mut stack, &resolved);
                }
                Event::CData(data) => {
                    let s = String::from_utf8_lossy(&data).into_owned();
                    push_text(&mut stack, &s);
                }
                Event::Comment(c) => {
                    nodes.take()?;
                    if let Some(parent) = stack.last_mut() {
                        let s = String::from_utf8_lossy(&c).into_owned();
                        parent.children.push(Node::Comment(s));
                    }
                }
                Event::Eof => break,
                Event::Decl(_) | Event::PI(_) | Event::DocType(_) => {}
            }
        }
        if !stack.is_empty() {
            return Err(Error::xml(format!(
                "malformed XML: element <{}> is not closed",
                stack.last().map(|e| e.name.as_ref()).unwrap_or("")
            )));
        }
        Ok((root.ok_or_else(|| Error::xml("empty XML document"))?, raw))
    }

    /// Refuses the tree if `written`, the document [`Element::to_xml`] made
    /// of it, would be refused when read back: over [`MAX_DOCUMENT_BYTES`],
    /// or holding more than [`MAX_DOCUMENT_NODES`] elements, attributes and
    /// comments. The nodes are counted on the tree, which holds every one
    /// the text does: parsing a deep chain's definition again took
    /// milliseconds.
    pub fn check_readable(&self, written: &str) -> Result<()> {
        if written.len() > MAX_DOCUMENT_BYTES {
            return Err(Error::xml(format!("the document is refused: {}", super::limits::too_large())));
        }
        let mut nodes = NodeBudget(MAX_DOCUMENT_NODES);
        let mut stack = vec![self];
        while let Some(el) = stack.pop() {
            nodes.take()?;
            for _ in &el.attrs {
                nodes.take()?;
            }
            for child in &el.children {
                match child {
                    Node::Element(child) => stack.push(child),
                    Node::Comment(_) => nodes.take()?,
                    Node::Text(_) => {}
                }
            }
        }
        Ok(())
    }

    /// Formats the element as libvirt does: two-space indentation and
    /// single-quoted attributes; whitespace between elements is re-made.
    pub fn to_xml(&self) -> String {
        let mut out = String::with_capacity(256);
        write_tree(&mut out, self, 0);
        out
    }

    /// [`Element::to_xml`] with one more child after the others: `raw`, an
    /// element's XML as [`Element::parse_keeping_raw`] returned it, written
    /// back as it was read.
    pub fn to_xml_with_raw_child(&self, raw: &str) -> String {
        let mut out = String::with_capacity(raw.len() + 256);
        self.write_with_more(&mut out, 0, |out, depth| {
            indent(out, depth);
            out.push_str(raw);
            out.push('\n');
        });
        out
    }

    /// [`Element::to_xml`] with `last` as one more child after the others,
    /// without copying it into this element first.
    pub fn to_xml_with_child(&self, last: &Element) -> String {
        let mut out = String::with_capacity(256);
        self.write_with_more(&mut out, 0, |out, depth| last.write_at(out, depth));
        out
    }

    /// Appends this element and everything under it to `out` as
    /// [`Element::to_xml`] writes it, as a descendant at `depth`.
    pub fn write_at(&self, out: &mut String, depth: usize) {
        write_tree(out, self, depth);
    }

    /// Appends this element at `depth` with more children after its own:
    /// those `more` writes at the depth it is given. A document that holds a
    /// large subtree it does not own (a snapshot record's domain) is written
    /// this way instead of copying the subtree into it first.
    pub fn write_with_more(&self, out: &mut String, depth: usize, more: impl FnOnce(&mut String, usize)) {
        start_tag(out, self, depth);
        out.push_str(">\n");
        for node in &self.children {
            match node {
                Node::Element(child) => write_tree(out, child, depth + 1),
                leaf => write_leaf(out, leaf, depth + 1),
            }
        }
        more(out, depth + 1);
        indent(out, depth);
        out.push_str("</");
        out.push_str(&self.name);
        out.push_str(">\n");
    }
}

/// Writes `top` and everything under it, `top` at `depth`.
fn write_tree(out: &mut String, top: &Element, depth: usize) {
    // Each frame: element, index of the next child to write, depth.
    let mut stack: Vec<(&Element, usize, usize)> = vec![(top, 0, depth)];
    open_tag(out, top, depth);
    while let Some(frame) = stack.last_mut() {
        let (el, next, depth) = (frame.0, frame.1, frame.2);
        if is_inline(el) {
            for node in &el.children {
                if let Node::Text(t) = node {
                    escape_into(out, t, false);
                }
            }
            close_tag(out, el, depth, true);
            stack.pop();
            continue;
        }
        match el.children.get(next) {
            None => {
                close_tag(out, el, depth, false);
                stack.pop();
            }
            Some(node) => {
                frame.1 += 1;
                match node {
                    Node::Element(child) => {
                        open_tag(out, child, depth + 1);
                        stack.push((child, 0, depth + 1));
                    }
                    leaf => write_leaf(out, leaf, depth + 1),
                }
            }
        }
    }
}

/// Writes a text or comment child of an element written over several lines.
fn write_leaf(out: &mut String, node: &Node, depth: usize) {
    match node {
        Node::Text(t) if !t.trim().is_empty() => {
            indent(out, depth);
            escape_into(out, t.trim(), false);
            out.push('\n');
        }
        Node::Comment(c) => {
            indent(out, depth);
            out.push_str("<!--");
            out.push_str(c);
            out.push_str("-->\n");
        }
        Node::Text(_) | Node::Element(_) => {}
    }
}

/// The reader's byte offset into the document it reads from a `&str`.
fn position(reader: &Reader<&[u8]>) -> usize {
    usize::try_from(reader.buffer_position()).unwrap_or(usize::MAX)
}

fn push_text(stack: &mut [Element], text: &str) {
    if let Some(parent) = stack.last_mut() {
        if let Some(Node::Text(prev)) = parent.children.last_mut() {
            prev.push_str(text);
        } else {
            parent.children.push(Node::Text(text.to_string()));
        }
    }
}

fn resolve_entity(name: &str) -> Option<String> {
    if let Some(num) = name.strip_prefix('#') {
        let code = match num.strip_prefix('x') {
            Some(hex) => u32::from_str_radix(hex, 16).ok()?,
            None => num.parse().ok()?,
        };
        return char::from_u32(code).map(String::from);
    }
    quick_xml::escape::resolve_xml_entity(name).map(String::from)
}

/// How many more elements, attributes and comments a document may hold.
struct NodeBudget(usize);

impl NodeBudget {
    fn take(&mut self) -> Result<()> {
        self.0 = self.0.checked_sub(1).ok_or_else(|| {
            Error::xml(format!(
                "the document has more than {MAX_DOCUMENT_NODES} elements, attributes and comments, the limit on an XML document"
            ))
        })?;
        Ok(())
    }
}

fn element_from_start(start: &BytesStart<'_>, nodes: &mut NodeBudget) -> Result<Element> {
    nodes.take()?;
    let mut el = Element::new(interned(start.name().as_ref()));
    // quick-xml's duplicate check compares each attribute with every one
    // before it; duplicates are found below by sorting instead, so that a
    // start tag of a million attributes costs no more than a million elements.
    for attr in start.attributes().with_checks(false) {
        nodes.take()?;
        let attr = attr.map_err(|e| Error::xml(format!("malformed attribute in <{}>: {e}", el.name)))?;
        let key = interned(attr.key.as_ref());
        let value = attr
            .unescape_value()
            .map_err(|e| Error::xml(format!("malformed attribute '{key}' in <{}>: {e}", el.name)))?
            .into_owned();
        el.attrs.push((key, value));
    }
    if el.attrs.len() > 1 {
        let mut keys: Vec<&str> = el.attrs.iter().map(|(k, _)| k.as_ref()).collect();
        keys.sort_unstable();
        if let Some(pair) = keys.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(Error::xml(format!("attribute '{}' appears twice in <{}>", pair[0], el.name)));
        }
    }
    Ok(el)
}

/// An element or attribute name: a static string for the names of the
/// documents Strata writes itself (a backing chain's above all), else a
/// copy.
fn interned(name: &[u8]) -> Cow<'static, str> {
    const KNOWN: &[&str] = &[
        "address",
        "alias",
        "backingStore",
        "bus",
        "controller",
        "dev",
        "device",
        "disk",
        "disks",
        "domain",
        "domainsnapshot",
        "driver",
        "file",
        "format",
        "index",
        "interface",
        "job",
        "jobs",
        "mac",
        "mirror",
        "model",
        "name",
        "node",
        "root",
        "roots",
        "slot",
        "snapshot",
        "source",
        "target",
        "type",
        "unit",
    ];
    match KNOWN.binary_search_by(|known| known.as_bytes().cmp(name)) {
        Ok(at) => Cow::Borrowed(KNOWN[at]),
        Err(_) => Cow::Owned(String::from_utf8_lossy(name).into_owned()),
    }
}

fn attach(stack: &mut [Element], root: &mut Option<Element>, el: Element) -> Result<()> {
    match stack.last_mut() {
        Some(parent) => {
            parent.children.push(Node::Element(el));
            Ok(())
        }
        None if root.is_none() => {
            *root = Some(el);
            Ok(())
        }
        None => Err(Error::xml("malformed XML: more than one root element")),
    }
}

/// An element written on one line: no child elements, no comments.
fn is_inline(el: &Element) -> bool {
    el.children.iter().all(|n| matches!(n, Node::Text(_)))
        && el.children.iter().any(|n| matches!(n, Node::Text(t) if !t.trim().is_empty()))
}

/// Indentation stops growing past this depth, so a document nesting one
/// element per backing layer stays linear in size (a 10,000-layer chain
/// would otherwise take 400 MB). Real domains never reach it.
const MAX_INDENT_DEPTH: usize = 32;

fn indent(out: &mut String, depth: usize) {
    for _ in 0..depth.min(MAX_INDENT_DEPTH) {
        out.push_str("  ");
    }
}

/// Writes a start tag up to its closing `>` (which the caller writes).
fn start_tag(out: &mut String, el: &Element, depth: usize) {
    indent(out, depth);
    out.push('<');
    out.push_str(&el.name);
    for (k, v) in &el.attrs {
        out.push(' ');
        out.push_str(k);
        out.push_str("='");
        escape_into(out, v, true);
        out.push('\'');
    }
}

fn open_tag(out: &mut String, el: &Element, depth: usize) {
    start_tag(out, el, depth);
    let empty = el.children.iter().all(|n| matches!(n, Node::Text(t) if t.trim().is_empty()));
    if empty {
        out.push_str("/>\n");
    } else if is_inline(el) {
        out.push('>');
    } else {
        out.push_str(">\n");
    }
}

fn close_tag(out: &mut String, el: &Element, depth: usize, inline: bool) {
    let empty = el.children.iter().all(|n| matches!(n, Node::Text(t) if t.trim().is_empty()));
    if empty {
        return;
    }
    if !inline {
        indent(out, depth);
    }
    out.push_str("</");
    out.push_str(&el.name);
    out.push_str(">\n");
}

fn escape_into(out: &mut String, s: &str, attribute: bool) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' if attribute => out.push_str("&apos;"),
            '"' if attribute => out.push_str("&quot;"),
            _ => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_raw_child_is_kept_as_read_and_written_back_unchanged() {
        let doc = Element::new("status")
            .with_attr("id", "1")
            .with_child(Element::new("jobs").with_child(Element::new("job").with_attr("disk", "vda")))
            .with_child(
                Element::new("domain")
                    .with_child(Element::new("name").with_text("vm & co"))
                    .with_child(Element::new("devices").with_child(Element::new("disk"))),
            )
            .with_child(Element::new("domain").with_child(Element::new("name").with_text("second")));
        let xml = doc.to_xml();
        let (root, raw) = Element::parse_keeping_raw(&xml, "domain").expect("parse");
        let raw = &xml[raw.expect("the first <domain> is kept raw")];
        assert_eq!(
            raw,
            "<domain>\n    <name>vm &amp; co</name>\n    <devices>\n      <disk/>\n    </devices>\n  </domain>"
        );
        assert_eq!(Element::parse(raw).expect("the raw part parses").child_text("name").as_deref(), Some("vm & co"));
        // Only the first is kept raw; the others stay in the tree.
        assert_eq!(root.children_named("domain").count(), 1);
        assert_eq!(root.child("domain").and_then(|d| d.child_text("name")).as_deref(), Some("second"));
        let mut whole = Element::parse(&xml).expect("parse");
        let first = whole.take_child("domain").expect("first domain");
        whole.children.push(Node::Element(first));
        assert_eq!(root.to_xml_with_raw_child(raw), whole.to_xml());
        let parsed_raw = Element::parse(raw).expect("the raw part parses");
        assert_eq!(root.to_xml_with_child(&parsed_raw), whole.to_xml());
    }

    #[test]
    fn names_strata_writes_are_not_allocated_and_others_are_kept_as_written() {
        let xml = "<disk type='file'><source file='/a'/><backingStore type='file' index='1'><format type='qcow2'/>\
                   <source file='/b'/></backingStore><q:thing q:attr='x'/></disk>";
        let el = Element::parse(xml).expect("parse");
        let backing = el.child("backingStore").expect("backingStore");
        assert!(matches!(backing.name, Cow::Borrowed("backingStore")));
        assert!(backing.attrs.iter().all(|(k, _)| matches!(k, Cow::Borrowed(_))), "{:?}", backing.attrs);
        let unknown = el.child("q:thing").expect("an element Strata does not know");
        assert!(matches!(&unknown.name, Cow::Owned(n) if n == "q:thing"));
        assert_eq!(unknown.attr("q:attr"), Some("x"));
        assert_eq!(Element::parse(&el.to_xml()).expect("parse again"), el);
    }

    #[test]
    fn a_raw_child_is_looked_for_under_the_root_only() {
        let xml = "<status><jobs><domain/></jobs><domain/></status>";
        let (root, raw) = Element::parse_keeping_raw(xml, "domain").expect("parse");
        assert_eq!(raw.map(|r| &xml[r]), Some("<domain/>"));
        assert!(root.child("jobs").and_then(|j| j.child("domain")).is_some());
        let (_, none) = Element::parse_keeping_raw("<status><jobs/></status>", "domain").expect("parse");
        assert_eq!(none, None);
    }

    #[test]
    fn an_unclosed_raw_child_is_refused() {
        let err = Element::parse_keeping_raw("<status><domain><name>x</name></status>", "domain")
            .expect_err("an unclosed <domain> is refused");
        assert!(err.to_string().contains("malformed XML"), "{err}");
    }

    #[test]
    fn round_trip_keeps_unknown_content_and_formats_like_libvirt() {
        let input = r#"<?xml version="1.0"?>
<domain type="kvm" xmlns:q="urn:x"><name>vm1</name>
   <!-- hello -->
 <devices><graphics type="vnc" port="-1" custom='a&apos;b &amp; c'/><q:thing/></devices><cpu mode="host-model"><feature policy="require" name="x2apic"/></cpu></domain>"#;
        let el = Element::parse(input).expect("parse");
        let out = el.to_xml();
        assert_eq!(
            out,
            "<domain type='kvm' xmlns:q='urn:x'>\n  <name>vm1</name>\n  <!-- hello -->\n  <devices>\n    <graphics type='vnc' port='-1' custom='a&apos;b &amp; c'/>\n    <q:thing/>\n  </devices>\n  <cpu mode='host-model'>\n    <feature policy='require' name='x2apic'/>\n  </cpu>\n</domain>\n"
        );
        assert_eq!(Element::parse(&out).expect("reparse").to_xml(), out);
    }

    #[test]
    fn layout_whitespace_goes_and_text_stays() {
        let el = Element::parse("<a>\n  <b> </b>\n  <c/>\n  tail\n  <d/>\n</a>").expect("parse");
        // Whitespace-only content of a leaf is text; between elements it is layout.
        assert_eq!(el.child("b").map(Element::text).as_deref(), Some(" "));
        let kinds: Vec<String> = el
            .children
            .iter()
            .map(|n| match n {
                Node::Element(e) => e.name.to_string(),
                Node::Text(t) => format!("text:{}", t.trim()),
                Node::Comment(_) => "comment".into(),
            })
            .collect();
        assert_eq!(kinds, ["b", "c", "text:tail", "d"]);
    }

    #[test]
    fn take_child_moves_the_first_named_subtree_out() {
        let mut el = Element::parse("<a><x n='1'><y/></x><z/><x n='2'/></a>").expect("parse");
        let taken = el.take_child("x").expect("x");
        assert_eq!(taken.to_xml(), "<x n='1'>\n  <y/>\n</x>\n");
        assert_eq!(el.to_xml(), "<a>\n  <z/>\n  <x n='2'/>\n</a>\n");
        assert!(el.take_child("missing").is_none());
    }

    #[test]
    fn malformed_documents_are_errors_not_panics() {
        for bad in ["", "<a>", "<a></b>", "<a/><b/>", "<a x='1' x='2'/>", "<a>&bogus;</a>"] {
            assert!(Element::parse(bad).is_err(), "{bad:?} should fail");
        }
    }

    #[test]
    fn documents_over_the_node_limit_are_refused_early() {
        let within = format!("<a>{}</a>", "<b/>".repeat(MAX_DOCUMENT_NODES - 1));
        assert!(Element::parse(&within).is_ok());
        // Elements, attributes and comments all count.
        let cases = [
            format!("<a>{}</a>", "<b/>".repeat(MAX_DOCUMENT_NODES)),
            format!("<a>{}</a>", "<!---->".repeat(MAX_DOCUMENT_NODES)),
            format!("<a {}/>", (0..MAX_DOCUMENT_NODES).map(|i| format!("x{i}=''")).collect::<Vec<_>>().join(" ")),
        ];
        for xml in cases {
            let err = Element::parse(&xml).expect_err("over the node limit");
            assert!(err.to_string().contains(&format!("more than {MAX_DOCUMENT_NODES} elements")), "{err}");
        }
        // A tree is checked as its text would be when read back.
        let tree = |children: usize, attrs: usize, comments: usize| {
            let mut el = Element::new("a");
            el.attrs = (0..attrs).map(|i| (Cow::Owned(format!("x{i}")), String::new())).collect();
            el.children.extend((0..children).map(|_| Node::Element(Element::new("b"))));
            el.children.extend((0..comments).map(|_| Node::Comment(String::new())));
            el
        };
        let within = tree(MAX_DOCUMENT_NODES / 2, MAX_DOCUMENT_NODES / 4, MAX_DOCUMENT_NODES / 4 - 1);
        let text = within.to_xml();
        within.check_readable(&text).expect("within the limit");
        Element::parse(&text).expect("read back");
        for over in [tree(MAX_DOCUMENT_NODES, 0, 0), tree(0, MAX_DOCUMENT_NODES, 0), tree(1, 0, MAX_DOCUMENT_NODES - 1)]
        {
            let text = over.to_xml();
            let err = over.check_readable(&text).expect_err("over the node limit");
            assert!(err.to_string().contains(&format!("more than {MAX_DOCUMENT_NODES} elements")), "{err}");
            assert!(Element::parse(&text).is_err(), "the text of a refused tree reads back");
        }
        let mut long = Element::new("a");
        long.children.push(Node::Text("x".repeat(MAX_DOCUMENT_BYTES)));
        let err = long.check_readable(&long.to_xml()).expect_err("over the byte limit");
        assert!(err.to_string().contains("10 MiB"), "{err}");
        // Over the byte limit, refused before parsing: the tag is unclosed.
        let huge = format!("<a>{}", " ".repeat(MAX_DOCUMENT_BYTES));
        let err = Element::parse(&huge).expect_err("over the byte limit");
        assert!(err.to_string().contains("10 MiB"), "{err}");
    }

    #[test]
    fn deep_nesting_parses_formats_and_drops() {
        let depth = 20_000;
        let mut xml = String::new();
        for _ in 0..depth {
            xml.push_str("<b>");
        }
        for _ in 0..depth {
            xml.push_str("</b>");
        }
        // Run on a small stack to prove nothing recurses per level.
        let handle = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                let el = Element::parse(&xml).expect("parse");
                let out = el.to_xml();
                assert_eq!(out.matches("<b>").count(), depth - 1);
                drop(el);
            })
            .expect("spawn");
        handle.join().expect("deep nesting thread");
    }

    #[test]
    fn insert_ordered_follows_libvirt_order_and_keeps_unknowns() {
        let mut disk = Element::parse("<disk><driver/><source/><x-unknown/><target/><alias/></disk>").expect("parse");
        let order = ["driver", "source", "backingStore", "mirror", "target"];
        disk.insert_ordered(Element::new("backingStore"), &order);
        let names: Vec<&str> = disk.elements().map(|e| e.name.as_ref()).collect();
        assert_eq!(names, ["driver", "source", "backingStore", "x-unknown", "target", "alias"]);
    }
}
