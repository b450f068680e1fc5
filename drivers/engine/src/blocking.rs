//! Blocking work called from async driver code: `flock` waits and
//! `qemu-img` runs go to tokio's blocking pool, so the runtime keeps
//! serving monitors, events and timeouts while they wait.

use strata_core::store::{DomainLock, Store};
use strata_core::{Error, Result};

/// Runs `work` on the blocking pool and returns what it returned.
pub async fn blocking<T: Send + 'static>(work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| Error::internal(format!("a blocking task ended abnormally: {e}")))?
}

/// Runs `work` on a thread of its own and returns what it returned: for
/// work on the critical path (a sync a hypervisor's next command waits
/// for), which must not queue behind other work the blocking pool was
/// given at the same moment (the pool can hand two tasks spawned together
/// to one thread, one after the other).
pub async fn on_own_thread<T: Send + 'static>(work: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    let (done, outcome) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("strata-sync".into())
        .spawn(move || {
            // The receiver is gone only if the caller was dropped.
            let _ = done.send(work());
        })
        .map_err(|e| Error::internal(format!("cannot start a thread: {e}")))?;
    outcome.await.map_err(|_| Error::internal("a thread ended without its result"))?
}

/// [`Store::lock_domain`], waiting off the runtime.
pub async fn lock_domain(store: &Store, name: &str) -> Result<DomainLock> {
    lock_domain_for(store, name, "domain").await
}

/// [`Store::lock_domain_operation`], waiting off the runtime.
pub async fn lock_domain_operation(store: &Store, name: &str) -> Result<DomainLock> {
    lock_domain_for(store, name, "operation").await
}

/// [`Store::lock_domain_for`], waiting off the runtime. A free lock is
/// taken right here: only a wait goes to the blocking pool (a thread
/// started and woken costs about 0.1 ms, twice per snapshot).
pub async fn lock_domain_for(store: &Store, name: &str, purpose: &str) -> Result<DomainLock> {
    if let Some(lock) = store.try_lock_domain_for(name, purpose)? {
        return Ok(lock);
    }
    let (store, name, purpose) = (store.clone(), name.to_string(), purpose.to_string());
    blocking(move || store.lock_domain_for(&name, &purpose)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lock_wait_leaves_the_runtime_free() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("store");
        store.write_domain("vm", "<domain><name>vm</name></domain>").expect("define");
        let held = store.lock_domain("vm").expect("first lock");
        let waiter = tokio::spawn({
            let store = store.clone();
            async move { lock_domain(&store, "vm").await.map(|_| ()) }
        });
        // The current-thread runtime still runs this task while the waiter blocks.
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "the lock is held, so the waiter must still wait");
        drop(held);
        waiter.await.expect("join").expect("second lock once the first is gone");
    }
}
