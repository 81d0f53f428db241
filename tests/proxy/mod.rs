//! Egress proxy: deliveries through a `CONNECT` tunnel (https) and absolute-form requests (http) with
//! credentials, per-endpoint bypass and override, proxy failures recorded and retried without showing the
//! password, the network guard on what walhook itself resolves, and the README's section run as written.
//!
//! The proxy is the loopback one of `support::proxy`, which refuses every destination but loopback. Tests
//! that show a refusal use loopback targets while private networks are refused; the guard's verdict on a
//! private IP-literal endpoint host is a unit test of the pure classifier (`dispatch::proxy`).

use std::sync::atomic::Ordering;

use figment::providers::{Format, Toml};
use walhook::config::Config;
use walhook::dispatch::proxy::EndpointProxy;
use walhook::receiver::Receiver;

use crate::support::proxy::{basic, TestProxy};
use crate::support::tls::TlsReceiver;
use crate::support::*;

/// A port on loopback that nothing listens on (bound, then released).
async fn closed_port() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap().port()
}

async fn set_proxy(client: &tokio_postgres::Client, endpoint: i64, proxy: &str) {
    client
        .execute(
            "update walhook.endpoints set proxy = $2 where id = $1",
            &[&endpoint, &proxy],
        )
        .await
        .expect("set the endpoint's proxy");
}

/// Attempts of `endpoint` whose error contains every one of `needles`.
async fn attempts_with(client: &tokio_postgres::Client, endpoint: i64, needles: &[&str]) -> i64 {
    let pattern = format!("%{}%", needles.join("%"));
    client
        .query_one(
            "select count(*) from walhook.attempts a join walhook.deliveries d on d.id = a.delivery_id
              where d.endpoint_id = $1 and a.error like $2",
            &[&endpoint, &pattern],
        )
        .await
        .unwrap()
        .get(0)
}

/// Every error text walhook recorded: attempts, deliveries, endpoint health.
async fn recorded_errors(client: &tokio_postgres::Client) -> Vec<String> {
    client
        .query(
            "select error from walhook.attempts where error is not null
             union all select last_error from walhook.deliveries where last_error is not null
             union all select last_error from walhook.endpoint_health where last_error is not null",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

both_sources!(deliveries_go_through_the_proxy_with_its_credentials);
/// An https endpoint is reached through a CONNECT tunnel (its certificate verified for `localhost` against
/// the test CA inside it), an http endpoint through absolute-form requests; both carry the proxy's
/// credentials, which never reach the receiver. Loopback is refused for direct deliveries, so nothing could
/// have gone around the proxy.
async fn deliveries_go_through_the_proxy_with_its_credentials(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let tls = TlsReceiver::start().await;
    let rx = Receiver::start().await.unwrap();
    let proxy = TestProxy::start(Some(("walhook", "s3cret"))).await;
    add_endpoint(&client, &tls.url("localhost", "/tunnelled"), &["*"]).await;
    let plain = format!("http://localhost:{}/forwarded?q=1", rx.port());
    add_endpoint(&client, &plain, &["*"]).await;
    let ca_file = tls.ca_file.display().to_string();
    let daemon = Daemon::start(pg.config_for_with(source, |f| {
        f.merge(("delivery.allow_private_networks", false))
            .merge(("delivery.ca_file", ca_file.as_str()))
            .merge(("delivery.proxy", proxy.url(Some(("walhook", "s3cret")))))
    }));
    wait_ready(source, &client).await;
    publish(&client, "order.created", "{}").await;
    wait_succeeded(&client, 2).await;
    publish(&client, "order.paid", "{}").await;
    wait_succeeded(&client, 4).await;
    daemon.stop().await;

    assert_eq!(tls.requests.load(Ordering::SeqCst), 2);
    let credentials = Some(basic("walhook", "s3cret"));
    let seen = proxy.seen();
    let tunnel = format!("localhost:{}", tls.port);
    assert!(
        seen.iter()
            .any(|s| s.method == "CONNECT" && s.target == tunnel),
        "{seen:?}"
    );
    assert_eq!(
        seen.iter().filter(|s| s.method == "POST").count(),
        2,
        "{seen:?}"
    );
    for s in &seen {
        assert_eq!(s.authorization, credentials, "{s:?}");
        assert_eq!(s.answered, 200, "{s:?}");
        if s.method == "POST" {
            assert_eq!(s.target, plain, "absolute-form, as the endpoint's URL");
        }
    }
    let received = rx.received();
    assert_eq!(received.len(), 2);
    for r in &received {
        assert_eq!(r.path, "/forwarded");
        assert!(r.headers.get("proxy-authorization").is_none());
        assert_eq!(
            r.headers.get("host").and_then(|h| h.to_str().ok()),
            Some(format!("localhost:{}", rx.port()).as_str())
        );
        assert!(!r.signature.is_empty());
    }
}

both_sources!(proxy_failures_are_recorded_on_the_attempt_and_retried);
/// A proxy that is down, a wrong password (407 to CONNECT and to an absolute-form request) and a refused
/// tunnel each fail the attempt with a message that says so, and the delivery is retried like after a
/// connection error; once the proxy lets it through it is delivered. The password is in no recorded error
/// and not in `walhook status`.
async fn proxy_failures_are_recorded_on_the_attempt_and_retried(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let tls = TlsReceiver::start().await;
    let rx = Receiver::start().await.unwrap();
    let proxy = TestProxy::start(Some(("walhook", "s3cret"))).await;
    let (https, _) = add_endpoint(&client, &tls.url("localhost", "/tls"), &["*"]).await;
    let http_url = format!("http://localhost:{}/plain", rx.port());
    let (http, _) = add_endpoint(&client, &http_url, &["*"]).await;
    let ca_file = tls.ca_file.display().to_string();
    let config = |proxy_url: String| {
        pg.config_for_with(source, |f| {
            f.merge(("delivery.allow_private_networks", false))
                .merge(("delivery.ca_file", ca_file.as_str()))
                .merge(("delivery.retry_schedule", vec!["1s"; 40]))
                .merge(("delivery.proxy", proxy_url))
        })
    };

    // the proxy is down
    let down = closed_port().await;
    let daemon = Daemon::start(config(format!("http://walhook:s3cret@127.0.0.1:{down}")));
    wait_ready(source, &client).await;
    publish(&client, "order.created", "{}").await;
    let unreachable = format!("could not connect to the proxy 127.0.0.1:{down} (delivery.proxy)");
    eventually(
        "attempts fail and are retried while the proxy is down",
        || async {
            attempts_with(&client, https, &[&unreachable]).await >= 2
                && attempts_with(&client, http, &[&unreachable]).await >= 2
        },
    )
    .await;
    daemon.stop().await;

    // a wrong password: 407 to CONNECT, and to the absolute-form request
    let daemon = Daemon::start(config(proxy.url(Some(("walhook", "wr0ng")))));
    let from = format!(
        "407 Proxy Authentication Required from the proxy 127.0.0.1:{} (delivery.proxy)",
        proxy.port
    );
    let check = "; check the user name and password in the proxy URL";
    let tunnel = format!("{from} for the tunnel to localhost:{}{check}", tls.port);
    let request = format!("{from} for the request to localhost:{}{check}", rx.port());
    eventually(
        "a wrong password fails attempts, which are retried",
        || async {
            attempts_with(&client, https, &[&tunnel]).await >= 2
                && attempts_with(&client, http, &[&request]).await >= 2
        },
    )
    .await;
    assert_eq!(
        count(
            &client,
            "select count(*) from walhook.deliveries where status = 'pending'"
        )
        .await,
        2,
        "still retried"
    );
    // the failures are counted like connection errors, never as the endpoint's answer
    assert_eq!(
        count(
            &client,
            "select count(*) from walhook.attempts where status_code is not null"
        )
        .await,
        0
    );
    let db = pg.url.parse().unwrap();
    let status = walhook::status::read_for(&db, &pg.config_for(source))
        .await
        .unwrap()
        .render();
    assert!(
        status.contains("407 Proxy Authentication Required from"),
        "{status}"
    );
    daemon.stop().await;

    // the right password, but the proxy refuses the tunnel; then it lets it through
    proxy.refuse(true);
    let daemon = Daemon::start(config(proxy.url(Some(("walhook", "s3cret")))));
    let refused = format!(
        "403 Forbidden from the proxy 127.0.0.1:{} (delivery.proxy) for the tunnel to localhost:{}",
        proxy.port, tls.port
    );
    eventually("a refused tunnel fails the attempt", || async {
        attempts_with(&client, https, &[&refused]).await >= 1
    })
    .await;
    proxy.refuse(false);
    wait_succeeded(&client, 2).await;
    daemon.stop().await;
    assert_eq!(tls.requests.load(Ordering::SeqCst), 1);
    assert_eq!(rx.count(), 1);

    for error in recorded_errors(&client).await {
        assert!(
            !error.contains("s3cret") && !error.contains("wr0ng"),
            "a proxy password was recorded: {error}"
        );
    }
    assert!(
        !status.contains("s3cret") && !status.contains("wr0ng"),
        "{status}"
    );
}

both_sources!(endpoints_go_direct_or_through_their_own_proxy);
/// `proxy = 'direct'` bypasses the configured proxy, a URL in the column overrides it (with its own
/// credentials), and `delivery.no_proxy` exempts matching hosts. All endpoints but the `no_proxy` one share
/// one authority, and each event goes out after the previous one is delivered, so pooled keep-alive
/// connections of every route are idle when the next request is made: none is reused across routes.
async fn endpoints_go_direct_or_through_their_own_proxy(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    let tls = TlsReceiver::start().await;
    let default = TestProxy::start(None).await;
    let own = TestProxy::start(Some(("eu", "p@ss"))).await;
    let on_rx = |path: &str| format!("http://localhost:{}{path}", rx.port());
    add_endpoint(&client, &on_rx("/default"), &["*"]).await;
    let (direct, _) = add_endpoint(&client, &on_rx("/direct"), &["*"]).await;
    set_proxy(&client, direct, "direct").await;
    let (mine, _) = add_endpoint(&client, &on_rx("/own"), &["*"]).await;
    // a percent-encoded '@' in the password: the proxy gets it decoded
    let own_url = format!("http://eu:p%40ss@127.0.0.1:{}", own.port);
    set_proxy(&client, mine, &own_url).await;
    let (mine_tls, _) = add_endpoint(&client, &tls.url("localhost", "/own-tls"), &["*"]).await;
    set_proxy(&client, mine_tls, &own_url).await;
    add_endpoint(
        &client,
        &format!("http://127.0.0.1:{}/no-proxy", rx.port()),
        &["*"],
    )
    .await;
    let ca_file = tls.ca_file.display().to_string();
    let daemon = Daemon::start(pg.config_for_with(source, |f| {
        // the endpoint's own proxy and the direct deliveries are vetted: loopback must be allowed for them
        f.merge(("delivery.allow_private_networks", false))
            .merge(("delivery.allowed_networks", vec!["127.0.0.0/8"]))
            .merge(("delivery.ca_file", ca_file.as_str()))
            .merge(("delivery.proxy", default.url(None)))
            .merge(("delivery.no_proxy", "127.0.0.1, internal.example"))
    }));
    wait_ready(source, &client).await;
    for n in 1..=3 {
        publish(&client, "order.created", "{}").await;
        wait_succeeded(&client, 5 * n).await;
    }
    daemon.stop().await;

    let at = |path: &str| rx.received().iter().filter(|r| r.path == path).count();
    for path in ["/default", "/direct", "/own", "/no-proxy"] {
        assert_eq!(at(path), 3, "{path}");
    }
    assert_eq!(tls.requests.load(Ordering::SeqCst), 3);
    let seen = default.seen();
    assert_eq!(default.passed("/default"), 3, "{seen:?}");
    assert_eq!(
        seen.len(),
        3,
        "only /default went through the default proxy: {seen:?}"
    );
    let seen = own.seen();
    assert_eq!(own.passed("/own"), 3, "{seen:?}");
    assert!(
        seen.iter()
            .any(|s| s.method == "CONNECT" && s.target == format!("localhost:{}", tls.port)),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .all(|s| s.target.contains("/own") || s.target == format!("localhost:{}", tls.port)),
        "only the endpoints that name it went through the endpoint's proxy: {seen:?}"
    );
    let credentials = Some(basic("eu", "p@ss"));
    assert!(
        seen.iter().all(|s| s.authorization == credentials),
        "{seen:?}"
    );
    for r in rx.received() {
        assert!(r.headers.get("proxy-authorization").is_none(), "{}", r.path);
    }
}

both_sources!(the_guard_judges_what_walhook_resolves_itself_through_a_proxy);
/// Through the configured proxy, an IP-literal endpoint host is still vetted (refused before anything is
/// sent to the proxy), while a host name is the proxy's to resolve and goes through. The configured proxy's
/// own address is the operator's choice and is not vetted; a proxy named in an endpoint row is. With loopback
/// allowed, the held deliveries go out, the literal hosts through the proxy in canonical form.
async fn the_guard_judges_what_walhook_resolves_itself_through_a_proxy(source: Source) {
    let pg = Pg::start_for(source).await;
    let client = pg.client().await;
    let rx = Receiver::start().await.unwrap();
    let tls = TlsReceiver::start().await;
    let configured = TestProxy::start(None).await;
    let named = TestProxy::start(None).await;
    let (literal, _) = add_endpoint(&client, &tls.url("127.0.0.1", "/literal"), &["*"]).await;
    let mapped_url = format!("http://[::ffff:127.0.0.1]:{}/mapped", rx.port());
    let (mapped, _) = add_endpoint(&client, &mapped_url, &["*"]).await;
    add_endpoint(&client, &tls.url("localhost", "/by-name"), &["*"]).await;
    let (own, _) = add_endpoint(
        &client,
        &format!("http://localhost:{}/own-proxy", rx.port()),
        &["*"],
    )
    .await;
    set_proxy(&client, own, &named.url(None)).await;
    let ca_file = tls.ca_file.display().to_string();
    let config = |allowed: Vec<&str>| {
        pg.config_for_with(source, |f| {
            f.merge(("delivery.allow_private_networks", false))
                .merge(("delivery.retry_schedule", vec!["1s"; 40]))
                .merge(("delivery.allowed_networks", allowed))
                .merge(("delivery.ca_file", ca_file.as_str()))
                .merge(("delivery.proxy", configured.url(None)))
        })
    };

    let daemon = Daemon::start(config(vec![]));
    wait_ready(source, &client).await;
    publish(&client, "order.created", "{}").await;
    let loopback =
        "is a loopback address (127.0.0.0/8); deliveries to loopback addresses are refused";
    let named_proxy = format!(
        "the endpoint's proxy 127.0.0.1:{}: address 127.0.0.1 {loopback}",
        named.port
    );
    eventually(
        "literal hosts and the endpoint's own proxy are refused",
        || async {
            attempts_with(&client, literal, &["address 127.0.0.1 ", loopback]).await >= 1
                && attempts_with(&client, mapped, &["embeds IPv4 address 127.0.0.1"]).await >= 1
                && attempts_with(&client, own, &[&named_proxy]).await >= 1
        },
    )
    .await;
    wait_succeeded(&client, 1).await;
    daemon.stop().await;
    let by_name = format!("localhost:{}", tls.port);
    let seen = configured.seen();
    assert!(
        seen.iter().all(|s| s.target == by_name),
        "only the host name reached the proxy: {seen:?}"
    );
    assert!(named.seen().is_empty(), "{:?}", named.seen());

    let daemon = Daemon::start(config(vec!["127.0.0.0/8"]));
    wait_succeeded(&client, 4).await;
    daemon.stop().await;
    assert_eq!(configured.passed(&format!("127.0.0.1:{}", tls.port)), 1);
    assert_eq!(
        configured.passed(&format!("http://[::ffff:127.0.0.1]:{}/mapped", rx.port())),
        1
    );
    assert_eq!(named.passed("/own-proxy"), 1);
    assert_eq!(tls.requests.load(Ordering::SeqCst), 2);
    assert_eq!(rx.count(), 2);
}

/// SQL accepts a `proxy` value exactly when the daemon's parser does, and its messages name the constraint
/// and never repeat the value (which may hold a password).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_column_accepts_what_the_daemon_accepts() {
    let pg = Pg::start().await;
    let client = pg.client().await;
    let (id, _) = add_endpoint(&client, "https://example.com/h", &["*"]).await;
    let values = [
        "direct",
        "http://proxy.internal:3128",
        "HTTP://Proxy.Internal:3128/",
        "http://u:p@proxy:1",
        "http://u@proxy:65535",
        "http://:hunter2@proxy:8080",
        "http://u:a!$&'()*+,;=b@proxy:1",
        "http://u:pa%40ss@10.0.0.5:3128",
        "http://[::1]:3128",
        "http://[fd00::5]:3128/",
        "http://proxy_1.internal.:3128",
        "http://u:hunter2%zz@proxy:1",
        "http://u:hunter2%4@proxy:1",
        "http://u:hun ter2@proxy:1",
        "http://u:hunter2@x@proxy:1",
        "http://u:hunter2/x@proxy:1",
        "http://a%3Ab:hunter2@proxy:1",
        "http://a%3ab:hunter2@proxy:1",
        "http://u:hunter2@proxy",
        "http://u:hunter2@proxy:",
        "http://u:hunter2@proxy:0",
        "http://u:hunter2@proxy:65536",
        "http://u:hunter2@proxy:+80",
        "http://u:hunter2@proxy:99999999999",
        "http://u:hunter2@:3128",
        "http://u:hunter2@.proxy:1",
        "http://u:hunter2@pro..xy:1",
        "http://u:hunter2@-proxy:1",
        "http://[::1]",
        "http://[::1]x:1",
        "http://[1.2.3.4]:1",
        "http://[]:1",
        "http://[nope]:1",
        "http://proxy:3128/path",
        "http://proxy:3128?x",
        "http://proxy:3128#x",
        "https://u:hunter2@proxy:3128",
        "socks5://proxy:1080",
        "u:hunter2@proxy:3128",
        "proxy:3128",
        "DIRECT",
        "",
        " http://proxy:1",
        "http://proxy:1 ",
        "http://pröxy:1",
        "http://u:pässword@proxy:1",
    ];
    for value in values {
        let result = client
            .execute(
                "update walhook.endpoints set proxy = $2 where id = $1",
                &[&id, &value],
            )
            .await;
        let daemon = EndpointProxy::parse(Some(value));
        assert_eq!(
            result.is_ok(),
            daemon.is_ok(),
            "{value:?}: sql {result:?}, daemon {daemon:?}"
        );
        if let Err(e) = result {
            let db = e.as_db_error().expect("a server error");
            assert_eq!(db.constraint(), Some("endpoints_proxy_valid"), "{value}");
            assert!(
                db.message().starts_with("invalid endpoint proxy: ")
                    && db.message().ends_with(
                        "expected NULL (delivery.proxy applies), 'direct' (no proxy) or a URL like \
                         'http://user:password@proxy.internal:3128'"
                    ),
                "{value}: {}",
                db.message()
            );
            assert!(
                !db.message().contains("hunter2"),
                "{value}: {}",
                db.message()
            );
        }
    }
    client
        .execute(
            "update walhook.endpoints set proxy = null where id = $1",
            &[&id],
        )
        .await
        .expect("NULL is the default");
}

/// The README's "Egress proxy" section as written: its configuration loads, and its SQL runs as an operator
/// (a role in walhook_admin); a dashboard (walhook_reader) may not read the column.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readme_egress_proxy_section_runs_as_written() {
    let heading = "### Egress proxy";
    let toml = crate::schema::readme_blocks(heading, "toml");
    assert_eq!(toml.len(), 1, "{toml:?}");
    let config = Config::from_figment(Config::figment(None).merge(Toml::string(&toml[0])))
        .expect("the README's configuration loads");
    assert!(config.delivery.proxy().unwrap().is_some());
    assert!(config.delivery.no_proxy().is_ok());

    let pg = Pg::start().await;
    let client = pg.client().await;
    client
        .batch_execute(
            "create role ops login in role walhook_admin;
             create role dashboard login in role walhook_reader;",
        )
        .await
        .unwrap();
    for n in 1..=4 {
        let (id, _) = add_endpoint(&client, "https://example.com/h", &["*"]).await;
        assert_eq!(id, n, "the README's ids exist");
    }
    let ops = pg.client_as("ops").await;
    let sql = crate::schema::readme_blocks(heading, "sql");
    assert!(!sql.is_empty());
    for block in &sql {
        ops.batch_execute(block)
            .await
            .unwrap_or_else(|e| panic!("{block}: {e:?}"));
    }
    let dashboard = pg.client_as("dashboard").await;
    let err = dashboard
        .batch_execute("select proxy from walhook.endpoints")
        .await
        .expect_err("a dashboard may not read the proxy column");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
    );
}
