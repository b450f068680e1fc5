//! Integration tests against a real qemu-system-x86_64 (7.2).
// Tests report failures by panicking.
#![allow(clippy::unwrap_used)]

mod common;

use std::fs::File;
use std::os::fd::AsFd;
use std::time::Duration;

use common::{qemu_img_create, Qemu};
use serde_json::json;
use strata_qmp::event::{BlockJobPending, JobStatusChange, Shutdown, ShutdownCause};
use strata_qmp::types::{JobStatus, JobType, KvmInfo, RunState, StatusInfo};
use strata_qmp::{KnownEvent, QmpClient, QmpError, QmpEvent};
use tokio::sync::broadcast;

const EVENT_WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn connect_reports_version_and_status_follows_cont() {
    let mut qemu = Qemu::spawn();
    let client = qemu.connect().await;
    assert_eq!(client.version().expect("the greeting").major, 7);
    assert!(client.is_connected());

    let status = client.query_status().await.unwrap();
    assert_eq!(status, StatusInfo { running: false, status: RunState::Prelaunch });
    assert!(!client.query_kvm().await.unwrap().enabled);

    let mut events = client.subscribe_events();
    client.execute("cont", None).await.unwrap();
    let resume = client.wait_event(&mut events, |e| e.event == "RESUME", EVENT_WAIT).await.unwrap();
    assert_eq!(resume.known(), KnownEvent::Resume);

    let status = client.query_status().await.unwrap();
    assert!(status.running);
    assert_eq!(status.status, RunState::Running);
}

/// A command sent with the connection's opening is answered, and the
/// connection goes on with ids of its own.
#[tokio::test]
async fn a_command_sent_with_the_opening_is_answered_and_the_connection_goes_on() {
    let mut qemu = Qemu::spawn();
    // Waits for QEMU to listen; the monitor is free again once it is dropped.
    drop(qemu.connect().await);

    let (client, reply) =
        QmpClient::connect_and_execute(qemu.socket(), Duration::from_secs(5), "query-status").await.unwrap();
    let status: StatusInfo = serde_json::from_value(reply.unwrap()).unwrap();
    assert_eq!(status, StatusInfo { running: false, status: RunState::Prelaunch });
    assert_eq!(client.version().expect("the greeting").major, 7);
    client.execute("cont", None).await.unwrap();
    assert_eq!(client.query_status().await.unwrap().status, RunState::Running);
    drop(client);

    // A refused first command is the command's error; the connection stays.
    let (client, reply) =
        QmpClient::connect_and_execute(qemu.socket(), Duration::from_secs(5), "no-such-command").await.unwrap();
    assert!(matches!(reply, Err(QmpError::Command { ref class, .. }) if class == "CommandNotFound"), "{reply:?}");
    assert!(client.query_status().await.unwrap().running);
}

/// A question asked on the opening is answered while the asker does other
/// work, and read later. One dropped unread closes its connection: QEMU
/// serves one client per monitor, and the next one is greeted (within 5 s)
/// and gets the answer to its own question.
#[tokio::test]
async fn a_question_asked_on_the_opening_is_read_later_and_a_dropped_one_frees_the_monitor() {
    let mut qemu = Qemu::spawn();
    drop(qemu.connect().await);

    let asked = QmpClient::ask_on_opening(qemu.socket(), "query-status").unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let (client, reply) = asked.answer(Duration::from_secs(5)).await.unwrap();
    let status: StatusInfo = serde_json::from_value(reply.unwrap()).unwrap();
    assert_eq!(status, StatusInfo { running: false, status: RunState::Prelaunch });
    assert!(!client.query_kvm().await.unwrap().enabled);
    drop(client);

    for _ in 0..20 {
        drop(QmpClient::ask_on_opening(qemu.socket(), "query-status").unwrap());
        let (client, reply) = loop {
            match QmpClient::connect_and_execute(qemu.socket(), Duration::from_secs(5), "query-kvm").await {
                // QEMU has not yet taken in the dropped connection.
                Err(QmpError::Io { source, .. }) if source.kind() == std::io::ErrorKind::WouldBlock => {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                connected => break connected.unwrap(),
            }
        };
        let kvm: KvmInfo = serde_json::from_value(reply.unwrap()).unwrap();
        assert!(!kvm.enabled);
        assert_eq!(client.query_status().await.unwrap().status, RunState::Prelaunch);
    }

    let nothing = qemu.dir().join("nothing.sock");
    match QmpClient::ask_on_opening(&nothing, "query-status") {
        Err(QmpError::Io { path, source }) => {
            assert_eq!(path, nothing);
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

#[tokio::test]
async fn unknown_command_is_command_not_found() {
    let mut qemu = Qemu::spawn();
    let client = qemu.connect().await;
    match client.execute("no-such-command", None).await {
        Err(QmpError::Command { command, class, desc }) => {
            assert_eq!(command, "no-such-command");
            assert_eq!(class, "CommandNotFound");
            assert!(desc.contains("no-such-command"), "{desc}");
        }
        other => panic!("expected a Command error, got {other:?}"),
    }
    // The connection is still fine afterwards.
    client.query_status().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_executes_get_their_own_replies() {
    let mut qemu = Qemu::spawn();
    let client = qemu.connect().await;
    // Each reply shape only decodes as its own type, so a reply delivered to
    // the wrong request fails the decode.
    let a = {
        let client = client.clone();
        tokio::spawn(async move {
            for _ in 0..100 {
                let s = client.query_status().await.unwrap();
                assert_eq!(s.status, RunState::Prelaunch);
            }
        })
    };
    let b = {
        let client = client.clone();
        tokio::spawn(async move {
            for _ in 0..100 {
                let k = client.query_kvm().await.unwrap();
                assert!(!k.enabled);
                let v = client.execute("query-version", None).await.unwrap();
                assert_eq!(v["qemu"]["major"], 7);
            }
        })
    };
    a.await.unwrap();
    b.await.unwrap();
}

#[tokio::test]
async fn blockdev_add_shows_named_nodes() {
    let mut qemu = Qemu::spawn();
    let client = qemu.connect().await;
    let image = qemu.dir().join("a.qcow2");
    qemu_img_create(&["-q", "-f", "qcow2", image.to_str().unwrap(), "16M"]);

    let (command, arguments) = add_qcow2("a", &image);
    client.execute(command, arguments).await.unwrap();

    let nodes = client.query_named_block_nodes().await.unwrap();
    let fmt = nodes.iter().find(|n| n.node_name == "a-fmt").unwrap();
    let file = nodes.iter().find(|n| n.node_name == "a-file").unwrap();
    assert_eq!(fmt.drv, "qcow2");
    assert_eq!(fmt.image.virtual_size, 16 << 20);
    assert_eq!(fmt.image.format, "qcow2");
    assert_eq!(fmt.backing_file, None);
    assert!(!fmt.ro);
    assert_eq!(file.drv, "file");
    assert_eq!(file.file, image.to_str().unwrap());
    // -machine none has no devices, hence no BlockBackends.
    assert!(client.query_block().await.unwrap().is_empty());
}

/// A `blockdev-add` of the qcow2 image `image` as nodes `NAME-fmt` and
/// `NAME-file`.
fn add_qcow2(name: &str, image: &std::path::Path) -> (&'static str, Option<serde_json::Value>) {
    let args = json!({
        "driver": "qcow2",
        "node-name": format!("{name}-fmt"),
        "file": {"driver": "file", "filename": image, "node-name": format!("{name}-file")},
    });
    ("blockdev-add", Some(args))
}

/// The node names QEMU has now.
async fn node_names(client: &QmpClient) -> Vec<String> {
    client.query_named_block_nodes().await.unwrap().into_iter().map(|n| n.node_name).collect()
}

#[tokio::test]
async fn a_held_command_runs_only_once_its_last_bytes_come() {
    let mut qemu = Qemu::spawn();
    let client = qemu.connect().await;
    let image = qemu.dir().join("later.qcow2");

    // Held before its image exists: had QEMU run it, it would have failed.
    let held = client.hold(vec![add_qcow2("later", &image)]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    qemu_img_create(&["-q", "-f", "qcow2", image.to_str().unwrap(), "16M"]);
    let replies = held.run().await;
    assert_eq!(replies.len(), 1);
    replies.into_iter().for_each(|r| r.map(drop).unwrap());
    assert!(node_names(&client).await.contains(&"later-fmt".to_string()));
}

#[tokio::test]
async fn a_command_written_while_one_is_held_aborts_it_and_the_held_one_goes_again_whole() {
    let mut qemu = Qemu::spawn();
    let client = qemu.connect().await;
    let image = qemu.dir().join("a.qcow2");
    qemu_img_create(&["-q", "-f", "qcow2", image.to_str().unwrap(), "16M"]);
    let second = qemu.dir().join("b.qcow2");
    qemu_img_create(&["-q", "-f", "qcow2", second.to_str().unwrap(), "16M"]);

    let held = client.hold(vec![add_qcow2("a", &image), add_qcow2("b", &second)]).await.unwrap();
    assert!(held.are(&[add_qcow2("a", &image), add_qcow2("b", &second)]));
    assert!(!held.are(&[add_qcow2("a", &image)]));
    assert!(held.on(&client));
    // Another command aborts the held one: it is answered, and QEMU has
    // run neither the held command nor the one behind it.
    assert!(!client.query_status().await.unwrap().running);
    let nodes = node_names(&client).await;
    assert!(!nodes.iter().any(|n| n.starts_with("a-") || n.starts_with("b-")), "{nodes:?}");
    // Run, the held commands go out whole, once each.
    let replies = held.run().await;
    assert_eq!(replies.len(), 2);
    replies.into_iter().for_each(|r| r.map(drop).unwrap());
    let nodes = node_names(&client).await;
    assert!(nodes.contains(&"a-fmt".to_string()) && nodes.contains(&"b-fmt".to_string()), "{nodes:?}");

    // A held command dropped unrun never runs, and the connection goes on.
    let third = qemu.dir().join("c.qcow2");
    qemu_img_create(&["-q", "-f", "qcow2", third.to_str().unwrap(), "16M"]);
    drop(client.hold(vec![add_qcow2("c", &third)]).await.unwrap());
    assert!(!client.query_status().await.unwrap().running);
    assert!(!node_names(&client).await.contains(&"c-fmt".to_string()));
    assert!(client.is_connected());
}

/// The next JOB_STATUS_CHANGE of job `id`.
async fn next_status(client: &QmpClient, events: &mut broadcast::Receiver<QmpEvent>, id: &str) -> JobStatus {
    let event =
        client.wait_event(events, |e| e.event == "JOB_STATUS_CHANGE" && e.data["id"] == id, EVENT_WAIT).await.unwrap();
    match event.known() {
        KnownEvent::JobStatusChange(JobStatusChange { status, .. }) => status,
        other => panic!("undecodable JOB_STATUS_CHANGE {event:?}: {other:?}"),
    }
}

#[tokio::test]
async fn block_stream_job_lifecycle_with_manual_finalize() {
    let mut qemu = Qemu::spawn();
    let client = qemu.connect().await;
    let base = qemu.dir().join("base.qcow2");
    let top = qemu.dir().join("top.qcow2");
    qemu_img_create(&["-q", "-f", "qcow2", base.to_str().unwrap(), "16M"]);
    qemu_img_create(&["-q", "-f", "qcow2", "-b", base.to_str().unwrap(), "-F", "qcow2", top.to_str().unwrap()]);
    client
        .execute(
            "blockdev-add",
            Some(json!({
                "driver": "qcow2", "node-name": "base-fmt", "read-only": true,
                "file": {"driver": "file", "filename": base, "node-name": "base-file"},
            })),
        )
        .await
        .unwrap();
    client
        .execute(
            "blockdev-add",
            Some(json!({
                "driver": "qcow2", "node-name": "top-fmt", "backing": "base-fmt",
                "file": {"driver": "file", "filename": top, "node-name": "top-file"},
            })),
        )
        .await
        .unwrap();

    // Subscribed first: `created` and `running` arrive before the reply.
    let mut events = client.subscribe_events();
    // With -machine none there is no BlockBackend; the node name is accepted as `device`.
    client
        .execute(
            "block-stream",
            Some(json!({
                "job-id": "j1", "device": "top-fmt",
                "auto-finalize": false, "auto-dismiss": false,
            })),
        )
        .await
        .unwrap();

    let mut seen = Vec::new();
    loop {
        let status = next_status(&client, &mut events, "j1").await;
        seen.push(status);
        if status == JobStatus::Pending {
            break;
        }
        assert!(seen.len() < 10, "no pending: {seen:?}");
    }
    assert_eq!(seen, [JobStatus::Created, JobStatus::Running, JobStatus::Waiting, JobStatus::Pending]);
    let pending = client.wait_event(&mut events, |e| e.event == "BLOCK_JOB_PENDING", EVENT_WAIT).await.unwrap();
    assert_eq!(
        pending.known(),
        KnownEvent::BlockJobPending(BlockJobPending { type_: JobType::Stream, id: "j1".into() })
    );

    let jobs = client.query_block_jobs().await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].device, "j1");
    assert_eq!(jobs[0].type_, JobType::Stream);
    assert_eq!(jobs[0].status, JobStatus::Pending);
    assert!(!jobs[0].auto_finalize);
    assert!(!jobs[0].auto_dismiss);
    assert_eq!(jobs[0].offset, jobs[0].len);
    let jobs = client.query_jobs().await.unwrap();
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0].id, "j1");
    assert_eq!(jobs[0].status, JobStatus::Pending);

    client.execute("job-finalize", Some(json!({"id": "j1"}))).await.unwrap();
    let completed = client.wait_event(&mut events, |e| e.event == "BLOCK_JOB_COMPLETED", EVENT_WAIT).await.unwrap();
    match completed.known() {
        KnownEvent::BlockJobCompleted(p) => {
            assert_eq!(p.device, "j1");
            assert_eq!(p.type_, JobType::Stream);
            assert_eq!(p.offset, p.len);
            assert_eq!(p.error, None);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(next_status(&client, &mut events, "j1").await, JobStatus::Concluded);
    client.execute("job-dismiss", Some(json!({"id": "j1"}))).await.unwrap();
    assert_eq!(next_status(&client, &mut events, "j1").await, JobStatus::Null);
    assert!(client.query_jobs().await.unwrap().is_empty());

    // The stream pulled base into top: top no longer has a backing file.
    let nodes = client.query_named_block_nodes().await.unwrap();
    let top_node = nodes.iter().find(|n| n.node_name == "top-fmt").unwrap();
    assert_eq!(top_node.backing_file, None);
}

#[tokio::test]
async fn killed_qemu_gives_disconnected_and_ends_events() {
    let mut qemu = Qemu::spawn();
    let client = qemu.connect().await;
    let mut events = client.subscribe_events();
    qemu.kill();

    let result = tokio::time::timeout(Duration::from_secs(30), client.execute("query-status", None))
        .await
        .expect("execute hung after QEMU died");
    assert!(matches!(result, Err(QmpError::Disconnected)), "{result:?}");
    let end = tokio::time::timeout(Duration::from_secs(30), events.recv()).await.expect("event stream did not end");
    assert_eq!(end, Err(broadcast::error::RecvError::Closed));
    assert!(!client.is_connected());
    // Later commands and subscriptions fail immediately.
    assert!(matches!(client.query_status().await, Err(QmpError::Disconnected)));
    assert_eq!(client.subscribe_events().recv().await, Err(broadcast::error::RecvError::Closed));
}

#[tokio::test]
async fn request_in_flight_when_qemu_dies_gives_disconnected() {
    let mut qemu = Qemu::spawn();
    let client = qemu.connect().await;
    // A frozen QEMU cannot answer, so the request is certainly still pending
    // when the socket closes.
    qemu.freeze();
    let in_flight = {
        let client = client.clone();
        tokio::spawn(async move { client.query_status().await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!in_flight.is_finished());
    qemu.kill();
    let result = tokio::time::timeout(Duration::from_secs(30), in_flight)
        .await
        .expect("pending request hung after QEMU died")
        .unwrap();
    assert!(matches!(result, Err(QmpError::Disconnected)), "{result:?}");
}

#[tokio::test]
async fn quit_emits_shutdown_then_closes() {
    let mut qemu = Qemu::spawn();
    let client = qemu.connect().await;
    let mut events = client.subscribe_events();
    client.execute("quit", None).await.unwrap();
    let shutdown = client.wait_event(&mut events, |e| e.event == "SHUTDOWN", EVENT_WAIT).await.unwrap();
    assert_eq!(shutdown.known(), KnownEvent::Shutdown(Shutdown { guest: false, reason: ShutdownCause::HostQmpQuit }));
    assert!(shutdown.timestamp.0 > 0);
    let rest = client.wait_event(&mut events, |_| false, EVENT_WAIT).await;
    assert!(matches!(rest, Err(QmpError::Disconnected)), "{rest:?}");
}

#[tokio::test]
async fn send_fd_then_closefd() {
    let mut qemu = Qemu::spawn();
    let client = qemu.connect().await;
    let devnull = File::open("/dev/null").unwrap();
    client.send_fd("fd-test", devnull.as_fd()).await.unwrap();
    // closefd only succeeds if QEMU holds a descriptor under that name,
    // i.e. the SCM_RIGHTS payload arrived with the getfd command.
    client.execute("closefd", Some(json!({"fdname": "fd-test"}))).await.unwrap();
    match client.execute("closefd", Some(json!({"fdname": "fd-test"}))).await {
        Err(QmpError::Command { class, .. }) => assert_eq!(class, "GenericError"),
        other => panic!("expected a Command error, got {other:?}"),
    }
    match client.execute("closefd", Some(json!({"fdname": "never-sent"}))).await {
        Err(QmpError::Command { command, .. }) => assert_eq!(command, "closefd"),
        other => panic!("expected a Command error, got {other:?}"),
    }
    // Our own descriptor stays open and usable: QEMU got a duplicate.
    assert!(devnull.metadata().is_ok());
}

#[tokio::test]
async fn getfd_without_descriptor_fails() {
    let mut qemu = Qemu::spawn();
    let client = qemu.connect().await;
    match client.execute("getfd", Some(json!({"fdname": "nothing"}))).await {
        Err(QmpError::Command { class, .. }) => assert_eq!(class, "GenericError"),
        other => panic!("expected a Command error, got {other:?}"),
    }
}

#[tokio::test]
async fn hmp_errors_come_back_as_text() {
    let mut qemu = Qemu::spawn();
    let client = qemu.connect().await;
    let version = client.human_monitor_command("info version").await.unwrap();
    assert!(version.starts_with("7.2"), "{version:?}");
    let unknown = client.human_monitor_command("no-such-hmp-command").await.unwrap();
    assert!(unknown.contains("unknown command"), "{unknown:?}");
}
