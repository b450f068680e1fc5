//! Block-job events of running containers: a `block-job` event for each
//! QMP event of a job Strata started in the storage daemon serving the
//! container's qcow2 filesystem, as a QEMU domain's come from its QEMU.

use std::collections::HashMap;
use std::sync::Arc;

use strata_core::driver::DomainEvent;
use strata_core::store::Store;
use strata_qemu_block::jobs::block_job_event;
use strata_qemu_block::monitor::{acquire, Monitor};
use strata_qemu_block::runtime::RuntimePaths;
use strata_qmp::QmpEvent;
use tokio::sync::broadcast::{self, error::TryRecvError};

use crate::status;

/// A subscription to a storage daemon's events, with the monitor it came
/// through (held while subscribed).
type Subscription = (Arc<Monitor>, broadcast::Receiver<QmpEvent>);

/// Subscriptions to the events of the storage daemons serving watched
/// containers, by domain.
#[derive(Default)]
pub struct JobEvents {
    subscribed: tokio::sync::Mutex<HashMap<String, Subscription>>,
}

impl JobEvents {
    /// Subscribes to the events of the daemon serving `domain`'s qcow2
    /// filesystem, unless subscribed already; a container that does not
    /// run, or has no such daemon, has no block-job events to watch.
    pub async fn watch(&self, store: &Store, domain: &str) {
        let mut subscribed = self.subscribed.lock().await;
        if subscribed.get(domain).is_some_and(|(monitor, _)| monitor.client.is_connected()) {
            return;
        }
        subscribed.remove(domain);
        let Ok(Some(status)) = status::running(store, domain) else { return };
        let [served] = status.served.as_slice() else { return };
        match acquire(&RuntimePaths { dir: served.dir.clone() }, domain).await {
            Ok(monitor) => {
                let events = monitor.client.subscribe_events();
                subscribed.insert(domain.to_string(), (Arc::new(monitor), events));
            }
            Err(e) => tracing::warn!(domain, error = %e, "no block-job events: the storage daemon's monitor"),
        }
    }

    /// The next block-job event the daemon serving `domain` sent since
    /// the last look, if any.
    pub async fn next(&self, domain: &str) -> Option<DomainEvent> {
        let mut subscribed = self.subscribed.lock().await;
        let (_, events) = subscribed.get_mut(domain)?;
        loop {
            match events.try_recv() {
                Ok(ev) => {
                    if let Some(event) = block_job_event(domain, &ev) {
                        return Some(event);
                    }
                }
                Err(TryRecvError::Lagged(_)) => {}
                Err(TryRecvError::Empty) => return None,
                Err(TryRecvError::Closed) => {
                    subscribed.remove(domain);
                    return None;
                }
            }
        }
    }
}
