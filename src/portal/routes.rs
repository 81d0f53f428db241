//! The pages and actions of a session, each inside the request's transaction ([`super::server`] opened it,
//! found the session and set its tenant).
//!
//! Every handler reads or changes rows by the ids in its path and lets row-level security decide whether they
//! are the session's: an id that is not answers 404 (no row, no update, or `no_data_found` from a function),
//! never a different error that would tell that the row exists. Changes answer 303 to the page that shows
//! them, except where a value must be shown once (a revealed or rotated secret) or a form shown again.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use hyper::{header, StatusCode};
use tokio_postgres::error::SqlState;
use tokio_postgres::Transaction;

use super::auth::Session;
use super::form::Form;
use super::pages::{self, EndpointValues, FilterValues, Notice, Theme};
use super::queries::{self, DeliveryFilter, EndpointInput, Switch, PAGE};
use super::server::{html, see_other, Failure, Page, Settings};
use crate::dispatch::guard::{self, NetworkPolicy};

/// One request inside its transaction.
pub(super) struct Call<'a> {
    pub s: &'a Settings,
    pub session: &'a Session,
    pub tx: &'a Transaction<'a>,
    pub query: &'a Form,
    pub form: &'a Form,
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

pub(super) async fn page(c: &Call<'_>, post: bool, path: &[&str]) -> Result<Page, Failure> {
    // pages of the operator and the session itself
    match (post, path) {
        (false, ["operator"]) => return operator(c).await,
        (false, ["event-types"]) => {
            let types = queries::catalog(c.tx).await?;
            return Ok(c.ok(pages::catalog(c.theme(), c.session, &types)));
        }
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
            let (known, catalog) = form_choices(c).await?;
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
                &catalog,
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
            let (known, catalog) = form_choices(c).await?;
            let values = EndpointValues {
                url: e.url,
                event_types: e.event_types,
                description: e.description,
                rate_limit: e.rate_limit.map(|r| r.to_string()).unwrap_or_default(),
                format: e.format,
                pins: e
                    .pins
                    .into_iter()
                    .map(|(t, v)| (t, v.to_string()))
                    .collect(),
                verify: false,
            };
            Ok(c.ok(pages::endpoint_form(
                c.theme(),
                c.session,
                Some(id),
                &values,
                &known,
                &catalog,
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
        _ => Err(Failure::NotFound),
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
    let (recent, _) = queries::deliveries(c.tx, &filter, 10).await?;
    Ok(c.ok(pages::endpoint(c.theme(), c.session, &e, &recent, notice)))
}

/// What the endpoint form offers: event types to tick, and the catalog's types whose versions may be pinned.
async fn form_choices(
    c: &Call<'_>,
) -> Result<(Vec<String>, Vec<queries::CatalogType>), tokio_postgres::Error> {
    Ok((
        queries::recent_event_types(c.tx).await?,
        queries::catalog(c.tx).await?,
    ))
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
        format: form.get("format").unwrap_or("standard").to_string(),
        // a pin is chosen as `type=version`; the empty choice follows the current version
        pins: form
            .all("pin")
            .filter_map(|p| p.rsplit_once('='))
            .map(|(t, v)| (t.to_string(), v.to_string()))
            .collect(),
        verify: form.get("verify") == Some("yes"),
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
        let mut pins: Vec<(String, i32)> = Vec::new();
        for (t, v) in &values.pins {
            let version = v
                .parse::<i32>()
                .map_err(|_| format!("{v:?} is not a version of {t} (a number like 2)."))?;
            match pins.iter().any(|(u, _)| u == t) {
                true => return Err(format!("{t} is pinned twice: choose one version.")),
                false => pins.push((t.clone(), version)),
            }
        }
        Ok(EndpointInput {
            url: values.url.clone(),
            event_types: patterns.clone(),
            description: values.description.clone(),
            rate_limit,
            format: values.format.clone(),
            pins,
            verify: values.verify,
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
    let (known, catalog) = form_choices(c).await?;
    Ok(html(
        StatusCode::UNPROCESSABLE_ENTITY,
        pages::endpoint_form(
            c.theme(),
            c.session,
            id,
            &values,
            &known,
            &catalog,
            Some(&refused),
        ),
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
        "verify" => {
            queries::verify(c.tx, id).await?;
            return Ok(see_other(c.s, &back));
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
    let (mut lines, continue_below) = queries::deliveries(c.tx, &filter, PAGE + 1).await?;
    let next = if lines.len() as i64 > PAGE {
        lines.truncate(PAGE as usize);
        lines.last().map(|l| l.id)
    } else {
        continue_below
    };
    Ok(c.ok(pages::deliveries(
        c.theme(),
        c.session,
        &values,
        &lines,
        next,
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
}
