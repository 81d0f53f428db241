//! The HTTP side: connections, limits, routing, and the headers every response carries.
//!
//! A request meets, in order: the size limits (URL, body, each field), the static files and the link exchange
//! (the only routes without a session), then for everything else one transaction on a pooled session that
//! finds the cookie's session, checks a change's CSRF token and origin, sets `walhook.tenant` for the
//! transaction and runs the page. Any failure rolls the transaction back. Nothing here chooses rows by tenant:
//! an id that is not the session's finds nothing and answers 404, like an id that does not exist.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;
use tokio_postgres::Transaction;
use tokio_util::sync::CancellationToken;

use super::auth::{self, CookiePolicy, Session};
use super::form::Form;
use super::pages::{self, EndpointValues, FilterValues, Notice, Theme};
use super::pool::{Pool, Unavailable};
use super::queries::{self, DeliveryFilter, EndpointInput, Switch, PAGE};
use crate::config::PortalConfig;
use crate::dispatch::guard::{self, NetworkPolicy};

/// Longest request URL.
pub const MAX_URL: usize = 2048;
/// Largest request body.
pub const MAX_BODY: usize = 64 * 1024;

const CSS: &str = include_str!("static/portal.css");
const JS: &str = include_str!("static/portal.js");

/// The portal's settings, derived once from `[portal]` and the delivery policy.
#[derive(Clone, Debug)]
pub struct Settings {
    theme: Theme,
    /// `scheme://host[:port]` of `portal.public_url`: the only origin a change may come from.
    origin: String,
    cookie: CookiePolicy,
    csp: HeaderValue,
    frame_deny: bool,
    session_ttl: Duration,
    policy: NetworkPolicy,
    css: Bytes,
}

impl Settings {
    /// What an operator should hear at start-up about these settings.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if self.cookie.embedded && !self.cookie.secure {
            warnings.push(
                "portal.frame_ancestors lets other sites frame the portal, but portal.public_url is not https: \
                 browsers drop a framed site's cookies unless they are SameSite=None; Secure, so serve the \
                 portal over https and set portal.public_url to its https:// address"
                    .to_string(),
            );
        }
        warnings
    }
}

impl Settings {
    /// From a validated `[portal]` section and the delivery's network policy.
    pub fn new(config: &PortalConfig, policy: NetworkPolicy) -> Settings {
        let public = config.public_url();
        let (scheme, rest) = public.split_once("://").unwrap_or(("http", &public));
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let secure = scheme.eq_ignore_ascii_case("https");
        let frame_ancestors = config
            .frame_ancestors
            .split_ascii_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let csp = format!(
            "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self' https: data:; \
             form-action 'self'; base-uri 'none'; frame-ancestors {frame_ancestors}"
        );
        Settings {
            theme: Theme {
                base: path.to_string(),
                brand_name: config.brand_name.trim().to_string(),
                logo_url: config.logo_url.clone(),
            },
            origin: format!(
                "{}://{}",
                scheme.to_ascii_lowercase(),
                authority.to_ascii_lowercase()
            ),
            cookie: CookiePolicy {
                path: if path.is_empty() {
                    "/".into()
                } else {
                    path.to_string()
                },
                secure,
                // framed by another site: its requests are third-party ('self' alone needs nothing more)
                embedded: config
                    .frame_ancestors
                    .split_ascii_whitespace()
                    .any(|source| source != "'none'" && source != "'self'"),
            },
            csp: HeaderValue::from_str(&csp).expect("checked by the configuration"),
            frame_deny: frame_ancestors == "'none'",
            session_ttl: config.session_ttl,
            policy,
            css: Bytes::from(format!(
                ":root {{ --brand: {}; }}\n{CSS}",
                config.brand_color
            )),
        }
    }
}

pub(super) struct Portal {
    settings: Settings,
    pool: Pool,
}

impl Portal {
    pub(super) fn new(settings: Settings, pool: Pool) -> Portal {
        Portal { settings, pool }
    }
}

/// Serves one HTTP/1.1 connection; on `stop`, finishes the request in progress and closes.
pub(super) async fn connection(portal: Arc<Portal>, stream: TcpStream, stop: CancellationToken) {
    let service = service_fn(move |req| {
        let portal = portal.clone();
        async move { Ok::<_, Infallible>(handle(&portal, req).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(32 * 1024)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

type Page = Response<Full<Bytes>>;

/// Why a request gets no page of its own.
#[derive(Debug)]
enum Failure {
    NotFound,
    Method,
    BadRequest(String),
    TooLarge(String),
    Forbidden(String),
    /// A change (POST) without a live session.
    Unauthorized,
    /// A page (GET) without a live session: sent to the page that says so.
    Expired,
    Db(tokio_postgres::Error),
    Unavailable(Unavailable),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        Failure::Db(e)
    }
}

impl From<Unavailable> for Failure {
    fn from(e: Unavailable) -> Self {
        Failure::Unavailable(e)
    }
}

async fn handle(portal: &Portal, req: Request<Incoming>) -> Page {
    let is_static = req.uri().path().contains("/static/");
    let mut page = match route(portal, req).await {
        Ok(page) => page,
        Err(failure) => failure_page(&portal.settings, failure, None),
    };
    let s = &portal.settings;
    let cacheable = is_static && page.status() == StatusCode::OK;
    let headers = page.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, s.csp.clone());
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if s.frame_deny {
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    if !cacheable {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    page
}

fn html(status: StatusCode, body: String) -> Page {
    let mut page = Response::new(Full::new(Bytes::from(body)));
    *page.status_mut() = status;
    page.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    page
}

/// 303 to a path of the portal.
fn see_other(settings: &Settings, path: &str) -> Page {
    let mut page = Response::new(Full::new(Bytes::new()));
    *page.status_mut() = StatusCode::SEE_OTHER;
    let location = format!("{}{path}", settings.theme.base);
    page.headers_mut().insert(
        header::LOCATION,
        HeaderValue::from_str(&location).expect("a checked base and a path of ours"),
    );
    page
}

fn failure_page(settings: &Settings, failure: Failure, session: Option<&Session>) -> Page {
    let theme = &settings.theme;
    let (status, title, text) = match failure {
        Failure::Expired => return see_other(settings, "/expired"),
        Failure::NotFound => (
            StatusCode::NOT_FOUND,
            "Not found",
            "There is nothing here, or it is not yours to see.".to_string(),
        ),
        Failure::Method => (
            StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed",
            "The portal answers GET for pages and POST for changes.".to_string(),
        ),
        Failure::BadRequest(why) => (StatusCode::BAD_REQUEST, "Bad request", why),
        Failure::TooLarge(why) => (StatusCode::PAYLOAD_TOO_LARGE, "Too large", why),
        Failure::Forbidden(why) => (StatusCode::FORBIDDEN, "Refused", why),
        Failure::Unauthorized => (
            StatusCode::UNAUTHORIZED,
            "Session expired",
            "Your session has expired or you have logged out: ask for a new link.".to_string(),
        ),
        Failure::Unavailable(why) => {
            match &why {
                Unavailable::Busy => tracing::warn!("portal: every database session stayed busy"),
                Unavailable::Connect(e) => tracing::error!("portal: {e}"),
            }
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "Unavailable",
                "The portal cannot reach its database right now: try again in a moment."
                    .to_string(),
            )
        }
        Failure::Db(e) => db_failure(&e),
    };
    let mut page = html(status, pages::message(theme, session, title, &text));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        page.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, POST"));
    }
    page
}

/// What a failed statement shows: PostgreSQL's message for the customer's own mistakes, nothing of the
/// server's internals otherwise (those go to the log).
fn db_failure(e: &tokio_postgres::Error) -> (StatusCode, &'static str, String) {
    let Some(db) = e.as_db_error() else {
        tracing::error!("portal: {}", crate::pgerror::describe(e));
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "Unavailable",
            "The portal lost its database connection: try again in a moment.".into(),
        );
    };
    let shown = crate::pgerror::ServerError::from_db(db).to_string();
    let code = db.code();
    if *code == SqlState::NO_DATA_FOUND {
        return (
            StatusCode::NOT_FOUND,
            "Not found",
            "There is nothing here, or it is not yours to see.".into(),
        );
    }
    if *code == SqlState::QUERY_CANCELED {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "Too slow",
            "This page took too long to prepare: try again, or narrow the filters.".into(),
        );
    }
    let class = &code.code()[..2];
    if matches!(class, "22" | "23" | "55" | "P0") {
        return (StatusCode::CONFLICT, "Refused", shown);
    }
    tracing::error!("portal: {}", crate::pgerror::describe(e));
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        "Something went wrong",
        "The portal could not complete this request; it has been logged.".into(),
    )
}

async fn route(portal: &Portal, req: Request<Incoming>) -> Result<Page, Failure> {
    let s = &portal.settings;
    if req.uri().to_string().len() > MAX_URL {
        return Err(Failure::BadRequest(format!(
            "The address is longer than {MAX_URL} characters."
        )));
    }
    let path = req.uri().path().to_string();
    let Some(path) = path.strip_prefix(s.theme.base.as_str()) else {
        return Err(Failure::NotFound);
    };
    let path = if path.is_empty() { "/" } else { path };
    if !path.starts_with('/') {
        return Err(Failure::NotFound);
    }
    let query =
        Form::parse(req.uri().query().unwrap_or("")).map_err(|r| Failure::BadRequest(r.0))?;
    let method = req.method().clone();
    if method != Method::GET && method != Method::POST {
        return Err(Failure::Method);
    }
    match (method == Method::GET, path) {
        (true, "/static/portal.css") => return Ok(file("text/css; charset=utf-8", s.css.clone())),
        (true, "/static/portal.js") => {
            return Ok(file(
                "text/javascript; charset=utf-8",
                Bytes::from_static(JS.as_bytes()),
            ))
        }
        (true, "/login") => return login(portal, &query).await,
        (true, "/expired") => {
            let text = "Your session has expired or you have logged out: ask for a new link.";
            return Ok(html(
                StatusCode::UNAUTHORIZED,
                pages::message(&s.theme, None, "Session expired", text),
            ));
        }
        _ => {}
    }
    let segments: Vec<String> = path
        .split('/')
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    let cookie = auth::session_cookie(req.headers());
    let post = method == Method::POST;
    let form = match post {
        true => {
            auth::same_origin(req.headers(), &s.origin).map_err(Failure::Forbidden)?;
            read_form(req).await?
        }
        false => Form::default(),
    };
    let refused = if post {
        Failure::Unauthorized
    } else {
        Failure::Expired
    };
    let Some(cookie) = cookie else {
        return Err(refused);
    };
    let mut conn = portal.pool.get().await?;
    let tx = conn.transaction().await?;
    let Some(row) = tx.query_opt(queries::SESSION, &[&cookie]).await? else {
        return Err(refused);
    };
    let session = Session {
        token: cookie,
        tenant: row.get(0),
        operator: row.get(1),
        csrf: row.get(2),
        viewing: row.get(3),
    };
    if post
        && !form
            .get("csrf")
            .is_some_and(|sent| auth::same_secret(sent, &session.csrf))
    {
        return Ok(failure_page(
            s,
            Failure::Forbidden(
                "This form is out of date or was not sent from the portal: reload the page and try again."
                    .into(),
            ),
            Some(&session),
        ));
    }
    tx.execute(queries::SCOPE, &[&session.scope().unwrap_or("")])
        .await?;
    let request = Call {
        s,
        session: &session,
        tx: &tx,
        query: &query,
        form: &form,
    };
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    match page(&request, post, &segments).await {
        Ok(page) => {
            tx.commit().await?;
            Ok(page)
        }
        // dropping the transaction rolls it back
        Err(failure) => Ok(failure_page(s, failure, Some(&session))),
    }
}

fn file(content_type: &'static str, body: Bytes) -> Page {
    let mut page = Response::new(Full::new(body));
    page.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    page.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=3600"),
    );
    page
}

async fn read_form(req: Request<Incoming>) -> Result<Form, Failure> {
    let too_large =
        || Failure::TooLarge(format!("The form is larger than {} KiB.", MAX_BODY / 1024));
    let length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if length.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    let form_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        });
    let body = Limited::new(req.into_body(), MAX_BODY);
    let collected = tokio::time::timeout(Duration::from_secs(30), body.collect())
        .await
        .map_err(|_| Failure::BadRequest("The form took too long to arrive.".into()))?;
    let bytes = match collected {
        Ok(c) => c.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => return Err(too_large()),
        Err(_) => return Err(Failure::BadRequest("The form did not arrive whole.".into())),
    };
    if bytes.is_empty() {
        return Ok(Form::default());
    }
    if !form_type {
        return Err(Failure::BadRequest(
            "Expected a form (application/x-www-form-urlencoded).".into(),
        ));
    }
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| Failure::BadRequest("The form is not UTF-8.".into()))?;
    Form::parse(text).map_err(|r| Failure::BadRequest(format!("{}.", r.0)))
}

/// `GET /login?token=…`: exchanges a link for a session, once.
async fn login(portal: &Portal, query: &Form) -> Result<Page, Failure> {
    let s = &portal.settings;
    let invalid = || {
        html(
            StatusCode::UNAUTHORIZED,
            pages::message(
                &s.theme,
                None,
                "Link not valid",
                "This link is used, expired or invalid: ask for a new one.",
            ),
        )
    };
    let Some(token) = query.get("token").filter(|t| auth::is_token(t)) else {
        return Ok(invalid());
    };
    let conn = portal.pool.get().await?;
    let ttl = format!("{} seconds", s.session_ttl.as_secs());
    let Some(row) = conn.query_opt(queries::EXCHANGE, &[&token, &ttl]).await? else {
        return Ok(invalid());
    };
    let session: String = row.get(0);
    let mut page = see_other(s, "/");
    page.headers_mut().insert(
        header::SET_COOKIE,
        s.cookie.set(&session, s.session_ttl.as_secs()),
    );
    Ok(page)
}

/// One request inside its transaction.
struct Call<'a> {
    s: &'a Settings,
    session: &'a Session,
    tx: &'a Transaction<'a>,
    query: &'a Form,
    form: &'a Form,
}

impl Call<'_> {
    fn ok(&self, body: String) -> Page {
        html(StatusCode::OK, body)
    }

    fn theme(&self) -> &Theme {
        &self.s.theme
    }
}

fn id(segment: &str) -> Result<i64, Failure> {
    segment
        .parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or(Failure::NotFound)
}

async fn page(c: &Call<'_>, post: bool, path: &[&str]) -> Result<Page, Failure> {
    // pages of the operator and the session itself
    match (post, path) {
        (false, ["operator"]) => return operator(c).await,
        (true, ["operator", "view"]) => return view(c).await,
        (true, ["logout"]) => return logout(c).await,
        _ => {}
    }
    // the rest is one tenant's: an operator picks one first
    if c.session.scope().is_none() {
        return match post {
            false => Ok(see_other(c.s, "/operator")),
            true => Err(Failure::Forbidden(
                "Choose a tenant to view on the overview first.".into(),
            )),
        };
    }
    match (post, path) {
        (false, []) => endpoint_list(c).await,
        (false, ["endpoints", "new"]) => {
            let known = queries::recent_event_types(c.tx).await?;
            let values = EndpointValues {
                event_types: vec!["*".into()],
                ..Default::default()
            };
            Ok(c.ok(pages::endpoint_form(
                c.theme(),
                c.session,
                None,
                &values,
                &known,
                None,
            )))
        }
        (true, ["endpoints"]) => save_endpoint(c, None).await,
        (false, ["endpoints", e]) => endpoint_page(c, id(e)?, Notice::None).await,
        (false, ["endpoints", e, "edit"]) => {
            let id = id(e)?;
            let e = queries::endpoint(c.tx, id)
                .await?
                .ok_or(Failure::NotFound)?;
            let known = queries::recent_event_types(c.tx).await?;
            let values = EndpointValues {
                url: e.url,
                event_types: e.event_types,
                description: e.description,
                rate_limit: e.rate_limit.map(|r| r.to_string()).unwrap_or_default(),
            };
            Ok(c.ok(pages::endpoint_form(
                c.theme(),
                c.session,
                Some(id),
                &values,
                &known,
                None,
            )))
        }
        (true, ["endpoints", e, action]) => endpoint_action(c, id(e)?, action).await,
        (false, ["deliveries"]) => delivery_list(c).await,
        (false, ["deliveries", d]) => {
            let id = id(d)?;
            let d = queries::delivery(c.tx, id)
                .await?
                .ok_or(Failure::NotFound)?;
            let attempts = queries::attempts(c.tx, id).await?;
            Ok(c.ok(pages::delivery(c.theme(), c.session, &d, &attempts)))
        }
        (true, ["deliveries", d, "resend"]) => {
            let id = id(d)?;
            match queries::resend(c.tx, id).await? {
                0 => Err(Failure::NotFound),
                _ => Ok(see_other(c.s, &format!("/deliveries/{id}"))),
            }
        }
        (true, ["recover"]) => recover(c).await,
        (false, ["operator", ..]) | (true, _) | (false, _) => Err(Failure::NotFound),
    }
}

async fn endpoint_list(c: &Call<'_>) -> Result<Page, Failure> {
    let after = match c.query.get("after") {
        Some(a) => Some(
            a.parse::<i64>()
                .map_err(|_| Failure::BadRequest("after: expected an endpoint id.".into()))?,
        ),
        None => None,
    };
    let mut lines = queries::endpoints(c.tx, after).await?;
    let next = (lines.len() as i64 > PAGE).then(|| {
        lines.truncate(PAGE as usize);
        lines.last().map(|l| l.id)
    });
    Ok(c.ok(pages::endpoints(
        c.theme(),
        c.session,
        &lines,
        next.flatten(),
    )))
}

async fn endpoint_page(c: &Call<'_>, id: i64, notice: Notice) -> Result<Page, Failure> {
    let e = queries::endpoint(c.tx, id)
        .await?
        .ok_or(Failure::NotFound)?;
    let filter = DeliveryFilter {
        endpoint: Some(id),
        ..Default::default()
    };
    let recent = queries::deliveries(c.tx, &filter, 10).await?;
    Ok(c.ok(pages::endpoint(c.theme(), c.session, &e, &recent, notice)))
}

/// The endpoint form's values, and what to save; or what to say.
fn endpoint_input(form: &Form) -> (EndpointValues, Result<EndpointInput, String>) {
    let mut patterns: Vec<String> = Vec::new();
    let other = form.get("event_types_other").unwrap_or("");
    let typed = other
        .split(|c: char| c == ',' || c.is_whitespace())
        .filter(|p| !p.is_empty());
    for p in form.all("event_types").chain(typed) {
        if !patterns.iter().any(|q| q == p) {
            patterns.push(p.to_string());
        }
    }
    let values = EndpointValues {
        url: form.get("url").unwrap_or("").to_string(),
        event_types: patterns.clone(),
        description: form.get("description").unwrap_or("").to_string(),
        rate_limit: form.get("rate_limit").unwrap_or("").to_string(),
    };
    let input = (|| {
        if values.url.is_empty() {
            return Err("Enter the endpoint's URL.".to_string());
        }
        if patterns.is_empty() {
            return Err("Pick at least one event type (or every event type, *).".to_string());
        }
        if patterns.len() > 100 {
            return Err("At most 100 event type patterns.".to_string());
        }
        let rate_limit = match form.get("rate_limit") {
            None => None,
            Some(r) => Some(r.parse::<f64>().map_err(|_| {
                format!("The rate limit {r:?} is not a number of requests per second.")
            })?),
        };
        Ok(EndpointInput {
            url: values.url.clone(),
            event_types: patterns.clone(),
            description: values.description.clone(),
            rate_limit,
        })
    })();
    (values, input)
}

/// The network guard's verdict on an endpoint URL, before it is saved: the daemon would refuse to deliver to a
/// private address, so the customer hears it now. Names that do not resolve here pass (the daemon may see
/// other DNS); the daemon checks every address again when it connects.
async fn network_verdict(policy: &NetworkPolicy, url: &str) -> Result<(), String> {
    let Ok(uri) = url.parse::<hyper::Uri>() else {
        return Ok(()); // SQL's check_url says what is wrong with it
    };
    let Some(host) = uri.host() else {
        return Ok(());
    };
    let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
        Some("https") => 443,
        _ => 80,
    });
    let addresses: Vec<IpAddr> = match guard::parse_host(host) {
        guard::Host::Ip(ip) => vec![ip],
        guard::Host::Name(name) => {
            let lookup = tokio::net::lookup_host((name.to_string(), port));
            match tokio::time::timeout(Duration::from_secs(5), lookup).await {
                Ok(Ok(found)) => found.map(|a| a.ip()).collect(),
                _ => return Ok(()),
            }
        }
    };
    for ip in addresses {
        if let Err(blocked) = policy.permits(ip) {
            return Err(format!(
                "Webhooks cannot be delivered to {host}: {blocked}. Use a public address."
            ));
        }
    }
    Ok(())
}

/// `POST /endpoints` (`id` None) and `POST /endpoints/{id}/edit`.
async fn save_endpoint(c: &Call<'_>, id: Option<i64>) -> Result<Page, Failure> {
    let (values, input) = endpoint_input(c.form);
    let checked = match input {
        Ok(input) => network_verdict(&c.s.policy, &input.url)
            .await
            .map(|()| input),
        Err(why) => Err(why),
    };
    let refused = match checked {
        Err(why) => why,
        Ok(input) => {
            // a savepoint, so that the form can be shown again in this transaction after a refusal
            c.tx.batch_execute("savepoint endpoint_form").await?;
            let saved = match id {
                None => queries::create_endpoint(c.tx, &input).await.map(Some),
                Some(id) => queries::update_endpoint(c.tx, id, &input)
                    .await
                    .map(|found| found.then_some(id)),
            };
            match saved {
                Ok(Some(id)) => return Ok(see_other(c.s, &format!("/endpoints/{id}"))),
                Ok(None) => return Err(Failure::NotFound),
                Err(e) => match e.as_db_error() {
                    Some(db)
                        if *db.code() != SqlState::NO_DATA_FOUND
                            && !db.code().code().starts_with("57") =>
                    {
                        let shown = crate::pgerror::ServerError::from_db(db).to_string();
                        c.tx.batch_execute("rollback to savepoint endpoint_form")
                            .await?;
                        shown
                    }
                    _ => return Err(e.into()),
                },
            }
        }
    };
    let known = queries::recent_event_types(c.tx).await?;
    Ok(html(
        StatusCode::UNPROCESSABLE_ENTITY,
        pages::endpoint_form(c.theme(), c.session, id, &values, &known, Some(&refused)),
    ))
}

async fn endpoint_action(c: &Call<'_>, id: i64, action: &str) -> Result<Page, Failure> {
    let back = format!("/endpoints/{id}");
    let switch = match action {
        "edit" => return save_endpoint(c, Some(id)).await,
        "pause" => Switch::Pause,
        "resume" => Switch::Resume,
        "enable" => Switch::Enable,
        "disable" => Switch::Disable,
        "delete" => {
            if c.form.get("confirm") != Some("yes") {
                return Err(Failure::BadRequest(
                    "Tick the box that confirms the deletion.".into(),
                ));
            }
            return match queries::delete_endpoint(c.tx, id).await? {
                true => Ok(see_other(c.s, "/")),
                false => Err(Failure::NotFound),
            };
        }
        "reveal" => {
            let secret = queries::secret(c.tx, id).await?.ok_or(Failure::NotFound)?;
            return endpoint_page(c, id, Notice::Secret(secret)).await;
        }
        "rotate" => {
            let grace = match c.form.get("grace").unwrap_or("24 hours") {
                g @ ("0" | "1 hour" | "24 hours" | "7 days") => g,
                _ => {
                    return Err(Failure::BadRequest(
                        "Choose a grace period from the list.".into(),
                    ))
                }
            };
            let secret = queries::rotate_secret(c.tx, id, grace).await?;
            return endpoint_page(c, id, Notice::Rotated(secret)).await;
        }
        "test" => {
            let delivery = queries::send_test(c.tx, id).await?;
            return Ok(see_other(c.s, &format!("/deliveries/{delivery}")));
        }
        _ => return Err(Failure::NotFound),
    };
    match queries::switch(c.tx, id, switch).await? {
        true => Ok(see_other(c.s, &back)),
        false => Err(Failure::NotFound),
    }
}

/// A time typed in a form, in UTC: `2026-12-01T10:00` (datetime-local), with seconds, or RFC 3339.
fn parse_time(text: &str) -> Result<SystemTime, String> {
    let full = match text.len() {
        16 => format!("{text}:00"),
        _ => text.to_string(),
    };
    humantime::parse_rfc3339_weak(&full)
        .map_err(|_| format!("{text:?} is not a time like 2026-12-01T10:00 (UTC)."))
}

async fn delivery_list(c: &Call<'_>) -> Result<Page, Failure> {
    let q = c.query;
    let values = FilterValues {
        status: q.get("status").unwrap_or("").to_string(),
        event_type: q.get("event_type").unwrap_or("").to_string(),
        endpoint: q.get("endpoint").unwrap_or("").to_string(),
        since: q.get("since").unwrap_or("").to_string(),
    };
    let bad = |why: String| Failure::BadRequest(why);
    let mut filter = DeliveryFilter::default();
    if !values.status.is_empty() {
        if !matches!(values.status.as_str(), "pending" | "succeeded" | "dead") {
            return Err(bad("status: expected pending, succeeded or dead.".into()));
        }
        filter.status = Some(values.status.clone());
    }
    if !values.event_type.is_empty() {
        filter.event_type = Some(values.event_type.clone());
    }
    if !values.endpoint.is_empty() {
        filter.endpoint = Some(
            values
                .endpoint
                .parse()
                .map_err(|_| bad("endpoint: expected an endpoint id.".into()))?,
        );
    }
    if !values.since.is_empty() {
        filter.since = Some(parse_time(&values.since).map_err(bad)?);
    }
    if let Some(before) = q.get("before") {
        filter.before = Some(
            before
                .parse()
                .map_err(|_| bad("before: expected a delivery id.".into()))?,
        );
    }
    let mut lines = queries::deliveries(c.tx, &filter, PAGE + 1).await?;
    let next = (lines.len() as i64 > PAGE).then(|| {
        lines.truncate(PAGE as usize);
        lines.last().map(|l| l.id)
    });
    Ok(c.ok(pages::deliveries(
        c.theme(),
        c.session,
        &values,
        &lines,
        next.flatten(),
        None,
    )))
}

async fn recover(c: &Call<'_>) -> Result<Page, Failure> {
    let since = c
        .form
        .get("since")
        .ok_or_else(|| Failure::BadRequest("Enter the time to recover from.".into()))?;
    let since = parse_time(since).map_err(Failure::BadRequest)?;
    let endpoint = match c.form.get("endpoint") {
        Some(e) => Some(
            e.parse::<i64>()
                .map_err(|_| Failure::BadRequest("endpoint: expected an endpoint id.".into()))?,
        ),
        None => None,
    };
    let n = queries::recover(c.tx, since, endpoint).await?;
    let text = match n {
        1 => "1 missed delivery was queued; it is sent at once.".to_string(),
        n => format!("{n} missed deliveries were queued; they are sent at once."),
    };
    Ok(c.ok(pages::message(
        c.theme(),
        Some(c.session),
        "Recovered",
        &text,
    )))
}

async fn operator(c: &Call<'_>) -> Result<Page, Failure> {
    if !c.session.operator {
        return Err(Failure::Forbidden(
            "The overview is for operators only.".into(),
        ));
    }
    let lines = queries::overview(c.tx, &c.session.token).await?;
    let slots = queries::slots(c.tx, &c.session.token).await?;
    Ok(c.ok(pages::operator(c.theme(), c.session, &lines, &slots)))
}

async fn view(c: &Call<'_>) -> Result<Page, Failure> {
    if !c.session.operator {
        return Err(Failure::Forbidden(
            "Only an operator's session views other tenants.".into(),
        ));
    }
    let tenant = c.form.get("tenant").unwrap_or("");
    c.tx.execute(queries::VIEW, &[&c.session.token, &tenant])
        .await?;
    Ok(see_other(
        c.s,
        if tenant.is_empty() { "/operator" } else { "/" },
    ))
}

async fn logout(c: &Call<'_>) -> Result<Page, Failure> {
    c.tx.execute(queries::LOGOUT, &[&c.session.token]).await?;
    let mut page = html(
        StatusCode::OK,
        pages::message(
            c.theme(),
            None,
            "Logged out",
            "You have logged out. To come back, ask for a new link.",
        ),
    );
    page.headers_mut()
        .insert(header::SET_COOKIE, c.s.cookie.clear());
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_typed_in_forms() {
        assert!(parse_time("2026-12-01T10:00").is_ok());
        assert!(parse_time("2026-12-01T10:00:30").is_ok());
        assert!(parse_time("2026-12-01T10:00:30Z").is_ok());
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn settings_follow_the_public_url() {
        let mut config = PortalConfig {
            public_url: "https://App.example.com/webhooks/".into(),
            frame_ancestors: "https://app.example.com".into(),
            ..Default::default()
        };
        let s = Settings::new(&config, NetworkPolicy::default());
        assert_eq!(s.origin, "https://app.example.com");
        assert_eq!(s.theme.base, "/webhooks");
        assert_eq!(s.cookie.path, "/webhooks");
        assert!(s.cookie.secure && s.cookie.embedded && !s.frame_deny);
        assert!(s
            .csp
            .to_str()
            .unwrap()
            .ends_with("frame-ancestors https://app.example.com"));
        config.public_url = String::new();
        config.frame_ancestors = "'none'".into();
        let s = Settings::new(&config, NetworkPolicy::default());
        assert_eq!(s.origin, "http://127.0.0.1:8090");
        assert_eq!((s.theme.base.as_str(), s.cookie.path.as_str()), ("", "/"));
        assert!(!s.cookie.secure && !s.cookie.embedded && s.frame_deny);
        assert!(s.warnings().is_empty());
        config.frame_ancestors = "'self'".into();
        let s = Settings::new(&config, NetworkPolicy::default());
        assert!(!s.cookie.embedded && !s.frame_deny && s.warnings().is_empty());
        config.frame_ancestors = "'self' https://app.example.com".into();
        let s = Settings::new(&config, NetworkPolicy::default());
        assert!(s.cookie.embedded);
        assert!(s.warnings()[0].contains("not https"));
    }
}
