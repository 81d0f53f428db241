//! A fixed number of database sessions shared by the portal's requests.
//!
//! Each request holds one session for its transaction and gives it back when done; a request that finds all
//! of them busy waits for one (the semaphore), so the portal never opens more than `portal.connections`.
//! Sessions are opened when first needed and dropped when their connection breaks, so the portal starts
//! without its database and recovers when it comes back. Small enough not to need a pool crate.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_postgres::Client;

use crate::conninfo::ConnInfo;
use crate::store::StoreError;

/// Longest a statement of the portal may run: a page that takes longer is failing anyway.
const STATEMENT_TIMEOUT: &str = "15s";

pub(super) struct Pool {
    db: ConnInfo,
    idle: Mutex<Vec<Client>>,
    permits: Arc<Semaphore>,
}

/// A session lent to one request; back to the pool when dropped, unless its connection broke.
pub(super) struct Conn<'a> {
    client: Option<Client>,
    pool: &'a Pool,
    _permit: OwnedSemaphorePermit,
}

impl Pool {
    pub(super) fn new(mut db: ConnInfo, size: usize) -> Pool {
        if db.get_application_name().is_none() {
            db.application_name("walhook portal");
        }
        Pool {
            db,
            idle: Mutex::new(Vec::new()),
            permits: Arc::new(Semaphore::new(size.max(1))),
        }
    }

    pub(super) async fn get(&self) -> Result<Conn<'_>, Unavailable> {
        let permit = tokio::time::timeout(WAIT, self.permits.clone().acquire_owned())
            .await
            .map_err(|_| Unavailable::Busy)?
            .expect("the semaphore is never closed");
        let idle = {
            let mut idle = self.idle.lock().expect("not poisoned");
            idle.retain(|c| !c.is_closed());
            idle.pop()
        };
        let client = match idle {
            Some(client) => client,
            None => {
                let client = crate::store::connect_client(&self.db)
                    .await
                    .map_err(Unavailable::Connect)?;
                client
                    .batch_execute(&format!(
                        "set statement_timeout = '{STATEMENT_TIMEOUT}'; \
                         set idle_in_transaction_session_timeout = '60s'"
                    ))
                    .await
                    .map_err(|e| Unavailable::Connect(e.into()))?;
                client
            }
        };
        Ok(Conn {
            client: Some(client),
            pool: self,
            _permit: permit,
        })
    }
}

/// Why a request got no session.
#[derive(Debug)]
pub(super) enum Unavailable {
    /// Every session stayed busy for [`WAIT`].
    Busy,
    Connect(StoreError),
}

/// Longest a request waits for a free session.
const WAIT: Duration = Duration::from_secs(30);

impl std::ops::Deref for Conn<'_> {
    type Target = Client;
    fn deref(&self) -> &Client {
        self.client.as_ref().expect("present until dropped")
    }
}

impl std::ops::DerefMut for Conn<'_> {
    fn deref_mut(&mut self) -> &mut Client {
        self.client.as_mut().expect("present until dropped")
    }
}

impl Drop for Conn<'_> {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            if !client.is_closed() {
                self.pool.idle.lock().expect("not poisoned").push(client);
            }
        }
    }
}
