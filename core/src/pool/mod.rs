//! Storage pools, hypervisor-neutral: every driver with a state store gets
//! them (see [`crate::driver::Connection::storage_pools`]).
//!
//! A pool is a directory of image files (`dir`), or a block device (or an
//! image) holding a filesystem that is mounted at the pool's target (`fs`).
//! Its volumes are the regular files in that directory; nothing about them
//! is recorded, so a file copied in by hand is a volume at once. Images are
//! made, resized and copied with `qemu-img`.
//!
//! Layout in the state store:
//! ```text
//! ROOT/pools/NAME/pool.xml    the definition
//! ROOT/pools/NAME/autostart   present when the pool is marked autostart
//! ROOT/pools/NAME/running     the boot id of the host when the pool was started
//! ROOT/pools/.autostarted     the boot id whose autostart pools were started
//! ```
//! With no daemon, "running" is recorded with the host's boot id: a record
//! from an earlier boot reads as inactive (an `fs` pool is no longer
//! mounted then). The first pool call of each boot starts the pools marked
//! autostart, as libvirtd does when it starts.

mod backend;
mod def;
mod volume;

use std::fs;
use std::path::{Path, PathBuf};

use async_trait::async_trait;

pub use backend::boot_id;
pub use def::{pool_xml_from_parts, PoolDef, PoolSizes, PoolType};
pub use volume::{parse_scaled, VolumeRequest};

use crate::driver::{PoolBuildFlags, PoolInfo, PoolState, StoragePoolOps, VolumeInfo, VolumeResizeFlags};
use crate::error::{Error, ErrorKind, Result};
use crate::store::{atomic_write, entry_names, set_marker, validate_name, DomainLock, Store};
use crate::tool::offload;

/// The storage pools of one state store.
#[derive(Debug, Clone)]
pub struct PoolManager {
    store: Store,
}

/// A volume found in a running pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRef {
    pub pool: String,
    pub name: String,
    pub path: PathBuf,
}

/// The no-storage-pool error, in libvirt's words.
pub fn no_such_pool(name: &str) -> Error {
    Error::new(ErrorKind::NoStoragePool, format!("no storage pool with matching name '{name}'"))
}

fn no_such_volume(name: &str) -> Error {
    Error::new(ErrorKind::NoStorageVol, format!("no storage vol with matching name '{name}'"))
}

fn not_active(name: &str) -> Error {
    Error::operation_invalid(format!("storage pool '{name}' is not active"))
}

impl PoolManager {
    pub fn new(store: Store) -> PoolManager {
        PoolManager { store }
    }

    fn pools_dir(&self) -> PathBuf {
        self.store.root().join("pools")
    }

    fn pool_dir(&self, name: &str) -> Result<PathBuf> {
        validate_name("storage pool", name)?;
        Ok(self.pools_dir().join(name))
    }

    /// The lock held while pools or volumes change.
    fn lock(&self) -> Result<DomainLock> {
        self.store.lock_store_for("pools")
    }

    /// A pool's definition; a pool that is not defined is a no-storage-pool error.
    pub fn load(&self, name: &str) -> Result<PoolDef> {
        let file = self.pool_dir(name)?.join("pool.xml");
        match crate::xml::read_document(&file) {
            Ok(xml) => {
                PoolDef::parse(&xml).map_err(|e| e.context(format!("storage pool definition '{}'", file.display())))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(no_such_pool(name)),
            Err(e) => Err(Error::io("read", &file, e)),
        }
    }

    fn names(&self) -> Result<Vec<String>> {
        let dir = self.pools_dir();
        Ok(entry_names(&dir)?
            .into_iter()
            .filter(|name| validate_name("storage pool", name).is_ok() && dir.join(name).join("pool.xml").exists())
            .collect())
    }

    fn autostart(&self, name: &str) -> Result<bool> {
        Ok(self.pool_dir(name)?.join("autostart").exists())
    }

    /// Whether the pool runs: started in this boot and, for `fs`, still mounted.
    fn is_running(&self, def: &PoolDef) -> Result<bool> {
        let marker = self.pool_dir(&def.name)?.join("running");
        let started_this_boot = match fs::read_to_string(&marker) {
            Ok(boot) => boot.trim() == backend::boot_id()?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(Error::io("read", &marker, e)),
        };
        Ok(started_this_boot && (def.pool_type == PoolType::Dir || backend::is_mounted(&def.target)?))
    }

    fn set_running(&self, name: &str, running: bool) -> Result<()> {
        let marker = self.pool_dir(name)?.join("running");
        if running {
            atomic_write(&marker, format!("{}\n", backend::boot_id()?).as_bytes())
        } else {
            match fs::remove_file(&marker) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(Error::io("remove", &marker, e)),
            }
        }
    }

    /// Starts the autostart pools once per boot of the host.
    fn autostart_once_per_boot(&self) -> Result<()> {
        let record = self.pools_dir().join(".autostarted");
        let boot = backend::boot_id()?;
        if fs::read_to_string(&record).is_ok_and(|b| b.trim() == boot) {
            return Ok(());
        }
        let _lock = self.lock()?;
        if fs::read_to_string(&record).is_ok_and(|b| b.trim() == boot) {
            return Ok(());
        }
        for name in self.names()? {
            let def = self.load(&name)?;
            if self.autostart(&name)? && !self.is_running(&def)? {
                if let Err(e) = self.start_locked(&def) {
                    tracing::warn!(pool = name, "autostart failed: {}", e.report());
                }
            }
        }
        fs::create_dir_all(self.pools_dir()).map_err(|e| Error::io("create", &self.pools_dir(), e))?;
        atomic_write(&record, format!("{boot}\n").as_bytes())
    }

    /// The pool's definition, after the once-per-boot autostart.
    fn pool(&self, name: &str) -> Result<PoolDef> {
        self.autostart_once_per_boot()?;
        self.load(name)
    }

    /// A running pool's definition; an inactive one is refused as libvirt does.
    fn running_pool(&self, name: &str) -> Result<PoolDef> {
        let def = self.pool(name)?;
        if !self.is_running(&def)? {
            return Err(not_active(name));
        }
        Ok(def)
    }

    fn start_locked(&self, def: &PoolDef) -> Result<()> {
        backend::start(def)?;
        self.set_running(&def.name, true)
    }

    fn info(&self, def: &PoolDef) -> Result<PoolInfo> {
        let running = self.is_running(def)?;
        let sizes = if running { Some(backend::sizes(&def.target)?) } else { None };
        Ok(PoolInfo {
            name: def.name.clone(),
            uuid: def.uuid.clone(),
            pool_type: def.pool_type.as_str().to_string(),
            state: if running { PoolState::Running } else { PoolState::Inactive },
            persistent: true,
            autostart: self.autostart(&def.name)?,
            target: def.target.display().to_string(),
            capacity: sizes.map(|s| s.capacity),
            allocation: sizes.map(|s| s.allocation),
            available: sizes.map(|s| s.available),
        })
    }

    /// The volumes of a running pool: its regular files, by name.
    fn volumes(&self, def: &PoolDef) -> Result<Vec<VolumeRef>> {
        let dir = def.target();
        let mut out = Vec::new();
        for entry in fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))? {
            let entry = entry.map_err(|e| Error::io("list", dir, e))?;
            let Ok(name) = entry.file_name().into_string() else { continue };
            let is_file = entry.file_type().map_err(|e| Error::io("list", dir, e))?.is_file();
            if is_file && validate_name("volume", &name).is_ok() {
                out.push(VolumeRef { pool: def.name.clone(), path: entry.path(), name });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Finds a volume by pool and name (or path), or by path in every running pool.
    pub fn lookup(&self, pool: Option<&str>, volume: &str) -> Result<VolumeRef> {
        let pools = match pool {
            Some(p) => vec![self.running_pool(p)?],
            None => {
                self.autostart_once_per_boot()?;
                let mut running = Vec::new();
                for name in self.names()? {
                    let def = self.load(&name)?;
                    if self.is_running(&def)? {
                        running.push(def);
                    }
                }
                running
            }
        };
        let wanted_path = Path::new(volume).is_absolute().then(|| canonical(Path::new(volume)));
        for def in &pools {
            for vol in self.volumes(def)? {
                let by_name = pool.is_some() && vol.name == volume;
                if by_name || wanted_path.as_ref().is_some_and(|w| *w == canonical(&vol.path)) {
                    return Ok(vol);
                }
            }
        }
        Err(no_such_volume(volume))
    }

    /// The path of volume `volume` of pool `pool`, for `<disk type='volume'>`.
    pub fn volume_path(&self, pool: &str, volume: &str) -> Result<PathBuf> {
        validate_name("volume", volume)?;
        self.lookup(Some(pool), volume).map(|v| v.path)
    }

    fn new_volume_path(&self, def: &PoolDef, name: &str) -> Result<PathBuf> {
        validate_name("volume", name)?;
        let path = def.target.join(name);
        if path.symlink_metadata().is_ok() {
            return Err(Error::new(
                ErrorKind::StorageVolExists,
                format!("volume '{name}' already exists in storage pool '{}'", def.name),
            ));
        }
        Ok(path)
    }
}

/// The path with symbolic links resolved, or as given when it cannot be.
fn canonical(path: &Path) -> PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
}

/// The bodies of [`StoragePoolOps`]: they wait for locks and run mkfs,
/// mount and `qemu-img`, so the trait's methods run them on tokio's
/// blocking pool.
impl PoolManager {
    fn pool_define_xml_blocking(&self, xml: &str) -> Result<String> {
        let def = PoolDef::parse(xml)?;
        let _lock = self.lock()?;
        for other in self.names()? {
            let existing = self.load(&other)?;
            if other != def.name && existing.uuid == def.uuid {
                return Err(Error::operation_failed(format!(
                    "pool '{other}' is already defined with uuid {}",
                    def.uuid
                )));
            }
            if other == def.name && existing.uuid != def.uuid {
                return Err(Error::operation_failed(format!(
                    "pool '{other}' is already defined with uuid {}",
                    existing.uuid
                )));
            }
        }
        let dir = self.pool_dir(&def.name)?;
        fs::create_dir_all(&dir).map_err(|e| Error::io("create", &dir, e))?;
        atomic_write(&dir.join("pool.xml"), def.to_xml().as_bytes())?;
        Ok(def.name)
    }

    fn pool_undefine_blocking(&self, pool: &str) -> Result<()> {
        let def = self.pool(pool)?;
        let _lock = self.lock()?;
        if self.is_running(&def)? {
            return Err(Error::operation_invalid(format!("storage pool '{pool}' is still active")));
        }
        let dir = self.pool_dir(pool)?;
        fs::remove_dir_all(&dir).map_err(|e| Error::io("remove", &dir, e))
    }

    fn pool_build_blocking(&self, pool: &str, flags: PoolBuildFlags) -> Result<()> {
        let def = self.pool(pool)?;
        let _lock = self.lock()?;
        if self.is_running(&def)? {
            return Err(Error::operation_invalid(format!("storage pool '{pool}' is already active")));
        }
        backend::build(&def, flags)
    }

    fn pool_start_blocking(&self, pool: &str) -> Result<()> {
        let def = self.pool(pool)?;
        let _lock = self.lock()?;
        if self.is_running(&def)? {
            return Err(Error::operation_invalid(format!("storage pool '{pool}' is already active")));
        }
        self.start_locked(&def)
    }

    fn pool_destroy_blocking(&self, pool: &str) -> Result<()> {
        let def = self.running_pool(pool)?;
        let _lock = self.lock()?;
        backend::stop(&def)?;
        self.set_running(pool, false)
    }

    fn pool_refresh_blocking(&self, pool: &str) -> Result<()> {
        // Volumes are read from the target at each call: nothing is cached.
        self.running_pool(pool).map(|_| ())
    }

    fn pool_list_blocking(&self) -> Result<Vec<PoolInfo>> {
        self.autostart_once_per_boot()?;
        self.names()?.iter().map(|n| self.info(&self.load(n)?)).collect()
    }

    fn pool_info_blocking(&self, pool: &str) -> Result<PoolInfo> {
        self.info(&self.pool(pool)?)
    }

    fn pool_xml_blocking(&self, pool: &str, inactive: bool) -> Result<String> {
        let def = self.pool(pool)?;
        if inactive || !self.is_running(&def)? {
            return Ok(def.to_xml());
        }
        Ok(def.with_sizes(backend::sizes(&def.target)?))
    }

    fn pool_set_autostart_blocking(&self, pool: &str, autostart: bool) -> Result<()> {
        self.pool(pool)?;
        let _lock = self.lock()?;
        let marker = self.pool_dir(pool)?.join("autostart");
        set_marker(&marker, autostart)
    }

    fn vol_list_blocking(&self, pool: &str) -> Result<Vec<VolumeInfo>> {
        let def = self.running_pool(pool)?;
        self.volumes(&def)?.iter().map(volume::info).collect()
    }

    fn vol_info_blocking(&self, pool: Option<&str>, volume: &str) -> Result<VolumeInfo> {
        volume::info(&self.lookup(pool, volume)?)
    }

    fn vol_xml_blocking(&self, pool: Option<&str>, volume: &str) -> Result<String> {
        volume::xml(&self.lookup(pool, volume)?)
    }

    fn vol_create_xml_blocking(&self, pool: &str, xml: &str) -> Result<String> {
        let def = self.running_pool(pool)?;
        let request = VolumeRequest::parse(xml)?;
        let _lock = self.lock()?;
        let path = self.new_volume_path(&def, &request.name)?;
        volume::create(&request, &path)?;
        Ok(request.name)
    }

    fn vol_delete_blocking(&self, pool: Option<&str>, volume: &str) -> Result<()> {
        let vol = self.lookup(pool, volume)?;
        let _lock = self.lock()?;
        fs::remove_file(&vol.path).map_err(|e| Error::io("remove", &vol.path, e))
    }

    fn vol_resize_blocking(
        &self,
        pool: Option<&str>,
        volume: &str,
        bytes: u64,
        flags: VolumeResizeFlags,
    ) -> Result<u64> {
        let vol = self.lookup(pool, volume)?;
        let _lock = self.lock()?;
        volume::resize(&vol, bytes, flags)
    }

    fn vol_clone_blocking(&self, pool: Option<&str>, volume: &str, new_name: &str) -> Result<()> {
        let vol = self.lookup(pool, volume)?;
        let def = self.running_pool(&vol.pool)?;
        let _lock = self.lock()?;
        let path = self.new_volume_path(&def, new_name)?;
        volume::clone(&vol, &path)
    }
}

/// Runs blocking pool work off the async runtime.

#[async_trait]
impl StoragePoolOps for PoolManager {
    async fn pool_define_xml(&self, xml: &str) -> Result<String> {
        let (manager, xml) = (self.clone(), xml.to_string());
        offload("storage pool", move || manager.pool_define_xml_blocking(&xml)).await
    }

    async fn pool_undefine(&self, pool: &str) -> Result<()> {
        let (manager, pool) = (self.clone(), pool.to_string());
        offload("storage pool", move || manager.pool_undefine_blocking(&pool)).await
    }

    async fn pool_build(&self, pool: &str, flags: PoolBuildFlags) -> Result<()> {
        let (manager, pool, flags) = (self.clone(), pool.to_string(), flags);
        offload("storage pool", move || manager.pool_build_blocking(&pool, flags)).await
    }

    async fn pool_start(&self, pool: &str) -> Result<()> {
        let (manager, pool) = (self.clone(), pool.to_string());
        offload("storage pool", move || manager.pool_start_blocking(&pool)).await
    }

    async fn pool_destroy(&self, pool: &str) -> Result<()> {
        let (manager, pool) = (self.clone(), pool.to_string());
        offload("storage pool", move || manager.pool_destroy_blocking(&pool)).await
    }

    async fn pool_refresh(&self, pool: &str) -> Result<()> {
        let (manager, pool) = (self.clone(), pool.to_string());
        offload("storage pool", move || manager.pool_refresh_blocking(&pool)).await
    }

    async fn pool_list(&self) -> Result<Vec<PoolInfo>> {
        let manager = self.clone();
        offload("storage pool", move || manager.pool_list_blocking()).await
    }

    async fn pool_info(&self, pool: &str) -> Result<PoolInfo> {
        let (manager, pool) = (self.clone(), pool.to_string());
        offload("storage pool", move || manager.pool_info_blocking(&pool)).await
    }

    async fn pool_xml(&self, pool: &str, inactive: bool) -> Result<String> {
        let (manager, pool, inactive) = (self.clone(), pool.to_string(), inactive);
        offload("storage pool", move || manager.pool_xml_blocking(&pool, inactive)).await
    }

    async fn pool_set_autostart(&self, pool: &str, autostart: bool) -> Result<()> {
        let (manager, pool, autostart) = (self.clone(), pool.to_string(), autostart);
        offload("storage pool", move || manager.pool_set_autostart_blocking(&pool, autostart)).await
    }

    async fn vol_list(&self, pool: &str) -> Result<Vec<VolumeInfo>> {
        let (manager, pool) = (self.clone(), pool.to_string());
        offload("storage pool", move || manager.vol_list_blocking(&pool)).await
    }

    async fn vol_info(&self, pool: Option<&str>, volume: &str) -> Result<VolumeInfo> {
        let (manager, pool, volume) = (self.clone(), pool.map(str::to_string), volume.to_string());
        offload("storage pool", move || manager.vol_info_blocking(pool.as_deref(), &volume)).await
    }

    async fn vol_xml(&self, pool: Option<&str>, volume: &str) -> Result<String> {
        let (manager, pool, volume) = (self.clone(), pool.map(str::to_string), volume.to_string());
        offload("storage pool", move || manager.vol_xml_blocking(pool.as_deref(), &volume)).await
    }

    async fn vol_create_xml(&self, pool: &str, xml: &str) -> Result<String> {
        let (manager, pool, xml) = (self.clone(), pool.to_string(), xml.to_string());
        offload("storage pool", move || manager.vol_create_xml_blocking(&pool, &xml)).await
    }

    async fn vol_delete(&self, pool: Option<&str>, volume: &str) -> Result<()> {
        let (manager, pool, volume) = (self.clone(), pool.map(str::to_string), volume.to_string());
        offload("storage pool", move || manager.vol_delete_blocking(pool.as_deref(), &volume)).await
    }

    async fn vol_resize(&self, pool: Option<&str>, volume: &str, bytes: u64, flags: VolumeResizeFlags) -> Result<u64> {
        let (manager, pool, volume, bytes, flags) =
            (self.clone(), pool.map(str::to_string), volume.to_string(), bytes, flags);
        offload("storage pool", move || manager.vol_resize_blocking(pool.as_deref(), &volume, bytes, flags)).await
    }

    async fn vol_clone(&self, pool: Option<&str>, volume: &str, new_name: &str) -> Result<()> {
        let (manager, pool, volume, new_name) =
            (self.clone(), pool.map(str::to_string), volume.to_string(), new_name.to_string());
        offload("storage pool", move || manager.vol_clone_blocking(pool.as_deref(), &volume, &new_name)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pool_call_waiting_for_the_pools_lock_leaves_the_runtime_free() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("store");
        let manager = PoolManager::new(store.clone());
        let held = store.lock_store_for("pools").expect("pools lock");
        let target = dir.path().join("images");
        let xml =
            format!("<pool type='dir'><name>images</name><target><path>{}</path></target></pool>", target.display());
        let define = tokio::spawn(async move { manager.pool_define_xml(&xml).await });
        // This current-thread runtime still runs this task while the define waits.
        tokio::task::yield_now().await;
        assert!(!define.is_finished(), "the pools lock is held, so the define must still wait");
        drop(held);
        assert_eq!(define.await.expect("join").expect("define once the lock is free"), "images");
    }
}
