//! Connection URIs: `driver[+transport]://[host]/path[?params]`.

use std::fmt;
use std::path::PathBuf;

use crate::error::{Error, Result};

/// A parsed connection URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectUri {
    pub driver: String,
    pub transport: Option<String>,
    pub host: Option<String>,
    /// The path without its leading '/': `system`, `session`, `embed`, or empty.
    pub path: String,
    pub params: Vec<(String, String)>,
    raw: String,
}

impl ConnectUri {
    pub fn parse(uri: &str) -> Result<ConnectUri> {
        let bad = |why: &str| Error::invalid_arg(format!("connection URI '{uri}' is not valid: {why}"));
        let (scheme, rest) =
            uri.split_once("://").ok_or_else(|| bad("expected DRIVER:///PATH, e.g. qemu:///session"))?;
        if scheme.is_empty() {
            return Err(bad("it names no driver"));
        }
        let (driver, transport) = match scheme.split_once('+') {
            Some((d, t)) => (d.to_string(), Some(t.to_string())),
            None => (scheme.to_string(), None),
        };
        if !driver.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(bad("the driver name has characters other than letters, digits, '-' and '_'"));
        }
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let mut params = Vec::new();
        for pair in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            params.push((percent_decode(k), percent_decode(v)));
        }
        Ok(ConnectUri {
            driver,
            transport,
            host: if host.is_empty() { None } else { Some(host.to_string()) },
            path: path.trim_end_matches('/').to_string(),
            params,
            raw: uri.to_string(),
        })
    }

    /// Refuses a URI that is not `driver`'s, or that names a remote host
    /// or a transport: each driver runs `what` on this machine only.
    pub fn require_local(&self, driver: &str, what: &str) -> Result<()> {
        if self.driver != driver {
            return Err(Error::invalid_arg(format!("'{self}' is not a {driver}:// URI")));
        }
        if self.host.is_some() || self.transport.is_some() {
            return Err(Error::no_support(format!(
                "'{self}': remote connections are not supported; Strata runs {what} on this machine"
            )));
        }
        Ok(())
    }

    pub fn param(&self, name: &str) -> Option<&str> {
        self.params.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// The URI as the driver on the far side of its transport opens it:
    /// no transport, no host, and none of the parameters `transport_params`
    /// (those the transport itself reads).
    pub fn far_side(&self, transport_params: &[&str]) -> String {
        let query: Vec<String> = self
            .params
            .iter()
            .filter(|(k, _)| !transport_params.contains(&k.as_str()))
            .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
            .collect();
        let mut uri = format!("{}:///{}", self.driver, self.path);
        if !query.is_empty() {
            uri.push('?');
            uri.push_str(&query.join("&"));
        }
        uri
    }

    /// The state directory for this URI's instance of a driver:
    /// `/var/lib/strata/DRIVER` for `system`, `$XDG_STATE_HOME/strata/DRIVER`
    /// (or `~/.local/state/strata/DRIVER`) for `session`, and `root=DIR` for
    /// `embed`.
    pub fn state_root(&self) -> Result<PathBuf> {
        match self.path.as_str() {
            "system" | "" => Ok(PathBuf::from("/var/lib/strata").join(&self.driver)),
            "session" => {
                let base = match std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
                    Some(dir) => PathBuf::from(dir),
                    None => {
                        let home = std::env::var_os("HOME").ok_or_else(|| {
                            Error::invalid_arg("neither XDG_STATE_HOME nor HOME is set for a session URI")
                        })?;
                        PathBuf::from(home).join(".local/state")
                    }
                };
                Ok(base.join("strata").join(&self.driver))
            }
            "embed" => {
                let root = self
                    .param("root")
                    .ok_or_else(|| Error::invalid_arg(format!("connection URI '{}' needs ?root=DIR", self.raw)))?;
                let root = PathBuf::from(root);
                if !root.is_absolute() {
                    return Err(Error::invalid_arg(format!(
                        "embed root '{}' must be an absolute path",
                        root.display()
                    )));
                }
                Ok(root)
            }
            other => Err(Error::invalid_arg(format!(
                "connection URI '{}' has path '/{other}'; expected /system, /session or /embed?root=DIR",
                self.raw
            ))),
        }
    }
}

impl fmt::Display for ConnectUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// `s` with every byte but letters, digits, `-._~/` percent-encoded.
fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The URI to use when none is given on the command line: `STRATA_DEFAULT_URI`,
/// then `LIBVIRT_DEFAULT_URI`, then `qemu:///system` for root and
/// `qemu:///session` for everyone else.
pub fn default_uri() -> String {
    for var in ["STRATA_DEFAULT_URI", "LIBVIRT_DEFAULT_URI"] {
        if let Ok(v) = std::env::var(var) {
            if !v.is_empty() {
                return v;
            }
        }
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 { "qemu:///system" } else { "qemu:///session" }.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_driver_takes_only_its_own_local_uris() {
        let local = ConnectUri::parse("lxc:///system").expect("parse");
        local.require_local("lxc", "containers").expect("local");
        let other = local.require_local("qemu", "QEMU").expect_err("another driver's");
        assert_eq!(other.message(), "'lxc:///system' is not a qemu:// URI");
        let remote = ConnectUri::parse("lxc+ssh://host/system").expect("parse");
        let err = remote.require_local("lxc", "containers").expect_err("remote");
        assert_eq!(err.kind(), crate::ErrorKind::NoSupport);
        assert!(err.message().ends_with("Strata runs containers on this machine"), "{err}");
    }

    #[test]
    fn parses_the_documented_forms() {
        let u = ConnectUri::parse("qemu:///system").expect("system");
        assert_eq!((u.driver.as_str(), u.path.as_str(), u.host.as_deref()), ("qemu", "system", None));
        let u = ConnectUri::parse("qemu:///embed?root=/tmp/x%20y").expect("embed");
        assert_eq!(u.param("root"), Some("/tmp/x y"));
        assert_eq!(u.state_root().expect("root"), PathBuf::from("/tmp/x y"));
        let u = ConnectUri::parse("qemu+ssh://host.example/system").expect("ssh");
        assert_eq!((u.transport.as_deref(), u.host.as_deref()), (Some("ssh"), Some("host.example")));
        let u = ConnectUri::parse("lxc:///").expect("lxc");
        assert_eq!(u.path, "");
        assert!(ConnectUri::parse("qemu").is_err());
        assert!(ConnectUri::parse("qemu:///embed").expect("parse").state_root().is_err());
        assert!(ConnectUri::parse("qemu:///embed?root=rel").expect("parse").state_root().is_err());
        assert!(ConnectUri::parse("qemu:///bogus").expect("parse").state_root().is_err());
    }

    #[test]
    fn the_far_side_of_a_transport_drops_it_with_its_host_and_parameters() {
        let u = ConnectUri::parse("qemu+ext://10.0.0.2/embed?root=/srv/a%20b&command=ip%20netns%20exec%20b%20strata")
            .expect("ext");
        assert_eq!(u.param("command"), Some("ip netns exec b strata"));
        let far = u.far_side(&["command"]);
        assert_eq!(far, "qemu:///embed?root=/srv/a%20b");
        assert_eq!(ConnectUri::parse(&far).expect("far").state_root().expect("root"), PathBuf::from("/srv/a b"));
    }
}
