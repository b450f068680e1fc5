//! Client behaviour that real QEMU shows only by timing: a peer that never
//! answers, and an event that arrives ahead of the greeting.
//!
//! QEMU cannot be made reliably slow, nor made to hit its reconnect race on
//! demand, so these tests use a local socket that speaks just enough QMP; they
//! check the client's timeout, id bookkeeping and handshake, not QEMU.
// Tests report failures by panicking.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use strata_qmp::{QmpClient, QmpError};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixListener;
use tokio::task::JoinHandle;

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "fake"}, "capabilities": ["oob"]}}"#;

/// A fake monitor socket in a new temporary directory.
fn listen() -> (tempfile::TempDir, PathBuf, UnixListener) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fake.sock");
    let listener = UnixListener::bind(&path).unwrap();
    (dir, path, listener)
}

/// The client's connection to the fake monitor: its request lines and
/// the peer's writing half.
async fn accept(listener: &UnixListener) -> (Lines<BufReader<OwnedReadHalf>>, OwnedWriteHalf) {
    let (stream, _) = listener.accept().await.unwrap();
    let (read, write) = stream.into_split();
    (BufReader::new(read).lines(), write)
}

/// The client's next request.
async fn next_request(lines: &mut Lines<BufReader<OwnedReadHalf>>) -> Value {
    serde_json::from_str(&lines.next_line().await.unwrap().unwrap()).unwrap()
}

/// Binds a fake monitor socket and serves one connection: it sends
/// `prelude` and the greeting, then writes what `answer` returns for each
/// request (given the command name and the request's id).
fn serve(
    prelude: &'static str,
    mut answer: impl FnMut(&str, Value) -> Vec<Value> + Send + 'static,
) -> (tempfile::TempDir, PathBuf, JoinHandle<()>) {
    let (dir, path, listener) = listen();
    let peer = tokio::spawn(async move {
        let (mut lines, mut write) = accept(&listener).await;
        write.write_all(format!("{prelude}{GREETING}\n").as_bytes()).await.unwrap();
        while let Some(line) = lines.next_line().await.unwrap() {
            let request: Value = serde_json::from_str(&line).unwrap();
            for reply in answer(request["execute"].as_str().unwrap(), request["id"].clone()) {
                write.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
            }
        }
    });
    (dir, path, peer)
}

#[tokio::test]
async fn client_timer_fires_when_fake_peer_never_replies() {
    // Answers qmp_capabilities, swallows every command except "reply-now",
    // which it answers only after first sending late replies to everything
    // it swallowed.
    let mut swallowed: Vec<Value> = Vec::new();
    let (_dir, path, peer) = serve("", move |command, id| match command {
        "qmp_capabilities" => vec![json!({"return": {}, "id": id})],
        "reply-now" => {
            let mut replies: Vec<Value> =
                swallowed.drain(..).map(|late| json!({"return": {"stale": true}, "id": late})).collect();
            replies.push(json!({"return": {"fresh": true}, "id": id}));
            replies
        }
        _ => {
            swallowed.push(id);
            Vec::new()
        }
    });

    let client = QmpClient::connect_with_timeout(&path, Duration::from_secs(5)).await.unwrap();
    assert_eq!(client.version().expect("the greeting").package, "fake");
    assert_eq!(client.capabilities(), ["oob"]);

    let started = Instant::now();
    let err = client.execute_timeout("slow-one", None, Duration::from_millis(100)).await.unwrap_err();
    match err {
        QmpError::Timeout { command, after } => {
            assert_eq!(command, "slow-one");
            assert_eq!(after, Duration::from_millis(100));
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    // The peer never answers: without the timeout the call would not end.
    assert!(started.elapsed() < Duration::from_secs(10));

    client.set_default_timeout(Duration::from_millis(50));
    assert_eq!(client.default_timeout(), Duration::from_millis(50));
    let err = client.execute("slow-two", None).await.unwrap_err();
    assert!(
        matches!(&err, QmpError::Timeout { command, after }
            if command == "slow-two" && *after == Duration::from_millis(50)),
        "{err:?}"
    );

    // The late replies to the two timed-out ids arrive first and must be
    // discarded, not handed to this request.
    let value = client.execute_timeout("reply-now", None, Duration::from_secs(5)).await.unwrap();
    assert_eq!(value, json!({"fresh": true}));

    // Dropping the last clone closes the connection, which ends the peer.
    drop(client);
    tokio::time::timeout(Duration::from_secs(5), peer).await.expect("connection not closed on drop").unwrap();
}

/// QEMU 7.2 leaves a monitor in command mode between one client's disconnect
/// and the next connection, so an event emitted then (seen in CI: a block
/// job's BLOCK_JOB_READY) reaches the new client before its greeting.
#[tokio::test]
async fn event_ahead_of_the_greeting_is_skipped() {
    const STALE: &str = concat!(
        r#"{"timestamp": {"seconds": 1795473704, "microseconds": 657287}, "event": "BLOCK_JOB_READY", "#,
        r#""data": {"device": "strata-copy-vda", "len": 67108864, "offset": 67108864, "speed": 0, "type": "mirror"}}"#,
        "\n"
    );
    let (_dir, path, peer) = serve(STALE, |command, id| match command {
        "qmp_capabilities" => vec![json!({"return": {}, "id": id})],
        other => vec![json!({"return": {"command": other}, "id": id})],
    });

    let client = QmpClient::connect_with_timeout(&path, Duration::from_secs(5)).await.unwrap();
    assert_eq!(client.version().expect("the greeting").package, "fake");
    let value = client.execute("query-status", None).await.unwrap();
    assert_eq!(value, json!({"command": "query-status"}));

    drop(client);
    tokio::time::timeout(Duration::from_secs(5), peer).await.expect("connection not closed on drop").unwrap();
}

/// An event of the same window can also come between the greeting and the
/// capabilities reply (seen under load: a job's JOB_STATUS_CHANGE); the
/// handshake skips it rather than failing the connection.
#[tokio::test]
async fn event_between_the_greeting_and_the_capabilities_reply_is_skipped() {
    let (_dir, path, peer) = serve("", |command, id| match command {
        "qmp_capabilities" => vec![
            json!({"timestamp": {"seconds": 1795473704, "microseconds": 1}, "event": "JOB_STATUS_CHANGE",
                   "data": {"id": "strata-pull-vda-3", "status": "concluded"}}),
            json!({"return": {}, "id": id}),
        ],
        other => vec![json!({"return": {"command": other}, "id": id})],
    });

    let client = QmpClient::connect_with_timeout(&path, Duration::from_secs(5)).await.unwrap();
    let value = client.execute("query-status", None).await.unwrap();
    assert_eq!(value, json!({"command": "query-status"}));

    drop(client);
    tokio::time::timeout(Duration::from_secs(5), peer).await.expect("connection not closed on drop").unwrap();
}

/// QEMU writes a reply it computed after its client went away to the next
/// client of the monitor (seen: a killed `strata`'s `query-block`), and
/// only ahead of that client's capabilities reply: its commands run one at
/// a time and in order, and the previous client's queued ones are dropped
/// at its disconnect. So everything before that reply is dropped, even a
/// reply whose id one of this connection's commands will use (they are
/// numbered from 1).
#[tokio::test]
async fn another_clients_late_replies_are_never_taken_for_this_ones() {
    let (_dir, path, peer) = serve("", |command, id| {
        // What a client numbering from 0 would have had outstanding.
        let stale = |n: u64| json!({"return": {"stale": n}, "id": n});
        match command {
            "qmp_capabilities" => {
                let mut replies: Vec<Value> = (0..8).map(stale).collect();
                replies.push(json!({"return": {}, "id": id}));
                replies
            }
            other => vec![json!({"return": {"command": other}, "id": id})],
        }
    });

    let client = QmpClient::connect_with_timeout(&path, Duration::from_secs(5)).await.unwrap();
    for command in ["query-block", "query-status"] {
        let value = client.execute_timeout(command, None, Duration::from_secs(5)).await.unwrap();
        assert_eq!(value, json!({"command": command}));
    }

    drop(client);
    tokio::time::timeout(Duration::from_secs(5), peer).await.expect("connection not closed on drop").unwrap();
}

/// The handshake takes one round trip: `qmp_capabilities` goes out with the
/// connection, before the greeting is read. This peer reads a command
/// before it greets, so a client that waited for the greeting first would
/// time out.
#[tokio::test]
async fn capabilities_are_sent_before_the_greeting_is_read() {
    let (_dir, path, listener) = listen();
    let peer = tokio::spawn(async move {
        let (mut lines, mut write) = accept(&listener).await;
        let first = next_request(&mut lines).await;
        assert_eq!(first["execute"], "qmp_capabilities");
        let reply = json!({"return": {}, "id": first["id"]});
        write.write_all(format!("{GREETING}\n{reply}\n").as_bytes()).await.unwrap();
        let next = next_request(&mut lines).await;
        assert_ne!(next["id"], first["id"], "a later command reuses the handshake's id");
        write
            .write_all(format!("{}\n", json!({"return": {"status": "running"}, "id": next["id"]})).as_bytes())
            .await
            .unwrap();
        // Served until the client hangs up.
        while lines.next_line().await.unwrap().is_some() {}
    });
    let client = QmpClient::connect_with_timeout(&path, Duration::from_secs(5)).await.unwrap();
    assert_eq!(client.version().expect("the greeting").package, "fake");
    let value = client.execute_timeout("query-status", None, Duration::from_secs(5)).await.unwrap();
    assert_eq!(value, json!({"status": "running"}));
    drop(client);
    tokio::time::timeout(Duration::from_secs(5), peer).await.expect("connection not closed on drop").unwrap();
}

/// The first command goes out right behind `qmp_capabilities`, without
/// waiting for its reply: this peer greets, then reads both before it
/// answers either (a client that waited for the capabilities reply would
/// time out).
#[tokio::test]
async fn the_first_command_goes_out_before_the_capabilities_reply() {
    let (_dir, path, listener) = listen();
    let peer = tokio::spawn(async move {
        let (mut lines, mut write) = accept(&listener).await;
        write.write_all(format!("{GREETING}\n").as_bytes()).await.unwrap();
        let capabilities = next_request(&mut lines).await;
        let first = next_request(&mut lines).await;
        assert_eq!(capabilities["execute"], "qmp_capabilities");
        assert_eq!(first["execute"], "query-status");
        // A previous client's event in between is not this client's.
        let stale = json!({"timestamp": {"seconds": 1, "microseconds": 0}, "event": "STOP"});
        let replies = [
            stale,
            json!({"return": {}, "id": capabilities["id"]}),
            json!({"return": {"status": "running"}, "id": first["id"]}),
        ];
        for reply in replies {
            write.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
        }
        while lines.next_line().await.unwrap().is_some() {}
    });
    let client = QmpClient::connect_with_timeout(&path, Duration::from_secs(5)).await.unwrap();
    let mut events = client.subscribe_events();
    let value = client.execute_timeout("query-status", None, Duration::from_secs(5)).await.unwrap();
    assert_eq!(value, json!({"status": "running"}));
    assert!(events.try_recv().is_err(), "the event ahead of the capabilities reply reached a subscriber");
    drop(client);
    tokio::time::timeout(Duration::from_secs(5), peer).await.expect("connection not closed on drop").unwrap();
}

/// A refused negotiation fails the command waiting behind it with QEMU's
/// reason, not a timeout.
#[tokio::test]
async fn a_refused_negotiation_fails_the_first_command() {
    let (_dir, path, peer) = serve("", |command, id| match command {
        "qmp_capabilities" => vec![json!({"error": {"class": "GenericError", "desc": "no way"}, "id": id})],
        _ => {
            vec![json!({"error": {"class": "CommandNotFound", "desc": "Expecting capabilities negotiation"}, "id": id})]
        }
    });
    let client = QmpClient::connect_with_timeout(&path, Duration::from_secs(5)).await.unwrap();
    let err = client.execute_timeout("query-status", None, Duration::from_secs(5)).await.expect_err("refused");
    assert!(err.to_string().contains("qmp_capabilities refused: no way"), "{err}");
    drop(client);
    let _ = tokio::time::timeout(Duration::from_secs(5), peer).await;
}

/// `execute_in_order` sends its commands together: this peer reads all
/// three before it answers any (a client waiting for each reply would time
/// out), receives them in the order given, and a refused command in the
/// middle fails alone.
#[tokio::test]
async fn commands_in_order_go_out_together_and_fail_one_by_one() {
    let (_dir, path, listener) = listen();
    let peer = tokio::spawn(async move {
        let (mut lines, mut write) = accept(&listener).await;
        let capabilities = next_request(&mut lines).await;
        let reply = json!({"return": {}, "id": capabilities["id"]});
        write.write_all(format!("{GREETING}\n{reply}\n").as_bytes()).await.unwrap();
        let mut batch = Vec::new();
        for _ in 0..3 {
            let command = next_request(&mut lines).await;
            batch.push(command);
        }
        let nodes: Vec<&str> = batch.iter().map(|c| c["arguments"]["node-name"].as_str().unwrap()).collect();
        assert_eq!(nodes, ["a-fmt", "a-file", "b-fmt"]);
        for (n, command) in batch.iter().enumerate() {
            let reply = if n == 1 {
                json!({"error": {"class": "GenericError", "desc": "node is in use"}, "id": command["id"]})
            } else {
                json!({"return": {}, "id": command["id"]})
            };
            write.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
        }
        while lines.next_line().await.unwrap().is_some() {}
    });
    let client = QmpClient::connect_with_timeout(&path, Duration::from_secs(5)).await.unwrap();
    client.set_default_timeout(Duration::from_secs(5));
    let commands =
        ["a-fmt", "a-file", "b-fmt"].iter().map(|n| ("blockdev-del", Some(json!({"node-name": n})))).collect();
    let results = client.execute_in_order(commands).await;
    assert_eq!(results.len(), 3);
    assert_eq!(results[0].as_ref().unwrap(), &json!({}));
    assert!(matches!(&results[1], Err(QmpError::Command { desc, .. }) if desc == "node is in use"), "{results:?}");
    assert_eq!(results[2].as_ref().unwrap(), &json!({}));
    drop(client);
    tokio::time::timeout(Duration::from_secs(5), peer).await.expect("connection not closed on drop").unwrap();
}

/// A monitor of a running QEMU is handed out before the greeting is read:
/// this peer greets only after a pause, and the client is back before it;
/// its first command goes out behind the negotiation and is answered once
/// the greeting came, which the reader took in. A peer that hangs up
/// without greeting fails the first command as a disconnection.
#[tokio::test]
async fn a_connection_to_a_running_qemu_does_not_wait_for_the_greeting() {
    const PAUSE: Duration = Duration::from_millis(300);
    let (_dir, path, listener) = listen();
    let peer = tokio::spawn(async move {
        let (mut lines, mut write) = accept(&listener).await;
        let capabilities = next_request(&mut lines).await;
        assert_eq!(capabilities["execute"], "qmp_capabilities");
        tokio::time::sleep(PAUSE).await;
        let reply = json!({"return": {}, "id": capabilities["id"]});
        write.write_all(format!("{GREETING}\n{reply}\n").as_bytes()).await.unwrap();
        let command = next_request(&mut lines).await;
        let reply = json!({"return": {"status": "running"}, "id": command["id"]});
        write.write_all(format!("{reply}\n").as_bytes()).await.unwrap();
        while lines.next_line().await.unwrap().is_some() {}
    });
    let started = Instant::now();
    let client = QmpClient::connect_to_running(&path).await.unwrap();
    assert!(started.elapsed() < PAUSE, "the connection waited for the greeting: {:?}", started.elapsed());
    assert!(client.version().is_none(), "no greeting has come yet");
    let value = client.execute_timeout("query-status", None, Duration::from_secs(5)).await.unwrap();
    assert_eq!(value, json!({"status": "running"}));
    assert!(started.elapsed() >= PAUSE);
    assert_eq!(client.version().expect("the greeting, read by the reader").package, "fake");
    assert_eq!(client.capabilities(), ["oob"]);
    drop(client);
    tokio::time::timeout(Duration::from_secs(5), peer).await.expect("connection not closed on drop").unwrap();

    let (_dir, path, listener) = listen();
    let peer = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        drop(stream);
    });
    let client = QmpClient::connect_to_running(&path).await.unwrap();
    let err = client.execute_timeout("query-status", None, Duration::from_secs(5)).await.unwrap_err();
    assert!(matches!(err, QmpError::Disconnected), "{err:?}");
    peer.await.unwrap();
}
