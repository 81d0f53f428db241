//! `walhook portal`: the pages where an application's customers manage their own webhooks.
//!
//! A thin client of the SQL contract (migration 13 and the tenants' row-level security): each request opens a
//! transaction on a connection of the portal's own role, finds its session with `walhook.portal_session`,
//! sets `walhook.tenant` for that transaction only, and runs the page's statements. PostgreSQL decides what
//! the session sees, so this code never filters by tenant; an id of another tenant's row simply finds nothing
//! (404). That is also why the portal refuses to start as a role that would step over row-level security
//! ([`check_role`]).
//!
//! The parts, in the order a request meets them: [`server`] (connections, limits, the session's transaction,
//! security headers), [`auth`] (the session cookie, CSRF and origin checks), [`form`] (bounded form and query
//! parsing), [`routes`] (the pages and actions), [`queries`] (every statement the pages run) and [`pages`]
//! (server-rendered HTML, everything escaped, styled by the embedded `static/portal.css`; `static/portal.js`
//! only adds niceties); [`pool`] lends each request one of a fixed number of database sessions.

mod auth;
mod form;
mod pages;
mod pool;
mod queries;
mod routes;
mod server;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigError};
use crate::conninfo::ConnInfo;
use crate::dispatch::guard::{Cidr, NetworkPolicy};

pub use server::Settings;

/// Why the portal cannot start (or stopped).
#[derive(Debug, thiserror::Error)]
pub enum PortalError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    /// A statement failed: PostgreSQL's words and, when known, the fix.
    #[error("{0}")]
    Db(String),
    /// The role it connects as would step over row-level security, or lacks walhook_portal.
    #[error("{0}")]
    Role(String),
    #[error("cannot listen on portal.listen {addr}: {error}; free the port or choose another portal.listen")]
    Listen {
        addr: std::net::SocketAddr,
        error: std::io::Error,
    },
}

/// The portal's settings from the configuration: what [`serve`] needs besides the listener.
pub fn settings(config: &Config) -> Result<Settings, PortalError> {
    let allowed = config
        .delivery
        .allowed_networks
        .iter()
        .map(|s| {
            s.parse::<Cidr>().map_err(|e| ConfigError::InvalidValue {
                key: "delivery.allowed_networks".into(),
                message: format!("{s:?}: {e}"),
                origin: None,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let policy = NetworkPolicy {
        allow_private: config.delivery.allow_private_networks,
        allowed,
    };
    Ok(Settings::new(&config.portal, policy))
}

/// `walhook portal`: checks the role, binds `portal.listen` and serves until `stop` fires.
pub async fn run(config: &Config, stop: CancellationToken) -> Result<(), PortalError> {
    let settings = settings(config)?;
    for warning in settings.warnings() {
        tracing::warn!("{warning}");
    }
    let db = config.portal_database_url()?;
    check_role(&db).await?;
    let addr = config.portal.listen;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|error| PortalError::Listen { addr, error })?;
    tracing::info!(
        "portal listening on {addr}, public URL {}",
        config.portal.public_url()
    );
    serve(listener, settings, db, config.portal.connections, stop).await;
    Ok(())
}

/// Serves the portal on `listener` with at most `connections` database sessions until `stop` fires; requests
/// in progress then finish (for up to 10 seconds).
pub async fn serve(
    listener: TcpListener,
    settings: Settings,
    db: ConnInfo,
    connections: usize,
    stop: CancellationToken,
) {
    let portal = Arc::new(server::Portal::new(
        settings,
        pool::Pool::new(db, connections),
    ));
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("portal listener: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        tasks.spawn(server::connection(portal.clone(), stream, stop.clone()));
    }
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(10), tasks.wait()).await;
}

/// Refuses a role that row-level security would not hold to a request's tenant (a superuser, `BYPASSRLS`, the
/// owner of walhook's tables) or that holds more than a tenant's rights (a member of walhook's other roles),
/// and one without walhook_portal.
pub async fn check_role(db: &ConnInfo) -> Result<(), PortalError> {
    let client = crate::store::connect_client(db).await?;
    let row = client
        .query_one(queries::ROLE_CHECK, &[])
        .await
        .map_err(crate::store::StoreError::from)?;
    let user: String = row.get("usr");
    let superuser: bool = row.get("superuser");
    let bypass: bool = row.get("bypassrls");
    let owns: Vec<String> = row.get("owns");
    let member_of: Vec<String> = row.get("member_of");
    let portal: bool = row.get("portal");
    let migrated: bool = row.get("migrated");
    let fix = format!(
        "connect the portal as a role that holds walhook_portal and nothing else (as a superuser: CREATE ROLE \
         portal LOGIN PASSWORD '…' IN ROLE walhook_portal; see docs/portal.md) and set portal.database_url \
         (WALHOOK_PORTAL__DATABASE_URL) to it; {user:?} would step over row-level security"
    );
    let problem = if superuser {
        Some(format!("role {user:?} is a superuser"))
    } else if bypass {
        Some(format!("role {user:?} has BYPASSRLS"))
    } else if !owns.is_empty() {
        Some(format!(
            "role {user:?} owns walhook's tables ({})",
            owns.join(", ")
        ))
    } else if !member_of.is_empty() {
        Some(format!(
            "role {user:?} is a member of {}",
            member_of.join(", ")
        ))
    } else {
        None
    };
    if let Some(problem) = problem {
        return Err(PortalError::Role(format!(
            "the portal refuses to start: {problem}; {fix}"
        )));
    }
    if !migrated {
        return Err(PortalError::Role(
            "the walhook schema lacks the portal's functions (migration 13): run `walhook migrate` first"
                .into(),
        ));
    }
    if !portal {
        return Err(PortalError::Role(format!(
            "the portal refuses to start: role {user:?} is not a member of walhook_portal; as a superuser run \
             GRANT walhook_portal TO {user} (docs/portal.md)"
        )));
    }
    Ok(())
}

/// `walhook portal-link`: mints a link with the configuration's `database_url` (a walhook_admin role, or a
/// walhook_tenant role for its own tenant) and returns it on `portal.public_url`.
pub async fn mint_link(
    config: &Config,
    tenant: Option<&str>,
    ttl: Duration,
    operator: bool,
) -> Result<String, PortalError> {
    let db = config.database_url()?;
    let mut client = crate::store::connect_client(&db).await?;
    let tx = client.transaction().await.map_err(minting)?;
    // a walhook_tenant role mints for the tenant its transaction is set to
    tx.execute(queries::MINT_SCOPE, &[&tenant])
        .await
        .map_err(minting)?;
    let row = tx
        .query_one(
            queries::MINT_LINK,
            &[&tenant, &format!("{} seconds", ttl.as_secs()), &operator],
        )
        .await
        .map_err(minting)?;
    tx.commit().await.map_err(minting)?;
    let path: String = row.get(0);
    Ok(format!("{}{path}", config.portal.public_url()))
}

/// A failure to mint a link: the server's message (its hint says which role may) and the fix.
fn minting(e: tokio_postgres::Error) -> PortalError {
    let facts = crate::pgerror::facts(&e);
    PortalError::Db(match e.code() {
        Some(code) if *code == tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE => format!(
            "cannot mint a portal link: {facts}; run `walhook portal-link` with a database_url whose role is a \
             member of walhook_admin (or of walhook_tenant, for its own tenant)"
        ),
        _ => format!("cannot mint a portal link: {facts}"),
    })
}
