//! Where a layer's data lives, and how backing strings in image headers
//! map to it: the forms libvirt parses (paths, `fat:`, URIs, the legacy
//! `nbd:` and `rbd:` syntaxes, `json:{…}`), recorded as libvirt records
//! them, except where QEMU would open something else (see
//! [`parse_backing_string`]).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// A layer's storage, mirroring libvirt's disk types.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "type")]
pub enum StorageSource {
    File {
        path: PathBuf,
    },
    Block {
        dev: PathBuf,
    },
    Network(Box<NetworkSource>),
    Volume {
        pool: String,
        volume: String,
    },
    Dir {
        dir: PathBuf,
    },
    Nvme(NvmeSource),
    /// A vhost-user block backend listening on a Unix socket.
    VhostUser {
        socket: PathBuf,
    },
    /// A vDPA device node (`/dev/vhost-vdpa-N`).
    VhostVdpa {
        dev: PathBuf,
    },
}

impl StorageSource {
    /// libvirt's `type` attribute for this source.
    pub fn type_name(&self) -> &'static str {
        match self {
            StorageSource::File { .. } => "file",
            StorageSource::Block { .. } => "block",
            StorageSource::Network(_) => "network",
            StorageSource::Volume { .. } => "volume",
            StorageSource::Dir { .. } => "dir",
            StorageSource::Nvme(_) => "nvme",
            StorageSource::VhostUser { .. } => "vhostuser",
            StorageSource::VhostVdpa { .. } => "vhostvdpa",
        }
    }

    /// The local file, device or directory holding the image, when there is
    /// one (not a socket or a PCI device).
    pub fn local_path(&self) -> Option<&Path> {
        match self {
            StorageSource::File { path } => Some(path),
            StorageSource::Block { dev } => Some(dev),
            StorageSource::Dir { dir } => Some(dir),
            _ => None,
        }
    }

    /// A local file or block device at `path`, typed by what is there.
    pub fn local(path: PathBuf) -> StorageSource {
        use std::os::unix::fs::FileTypeExt;
        match std::fs::metadata(&path) {
            Ok(m) if m.file_type().is_block_device() => StorageSource::Block { dev: path },
            _ => StorageSource::File { path },
        }
    }
}

impl fmt::Display for StorageSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageSource::File { path } => write!(f, "{}", path.display()),
            StorageSource::Block { dev } | StorageSource::VhostVdpa { dev } => write!(f, "{}", dev.display()),
            StorageSource::Dir { dir } => write!(f, "{}", dir.display()),
            StorageSource::Volume { pool, volume } => write!(f, "{pool}/{volume}"),
            StorageSource::Network(n) => write!(f, "{n}"),
            StorageSource::Nvme(n) => write!(f, "nvme://{}/{}", n.address, n.namespace),
            StorageSource::VhostUser { socket } => write!(f, "vhost-user:{}", socket.display()),
        }
    }
}

/// A network image (`<source protocol=… name=…><host …/>…</source>`), with
/// the children libvirt records from a backing string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct NetworkSource {
    pub protocol: String,
    /// For gluster and rbd, `VOLUME/PATH` and `POOL/IMAGE`, as libvirt writes it.
    pub name: Option<String>,
    /// An http(s) URI's query, kept as written.
    pub query: Option<String>,
    pub hosts: Vec<NetworkHost>,
    /// An rbd image's snapshot (`<snapshot name>`).
    pub snapshot: Option<String>,
    /// An rbd configuration file (`<config file>`).
    pub config_file: Option<String>,
    /// https/ftps certificate checking (`<ssl verify>`).
    pub ssl_verify: Option<bool>,
    /// http(s) cookies, `(name, value)` (`<cookies>`).
    pub cookies: Vec<(String, String)>,
    /// Bytes of read-ahead (`<readahead size>`).
    pub readahead: Option<u64>,
    /// Seconds (`<timeout seconds>`).
    pub timeout: Option<u64>,
    /// NFS user and group, `+UID` and `+GID` (`<identity>`).
    pub identity: Option<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct NetworkHost {
    pub name: Option<String>,
    pub port: Option<u16>,
    /// `unix` or `rdma`; absent for TCP, as libvirt writes it.
    pub transport: Option<String>,
    pub socket: Option<String>,
}

impl fmt::Display for NetworkSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://", self.protocol)?;
        if let Some(h) = self.hosts.first() {
            if let Some(name) = &h.name {
                write!(f, "{name}")?;
                if let Some(port) = h.port {
                    write!(f, ":{port}")?;
                }
            }
        }
        write!(f, "/{}", self.name.as_deref().unwrap_or(""))?;
        if let Some(sock) = self.hosts.first().and_then(|h| h.socket.as_ref()) {
            write!(f, "?socket={sock}")?;
        }
        Ok(())
    }
}

/// An NVMe namespace on a PCI controller (`<disk type='nvme'>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NvmeSource {
    pub address: PciAddress,
    pub namespace: u64,
    /// `managed='yes|no'` when written.
    pub managed: Option<String>,
}

/// A PCI address, `DDDD:BB:SS.F`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PciAddress {
    pub domain: u32,
    pub bus: u32,
    pub slot: u32,
    pub function: u32,
}

impl PciAddress {
    /// Parses `DDDD:BB:SS.F` (hexadecimal, as QEMU's nvme driver takes it).
    pub fn parse(text: &str) -> Option<PciAddress> {
        let (domain, rest) = text.split_once(':')?;
        let (bus, rest) = rest.split_once(':')?;
        let (slot, function) = rest.split_once('.')?;
        let hex = |s: &str| u32::from_str_radix(s, 16).ok();
        Some(PciAddress { domain: hex(domain)?, bus: hex(bus)?, slot: hex(slot)?, function: hex(function)? })
    }
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:02x}:{:02x}.{:x}", self.domain, self.bus, self.slot, self.function)
    }
}

/// A byte range of the storage that holds the image (`<slices><slice
/// type='storage' offset size/></slices>`), as QEMU's raw driver opens it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Slice {
    pub offset: u64,
    pub size: Option<u64>,
}

/// What a backing string names: the storage, and what the string itself
/// says about the image on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingImage {
    pub source: StorageSource,
    /// The format a `json:` string's format driver gives, or `fat` for
    /// `fat:DIR`; the image header's backing format takes precedence, as
    /// in QEMU.
    pub format: Option<String>,
    /// A `json:` string's raw `offset`/`size`.
    pub slice: Option<Slice>,
}

impl BackingImage {
    fn of(source: StorageSource) -> BackingImage {
        BackingImage { source, format: None, slice: None }
    }
}

/// libvirt's network protocols, with their default ports
/// (`virStorageSourceNetworkDefaultPort`; rbd and nfs have none).
const PROTOCOLS: &[(&str, Option<u16>)] = &[
    ("nbd", Some(10809)),
    ("rbd", None),
    ("sheepdog", Some(7000)),
    ("gluster", Some(24007)),
    ("iscsi", Some(3260)),
    ("http", Some(80)),
    ("https", Some(443)),
    ("ftp", Some(21)),
    ("ftps", Some(990)),
    ("tftp", Some(69)),
    ("ssh", Some(22)),
    ("vxhs", Some(9999)),
    ("nfs", None),
];

/// Resolves a backing string from the header of the image at `image_path`
/// into the image QEMU would open, or refuses it.
///
/// As QEMU reads it, a name with a `:` before any `/` starts with a
/// protocol; any other name is a path, and a relative one resolves against
/// the directory of the image path as given, without resolving symlinks.
/// Where libvirt and QEMU differ, what QEMU opens wins: `file:/x` is the
/// file `/x` (libvirt refuses the prefix), a relative file name after
/// `file:` or in `json:` is refused (QEMU opens it from its own working
/// directory; libvirt records it relative), and a `json:` format driver
/// other than `raw` gives the layer's format (libvirt refuses it).
pub fn parse_backing_string(backing: &str, image_path: &Path) -> Result<BackingImage> {
    let Some(protocol) = protocol_prefix(backing) else {
        let path = Path::new(backing);
        let full = if path.is_absolute() {
            path.to_path_buf()
        } else {
            image_path.parent().unwrap_or(Path::new("")).join(path)
        };
        return Ok(BackingImage::of(StorageSource::local(super::clean_path(&full))));
    };
    let rest = &backing[protocol.len() + 1..];
    let refuse =
        |why: &str| Error::probe_failed(format!("backing file '{backing}' of '{}' {why}", image_path.display()));
    match protocol {
        "json" => parse_json_backing(rest, backing),
        "fat" => parse_fat(rest).map_err(|why| refuse(&why)),
        // QEMU's file protocol takes the rest literally: an absolute path,
        // or one relative to QEMU's own working directory (not the image's).
        "file" => match Path::new(rest) {
            _ if rest.is_empty() => Err(refuse("names no file after 'file:'")),
            p if p.is_relative() => Err(refuse(
                "names a relative file after 'file:', which QEMU opens from its own working directory, \
                 not the image's; rewrite it without the prefix or as an absolute path (qemu-img rebase -u)",
            )),
            p => Ok(BackingImage::of(StorageSource::local(super::clean_path(p)))),
        },
        _ if rest.starts_with("//") => {
            parse_uri(backing).map(|n| BackingImage::of(StorageSource::Network(Box::new(n))))
        }
        "nbd" => parse_nbd_colon(backing).map(|n| BackingImage::of(StorageSource::Network(Box::new(n)))),
        "rbd" => parse_rbd_colon(rest).map(|n| BackingImage::of(StorageSource::Network(Box::new(n)))),
        _ if protocol_port(protocol).is_some() => Err(refuse(&format!(
            "uses protocol '{protocol}' without a URI ('{protocol}://…'), which libvirt does not read"
        ))),
        _ => Err(refuse(&format!("uses protocol '{protocol}', which Strata does not know"))),
    }
}

/// The protocol a backing name starts with, by QEMU's rule
/// (`path_has_protocol`): the text before a `:` that comes before any `/`.
fn protocol_prefix(backing: &str) -> Option<&str> {
    let end = backing.find([':', '/'])?;
    backing[end..].starts_with(':').then(|| &backing[..end])
}

/// `Some(default port)` for a protocol libvirt knows.
fn protocol_port(protocol: &str) -> Option<Option<u16>> {
    PROTOCOLS.iter().find(|(p, _)| *p == protocol).map(|(_, port)| *port)
}

/// libvirt's `virStorageSourceNetworkAssignDefaultPorts`: a TCP host
/// without a port gets the protocol's default.
fn assign_default_ports(source: &mut NetworkSource) {
    let default = protocol_port(&source.protocol).flatten();
    for host in &mut source.hosts {
        if host.transport.is_none() && host.port.is_none() {
            host.port = default;
        }
    }
}

/// `fat:DIR`: QEMU's virtual FAT disk of a directory, which libvirt records
/// as a `dir` source of format `fat`; it has no backing image.
fn parse_fat(dir: &str) -> std::result::Result<BackingImage, String> {
    const VVFAT_OPTIONS: &[&str] = &["floppy:", "rw:", "12:", "16:", "32:"];
    if let Some(option) = VVFAT_OPTIONS.iter().find(|o| dir.starts_with(**o)) {
        return Err(format!("gives QEMU's vvfat option '{option}', which libvirt cannot record"));
    }
    if !Path::new(dir).is_absolute() {
        return Err("names a relative directory after 'fat:', which QEMU opens from its own working directory".into());
    }
    Ok(BackingImage {
        source: StorageSource::Dir { dir: super::clean_path(Path::new(dir)) },
        format: Some("fat".into()),
        slice: None,
    })
}

fn parse_port(text: &str, whole: &str) -> Result<u16> {
    text.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
        Error::probe_failed(format!("backing string '{whole}' has a port '{text}' that is not a port number"))
    })
}

/// Decodes `%XX` escapes, as libvirt's URI parser does for a URI's path.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `PROTOCOL[+TRANSPORT]://[USER@]HOST[:PORT]/PATH[?QUERY]`, as libvirt's
/// `virStorageSourceParseBackingURI` reads it: the path percent-decoded
/// without its leading `/` (for gluster, `VOLUME/PATH`), an http(s) query
/// kept, `?socket=` taken as a Unix transport's socket, user information
/// dropped (libvirt does not record credentials).
fn parse_uri(uri: &str) -> Result<NetworkSource> {
    let bad = |why: String| Error::probe_failed(format!("backing URI '{uri}' is not valid: {why}"));
    let (scheme, rest) = uri.split_once("://").ok_or_else(|| bad("it has no '://'".into()))?;
    let (protocol, transport) = match scheme.split_once('+') {
        Some((p, t)) => (p, Some(t)),
        None => (scheme, None),
    };
    if protocol_port(protocol).is_none() {
        return Err(bad(format!("protocol '{protocol}' is not one libvirt knows")));
    }
    let transport = match transport {
        None | Some("tcp") => None,
        Some(t @ ("unix" | "rdma")) => Some(t.to_string()),
        Some(other) => return Err(bad(format!("transport '{other}' is not tcp, unix or rdma"))),
    };
    let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let server = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let mut host = NetworkHost { transport, ..Default::default() };
    let (name, port) = match server.strip_prefix('[') {
        Some(v6) => {
            let (name, after) = v6.split_once(']').ok_or_else(|| bad(format!("host '{server}' has no ']'")))?;
            (name, after.strip_prefix(':'))
        }
        None => match server.rsplit_once(':') {
            Some((name, port)) => (name, Some(port)),
            None => (server, None),
        },
    };
    host.name = (!name.is_empty()).then(|| name.to_string());
    host.port = port.filter(|p| !p.is_empty()).map(|p| parse_port(p, uri)).transpose()?;
    let mut source = NetworkSource { protocol: protocol.to_string(), ..Default::default() };
    match query {
        Some(q) if matches!(protocol, "http" | "https") => source.query = Some(q.to_string()),
        Some(q) => host.socket = q.strip_prefix("socket=").map(str::to_string),
        None => {}
    }
    if host.transport.as_deref() == Some("unix") && host.socket.is_none() {
        return Err(bad("a unix transport needs '?socket=PATH'".into()));
    }
    let path = percent_decode(path);
    let path = path.strip_prefix('/').unwrap_or(&path);
    source.name = match protocol {
        "nbd" if path.is_empty() => None,
        "gluster" => match path.split_once('/') {
            Some((volume, _)) if !volume.is_empty() => Some(path.to_string()),
            _ => return Err(bad(format!("gluster path '{path}' does not name a volume and an image"))),
        },
        _ => Some(path.to_string()),
    };
    source.hosts.push(host);
    assign_default_ports(&mut source);
    Ok(source)
}

/// The legacy `nbd:HOST:PORT[:exportname=E]` and
/// `nbd:unix:PATH[:exportname=E]`, cut as QEMU and libvirt cut them.
fn parse_nbd_colon(whole: &str) -> Result<NetworkSource> {
    let malformed = || Error::probe_failed(format!("backing string '{whole}' is a malformed nbd string"));
    let (spec, export) = match whole.find(":exportname=") {
        Some(i) => (&whole[..i], Some(whole[i + ":exportname=".len()..].to_string())),
        None => (whole, None),
    };
    let spec = spec.strip_prefix("nbd:").filter(|s| !s.is_empty()).ok_or_else(malformed)?;
    let host = match spec.strip_prefix("unix:") {
        Some("") => return Err(malformed()),
        Some(socket) => {
            NetworkHost { transport: Some("unix".into()), socket: Some(socket.to_string()), ..Default::default() }
        }
        None => {
            let (name, port) = match spec.strip_prefix('[') {
                Some(v6) => v6.split_once("]:").ok_or_else(malformed)?,
                None => spec.split_once(':').ok_or_else(malformed)?,
            };
            if name.is_empty() {
                return Err(malformed());
            }
            NetworkHost { name: Some(name.to_string()), port: Some(parse_port(port, whole)?), ..Default::default() }
        }
    };
    Ok(NetworkSource { protocol: "nbd".into(), name: export, hosts: vec![host], ..Default::default() })
}

/// `rbd:POOL/IMAGE[@SNAP][:OPT=VAL…]` as libvirt reads it: options are
/// split on unescaped `:`; `mon_host` lists hosts split on `\;`, `\,` or
/// `\ `, each `NAME[\:PORT]` or `[V6]\:PORT`; `conf` is the configuration
/// file; `id` is a credential, which libvirt drops from backing stores.
fn parse_rbd_colon(text: &str) -> Result<NetworkSource> {
    let (image, options) = match text.split_once(':') {
        Some((i, o)) => (i, Some(o)),
        None => (text, None),
    };
    let (image, snapshot) = match image.split_once('@') {
        Some((i, s)) => (i, Some(s.to_string())),
        None => (image, None),
    };
    let mut source =
        NetworkSource { protocol: "rbd".into(), name: Some(image.to_string()), snapshot, ..Default::default() };
    for option in split_unescaped(options.unwrap_or(""), ':') {
        if let Some(hosts) = option.strip_prefix("mon_host=") {
            let separated = hosts.replace("\\;", "\0").replace("\\,", "\0").replace("\\ ", "\0");
            for host in separated.split('\0').filter(|h| !h.is_empty()) {
                source.hosts.push(parse_rbd_host(host, text)?);
            }
        } else if let Some(conf) = option.strip_prefix("conf=") {
            source.config_file = Some(conf.to_string());
        }
    }
    Ok(source)
}

/// Splits at each `sep` not preceded by a backslash; escapes are kept.
fn split_unescaped(text: &str, sep: char) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            c if c == sep => {
                parts.push(&text[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    if start < text.len() {
        parts.push(&text[start..]);
    }
    parts
}

fn parse_rbd_host(host: &str, whole: &str) -> Result<NetworkHost> {
    let (name, port) = match host.strip_prefix('[') {
        Some(v6) => match v6.split_once("]\\:") {
            Some((n, p)) => (n.to_string(), Some(p)),
            None => (v6.trim_end_matches(']').to_string(), None),
        },
        None => match host.split_once("\\:") {
            Some((n, p)) => (n.to_string(), Some(p)),
            None => (host.to_string(), None),
        },
    };
    Ok(NetworkHost {
        name: Some(name.replace("\\:", ":")),
        port: port.map(|p| parse_port(p, whole)).transpose()?,
        ..Default::default()
    })
}

/// QEMU's protocol drivers that libvirt reads in a `json:` string.
const JSON_PROTOCOL_DRIVERS: &[&str] = &[
    "file",
    "host_device",
    "host_cdrom",
    "http",
    "https",
    "ftp",
    "ftps",
    "tftp",
    "gluster",
    "iscsi",
    "nbd",
    "sheepdog",
    "ssh",
    "rbd",
    "nfs",
    "vxhs",
    "nvme",
];

type Parsed<T> = std::result::Result<T, String>;

/// `json:{…}`: QEMU's block options as JSON, nested or with dotted keys
/// (`"file.server.0.host"`), read as libvirt's
/// `virStorageSourceParseBackingJSON` reads them: the protocol layer, at
/// the top or under `file`, optionally wrapped in one format driver.
fn parse_json_backing(json: &str, whole: &str) -> Result<BackingImage> {
    let bad = |why: String| Error::probe_failed(format!("backing string '{whole}' is not valid: {why}"));
    let value: Value = serde_json::from_str(json).map_err(|e| bad(format!("its JSON does not parse: {e}")))?;
    let Value::Object(root) = value else { return Err(bad("its JSON is not an object".into())) };
    let root = deflatten(root).map_err(bad)?;
    let top = match root.get("file") {
        Some(Value::Object(file)) if !root.contains_key("driver") => file,
        _ => &root,
    };
    let driver = text(top, "driver").ok_or_else(|| bad("it names no driver".into()))?;
    if JSON_PROTOCOL_DRIVERS.contains(&driver) {
        return json_protocol(top, driver).map(BackingImage::of).map_err(bad);
    }
    let Some(Value::Object(file)) = top.get("file") else {
        return Err(bad(format!("driver '{driver}' is not a protocol Strata knows and wraps no 'file' object")));
    };
    let inner = text(file, "driver").ok_or_else(|| bad(format!("the 'file' of driver '{driver}' names no driver")))?;
    if !JSON_PROTOCOL_DRIVERS.contains(&inner) {
        return Err(bad(format!("format driver '{driver}' wraps '{inner}', which is not a protocol Strata knows")));
    }
    let slice = match (top.get("offset"), top.get("size")) {
        (None, None) => None,
        (offset, size) if driver == "raw" => Some(Slice {
            offset: offset.map(|v| number(v, "offset")).transpose().map_err(bad)?.unwrap_or(0),
            size: size.map(|v| number(v, "size")).transpose().map_err(bad)?,
        }),
        _ => return Err(bad(format!("format driver '{driver}' has 'offset' or 'size', which only 'raw' takes"))),
    };
    Ok(BackingImage { source: json_protocol(file, inner).map_err(bad)?, format: Some(driver.to_string()), slice })
}

/// Expands dotted keys into nested objects and objects keyed `0`…`n-1`
/// into arrays, as QEMU and libvirt do.
fn deflatten(obj: Map<String, Value>) -> Parsed<Map<String, Value>> {
    let mut out = Map::new();
    for (key, value) in obj {
        let value = match value {
            Value::Object(o) => Value::Object(deflatten(o)?),
            Value::Array(items) => Value::Array(
                items
                    .into_iter()
                    .map(|v| match v {
                        Value::Object(o) => deflatten(o).map(Value::Object),
                        v => Ok(v),
                    })
                    .collect::<Parsed<_>>()?,
            ),
            v => v,
        };
        let mut parts: Vec<&str> = key.split('.').collect();
        let last = parts.pop().unwrap_or_default();
        let mut cursor = &mut out;
        for part in parts {
            let entry = cursor.entry(part.to_string()).or_insert_with(|| Value::Object(Map::new()));
            cursor = entry.as_object_mut().ok_or_else(|| format!("key '{key}' conflicts with another key"))?;
        }
        match (cursor.get_mut(last), value) {
            (Some(Value::Object(existing)), Value::Object(more)) => existing.extend(more),
            (Some(_), _) => return Err(format!("key '{key}' is given twice")),
            (None, value) => {
                cursor.insert(last.to_string(), value);
            }
        }
    }
    for value in out.values_mut() {
        numbered_to_array(value);
    }
    Ok(out)
}

fn numbered_to_array(value: &mut Value) {
    if let Value::Object(o) = value {
        if !o.is_empty() && (0..o.len()).all(|i| o.contains_key(&i.to_string())) {
            let items = (0..o.len()).filter_map(|i| o.remove(&i.to_string())).collect();
            *value = Value::Array(items);
        }
    }
}

fn text<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a str> {
    obj.get(key).and_then(Value::as_str)
}

fn required<'a>(obj: &'a Map<String, Value>, key: &str, what: &str) -> Parsed<&'a str> {
    text(obj, key).ok_or_else(|| format!("its {what} has no '{key}'"))
}

/// An unsigned number, given as a JSON number or a string of digits.
fn number(value: &Value, key: &str) -> Parsed<u64> {
    value
        .as_u64()
        .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
        .ok_or_else(|| format!("its '{key}' is not an unsigned number"))
}

/// A port, given as a string (QEMU's type) or a number.
fn port(obj: &Map<String, Value>) -> Parsed<Option<u16>> {
    let Some(value) = obj.get("port") else { return Ok(None) };
    number(value, "port")?
        .try_into()
        .ok()
        .filter(|p| *p > 0)
        .map(Some)
        .ok_or_else(|| "its 'port' is not a port number".into())
}

/// QEMU's `InetSocketAddress`: `host` and `port`.
fn inet_host(server: Option<&Value>, what: &str) -> Parsed<NetworkHost> {
    let server = server.and_then(Value::as_object).ok_or_else(|| format!("its {what} has no 'server'"))?;
    Ok(NetworkHost {
        name: Some(required(server, "host", "server")?.to_string()),
        port: port(server)?,
        ..Default::default()
    })
}

/// QEMU's `SocketAddress`: `inet` (or `tcp`) with `host` and `port`, or
/// `unix` with `path` (gluster's older spelling: `socket`).
fn socket_host(server: &Value) -> Parsed<NetworkHost> {
    let obj = server.as_object().ok_or("a 'server' is not an object")?;
    match required(obj, "type", "server")? {
        "inet" | "tcp" => inet_host(Some(server), "server"),
        "unix" => {
            let socket = text(obj, "path").or_else(|| text(obj, "socket")).ok_or("its unix server has no 'path'")?;
            Ok(NetworkHost { transport: Some("unix".into()), socket: Some(socket.to_string()), ..Default::default() })
        }
        other => Err(format!("its server type '{other}' is not inet, tcp or unix")),
    }
}

/// A URI given in a `json:` field, which must use `protocol`.
fn uri_of(uri: &str, protocol: &str) -> Parsed<NetworkSource> {
    let source = parse_uri(uri).map_err(|e| e.message().to_string())?;
    if source.protocol != protocol {
        return Err(format!("it expects protocol '{protocol}' but its URI '{uri}' uses '{}'", source.protocol));
    }
    Ok(source)
}

fn json_protocol(obj: &Map<String, Value>, driver: &str) -> Parsed<StorageSource> {
    let network = |source: NetworkSource| {
        let mut source = source;
        assign_default_ports(&mut source);
        Ok(StorageSource::Network(Box::new(source)))
    };
    let new = |protocol: &str| NetworkSource { protocol: protocol.to_string(), ..Default::default() };
    match driver {
        "file" | "host_device" | "host_cdrom" => {
            let path = PathBuf::from(required(obj, "filename", "file")?);
            if !path.is_absolute() {
                return Err(format!(
                    "its filename '{}' is relative, which QEMU opens from its own working directory",
                    path.display()
                ));
            }
            Ok(if driver == "file" { StorageSource::local(path) } else { StorageSource::Block { dev: path } })
        }
        "http" | "https" | "ftp" | "ftps" | "tftp" => {
            let mut source = uri_of(required(obj, "url", driver)?, driver)?;
            if matches!(driver, "https" | "ftps") {
                source.ssl_verify = match obj.get("sslverify") {
                    None => None,
                    Some(Value::Bool(b)) => Some(*b),
                    // libguestfs writes the undocumented 'off'.
                    Some(Value::String(s)) if s == "off" => Some(false),
                    Some(_) => return Err("its 'sslverify' is not a boolean".into()),
                };
            }
            if let (true, Some(cookies)) = (matches!(driver, "http" | "https"), obj.get("cookie")) {
                let cookies = cookies.as_str().ok_or("its 'cookie' is not a string")?;
                for cookie in cookies.split(';') {
                    let (name, value) = cookie
                        .trim_start()
                        .split_once('=')
                        .ok_or_else(|| format!("its cookie '{cookie}' has no '='"))?;
                    source.cookies.push((name.to_string(), value.to_string()));
                }
            }
            source.readahead = obj.get("readahead").map(|v| number(v, "readahead")).transpose()?;
            source.timeout = obj.get("timeout").map(|v| number(v, "timeout")).transpose()?;
            network(source)
        }
        "gluster" => {
            if let Some(uri) = text(obj, "filename") {
                return network(uri_of(uri, "gluster")?);
            }
            let servers = obj.get("server").and_then(Value::as_array).filter(|s| !s.is_empty());
            let (Some(volume), Some(path), Some(servers)) = (text(obj, "volume"), text(obj, "path"), servers) else {
                return Err("its gluster source needs 'volume', 'path' and at least one 'server'".into());
            };
            let mut source = new("gluster");
            source.name = Some(format!("{volume}/{path}"));
            source.hosts = servers.iter().map(socket_host).collect::<Parsed<_>>()?;
            network(source)
        }
        "iscsi" => {
            if let Some(uri) = text(obj, "filename") {
                return network(uri_of(uri, "iscsi")?);
            }
            if text(obj, "transport") != Some("tcp") {
                return Err("its iscsi source does not have 'transport' 'tcp', the only one libvirt reads".into());
            }
            let portal = required(obj, "portal", "iscsi source")?;
            let target = required(obj, "target", "iscsi source")?;
            let lun = match obj.get("lun") {
                None => "0".to_string(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                Some(_) => return Err("its 'lun' is not a number".into()),
            };
            // The port follows the last ':', unless that ':' is inside
            // an IPv6 address's brackets, which libvirt keeps.
            let mut host = NetworkHost { name: Some(portal.to_string()), ..Default::default() };
            if let Some((name, port)) = portal.rsplit_once(':').filter(|(_, p)| !p.contains(']')) {
                host.name = Some(name.to_string());
                host.port = Some(
                    port.parse::<u16>()
                        .ok()
                        .filter(|p| *p > 0)
                        .ok_or_else(|| format!("its portal '{portal}' has a port that is not a port number"))?,
                );
            }
            let mut source = new("iscsi");
            source.name = Some(format!("{target}/{lun}"));
            source.hosts = vec![host];
            network(source)
        }
        "nbd" => {
            let host = match (obj.get("server"), text(obj, "path"), text(obj, "host")) {
                (Some(server), _, _) => socket_host(server)?,
                (None, Some(socket), _) => NetworkHost {
                    transport: Some("unix".into()),
                    socket: Some(socket.to_string()),
                    ..Default::default()
                },
                (None, None, Some(name)) => {
                    NetworkHost { name: Some(name.to_string()), port: port(obj)?, ..Default::default() }
                }
                (None, None, None) => return Err("its nbd source has no 'server', 'path' or 'host'".into()),
            };
            let mut source = new("nbd");
            source.name = text(obj, "export").map(str::to_string);
            source.hosts = vec![host];
            network(source)
        }
        "sheepdog" => {
            if let Some(uri) = text(obj, "filename") {
                if !uri.contains("://") {
                    return Err("its sheepdog filename is not a URI, the only form libvirt reads".into());
                }
                return network(uri_of(uri, "sheepdog")?);
            }
            let mut source = new("sheepdog");
            source.name = Some(required(obj, "vdi", "sheepdog source")?.to_string());
            source.hosts = vec![socket_host(obj.get("server").ok_or("its sheepdog source has no 'server'")?)?];
            network(source)
        }
        "ssh" => {
            let host = match (obj.get("server"), text(obj, "host")) {
                (Some(server), _) => inet_host(Some(server), "ssh source")?,
                (None, Some(name)) => {
                    NetworkHost { name: Some(name.to_string()), port: port(obj)?, ..Default::default() }
                }
                (None, None) => return Err("its ssh source has no 'server' or 'host'".into()),
            };
            let mut source = new("ssh");
            source.name = Some(required(obj, "path", "ssh source")?.to_string());
            source.hosts = vec![host];
            network(source)
        }
        "rbd" => {
            if let Some(filename) = text(obj, "filename") {
                let colon = filename.strip_prefix("rbd:").unwrap_or(filename);
                return network(parse_rbd_colon(colon).map_err(|e| e.message().to_string())?);
            }
            let (Some(pool), Some(image)) = (text(obj, "pool"), text(obj, "image")) else {
                return Err("its rbd source needs 'pool' and 'image'".into());
            };
            let mut source = new("rbd");
            source.name = Some(format!("{pool}/{image}"));
            source.snapshot = text(obj, "snapshot").map(str::to_string);
            source.config_file = text(obj, "conf").map(str::to_string);
            if let Some(servers) = obj.get("server").and_then(Value::as_array) {
                source.hosts = servers.iter().map(|s| inet_host(Some(s), "rbd server")).collect::<Parsed<_>>()?;
            }
            network(source)
        }
        "nfs" => {
            let host = inet_host(obj.get("server"), "nfs source")?;
            let id = |key: &str| {
                obj.get(key).and_then(Value::as_i64).ok_or_else(|| format!("its nfs source has no numeric '{key}'"))
            };
            let (user, group) = (id("user")?, id("group")?);
            let mut source = new("nfs");
            source.name = Some(required(obj, "path", "nfs source")?.to_string());
            source.identity = Some((format!("+{user}"), format!("+{group}")));
            source.hosts = vec![host];
            network(source)
        }
        "vxhs" => {
            let mut source = new("vxhs");
            source.name = Some(required(obj, "vdisk-id", "vxhs source")?.to_string());
            source.hosts = vec![inet_host(obj.get("server"), "vxhs source")?];
            network(source)
        }
        "nvme" => {
            let address = text(obj, "device")
                .and_then(PciAddress::parse)
                .ok_or("its nvme source has no PCI address 'device' (DDDD:BB:SS.F)")?;
            let namespace = obj
                .get("namespace")
                .and_then(Value::as_u64)
                .filter(|n| *n > 0)
                .ok_or("its nvme source has no positive 'namespace'")?;
            Ok(StorageSource::Nvme(NvmeSource { address, namespace, managed: None }))
        }
        other => Err(format!("protocol driver '{other}' is not supported")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: BackingImage) -> NetworkSource {
        match s.source {
            StorageSource::Network(n) => *n,
            other => panic!("expected a network source, got {other:?}"),
        }
    }

    #[test]
    fn relative_backing_resolves_against_image_directory_as_given() {
        let s = parse_backing_string("base.qcow2", Path::new("/imgs/link/top.qcow2")).expect("parse").source;
        assert_eq!(s, StorageSource::File { path: "/imgs/link/base.qcow2".into() });
        let s = parse_backing_string("./sub/../b.qcow2", Path::new("/a/t.qcow2")).expect("parse").source;
        assert_eq!(s, StorageSource::File { path: "/a/sub/../b.qcow2".into() });
        let s = parse_backing_string("/abs/b.qcow2", Path::new("/a/t.qcow2")).expect("parse").source;
        assert_eq!(s, StorageSource::File { path: "/abs/b.qcow2".into() });
    }

    /// What qemu-img 7.2 opens for each form (`qemu-img info --backing-chain`):
    /// `file:` takes the rest literally, colons included; a relative rest is
    /// opened from qemu-img's working directory, so it is refused; a name
    /// with another unknown prefix is an unknown protocol to QEMU.
    #[test]
    fn file_prefix_and_other_protocol_prefixes_read_as_qemu_reads_them() {
        let top = Path::new("/imgs/sub/top.qcow2");
        let file = |s: &str| parse_backing_string(s, top).expect(s).source;
        assert_eq!(file("file:/imgs/base.qcow2"), StorageSource::File { path: "/imgs/base.qcow2".into() });
        assert_eq!(file("file:/imgs/b:c.qcow2"), StorageSource::File { path: "/imgs/b:c.qcow2".into() });
        assert_eq!(file("file:///imgs/base.qcow2"), StorageSource::File { path: "/imgs/base.qcow2".into() });
        assert_eq!(file("./b:c.qcow2"), StorageSource::File { path: "/imgs/sub/b:c.qcow2".into() });
        assert_eq!(file("dir/b:c.qcow2"), StorageSource::File { path: "/imgs/sub/dir/b:c.qcow2".into() });
        for (refused, why) in [
            ("file:base.qcow2", "relative file after 'file:'"),
            ("file:file:/imgs/base.qcow2", "relative file after 'file:'"),
            ("file:", "names no file"),
            ("b:c.qcow2", "protocol 'b'"),
            ("FILE:/imgs/base.qcow2", "protocol 'FILE'"),
            ("ftp:example.org", "protocol 'ftp' without a URI"),
        ] {
            let err = parse_backing_string(refused, top).expect_err(refused);
            assert!(err.message().contains(why), "{refused}: {err}");
            assert!(err.message().contains(refused) && err.message().contains("/imgs/sub/top.qcow2"), "{err}");
        }
    }

    #[test]
    fn uris_become_network_sources() {
        let n = net(parse_backing_string("nbd://example.org:10809/exp", Path::new("/t")).expect("nbd"));
        assert_eq!((n.protocol.as_str(), n.name.as_deref()), ("nbd", Some("exp")));
        assert_eq!(n.hosts[0].name.as_deref(), Some("example.org"));
        assert_eq!(n.hosts[0].port, Some(10809));

        let n = net(parse_backing_string("nbd+unix:///exp?socket=/run/n.sock", Path::new("/t")).expect("unix"));
        assert_eq!(n.hosts[0].transport.as_deref(), Some("unix"));
        assert_eq!(n.hosts[0].socket.as_deref(), Some("/run/n.sock"));

        let n = net(parse_backing_string("gluster://red/vol1/img1", Path::new("/t")).expect("gluster"));
        assert_eq!(n.name.as_deref(), Some("vol1/img1"));
        let n = net(parse_backing_string("https://h/x.img", Path::new("/t")).expect("https"));
        assert_eq!(n.protocol, "https");
        let n = net(parse_backing_string("ssh://user@h:22/x.img", Path::new("/t")).expect("ssh"));
        assert_eq!((n.hosts[0].name.as_deref(), n.hosts[0].port), (Some("h"), Some(22)));
        let n = net(parse_backing_string("iscsi://h/iqn.2024-01.x:t/1", Path::new("/t")).expect("iscsi"));
        assert_eq!(n.name.as_deref(), Some("iqn.2024-01.x:t/1"));
        let n = net(parse_backing_string("rbd:pool/img:mon_host=10.0.0.1\\:6789", Path::new("/t")).expect("rbd"));
        assert_eq!((n.name.as_deref(), n.hosts[0].port), (Some("pool/img"), Some(6789)));
        assert!(parse_backing_string("nbd+unix:///exp", Path::new("/t")).is_err());
        assert!(parse_backing_string("weird://x/y", Path::new("/t")).is_err());
    }

    #[test]
    fn json_pseudo_protocol_nested_and_dotted() {
        let s = parse_backing_string(
            r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"/x/b.qcow2"}}"#,
            Path::new("/t"),
        )
        .expect("nested");
        assert_eq!(s.source, StorageSource::File { path: "/x/b.qcow2".into() });
        let n = net(
            parse_backing_string(
                r#"json:{"file.driver":"nbd","file.export":"e","file.server.type":"inet","file.server.host":"h","file.server.port":"10809"}"#,
                Path::new("/t"),
            )
            .expect("dotted"),
        );
        assert_eq!((n.name.as_deref(), n.hosts[0].port), (Some("e"), Some(10809)));
        assert!(parse_backing_string("json:{not json", Path::new("/t")).is_err());
        assert!(parse_backing_string(r#"json:{"file":{"driver":"file","filename":"rel"}}"#, Path::new("/t")).is_err());
    }
}
