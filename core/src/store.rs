//! The state store: one directory per connection root holding persistent
//! domain XML, live status XML and snapshot XML.
//!
//! Layout (format version 2):
//! ```text
//! ROOT/format-version                  "2"
//! ROOT/locks/domains/DOMAIN/domain.lock   per-domain lock (flock), outlives the domain
//! ROOT/locks/domains/DOMAIN/PURPOSE.lock  per-domain locks for one purpose (`operation`, …)
//! ROOT/locks/.PURPOSE.lock             store-wide locks (`definitions`, a driver's `next-id`)
//! ROOT/domains/DOMAIN/domain.xml       persistent definition
//! ROOT/domains/DOMAIN/status.xml       live status (driver-defined root element)
//! ROOT/domains/DOMAIN/snapshots/NAME.xml
//! ```
//! A domain's lock files live in a directory of its own, so no domain name
//! can name another domain's lock (format 1 kept `locks/NAME.lock` and
//! `locks/NAME.PURPOSE.lock` side by side: a domain named `vm.operation`
//! shared `vm`'s operation lock). Store-wide locks start with '.', which
//! no domain name may.
//!
//! Every write is atomic (temporary file, fsync, rename, directory fsync;
//! within a [`DirSyncBatch`], one directory fsync per directory at its
//! end), and read-modify-write cycles hold the domain lock, so two `strata`
//! processes never lose each other's updates. Every read is bounded by the
//! limits on XML documents ([`crate::xml::MAX_DOCUMENT_BYTES`]).

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::{Error, ErrorKind, Result};

/// The store format this build writes and understands.
pub const FORMAT_VERSION: u32 = 2;

/// Checks a domain, snapshot or other object name before it becomes a path.
pub fn validate_name(what: &str, name: &str) -> Result<()> {
    let bad = |why: &str| Err(Error::invalid_arg(format!("{what} name '{}' is not valid: {why}", name.escape_debug())));
    if name.is_empty() {
        return bad("it is empty");
    }
    if name.len() > 200 {
        return bad("it is longer than 200 bytes");
    }
    if name == "." || name == ".." {
        return bad("it is a relative directory name");
    }
    if name.contains('/') {
        return bad("it contains '/'");
    }
    if name.chars().any(char::is_control) {
        return bad("it contains a control character");
    }
    if name.starts_with('.') {
        return bad("it starts with '.'");
    }
    Ok(())
}

/// The no-domain error for a name no domain has, in libvirt's words.
pub fn no_such_domain(name: &str) -> Error {
    Error::no_domain(format!("no domain with matching name '{name}'"))
}

/// A connection's state directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// While a [`DirSyncBatch`] is open, the directories whose fsync the
    /// store's writes left to it (shared by the store's clones: a driver
    /// and its engines write through clones of one store).
    deferred_dir_syncs: Arc<Mutex<Option<BTreeSet<PathBuf>>>>,
}

/// Directory fsyncs the store's writes leave to the end of a group of
/// writes (see [`Store::defer_dir_syncs`]); dropped without
/// [`DirSyncBatch::sync`], it syncs them anyway (an error path).
#[derive(Debug)]
pub struct DirSyncBatch<'a> {
    store: &'a Store,
}

/// A store file written and synced under a temporary name in its
/// directory, which [`Store::publish`] renames into place: the write and
/// its fsync can run while the caller waits for something else (a
/// hypervisor's command), and only the rename is left for after it.
/// Dropped unpublished, the temporary file is removed.
#[derive(Debug)]
pub struct StagedFile {
    tmp: PathBuf,
    path: PathBuf,
    published: bool,
}

impl Drop for StagedFile {
    fn drop(&mut self) {
        if !self.published {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// The prefix and infix of a staged file's temporary name: `.NAME.staged.PID`.
const STAGED_INFIX: &str = ".staged.";

/// Holds a lock (one of a domain's or a store-wide one) until dropped.
#[derive(Debug)]
pub struct DomainLock {
    file: File,
}

/// The lock's descriptor, for a child process that must hold the lock
/// until it exits (the lock is the open file's, shared by every copy of
/// the descriptor).
impl std::os::fd::AsFd for DomainLock {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl Store {
    /// Opens (creating if needed) a store at `root`, checking its format
    /// version; a format 1 store is brought to format 2.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        fs::create_dir_all(root.join("domains")).map_err(|e| Error::io("create the state directory", &root, e))?;
        let domain_locks = root.join("locks").join("domains");
        fs::create_dir_all(&domain_locks).map_err(|e| Error::io("create the lock directory", &domain_locks, e))?;
        let version_file = root.join("format-version");
        match fs::read_to_string(&version_file) {
            Ok(text) => {
                let v: u32 = text.trim().parse().map_err(|_| {
                    Error::new(
                        ErrorKind::StoreFormat,
                        format!("'{}' does not hold a version number", version_file.display()),
                    )
                })?;
                if v > FORMAT_VERSION {
                    return Err(Error::new(
                        ErrorKind::StoreFormat,
                        format!(
                            "the state store at '{}' has format {v}, newer than this Strata understands ({FORMAT_VERSION})",
                            root.display()
                        ),
                    ));
                }
                if v < FORMAT_VERSION {
                    remove_format1_locks(&root.join("locks"))?;
                    atomic_write(&version_file, format!("{FORMAT_VERSION}\n").as_bytes())?;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                atomic_write(&version_file, format!("{FORMAT_VERSION}\n").as_bytes())?;
            }
            Err(e) => return Err(Error::io("read", &version_file, e)),
        }
        Ok(Store { root, deferred_dir_syncs: Arc::default() })
    }

    /// Starts a group of writes whose directory fsyncs are done once per
    /// directory, by [`DirSyncBatch::sync`], instead of after each rename.
    /// Every file is still fsynced before the rename that publishes it;
    /// what a crash before the batch's sync can lose is a rename. So this
    /// is only for writes that a record written and synced earlier redoes
    /// when they are lost (an operation's intent), and that record is
    /// cleared only after the batch is synced.
    pub fn defer_dir_syncs(&self) -> DirSyncBatch<'_> {
        self.deferred().get_or_insert_with(BTreeSet::new);
        DirSyncBatch { store: self }
    }

    fn deferred(&self) -> MutexGuard<'_, Option<BTreeSet<PathBuf>>> {
        // A panic while the set was held leaves a set of paths: still usable.
        self.deferred_dir_syncs.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// [`atomic_write`], with the directory fsync left to an open
    /// [`DirSyncBatch`] if there is one.
    fn write_file(&self, path: &Path, data: &[u8]) -> Result<()> {
        let mut deferred = self.deferred();
        match deferred.as_mut() {
            Some(dirs) => {
                replace_file(path, data)?;
                dirs.insert(path.parent().unwrap_or(Path::new(".")).to_path_buf());
                Ok(())
            }
            None => {
                drop(deferred);
                atomic_write(path, data)
            }
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of a domain's files (for drivers' own runtime files).
    pub fn domain_dir(&self, name: &str) -> Result<PathBuf> {
        validate_name("domain", name)?;
        Ok(self.root.join("domains").join(name))
    }

    /// Whether the domain is defined (persistent) or running (live status).
    pub fn is_defined(&self, name: &str) -> Result<bool> {
        let dir = self.domain_dir(name)?;
        Ok(dir.join("domain.xml").exists() || dir.join("status.xml").exists())
    }

    /// Takes the domain's exclusive lock, waiting for other holders; a
    /// domain that is not defined is a no-domain error, and no file is
    /// created for it.
    pub fn lock_domain(&self, name: &str) -> Result<DomainLock> {
        self.lock_domain_for(name, "domain")
    }

    /// The domain lock of a domain that may not exist yet, for defining it;
    /// the caller holds [`Store::lock_definitions`].
    pub fn lock_domain_to_define(&self, name: &str) -> Result<DomainLock> {
        hold(self.open_domain_lock_file(name, "domain")?)
    }

    /// The lock held while a definition is checked against all others (its
    /// UUID and name must be unique) and written; short, and taken before
    /// the domain lock.
    pub fn lock_definitions(&self) -> Result<DomainLock> {
        self.lock_store_for("definitions")
    }

    /// A store-wide lock for one purpose a driver names (file
    /// `locks/.PURPOSE.lock`); waits for another holder.
    pub fn lock_store_for(&self, purpose: &str) -> Result<DomainLock> {
        validate_name("lock purpose", purpose)?;
        hold(open_lock_file(self.root.join("locks").join(format!(".{purpose}.lock")))?)
    }

    /// The lock file of a defined domain for one purpose.
    fn open_domain_lock_file(&self, name: &str, purpose: &str) -> Result<(File, PathBuf)> {
        validate_name("domain", name)?;
        validate_name("lock purpose", purpose)?;
        let dir = self.root.join("locks").join("domains").join(name);
        fs::create_dir_all(&dir).map_err(|e| Error::io("create the lock directory", &dir, e))?;
        open_lock_file(dir.join(format!("{purpose}.lock")))
    }

    fn open_existing_domain_lock_file(&self, name: &str, purpose: &str) -> Result<(File, PathBuf)> {
        if !self.is_defined(name)? {
            return Err(no_such_domain(name));
        }
        self.open_domain_lock_file(name, purpose)
    }

    /// The lock a multi-step operation on the domain (a snapshot create,
    /// revert or delete) holds from start to end; waits for another holder.
    /// The kernel releases it when its holder dies, which is how a later
    /// call tells an interrupted operation (its intent left, the lock free)
    /// from one still running in another process (the lock held).
    pub fn lock_domain_operation(&self, name: &str) -> Result<DomainLock> {
        self.lock_domain_for(name, "operation")
    }

    /// A lock of the domain for one purpose a driver names (file
    /// `locks/domains/NAME/PURPOSE.lock`), independent of the domain lock
    /// (purpose `domain`) and of other purposes; waits for another holder.
    /// Never take the same purpose twice in one process: the second call
    /// would wait forever.
    pub fn lock_domain_for(&self, name: &str, purpose: &str) -> Result<DomainLock> {
        hold(self.open_existing_domain_lock_file(name, purpose)?)
    }

    /// Like [`Store::lock_domain_operation`] without waiting: `None` while
    /// another process holds it.
    pub fn try_lock_domain_operation(&self, name: &str) -> Result<Option<DomainLock>> {
        self.try_lock_domain_for(name, "operation")
    }

    /// Like [`Store::lock_domain_for`] without waiting: `None` while
    /// another process holds it.
    pub fn try_lock_domain_for(&self, name: &str, purpose: &str) -> Result<Option<DomainLock>> {
        let (file, path) = self.open_existing_domain_lock_file(name, purpose)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(DomainLock { file })),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io("lock", &path, e)),
        }
    }

    /// Names of all defined domains, sorted.
    pub fn list_domains(&self) -> Result<Vec<String>> {
        let dir = self.root.join("domains");
        let mut names = Vec::new();
        for entry in fs::read_dir(&dir).map_err(|e| Error::io("list", &dir, e))? {
            let entry = entry.map_err(|e| Error::io("list", &dir, e))?;
            // Anything whose name no domain may have is not Strata's.
            let Ok(name) = entry.file_name().into_string() else { continue };
            if validate_name("domain", &name).is_ok() && self.is_defined(&name)? {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    fn file(&self, domain: &str, file: &str) -> Result<PathBuf> {
        Ok(self.domain_dir(domain)?.join(file))
    }

    pub fn read_domain(&self, name: &str) -> Result<Option<String>> {
        read_optional(&self.file(name, "domain.xml")?)
    }

    /// [`Store::read_domain`], with a mark that tells later whether the
    /// definition read is still the stored one.
    pub fn read_domain_marked(&self, name: &str) -> Result<Option<(String, ReadMark)>> {
        let path = self.file(name, "domain.xml")?;
        match crate::xml::read_document_keeping(&path) {
            Ok((text, file)) => Ok(Some((text, ReadMark { file, path }))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io("read", &path, e)),
        }
    }

    pub fn write_domain(&self, name: &str, xml: &str) -> Result<()> {
        let dir = self.domain_dir(name)?;
        create_dir_synced(&dir)?;
        self.write_file(&dir.join("domain.xml"), xml.as_bytes())
    }

    pub fn remove_domain(&self, name: &str) -> Result<()> {
        remove_optional(&self.file(name, "domain.xml")?)
    }

    pub fn read_status(&self, name: &str) -> Result<Option<String>> {
        read_optional(&self.file(name, "status.xml")?)
    }

    pub fn write_status(&self, name: &str, xml: &str) -> Result<()> {
        let dir = self.domain_dir(name)?;
        create_dir_synced(&dir)?;
        self.write_file(&dir.join("status.xml"), xml.as_bytes())
    }

    pub fn remove_status(&self, name: &str) -> Result<()> {
        remove_optional(&self.file(name, "status.xml")?)
    }

    /// Removes the domain's directory once nothing of it is left.
    pub fn purge_domain_dir(&self, name: &str) -> Result<()> {
        let dir = self.domain_dir(name)?;
        match fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::io("remove", &dir, e)),
        }
    }

    /// A driver's own per-domain file (`domains/NAME/FILE`), if present.
    pub fn read_domain_file(&self, name: &str, file: &str) -> Result<Option<String>> {
        validate_name("file", file)?;
        read_optional(&self.file(name, file)?)
    }

    /// Writes a driver's own per-domain file atomically.
    pub fn write_domain_file(&self, name: &str, file: &str, data: &str) -> Result<()> {
        validate_name("file", file)?;
        let dir = self.domain_dir(name)?;
        create_dir_synced(&dir)?;
        self.write_file(&dir.join(file), data.as_bytes())
    }

    /// Removes a driver's own per-domain file if present (the removal
    /// synced to disk).
    pub fn remove_domain_file(&self, name: &str, file: &str) -> Result<()> {
        validate_name("file", file)?;
        remove_optional(&self.file(name, file)?)
    }

    pub fn read_snapshot(&self, domain: &str, snap: &str) -> Result<Option<String>> {
        validate_name("snapshot", snap)?;
        read_optional(&self.file(domain, "snapshots")?.join(format!("{snap}.xml")))
    }

    /// Whether the domain has a record named `snap`, without reading it (a
    /// record embeds its domain, 370 KB on a 1,000-layer chain).
    pub fn has_snapshot(&self, domain: &str, snap: &str) -> Result<bool> {
        validate_name("snapshot", snap)?;
        Ok(self.file(domain, "snapshots")?.join(format!("{snap}.xml")).is_file())
    }

    pub fn write_snapshot(&self, domain: &str, snap: &str, xml: &str) -> Result<()> {
        validate_name("snapshot", snap)?;
        let dir = self.file(domain, "snapshots")?;
        create_dir_synced(&dir)?;
        self.write_file(&dir.join(format!("{snap}.xml")), xml.as_bytes())
    }

    /// Stages the domain's definition (see [`StagedFile`]).
    pub fn stage_domain(&self, name: &str, xml: &str) -> Result<StagedFile> {
        let dir = self.domain_dir(name)?;
        create_dir_synced(&dir)?;
        stage_file(&dir.join("domain.xml"), xml.as_bytes())
    }

    /// Stages a snapshot record (see [`StagedFile`]).
    pub fn stage_snapshot(&self, domain: &str, snap: &str, xml: &str) -> Result<StagedFile> {
        validate_name("snapshot", snap)?;
        let dir = self.file(domain, "snapshots")?;
        create_dir_synced(&dir)?;
        stage_file(&dir.join(format!("{snap}.xml")), xml.as_bytes())
    }

    /// Stages a driver's own per-domain file (see [`StagedFile`]).
    pub fn stage_domain_file(&self, name: &str, file: &str, data: &str) -> Result<StagedFile> {
        validate_name("file", file)?;
        let dir = self.domain_dir(name)?;
        create_dir_synced(&dir)?;
        stage_file(&dir.join(file), data.as_bytes())
    }

    /// Renames `staged` into place; its directory is synced like after any
    /// other write (by the open [`DirSyncBatch`] if there is one).
    pub fn publish(&self, mut staged: StagedFile) -> Result<()> {
        fs::rename(&staged.tmp, &staged.path).map_err(|e| Error::io("rename into place", &staged.path, e))?;
        staged.published = true;
        let mut deferred = self.deferred();
        match deferred.as_mut() {
            Some(dirs) => {
                dirs.insert(staged.path.parent().unwrap_or(Path::new(".")).to_path_buf());
                Ok(())
            }
            None => {
                drop(deferred);
                sync_dir(&staged.path)
            }
        }
    }

    /// Removes what staged files a killed process left in the domain's
    /// directory and its snapshots' (see [`StagedFile`]). The caller holds
    /// the lock of whatever stages them.
    pub fn remove_staged(&self, domain: &str) -> Result<()> {
        let dir = self.domain_dir(domain)?;
        for dir in [dir.join("snapshots"), dir] {
            for name in entry_names(&dir)? {
                if name.starts_with('.') && name.contains(STAGED_INFIX) {
                    remove_optional(&dir.join(name))?;
                }
            }
        }
        Ok(())
    }

    pub fn list_snapshots(&self, domain: &str) -> Result<Vec<String>> {
        let files = entry_names(&self.file(domain, "snapshots")?)?;
        Ok(files.iter().filter_map(|f| f.strip_suffix(".xml")).map(str::to_string).collect())
    }
}

/// The names of the entries of a store directory, sorted; none when it
/// does not exist. A name that is not UTF-8 is none of Strata's.
pub fn entry_names(dir: &Path) -> Result<Vec<String>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io("list", dir, e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        if let Ok(name) = entry.file_name().into_string() {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

fn open_lock_file(path: PathBuf) -> Result<(File, PathBuf)> {
    let opened = OpenOptions::new().create(true).truncate(false).write(true).open(&path);
    // On a read-only store an existing lock file still locks (flock needs
    // no write access), so reads and checks go on answering; a change
    // fails at its first write, before it touches an image.
    let opened = match opened {
        Err(e) if e.raw_os_error() == Some(libc::EROFS) => File::open(&path).map_err(|_| e),
        other => other,
    };
    let file = opened.map_err(|e| Error::io("open the lock file", &path, e))?;
    Ok((file, path))
}

/// Takes an opened lock file's lock, waiting for another holder.
fn hold((file, path): (File, PathBuf)) -> Result<DomainLock> {
    file.lock().map_err(|e| Error::io("lock", &path, e))?;
    Ok(DomainLock { file })
}

/// Format 1's lock files (`locks/NAME.lock`, `locks/NAME.PURPOSE.lock`);
/// format 2 uses none of them. Store-wide locks (a leading '.') stay.
fn remove_format1_locks(locks: &Path) -> Result<()> {
    for entry in fs::read_dir(locks).map_err(|e| Error::io("list", locks, e))? {
        let entry = entry.map_err(|e| Error::io("list", locks, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_file = entry.file_type().map_err(|e| Error::io("list", locks, e))?.is_file();
        if is_file && name.ends_with(".lock") && !name.starts_with('.') {
            remove_optional(&entry.path())?;
        }
    }
    Ok(())
}

/// A store file, bounded as every XML document is; `None` when absent.
/// A store file as one read found it, held open. The store replaces a file
/// only by renaming a new one over it, and the inode of a file held open is
/// not reused: while the path names the inode read, its content is what was
/// read, and a caller that kept what it parsed need not read it again.
#[derive(Debug)]
pub struct ReadMark {
    file: fs::File,
    path: PathBuf,
}

impl ReadMark {
    /// Whether the path still names the file that was read.
    pub fn unchanged(&self) -> Result<bool> {
        use std::os::unix::fs::MetadataExt;
        let read = self.file.metadata().map_err(|e| Error::io("stat", &self.path, e))?;
        match fs::metadata(&self.path) {
            Ok(now) => Ok(now.dev() == read.dev() && now.ino() == read.ino()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(Error::io("stat", &self.path, e)),
        }
    }
}

fn read_optional(path: &Path) -> Result<Option<String>> {
    match crate::xml::read_document(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("read", path, e)),
    }
}

fn remove_optional(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => sync_dir(path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io("remove", path, e)),
    }
}

/// Writes `data` to `path` so that a crash leaves either the old or the new
/// content: temporary file in the same directory, fsync, rename, fsync the
/// directory.
pub fn atomic_write(path: &Path, data: &[u8]) -> Result<()> {
    replace_file(path, data)?;
    sync_dir(path)
}

/// The file part of [`atomic_write`]: `data` in a temporary file in the
/// same directory, fsynced, renamed over `path`.
fn replace_file(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp).map_err(|e| Error::io("create", &tmp, e))?;
        f.write_all(data).map_err(|e| Error::io("write", &tmp, e))?;
        f.sync_all().map_err(|e| Error::io("sync", &tmp, e))?;
        fs::rename(&tmp, path).map_err(|e| Error::io("rename into place", path, e))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// `data` in `path`'s staged temporary file, synced (see [`StagedFile`]).
fn stage_file(path: &Path, data: &[u8]) -> Result<StagedFile> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let file_name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}{STAGED_INFIX}{}", std::process::id()));
    let staged = StagedFile { tmp, path: path.to_path_buf(), published: false };
    let mut f = File::create(&staged.tmp).map_err(|e| Error::io("create", &staged.tmp, e))?;
    f.write_all(data).map_err(|e| Error::io("write", &staged.tmp, e))?;
    f.sync_all().map_err(|e| Error::io("sync", &staged.tmp, e))?;
    Ok(staged)
}

impl DirSyncBatch<'_> {
    /// Fsyncs each directory the batch's writes renamed files in, once, and
    /// ends the batch: the store's writes sync their directories again.
    pub fn sync(self) -> Result<()> {
        self.flush()
    }

    fn flush(&self) -> Result<()> {
        let dirs = self.store.deferred().take().unwrap_or_default();
        let sync =
            |dir: &PathBuf| File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("sync directory", dir, e));
        let mut dirs = dirs.iter();
        let Some(first) = dirs.next() else { return Ok(()) };
        // Synced at once, the directories' writes to the disk overlap
        // instead of waiting one after the other.
        std::thread::scope(|scope| {
            let others: Vec<_> = dirs.map(|dir| scope.spawn(move || sync(dir))).collect();
            let mut result = sync(first);
            for other in others {
                let synced = other.join().unwrap_or_else(|_| Err(Error::internal("a directory sync panicked")));
                result = result.and(synced);
            }
            result
        })
    }
}

impl Drop for DirSyncBatch<'_> {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

/// Creates `dir` and any missing parent, syncing each directory it makes
/// into its parent: a record renamed into a directory made a moment before
/// is synced into that directory, which is lost in a crash unless it was
/// synced into its own parent. A directory already there costs one stat.
fn create_dir_synced(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir_synced(parent)?;
    }
    match fs::create_dir(dir) {
        Ok(()) => {}
        // Made by another process a moment ago, which may not have synced
        // it yet: synced here too.
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && dir.is_dir() => {}
        Err(e) => return Err(Error::io("create", dir, e)),
    }
    sync_dir(dir)
}

fn sync_dir(path: &Path) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).map_err(|e| Error::io("sync directory", dir, e))
}

/// Creates (empty) or removes a marker file such as an object's `autostart`.
pub fn set_marker(marker: &Path, present: bool) -> Result<()> {
    let result = if present {
        fs::write(marker, b"")
    } else {
        match fs::remove_file(marker) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    };
    result.map_err(|e| Error::io(if present { "create" } else { "remove" }, marker, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_traversal_or_control_characters_are_refused() {
        for bad in ["", ".", "..", "a/b", "../x", "x\n", "x\u{7}", ".hidden"] {
            assert!(validate_name("domain", bad).is_err(), "{bad:?}");
        }
        for good in ["vm1", "web-01_test", "snäpshot", "a b"] {
            assert!(validate_name("domain", good).is_ok(), "{good:?}");
        }
    }

    #[test]
    fn store_records_version_and_refuses_newer() {
        let dir = tempfile::tempdir().expect("tempdir");
        Store::open(dir.path()).expect("open");
        assert_eq!(fs::read_to_string(dir.path().join("format-version")).expect("read").trim(), "2");
        fs::write(dir.path().join("format-version"), "99\n").expect("write");
        let err = Store::open(dir.path()).expect_err("newer format must be refused");
        assert_eq!(err.kind(), ErrorKind::StoreFormat);
    }

    #[test]
    fn domain_and_snapshot_files_round_trip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        store.write_domain("vm1", "<domain/>").expect("write");
        assert_eq!(store.read_domain("vm1").expect("read").as_deref(), Some("<domain/>"));
        assert_eq!(store.list_domains().expect("list"), ["vm1"]);
        store.write_snapshot("vm1", "s1", "<domainsnapshot/>").expect("snap");
        assert_eq!(store.list_snapshots("vm1").expect("list"), ["s1"]);
        assert!(store.read_domain("../etc").is_err());
        store.remove_domain("vm1").expect("remove");
        assert_eq!(store.read_domain("vm1").expect("read"), None);
    }

    #[test]
    fn a_read_mark_tells_whether_the_definition_was_replaced_since() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        store.write_domain("vm1", "<domain/>").expect("write");
        let (text, mark) = store.read_domain_marked("vm1").expect("read").expect("defined");
        assert_eq!(text, "<domain/>");
        assert!(mark.unchanged().expect("stat"));
        // The same content written again is a new file: a change the
        // reader did not see is never taken for none.
        store.write_domain("vm1", "<domain/>").expect("rewrite");
        assert!(!mark.unchanged().expect("stat"));
        let (_, mark) = store.read_domain_marked("vm1").expect("read").expect("defined");
        store.remove_domain("vm1").expect("remove");
        assert!(!mark.unchanged().expect("stat"));
        assert!(store.read_domain_marked("vm1").expect("read").is_none());
    }

    #[test]
    fn a_staged_file_shows_only_once_published_and_leaves_nothing_otherwise() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        store.write_domain("vm1", "<domain>old</domain>").expect("write");
        let domain_dir = store.domain_dir("vm1").expect("dir");
        let hidden = |dir: &Path| entry_names(dir).expect("list").into_iter().filter(|n| n.starts_with('.')).count();

        let staged = store.stage_domain("vm1", "<domain>new</domain>").expect("stage");
        let record = store.stage_snapshot("vm1", "s1", "<domainsnapshot/>").expect("stage record");
        assert_eq!(store.read_domain("vm1").expect("read").as_deref(), Some("<domain>old</domain>"));
        assert!(store.list_snapshots("vm1").expect("list").is_empty());
        store.publish(staged).expect("publish");
        assert_eq!(store.read_domain("vm1").expect("read").as_deref(), Some("<domain>new</domain>"));
        // Dropped unpublished: its temporary file goes with it.
        drop(record);
        assert!(store.list_snapshots("vm1").expect("list").is_empty());
        assert_eq!(hidden(&domain_dir) + hidden(&domain_dir.join("snapshots")), 0);

        // What a killed process left is removed by the next one.
        let current = store.stage_domain_file("vm1", "snapshot-current", "s1").expect("stage current");
        let record = store.stage_snapshot("vm1", "s1", "<domainsnapshot/>").expect("stage record");
        std::mem::forget((current, record));
        assert_eq!(hidden(&domain_dir) + hidden(&domain_dir.join("snapshots")), 2);
        store.remove_staged("vm1").expect("clean");
        assert_eq!(hidden(&domain_dir) + hidden(&domain_dir.join("snapshots")), 0);
        assert_eq!(store.read_domain_file("vm1", "snapshot-current").expect("read"), None);
    }

    #[test]
    fn format1_store_is_brought_to_format2_without_its_lock_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let locks = dir.path().join("locks");
        fs::create_dir_all(&locks).expect("mkdir");
        fs::write(dir.path().join("format-version"), "1\n").expect("write");
        for old in ["vm.lock", "vm.operation.lock", "vm.nodes.lock", ".next-id.lock"] {
            fs::write(locks.join(old), "").expect("write");
        }
        let store = Store::open(dir.path()).expect("open");
        assert_eq!(fs::read_to_string(dir.path().join("format-version")).expect("read").trim(), "2");
        let mut left: Vec<String> = fs::read_dir(&locks)
            .expect("list")
            .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
            .collect();
        left.sort();
        assert_eq!(left, [".next-id.lock", "domains"]);
        store.write_domain("vm", "<domain/>").expect("write");
        store.lock_domain("vm").expect("lock");
    }

    /// Each lock of a domain is its own, whatever the other domains are
    /// called: in format 1, `vm.operation`'s domain lock was `vm`'s
    /// operation lock.
    #[test]
    fn lock_names_of_two_domains_never_meet() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        for purpose in ["operation", "nodes", "domain"] {
            let other = format!("vm.{purpose}");
            store.write_domain("vm", "<domain/>").expect("write");
            store.write_domain(&other, "<domain/>").expect("write");
            let _held = store.lock_domain(&other).expect("lock");
            assert!(store.try_lock_domain_operation("vm").expect("try").is_some(), "{other}");
            let _also = store.lock_domain_for("vm", purpose).expect("lock");
        }
    }

    #[test]
    fn locking_a_domain_that_does_not_exist_creates_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        assert_eq!(store.lock_domain("nosuch").expect_err("no domain").kind(), ErrorKind::NoDomain);
        assert_eq!(store.lock_domain_operation("nosuch").expect_err("no domain").kind(), ErrorKind::NoDomain);
        assert_eq!(store.try_lock_domain_operation("nosuch").expect_err("no domain").kind(), ErrorKind::NoDomain);
        assert_eq!(store.lock_domain_for("nosuch", "nodes").expect_err("no domain").kind(), ErrorKind::NoDomain);
        let domain_locks = fs::read_dir(dir.path().join("locks").join("domains")).expect("list");
        assert_eq!(domain_locks.count(), 0);
        assert!(!dir.path().join("domains").join("nosuch").exists());
    }

    #[test]
    fn listing_skips_what_no_domain_may_be_called() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        store.write_domain("vm", "<domain/>").expect("write");
        let stray = dir.path().join("domains").join(".stray");
        fs::create_dir_all(&stray).expect("mkdir");
        fs::write(stray.join("domain.xml"), "<domain/>").expect("write");
        assert_eq!(store.list_domains().expect("list"), ["vm"]);
    }
}
