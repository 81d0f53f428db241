//! The portal's SQL (migration 13): links minted by whom they may be, exchanged once for a session, sessions
//! that end; the portal's own role held by row-level security to the tenant it sets, and shut out of the
//! link and session tables; operator-only functions refused to a tenant's session; and `walhook.send_test`,
//! which reaches one endpoint and never fans out, with the daemon on both sources.

use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use walhook::receiver::Receiver;

use crate::support::*;

/// Log-in roles as the portal docs set them up: `portal` holds only walhook_portal, `webapp` only
/// walhook_tenant, `ops` only walhook_admin.
async fn roles(superuser: &Client) {
    superuser
        .batch_execute(
            "create role portal login in role walhook_portal;
             create role webapp login in role walhook_tenant;
             create role ops login in role walhook_admin;",
        )
        .await
        .unwrap();
}

async fn endpoint(client: &Client, url: &str, tenant: Option<&str>, patterns: &[&str]) -> i64 {
    let patterns: Vec<String> = patterns.iter().map(|s| s.to_string()).collect();
    client
        .query_one(
            "insert into walhook.endpoints (url, event_types, tenant) values ($1, $2, $3) returning id",
            &[&url, &patterns, &tenant],
        )
        .await
        .unwrap()
        .get(0)
}

/// `(path, token)` of a new link minted by `client`.
async fn mint(client: &Client, tenant: Option<&str>, operator: bool) -> (String, String) {
    let row = client
        .query_one(
            "select path, token from walhook.portal_link($1, interval '1 hour', $2)",
            &[&tenant, &operator],
        )
        .await
        .unwrap_or_else(|e| panic!("mint {tenant:?}: {e:?}"));
    (row.get(0), row.get(1))
}

/// The session's `(session, tenant, operator, csrf)`, or `None` when the link does not open one.
async fn exchange(portal: &Client, token: &str) -> Option<(String, Option<String>, bool, String)> {
    portal
        .query_opt(
            "select session, tenant, operator, csrf from walhook.portal_exchange($1)",
            &[&token],
        )
        .await
        .unwrap()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
}

async fn db_error(client: &Client, sql: &str) -> tokio_postgres::error::DbError {
    client
        .batch_execute(sql)
        .await
        .expect_err(sql)
        .as_db_error()
        .unwrap_or_else(|| panic!("{sql}: not a server error"))
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn links_are_minted_by_whom_they_may_be_and_open_one_session_once() {
    let pg = Pg::start().await;
    let superuser = pg.client().await;
    roles(&superuser).await;
    let ops = pg.client_as("ops").await;
    let webapp = pg.client_as("webapp").await;
    let portal = pg.client_as("portal").await;

    // an operator mints for any tenant, and operator links
    let (path, token) = mint(&ops, Some("acme"), false).await;
    assert_eq!(path, format!("/login?token={token}"));
    assert!(token.len() == 64 && token.bytes().all(|b| b.is_ascii_hexdigit()));
    let (_, operator_token) = mint(&ops, None, true).await;
    // a tenant's session mints for its own tenant only, and no operator link
    webapp
        .batch_execute("set walhook.tenant = 'acme'")
        .await
        .unwrap();
    let (_, webapp_token) = mint(&webapp, Some("acme"), false).await;
    for (sql, code, words) in [
        (
            "select walhook.portal_link('globex')",
            SqlState::INSUFFICIENT_PRIVILEGE,
            "own tenant only",
        ),
        (
            "select walhook.portal_link(null, operator => true)",
            SqlState::INSUFFICIENT_PRIVILEGE,
            "only walhook_admin",
        ),
        (
            "select walhook.portal_link('acme', interval '30 seconds')",
            SqlState::INVALID_PARAMETER_VALUE,
            "between 1 minute and 7 days",
        ),
        (
            "select walhook.portal_link(null)",
            SqlState::INVALID_PARAMETER_VALUE,
            "needs a tenant",
        ),
    ] {
        let e = db_error(&webapp, sql).await;
        assert_eq!(e.code(), &code, "{sql}: {e:?}");
        assert!(e.message().contains(words), "{sql}: {}", e.message());
    }
    let e = db_error(&ops, "select walhook.portal_link('acme', operator => true)").await;
    assert!(e.message().contains("tenant => NULL"), "{}", e.message());
    // the application's own role has no business with links
    let writer = {
        superuser
            .batch_execute("create role app login in role walhook_writer")
            .await
            .unwrap();
        pg.client_as("app").await
    };
    let e = db_error(&writer, "select walhook.portal_link('acme')").await;
    assert_eq!(e.code(), &SqlState::INSUFFICIENT_PRIVILEGE);

    // once: the second exchange of the same link opens nothing
    let (session, tenant, operator, csrf) = exchange(&portal, &token).await.expect("a session");
    assert_eq!((tenant.as_deref(), operator), (Some("acme"), false));
    assert!(session.len() == 64 && csrf.len() == 64 && session != csrf);
    assert!(exchange(&portal, &token).await.is_none(), "used twice");
    // tampered, malformed, unknown: nothing, the same way
    let mut tampered = webapp_token.clone().into_bytes();
    tampered[10] = if tampered[10] == b'0' { b'1' } else { b'0' };
    for bad in [
        String::from_utf8(tampered).unwrap(),
        webapp_token.to_uppercase(),
        format!("{webapp_token}0"),
        String::new(),
        "' or true --".into(),
    ] {
        assert!(exchange(&portal, &bad).await.is_none(), "{bad:?}");
    }
    // expired: nothing
    superuser
        .batch_execute(&format!(
            "update walhook.portal_links set expires_at = now() - interval '1 second'
              where token_hash = sha256(convert_to('{webapp_token}', 'UTF8'))"
        ))
        .await
        .unwrap();
    assert!(exchange(&portal, &webapp_token).await.is_none(), "expired");
    // the operator's link opens an operator session
    let (_, tenant, operator, _) = exchange(&portal, &operator_token).await.unwrap();
    assert_eq!((tenant, operator), (None, true));

    // the session is live until logout or expiry
    let live = |s: String| {
        let portal = &portal;
        async move {
            portal
                .query_opt("select tenant, csrf from walhook.portal_session($1)", &[&s])
                .await
                .unwrap()
                .map(|r| (r.get::<_, Option<String>>(0), r.get::<_, String>(1)))
        }
    };
    assert_eq!(
        live(session.clone()).await,
        Some((Some("acme".into()), csrf))
    );
    assert_eq!(live(token.clone()).await, None, "a link is not a session");
    portal
        .execute("select walhook.portal_logout($1)", &[&session])
        .await
        .unwrap();
    assert_eq!(live(session).await, None);
    let (_, token) = mint(&ops, Some("acme"), false).await;
    let (session, ..) = exchange(&portal, &token).await.unwrap();
    superuser
        .batch_execute("update walhook.portal_sessions set expires_at = now()")
        .await
        .unwrap();
    assert_eq!(live(session).await, None, "expired session");

    // only hashes are stored; no one but the owner reads them
    assert_eq!(
        count(
            &superuser,
            &format!("select count(*) from walhook.portal_links where token_hash = sha256(convert_to('{token}', 'UTF8'))"),
        )
        .await,
        1
    );
    for role in [&portal, &webapp, &ops] {
        for table in ["walhook.portal_links", "walhook.portal_sessions"] {
            let e = db_error(role, &format!("select * from {table}")).await;
            assert_eq!(e.code(), &SqlState::INSUFFICIENT_PRIVILEGE, "{table}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portals_role_sees_the_tenant_it_sets_and_operator_functions_need_an_operator_session()
{
    let pg = Pg::start().await;
    let superuser = pg.client().await;
    roles(&superuser).await;
    let acme = endpoint(&superuser, "http://127.0.0.1:9/acme", Some("acme"), &["*"]).await;
    let globex = endpoint(
        &superuser,
        "http://127.0.0.1:9/globex",
        Some("globex"),
        &["*"],
    )
    .await;
    let ops = pg.client_as("ops").await;
    let mut portal = pg.client_as("portal").await;

    // a request's transaction, as the portal runs it
    let tx = portal.transaction().await.unwrap();
    tx.execute("select set_config('walhook.tenant', 'acme', true)", &[])
        .await
        .unwrap();
    let ids: Vec<i64> = tx
        .query("select id from walhook.endpoints order by id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, vec![acme]);
    assert_eq!(
        tx.execute(
            "update walhook.endpoints set description = 'x' where id = $1",
            &[&globex]
        )
        .await
        .unwrap(),
        0
    );
    tx.commit().await.unwrap();
    // after the transaction, no tenant: nothing
    assert_eq!(
        count(&portal, "select count(*) from walhook.endpoints").await,
        0
    );

    // a tenant session may not use the operator's functions
    let (_, token) = mint(&ops, Some("acme"), false).await;
    let (tenant_session, ..) = exchange(&portal, &token).await.unwrap();
    for f in ["walhook.portal_overview", "walhook.portal_slots"] {
        let e = db_error(&portal, &format!("select * from {f}('{tenant_session}')")).await;
        assert_eq!(e.code(), &SqlState::INSUFFICIENT_PRIVILEGE, "{f}");
    }
    let e = db_error(
        &portal,
        &format!("select walhook.portal_view('{tenant_session}', 'globex')"),
    )
    .await;
    assert_eq!(e.code(), &SqlState::INSUFFICIENT_PRIVILEGE);
    // an operator session sees every tenant's endpoints with their health, and picks one to look at
    let (_, token) = mint(&ops, None, true).await;
    let (operator_session, ..) = exchange(&portal, &token).await.unwrap();
    let rows = portal
        .query(
            "select tenant, endpoint_id, breaker, pending from walhook.portal_overview($1)",
            &[&operator_session],
        )
        .await
        .unwrap();
    let seen: Vec<(Option<String>, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(
        seen,
        vec![(Some("acme".into()), acme), (Some("globex".into()), globex)]
    );
    portal
        .query(
            "select * from walhook.portal_slots($1)",
            &[&operator_session],
        )
        .await
        .unwrap();
    portal
        .execute(
            "select walhook.portal_view($1, 'globex')",
            &[&operator_session],
        )
        .await
        .unwrap();
    let viewing: Option<String> = portal
        .query_one(
            "select viewing from walhook.portal_session($1)",
            &[&operator_session],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(viewing.as_deref(), Some("globex"));
    // the functions that make links and sessions are not the tenant's or the operator's to call
    for (client, f) in [
        (
            &pg.client_as("webapp").await,
            "walhook.portal_exchange('00')",
        ),
        (&ops, "walhook.portal_session('00')"),
        (&ops, "walhook.portal_overview('00')"),
    ] {
        let e = db_error(client, &format!("select * from {f}")).await;
        assert_eq!(e.code(), &SqlState::INSUFFICIENT_PRIVILEGE, "{f}");
    }
}

both_sources!(a_test_event_reaches_its_endpoint_only);
async fn a_test_event_reaches_its_endpoint_only(source: Source) {
    let pg = Pg::start_for(source).await;
    let superuser = pg.client().await;
    roles(&superuser).await;
    let rx = Receiver::start().await.unwrap();
    let target = endpoint(&superuser, &rx.url("/target"), Some("acme"), &["order.*"]).await;
    let secret: String = superuser
        .query_one(
            "select secret from walhook.endpoints where id = $1",
            &[&target],
        )
        .await
        .unwrap()
        .get(0);
    rx.set_secret("/target", &secret);
    rx.set_record_bodies(true);
    endpoint(&superuser, &rx.url("/all"), Some("acme"), &["*"]).await;
    endpoint(&superuser, &rx.url("/ops"), None, &["walhook.*"]).await;
    superuser
        .execute(
            "update walhook.endpoints set all_tenants = true where url = $1",
            &[&rx.url("/ops")],
        )
        .await
        .unwrap();
    let other = endpoint(&superuser, &rx.url("/globex"), Some("globex"), &["*"]).await;
    let disabled = endpoint(&superuser, &rx.url("/off"), Some("acme"), &["*"]).await;
    superuser
        .execute(
            "update walhook.endpoints set enabled = false where id = $1",
            &[&disabled],
        )
        .await
        .unwrap();
    let daemon = Daemon::start(pg.config_for(source));
    wait_ready(source, &superuser).await;

    let webapp = pg.client_as("webapp").await;
    webapp
        .batch_execute("set walhook.tenant = 'acme'")
        .await
        .unwrap();
    // another tenant's endpoint does not exist for this session; a disabled one says so
    let e = db_error(&webapp, &format!("select walhook.send_test({other})")).await;
    assert_eq!(e.code(), &SqlState::NO_DATA_FOUND);
    assert_eq!(e.message(), format!("no endpoint {other}"));
    let e = db_error(&webapp, &format!("select walhook.send_test({disabled})")).await;
    assert!(
        e.message().contains("is disabled: enable it first"),
        "{}",
        e.message()
    );
    let delivery: i64 = webapp
        .query_one("select walhook.send_test($1)", &[&target])
        .await
        .unwrap()
        .get(0);
    eventually("the test delivery succeeds", || async {
        count(
            &webapp,
            &format!("select count(*) from walhook.deliveries where id = {delivery} and status = 'succeeded'"),
        )
        .await
            == 1
    })
    .await;
    let got = rx.received();
    let test = got.iter().find(|r| r.path == "/target").expect("received");
    assert_eq!(test.verified, Some(true), "signed like any delivery");
    let body: serde_json::Value = serde_json::from_slice(&test.body).unwrap();
    assert_eq!(body["type"], "walhook.test", "{body}");
    assert_eq!(body["data"]["endpoint_id"], target, "{body}");
    // recorded like any attempt, visible to the tenant
    assert_eq!(
        count(
            &webapp,
            &format!("select count(*) from walhook.attempts where delivery_id = {delivery} and status_code = 200"),
        )
        .await,
        1
    );
    // never fanned out: a marker published after it reaches '*', and neither '*' nor the operator's
    // 'walhook.*' firehose got the test
    superuser
        .execute(
            "insert into walhook.outbox (event_type, payload, tenant) values ('order.created', '{}', 'acme')",
            &[],
        )
        .await
        .unwrap();
    eventually("the marker arrives", || async {
        rx.received().iter().any(|r| r.path == "/all")
    })
    .await;
    if source == Source::Notify {
        wait_all_processed(&superuser).await;
    }
    let tests: Vec<String> = rx
        .received()
        .into_iter()
        .filter(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["type"] == "walhook.test"
        })
        .map(|r| r.path)
        .collect();
    assert_eq!(tests, vec!["/target".to_string()]);
    assert_eq!(
        count(
            &superuser,
            "select count(*) from walhook.deliveries where event_type = 'walhook.test' or event_id in
               (select id from walhook.outbox where event_type = 'walhook.test')",
        )
        .await,
        1
    );
    daemon.stop().await;
}

/// The ```sql blocks of docs/portal.md, in order.
fn doc_sql_blocks() -> Vec<String> {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/portal.md")).unwrap();
    doc.split("```sql\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap().to_string())
        .collect()
}

/// docs/portal.md as written: the portal's role, a link minted by a tenant's page, an operator's link, a
/// test event, each by the role the page says.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portal_docs_sql_runs_as_written() {
    let pg = Pg::start().await;
    let superuser = pg.client().await;
    let blocks = doc_sql_blocks();
    let [mint_block, role_block, test_block] = &blocks[..] else {
        panic!(
            "docs/portal.md: expected 3 sql blocks, found {}",
            blocks.len()
        );
    };
    superuser.batch_execute(role_block).await.unwrap();
    superuser
        .batch_execute(
            "create role webapp login in role walhook_tenant; create role ops login in role walhook_admin;
             insert into walhook.endpoints (url, tenant) values ('https://acme.example/hooks', 'acme');",
        )
        .await
        .unwrap();
    let webapp = pg.client_as("webapp").await;
    let rows = webapp.simple_query(mint_block).await.unwrap();
    let path = rows
        .iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .expect("a link");
    let token = path.strip_prefix("/login?token=").expect(&path);
    // the portal's role, as the page creates it, opens the link once
    let portal = pg.client_as("portal").await;
    assert_eq!(
        exchange(&portal, token).await.map(|s| s.1),
        Some(Some("acme".to_string()))
    );
    assert!(exchange(&portal, token).await.is_none());
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/portal.md")).unwrap();
    let operator =
        "SELECT path FROM walhook.portal_link(NULL, interval '1 hour', operator => true)";
    assert!(doc.contains(operator));
    let ops = pg.client_as("ops").await;
    let path: String = ops.query_one(operator, &[]).await.unwrap().get(0);
    let (_, tenant, is_operator, _) =
        exchange(&portal, path.strip_prefix("/login?token=").unwrap())
            .await
            .unwrap();
    assert_eq!((tenant, is_operator), (None, true));
    // the test event: queued for that endpoint (no daemon runs here: nothing is sent)
    webapp.batch_execute(test_block).await.unwrap();
    assert_eq!(
        count(
            &superuser,
            "select count(*) from walhook.deliveries d join walhook.endpoints e on e.id = d.endpoint_id
              where e.url = 'https://acme.example/hooks' and d.status = 'pending' and d.event_type = 'walhook.test'",
        )
        .await,
        1
    );
}
