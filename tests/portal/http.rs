//! The portal's web server over raw HTTP: every route refuses without a session and every change without its
//! CSRF token; links open one session once; one tenant's session finds none of another's rows by id; a
//! customer adds an endpoint, receives a test event from the daemon on a loopback receiver, sees the delivery
//! and its attempts and resends a failed one; a customer pins an event version and verifies an endpoint; the
//! operator's overview; the limits and headers; and the portal's refusal to start as a role that would step
//! over row-level security.

use std::net::SocketAddr;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::header::HeaderMap;
use hyper_util::rt::TokioIo;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use walhook::config::Config;
use walhook::receiver::{Receiver, Reply};

use crate::support::*;

const CSP: &str =
    "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' https: data:; \
                   form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// Log-in roles: `portal` as docs/portal.md creates it, `ops` an operator.
pub(super) async fn roles(superuser: &Client) {
    superuser
        .batch_execute(
            "CREATE ROLE portal LOGIN PASSWORD 'secret' IN ROLE walhook_portal;
             create role ops login in role walhook_admin;",
        )
        .await
        .unwrap();
}

/// The portal running in this test's runtime on 127.0.0.1:0.
pub(super) struct Web {
    pub(super) addr: SocketAddr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Web {
    /// Its public URL is the address the test's requests use.
    pub(super) async fn start(config: &Config) -> Web {
        Web::start_with(config, |addr| format!("http://{addr}")).await
    }

    /// With `portal.public_url` made from the listening address.
    async fn start_with(config: &Config, public_url: impl FnOnce(SocketAddr) -> String) -> Web {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut config = config.clone();
        config.portal.public_url = public_url(addr);
        let settings = walhook::portal::settings(&config).unwrap();
        let db = config.portal_database_url().unwrap();
        walhook::portal::check_role(&db)
            .await
            .expect("the portal's role passes");
        let stop = CancellationToken::new();
        let task = tokio::spawn(walhook::portal::serve(
            listener,
            settings,
            db,
            config.portal.connections,
            stop.clone(),
        ));
        Web { addr, stop, task }
    }

    pub(super) async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("the portal stops")
            .unwrap();
    }
}

/// Config for the portal of `pg`, connecting as `portal`; `private` decides whether loopback URLs pass.
pub(super) fn portal_config(pg: &Pg, private: bool) -> Config {
    pg.config_with(|f| {
        f.merge(("portal.database_url", pg.url_as("portal")))
            .merge(("delivery.allow_private_networks", private))
    })
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap())
            .unwrap_or("")
    }

    fn location(&self) -> &str {
        self.header("location")
    }

    /// The id of the endpoint a 303 after saving the form leads to.
    fn endpoint_id(&self) -> i64 {
        assert_eq!(self.status, 303, "{self:?}");
        self.location()
            .strip_prefix("/endpoints/")
            .unwrap()
            .parse()
            .unwrap()
    }
}

/// One request on its own connection.
async fn request(
    addr: SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: Option<String>,
) -> Answer {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut builder = hyper::Request::builder()
        .method(method)
        .uri(target)
        .header("host", addr.to_string());
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let has_body = body.is_some();
    if has_body {
        builder = builder.header("content-type", "application/x-www-form-urlencoded");
    }
    let req = builder
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .unwrap();
    let response = tokio::time::timeout(DEADLINE, sender.send_request(req))
        .await
        .expect("the portal answers")
        .unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn form(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}={}",
                percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC)
            )
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// A browser's session: its cookie and the CSRF token of its forms.
struct Browser {
    addr: SocketAddr,
    cookie: String,
    csrf: String,
}

impl Browser {
    /// Opens `path` (a link), expecting a session.
    async fn open(addr: SocketAddr, path: &str) -> Browser {
        let reply = request(addr, "GET", path, &[], None).await;
        assert_eq!(reply.status, 303, "{reply:?}");
        assert_eq!(reply.location(), "/");
        let set = reply.header("set-cookie");
        let cookie = set
            .split(';')
            .next()
            .unwrap()
            .strip_prefix("walhook_portal=")
            .expect(set)
            .to_string();
        let mut browser = Browser {
            addr,
            cookie,
            csrf: String::new(),
        };
        let page = browser.get("/operator").await;
        let page = match page.status {
            200 => page,
            _ => browser.get("/").await,
        };
        browser.csrf = csrf_of(&page.body);
        browser
    }

    fn cookie_header(&self) -> String {
        format!("walhook_portal={}", self.cookie)
    }

    async fn get(&self, target: &str) -> Answer {
        request(
            self.addr,
            "GET",
            target,
            &[("cookie", &self.cookie_header())],
            None,
        )
        .await
    }

    /// A form posted with this session's CSRF token.
    async fn post(&self, target: &str, fields: &[(&str, &str)]) -> Answer {
        let mut all = vec![("csrf", self.csrf.as_str())];
        all.extend_from_slice(fields);
        self.post_raw(target, &form(&all), &[]).await
    }

    async fn post_raw(&self, target: &str, body: &str, headers: &[(&str, &str)]) -> Answer {
        let cookie = self.cookie_header();
        let mut all = vec![("cookie", cookie.as_str())];
        all.extend_from_slice(headers);
        request(self.addr, "POST", target, &all, Some(body.to_string())).await
    }
}

fn csrf_of(html: &str) -> String {
    let at = html
        .find(r#"name="csrf" value=""#)
        .unwrap_or_else(|| panic!("no csrf field in {html}"));
    html[at + r#"name="csrf" value=""#.len()..][..64].to_string()
}

/// `/login?token=…` of a new link minted by `client`.
pub(super) async fn link(client: &Client, tenant: Option<&str>) -> String {
    client
        .query_one(
            "select path from walhook.portal_link($1, interval '1 hour', $2)",
            &[&tenant, &tenant.is_none()],
        )
        .await
        .unwrap()
        .get(0)
}

pub(super) async fn tenant_endpoint(client: &Client, tenant: &str, url: &str) -> i64 {
    client
        .query_one(
            "insert into walhook.endpoints (tenant, url) values ($1, $2) returning id",
            &[&tenant, &url],
        )
        .await
        .unwrap()
        .get(0)
}

/// A dead delivery of a `tenant`'s event to `endpoint`, with one failed attempt; returns its id.
pub(super) async fn dead_delivery(superuser: &Client, tenant: &str, endpoint: i64) -> i64 {
    let event: i64 = superuser
        .query_one(
            "insert into walhook.outbox (event_type, payload, tenant) values ('order.created', '{}', $1) returning id",
            &[&tenant],
        )
        .await
        .unwrap()
        .get(0);
    let delivery: i64 = superuser
        .query_one(
            "insert into walhook.deliveries (event_id, endpoint_id, webhook_id, status, attempts, tenant, event_type, payload)
             values ($1, $2, gen_random_uuid(), 'dead', 1, $3, 'order.created', '{}') returning id",
            &[&event, &endpoint, &tenant],
        )
        .await
        .unwrap()
        .get(0);
    superuser
        .execute(
            "insert into walhook.attempts (delivery_id, attempt, attempted_at, duration_ms, status_code, response_body)
             values ($1, 1, now(), 12, 500, 'boom')",
            &[&delivery],
        )
        .await
        .unwrap();
    delivery
}

/// Every route, as (method, path); `{e}` and `{d}` are an endpoint's and a delivery's id.
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/endpoints/new"),
    ("GET", "/endpoints/{e}"),
    ("GET", "/endpoints/{e}/edit"),
    ("GET", "/deliveries"),
    ("GET", "/deliveries/{d}"),
    ("GET", "/operator"),
    ("GET", "/event-types"),
    ("POST", "/endpoints"),
    ("POST", "/endpoints/{e}/edit"),
    ("POST", "/endpoints/{e}/pause"),
    ("POST", "/endpoints/{e}/resume"),
    ("POST", "/endpoints/{e}/enable"),
    ("POST", "/endpoints/{e}/disable"),
    ("POST", "/endpoints/{e}/delete"),
    ("POST", "/endpoints/{e}/rotate"),
    ("POST", "/endpoints/{e}/reveal"),
    ("POST", "/endpoints/{e}/test"),
    ("POST", "/endpoints/{e}/verify"),
    ("POST", "/deliveries/{d}/resend"),
    ("POST", "/recover"),
    ("POST", "/operator/view"),
    ("POST", "/logout"),
];

fn route(path: &str, e: i64, d: i64) -> String {
    path.replace("{e}", &e.to_string())
        .replace("{d}", &d.to_string())
}

/// A form each POST route would accept (so that only the CSRF token is missing).
fn fields_for(path: &str) -> Vec<(&'static str, &'static str)> {
    match path {
        "/endpoints" | "/endpoints/{e}/edit" => {
            vec![("url", "https://hooks.example.com/x"), ("event_types", "*")]
        }
        "/endpoints/{e}/delete" => vec![("confirm", "yes")],
        "/endpoints/{e}/rotate" => vec![("grace", "0")],
        "/recover" => vec![("since", "2026-01-01T00:00")],
        "/operator/view" => vec![("tenant", "acme")],
        _ => vec![],
    }
}

/// What the endpoint's row looks like, to show that refused changes changed nothing.
async fn endpoint_row(superuser: &Client, id: i64) -> Option<String> {
    superuser
        .query_opt(
            "select format('%s %s %s %s %s', url, event_types, enabled, paused, secret) from walhook.endpoints where id = $1",
            &[&id],
        )
        .await
        .unwrap()
        .map(|r| r.get(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_route_needs_a_session_and_every_change_its_csrf_token() {
    let pg = Pg::start().await;
    let superuser = pg.client().await;
    roles(&superuser).await;
    let e = tenant_endpoint(&superuser, "acme", "https://hooks.acme.example/a").await;
    let d = dead_delivery(&superuser, "acme", e).await;
    let before = endpoint_row(&superuser, e).await;
    let web = Web::start(&portal_config(&pg, false)).await;
    let addr = web.addr;

    // no session, or one that does not exist: pages go to the expired page, changes are refused
    let unknown = format!("walhook_portal={}", "ab".repeat(32));
    for cookie in [None, Some(unknown.as_str()), Some("walhook_portal=junk")] {
        let headers: Vec<(&str, &str)> = cookie.iter().map(|c| ("cookie", *c)).collect();
        for (method, path) in ROUTES {
            let target = route(path, e, d);
            let body = (*method == "POST").then(|| form(&fields_for(path)));
            let reply = request(addr, method, &target, &headers, body).await;
            match *method {
                "GET" => {
                    assert_eq!(reply.status, 303, "{method} {target}: {reply:?}");
                    assert_eq!(reply.location(), "/expired");
                }
                _ => {
                    assert_eq!(reply.status, 401, "{method} {target}: {reply:?}");
                    assert!(reply.body.contains("ask for a new link"), "{}", reply.body);
                }
            }
        }
    }
    let expired = request(addr, "GET", "/expired", &[], None).await;
    assert_eq!(expired.status, 401);
    assert!(expired.body.contains("Your session has expired"));

    // a link opens a session: a cookie, and a URL without the token
    let path = link(&superuser, Some("acme")).await;
    let opened = request(addr, "GET", &path, &[], None).await;
    assert_eq!(opened.status, 303);
    assert_eq!(opened.location(), "/");
    let cookie = opened.header("set-cookie").to_string();
    let session = cookie
        .strip_prefix("walhook_portal=")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(
        cookie,
        format!("walhook_portal={session}; Max-Age=28800; HttpOnly; Path=/; SameSite=Lax"),
        "no Secure over plain http"
    );
    for reply in [&opened, &expired] {
        assert_eq!(reply.header("content-security-policy"), CSP);
        assert_eq!(reply.header("referrer-policy"), "no-referrer");
        assert_eq!(reply.header("x-content-type-options"), "nosniff");
        assert_eq!(reply.header("x-frame-options"), "DENY");
        assert_eq!(reply.header("cache-control"), "no-store");
    }
    // once: used, tampered and expired links get the same page
    let used = request(addr, "GET", &path, &[], None).await;
    let mut tampered = link(&superuser, Some("acme")).await.into_bytes();
    let last = tampered.len() - 1;
    tampered[last] = if tampered[last] == b'0' { b'1' } else { b'0' };
    let tampered = request(
        addr,
        "GET",
        std::str::from_utf8(&tampered).unwrap(),
        &[],
        None,
    )
    .await;
    let old = link(&superuser, Some("acme")).await;
    superuser
        .batch_execute("update walhook.portal_links set expires_at = now() - interval '1 second'")
        .await
        .unwrap();
    let expired_link = request(addr, "GET", &old, &[], None).await;
    let malformed = request(addr, "GET", "/login?token=%27%20or%201%3D1", &[], None).await;
    for reply in [&used, &tampered, &expired_link, &malformed] {
        assert_eq!(reply.status, 401, "{reply:?}");
        assert!(reply.header("set-cookie").is_empty());
        assert!(reply
            .body
            .contains("This link is used, expired or invalid: ask for a new one."));
        assert_eq!(reply.body, used.body);
    }

    // with the session: pages answer; every change without its token, with another, or from another site
    // is refused, and changes nothing
    let browser = Browser {
        addr,
        cookie: session.clone(),
        csrf: String::new(),
    };
    let home = browser.get("/").await;
    assert_eq!(home.status, 200, "{home:?}");
    assert!(home.body.contains("https://hooks.acme.example/a"));
    let browser = Browser {
        csrf: csrf_of(&home.body),
        ..browser
    };
    let wrong = "cd".repeat(32);
    for (method, path) in ROUTES.iter().filter(|(m, _)| *m == "POST") {
        let target = route(path, e, d);
        let fields = fields_for(path);
        let without = browser.post_raw(&target, &form(&fields), &[]).await;
        let mut with_wrong = vec![("csrf", wrong.as_str())];
        with_wrong.extend_from_slice(&fields);
        let wrong_token = browser.post_raw(&target, &form(&with_wrong), &[]).await;
        let mut right = vec![("csrf", browser.csrf.as_str())];
        right.extend_from_slice(&fields);
        let other_site = browser
            .post_raw(
                &target,
                &form(&right),
                &[("origin", "https://evil.example")],
            )
            .await;
        let cross_site = browser
            .post_raw(&target, &form(&right), &[("sec-fetch-site", "cross-site")])
            .await;
        for reply in [&without, &wrong_token, &other_site, &cross_site] {
            assert_eq!(reply.status, 403, "{method} {target}: {reply:?}");
        }
    }
    assert_eq!(endpoint_row(&superuser, e).await, before);
    assert_eq!(
        count(&superuser, "select count(*) from walhook.endpoints").await,
        1
    );
    assert_eq!(
        count(&superuser, "select count(*) from walhook.portal_sessions").await,
        1,
        "not logged out"
    );
    // the same origin, as the portal's own pages send it, passes
    let paused = browser
        .post_raw(
            &format!("/endpoints/{e}/pause"),
            &form(&[("csrf", &browser.csrf)]),
            &[
                ("origin", &format!("http://{addr}")),
                ("sec-fetch-site", "same-origin"),
            ],
        )
        .await;
    assert_eq!(paused.status, 303, "{paused:?}");
    assert_eq!(paused.location(), format!("/endpoints/{e}"));
    assert_eq!(
        count(
            &superuser,
            "select count(*) from walhook.endpoints where paused"
        )
        .await,
        1
    );

    // a tenant's session has no operator pages
    let overview = browser.get("/operator").await;
    assert_eq!(overview.status, 403);
    let view = browser
        .post("/operator/view", &[("tenant", "globex")])
        .await;
    assert_eq!(view.status, 403);

    // limits: the URL, the body, each field
    let long_url = format!("/deliveries?event_type={}", "a".repeat(2100));
    assert_eq!(browser.get(&long_url).await.status, 400);
    let big = browser
        .post("/endpoints", &[("description", &"x".repeat(70 * 1024))])
        .await;
    assert_eq!(big.status, 413, "{big:?}");
    assert!(big.body.contains("larger than 64 KiB"));
    let field = browser
        .post(
            "/endpoints",
            &[
                ("url", "https://hooks.example.com/x"),
                ("description", &"x".repeat(2049)),
            ],
        )
        .await;
    assert_eq!(field.status, 400, "{field:?}");
    assert!(field.body.contains("longer than 2048 bytes"));
    // the network guard: loopback is private here, refused when typed, before anything is saved
    let refused = browser
        .post(
            "/endpoints",
            &[("url", "http://127.0.0.1:9/hooks"), ("event_types", "*")],
        )
        .await;
    assert_eq!(refused.status, 422, "{refused:?}");
    assert!(
        refused
            .body
            .contains("Webhooks cannot be delivered to 127.0.0.1")
            && refused.body.contains("is a loopback address"),
        "{}",
        refused.body
    );
    assert!(refused.body.contains(r#"value="http://127.0.0.1:9/hooks""#));
    assert_eq!(
        count(&superuser, "select count(*) from walhook.endpoints").await,
        1
    );
    // and an unknown method
    let put = request(
        addr,
        "PUT",
        "/",
        &[("cookie", &browser.cookie_header())],
        None,
    )
    .await;
    assert_eq!(put.status, 405);

    // static files need no session
    let css = request(addr, "GET", "/static/portal.css", &[], None).await;
    assert_eq!(css.status, 200);
    assert!(css.header("content-type").starts_with("text/css"));
    assert!(css.body.starts_with(":root { --brand: #2563eb; }"));
    let js = request(addr, "GET", "/static/portal.js", &[], None).await;
    assert_eq!(js.status, 200);
    assert!(js.header("content-type").starts_with("text/javascript"));

    // logging out ends the session and clears the cookie
    let out = browser.post("/logout", &[]).await;
    assert_eq!(out.status, 200);
    assert!(out
        .header("set-cookie")
        .starts_with("walhook_portal=; Max-Age=0"));
    assert_eq!(browser.get("/").await.location(), "/expired");
    web.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_session_finds_none_of_another_tenants_rows() {
    let pg = Pg::start().await;
    let superuser = pg.client().await;
    roles(&superuser).await;
    let acme = tenant_endpoint(&superuser, "acme", "https://hooks.acme.example/a").await;
    let globex = tenant_endpoint(&superuser, "globex", "https://hooks.globex.example/g").await;
    let acme_delivery = dead_delivery(&superuser, "acme", acme).await;
    let globex_delivery = dead_delivery(&superuser, "globex", globex).await;
    let before = endpoint_row(&superuser, globex).await;
    let web = Web::start(&portal_config(&pg, false)).await;
    let browser = Browser::open(web.addr, &link(&superuser, Some("acme")).await).await;

    // the event catalog is everyone's: types, descriptions, versions, examples and schemas
    superuser
        .batch_execute(
            "insert into walhook.event_types (name, description) values ('invoice.paid', 'An invoice was <paid>.');
             insert into walhook.event_type_versions (event_type, version, schema, example)
             values ('invoice.paid', 1, '{\"required\": [\"invoice_id\"]}', '{\"invoice_id\": 7}');",
        )
        .await
        .unwrap();
    let catalog = browser.get("/event-types").await;
    assert_eq!(catalog.status, 200);
    for text in [
        "invoice.paid",
        "An invoice was &lt;paid&gt;.",
        "Version 1",
        "current",
        "invoice_id",
        "required",
    ] {
        assert!(catalog.body.contains(text), "{text}: {}", catalog.body);
    }
    assert!(
        browser
            .get("/endpoints/new")
            .await
            .body
            .contains("invoice.paid"),
        "the form offers catalog types"
    );

    // its own rows, yes
    let home = browser.get("/").await;
    assert!(home.body.contains("hooks.acme.example"));
    assert!(!home.body.contains("globex"), "{}", home.body);
    let list = browser.get("/deliveries").await;
    assert!(list
        .body
        .contains(&format!("/deliveries/{acme_delivery}\"")));
    assert!(!list
        .body
        .contains(&format!("/deliveries/{globex_delivery}\"")));
    assert!(!list.body.contains("globex"));
    let own = browser.get(&format!("/deliveries/{acme_delivery}")).await;
    assert_eq!(own.status, 200);
    assert!(own.body.contains("boom"), "the attempt's response");

    // the other tenant's, by id, on every route: not found, and nothing changes
    for (method, path) in ROUTES {
        if !path.contains("{e}") && !path.contains("{d}") {
            continue;
        }
        let target = route(path, globex, globex_delivery);
        let reply = match *method {
            "GET" => browser.get(&target).await,
            _ => browser.post(&target, &fields_for(path)).await,
        };
        assert_eq!(reply.status, 404, "{method} {target}: {reply:?}");
        assert!(!reply.body.contains("globex"), "{}", reply.body);
    }
    assert_eq!(endpoint_row(&superuser, globex).await, before);
    assert_eq!(
        count(
            &superuser,
            &format!("select count(*) from walhook.deliveries where id = {globex_delivery} and status = 'dead'")
        )
        .await,
        1
    );
    // a filter naming the other tenant's endpoint finds nothing either
    let filtered = browser.get(&format!("/deliveries?endpoint={globex}")).await;
    assert_eq!(filtered.status, 200);
    assert!(filtered.body.contains("No deliveries."));
    // recovering covers its own endpoints only
    let recovered = browser
        .post("/recover", &[("since", "2000-01-01T00:00")])
        .await;
    assert_eq!(recovered.status, 200, "{recovered:?}");
    assert_eq!(
        count(
            &superuser,
            "select count(*) from walhook.recoveries where tenant = 'acme'"
        )
        .await,
        1
    );
    let foreign = browser
        .post(
            "/recover",
            &[
                ("since", "2000-01-01T00:00"),
                ("endpoint", &globex.to_string()),
            ],
        )
        .await;
    assert_eq!(foreign.status, 404, "{foreign:?}");
    web.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_adds_an_endpoint_gets_a_test_event_and_resends_a_failed_delivery() {
    let pg = Pg::start().await;
    let superuser = pg.client().await;
    roles(&superuser).await;
    let rx = Receiver::start().await.unwrap();
    // the receiver fails until told otherwise
    let failing = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flag = failing.clone();
    rx.set_responder(
        move |_, _| match flag.load(std::sync::atomic::Ordering::SeqCst) {
            true => Reply::StatusWithBody(500, "not yet".into()),
            false => Reply::Status(204),
        },
    );
    // a past event of acme's, so the picker offers its type
    let old = tenant_endpoint(&superuser, "acme", "https://hooks.acme.example/old").await;
    dead_delivery(&superuser, "acme", old).await;
    let config = portal_config(&pg, true);
    let daemon = Daemon::start(pg.config());
    let web = Web::start(&config).await;
    let browser = Browser::open(web.addr, &link(&superuser, Some("acme")).await).await;

    let new = browser.get("/endpoints/new").await;
    assert_eq!(new.status, 200);
    assert!(
        new.body
            .contains(r#"name="event_types" value="order.created""#),
        "{}",
        new.body
    );
    // PostgreSQL's own words for what it refuses, with the form as typed
    let bad = browser
        .post(
            "/endpoints",
            &[("url", "ftp://hooks.acme.example/x"), ("event_types", "*")],
        )
        .await;
    assert_eq!(bad.status, 422, "{bad:?}");
    assert!(bad.body.contains("SQLSTATE"), "{}", bad.body);
    assert!(bad.body.contains(r#"value="ftp://hooks.acme.example/x""#));
    let url = rx.url("/acme");
    let created = browser
        .post(
            "/endpoints",
            &[
                ("url", &url),
                ("event_types", "order.created"),
                ("event_types_other", "invoice.*"),
                ("description", "<b>billing</b>"),
            ],
        )
        .await;
    let id = created.endpoint_id();
    // the request format: Standard Webhooks by default, CloudEvents on request, nothing else
    assert!(browser
        .get("/endpoints/new")
        .await
        .body
        .contains(r#"<option value="cloudevents">"#));
    let edit = format!("/endpoints/{id}/edit");
    let fields = |format: &'static str| {
        vec![
            ("url", url.clone()),
            ("event_types", "order.created".to_string()),
            ("event_types_other", "invoice.*".to_string()),
            ("description", "<b>billing</b>".to_string()),
            ("format", format.to_string()),
        ]
    };
    let post = |fields: Vec<(&'static str, String)>| {
        let browser = &browser;
        let edit = edit.clone();
        async move {
            let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
            browser.post(&edit, &fields).await
        }
    };
    assert_eq!(post(fields("xml")).await.status, 422);
    assert_eq!(post(fields("cloudevents")).await.status, 303);
    assert!(browser
        .get(&format!("/endpoints/{id}"))
        .await
        .body
        .contains("CloudEvents 1.0, structured"));
    assert_eq!(post(fields("standard")).await.status, 303);
    assert_eq!(
        count(
            &superuser,
            &format!(
                "select count(*) from walhook.endpoints where id = {id} and format = 'standard'"
            )
        )
        .await,
        1
    );
    let (tenant, patterns, secret): (String, Vec<String>, String) = {
        let r = superuser
            .query_one(
                "select tenant, event_types, secret from walhook.endpoints where id = $1",
                &[&id],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1), r.get(2))
    };
    assert_eq!(tenant, "acme");
    assert_eq!(patterns, vec!["order.created", "invoice.*"]);
    rx.set_secret("/acme", &secret);
    let page = browser.get(&format!("/endpoints/{id}")).await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("&lt;b&gt;billing&lt;/b&gt;"), "escaped");
    assert!(!page.body.contains(&secret), "the secret is masked");

    // the secret: revealed in the response to a POST, never in a URL; rotated with a grace period
    let revealed = browser.post(&format!("/endpoints/{id}/reveal"), &[]).await;
    assert_eq!(revealed.status, 200);
    assert!(revealed.body.contains(&secret));
    let rotated = browser
        .post(&format!("/endpoints/{id}/rotate"), &[("grace", "1 hour")])
        .await;
    assert_eq!(rotated.status, 200, "{rotated:?}");
    let new_secret: String = superuser
        .query_one("select secret from walhook.endpoints where id = $1", &[&id])
        .await
        .unwrap()
        .get(0);
    assert_ne!(new_secret, secret);
    assert!(rotated.body.contains(&new_secret));
    assert_eq!(
        count(
            &superuser,
            &format!("select count(*) from walhook.endpoint_secrets where endpoint_id = {id}")
        )
        .await,
        1
    );
    rx.set_secret("/acme", &new_secret);

    // a test event: its delivery fails at the receiver until it is dead
    let test = browser.post(&format!("/endpoints/{id}/test"), &[]).await;
    assert_eq!(test.status, 303, "{test:?}");
    let delivery_path = test.location().to_string();
    let delivery: i64 = delivery_path
        .strip_prefix("/deliveries/")
        .unwrap()
        .parse()
        .unwrap();
    eventually("the test delivery is dead", || async {
        count(
            &superuser,
            &format!(
                "select count(*) from walhook.deliveries where id = {delivery} and status = 'dead'"
            ),
        )
        .await
            == 1
    })
    .await;
    let dead = browser.get(&delivery_path).await;
    assert!(dead.body.contains(">dead<"), "{}", dead.body);
    assert!(dead.body.contains("walhook.test"));
    assert!(dead.body.contains("not yet"), "the response excerpt");
    assert_eq!(
        dead.body.matches("<td>500</td>").count(),
        4,
        "{}",
        dead.body
    );

    // resent once the receiver works: delivered, signed with the new secret
    failing.store(false, std::sync::atomic::Ordering::SeqCst);
    let resent = browser.post(&format!("{delivery_path}/resend"), &[]).await;
    assert_eq!(resent.status, 303);
    assert_eq!(resent.location(), delivery_path);
    eventually("the resent delivery succeeded", || async {
        count(
            &superuser,
            &format!("select count(*) from walhook.deliveries where id = {delivery} and status = 'succeeded'"),
        )
        .await
            == 1
    })
    .await;
    let delivered = rx
        .received()
        .into_iter()
        .filter(|r| r.status_sent == 204)
        .collect::<Vec<_>>();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].verified, Some(true));
    let done = browser.get(&delivery_path).await;
    assert!(done.body.contains(">succeeded<"));
    assert!(done.body.contains("<td>204</td>"));
    let list = browser.get("/deliveries?status=succeeded").await;
    assert!(list.body.contains(&format!("{delivery_path}\"")));
    let none = browser
        .get("/deliveries?status=dead&event_type=walhook.test")
        .await;
    assert!(!none.body.contains(&format!("{delivery_path}\"")));

    // pause, resume, disable, enable, edit, delete
    for (action, column, value) in [
        ("pause", "paused", true),
        ("resume", "paused", false),
        ("disable", "enabled", false),
        ("enable", "enabled", true),
    ] {
        let reply = browser
            .post(&format!("/endpoints/{id}/{action}"), &[])
            .await;
        assert_eq!(reply.status, 303, "{action}");
        let now: bool = superuser
            .query_one(
                &format!("select {column} from walhook.endpoints where id = $1"),
                &[&id],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(now, value, "{action}");
    }
    let edit = browser.get(&format!("/endpoints/{id}/edit")).await;
    assert!(edit.body.contains(&format!(r#"value="{url}""#)));
    let edited = browser
        .post(
            &format!("/endpoints/{id}/edit"),
            &[("url", &url), ("event_types", "*"), ("rate_limit", "5")],
        )
        .await;
    assert_eq!(edited.status, 303, "{edited:?}");
    assert_eq!(
        count(
            &superuser,
            &format!("select count(*) from walhook.endpoints where id = {id} and event_types = '{{*}}' and rate_limit = 5")
        )
        .await,
        1
    );
    let unconfirmed = browser.post(&format!("/endpoints/{id}/delete"), &[]).await;
    assert_eq!(unconfirmed.status, 400);
    let deleted = browser
        .post(&format!("/endpoints/{id}/delete"), &[("confirm", "yes")])
        .await;
    assert_eq!(deleted.status, 303);
    assert_eq!(
        count(
            &superuser,
            &format!("select count(*) from walhook.endpoints where id = {id}")
        )
        .await,
        0
    );

    // the operator's overview sees every tenant, and looks at one through the same pages
    tenant_endpoint(&superuser, "globex", "https://hooks.globex.example/g").await;
    let ops = pg.client_as("ops").await;
    let operator = Browser::open(web.addr, &link(&ops, None).await).await;
    assert_eq!(operator.get("/").await.location(), "/operator");
    let overview = operator.get("/operator").await;
    assert_eq!(overview.status, 200);
    assert!(overview.body.contains("acme") && overview.body.contains("globex"));
    let view = operator
        .post("/operator/view", &[("tenant", "globex")])
        .await;
    assert_eq!(view.status, 303);
    let globex = operator.get("/").await;
    assert!(globex.body.contains("hooks.globex.example"));
    assert!(!globex.body.contains("hooks.acme.example"));
    assert!(globex
        .body
        .contains("viewing tenant <strong>globex</strong>"));

    web.stop().await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_pins_a_version_and_verifies_an_endpoint_in_the_portal() {
    let pg = Pg::start().await;
    let superuser = pg.client().await;
    roles(&superuser).await;
    // docs/catalog.md's catalog: order.created in versions 1 and 2, with 2's downgrade
    let blocks = crate::catalog::doc_blocks();
    superuser
        .batch_execute(&blocks[0])
        .await
        .expect("the function");
    superuser
        .batch_execute(&blocks[1])
        .await
        .expect("the catalog");
    let rx = Receiver::start().await.unwrap();
    // a receiver answers only what it can verify: the verification may arrive before the test has read
    // the new endpoint's secret, and is then refused and retried
    rx.set_responder(|r, _| match r.verified {
        Some(true) => Reply::Status(204),
        _ => Reply::Status(401),
    });
    // ten retries a second apart: the refusals below are retried well within the test's deadlines
    let daemon =
        Daemon::start(pg.config_with(|f| f.merge(("delivery.retry_schedule", vec!["1s"; 10]))));
    let web = Web::start(&portal_config(&pg, true)).await;
    let browser = Browser::open(web.addr, &link(&superuser, Some("acme")).await).await;

    // the form offers each version of a type that has several, and verification for a new endpoint
    let new = browser.get("/endpoints/new").await;
    assert_eq!(new.status, 200);
    for offered in [
        r#"<select name="pin"><option value="">current version (now v2)"#,
        r#"<option value="order.created=1">v1 only</option>"#,
        r#"name="verify" value="yes""#,
    ] {
        assert!(new.body.contains(offered), "{offered}: {}", new.body);
    }
    // a version the catalog does not hold: PostgreSQL's words, and the form as chosen
    let url = rx.url("/pinned");
    let bad = browser
        .post(
            "/endpoints",
            &[
                ("url", &url),
                ("event_types", "order.*"),
                ("pin", "order.created=7"),
                ("verify", "yes"),
            ],
        )
        .await;
    assert_eq!(bad.status, 422, "{bad:?}");
    assert!(
        bad.body
            .contains("order.created version 7 is not in the catalog"),
        "{}",
        bad.body
    );
    assert!(bad.body.contains(r#"name="verify" value="yes" checked"#));
    let created = browser
        .post(
            "/endpoints",
            &[
                ("url", &url),
                ("event_types", "order.*"),
                ("pin", "order.created=1"),
                ("verify", "yes"),
            ],
        )
        .await;
    let id = created.endpoint_id();
    let row = superuser
        .query_one(
            "select event_versions::text, verification, enabled, secret from walhook.endpoints where id = $1",
            &[&id],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), r#"{"order.created": 1}"#);
    assert_eq!(row.get::<_, Option<String>>(1).as_deref(), Some("pending"));
    assert!(!row.get::<_, bool>(2), "no events before it answers");
    rx.set_secret("/pinned", row.get::<_, &str>(3));

    // the receiver answers the signed verification request; the endpoint is enabled, the page says so
    eventually("the endpoint is verified", || async {
        count(
            &superuser,
            &format!("select count(*) from walhook.endpoints where id = {id} and verification = 'verified' and enabled"),
        )
        .await
            == 1
    })
    .await;
    let answered: Vec<_> = rx
        .received()
        .into_iter()
        .filter(|r| r.status_sent == 204)
        .collect();
    assert_eq!(
        answered.len(),
        1,
        "one verification answered, nothing else sent"
    );
    let body: serde_json::Value = serde_json::from_slice(&answered[0].body).unwrap();
    assert_eq!(body["type"], "walhook.endpoint.verification");
    let page = browser.get(&format!("/endpoints/{id}")).await;
    assert!(page.body.contains("order.created v1"), "{}", page.body);
    assert!(page.body.contains("<dd>verified 20"), "{}", page.body);

    // a test event from the page goes through the scheduler, which waits for the daemon's endpoint cache to
    // catch up with it: once it arrives, the daemon knows the endpoint is enabled
    let test = browser.post(&format!("/endpoints/{id}/test"), &[]).await;
    assert_eq!(test.status, 303, "{test:?}");
    let of_type = |t: &'static str| {
        let rx = &rx;
        move || {
            rx.received()
                .into_iter()
                .filter(|r| {
                    serde_json::from_slice::<serde_json::Value>(&r.body)
                        .is_ok_and(|b| b["type"] == t)
                })
                .collect::<Vec<_>>()
        }
    };
    let tests = of_type("walhook.test");
    eventually("the test event arrives", || async { !tests().is_empty() }).await;
    // an event published in version 2 arrives in the pinned version 1
    superuser
        .batch_execute(
            r#"insert into walhook.outbox (event_type, tenant, payload)
               values ('order.created', 'acme', '{"order_id": 7, "amount_cents": 1999}')"#,
        )
        .await
        .unwrap();
    let orders = of_type("order.created");
    eventually("the event arrives", || async { !orders().is_empty() }).await;
    let event = &orders()[0];
    assert_eq!(event.verified, Some(true));
    let body: serde_json::Value = serde_json::from_slice(&event.body).unwrap();
    assert_eq!(body["type"], "order.created");
    assert_eq!(body["version"], 1);
    assert_eq!(body["data"]["amount"].to_string(), "19.99");
    assert!(body["data"].get("amount_cents").is_none(), "{body}");

    // the edit form shows the pin; choosing the current version removes it
    let edit = browser.get(&format!("/endpoints/{id}/edit")).await;
    assert!(
        edit.body
            .contains(r#"<option value="order.created=1" selected>"#),
        "{}",
        edit.body
    );
    assert!(
        !edit.body.contains(r#"name="verify""#),
        "verifying again is a button"
    );
    let unpinned = browser
        .post(
            &format!("/endpoints/{id}/edit"),
            &[("url", &url), ("event_types", "order.*"), ("pin", "")],
        )
        .await;
    assert_eq!(unpinned.status, 303, "{unpinned:?}");
    assert_eq!(
        count(
            &superuser,
            &format!("select count(*) from walhook.endpoints where id = {id} and event_versions = '{{}}'")
        )
        .await,
        1
    );

    // Verify: no events until the endpoint answers again; while it answers 503 it stays disabled, and
    // once it answers 204 it is enabled
    let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = up.clone();
    rx.set_responder(
        move |_, _| match flag.load(std::sync::atomic::Ordering::SeqCst) {
            true => Reply::Status(204),
            false => Reply::Status(503),
        },
    );
    let verify = browser.post(&format!("/endpoints/{id}/verify"), &[]).await;
    assert_eq!(verify.status, 303, "{verify:?}");
    assert_eq!(verify.location(), format!("/endpoints/{id}"));
    let pending = browser.get(&format!("/endpoints/{id}")).await;
    assert!(
        pending.body.contains("awaiting a 2xx answer"),
        "{}",
        pending.body
    );
    assert_eq!(
        count(
            &superuser,
            &format!("select count(*) from walhook.endpoints where id = {id} and not enabled and verification = 'pending'")
        )
        .await,
        1
    );
    eventually("the verification request is refused", || async {
        rx.received().iter().any(|r| r.status_sent == 503)
    })
    .await;
    assert_eq!(
        count(
            &superuser,
            &format!("select count(*) from walhook.endpoints where id = {id} and not enabled")
        )
        .await,
        1
    );
    up.store(true, std::sync::atomic::Ordering::SeqCst);
    eventually("verified again", || async {
        count(
            &superuser,
            &format!("select count(*) from walhook.endpoints where id = {id} and verification = 'verified' and enabled"),
        )
        .await
            == 1
    })
    .await;

    web.stop().await;
    daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portal_refuses_to_start_as_a_role_that_steps_over_row_level_security() {
    let pg = Pg::start().await;
    let superuser = pg.client().await;
    roles(&superuser).await;
    superuser
        .batch_execute(
            "create role bypass login bypassrls in role walhook_portal;
             create role daemonish login in role walhook_portal, walhook_daemon;
             create role owner login in role walhook_portal;
             alter table walhook.tenants owner to owner;
             create role nobody login;",
        )
        .await
        .unwrap();
    let cases = [
        ("postgres", "role \"postgres\" is a superuser"),
        ("bypass", "role \"bypass\" has BYPASSRLS"),
        ("owner", "role \"owner\" owns walhook's tables (tenants)"),
        (
            "daemonish",
            "role \"daemonish\" is a member of walhook_daemon",
        ),
        ("ops", "role \"ops\" is a member of walhook_admin"),
        (
            "nobody",
            "role \"nobody\" is not a member of walhook_portal",
        ),
    ];
    for (role, why) in cases {
        let config = pg.config_with(|f| {
            f.merge(("portal.database_url", pg.url_as(role)))
                .merge(("portal.listen", "127.0.0.1:0"))
        });
        let e = walhook::portal::run(&config, CancellationToken::new())
            .await
            .expect_err(role)
            .to_string();
        assert!(e.contains(why), "{role}: {e}");
        assert!(e.contains("walhook_portal"), "{role}: {e}");
    }
    // the binary says so and exits non-zero
    let mut env = pg.env();
    env.push(("WALHOOK_PORTAL__LISTEN".into(), "127.0.0.1:0".into()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walhook"))
        .arg("portal")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is a superuser"), "{stderr}");
}

/// docs/portal.md's commands as written, with the real binary: `walhook portal` serves the links that
/// `walhook portal-link` prints.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portal_docs_commands_run_as_written() {
    let pg = Pg::start().await;
    let superuser = pg.client().await;
    roles(&superuser).await;
    superuser
        .batch_execute("insert into walhook.endpoints (tenant, url) values ('acme', 'https://hooks.acme.example/a')")
        .await
        .unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let public = format!("http://127.0.0.1:{port}");
    let mut env = pg.env();
    env.extend(
        [
            ("WALHOOK_PORTAL__DATABASE_URL", pg.url_as("portal")),
            ("WALHOOK_PORTAL__LISTEN", format!("127.0.0.1:{port}")),
            ("WALHOOK_PORTAL__PUBLIC_URL", public.clone()),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    );
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/portal.md")).unwrap();
    let commands: Vec<Vec<String>> = doc
        .split("```sh\n")
        .skip(1)
        .flat_map(|b| {
            b.split("```")
                .next()
                .unwrap()
                .lines()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .filter(|l| l.starts_with("walhook "))
        .map(|l| l.split_whitespace().skip(1).map(str::to_string).collect())
        .collect();
    let serve = commands
        .iter()
        .find(|c| c[0] == "portal")
        .expect("docs/portal.md shows `walhook portal`");
    let portal = KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_walhook"))
            .args(serve)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap(),
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    eventually("the portal listens", || async {
        tokio::net::TcpStream::connect(addr).await.is_ok()
    })
    .await;
    let links: Vec<_> = commands.iter().filter(|c| c[0] == "portal-link").collect();
    assert!(links.len() >= 2, "a tenant's and an operator's link");
    for args in links {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_walhook"))
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = String::from_utf8(out.stdout).unwrap();
        let path = printed
            .trim()
            .strip_prefix(&public)
            .unwrap_or_else(|| panic!("{args:?} printed {printed:?}"));
        let browser = Browser::open(addr, path).await;
        let home = browser.get("/").await;
        match args.iter().any(|a| a == "--operator") {
            true => assert_eq!(home.location(), "/operator"),
            false => assert!(home.body.contains("hooks.acme.example")),
        }
    }
    // an operator link needs walhook_admin: the daemon's role in pg.env() is the superuser, so the refusal is
    // shown with a role that may not
    let mut tenant_env = env.clone();
    for (k, v) in tenant_env.iter_mut() {
        if k == "WALHOOK_DATABASE_URL" {
            *v = pg.url_as("portal");
        }
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_walhook"))
        .args(["portal-link", "--operator"])
        .envs(tenant_env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("only walhook_admin may mint operator links"),
        "{stderr}"
    );
    // SIGTERM ends it cleanly
    unsafe { libc::kill(portal.0.id() as i32, libc::SIGTERM) };
    let status = tokio::task::spawn_blocking(move || {
        let mut portal = portal;
        portal.0.wait()
    })
    .await
    .unwrap()
    .unwrap();
    assert!(status.success(), "{status:?}");
}

/// docs/portal.md's `[portal]` examples are valid configuration.
#[test]
fn the_portal_docs_toml_loads() {
    let doc =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/portal.md")).unwrap();
    let blocks: Vec<&str> = doc
        .split("```toml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .collect();
    assert!(!blocks.is_empty());
    for block in blocks {
        let figment =
            figment::Figment::from(figment::providers::Serialized::defaults(Config::default()))
                .merge(<figment::providers::Toml as figment::providers::Format>::string(block));
        Config::from_figment(figment).unwrap_or_else(|e| panic!("{block}: {e}"));
    }
}

/// config/walhook-portal.service runs `walhook portal` with the relay unit's hardening, line for line
/// (.ci/run has systemd-analyze verify both and rate their exposure).
#[test]
fn the_portal_unit_has_the_relays_hardening() {
    let read = |name: &str| {
        std::fs::read_to_string(format!("{}/config/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    };
    let hardening = |unit: &str| -> Vec<String> {
        unit.split("# Hardening")
            .nth(1)
            .expect("a hardening block")
            .split("[Install]")
            .next()
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    };
    let (relay, portal) = (read("walhook.service"), read("walhook-portal.service"));
    assert_eq!(hardening(&portal), hardening(&relay));
    let exec = portal
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap();
    assert_eq!(
        exec,
        "/usr/local/bin/walhook --config /etc/walhook/walhook.toml portal"
    );
    assert!(portal.contains("\nEnvironmentFile=/etc/walhook/portal.env\n"));
}

/// Behind a reverse proxy that serves the portal under a path of the application's https site, embedded in the
/// application's pages: links, redirects and the cookie carry the path, the cookie is `SameSite=None; Secure`,
/// and the CSP names the application as the only frame ancestor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_a_proxy_under_a_path_and_embedded() {
    let pg = Pg::start().await;
    let superuser = pg.client().await;
    roles(&superuser).await;
    let e = tenant_endpoint(&superuser, "acme", "https://hooks.acme.example/a").await;
    let config = pg.config_with(|f| {
        f.merge(("portal.database_url", pg.url_as("portal")))
            .merge(("portal.frame_ancestors", "https://app.example.com"))
            .merge(("portal.brand_name", "Acme <hooks>"))
            .merge(("portal.brand_color", "#0f766e"))
            .merge(("portal.logo_url", "/logo.svg"))
    });
    let web = Web::start_with(&config, |_| "https://app.example.com/webhooks".into()).await;
    let addr = web.addr;
    let path = link(&superuser, Some("acme")).await;
    assert_eq!(
        request(addr, "GET", &path, &[], None).await.status,
        404,
        "outside the prefix"
    );
    let opened = request(addr, "GET", &format!("/webhooks{path}"), &[], None).await;
    assert_eq!(opened.status, 303, "{opened:?}");
    assert_eq!(opened.location(), "/webhooks/");
    let cookie = opened.header("set-cookie");
    assert!(
        cookie.ends_with("; Max-Age=28800; HttpOnly; Path=/webhooks; SameSite=None; Secure"),
        "{cookie}"
    );
    assert!(opened
        .header("content-security-policy")
        .ends_with("; frame-ancestors https://app.example.com"));
    assert_eq!(opened.header("x-frame-options"), "");
    let session = cookie.split(';').next().unwrap().to_string();
    let home = request(addr, "GET", "/webhooks/", &[("cookie", &session)], None).await;
    assert_eq!(home.status, 200, "{home:?}");
    for href in [
        "href=\"/webhooks/static/portal.css\"",
        "src=\"/webhooks/static/portal.js\"",
        &format!("href=\"/webhooks/endpoints/{e}\""),
        "action=\"/webhooks/logout\"",
        "<img class=\"logo\" src=\"/logo.svg\"",
        "<span>Acme &lt;hooks&gt;</span>",
    ] {
        assert!(home.body.contains(href), "{href} in {}", home.body);
    }
    let css = request(addr, "GET", "/webhooks/static/portal.css", &[], None).await;
    assert!(css.body.starts_with(":root { --brand: #0f766e; }"));
    // the application's own origin is the portal's: its framed forms pass, another's do not
    let csrf = csrf_of(&home.body);
    let pause = |origin: &'static str| {
        let body = form(&[("csrf", &csrf)]);
        let session = session.clone();
        async move {
            request(
                addr,
                "POST",
                &format!("/webhooks/endpoints/{e}/pause"),
                &[("cookie", &session), ("origin", origin)],
                Some(body),
            )
            .await
        }
    };
    assert_eq!(pause("https://evil.example").await.status, 403);
    let paused = pause("https://app.example.com").await;
    assert_eq!(paused.status, 303, "{paused:?}");
    assert_eq!(paused.location(), format!("/webhooks/endpoints/{e}"));
    web.stop().await;
}
