//! Wire format: the greeting and the classification of incoming lines.

use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::QmpError;
use crate::event::QmpEvent;
use crate::types::QemuVersion;

/// What the greeting announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Greeting {
    pub(crate) version: QemuVersion,
    pub(crate) capabilities: Vec<String>,
}

#[derive(Deserialize)]
struct RawGreeting {
    #[serde(rename = "QMP")]
    qmp: RawGreetingBody,
}

#[derive(Deserialize)]
struct RawGreetingBody {
    version: RawVersion,
    #[serde(default)]
    capabilities: Vec<String>,
}

#[derive(Deserialize)]
struct RawVersion {
    qemu: RawTriple,
    #[serde(default)]
    package: String,
}

#[derive(Deserialize)]
struct RawTriple {
    major: u32,
    minor: u32,
    micro: u32,
}

/// Parses `{"QMP": {"version": {"qemu": {...}, "package": ...}, "capabilities": [...]}}`.
pub(crate) fn parse_greeting(line: &[u8]) -> Result<Greeting, QmpError> {
    let raw: RawGreeting = serde_json::from_slice(line)
        .map_err(|e| QmpError::Protocol(format!("unexpected greeting {:?}: {e}", String::from_utf8_lossy(line))))?;
    let RawGreetingBody { version, capabilities } = raw.qmp;
    Ok(Greeting {
        version: QemuVersion {
            major: version.qemu.major,
            minor: version.qemu.minor,
            micro: version.qemu.micro,
            package: version.package,
        },
        capabilities,
    })
}

/// The outcome of one command.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Reply {
    Return(Value),
    Error { class: String, desc: String },
}

/// One line from QEMU after the greeting.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Incoming {
    /// `id` is `None` when the reply has no id, or one this client cannot
    /// have sent (ids are always unsigned integers here). QEMU answers without
    /// an id when it could not parse the request at all.
    Reply {
        id: Option<u64>,
        reply: Reply,
    },
    Event(QmpEvent),
}

#[derive(Deserialize)]
struct RawError {
    class: String,
    desc: String,
}

#[derive(Deserialize, Default)]
struct RawTimestamp {
    seconds: i64,
    microseconds: i64,
}

/// Classifies one (trimmed, non-empty) line.
pub(crate) fn parse_incoming(line: &[u8]) -> Result<Incoming, QmpError> {
    let lossy = || String::from_utf8_lossy(line).into_owned();
    let mut obj: Map<String, Value> = serde_json::from_slice(line)
        .map_err(|e| QmpError::Protocol(format!("not a JSON object: {e}: {:?}", lossy())))?;

    if let Some(name) = obj.remove("event") {
        let Value::String(event) = name else {
            return Err(QmpError::Protocol(format!("event name is not a string: {:?}", lossy())));
        };
        let data = obj.remove("data").unwrap_or(Value::Null);
        let ts = match obj.remove("timestamp") {
            Some(v) => RawTimestamp::deserialize(v)
                .map_err(|e| QmpError::Protocol(format!("bad event timestamp: {e}: {:?}", lossy())))?,
            None => RawTimestamp::default(),
        };
        return Ok(Incoming::Event(QmpEvent { event, data, timestamp: (ts.seconds, ts.microseconds) }));
    }

    let id = obj.get("id").and_then(Value::as_u64);
    if let Some(ret) = obj.remove("return") {
        return Ok(Incoming::Reply { id, reply: Reply::Return(ret) });
    }
    if let Some(err) = obj.remove("error") {
        let err = RawError::deserialize(err)
            .map_err(|e| QmpError::Protocol(format!("bad error reply: {e}: {:?}", lossy())))?;
        return Ok(Incoming::Reply { id, reply: Reply::Error { class: err.class, desc: err.desc } });
    }
    Err(QmpError::Protocol(format!("neither event nor reply: {:?}", lossy())))
}

#[cfg(test)]
// A failed unwrap is how these tests report a decoding failure.
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn greeting_of_qemu_7_2() {
        let g = parse_greeting(
            br#"{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}, "package": "Debian 1:7.2+dfsg-7+deb12u18+b3"}, "capabilities": ["oob"]}}"#,
        )
        .unwrap();
        assert_eq!(g.version.major, 7);
        assert_eq!(g.version.minor, 2);
        assert_eq!(g.version.micro, 22);
        assert_eq!(g.version.package, "Debian 1:7.2+dfsg-7+deb12u18+b3");
        assert_eq!(g.capabilities, ["oob"]);
    }

    #[test]
    fn greeting_tolerates_extra_fields() {
        let g = parse_greeting(
            br#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 9, "nano": 1}, "package": "", "x": 1}, "capabilities": [], "future": true}}"#,
        )
        .unwrap();
        assert_eq!(g.version.major, 9);
        assert!(g.capabilities.is_empty());
    }

    #[test]
    fn greeting_rejects_non_qmp() {
        for bad in [&b"SSH-2.0-OpenSSH_9.2"[..], br#"{"return": {}}"#, br#"{"QMP": {"capabilities": []}}"#] {
            match parse_greeting(bad) {
                Err(QmpError::Protocol(_)) => {}
                other => panic!("{:?} gave {other:?}", String::from_utf8_lossy(bad)),
            }
        }
    }

    #[test]
    fn replies_and_errors() {
        assert_eq!(
            parse_incoming(br#"{"return": {}, "id": 2}"#).unwrap(),
            Incoming::Reply { id: Some(2), reply: Reply::Return(json!({})) }
        );
        assert_eq!(
            parse_incoming(br#"{"id": 10, "error": {"class": "CommandNotFound", "desc": "The command nonexistent has not been found"}}"#).unwrap(),
            Incoming::Reply {
                id: Some(10),
                reply: Reply::Error {
                    class: "CommandNotFound".into(),
                    desc: "The command nonexistent has not been found".into()
                }
            }
        );
        assert_eq!(
            parse_incoming(br#"{"error": {"class": "GenericError", "desc": "JSON parse error"}}"#).unwrap(),
            Incoming::Reply {
                id: None,
                reply: Reply::Error { class: "GenericError".into(), desc: "JSON parse error".into() }
            }
        );
        assert_eq!(
            parse_incoming(br#"{"return": "unknown command: 'foo'\r\n", "id": "not-ours"}"#).unwrap(),
            Incoming::Reply { id: None, reply: Reply::Return(json!("unknown command: 'foo'\r\n")) }
        );
    }

    #[test]
    fn events() {
        assert_eq!(
            parse_incoming(br#"{"timestamp": {"seconds": 1795459538, "microseconds": 233315}, "event": "JOB_STATUS_CHANGE", "data": {"status": "created", "id": "j1"}}"#).unwrap(),
            Incoming::Event(QmpEvent {
                event: "JOB_STATUS_CHANGE".into(),
                data: json!({"status": "created", "id": "j1"}),
                timestamp: (1795459538, 233315),
            })
        );
        assert_eq!(
            parse_incoming(br#"{"timestamp": {"seconds": 5, "microseconds": 6}, "event": "STOP"}"#).unwrap(),
            Incoming::Event(QmpEvent { event: "STOP".into(), data: Value::Null, timestamp: (5, 6) })
        );
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        for bad in [&b"{not json"[..], b"[1, 2]", br#"{"id": 3}"#, br#"{"event": 7}"#, br#"{"error": "flat"}"#] {
            assert!(matches!(parse_incoming(bad), Err(QmpError::Protocol(_))), "{:?}", String::from_utf8_lossy(bad));
        }
    }
}
