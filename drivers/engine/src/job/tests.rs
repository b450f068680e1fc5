//! The block-job engine's decisions on plain data and a temp store, and
//! its runs through a job server that exists only here; no hypervisor and
//! no `qemu-*` tool is run (image headers are written here).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use strata_core::chain::{Chain, StorageSource};
use strata_core::driver::{BlockJobEnd, BlockJobKind, BlockJobState};
use strata_core::options::{BlockCommitOptions, BlockCopyOptions, BlockPullOptions};
use strata_core::store::Store;
use strata_core::xml::{Domain, Element};
use strata_core::ErrorKind;

use super::conclude::{persistent_takes_chain, record_in_live, record_in_store};
use super::engine::{BlockJobEngine, BlockJobHost, Served};
use super::layers::{backing_string, commit_layers, pull_layers, resolve_layer, CommitLayers, PullLayers};
use super::reconcile::{end_of, next_step, Step};
use super::record::{ended, job_of_id, last_outcome, record_server_exit, set_outcome, JobOutcome, JobRecord};
use super::refusals::ensure_idle;
use super::{run, BlockJobBackend, CopyTarget, JobPhase, JobTable, ObservedJob};
use crate::process::ProcessId;

/// A linear chain of qcow2 files, the active layer first.
fn chain(paths: &[&str]) -> Chain {
    let file = |p: &str| StorageSource::File { path: PathBuf::from(p) };
    let mut chain = Chain::single(file(paths[0]), Some("qcow2".into()));
    let mut parent = 0;
    for p in &paths[1..] {
        parent = chain.push_backing(parent, file(p), Some("qcow2".into()));
    }
    chain.end_at(parent);
    chain.renumber();
    chain
}

const VDA: [&str; 4] = ["/imgs/top.qcow2", "/imgs/mid.qcow2", "/imgs/low.qcow2", "/imgs/base.qcow2"];

fn message(e: strata_core::Error) -> String {
    e.message().to_string()
}

#[test]
fn a_layer_is_found_by_index_or_by_path_relative_to_the_top() {
    let c = chain(&VDA);
    assert_eq!(resolve_layer("vda", &c, "vda[2]").expect("vda[2]"), 2);
    assert_eq!(resolve_layer("vda", &c, "/imgs/mid.qcow2").expect("absolute path"), 1);
    assert_eq!(resolve_layer("vda", &c, "low.qcow2").expect("relative path"), 2);
    assert_eq!(resolve_layer("vda", &c, "./base.qcow2").expect("path with ."), 3);
}

#[test]
fn a_filesystem_layer_is_found_by_its_target_dir_and_index() {
    let c = chain(&VDA);
    assert_eq!(resolve_layer("/", &c, "/[1]").expect("/[1]"), 1);
    assert_eq!(resolve_layer("/data", &c, "/data[3]").expect("/data[3]"), 3);
    assert_eq!(resolve_layer("/", &c, "/imgs/low.qcow2").expect("absolute path"), 2);
    assert_eq!(
        message(resolve_layer("/", &c, "/data[1]").expect_err("other filesystem")),
        "requested target '/data' does not match target '/'"
    );
}

#[test]
fn a_layer_that_is_not_in_the_chain_is_refused_naming_it() {
    let c = chain(&VDA);
    assert_eq!(
        message(resolve_layer("vda", &c, "vdb[1]").expect_err("other disk")),
        "requested target 'vdb' does not match target 'vda'"
    );
    assert_eq!(
        message(resolve_layer("vda", &c, "vda[7]").expect_err("no such index")),
        "could not find backing store index '7' in chain for 'vda' (it has layers 0 to 3)"
    );
    assert_eq!(
        message(resolve_layer("vda", &c, "vda[x]").expect_err("not a number")),
        "'vda[x]' is not DISK[N] with a number N"
    );
    let err = resolve_layer("vda", &c, "/elsewhere/base.qcow2").expect_err("not in chain");
    assert_eq!(err.kind(), ErrorKind::InvalidArg);
    assert_eq!(message(err), "could not find image '/elsewhere/base.qcow2' in chain for 'vda'");
}

#[test]
fn a_pull_base_must_be_below_the_layer_pulled_into() {
    let c = chain(&VDA);
    let opts = |top: Option<&str>, base: Option<&str>| BlockPullOptions {
        top: top.map(str::to_string),
        base: base.map(str::to_string),
        ..Default::default()
    };
    let whole = pull_layers("vda", &c, &opts(None, None)).expect("pull everything");
    assert_eq!((whole.into, whole.base), (0, None));
    let part = pull_layers("vda", &c, &opts(Some("vda[1]"), Some("vda[3]"))).expect("pull into mid");
    assert_eq!((part.into, part.base), (1, Some(3)));
    for (top, base) in [(Some("vda[2]"), "vda[1]"), (None, "vda[0]")] {
        let err = pull_layers("vda", &c, &opts(top, Some(base))).expect_err("base not below");
        assert_eq!(message(err), "could not find base image in chain for 'vda'");
    }
}

#[test]
fn a_commit_base_above_its_top_is_refused() {
    let c = chain(&VDA);
    let opts = BlockCommitOptions { top: Some("vda[2]".into()), base: Some("vda[1]".into()), ..Default::default() };
    assert_eq!(
        message(commit_layers("vda", &c, &opts).expect_err("base above top")),
        "base 'vda[1]' is not below top 'vda[2]' in the chain of 'vda'"
    );
}

#[test]
fn a_commit_takes_its_layers_from_the_options() {
    let c = chain(&VDA);
    // No base: down to the bottom of the chain.
    let opts = BlockCommitOptions { top: Some("vda[1]".into()), ..Default::default() };
    let l = commit_layers("vda", &c, &opts).expect("commit mid");
    assert_eq!((l.top, l.base, l.removed.clone(), l.kind), (1, 3, vec![1, 2], BlockJobKind::Commit));
    assert_eq!(l.removed_files(&c), [PathBuf::from("/imgs/mid.qcow2"), PathBuf::from("/imgs/low.qcow2")]);
    // Shallow: into the image just below the top.
    let opts = BlockCommitOptions { top: Some("vda[1]".into()), shallow: true, ..Default::default() };
    assert_eq!(commit_layers("vda", &c, &opts).expect("shallow").base, 2);
    // The active layer needs --active and makes an active commit.
    let opts = BlockCommitOptions::default();
    assert_eq!(
        message(commit_layers("vda", &c, &opts).expect_err("no --active")),
        "commit of 'vda' active layer requires active flag"
    );
    let opts = BlockCommitOptions { active: true, ..Default::default() };
    assert_eq!(commit_layers("vda", &c, &opts).expect("active").kind, BlockJobKind::ActiveCommit);
    // A single image has nothing to commit into.
    let opts = BlockCommitOptions { active: true, ..Default::default() };
    assert_eq!(
        message(commit_layers("vda", &chain(&VDA[3..]), &opts).expect_err("one layer")),
        "could not find base image in chain for 'vda'"
    );
}

/// A qcow2 version 2 header (no extensions) whose backing file name is
/// `backing`, as `qemu-img create -b` writes it.
fn write_qcow2_with_backing(path: &Path, backing: &str) {
    const HEADER_LEN: u64 = 72;
    let mut h = vec![0u8; HEADER_LEN as usize];
    h[0..4].copy_from_slice(b"QFI\xfb");
    h[4..8].copy_from_slice(&2u32.to_be_bytes());
    h[8..16].copy_from_slice(&HEADER_LEN.to_be_bytes());
    h[16..20].copy_from_slice(&u32::try_from(backing.len()).expect("short name").to_be_bytes());
    h[20..24].copy_from_slice(&16u32.to_be_bytes());
    h[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
    h.extend_from_slice(backing.as_bytes());
    h.resize(1 << 16, 0);
    std::fs::write(path, h).expect("write the header");
}

#[test]
fn keep_relative_writes_the_backing_name_the_image_above_recorded() {
    let dir = tempfile::tempdir().expect("temp dir");
    let top = dir.path().join("top.qcow2");
    let mid = dir.path().join("mid.qcow2");
    let base = dir.path().join("base.qcow2");
    write_qcow2_with_backing(&top, "mid.qcow2");
    write_qcow2_with_backing(&mid, "base.qcow2");
    let paths = [&top, &mid, &base].map(|p| p.to_str().expect("utf-8 temp path").to_string());
    let c = chain(&paths.each_ref().map(String::as_str));
    assert_eq!(backing_string(&c, 2, true).expect("keep relative"), Some("base.qcow2".to_string()));
    assert_eq!(backing_string(&c, 2, false).expect("absolute"), Some(paths[2].clone()));
    assert_eq!(backing_string(&c, 9, true).expect("no such layer"), None);
}

fn record(kind: BlockJobKind, starter: Option<ProcessId>, starting: bool) -> JobRecord {
    JobRecord {
        id: "strata-copy-vda-4".into(),
        kind,
        disk: "vda".into(),
        delete: Vec::new(),
        ready: false,
        pivoting: false,
        starting,
        starter,
    }
}

fn this_process() -> ProcessId {
    ProcessId::this().expect("this process")
}

/// This process's pid with another start time: a starter that is gone.
fn gone_process() -> ProcessId {
    let me = this_process();
    ProcessId { pid: me.pid, start_time: me.start_time + 1 }
}

fn job(phase: JobPhase, error: Option<&str>) -> ObservedJob {
    ObservedJob { phase, error: error.map(str::to_string), done: 5, total: 10 }
}

#[test]
fn a_job_not_yet_sent_by_a_live_starter_is_waited_for() {
    let rec = record(BlockJobKind::Pull, Some(this_process()), true);
    assert_eq!(next_step(&rec, None), Step::Leave);
}

#[test]
fn a_job_whose_starter_died_before_sending_it_is_concluded_as_vanished() {
    for starter in [Some(gone_process()), None] {
        let rec = record(BlockJobKind::Pull, starter, true);
        assert_eq!(next_step(&rec, None), Step::Conclude);
    }
    // Started and then gone from the hypervisor: vanished too.
    let rec = record(BlockJobKind::Pull, Some(this_process()), false);
    assert_eq!(next_step(&rec, None), Step::Conclude);
    assert_eq!(end_of(None, false, BlockJobKind::Pull), BlockJobEnd::Failed("the job disappeared from QEMU".into()));
}

#[test]
fn a_concluded_job_is_recorded_with_its_error() {
    let rec = record(BlockJobKind::Commit, Some(this_process()), false);
    let failed = job(JobPhase::Concluded, Some("No space left on device"));
    assert_eq!(next_step(&rec, Some(&failed)), Step::Conclude);
    assert_eq!(
        end_of(Some(&failed), false, BlockJobKind::Commit),
        BlockJobEnd::Failed("No space left on device".into())
    );
    let cancelled = job(JobPhase::Concluded, Some("Operation canceled"));
    assert_eq!(end_of(Some(&cancelled), false, BlockJobKind::Commit), BlockJobEnd::Cancelled);
    let done = job(JobPhase::Concluded, None);
    assert_eq!(end_of(Some(&done), false, BlockJobKind::Commit), BlockJobEnd::Completed);
    // A copy ended without a pivot finished; with one it completed.
    assert_eq!(end_of(Some(&done), false, BlockJobKind::Copy), BlockJobEnd::Finished);
    assert_eq!(end_of(Some(&done), true, BlockJobKind::Copy), BlockJobEnd::Completed);
}

#[test]
fn a_pending_job_is_finalized_and_a_ready_one_marked_once() {
    let mut rec = record(BlockJobKind::Copy, Some(this_process()), false);
    assert_eq!(next_step(&rec, Some(&job(JobPhase::Pending, None))), Step::Finalize);
    assert_eq!(next_step(&rec, Some(&job(JobPhase::Ready, None))), Step::MarkReady);
    assert_eq!(next_step(&rec, Some(&job(JobPhase::Running, None))), Step::Leave);
    rec.ready = true;
    assert_eq!(next_step(&rec, Some(&job(JobPhase::Ready, None))), Step::Leave);
}

const DOMAIN: &str = "<domain type='kvm'><name>vm</name><devices>\
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
    <source file='/imgs/top.qcow2'/><target dev='vda' bus='virtio'/></disk>\
    </devices></domain>";

fn store_with_domain(dir: &Path, xml: &str) -> Store {
    let store = Store::open(dir).expect("store");
    store.write_domain("vm", xml).expect("define");
    store
}

fn vda_source(dom: &Domain) -> Option<StorageSource> {
    dom.find_disk("vda").expect("vda").source().cloned()
}

#[test]
fn the_new_chain_reaches_a_persistent_disk_still_on_the_image_the_job_ran_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_with_domain(dir.path(), DOMAIN);
    let before = vda_source(&Domain::parse(DOMAIN).expect("parse"));
    let merged = chain(&["/imgs/top.qcow2", "/imgs/base.qcow2"]);
    let rec = record(BlockJobKind::Commit, None, false);
    record_in_store(&store, "vm", &rec, &BlockJobEnd::Completed, before.as_ref(), &merged).expect("record");
    let persistent = Domain::parse(&store.read_domain("vm").expect("read").expect("defined")).expect("parse");
    assert_eq!(persistent.find_disk("vda").expect("vda").chain, Some(merged));
    assert_eq!(
        last_outcome(&store, "vm", "vda").expect("outcome"),
        Some(JobOutcome { disk: "vda".into(), kind: BlockJobKind::Commit, end: BlockJobEnd::Completed })
    );
}

/// A domain whose root `/` is a qcow2 image filesystem, beside disk vda.
const CONTAINER: &str = "<domain type='kvm'><name>vm</name><devices>\
    <filesystem type='file'><driver type='loop' format='qcow2'/>\
    <source file='/imgs/root.qcow2'/><target dir='/'/></filesystem>\
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/>\
    <source file='/imgs/top.qcow2'/><target dev='vda' bus='virtio'/></disk>\
    </devices></domain>";

#[test]
fn the_new_chain_of_a_filesystem_job_reaches_the_filesystem_named_by_its_target_dir() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_with_domain(dir.path(), CONTAINER);
    let root = Domain::parse(CONTAINER).expect("parse").find_storage_device("/").expect("/");
    let merged = chain(&["/imgs/root.qcow2", "/imgs/root-base.qcow2"]);
    let rec = JobRecord { disk: "/".into(), ..record(BlockJobKind::Commit, None, false) };
    record_in_store(&store, "vm", &rec, &BlockJobEnd::Completed, root.source(), &merged).expect("record");
    let persistent = Domain::parse(&store.read_domain("vm").expect("read").expect("defined")).expect("parse");
    assert_eq!(persistent.find_storage_device("/").expect("/").chain(), Some(&merged));
    let vda = |dom: &Domain| dom.find_disk("vda").expect("vda").chain;
    assert_eq!(vda(&persistent), vda(&Domain::parse(CONTAINER).expect("parse")), "the disk is left as it was");
}

#[test]
fn a_persistent_disk_redefined_meanwhile_keeps_its_new_image() {
    let dir = tempfile::tempdir().expect("temp dir");
    let redefined = DOMAIN.replace("/imgs/top.qcow2", "/imgs/other.qcow2");
    let store = store_with_domain(dir.path(), &redefined);
    let before = vda_source(&Domain::parse(DOMAIN).expect("parse"));
    assert!(!persistent_takes_chain(&Domain::parse(&redefined).expect("parse"), "vda", before.as_ref()));
    let rec = record(BlockJobKind::Commit, None, false);
    let merged = chain(&["/imgs/top.qcow2", "/imgs/base.qcow2"]);
    record_in_store(&store, "vm", &rec, &BlockJobEnd::Completed, before.as_ref(), &merged).expect("record");
    let xml = store.read_domain("vm").expect("read").expect("defined");
    assert_eq!(xml, redefined, "the redefined disk's definition is left as it was");
}

#[test]
fn the_live_definition_drops_a_copy_mirror_and_its_record() {
    let mut live = Domain::parse(DOMAIN).expect("parse");
    live.set_storage_mirror("vda", Some(Element::new("mirror").with_attr("job", "copy"))).expect("mirror");
    let rec = record(BlockJobKind::Copy, None, false);
    let other = JobRecord { id: "strata-pull-vdb-5".into(), disk: "vdb".into(), ..rec.clone() };
    let mut jobs = vec![rec.clone(), other.clone()];
    let copied = chain(&["/imgs/copy.qcow2"]);
    record_in_live(&mut live, &mut jobs, &rec, &copied).expect("record");
    assert_eq!(jobs, [other]);
    assert!(!live.to_xml().contains("<mirror"), "{}", live.to_xml());
    assert_eq!(live.find_disk("vda").expect("vda").chain, Some(copied));
}

#[test]
fn a_record_survives_its_xml_and_its_id_names_kind_and_disk() {
    let mut rec = JobRecord::new(BlockJobKind::ActiveCommit, "vdb", vec![PathBuf::from("/imgs/mid.qcow2")]);
    rec.give_id(7).expect("id");
    assert_eq!(rec.id, "strata-active-commit-vdb-7");
    assert_eq!(rec.starter, Some(this_process()));
    assert_eq!(job_of_id(&rec.id), Some((BlockJobKind::ActiveCommit, "vdb".to_string())));
    assert_eq!(job_of_id("strata-pull-my-disk-3"), Some((BlockJobKind::Pull, "my-disk".to_string())));
    let mut fs = JobRecord::new(BlockJobKind::Pull, "/srv/data", Vec::new());
    fs.give_id(2).expect("id");
    assert_eq!(fs.id, "strata-pull-fs.srv.data-2", "a filesystem's job id holds no '/'");
    assert_eq!(job_of_id(&fs.id), Some((BlockJobKind::Pull, "/srv/data".to_string())));
    assert_eq!(job_of_id("blockdev-create-1"), None);
    rec.ready = true;
    let parsed = JobRecord::from_element(&Element::parse(&rec.to_element().to_xml()).expect("xml")).expect("parse");
    assert_eq!(parsed, rec);
    assert!(!parsed.start_abandoned(), "its starter, this process, lives");
    let err = JobRecord::from_element(&Element::new("job").with_attr("id", "x")).expect_err("no kind");
    assert_eq!(message(err), "job record lacks 'kind'");
}

#[test]
fn outcomes_round_trip_through_the_store_one_per_disk() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_with_domain(dir.path(), DOMAIN);
    assert_eq!(
        message(ended(&store, "vm", "vda").expect_err("no outcome yet")),
        "disk vda does not have an active block job"
    );
    let failed = BlockJobEnd::Failed("Input/output error".into());
    set_outcome(
        &store,
        "vm",
        "vda",
        Some(JobOutcome { disk: "vda".into(), kind: BlockJobKind::Copy, end: failed.clone() }),
    )
    .expect("set vda");
    set_outcome(
        &store,
        "vm",
        "vdb",
        Some(JobOutcome { disk: "vdb".into(), kind: BlockJobKind::Pull, end: BlockJobEnd::Cancelled }),
    )
    .expect("set vdb");
    match ended(&store, "vm", "vda").expect("ended") {
        BlockJobState::Ended { kind, end } => assert_eq!((kind, end), (BlockJobKind::Copy, failed)),
        other => panic!("expected an end, got {other:?}"),
    }
    set_outcome(&store, "vm", "vda", None).expect("clear vda");
    assert_eq!(last_outcome(&store, "vm", "vda").expect("read"), None);
    assert_eq!(last_outcome(&store, "vm", "vdb").expect("read").map(|o| o.end), Some(BlockJobEnd::Cancelled));
    record_server_exit(&store, "vm", &[record(BlockJobKind::Pull, None, false)], "QEMU", 4242).expect("exit");
    assert_eq!(
        last_outcome(&store, "vm", "vda").expect("read").map(|o| o.end),
        Some(BlockJobEnd::Failed("domain 'vm' (QEMU pid 4242) exited while block job on 'vda' was running".into()))
    );
}

#[test]
fn a_second_job_on_a_disk_is_refused() {
    let jobs = [record(BlockJobKind::Pull, None, false)];
    let err = ensure_idle(&jobs, "vda").expect_err("busy");
    assert_eq!(err.kind(), ErrorKind::BlockCopyActive);
    assert_eq!(message(err), "disk 'vda' already in active block job");
    ensure_idle(&jobs, "vdb").expect("another disk is idle");
}

/// State a test's job server and its host share.
type Shared<T> = Arc<Mutex<T>>;

/// A job server that exists only here: it answers with the jobs a test
/// gives it, keeps the records in memory and logs what it is asked to do.
/// Its clones are handles of one server.
#[derive(Clone)]
struct FakeServer {
    store: Store,
    /// `None`: nothing serves the domain.
    records: Shared<Option<Vec<JobRecord>>>,
    live: Shared<Domain>,
    observed: Shared<Vec<(String, ObservedJob)>>,
    /// The chain the disk has open (once a job has ended, the new one).
    open: Chain,
    calls: Shared<Vec<String>>,
    /// Started for an offline job: it quits once it has none.
    offline: Shared<bool>,
    /// Why the hypervisor refuses to start a job, if it does.
    refusal: Option<&'static str>,
    /// Its process has exited: it answers nothing.
    gone: Shared<bool>,
}

impl FakeServer {
    fn new(store: Store, records: Vec<JobRecord>, observed: Vec<(String, ObservedJob)>, open: Chain) -> FakeServer {
        FakeServer {
            store,
            records: Arc::new(Mutex::new(Some(records))),
            live: Arc::new(Mutex::new(Domain::parse(DOMAIN).expect("parse"))),
            observed: Arc::new(Mutex::new(observed)),
            open,
            calls: Default::default(),
            offline: Default::default(),
            refusal: None,
            gone: Default::default(),
        }
    }

    /// A job started under `id`, as the hypervisor reports it at first.
    fn started(&self, id: &str, what: String) -> strata_core::Result<()> {
        self.log(what);
        if let Some(refusal) = self.refusal {
            return Err(strata_core::Error::operation_failed(refusal));
        }
        self.observed.lock().expect("observed").push((id.to_string(), job(JobPhase::Running, None)));
        Ok(())
    }

    fn log(&self, call: String) {
        self.calls.lock().expect("calls").push(call);
    }

    fn calls(&self) -> Vec<String> {
        self.calls.lock().expect("calls").clone()
    }

    fn records(&self) -> Vec<JobRecord> {
        self.records.lock().expect("records").clone().unwrap_or_default()
    }

    /// Job `id` concludes, with `error` if any.
    fn end(&self, id: &str, error: Option<&str>) {
        for (job, seen) in self.observed.lock().expect("observed").iter_mut() {
            if job == id {
                *seen = ObservedJob { phase: JobPhase::Concluded, error: error.map(str::to_string), ..seen.clone() };
            }
        }
    }
}

#[async_trait::async_trait]
impl BlockJobBackend for FakeServer {
    type OpenDisk = Chain;
    /// Nothing announces changes: a wait looks again when its time is up.
    type Changes = ();
    type CopyTarget = CopyTarget;

    fn store(&self) -> &Store {
        &self.store
    }

    fn domain(&self) -> &str {
        "vm"
    }

    async fn observe(&self) -> strata_core::Result<Vec<(String, ObservedJob)>> {
        if *self.gone.lock().expect("gone") {
            return Err(strata_core::Error::operation_failed("the monitor closed"));
        }
        Ok(self.observed.lock().expect("observed").clone())
    }

    fn subscribe(&self) {}

    async fn changed(&self, _changes: &mut (), id: &str, _limit: std::time::Duration) -> bool {
        self.log(format!("wait for {id}"));
        false
    }

    async fn speed(&self, _id: &str) -> strata_core::Result<u64> {
        Ok(1 << 20)
    }

    async fn set_speed(&self, id: &str, bytes_per_sec: u64) -> strata_core::Result<()> {
        self.log(format!("set speed {id} {bytes_per_sec}"));
        Ok(())
    }

    async fn complete(&self, id: &str) -> strata_core::Result<()> {
        self.log(format!("complete {id}"));
        self.end(id, None);
        Ok(())
    }

    async fn cancel(&self, id: &str, ready: bool) -> strata_core::Result<()> {
        self.log(format!("cancel {id} ready={ready}"));
        self.end(id, (!ready).then_some("Operation canceled"));
        Ok(())
    }

    async fn settle(&self, id: &str) -> strata_core::Result<()> {
        self.log(format!("settle {id}"));
        Ok(())
    }

    async fn finalize(&self, id: &str) -> strata_core::Result<()> {
        self.log(format!("finalize {id}"));
        self.end(id, None);
        Ok(())
    }

    async fn dismiss_then_open(&self, dismiss: Option<&str>, disk: &str) -> strata_core::Result<Chain> {
        if let Some(id) = dismiss {
            self.log(format!("dismiss {id}"));
            self.observed.lock().expect("observed").retain(|(job, _)| job != id);
        }
        self.open_disk(disk).await
    }

    async fn open_disk(&self, disk: &str) -> strata_core::Result<Chain> {
        self.log(format!("open {disk}"));
        Ok(self.open.clone())
    }

    fn chain(disk: &Chain) -> &Chain {
        disk
    }

    async fn tidy_after(&self, rec: &JobRecord, end: &BlockJobEnd, _open: &Chain) -> strata_core::Result<()> {
        self.log(format!("tidy {} {end:?}", rec.disk));
        Ok(())
    }

    async fn start_pull(
        &self,
        id: &str,
        _disk: &Chain,
        layers: &PullLayers,
        backing: Option<String>,
        bandwidth: Option<u64>,
    ) -> strata_core::Result<()> {
        self.started(
            id,
            format!("pull {id} into {} base {:?} backing {backing:?} speed {bandwidth:?}", layers.into, layers.base),
        )
    }

    async fn start_commit(
        &self,
        id: &str,
        _disk: &Chain,
        layers: &CommitLayers,
        backing: Option<String>,
        bandwidth: Option<u64>,
    ) -> strata_core::Result<()> {
        self.started(
            id,
            format!("commit {id} top {} base {} backing {backing:?} speed {bandwidth:?}", layers.top, layers.base),
        )
    }

    async fn open_copy_target(
        &self,
        disk_name: &str,
        _disk: &Chain,
        target: &CopyTarget,
    ) -> strata_core::Result<CopyTarget> {
        self.log(format!("open copy target of {disk_name} at {} as {}", target.path.display(), target.format));
        Ok(target.clone())
    }

    async fn start_copy(
        &self,
        id: &str,
        _disk: &Chain,
        target: &CopyTarget,
        _opts: &BlockCopyOptions,
    ) -> strata_core::Result<()> {
        self.started(id, format!("copy {id} into {}", target.path.display()))
    }

    async fn close_copy_target(&self, target: CopyTarget) {
        self.log(format!("close copy target {}", target.path.display()));
    }

    async fn quit_if_idle(&self) -> strata_core::Result<()> {
        self.log("quit if idle".into());
        let mut records = self.records.lock().expect("records");
        if *self.offline.lock().expect("offline") && records.as_ref().is_some_and(Vec::is_empty) {
            *records = None;
        }
        Ok(())
    }

    async fn lock(&self) -> strata_core::Result<strata_core::store::DomainLock> {
        crate::blocking::lock_domain(&self.store, "vm").await
    }

    fn recorded_jobs(&self) -> strata_core::Result<Option<Vec<JobRecord>>> {
        Ok(self.records.lock().expect("records").clone())
    }

    fn edit_records<T>(
        &self,
        ended: Option<(&str, &Chain)>,
        change: impl FnOnce(JobTable<'_>) -> strata_core::Result<T>,
    ) -> strata_core::Result<Option<T>> {
        let mut records = self.records.lock().expect("records");
        let Some(jobs) = records.as_mut() else { return Ok(None) };
        if let Some((disk, _)) = ended {
            self.log(format!("record the end on {disk}"));
        }
        let mut live = self.live.lock().expect("live");
        let mut next_number = 1;
        change(JobTable { jobs, live: &mut *live, next_number: &mut next_number }).map(Some)
    }
}

const JOB: &str = "strata-copy-vda-4";

fn persistent_chain(store: &Store) -> Option<Chain> {
    let xml = store.read_domain("vm").expect("read").expect("defined");
    Domain::parse(&xml).expect("parse").find_disk("vda").expect("vda").chain
}

#[tokio::test]
async fn a_pending_job_is_finalized_dismissed_and_its_end_recorded_everywhere() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_with_domain(dir.path(), DOMAIN);
    let merged = chain(&["/imgs/top.qcow2", "/imgs/base.qcow2"]);
    let rec = record(BlockJobKind::Commit, Some(this_process()), false);
    let server = FakeServer::new(
        store.clone(),
        vec![rec.clone()],
        vec![(JOB.into(), job(JobPhase::Pending, None))],
        merged.clone(),
    );
    assert!(run::reconcile_jobs(&server, &[rec]).await.expect("reconcile"), "the record changed");
    assert_eq!(
        server.calls(),
        [
            format!("finalize {JOB}"),
            format!("dismiss {JOB}"),
            "open vda".into(),
            "record the end on vda".into(),
            "tidy vda Completed".into(),
            "quit if idle".into()
        ]
    );
    assert!(server.records().is_empty(), "the record is gone");
    assert_eq!(server.live.lock().expect("live").find_disk("vda").expect("vda").chain, Some(merged.clone()));
    assert_eq!(persistent_chain(&store), Some(merged));
    assert_eq!(last_outcome(&store, "vm", "vda").expect("outcome").map(|o| o.end), Some(BlockJobEnd::Completed));
}

#[tokio::test]
async fn a_job_that_failed_has_its_error_kept_and_its_files_kept() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_with_domain(dir.path(), DOMAIN);
    let doomed = dir.path().join("mid.qcow2");
    std::fs::write(&doomed, b"layer").expect("write a layer");
    let rec = JobRecord { delete: vec![doomed.clone()], ..record(BlockJobKind::Commit, None, false) };
    let failed = job(JobPhase::Concluded, Some("No space left on device"));
    let server = FakeServer::new(store.clone(), vec![rec.clone()], vec![(JOB.into(), failed)], chain(&VDA));
    assert!(run::reconcile_jobs(&server, &[rec]).await.expect("reconcile"));
    assert!(!server.calls().iter().any(|c| c.starts_with("finalize")), "{:?}", server.calls());
    assert_eq!(
        last_outcome(&store, "vm", "vda").expect("outcome").map(|o| o.end),
        Some(BlockJobEnd::Failed("No space left on device".into()))
    );
    assert!(doomed.exists(), "--delete removes files only after a completed commit");
}

#[tokio::test]
async fn a_completed_commit_deletes_what_delete_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_with_domain(dir.path(), DOMAIN);
    let doomed = dir.path().join("mid.qcow2");
    std::fs::write(&doomed, b"layer").expect("write a layer");
    assert!(doomed.exists(), "the layer was written");
    let rec = JobRecord { delete: vec![doomed.clone()], ..record(BlockJobKind::Commit, None, false) };
    let server =
        FakeServer::new(store, vec![rec.clone()], vec![(JOB.into(), job(JobPhase::Concluded, None))], chain(&VDA));
    run::conclude(&server, &rec).await.expect("conclude");
    assert!(!doomed.exists(), "the committed layer is deleted");
}

#[tokio::test]
async fn a_job_its_live_starter_has_not_sent_yet_is_left_alone() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_with_domain(dir.path(), DOMAIN);
    let rec = record(BlockJobKind::Pull, Some(this_process()), true);
    let server = FakeServer::new(store.clone(), vec![rec.clone()], Vec::new(), chain(&VDA));
    assert!(!run::reconcile_jobs(&server, std::slice::from_ref(&rec)).await.expect("reconcile"));
    // Concluding it anyway (another caller's view) changes nothing either.
    run::conclude(&server, &rec).await.expect("conclude");
    assert_eq!(server.calls(), Vec::<String>::new());
    assert_eq!(server.records(), [rec]);
    assert_eq!(last_outcome(&store, "vm", "vda").expect("read"), None);
}

#[tokio::test]
async fn a_job_whose_starter_died_unsent_ends_as_vanished_without_a_dismiss() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_with_domain(dir.path(), DOMAIN);
    let rec = record(BlockJobKind::Pull, Some(gone_process()), true);
    let server = FakeServer::new(store.clone(), vec![rec.clone()], Vec::new(), chain(&VDA));
    assert!(run::reconcile_jobs(&server, &[rec]).await.expect("reconcile"));
    assert!(!server.calls().iter().any(|c| c.starts_with("dismiss")), "{:?}", server.calls());
    assert!(server.records().is_empty());
    assert_eq!(
        last_outcome(&store, "vm", "vda").expect("outcome").map(|o| o.end),
        Some(BlockJobEnd::Failed("the job disappeared from QEMU".into()))
    );
}

#[tokio::test]
async fn a_ready_copy_is_marked_ready_in_its_record_and_its_mirror() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_with_domain(dir.path(), DOMAIN);
    let rec = record(BlockJobKind::Copy, Some(this_process()), false);
    let server = FakeServer::new(store, vec![rec.clone()], vec![(JOB.into(), job(JobPhase::Ready, None))], chain(&VDA));
    server
        .live
        .lock()
        .expect("live")
        .set_storage_mirror("vda", Some(Element::new("mirror").with_attr("job", "copy")))
        .expect("mirror");
    assert!(run::reconcile_jobs(&server, &[rec]).await.expect("reconcile"));
    assert!(server.records()[0].ready, "the record says ready");
    let live = server.live.lock().expect("live").to_xml();
    assert!(live.contains("ready='yes'") || live.contains("ready=\"yes\""), "{live}");
    assert_eq!(server.calls(), Vec::<String>::new(), "nothing is asked of the hypervisor");
}

#[tokio::test]
async fn a_job_another_process_recorded_first_is_not_recorded_twice() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_with_domain(dir.path(), DOMAIN);
    let rec = record(BlockJobKind::Commit, None, false);
    let server =
        FakeServer::new(store.clone(), Vec::new(), vec![(JOB.into(), job(JobPhase::Concluded, None))], chain(&VDA));
    run::conclude(&server, &rec).await.expect("conclude");
    assert_eq!(server.calls(), Vec::<String>::new());
    assert_eq!(last_outcome(&store, "vm", "vda").expect("read"), None);
}

#[tokio::test]
async fn a_wait_reports_progress_then_the_end_another_process_recorded() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_with_domain(dir.path(), DOMAIN);
    let rec = record(BlockJobKind::Pull, Some(this_process()), false);
    let server = FakeServer::new(
        store.clone(),
        vec![rec.clone()],
        vec![(JOB.into(), job(JobPhase::Running, None))],
        chain(&VDA),
    );
    match run::wait(&server, "vda", std::time::Duration::ZERO).await.expect("wait") {
        BlockJobState::Running(info) => {
            assert_eq!((info.kind, info.cur, info.end, info.bandwidth_bytes), (BlockJobKind::Pull, 5, 10, 1 << 20));
        }
        other => panic!("expected a running job, got {other:?}"),
    }
    // The job ends and another process records it: the wait reports that end.
    *server.records.lock().expect("records") = Some(Vec::new());
    let outcome = JobOutcome { disk: "vda".into(), kind: BlockJobKind::Pull, end: BlockJobEnd::Completed };
    set_outcome(&store, "vm", "vda", Some(outcome)).expect("outcome");
    match run::wait(&server, "vda", std::time::Duration::ZERO).await.expect("wait") {
        BlockJobState::Ended { kind, end } => assert_eq!((kind, end), (BlockJobKind::Pull, BlockJobEnd::Completed)),
        other => panic!("expected the end, got {other:?}"),
    }
}

#[tokio::test]
async fn a_pivot_of_a_job_that_is_not_ready_is_refused_before_anything_is_sent() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_with_domain(dir.path(), DOMAIN);
    let rec = record(BlockJobKind::Copy, Some(this_process()), false);
    let jobs = vec![rec.clone()];
    let server = FakeServer::new(store, jobs.clone(), vec![(JOB.into(), job(JobPhase::Running, None))], chain(&VDA));
    let err = run::abort(&server, &jobs, "vda", true, true).await.expect_err("not ready");
    assert_eq!(err.kind(), ErrorKind::BlockCopyActive);
    assert_eq!(message(err), format!("block job '{JOB}' not ready for pivot yet"));
    assert_eq!(server.calls(), Vec::<String>::new());
    assert_eq!(
        message(run::abort(&server, &jobs, "vdb", false, true).await.expect_err("no job on vdb")),
        "disk vdb does not have an active block job"
    );
}

#[tokio::test]
async fn a_pivot_records_the_copy_as_completed_and_an_abort_of_a_ready_copy_as_finished() {
    for (pivot, end, sent) in [
        (true, BlockJobEnd::Completed, format!("complete {JOB}")),
        (false, BlockJobEnd::Finished, format!("cancel {JOB} ready=true")),
    ] {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = store_with_domain(dir.path(), DOMAIN);
        let rec = JobRecord { ready: true, ..record(BlockJobKind::Copy, Some(this_process()), false) };
        let jobs = vec![rec.clone()];
        let server =
            FakeServer::new(store.clone(), jobs.clone(), vec![(JOB.into(), job(JobPhase::Ready, None))], chain(&VDA));
        assert_eq!(run::abort(&server, &jobs, "vda", pivot, true).await.expect("abort"), end);
        assert_eq!(server.calls()[..2], [sent, format!("settle {JOB}")]);
        assert!(server.records().is_empty(), "the end is recorded");
    }
}

#[tokio::test]
async fn a_started_job_is_recorded_first_and_marked_started_after() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_with_domain(dir.path(), DOMAIN);
    let old = JobOutcome { disk: "vda".into(), kind: BlockJobKind::Pull, end: BlockJobEnd::Cancelled };
    set_outcome(&store, "vm", "vda", Some(old)).expect("an earlier job's outcome");
    let running = vec![("strata-pull-vda-1".to_string(), job(JobPhase::Running, None))];
    let server = FakeServer::new(store.clone(), Vec::new(), running, chain(&VDA));
    let rec = JobRecord::new(BlockJobKind::Pull, "vda", Vec::new());
    run::start_recorded(&server, rec, None, |id| {
        let seen = server.records();
        async move {
            assert_eq!(id, "strata-pull-vda-1");
            assert!(seen.iter().any(|r| r.id == id && r.starting), "recorded as starting before it is sent");
            Ok(())
        }
    })
    .await
    .expect("start");
    let records = server.records();
    assert_eq!(records.len(), 1);
    assert!(!records[0].starting, "marked started once sent");
    assert_eq!(records[0].starter, Some(this_process()));
    // Kept until this job's outcome replaces it: a wait finds the record
    // first, so the earlier outcome is never taken for this job's.
    let kept = last_outcome(&store, "vm", "vda").expect("read").map(|o| o.end);
    assert_eq!(kept, Some(BlockJobEnd::Cancelled), "no outcome write before the job starts");
    assert!(matches!(run::wait(&server, "vda", Duration::ZERO).await.expect("wait"), BlockJobState::Running(_)));
}

#[tokio::test]
async fn a_refused_start_leaves_no_record_no_mirror_and_no_earlier_outcome() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_with_domain(dir.path(), DOMAIN);
    let old = JobOutcome { disk: "vda".into(), kind: BlockJobKind::Pull, end: BlockJobEnd::Completed };
    set_outcome(&store, "vm", "vda", Some(old)).expect("an earlier job's outcome");
    let server = FakeServer::new(store.clone(), Vec::new(), Vec::new(), chain(&VDA));
    let mirror = Element::new("mirror").with_attr("job", "copy");
    let rec = JobRecord::new(BlockJobKind::Copy, "vda", Vec::new());
    let err = run::start_recorded(&server, rec, Some(mirror), |_| async {
        Err(strata_core::Error::operation_failed("the hypervisor refused"))
    })
    .await
    .expect_err("refused");
    assert_eq!(message(err), "the hypervisor refused");
    assert!(server.records().is_empty());
    assert!(!server.live.lock().expect("live").to_xml().contains("<mirror"));
    // A wait now says there is no job, not that the earlier one completed.
    let err = run::wait(&server, "vda", Duration::ZERO).await.expect_err("no job");
    assert_eq!(message(err), "disk vda does not have an active block job");
}

#[tokio::test]
async fn a_start_on_a_busy_disk_is_refused_before_it_is_sent() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_with_domain(dir.path(), DOMAIN);
    let busy = record(BlockJobKind::Pull, Some(this_process()), false);
    let server = FakeServer::new(store, vec![busy.clone()], Vec::new(), chain(&VDA));
    let err = run::check_idle(&server, "vda").expect_err("busy");
    assert_eq!(err.kind(), ErrorKind::BlockCopyActive);
    let rec = JobRecord::new(BlockJobKind::Commit, "vda", Vec::new());
    let err = run::start_recorded(&server, rec, None, |_| async { panic!("a refused job must not be sent") })
        .await
        .expect_err("busy");
    assert_eq!(message(err), "disk 'vda' already in active block job");
    assert_eq!(server.records(), [busy]);
}

/// A driver as the block-job engine sees it, with the test's job server:
/// it serves the domain while the server holds records, and starts the
/// server for an offline job.
struct TestHost {
    server: FakeServer,
}

impl TestHost {
    /// A host of domain `vm` (defined, with disk `vda` on `VDA`) that
    /// nothing serves yet.
    fn unserved(store: Store) -> TestHost {
        let server = FakeServer::new(store, Vec::new(), Vec::new(), chain(&VDA));
        *server.records.lock().expect("records") = None;
        TestHost { server }
    }
}

#[async_trait::async_trait]
impl BlockJobHost for TestHost {
    type Server = FakeServer;

    fn store(&self) -> &Store {
        &self.server.store
    }

    async fn serving(&self, _domain: &str) -> strata_core::Result<Option<Served<FakeServer>>> {
        let Some(jobs) = self.server.records.lock().expect("records").clone() else { return Ok(None) };
        let live = Box::new(self.server.live.lock().expect("live").clone());
        Ok(Some(Served { server: self.server.clone(), jobs, live }))
    }

    async fn start_offline_server(&self, domain: &str) -> strata_core::Result<Served<FakeServer>> {
        self.server.log(format!("start an offline server for {domain}"));
        *self.server.offline.lock().expect("offline") = true;
        *self.server.records.lock().expect("records") = Some(Vec::new());
        let live = self.server.live.lock().expect("live").clone();
        Ok(Served { server: self.server.clone(), jobs: Vec::new(), live: Box::new(live) })
    }

    async fn after_refused_request(&self, _domain: &str, server: &FakeServer) -> strata_core::Result<()> {
        server.quit_if_idle().await
    }

    /// A server that is gone is settled: its jobs ended with it.
    async fn server_gone(&self, domain: &str, server: &FakeServer) -> strata_core::Result<bool> {
        if !*server.gone.lock().expect("gone") {
            return Ok(false);
        }
        let jobs = server.records.lock().expect("records").take().unwrap_or_default();
        record_server_exit(&server.store, domain, &jobs, "test server", 4242)?;
        Ok(true)
    }
}

fn serves(engine: &BlockJobEngine<TestHost>) -> bool {
    engine.host().server.records.lock().expect("records").is_some()
}

#[tokio::test]
async fn a_pull_on_a_domain_nobody_serves_starts_an_offline_server_and_the_job_in_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let engine = BlockJobEngine::new(TestHost::unserved(store_with_domain(dir.path(), DOMAIN)));
    assert!(!serves(&engine), "nothing serves the domain before the pull");
    engine.start_pull("vm", "vda", &BlockPullOptions::default()).await.expect("pull");
    let server = &engine.host().server;
    assert_eq!(
        server.calls(),
        [
            "start an offline server for vm".to_string(),
            "open vda".into(),
            "pull strata-pull-vda-1 into 0 base None backing None speed None".into()
        ]
    );
    let records = server.records();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!((records[0].kind, records[0].disk.as_str(), records[0].starting), (BlockJobKind::Pull, "vda", false));
}

#[tokio::test]
async fn a_refused_start_quits_the_offline_server_started_for_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut host = TestHost::unserved(store_with_domain(dir.path(), DOMAIN));
    host.server.refusal = Some("the hypervisor refused");
    let engine = BlockJobEngine::new(host);
    let opts = BlockCommitOptions { top: Some("vda[1]".into()), base: Some("vda[3]".into()), ..Default::default() };
    let err = engine.start_commit("vm", "vda", &opts).await.expect_err("refused");
    assert_eq!(message(err), "the hypervisor refused");
    assert_eq!(
        engine.host().server.calls(),
        [
            "start an offline server for vm".to_string(),
            "open vda".into(),
            "commit strata-commit-vda-1 top 1 base 3 backing Some(\"/imgs/base.qcow2\") speed None".into(),
            "quit if idle".into()
        ]
    );
    assert!(!serves(&engine), "the offline server quit");
}

#[tokio::test]
async fn a_refused_copy_closes_its_target_and_leaves_the_running_server_serving() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_with_domain(dir.path(), DOMAIN);
    let mut server = FakeServer::new(store, Vec::new(), Vec::new(), chain(&VDA));
    server.refusal = Some("the hypervisor refused");
    let engine = BlockJobEngine::new(TestHost { server });
    let dest = dir.path().join("copy.qcow2");
    let opts = BlockCopyOptions { dest: dest.to_str().expect("utf-8 temp path").to_string(), ..Default::default() };
    let err = engine.start_copy("vm", "vda", &opts).await.expect_err("refused");
    assert_eq!(message(err), "the hypervisor refused");
    let calls = engine.host().server.calls();
    assert_eq!(
        calls[1..],
        [
            format!("open copy target of vda at {} as qcow2", dest.display()),
            "copy strata-copy-vda-1 into ".to_string() + &dest.display().to_string(),
            format!("close copy target {}", dest.display()),
            "quit if idle".into()
        ]
    );
    assert!(serves(&engine), "a server that runs the domain stays");
    assert!(engine.host().server.records().is_empty());
    assert!(!engine.host().server.live.lock().expect("live").to_xml().contains("<mirror"));
}

#[tokio::test]
async fn info_on_a_domain_nobody_serves_answers_no_job_for_a_disk_it_has() {
    let dir = tempfile::tempdir().expect("temp dir");
    let engine = BlockJobEngine::new(TestHost::unserved(store_with_domain(dir.path(), DOMAIN)));
    assert_eq!(engine.info("vm", "vda").await.expect("info"), None);
    let err = engine.info("vm", "vdz").await.expect_err("no such disk");
    assert_eq!(err.kind(), ErrorKind::InvalidArg, "{}", err.message());
    assert!(engine.host().server.calls().is_empty(), "no server is started to answer");
}

#[tokio::test]
async fn a_wait_on_a_domain_nobody_serves_answers_how_its_last_job_ended() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_with_domain(dir.path(), DOMAIN);
    let engine = BlockJobEngine::new(TestHost::unserved(store.clone()));
    let failed = BlockJobEnd::Failed("Input/output error".into());
    let outcome = JobOutcome { disk: "vda".into(), kind: BlockJobKind::Commit, end: failed.clone() };
    set_outcome(&store, "vm", "vda", Some(outcome)).expect("outcome");
    match engine.wait("vm", "vda", std::time::Duration::ZERO).await.expect("wait") {
        BlockJobState::Ended { kind, end } => assert_eq!((kind, end), (BlockJobKind::Commit, failed)),
        other => panic!("expected the end, got {other:?}"),
    }
    let err = engine.end_job("vm", "vda", Default::default()).await.expect_err("no job to end");
    assert_eq!(message(err), "disk vda does not have an active block job");
    assert!(engine.host().server.calls().is_empty(), "no server is started to answer");
}

#[tokio::test]
async fn a_wait_whose_server_went_away_answers_that_the_job_ended_with_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = store_with_domain(dir.path(), DOMAIN);
    let rec = record(BlockJobKind::Pull, Some(this_process()), false);
    let server = FakeServer::new(store, vec![rec], vec![(JOB.into(), job(JobPhase::Running, None))], chain(&VDA));
    let engine = BlockJobEngine::new(TestHost { server });
    assert!(serves(&engine), "the server runs the job before it goes");
    *engine.host().server.gone.lock().expect("gone") = true;
    match engine.wait("vm", "vda", std::time::Duration::ZERO).await.expect("wait") {
        BlockJobState::Ended { kind, end } => assert_eq!(
            (kind, end),
            (
                BlockJobKind::Pull,
                BlockJobEnd::Failed(
                    "domain 'vm' (test server pid 4242) exited while block job on 'vda' was running".into()
                )
            )
        ),
        other => panic!("expected the end, got {other:?}"),
    }
    assert!(!serves(&engine), "nothing serves the domain any more");
}
