//! Another Strata host reached through a command, in the spirit of
//! libvirt's `ext` transport (Strata has no daemon to connect to):
//! `qemu+ext://HOST/embed?root=DIR&command=ip%20netns%20exec%20hostb%20strata`
//! runs the command (split at spaces, no shell) with `-c
//! qemu:///embed?root=DIR serve-wire` appended: that `strata`, on the far
//! host, opens the connection and answers wire calls ([`crate::wire`]),
//! one JSON request per line on its standard input and one response per
//! line on its standard output. `HOST`, when given, is the far host's
//! address, where it listens for what a migration sends it.
//!
//! The command dies with the thread that owns it, which lives as long as
//! the connection: a killed `strata` leaves no far `strata` behind.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};

use async_trait::async_trait;

use crate::driver::{Connection, DomainEvent};
use crate::error::{Error, ErrorKind, Result};
use crate::uri::ConnectUri;
use crate::wire::{read_response, Call, Reply, Request};
use crate::wire_client::{WireConnection, WireTransport};

/// The transport's name in a URI's scheme (`qemu+ext`).
pub(crate) const TRANSPORT: &str = "ext";
/// The URI parameter naming the command.
const COMMAND_PARAM: &str = "command";

/// A request line and where its response line goes.
type Exchange = (String, mpsc::Sender<Result<String>>);

/// The far `strata`'s pipes, driven by the thread that started it.
struct ExtTransport {
    peer: String,
    requests: Mutex<mpsc::Sender<Exchange>>,
}

/// Opens `uri` (transport `ext`) through the command it names.
pub(crate) fn open(uri: &ConnectUri) -> Result<Box<dyn Connection>> {
    let command = uri.param(COMMAND_PARAM).ok_or_else(|| {
        Error::invalid_arg(format!(
            "connection URI '{uri}' needs ?{COMMAND_PARAM}=COMMAND for the {TRANSPORT} transport \
             (a strata on the far host, e.g. ip%20netns%20exec%20NAME%20strata)"
        ))
    })?;
    let words: Vec<String> = command.split_whitespace().map(String::from).collect();
    if words.is_empty() {
        return Err(Error::invalid_arg(format!("connection URI '{uri}' has an empty {COMMAND_PARAM}")));
    }
    let far_uri = uri.far_side(&[COMMAND_PARAM]);
    let peer = format!("the strata of '{uri}'");
    let transport = ExtTransport::start(words, far_uri, peer)?;
    let mut capabilities = match transport.exchange(Call::Capabilities)?.recv() {
        Ok(line) => match read_response(&line?).map_err(Error::from)? {
            Reply::Capabilities(caps) => *caps,
            other => return Err(transport.unexpected(&other)),
        },
        Err(_) => return Err(transport.gone()),
    };
    capabilities.uri = uri.as_str().to_string();
    Ok(Box::new(WireConnection { uri: uri.as_str().to_string(), capabilities, transport: Arc::new(transport) }))
}

impl ExtTransport {
    /// Starts `words -c far_uri serve-wire` on a thread of its own, which
    /// then carries every exchange; the command is killed when that thread
    /// ends (the connection dropped, or this process killed).
    fn start(words: Vec<String>, far_uri: String, peer: String) -> Result<ExtTransport> {
        let (requests, incoming) = mpsc::channel::<Exchange>();
        let (started_tx, started) = mpsc::channel::<Result<()>>();
        let who = peer.clone();
        std::thread::Builder::new()
            .name("strata-ext".into())
            .spawn(move || serve_exchanges(&words, &far_uri, &who, &started_tx, &incoming))
            .map_err(|e| Error::internal(format!("cannot start a thread for {peer}: {e}")))?;
        started.recv().map_err(|_| Error::internal(format!("{peer} did not start")))??;
        Ok(ExtTransport { peer, requests: Mutex::new(requests) })
    }

    /// Sends `call`; its response comes through the returned receiver.
    fn exchange(&self, call: Call) -> Result<mpsc::Receiver<Result<String>>> {
        let line = serde_json::to_string(&Request::new(call))
            .map_err(|e| Error::internal(format!("cannot encode a call for {}: {e}", self.peer)))?;
        let (reply_tx, reply) = mpsc::channel();
        let requests = self.requests.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        requests.send((line, reply_tx)).map_err(|_| self.gone())?;
        Ok(reply)
    }

    fn gone(&self) -> Error {
        Error::new(ErrorKind::NoConnect, format!("{} has ended", self.peer))
    }

    fn unexpected(&self, reply: &Reply) -> Error {
        let shown = serde_json::to_string(reply).unwrap_or_default();
        Error::internal(format!("{} answered with an unexpected reply: {shown}", self.peer))
    }
}

/// The transport's thread: starts the command, says whether it started,
/// then writes each request and reads its response until the connection
/// goes (then closes the command's input and waits for it to exit).
fn serve_exchanges(
    words: &[String],
    far_uri: &str,
    peer: &str,
    started: &mpsc::Sender<Result<()>>,
    incoming: &mpsc::Receiver<Exchange>,
) {
    let parent = std::process::id() as libc::pid_t;
    let mut command = Command::new(&words[0]);
    command.args(&words[1..]).args(["-c", far_uri, "serve-wire"]).stdin(Stdio::piped()).stdout(Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and makes
    // only async-signal-safe calls (see `die_with_parent`).
    unsafe {
        command.pre_exec(move || crate::tool::die_with_parent(parent, None));
    }
    let spawned = command
        .spawn()
        .map_err(|e| Error::new(ErrorKind::NoConnect, format!("cannot run '{}' for {peer}: {e}", words.join(" "))));
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => {
            let _ = started.send(Err(e));
            return;
        }
    };
    let (Some(mut input), Some(output)) = (child.stdin.take(), child.stdout.take()) else {
        let _ = started.send(Err(Error::internal(format!("no pipes to {peer}"))));
        return;
    };
    let _ = started.send(Ok(()));
    let mut output = BufReader::new(output);
    for (request, reply) in incoming {
        let mut line = String::new();
        let answered = writeln!(input, "{request}")
            .and_then(|()| input.flush())
            .and_then(|()| output.read_line(&mut line))
            .map_err(|e| Error::new(ErrorKind::NoConnect, format!("lost {peer}: {e}")));
        let outcome = match answered {
            Ok(0) => Err(Error::new(ErrorKind::NoConnect, format!("{peer} has ended"))),
            Ok(_) => Ok(line),
            Err(e) => Err(e),
        };
        let _ = reply.send(outcome);
    }
    drop(input);
    let _ = child.wait();
}

/// The far side: answers the wire calls of JSON lines on standard input
/// with `conn`, a response line each on standard output, until the input
/// ends. What runs as `strata -c URI serve-wire`.
pub async fn serve_stdio(conn: &dyn Connection) -> Result<()> {
    loop {
        let read = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line).map(|n| (n, line))
        })
        .await
        .map_err(|e| Error::internal(format!("reading a request ended abnormally: {e}")))?;
        let (n, request) = read.map_err(|e| Error::operation_failed(format!("cannot read a request: {e}")))?;
        if n == 0 {
            return Ok(());
        }
        let response = crate::wire::dispatch_json(conn, request.trim_end()).await;
        let mut out = std::io::stdout().lock();
        writeln!(out, "{response}")
            .and_then(|()| out.flush())
            .map_err(|e| Error::operation_failed(format!("cannot write a response: {e}")))?;
    }
}

#[async_trait]
impl WireTransport for ExtTransport {
    fn peer(&self) -> &str {
        &self.peer
    }
    async fn call(&self, call: Call) -> Result<Reply> {
        let reply = self.exchange(call)?;
        let gone = self.gone();
        let line = tokio::task::spawn_blocking(move || reply.recv().map_err(|_| gone))
            .await
            .map_err(|e| Error::internal(format!("a call to {} did not complete: {e}", self.peer)))???;
        read_response(&line).map_err(Error::from)
    }
    /// The far side's events are pulled, a wait at a time.
    async fn next_event(&self, domain: &str, timeout_ms: u64) -> Result<Option<DomainEvent>> {
        match self.call(Call::NextEvent { domain: domain.to_string(), timeout_ms }).await? {
            Reply::Event(event) => Ok(event),
            other => Err(self.unexpected(&other)),
        }
    }
}
