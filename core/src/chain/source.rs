//! Where a layer's data lives, and how backing strings in image headers
//! map to it (relative and absolute paths, URIs, `json:{…}`).

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};

/// A layer's storage, mirroring libvirt's disk types.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "type")]
pub enum StorageSource {
    File { path: PathBuf },
    Block { dev: PathBuf },
    Network(NetworkSource),
    Volume { pool: String, volume: String },
    Dir { dir: PathBuf },
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
        }
    }

    /// The local file or device, when there is one.
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
            StorageSource::Block { dev } => write!(f, "{}", dev.display()),
            StorageSource::Dir { dir } => write!(f, "{}", dir.display()),
            StorageSource::Volume { pool, volume } => write!(f, "{pool}/{volume}"),
            StorageSource::Network(n) => write!(f, "{n}"),
        }
    }
}

/// A network image (`<source protocol=… name=…><host …/></source>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct NetworkSource {
    pub protocol: String,
    pub name: Option<String>,
    pub hosts: Vec<NetworkHost>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct NetworkHost {
    pub name: Option<String>,
    pub port: Option<u16>,
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

/// URI schemes QEMU accepts in backing strings, mapped to libvirt protocols.
const URI_SCHEMES: &[(&str, &str, Option<&str>)] = &[
    ("nbd", "nbd", None),
    ("nbd+tcp", "nbd", None),
    ("nbd+unix", "nbd", Some("unix")),
    ("gluster", "gluster", None),
    ("gluster+tcp", "gluster", None),
    ("gluster+unix", "gluster", Some("unix")),
    ("http", "http", None),
    ("https", "https", None),
    ("ftp", "ftp", None),
    ("ftps", "ftps", None),
    ("iscsi", "iscsi", None),
    ("ssh", "ssh", None),
    ("nfs", "nfs", None),
];

/// Resolves a backing string from the header of the image at `image_path`
/// into the image QEMU would open, or refuses it.
///
/// As QEMU reads it, a name with a `:` before any `/` starts with a
/// protocol (`file:`, `json:`, `nbd://…`); any other name is a path, and a
/// relative one resolves against the directory of the image path as given,
/// without resolving symlinks.
pub fn parse_backing_string(backing: &str, image_path: &Path) -> Result<StorageSource> {
    let Some(protocol) = protocol_prefix(backing) else {
        let path = Path::new(backing);
        let full = if path.is_absolute() {
            path.to_path_buf()
        } else {
            image_path.parent().unwrap_or(Path::new("")).join(path)
        };
        return Ok(StorageSource::local(super::clean_path(&full)));
    };
    let rest = &backing[protocol.len() + 1..];
    let refuse =
        |why: &str| Error::probe_failed(format!("backing file '{backing}' of '{}' {why}", image_path.display()));
    match protocol {
        "json" => parse_json_backing(rest, backing),
        "rbd" => Ok(parse_rbd(rest)),
        // QEMU's file protocol takes the rest literally: an absolute path,
        // or one relative to QEMU's own working directory (not the image's).
        "file" => match Path::new(rest) {
            _ if rest.is_empty() => Err(refuse("names no file after 'file:'")),
            p if p.is_relative() => Err(refuse(
                "names a relative file after 'file:', which QEMU opens from its own working directory, \
                 not the image's; rewrite it without the prefix or as an absolute path (qemu-img rebase -u)",
            )),
            p => Ok(StorageSource::local(super::clean_path(p))),
        },
        _ => match URI_SCHEMES.iter().find(|(s, _, _)| *s == protocol) {
            Some(&(_, libvirt_protocol, transport)) if rest.starts_with("//") => {
                parse_uri(backing, libvirt_protocol, transport)
            }
            Some(_) => Err(refuse(&format!("uses protocol '{protocol}' without a URI, which Strata does not read"))),
            None => Err(refuse(&format!("uses protocol '{protocol}', which Strata does not know"))),
        },
    }
}

/// The protocol a backing name starts with, by QEMU's rule
/// (`path_has_protocol`): the text before a `:` that comes before any `/`.
fn protocol_prefix(backing: &str) -> Option<&str> {
    let end = backing.find([':', '/'])?;
    backing[end..].starts_with(':').then(|| &backing[..end])
}

fn parse_rbd(rest: &str) -> StorageSource {
    // rbd:pool/image[@snap][:opt=val[:opt=val…]], where '\:' escapes a colon.
    let mut parts: Vec<String> = vec![String::new()];
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let (Some(next), Some(last)) = (chars.next(), parts.last_mut()) {
                    last.push(next);
                }
            }
            ':' => parts.push(String::new()),
            c => {
                if let Some(last) = parts.last_mut() {
                    last.push(c);
                }
            }
        }
    }
    let name = parts.first().cloned().unwrap_or_default();
    let mut hosts = Vec::new();
    for opt in parts.iter().skip(1) {
        if let Some(mons) = opt.strip_prefix("mon_host=") {
            for mon in mons.split(';').filter(|m| !m.is_empty()) {
                let (host, port) = split_host_port(mon);
                hosts.push(NetworkHost { name: Some(host), port, ..Default::default() });
            }
        }
    }
    StorageSource::Network(NetworkSource { protocol: "rbd".into(), name: Some(name), hosts })
}

fn split_host_port(s: &str) -> (String, Option<u16>) {
    if let Some(rest) = s.strip_prefix('[') {
        if let Some((h, p)) = rest.split_once(']') {
            return (h.to_string(), p.strip_prefix(':').and_then(|p| p.parse().ok()));
        }
    }
    match s.rsplit_once(':') {
        Some((h, p)) if p.parse::<u16>().is_ok() => (h.to_string(), p.parse().ok()),
        _ => (s.to_string(), None),
    }
}

fn parse_uri(uri: &str, protocol: &str, transport: Option<&str>) -> Result<StorageSource> {
    let bad = |why: &str| Error::probe_failed(format!("backing URI '{uri}' is not valid: {why}"));
    let (_, rest) = uri.split_once("://").ok_or_else(|| bad("no '://'"))?;
    let (rest, query) = match rest.split_once('?') {
        Some((r, q)) => (r, Some(q)),
        None => (rest, None),
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, ""),
    };
    let authority = authority.rsplit_once('@').map(|(_, h)| h).unwrap_or(authority);
    let mut host = NetworkHost::default();
    if !authority.is_empty() {
        let (name, port) = split_host_port(authority);
        host.name = Some(name);
        host.port = port;
    }
    if let Some(t) = transport {
        host.transport = Some(t.to_string());
        let socket = query
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("socket=")))
            .ok_or_else(|| bad("a unix transport needs '?socket=PATH'"))?;
        host.socket = Some(socket.to_string());
        host.name = None;
    }
    let name = if path.is_empty() { None } else { Some(path.to_string()) };
    let hosts = if host == NetworkHost::default() { Vec::new() } else { vec![host] };
    Ok(StorageSource::Network(NetworkSource { protocol: protocol.to_string(), name, hosts }))
}

/// `json:{…}` pseudo-protocol: QEMU's block options as JSON, either nested
/// (`{"file": {"driver": "nbd", …}}`) or dotted (`{"file.driver": "nbd"}`).
fn parse_json_backing(json: &str, whole: &str) -> Result<StorageSource> {
    let bad = |why: String| Error::probe_failed(format!("backing string '{whole}' is not valid: {why}"));
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| bad(format!("its JSON does not parse: {e}")))?;
    let obj = value.as_object().ok_or_else(|| bad("its JSON is not an object".into()))?;
    // Expand dotted keys into a nested object.
    let mut nested = serde_json::Map::new();
    for (k, v) in obj {
        let mut cursor = &mut nested;
        let parts: Vec<&str> = k.split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            if i + 1 == parts.len() {
                cursor.insert((*part).to_string(), v.clone());
            } else {
                let entry =
                    cursor.entry((*part).to_string()).or_insert_with(|| serde_json::Value::Object(Default::default()));
                cursor = match entry.as_object_mut() {
                    Some(o) => o,
                    None => return Err(bad(format!("key '{k}' conflicts with another key"))),
                };
            }
        }
    }
    // The protocol layer is the innermost "file" (a format driver wraps it).
    let mut proto = &nested;
    while let Some(inner) = proto.get("file").and_then(|f| f.as_object()) {
        proto = inner;
    }
    let get = |k: &str| proto.get(k).and_then(|v| v.as_str()).map(str::to_string);
    let driver = get("driver").ok_or_else(|| bad("it names no protocol driver".into()))?;
    match driver.as_str() {
        "file" | "host_device" => {
            let filename = get("filename").ok_or_else(|| bad("its file has no 'filename'".into()))?;
            let path = PathBuf::from(filename);
            if !path.is_absolute() {
                return Err(bad(
                    "its filename is relative, which QEMU resolves against its own working directory".into()
                ));
            }
            Ok(StorageSource::local(path))
        }
        "nbd" => {
            let server = proto.get("server").and_then(|s| s.as_object());
            let s = |k: &str| server.and_then(|o| o.get(k)).and_then(|v| v.as_str()).map(str::to_string);
            let mut host = NetworkHost::default();
            match s("type").as_deref() {
                Some("unix") => {
                    host.transport = Some("unix".into());
                    host.socket = s("path");
                }
                _ => {
                    host.name = s("host");
                    host.port = server
                        .and_then(|o| o.get("port"))
                        .and_then(|p| p.as_str().map(str::to_string).or_else(|| p.as_u64().map(|n| n.to_string())))
                        .and_then(|p| p.parse().ok());
                }
            }
            Ok(StorageSource::Network(NetworkSource { protocol: "nbd".into(), name: get("export"), hosts: vec![host] }))
        }
        "http" | "https" | "ftp" | "ftps" => {
            let url = get("url").ok_or_else(|| bad(format!("its {driver} source has no 'url'")))?;
            parse_uri(&url, &driver, None)
        }
        "gluster" | "iscsi" | "ssh" | "rbd" | "nfs" => {
            let name = get("path").or_else(|| get("image")).or_else(|| get("target"));
            let name = match (get("volume").or_else(|| get("pool")), name) {
                (Some(v), Some(p)) => Some(format!("{v}/{}", p.trim_start_matches('/'))),
                (v, p) => v.or(p),
            };
            Ok(StorageSource::Network(NetworkSource { protocol: driver, name, hosts: Vec::new() }))
        }
        other => Err(bad(format!("protocol driver '{other}' is not supported"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: StorageSource) -> NetworkSource {
        match s {
            StorageSource::Network(n) => n,
            other => panic!("expected a network source, got {other:?}"),
        }
    }

    #[test]
    fn relative_backing_resolves_against_image_directory_as_given() {
        let s = parse_backing_string("base.qcow2", Path::new("/imgs/link/top.qcow2")).expect("parse");
        assert_eq!(s, StorageSource::File { path: "/imgs/link/base.qcow2".into() });
        let s = parse_backing_string("./sub/../b.qcow2", Path::new("/a/t.qcow2")).expect("parse");
        assert_eq!(s, StorageSource::File { path: "/a/sub/../b.qcow2".into() });
        let s = parse_backing_string("/abs/b.qcow2", Path::new("/a/t.qcow2")).expect("parse");
        assert_eq!(s, StorageSource::File { path: "/abs/b.qcow2".into() });
    }

    /// What qemu-img 7.2 opens for each form (`qemu-img info --backing-chain`):
    /// `file:` takes the rest literally, colons included; a relative rest is
    /// opened from qemu-img's working directory, so it is refused; a name
    /// with another unknown prefix is an unknown protocol to QEMU.
    #[test]
    fn file_prefix_and_other_protocol_prefixes_read_as_qemu_reads_them() {
        let top = Path::new("/imgs/sub/top.qcow2");
        let file = |s: &str| parse_backing_string(s, top).expect(s);
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
            ("nbd:localhost:10809", "protocol 'nbd' without a URI"),
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
        assert_eq!(s, StorageSource::File { path: "/x/b.qcow2".into() });
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
