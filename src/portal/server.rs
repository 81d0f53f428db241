//! The HTTP side: connections, limits, the session's transaction, and the headers every response carries.
//!
//! A request meets, in order: the size limits (URL, body, each field), the static files and the link exchange
//! (the only routes without a session), then for everything else one transaction on a pooled session that
//! finds the cookie's session, checks a change's CSRF token and origin, sets `walhook.tenant` for the
//! transaction and runs the page. Any failure rolls the transaction back. Nothing here chooses rows by tenant:
//! an id that is not the session's finds nothing and answers 404, like an id that does not exist.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

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
use tokio_util::sync::CancellationToken;

use super::auth::{self, CookiePolicy, Session};
use super::form::Form;
use super::pages::{self, Theme};
use super::pool::{Pool, Unavailable};
use super::queries;
use super::routes::{self, Call};
use crate::config::PortalConfig;
use crate::dispatch::guard::NetworkPolicy;

/// Longest request URL.
pub const MAX_URL: usize = 2048;
/// Largest request body.
pub const MAX_BODY: usize = 64 * 1024;

const CSS: &str = include_str!("static/portal.css");
const JS: &str = include_str!("static/portal.js");

/// The portal's settings, derived once from `[portal]` and the delivery policy.
#[derive(Clone, Debug)]
pub struct Settings {
    pub(super) theme: Theme,
    /// `scheme://host[:port]` of `portal.public_url`: the only origin a change may come from.
    pub(super) origin: String,
    pub(super) cookie: CookiePolicy,
    pub(super) csp: HeaderValue,
    pub(super) frame_deny: bool,
    pub(super) session_ttl: Duration,
    pub(super) policy: NetworkPolicy,
    pub(super) css: Bytes,
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

pub(super) type Page = Response<Full<Bytes>>;

/// Why a request gets no page of its own.
#[derive(Debug)]
pub(super) enum Failure {
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

pub(super) fn html(status: StatusCode, body: String) -> Page {
    let mut page = Response::new(Full::new(Bytes::from(body)));
    *page.status_mut() = status;
    page.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    page
}

/// 303 to a path of the portal.
pub(super) fn see_other(settings: &Settings, path: &str) -> Page {
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
    match routes::page(&request, post, &segments).await {
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

#[cfg(test)]
mod tests {
    use super::*;

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
