//! The QMP client: one connection, one background reader, many callers.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};
use tokio::io::Interest;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::QmpError;
use crate::event::QmpEvent;
use crate::fdpass;
use crate::protocol::{self, Incoming, Reply};
use crate::types::{BlockInfo, BlockJobInfo, JobInfo, KvmInfo, NamedBlockNode, QemuVersion, StatusInfo};

/// Per-command timeout used by [`QmpClient::execute`] until changed with
/// [`QmpClient::set_default_timeout`], and by [`QmpClient::connect`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How many events a slow subscriber may fall behind before it starts missing
/// some ([`QmpError::EventsLagged`]). Block jobs emit a handful of events per
/// state change, so this leaves a wide margin.
const EVENT_CAPACITY: usize = 1024;

/// The id of a connection's `qmp_capabilities`. QEMU writes a reply it
/// computed after its client went away (a `strata` killed mid-command) to
/// the next client of the monitor, ahead of that client's first reply, so
/// the reader drops everything until the reply to this id (see
/// [`read_loop`]), which is unique to the connection: a random multiple of
/// 2^32 below 2^52 (QEMU echoes ids through its JSON parser, exact below
/// 2^53). The connection's commands are numbered from 1 after it
/// ([`FIRST_COMMAND_ID`]), far below any such id: QEMU reads a command's
/// JSON a byte at a time (about 4 µs a byte here), and a short id is
/// sooner read.
fn new_capabilities_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    static CONNECTIONS: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.write_u64(CONNECTIONS.fetch_add(1, Ordering::Relaxed));
    (hasher.finish() % (1 << 20) + 1) << 32
}

/// The id of a connection's first command (see [`new_capabilities_id`]).
const FIRST_COMMAND_ID: u64 = 1;

/// An async QMP connection to one QEMU (or qemu-storage-daemon) monitor socket.
///
/// Cloning is cheap and every clone drives the same connection; commands from
/// several tasks may be in flight at once, each reply being matched to its
/// request by `id`. The connection is closed when the last clone is dropped.
#[derive(Clone)]
pub struct QmpClient {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// Held for the whole of one message so that concurrent commands never
    /// interleave their bytes on the socket.
    writer: Arc<tokio::sync::Mutex<Writer>>,
    shared: Arc<Shared>,
    next_id: AtomicU64,
    default_timeout: Mutex<Duration>,
    reader: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The reader task owns the read half and would otherwise keep the
        // socket (and QEMU's single monitor slot) open forever.
        self.reader.abort();
    }
}

/// The socket's write half, and the command written but its last bytes,
/// if there is one (see [`QmpClient::hold`]).
struct Writer {
    half: OwnedWriteHalf,
    /// The id of the held command. Any other write aborts it first.
    held: Option<u64>,
}

/// What QEMU's JSON parser takes as "drop the partial input": a byte that
/// is never valid UTF-8 (QMP specification, "Forcing the JSON parser into
/// known-good state"). QEMU answers it with one error without an id.
const ABORT_PARTIAL: &[u8] = b"\xff\n";

/// State shared between callers and the reader task.
struct Shared {
    state: Mutex<ConnState>,
    /// QEMU's greeting, once read: by the connect, or by the reader for a
    /// connection that did not wait for it ([`QmpClient::connect_to_running`]).
    greeting: OnceLock<protocol::Greeting>,
}

struct ConnState {
    /// One entry per command still waiting for its reply.
    pending: HashMap<u64, oneshot::Sender<Reply>>,
    /// `None` once the socket has closed: dropping the only sender is what
    /// ends every subscriber's stream, and it doubles as the "closed" flag.
    events: Option<broadcast::Sender<QmpEvent>>,
    /// How many held commands were aborted whose error (one each, without
    /// an id) QEMU has not sent yet.
    aborts_unanswered: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, ConnState> {
        // The state stays consistent even if a holder panicked: every
        // critical section is a single map/option operation.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn new(greeting: Option<protocol::Greeting>) -> Arc<Shared> {
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        Arc::new(Shared {
            state: Mutex::new(ConnState { pending: HashMap::new(), events: Some(events), aborts_unanswered: 0 }),
            greeting: greeting.map(OnceLock::from).unwrap_or_default(),
        })
    }

    fn register(&self, id: u64) -> Result<oneshot::Receiver<Reply>, QmpError> {
        let mut state = self.lock();
        if state.events.is_none() {
            return Err(QmpError::Disconnected);
        }
        let (tx, rx) = oneshot::channel();
        state.pending.insert(id, tx);
        Ok(rx)
    }

    fn complete(&self, id: u64, reply: Reply) {
        let waiter = self.lock().pending.remove(&id);
        match waiter {
            // The receiver may have given up (timeout) in the meantime; then
            // the reply has nobody to go to, which is fine.
            Some(tx) => {
                let _ = tx.send(reply);
            }
            None => tracing::debug!(id, "QMP reply for a request nobody waits for (timed out?)"),
        }
    }

    fn publish(&self, event: QmpEvent) {
        tracing::debug!(event = %event.event, data = %event.data,
            timestamp = ?event.timestamp, "QMP event");
        if let Some(tx) = &self.lock().events {
            // An error only means there are no subscribers right now.
            let _ = tx.send(event);
        }
    }

    /// Answers every command waiting now with `reply`.
    fn fail_all(&self, reply: Reply) {
        for (_, tx) in self.lock().pending.drain() {
            let _ = tx.send(reply.clone());
        }
    }

    fn close(&self) {
        let mut state = self.lock();
        // Dropping the senders wakes every waiter with a RecvError, which
        // `request` reports as Disconnected.
        state.pending.clear();
        state.events = None;
    }
}

/// A command's id, the channel its reply comes on, and the guard of its
/// entry (see [`PendingGuard`]).
type Registered = (u64, oneshot::Receiver<Reply>, PendingGuard);

/// A command's name and how it was registered, or why it could not be.
type Queued = (String, Result<Registered, QmpError>);

/// Removes a request's pending entry however the request ends (reply,
/// timeout, or the caller dropping the future), so abandoned ids don't pile up.
struct PendingGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.shared.lock().pending.remove(&self.id);
    }
}

impl fmt::Debug for QmpClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QmpClient")
            .field("path", &self.inner.path)
            .field("version", &self.version())
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl QmpClient {
    /// Connects to the monitor socket at `path`, reads the greeting and
    /// negotiates capabilities, within [`DEFAULT_TIMEOUT`] (see
    /// [`QmpClient::connect_with_timeout`]).
    pub async fn connect(path: &Path) -> Result<QmpClient, QmpError> {
        Self::connect_with_timeout(path, DEFAULT_TIMEOUT).await
    }

    /// Like [`QmpClient::connect`], with `timeout` bounding the connection
    /// and the greeting. `qmp_capabilities` is sent first and its reply is
    /// not waited for: the first command goes out behind it and QEMU
    /// answers the two in order, one round trip fewer per connection. A
    /// refused negotiation fails every command waiting then and closes
    /// the connection.
    ///
    /// This makes a single attempt: a socket that does not exist yet is an
    /// [`QmpError::Io`] error, and retrying while QEMU starts is up to the caller.
    pub async fn connect_with_timeout(path: &Path, timeout: Duration) -> Result<QmpClient, QmpError> {
        Self::connect_sending(path, timeout, GreetingWait::Awaited, false).await
    }

    /// Connects to a monitor of a QEMU that already answers its monitors
    /// (a running domain's, not one still starting): `qmp_capabilities` is
    /// sent and the client returned without waiting for the greeting, which
    /// the reader takes in; the caller's next work (reading its records,
    /// syncing an intent) overlaps QEMU's answer, and the first command
    /// goes out behind the negotiation. A QEMU that does not answer shows
    /// at that command's timeout; one that is gone, at the connection.
    ///
    /// The `oob` capability is enabled (every monitor on a socket offers
    /// it): QEMU then reads a command while the one before it runs, instead
    /// of only once it has ended, so that a command held behind another
    /// ([`QmpClient::hold`]) is read meanwhile. Commands are still run one
    /// at a time, in order; Strata sends none out of band.
    pub async fn connect_to_running(path: &Path) -> Result<QmpClient, QmpError> {
        Self::connect_sending(path, DEFAULT_TIMEOUT, GreetingWait::Later, true).await
    }

    /// Like [`QmpClient::connect_with_timeout`], and runs `command` (without
    /// arguments) too: [`QmpClient::ask_on_opening`] then
    /// [`AskedOnOpening::answer`]. Returns the client and the command's own
    /// outcome; only a failed connection is the outer error.
    pub async fn connect_and_execute(
        path: &Path,
        timeout: Duration,
        command: &str,
    ) -> Result<(QmpClient, Result<Value, QmpError>), QmpError> {
        Self::ask_on_opening(path, command)?.answer(timeout).await
    }

    /// Connects to the monitor at `path` and writes `qmp_capabilities` with
    /// `command` (without arguments) behind it, before the greeting, so that
    /// a connection made for one question (a run state) costs one round trip
    /// instead of two. Nothing is read and nothing waited for: QEMU reads
    /// and answers while the caller goes on (reading its records), and the
    /// answer is read by [`AskedOnOpening::answer`]. This needs no runtime.
    ///
    /// Unix sockets connect at once: a monitor whose backlog is full (QEMU
    /// has not taken in an earlier client yet) is an [`QmpError::Io`] error
    /// of kind `WouldBlock`, not a wait.
    pub fn ask_on_opening(path: &Path, command: &str) -> Result<AskedOnOpening, QmpError> {
        let io = |source| QmpError::Io { path: path.to_path_buf(), source };
        let capabilities_id = new_capabilities_id();
        // No `oob`: its 30 bytes would be read before the question.
        let mut unsent = opening(capabilities_id, false);
        unsent.extend(encode_message(command, None, FIRST_COMMAND_ID)?);
        let stream = std::os::unix::net::UnixStream::from(mio::net::UnixStream::connect(path).map_err(io)?);
        let written = match (&stream).write(&unsent) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(io(e)),
        };
        unsent.drain(..written);
        Ok(AskedOnOpening {
            path: path.to_path_buf(),
            stream,
            unsent,
            capabilities_id,
            command: command.to_string(),
            asked: Instant::now(),
        })
    }

    /// Connects and negotiates (enabling `oob` if asked).
    async fn connect_sending(
        path: &Path,
        timeout: Duration,
        greeting: GreetingWait,
        oob: bool,
    ) -> Result<QmpClient, QmpError> {
        let capabilities_id = new_capabilities_id();
        let (reader, writer, greeting) =
            tokio::time::timeout(timeout, Self::open(path, capabilities_id, oob, greeting))
                .await
                .map_err(|_| QmpError::Timeout { command: "connect".into(), after: timeout })??;
        Ok(Self::assemble(path, reader, writer, Shared::new(greeting), capabilities_id, FIRST_COMMAND_ID))
    }

    /// The client of a connection whose opening is written, its reader
    /// started (reading the greeting first if `shared` has none yet); its
    /// commands are numbered from `next_id`.
    fn assemble(
        path: &Path,
        reader: BufReader<OwnedReadHalf>,
        writer: OwnedWriteHalf,
        shared: Arc<Shared>,
        capabilities_id: u64,
        next_id: u64,
    ) -> QmpClient {
        let reader = tokio::spawn(read_loop(reader, Arc::clone(&shared), capabilities_id, path.to_path_buf()));
        QmpClient {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                writer: Arc::new(tokio::sync::Mutex::new(Writer { half: writer, held: None })),
                shared,
                next_id: AtomicU64::new(next_id),
                default_timeout: Mutex::new(DEFAULT_TIMEOUT),
                reader,
            }),
        }
    }

    /// Connects, sends `qmp_capabilities` and reads the greeting:
    /// `qmp_capabilities` goes out with the connection, before the
    /// greeting is read (QEMU reads a client's commands only after it has
    /// sent the greeting, and refuses every command but this one until
    /// capabilities are negotiated). Its reply is left to [`read_loop`].
    /// The one optional capability, `oob`, is enabled if asked. With
    /// [`GreetingWait::Later`], the greeting is left to the reader too.
    async fn open(
        path: &Path,
        capabilities_id: u64,
        oob: bool,
        greeting: GreetingWait,
    ) -> Result<(BufReader<OwnedReadHalf>, OwnedWriteHalf, Option<protocol::Greeting>), QmpError> {
        let io = |source| QmpError::Io { path: path.to_path_buf(), source };
        let stream = UnixStream::connect(path).await.map_err(io)?;
        let (read, mut write) = stream.into_split();
        write.write_all(&opening(capabilities_id, oob)).await.map_err(io)?;
        // The same BufReader goes on to the reader task, so nothing QEMU sent
        // right after the greeting is lost.
        let mut reader = BufReader::new(read);
        let greeting = match greeting {
            GreetingWait::Awaited => Some(read_greeting(&mut reader, path).await?),
            GreetingWait::Later => None,
        };
        Ok((reader, write, greeting))
    }

    /// QEMU's version from the greeting; `None` until a connection that did
    /// not wait for it ([`QmpClient::connect_to_running`]) has read it.
    pub fn version(&self) -> Option<&QemuVersion> {
        self.inner.shared.greeting.get().map(|g| &g.version)
    }

    /// Optional capabilities QEMU offered in the greeting (e.g. `oob`, which
    /// [`QmpClient::connect_to_running`] enables). Empty until the greeting
    /// is read (see [`QmpClient::version`]).
    pub fn capabilities(&self) -> &[String] {
        self.inner.shared.greeting.get().map_or(&[], |g| g.capabilities.as_slice())
    }

    /// The monitor socket this client is connected to.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// False once the socket has closed; every later command fails with
    /// [`QmpError::Disconnected`].
    pub fn is_connected(&self) -> bool {
        self.inner.shared.lock().events.is_some()
    }

    /// The timeout [`QmpClient::execute`] applies.
    pub fn default_timeout(&self) -> Duration {
        *self.inner.default_timeout.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Changes the timeout [`QmpClient::execute`] applies, for every clone of this client.
    pub fn set_default_timeout(&self, timeout: Duration) {
        *self.inner.default_timeout.lock().unwrap_or_else(PoisonError::into_inner) = timeout;
    }

    /// A new receiver for every event QEMU sends from now on.
    ///
    /// Subscribe *before* issuing the command whose events you want: e.g. a
    /// job's `created`/`running` JOB_STATUS_CHANGE arrive before the reply to
    /// the command that starts it. The stream ends (`RecvError::Closed`) when
    /// the connection closes; a receiver obtained after that is already closed.
    pub fn subscribe_events(&self) -> broadcast::Receiver<QmpEvent> {
        match &self.inner.shared.lock().events {
            Some(tx) => tx.subscribe(),
            None => broadcast::channel(1).1,
        }
    }

    /// Runs `command` with the default timeout and returns QEMU's `return` value.
    pub async fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.execute_timeout(command, arguments, self.default_timeout()).await
    }

    /// Runs `command`, giving up after `timeout`.
    ///
    /// After a [`QmpError::Timeout`] the command may still complete inside
    /// QEMU; its late reply is discarded and the connection stays usable.
    pub async fn execute_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        self.request(command, arguments, None, timeout).await
    }

    /// Runs `command` with the default timeout and decodes its `return` value into `T`.
    pub async fn execute_typed<T: DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<T, QmpError> {
        let value = self.execute(command, arguments).await?;
        serde_json::from_value(value)
            .map_err(|e| QmpError::Protocol(format!("reply to '{command}' did not decode: {e}")))
    }

    /// `query-status`.
    pub async fn query_status(&self) -> Result<StatusInfo, QmpError> {
        self.execute_typed("query-status", None).await
    }

    /// `query-block`: one entry per BlockBackend (empty with `-machine none`).
    pub async fn query_block(&self) -> Result<Vec<BlockInfo>, QmpError> {
        self.execute_typed("query-block", None).await
    }

    /// `query-named-block-nodes {"flat": true}`: every node once, without
    /// the nested `backing-image` trees.
    pub async fn query_named_block_nodes(&self) -> Result<Vec<NamedBlockNode>, QmpError> {
        self.execute_typed("query-named-block-nodes", Some(json!({"flat": true}))).await
    }

    /// `query-block-jobs`.
    pub async fn query_block_jobs(&self) -> Result<Vec<BlockJobInfo>, QmpError> {
        self.execute_typed("query-block-jobs", None).await
    }

    /// `query-jobs`.
    pub async fn query_jobs(&self) -> Result<Vec<JobInfo>, QmpError> {
        self.execute_typed("query-jobs", None).await
    }

    /// `query-kvm`.
    pub async fn query_kvm(&self) -> Result<KvmInfo, QmpError> {
        self.execute_typed("query-kvm", None).await
    }

    /// Passes `fd` to QEMU under `fdname` (`getfd` with the descriptor
    /// attached via SCM_RIGHTS to the same message). QEMU replaces a
    /// descriptor already registered under that name; `closefd` releases it.
    ///
    /// The caller keeps ownership of `fd`: QEMU receives its own duplicate.
    pub async fn send_fd(&self, fdname: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        // The write runs in a detached task (see `write`), which needs an
        // owned descriptor; the duplicate is closed once it has been sent.
        let owned = fd.try_clone_to_owned().map_err(|source| QmpError::Io { path: self.inner.path.clone(), source })?;
        self.request("getfd", Some(json!({ "fdname": fdname })), Some(owned), self.default_timeout()).await.map(drop)
    }

    /// Runs an HMP command line through `human-monitor-command` and returns
    /// its text output.
    ///
    /// QEMU quirk: HMP reports its errors as ordinary output, so an unknown
    /// command or a failed operation still returns `Ok` with the error text
    /// (e.g. `unknown command: 'foo'`). Only QMP-level problems are `Err`.
    /// Interpreting the text is up to the caller. Also note that some HMP
    /// commands (e.g. `qemu-io` read results) print to QEMU's stdout rather
    /// than into this reply.
    pub async fn human_monitor_command(&self, cmd: &str) -> Result<String, QmpError> {
        self.execute_typed("human-monitor-command", Some(json!({ "command-line": cmd }))).await
    }

    /// Waits for the next event on `rx` that satisfies `pred`, skipping others.
    ///
    /// Fails with [`QmpError::Disconnected`] if the connection closes,
    /// [`QmpError::EventsLagged`] if `rx` fell behind and lost events (the
    /// awaited one may be among them), or [`QmpError::Timeout`] (command
    /// `wait_event`) after `timeout`.
    pub async fn wait_event(
        &self,
        rx: &mut broadcast::Receiver<QmpEvent>,
        pred: impl Fn(&QmpEvent) -> bool,
        timeout: Duration,
    ) -> Result<QmpEvent, QmpError> {
        let wait = async {
            loop {
                match rx.recv().await {
                    Ok(event) if pred(&event) => return Ok(event),
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Closed) => return Err(QmpError::Disconnected),
                    Err(broadcast::error::RecvError::Lagged(missed)) => return Err(QmpError::EventsLagged { missed }),
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or_else(|_| Err(QmpError::Timeout { command: "wait_event".into(), after: timeout }))
    }

    async fn request(
        &self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<OwnedFd>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let (id, bytes) = self.encode(command, arguments)?;
        // Registered before writing: the reply can arrive before the write
        // call returns.
        let rx = self.inner.shared.register(id)?;
        let _pending = PendingGuard { shared: Arc::clone(&self.inner.shared), id };
        let started = Instant::now();
        let with_fd = fd.is_some();
        let exchange = async {
            self.write(bytes, fd, Hold::None).await?;
            tracing::debug!(command, id, with_fd, "QMP command sent");
            rx.await.map_err(|_| QmpError::Disconnected)
        };
        let outcome = tokio::time::timeout(timeout, exchange).await.ok();
        settle(command, id, started, timeout, outcome)
    }

    /// Runs `commands` in this order, sent in one write: QEMU runs a
    /// monitor's commands one at a time, so each starts once the one before
    /// has ended, without a round trip between them. One result per
    /// command, all within the default timeout; a failed command does not
    /// stop the ones after it.
    pub async fn execute_in_order(&self, commands: Vec<(&str, Option<Value>)>) -> Vec<Result<Value, QmpError>> {
        self.send_in_order(commands).await.replies().await
    }

    /// The first half of [`QmpClient::execute_in_order`]: the commands
    /// written, their replies still to come ([`SentCommands::replies`]),
    /// so that the caller can write more (a command to hold) meanwhile.
    pub async fn send_in_order(&self, commands: Vec<(&str, Option<Value>)>) -> SentCommands {
        let started = Instant::now();
        let (bytes, queued) = self.queue(commands.iter().map(|(c, a)| (*c, a.clone())));
        let written = self.write(bytes, None, Hold::None).await;
        SentCommands { client: self.clone(), queued, written, started }
    }

    /// Writes `commands` but the last bytes of the first, and returns them
    /// held, to be run with [`HeldCommands::run`]. QEMU reads a command's
    /// JSON a byte at a time (about 5 µs a byte here) and runs it only once
    /// its last byte has come, so the reading is done while the caller
    /// readies what the commands need (a file they open). Any other command
    /// written on this connection meanwhile aborts the held one first
    /// (QEMU drops its partial JSON); `run` then writes it again whole.
    /// Only the first command is read ahead: the ones after it would run
    /// at once. Held behind a command still running, it is read meanwhile
    /// on a connection with `oob` ([`QmpClient::connect_to_running`]),
    /// else once that command has ended.
    pub async fn hold(&self, commands: Vec<(&str, Option<Value>)>) -> Result<HeldCommands, QmpError> {
        let Some((first, _)) = commands.first() else {
            return Err(QmpError::Protocol("no command to hold".into()));
        };
        let first = (*first).to_string();
        let (bytes, queued) = self.queue(commands.iter().map(|(c, a)| (*c, a.clone())));
        let mut registered = Vec::new();
        for (command, entry) in queued {
            registered.push((command, entry?));
        }
        let id = registered.first().map(|(_, (id, _, _))| *id).unwrap_or_default();
        // The first message ends in "}\n" (JSON text has no raw newline):
        // without its closing brace, QEMU's parser waits for more.
        let held_len = bytes.iter().position(|&b| b == b'\n').unwrap_or(bytes.len()).saturating_sub(1);
        self.write(bytes.clone(), None, Hold::Start { id, len: held_len }).await?;
        tracing::debug!(command = first, id, "QMP command held");
        let commands = commands.into_iter().map(|(c, a)| (c.to_string(), a)).collect();
        Ok(HeldCommands { client: self.clone(), id, commands, bytes, held_len, registered })
    }

    /// Each command encoded and registered for its reply, in order, and
    /// their messages in one buffer; a command that cannot be sent is its
    /// error (and has no bytes).
    fn queue<'a>(&self, commands: impl Iterator<Item = (&'a str, Option<Value>)>) -> (Vec<u8>, Vec<Queued>) {
        let mut bytes = Vec::new();
        let mut queued = Vec::new();
        for (command, arguments) in commands {
            let registered = self.encode(command, arguments).and_then(|(id, message)| {
                // Registered before writing: the reply can arrive before
                // the write call returns.
                let rx = self.inner.shared.register(id)?;
                bytes.extend(message);
                Ok((id, rx, PendingGuard { shared: Arc::clone(&self.inner.shared), id }))
            });
            queued.push((command.to_string(), registered));
        }
        (bytes, queued)
    }

    /// The results of `queued` commands, written (or not: `written`) from
    /// `started`, within `timeout` in all.
    async fn replies(
        &self,
        queued: Vec<Queued>,
        written: Result<(), QmpError>,
        started: Instant,
        timeout: Duration,
    ) -> Vec<Result<Value, QmpError>> {
        if written.is_ok() {
            for (command, registered) in &queued {
                if let Ok((id, _, _)) = registered {
                    tracing::debug!(command, id, with_fd = false, "QMP command sent");
                }
            }
        }
        let mut results = Vec::new();
        for (command, registered) in queued {
            let (id, rx, _pending) = match (registered, &written) {
                (Err(e), _) => {
                    results.push(Err(e));
                    continue;
                }
                (Ok(_), Err(e)) => {
                    results.push(Err(match e {
                        QmpError::Timeout { after, .. } => QmpError::Timeout { command, after: *after },
                        _ => QmpError::Disconnected,
                    }));
                    continue;
                }
                (Ok(registered), Ok(())) => registered,
            };
            let left = timeout.saturating_sub(started.elapsed());
            let outcome = tokio::time::timeout(left, async { rx.await.map_err(|_| QmpError::Disconnected) }).await.ok();
            results.push(settle(&command, id, started, timeout, outcome));
        }
        results
    }

    /// A command's id and its message, newline included.
    fn encode(&self, command: &str, arguments: Option<Value>) -> Result<(u64, Vec<u8>), QmpError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        Ok((id, encode_message(command, arguments, id)?))
    }

    /// Writes `bytes` (whole messages), with `fd` attached if given, or
    /// part of them as `hold` says, within the default timeout.
    ///
    /// The write runs in its own task so that it always finishes even when the
    /// caller's future is dropped (timeout, `select!`): abandoning a write
    /// half-way would leave a truncated JSON object on the socket and corrupt
    /// every later command on this connection.
    async fn write(&self, bytes: Vec<u8>, fd: Option<OwnedFd>, hold: Hold) -> Result<(), QmpError> {
        let writer = Arc::clone(&self.inner.writer);
        let shared = Arc::clone(&self.inner.shared);
        let task = tokio::spawn(async move {
            let mut writer = writer.lock().await;
            let writer = &mut *writer;
            let mut from = 0;
            match (writer.held.take(), hold) {
                (Some(held), Hold::Rest { id, from: rest }) if held == id => from = rest,
                (Some(held), _) => {
                    tracing::debug!(id = held, "held QMP command aborted");
                    shared.lock().aborts_unanswered += 1;
                    writer.half.write_all(ABORT_PARTIAL).await?;
                }
                (None, _) => {}
            }
            let until = match hold {
                Hold::Start { len, .. } => len,
                Hold::None | Hold::Rest { .. } => bytes.len(),
            };
            match fd {
                Some(fd) => write_with_fd(&mut writer.half, &bytes[from..until], fd.as_fd()).await?,
                None => writer.half.write_all(&bytes[from..until]).await?,
            }
            if let Hold::Start { id, .. } = hold {
                writer.held = Some(id);
            }
            Ok::<(), io::Error>(())
        });
        let timeout = self.default_timeout();
        let finished = match tokio::time::timeout(timeout, task).await {
            Ok(finished) => finished,
            Err(_) => return Err(QmpError::Timeout { command: "a write".into(), after: timeout }),
        };
        match finished {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(match e.kind() {
                io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::NotConnected => {
                    QmpError::Disconnected
                }
                _ => QmpError::Io { path: self.inner.path.clone(), source: e },
            }),
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            // Cancelled: the runtime is shutting down.
            Err(_) => Err(QmpError::Disconnected),
        }
    }
}

/// Which part of a write's bytes go out, and what becomes of a held
/// command (see [`QmpClient::hold`]).
#[derive(Debug, Clone, Copy)]
enum Hold {
    /// All of them; a held command is aborted first.
    None,
    /// The first `len` bytes, the rest held as command `id`'s.
    Start { id: u64, len: usize },
    /// Those from `from` on when command `id` is still held; all of them
    /// (again) when it was aborted meanwhile.
    Rest { id: u64, from: usize },
}

/// Commands written to QEMU but the last bytes of the first (see
/// [`QmpClient::hold`]). Dropping them leaves the partial command to be
/// aborted by the connection's next write.
pub struct HeldCommands {
    client: QmpClient,
    id: u64,
    commands: Vec<(String, Option<Value>)>,
    bytes: Vec<u8>,
    held_len: usize,
    registered: Vec<(String, Registered)>,
}

impl fmt::Debug for HeldCommands {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HeldCommands").field("id", &self.id).field("commands", &self.commands).finish()
    }
}

impl HeldCommands {
    /// Whether these are `commands`, in this order, with these arguments.
    pub fn are(&self, commands: &[(&str, Option<Value>)]) -> bool {
        self.commands.len() == commands.len()
            && self.commands.iter().zip(commands).all(|((c, a), (d, b))| c == d && a == b)
    }

    /// Whether they were held on `client`'s connection.
    pub fn on(&self, client: &QmpClient) -> bool {
        Arc::ptr_eq(&self.client.inner, &client.inner)
    }

    /// Writes the rest, so QEMU runs the commands in order, and returns one
    /// result per command, as [`QmpClient::execute_in_order`] does.
    pub async fn run(self) -> Vec<Result<Value, QmpError>> {
        self.send().await.replies().await
    }

    /// The first half of [`HeldCommands::run`]: the rest written, the
    /// replies still to come.
    pub async fn send(self) -> SentCommands {
        let HeldCommands { client, id, bytes, held_len, registered, .. } = self;
        let started = Instant::now();
        let written = client.write(bytes, None, Hold::Rest { id, from: held_len }).await;
        let queued = registered.into_iter().map(|(command, entry)| (command, Ok(entry))).collect();
        SentCommands { client, queued, written, started }
    }
}

/// Commands written to QEMU whose replies are still to come (see
/// [`QmpClient::send_in_order`]).
pub struct SentCommands {
    client: QmpClient,
    queued: Vec<Queued>,
    written: Result<(), QmpError>,
    started: Instant,
}

impl SentCommands {
    /// One result per command, in order, all within the default timeout
    /// from when they were written.
    pub async fn replies(self) -> Vec<Result<Value, QmpError>> {
        let SentCommands { client, queued, written, started } = self;
        let timeout = client.default_timeout();
        client.replies(queued, written, started, timeout).await
    }
}

/// The result of command `command` (`id`, sent at `started`) from its
/// reply, or `None` when `timeout` passed first; logged either way.
fn settle(
    command: &str,
    id: u64,
    started: Instant,
    timeout: Duration,
    reply: Option<Result<Reply, QmpError>>,
) -> Result<Value, QmpError> {
    let elapsed_ms = started.elapsed().as_secs_f64() * 1000.0;
    match reply {
        None => {
            tracing::debug!(command, id, elapsed_ms, "QMP command timed out");
            Err(QmpError::Timeout { command: command.into(), after: timeout })
        }
        Some(Ok(Reply::Return(value))) => {
            tracing::debug!(command, id, elapsed_ms, "QMP reply received");
            Ok(value)
        }
        Some(Ok(Reply::Error { class, desc })) => {
            tracing::debug!(command, id, elapsed_ms, %class, %desc, "QMP error reply received");
            Err(QmpError::Command { command: command.into(), class, desc })
        }
        Some(Err(e)) => {
            tracing::debug!(command, id, elapsed_ms, error = %e, "QMP command failed");
            Err(e)
        }
    }
}

async fn write_with_fd(writer: &mut OwnedWriteHalf, bytes: &[u8], fd: BorrowedFd<'_>) -> io::Result<()> {
    let stream: &UnixStream = writer.as_ref();
    let sent = loop {
        stream.writable().await?;
        match stream.try_io(Interest::WRITABLE, || fdpass::send_with_fd(stream.as_fd(), bytes, fd)) {
            Ok(n) => break n,
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => {}
            Err(e) => return Err(e),
        }
    };
    // QEMU keeps a received descriptor queued on the connection until a
    // command claims it, so the remainder of the message (if the socket took
    // only part of it) can follow as plain bytes.
    writer.write_all(&bytes[sent..]).await
}

/// A monitor connection with `qmp_capabilities` and one question written,
/// nothing read yet: [`QmpClient::ask_on_opening`]. Dropping it closes the
/// connection; QEMU's answer, if it comes, goes nowhere (a later client of
/// the monitor drops what arrives ahead of its own negotiation).
#[derive(Debug)]
pub struct AskedOnOpening {
    path: PathBuf,
    stream: std::os::unix::net::UnixStream,
    /// What the socket did not take at once (normally nothing).
    unsent: Vec<u8>,
    capabilities_id: u64,
    command: String,
    asked: Instant,
}

impl AskedOnOpening {
    /// The client, and QEMU's answer to the question. `timeout` bounds the
    /// greeting (and the rest of the opening, if it was not all written);
    /// the answer is then waited for up to the client's default timeout.
    /// Only a failed connection is the outer error.
    pub async fn answer(self, timeout: Duration) -> Result<(QmpClient, Result<Value, QmpError>), QmpError> {
        let AskedOnOpening { path, stream, unsent, capabilities_id, command, asked } = self;
        let io = |source| QmpError::Io { path: path.clone(), source };
        let (read, mut write) = UnixStream::from_std(stream).map_err(io)?.into_split();
        let opened = async {
            write.write_all(&unsent).await.map_err(io)?;
            let mut reader = BufReader::new(read);
            let greeting = read_greeting(&mut reader, &path).await?;
            Ok::<_, QmpError>((reader, greeting))
        };
        let (reader, greeting) = tokio::time::timeout(timeout, opened)
            .await
            .map_err(|_| QmpError::Timeout { command: "connect".into(), after: timeout })??;
        let shared = Shared::new(Some(greeting));
        // Registered before the reader starts: the answer may already be in.
        let rx = shared.register(FIRST_COMMAND_ID)?;
        let client = QmpClient::assemble(&path, reader, write, shared, capabilities_id, FIRST_COMMAND_ID + 1);
        let reply = {
            let _pending = PendingGuard { shared: Arc::clone(&client.inner.shared), id: FIRST_COMMAND_ID };
            tracing::debug!(command, id = FIRST_COMMAND_ID, with_fd = false, "QMP command sent");
            let after = client.default_timeout();
            let outcome =
                tokio::time::timeout(after, async { rx.await.map_err(|_| QmpError::Disconnected) }).await.ok();
            settle(&command, FIRST_COMMAND_ID, asked, after, outcome)
        };
        Ok((client, reply))
    }
}

/// A connection's first message: `qmp_capabilities` under its unique id,
/// enabling `oob` if asked.
fn opening(capabilities_id: u64, oob: bool) -> Vec<u8> {
    let enable = if oob { r#","arguments":{"enable":["oob"]}"# } else { "" };
    format!("{{\"execute\":\"qmp_capabilities\"{enable},\"id\":{capabilities_id}}}\n").into_bytes()
}

/// Whether a connection waits for QEMU's greeting before it is handed out.
#[derive(Debug, Clone, Copy)]
enum GreetingWait {
    /// Read by the connect: QEMU answered (a starting QEMU answers only
    /// once it has opened its images).
    Awaited,
    /// Read by the reader, while the caller goes on.
    Later,
}

/// Reads QEMU's greeting. QEMU keeps a monitor in command mode from one
/// client's disconnect until the next client's connection is processed, and
/// an event emitted in that window reaches the new client ahead of its
/// greeting. It was meant for the previous client, and no caller can have
/// subscribed yet, so it is dropped.
async fn read_greeting(reader: &mut BufReader<OwnedReadHalf>, path: &Path) -> Result<protocol::Greeting, QmpError> {
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .await
            .map_err(|source| QmpError::Io { path: path.to_path_buf(), source })?;
        if n == 0 {
            return Err(QmpError::Disconnected);
        }
        let trimmed = line.trim_ascii();
        if trimmed.is_empty() {
            continue;
        }
        if let Ok(Incoming::Event(event)) = protocol::parse_incoming(trimmed) {
            tracing::debug!(path = %path.display(), event = %event.event, "event ahead of the greeting dropped");
            continue;
        }
        let greeting = protocol::parse_greeting(trimmed)?;
        tracing::debug!(path = %path.display(), version = %greeting.version,
            capabilities = ?greeting.capabilities, "QMP greeting");
        return Ok(greeting);
    }
}

/// One command as QMP's JSON line, under `id`.
fn encode_message(command: &str, arguments: Option<Value>, id: u64) -> Result<Vec<u8>, QmpError> {
    let mut msg = Map::new();
    msg.insert("execute".into(), Value::from(command));
    if let Some(arguments) = arguments {
        msg.insert("arguments".into(), arguments);
    }
    msg.insert("id".into(), Value::from(id));
    let mut bytes =
        serde_json::to_vec(&msg).map_err(|e| QmpError::Protocol(format!("cannot encode '{command}': {e}")))?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// Reads QEMU's replies and events until the connection closes, starting
/// right after the greeting. Until the reply to `qmp_capabilities` (id
/// `capabilities_id`) comes, what the monitor sends was meant for its
/// previous client: QEMU keeps a monitor in command mode from one client's
/// disconnect until the next client's connection is processed, so an
/// event of that window (seen under load: a job's JOB_STATUS_CHANGE) or a
/// killed client's late reply (seen: `query-block`) can reach the new
/// client first. No caller can have asked for them: they are dropped.
async fn read_loop(mut reader: BufReader<OwnedReadHalf>, shared: Arc<Shared>, capabilities_id: u64, path: PathBuf) {
    if shared.greeting.get().is_none() {
        match read_greeting(&mut reader, &path).await {
            Ok(greeting) => {
                let _ = shared.greeting.set(greeting);
            }
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "no QMP greeting");
                shared.close();
                return;
            }
        }
    }
    let mut line = Vec::new();
    let mut negotiated = false;
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) => {
                tracing::debug!("QMP socket closed by QEMU");
                break;
            }
            Ok(_) if !line.ends_with(b"\n") => {
                tracing::warn!(partial = %String::from_utf8_lossy(&line),
                    "QMP socket closed in the middle of a message");
                break;
            }
            Ok(_) => {}
            Err(e) => {
                // The peer going away (QEMU quit or was killed) ends the
                // connection like EOF does; callers see Disconnected.
                tracing::debug!(error = %e, "QMP socket read failed");
                break;
            }
        }
        let text = line.trim_ascii();
        if text.is_empty() {
            continue;
        }
        if !negotiated {
            match protocol::parse_incoming(text) {
                Ok(Incoming::Reply { id: Some(id), reply: Reply::Return(_) }) if id == capabilities_id => {
                    negotiated = true;
                }
                Ok(Incoming::Reply { id: Some(id), reply: Reply::Error { class, desc } }) if id == capabilities_id => {
                    tracing::warn!(class, desc, "QEMU refused qmp_capabilities");
                    shared.fail_all(Reply::Error { class, desc: format!("qmp_capabilities refused: {desc}") });
                    break;
                }
                Ok(Incoming::Event(event)) => {
                    tracing::debug!(event = %event.event, "event ahead of the capabilities reply dropped");
                }
                Ok(other) => tracing::debug!(?other, "another client's reply dropped"),
                Err(e) => tracing::warn!(error = %e, "ignoring QMP line ahead of the capabilities reply"),
            }
            continue;
        }
        match protocol::parse_incoming(text) {
            Ok(Incoming::Event(event)) => shared.publish(event),
            Ok(Incoming::Reply { id: Some(id), reply }) => shared.complete(id, reply),
            // QEMU only answers without an id when it could not parse the
            // request; nobody can be matched to it.
            Ok(Incoming::Reply { id: None, reply }) => {
                let aborted = {
                    let mut state = shared.lock();
                    let aborted = matches!(reply, Reply::Error { .. }) && state.aborts_unanswered > 0;
                    state.aborts_unanswered -= usize::from(aborted);
                    aborted
                };
                if aborted {
                    tracing::debug!(?reply, "QEMU dropped an aborted held command");
                } else {
                    tracing::warn!(?reply, "QMP reply without a usable id");
                }
            }
            // A line that is not QMP cannot be attributed to any request; the
            // affected caller (if any) will time out.
            Err(e) => tracing::warn!(error = %e, "ignoring QMP line"),
        }
    }
    shared.close();
}
