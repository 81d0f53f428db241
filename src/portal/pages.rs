//! The portal's pages: server-rendered HTML, one function per page, every value from the database or the
//! request passed through [`esc`].
//!
//! Plain `format!` with escaping at each interpolation keeps the markup readable next to its data without a
//! template engine; the rule that keeps it safe is simple: a `{}` in markup takes `esc(..)`, a number, or
//! another function of this file. Pages work without JavaScript: every action is a form (POST with the CSRF
//! token), confirmations are a required checkbox, and `portal.js` adds only confirm dialogs and copy buttons.
//! The CSP forbids inline styles and scripts, so the brand colour comes with the stylesheet.

use std::fmt::Write;

use super::auth::Session;
use super::queries::{
    Attempt, CatalogType, Delivery, DeliveryLine, Endpoint, EndpointLine, OverviewLine, Slot,
};

/// What the frame of every page shows: the configured name and logo, and the prefix of every link.
#[derive(Clone, Debug)]
pub(super) struct Theme {
    /// The path of `portal.public_url` (`""` or e.g. `/webhooks`), before every link.
    pub base: String,
    pub brand_name: String,
    pub logo_url: String,
}

/// HTML-escapes text for element content and quoted attribute values.
pub(super) fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn opt(text: &Option<String>) -> String {
    text.as_deref().map_or("—".into(), esc)
}

fn rate(rate: Option<f64>) -> String {
    rate.map_or("—".into(), |r| format!("{:.1} %", r * 100.0))
}

fn code(code: Option<i32>) -> String {
    code.map_or("—".into(), |c| c.to_string())
}

fn csrf(session: &Session) -> String {
    format!(
        r#"<input type="hidden" name="csrf" value="{}">"#,
        esc(&session.csrf)
    )
}

/// A one-button form that posts to `action`.
fn button(theme: &Theme, session: &Session, action: &str, label: &str, class: &str) -> String {
    format!(
        r#"<form method="post" action="{}{}" class="inline">{}<button class="{class}">{}</button></form>"#,
        esc(&theme.base),
        esc(action),
        csrf(session),
        esc(label)
    )
}

/// The whole document around `body`.
pub(super) fn layout(theme: &Theme, session: Option<&Session>, title: &str, body: &str) -> String {
    let base = esc(&theme.base);
    let logo = match theme.logo_url.as_str() {
        "" => String::new(),
        url => format!(r#"<img class="logo" src="{}" alt="">"#, esc(url)),
    };
    let mut nav = String::new();
    let mut banner = String::new();
    if let Some(s) = session {
        if s.scope().is_some() {
            let _ = write!(
                nav,
                r#"<a href="{base}/">Endpoints</a><a href="{base}/deliveries">Deliveries</a>"#
            );
        }
        let _ = write!(nav, r#"<a href="{base}/event-types">Event types</a>"#);
        if s.operator {
            let _ = write!(nav, r#"<a href="{base}/operator">Overview</a>"#);
            if let Some(viewing) = &s.viewing {
                banner = format!(
                    r#"<div class="banner">Operator: viewing tenant <strong>{}</strong> {}</div>"#,
                    esc(viewing),
                    view_form(theme, s, "", "Stop viewing")
                );
            }
        }
        let _ = write!(
            nav,
            r#"<form method="post" action="{base}/logout" class="inline">{}<button class="link">Log out</button></form>"#,
            csrf(s)
        );
    }
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{} · {}</title><link rel="stylesheet" href="{base}/static/portal.css"><script src="{base}/static/portal.js" defer></script></head>
<body><header class="bar"><a class="brand" href="{base}/">{logo}<span>{}</span></a><nav>{nav}</nav></header>
{banner}<main>{body}</main></body></html>
"#,
        esc(title),
        esc(&theme.brand_name),
        esc(&theme.brand_name),
    )
}

/// A page that only says something (errors, expired links), with a way back when there is one.
pub(super) fn message(theme: &Theme, session: Option<&Session>, title: &str, text: &str) -> String {
    let back = match session {
        Some(_) => format!(
            r#"<p><a href="{}/">Back to the portal</a></p>"#,
            esc(&theme.base)
        ),
        None => String::new(),
    };
    let body = format!(
        r#"<section class="message"><h1>{}</h1><p>{}</p>{back}</section>"#,
        esc(title),
        esc(text)
    );
    layout(theme, session, title, &body)
}

pub(super) fn endpoints(
    theme: &Theme,
    session: &Session,
    lines: &[EndpointLine],
    next: Option<i64>,
) -> String {
    let base = esc(&theme.base);
    let mut body = format!(
        r#"<div class="head"><h1>Endpoints</h1><a class="button" href="{base}/endpoints/new">Add endpoint</a></div>"#
    );
    if lines.is_empty() {
        body.push_str(r#"<p class="empty">No endpoints yet: add one to receive webhooks.</p>"#);
    } else {
        body.push_str(
            "<table><thead><tr><th>URL</th><th>Events</th><th>State</th><th>Success (1 h)</th></tr></thead><tbody>",
        );
        for e in lines {
            let _ = write!(
                body,
                r#"<tr><td><a href="{base}/endpoints/{}">{}</a><div class="muted">{}</div></td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
                e.id,
                esc(&e.url),
                esc(&e.description),
                esc(&e.event_types.join(", ")),
                state(e.enabled, e.paused, &e.breaker),
                rate(e.success_rate_1h)
            );
        }
        body.push_str("</tbody></table>");
    }
    if let Some(after) = next {
        let _ = write!(
            body,
            r#"<p><a href="{base}/?after={after}">More endpoints</a></p>"#
        );
    }
    layout(theme, Some(session), "Endpoints", &body)
}

fn state(enabled: bool, paused: bool, breaker: &str) -> String {
    let (class, label) = match (enabled, paused, breaker) {
        (false, _, _) => ("bad", "disabled".to_string()),
        (true, true, _) => ("warn", "paused".to_string()),
        (true, false, "closed") => ("good", "active".to_string()),
        (true, false, breaker) => ("warn", format!("breaker {}", breaker.replace('_', "-"))),
    };
    format!(r#"<span class="tag {class}">{}</span>"#, esc(&label))
}

/// The fields of the endpoint form, as typed (redisplayed after an error).
#[derive(Clone, Debug, Default)]
pub(super) struct EndpointValues {
    pub url: String,
    pub event_types: Vec<String>,
    pub description: String,
    pub rate_limit: String,
    /// `standard`, `cloudevents` or `cloudevents-binary` (empty: standard).
    pub format: String,
    /// The version each event type is pinned to, as chosen (`type`, `version`); a type not listed follows the
    /// catalog's current version.
    pub pins: Vec<(String, String)>,
    /// A new endpoint is verified before it gets events (ignored when editing: *Verify* on its page does it).
    pub verify: bool,
}

/// The request formats a customer may pick, with their labels.
const FORMATS: [(&str, &str); 3] = [
    ("standard", "Standard Webhooks (JSON envelope)"),
    ("cloudevents", "CloudEvents 1.0, structured (JSON)"),
    (
        "cloudevents-binary",
        "CloudEvents 1.0, binary (ce-* headers)",
    ),
];

/// The form that adds (`id` None) or edits an endpoint; `known` are the event types offered as checkboxes,
/// `catalog` the event types whose versions may be pinned.
pub(super) fn endpoint_form(
    theme: &Theme,
    session: &Session,
    id: Option<i64>,
    values: &EndpointValues,
    known: &[String],
    catalog: &[CatalogType],
    error: Option<&str>,
) -> String {
    let base = esc(&theme.base);
    let (title, action) = match id {
        Some(id) => (
            format!("Edit endpoint {id}"),
            format!("{base}/endpoints/{id}/edit"),
        ),
        None => ("Add endpoint".to_string(), format!("{base}/endpoints")),
    };
    let mut body = format!("<h1>{}</h1>", esc(&title));
    if let Some(error) = error {
        let _ = write!(body, r#"<p class="error" role="alert">{}</p>"#, esc(error));
    }
    let mut choices: Vec<&str> = known.iter().map(String::as_str).collect();
    for t in &values.event_types {
        if !choices.contains(&t.as_str()) && t != "*" {
            choices.push(t);
        }
    }
    let all = values.event_types.is_empty() || values.event_types.iter().any(|t| t == "*");
    let mut boxes = format!(
        r#"<label class="check"><input type="checkbox" name="event_types" value="*"{}> every event type (*)</label>"#,
        if all { " checked" } else { "" }
    );
    for t in choices {
        let checked = values.event_types.iter().any(|v| v == t);
        let _ = write!(
            boxes,
            r#"<label class="check"><input type="checkbox" name="event_types" value="{}"{}> {}</label>"#,
            esc(t),
            if checked { " checked" } else { "" },
            esc(t)
        );
    }
    let _ = write!(
        body,
        r#"<form method="post" action="{action}" class="card">{}
<label>URL <input type="url" name="url" required maxlength="2048" value="{}" placeholder="https://example.com/webhooks"></label>
<fieldset><legend>Event types</legend>{boxes}
<label>Other patterns <input type="text" name="event_types_other" maxlength="2048" placeholder="order.*, invoice.paid"></label>
<p class="muted">A pattern is an event type (<code>order.created</code>), a prefix (<code>order.*</code>) or <code>*</code>.</p></fieldset>
<label>Description <input type="text" name="description" maxlength="2048" value="{}"></label>
<label>Rate limit (requests per second, optional) <input type="number" name="rate_limit" min="0" step="any" value="{}"></label>
<label>Format <select name="format">{}</select></label>
{}{}<button>{}</button></form>"#,
        csrf(session),
        esc(&values.url),
        esc(&values.description),
        esc(&values.rate_limit),
        FORMATS
            .iter()
            .map(|(value, label)| {
                let chosen =
                    *value == values.format || (values.format.is_empty() && *value == "standard");
                format!(
                    r#"<option value="{value}"{}>{label}</option>"#,
                    if chosen { " selected" } else { "" }
                )
            })
            .collect::<String>(),
        version_pins(catalog, &values.pins),
        match id {
            Some(_) => String::new(),
            None => format!(
                r#"<label class="check"><input type="checkbox" name="verify" value="yes"{}> Verify the URL first: it gets a signed <code>walhook.endpoint.verification</code> request, and events only once it answers 2xx</label>
"#,
                if values.verify { " checked" } else { "" }
            ),
        },
        if id.is_some() { "Save" } else { "Add endpoint" },
    );
    layout(theme, Some(session), &title, &body)
}

/// The form's version pins: a choice for each event type with more than one version (or pinned already),
/// the catalog's current version by default. A pin keeps the endpoint on the payloads its code understands
/// while newer versions are published (rendered down in SQL by the catalog's downgrades).
fn version_pins(catalog: &[CatalogType], pins: &[(String, String)]) -> String {
    let mut selects = String::new();
    for t in catalog {
        let pinned = pins
            .iter()
            .find(|(name, _)| *name == t.name)
            .map(|(_, v)| v.as_str());
        if t.versions.len() < 2 && pinned.is_none() {
            continue;
        }
        let current = t.current.map_or(String::new(), |v| format!(" (now v{v})"));
        let _ = write!(
            selects,
            r#"<label>{} <select name="pin"><option value="">current version{}, and newer ones as published</option>"#,
            esc(&t.name),
            current
        );
        for v in &t.versions {
            let value = v.version.to_string();
            let _ = write!(
                selects,
                r#"<option value="{}={value}"{}>v{value} only{}</option>"#,
                esc(&t.name),
                if pinned == Some(value.as_str()) {
                    " selected"
                } else {
                    ""
                },
                if v.deprecated { " (deprecated)" } else { "" }
            );
        }
        selects.push_str("</select></label>");
    }
    match selects.is_empty() {
        true => selects,
        false => format!(
            r#"<fieldset><legend>Versions</legend><p class="muted">Events of a newer version are sent in the version chosen here, so a receiver keeps working while new versions are published (see Event types).</p>{selects}</fieldset>
"#
        ),
    }
}

/// What an action on the endpoint's page has to show once (a secret is never put in a URL).
pub(super) enum Notice {
    None,
    Secret(String),
    Rotated(String),
}

pub(super) fn endpoint(
    theme: &Theme,
    session: &Session,
    e: &Endpoint,
    recent: &[DeliveryLine],
    notice: Notice,
) -> String {
    let base = esc(&theme.base);
    let id = e.id;
    let mut body = format!(
        r#"<div class="head"><h1>Endpoint {id}</h1><a class="button" href="{base}/endpoints/{id}/edit">Edit</a></div>"#
    );
    let notice_is_rotation = matches!(notice, Notice::Rotated(_));
    match notice {
        Notice::None => {}
        Notice::Secret(secret) | Notice::Rotated(secret) => {
            let what = match notice_is_rotation {
                true => "The new signing secret; the old one keeps signing during the grace period you chose:",
                false => "The signing secret, to verify the webhook-signature header of every request:",
            };
            let _ = write!(
                body,
                r#"<div class="notice"><p>{what}</p><p><code class="secret" id="secret">{}</code> <button type="button" class="copy" data-copy="secret" hidden>Copy</button></p></div>"#,
                esc(&secret)
            );
        }
    }
    let rows = [
        ("URL", esc(&e.url)),
        ("Description", esc(&e.description)),
        ("Event types", esc(&e.event_types.join(", "))),
        ("Filter", opt(&e.filter)),
        (
            "Format",
            esc(FORMATS
                .iter()
                .find(|(value, _)| *value == e.format)
                .map_or(e.format.as_str(), |(_, label)| label)),
        ),
        (
            "Versions",
            match e.pins.is_empty() {
                true => "current".to_string(),
                false => esc(&e
                    .pins
                    .iter()
                    .map(|(t, v)| format!("{t} v{v}"))
                    .collect::<Vec<_>>()
                    .join(", ")),
            },
        ),
        (
            "Rate limit",
            e.rate_limit.map_or("—".into(), |r| format!("{r} / s")),
        ),
        ("State", state(e.enabled, e.paused, &e.breaker)),
        (
            "Verification",
            match (e.verification.as_deref(), &e.verified_at) {
                (Some("pending"), _) => {
                    r#"<span class="tag warn">pending</span> awaiting a 2xx answer to its verification request"#
                        .to_string()
                }
                (Some(_), Some(at)) => format!("verified {}", esc(at)),
                _ => "—".to_string(),
            },
        ),
        ("Disabled because", opt(&e.disabled_reason)),
        ("Consecutive failures", e.consecutive_failures.to_string()),
        ("Success (1 h)", rate(e.success_rate_1h)),
        ("Last success", opt(&e.last_success_at)),
        ("Last failure", opt(&e.last_failure_at)),
        ("Last status", code(e.last_status_code)),
        ("Last error", opt(&e.last_error)),
        ("Created", opt(&e.created_at)),
    ];
    body.push_str(r#"<dl class="facts">"#);
    for (name, value) in rows {
        let _ = write!(body, "<dt>{name}</dt><dd>{value}</dd>");
    }
    body.push_str("</dl>");

    let action = |path: &str, label: &str, class: &str| {
        button(
            theme,
            session,
            &format!("/endpoints/{id}/{path}"),
            label,
            class,
        )
    };
    body.push_str(r#"<section class="actions"><h2>Actions</h2><div class="row">"#);
    body.push_str(&action("test", "Send test event", ""));
    body.push_str(&match e.paused {
        true => action("resume", "Resume", ""),
        false => action("pause", "Pause", "secondary"),
    });
    body.push_str(&match e.enabled {
        true => action("disable", "Disable", "secondary"),
        false => action("enable", "Enable", ""),
    });
    // verifying stops the endpoint's events until it answers, so the button asks first
    let _ = write!(
        body,
        r#"<form method="post" action="{base}/endpoints/{id}/verify" class="inline" data-confirm="Verify this endpoint? It gets no events until it answers the signed verification request with 2xx.">{}<button class="secondary">Verify</button></form>"#,
        csrf(session)
    );
    body.push_str("</div>");
    let _ = write!(
        body,
        r#"<h3>Signing secret</h3><p><code>whsec_••••••••••••</code></p><div class="row">{}
<form method="post" action="{base}/endpoints/{id}/rotate" class="inline" data-confirm="Rotate the secret? Update your receiver with the new one before the old one expires.">{}
<label>old secret keeps signing for <select name="grace"><option value="0">no time</option><option value="1 hour">1 hour</option><option value="24 hours" selected>24 hours</option><option value="7 days">7 days</option></select></label>
<button class="secondary">Rotate secret</button></form></div>"#,
        action("reveal", "Reveal", "secondary"),
        csrf(session)
    );
    let _ = write!(
        body,
        r#"<h3>Delete</h3><form method="post" action="{base}/endpoints/{id}/delete" class="inline" data-confirm="Delete this endpoint? Its deliveries stop.">{}
<label class="check"><input type="checkbox" name="confirm" value="yes" required> I want to delete this endpoint</label>
<button class="danger">Delete endpoint</button></form></section>"#,
        csrf(session)
    );
    let _ = write!(
        body,
        r#"<section><div class="head"><h2>Recent deliveries</h2><a href="{base}/deliveries?endpoint={id}">All of this endpoint's deliveries</a></div>{}</section>"#,
        delivery_table(theme, recent)
    );
    layout(theme, Some(session), &format!("Endpoint {id}"), &body)
}

fn delivery_table(theme: &Theme, lines: &[DeliveryLine]) -> String {
    if lines.is_empty() {
        return r#"<p class="empty">No deliveries.</p>"#.into();
    }
    let base = esc(&theme.base);
    let mut table = String::from(
        "<table><thead><tr><th>Delivery</th><th>Event type</th><th>Endpoint</th><th>Status</th><th>Attempts</th><th>Last code</th><th>Created (UTC)</th></tr></thead><tbody>",
    );
    for d in lines {
        let _ = write!(
            table,
            r#"<tr><td><a href="{base}/deliveries/{}">{}</a></td><td>{}</td><td><a href="{base}/endpoints/{}">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>"#,
            d.id,
            d.id,
            opt(&d.event_type),
            d.endpoint_id,
            d.url
                .as_deref()
                .map_or_else(|| d.endpoint_id.to_string(), esc),
            status(&d.status),
            d.attempts,
            code(d.last_status_code),
            esc(&d.created_at),
        );
    }
    table.push_str("</tbody></table>");
    table
}

fn status(status: &str) -> String {
    let class = match status {
        "succeeded" => "good",
        "dead" => "bad",
        _ => "warn",
    };
    format!(r#"<span class="tag {class}">{}</span>"#, esc(status))
}

/// The delivery log's filters, as typed.
#[derive(Clone, Debug, Default)]
pub(super) struct FilterValues {
    pub status: String,
    pub event_type: String,
    pub endpoint: String,
    pub since: String,
}

impl FilterValues {
    /// The query string of these filters (for the next page's link).
    pub(super) fn query(&self) -> String {
        let mut q = String::new();
        for (name, value) in [
            ("status", &self.status),
            ("event_type", &self.event_type),
            ("endpoint", &self.endpoint),
            ("since", &self.since),
        ] {
            if !value.is_empty() {
                let _ = write!(q, "{name}={}&", super::form::encode(value));
            }
        }
        q
    }
}

pub(super) fn deliveries(
    theme: &Theme,
    session: &Session,
    filter: &FilterValues,
    lines: &[DeliveryLine],
    next: Option<i64>,
    error: Option<&str>,
) -> String {
    let base = esc(&theme.base);
    let mut body = String::from("<h1>Deliveries</h1>");
    if let Some(error) = error {
        let _ = write!(body, r#"<p class="error" role="alert">{}</p>"#, esc(error));
    }
    let mut statuses = String::new();
    for s in ["", "pending", "succeeded", "dead"] {
        let _ = write!(
            statuses,
            r#"<option value="{s}"{}>{}</option>"#,
            if filter.status == s { " selected" } else { "" },
            if s.is_empty() { "any" } else { s }
        );
    }
    let _ = write!(
        body,
        r#"<form method="get" action="{base}/deliveries" class="filters">
<label>Status <select name="status">{statuses}</select></label>
<label>Event type <input type="text" name="event_type" maxlength="255" value="{}"></label>
<label>Endpoint id <input type="number" name="endpoint" min="1" value="{}"></label>
<label>Since (UTC) <input type="datetime-local" name="since" value="{}"></label>
<button class="secondary">Filter</button></form>"#,
        esc(&filter.event_type),
        esc(&filter.endpoint),
        esc(&filter.since),
    );
    body.push_str(&delivery_table(theme, lines));
    if let Some(before) = next {
        let _ = write!(
            body,
            r#"<p><a href="{base}/deliveries?{}before={before}">Older deliveries</a></p>"#,
            esc(&filter.query())
        );
    }
    let _ = write!(
        body,
        r#"<section class="card"><h2>Recover missed events</h2>
<p>Deliveries your endpoints missed (for example while disabled) are created again, once, for every event since this time.</p>
<form method="post" action="{base}/recover" class="filters">{}
<label>Since (UTC) <input type="datetime-local" name="since" required></label>
<label>Endpoint id (optional) <input type="number" name="endpoint" min="1"></label>
<button class="secondary">Recover</button></form></section>"#,
        csrf(session)
    );
    layout(theme, Some(session), "Deliveries", &body)
}

pub(super) fn delivery(
    theme: &Theme,
    session: &Session,
    d: &Delivery,
    attempts: &[Attempt],
) -> String {
    let base = esc(&theme.base);
    let id = d.id;
    let mut body = format!(
        r#"<div class="head"><h1>Delivery {id}</h1>{}</div>"#,
        button(
            theme,
            session,
            &format!("/deliveries/{id}/resend"),
            "Resend",
            ""
        )
    );
    let rows = [
        ("Status", status(&d.status)),
        ("Event type", opt(&d.event_type)),
        (
            "Endpoint",
            format!(
                r#"<a href="{base}/endpoints/{}">{}</a>"#,
                d.endpoint_id,
                d.url
                    .as_deref()
                    .map_or_else(|| d.endpoint_id.to_string(), esc)
            ),
        ),
        ("webhook-id", esc(&d.webhook_id)),
        ("Attempts", d.attempts.to_string()),
        ("Next attempt (UTC)", opt(&d.next_attempt_at)),
        ("Last status", code(d.last_status_code)),
        ("Last error", opt(&d.last_error)),
        ("Created (UTC)", esc(&d.created_at)),
        ("Updated (UTC)", esc(&d.updated_at)),
    ];
    body.push_str(r#"<dl class="facts">"#);
    for (name, value) in rows {
        let _ = write!(body, "<dt>{name}</dt><dd>{value}</dd>");
    }
    body.push_str("</dl>");
    if let Some(payload) = &d.payload {
        let _ = write!(body, "<h2>Payload</h2><pre>{}</pre>", esc(payload));
    }
    body.push_str("<h2>Attempts</h2>");
    if attempts.is_empty() {
        body.push_str(r#"<p class="empty">No attempt yet.</p>"#);
    } else {
        body.push_str("<table><thead><tr><th>#</th><th>Time (UTC)</th><th>Status code</th><th>Latency</th><th>Error</th><th>Response</th></tr></thead><tbody>");
        for a in attempts {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{} ms</td><td>{}</td><td><pre class=\"excerpt\">{}</pre></td></tr>",
                a.attempt,
                esc(&a.attempted_at),
                code(a.status_code),
                a.duration_ms,
                opt(&a.error),
                a.response_body.as_deref().map_or(String::new(), esc),
            );
        }
        body.push_str("</tbody></table>");
    }
    layout(theme, Some(session), &format!("Delivery {id}"), &body)
}

fn view_form(theme: &Theme, session: &Session, tenant: &str, label: &str) -> String {
    format!(
        r#"<form method="post" action="{}/operator/view" class="inline">{}<input type="hidden" name="tenant" value="{}"><button class="link">{}</button></form>"#,
        esc(&theme.base),
        csrf(session),
        esc(tenant),
        esc(label)
    )
}

pub(super) fn operator(
    theme: &Theme,
    session: &Session,
    lines: &[OverviewLine],
    slots: &[Slot],
) -> String {
    let mut body = String::from("<h1>Overview</h1><h2>Replication slots</h2>");
    if slots.is_empty() {
        body.push_str(r#"<p class="empty">No slot recorded (the notify source, or walhook has not run yet).</p>"#);
    } else {
        body.push_str("<table><thead><tr><th>Slot</th><th>Active</th><th>Lag</th><th>Confirmed (UTC)</th></tr></thead><tbody>");
        for s in slots {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&s.name),
                if s.active { "yes" } else { "no" },
                s.lag_bytes.map_or("—".into(), |b| format!("{b} bytes")),
                opt(&s.confirmed_at)
            );
        }
        body.push_str("</tbody></table>");
    }
    body.push_str("<h2>Endpoints of every tenant</h2>");
    if lines.is_empty() {
        body.push_str(r#"<p class="empty">No endpoints.</p>"#);
    } else {
        body.push_str("<table><thead><tr><th>Tenant</th><th>Endpoint</th><th>State</th><th>Success (1 h)</th><th>Pending</th><th>Dead</th><th>Last error</th></tr></thead><tbody>");
        for l in lines {
            let tenant = match &l.tenant {
                Some(t) => format!("{} {}", esc(t), view_form(theme, session, t, "view")),
                None => "— (operator's)".into(),
            };
            let _ = write!(
                body,
                "<tr><td>{tenant}</td><td>{} {}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                l.endpoint_id,
                esc(&l.url),
                state(l.enabled, l.paused, &l.breaker),
                rate(l.success_rate_1h),
                l.pending,
                l.dead,
                opt(&l.last_error),
            );
        }
        body.push_str("</tbody></table>");
    }
    layout(theme, Some(session), "Overview", &body)
}

/// The event catalog: what each event type means and looks like, version by version.
pub(super) fn catalog(theme: &Theme, session: &Session, types: &[CatalogType]) -> String {
    let mut body = String::from(r#"<div class="head"><h1>Event types</h1></div>"#);
    if types.is_empty() {
        body.push_str(r#"<p class="empty">No event types are documented yet.</p>"#);
    }
    for t in types {
        let _ = write!(
            body,
            r#"<section class="event-type" id="{0}"><h2>{0}"#,
            esc(&t.name)
        );
        if t.deprecated {
            body.push_str(r#" <span class="tag bad">deprecated</span>"#);
        }
        body.push_str("</h2>");
        if !t.description.is_empty() {
            let _ = write!(body, "<p>{}</p>", esc(&t.description));
        }
        if t.deprecated && !t.deprecation_note.is_empty() {
            let _ = write!(
                body,
                r#"<p class="notice">{}</p>"#,
                esc(&t.deprecation_note)
            );
        }
        for v in &t.versions {
            let _ = write!(body, "<h3>Version {}", v.version);
            if Some(v.version) == t.current {
                body.push_str(r#" <span class="tag good">current</span>"#);
            }
            if v.deprecated {
                body.push_str(r#" <span class="tag bad">deprecated</span>"#);
            }
            body.push_str("</h3>");
            if !v.description.is_empty() {
                let _ = write!(body, "<p>{}</p>", esc(&v.description));
            }
            if let Some(example) = &v.example {
                let _ = write!(body, "<h4>Example</h4><pre>{}</pre>", esc(example));
            }
            let _ = write!(
                body,
                "<details><summary>JSON Schema</summary><pre>{}</pre></details>",
                esc(&v.schema)
            );
        }
        body.push_str("</section>");
    }
    layout(theme, Some(session), "Event types", &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup_and_quotes() {
        assert_eq!(
            esc(r#"<script>alert("x&'y")</script>"#),
            "&lt;script&gt;alert(&quot;x&amp;&#39;y&quot;)&lt;/script&gt;"
        );
    }

    #[test]
    fn every_value_is_escaped_in_the_frame() {
        let theme = Theme {
            base: String::new(),
            brand_name: "<b>".into(),
            logo_url: "/l.svg\"x".into(),
        };
        let page = message(&theme, None, "<t>", "<m>");
        assert!(!page.contains("<b>") && !page.contains("<t>") && !page.contains("<m>"));
        assert!(page.contains("/l.svg&quot;x"));
    }
}
