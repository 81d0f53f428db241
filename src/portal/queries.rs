//! Every statement the portal runs, in one place, and the rows the pages show.
//!
//! They run in the request's transaction, after `walhook.tenant` is set, with the rights of the portal's role:
//! none of them decides a tenant (row-level security holds them to the request's), and a row of another tenant
//! is simply not found. Lists are paginated by keyset (`id < $before order by id desc limit n`), so that a page
//! costs the same with a million deliveries: the delivery lists also say `d.tenant = walhook.current_tenant()`,
//! the condition row-level security applies anyway, because only then does the planner walk the
//! `deliveries_tenant (tenant, id)` index backwards and stop after a page (with the policy's condition alone
//! it read and sorted all of a tenant's deliveries: 56 ms at 10,000 of them). Times are rendered by PostgreSQL in UTC
//! (the session's TimeZone), to the second.

use std::time::SystemTime;

use tokio_postgres::{Row, Transaction};

/// What the portal's role is; see [`super::check_role`].
pub(super) const ROLE_CHECK: &str = "
select r.rolname::text as usr, r.rolsuper as superuser, r.rolbypassrls as bypassrls,
       array(select t.tablename::text from pg_tables t
              where t.schemaname = 'walhook' and t.tableowner = current_user order by 1) as owns,
       array(select g from unnest(array['walhook_admin', 'walhook_reader', 'walhook_writer', 'walhook_daemon']) g
              where case when exists (select from pg_roles x where x.rolname = g)
                         then pg_has_role(current_user, g, 'member') else false end) as member_of,
       case when exists (select from pg_roles x where x.rolname = 'walhook_portal')
            then pg_has_role(current_user, 'walhook_portal', 'member') else false end as portal,
       exists (select from pg_proc p join pg_namespace n on n.oid = p.pronamespace
                where n.nspname = 'walhook' and p.proname = 'portal_session') as migrated
  from pg_roles r where r.rolname = current_user";

/// `walhook portal-link`: the tenant its transaction is for (a walhook_tenant role mints for that one only).
pub(super) const MINT_SCOPE: &str =
    "select set_config('walhook.tenant', coalesce($1::text, ''), true)";
pub(super) const MINT_LINK: &str =
    "select path from walhook.portal_link($1::text, $2::text::interval, $3::boolean)";

pub(super) const EXCHANGE: &str =
    "select session, csrf from walhook.portal_exchange($1::text, $2::text::interval)";
pub(super) const SESSION: &str =
    "select tenant, operator, csrf, viewing from walhook.portal_session($1::text)";
pub(super) const SCOPE: &str = "select set_config('walhook.tenant', $1::text, true)";
pub(super) const LOGOUT: &str = "select walhook.portal_logout($1::text)";
pub(super) const VIEW: &str = "select walhook.portal_view($1::text, $2::text)";

/// Up to this many rows per page of a list.
pub(super) const PAGE: i64 = 50;

fn time(row: &Row, column: &str) -> Option<String> {
    row.get::<_, Option<String>>(column)
}

/// An endpoint as the list shows it.
pub(super) struct EndpointLine {
    pub id: i64,
    pub url: String,
    pub description: String,
    pub event_types: Vec<String>,
    pub enabled: bool,
    pub paused: bool,
    pub breaker: String,
    pub success_rate_1h: Option<f64>,
}

pub(super) async fn endpoints(
    tx: &Transaction<'_>,
    after: Option<i64>,
) -> Result<Vec<EndpointLine>, tokio_postgres::Error> {
    let rows = tx
        .query(
            "select e.id, e.display_url, e.description, e.event_types, e.enabled, e.paused,
                    coalesce(h.breaker, 'closed') as breaker, h.success_rate_1h::float8 as rate
               from walhook.endpoints e
               left join walhook.endpoint_health h on h.endpoint_id = e.id
              where ($1::bigint is null or e.id > $1)
              order by e.id limit $2",
            &[&after, &(PAGE + 1)],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| EndpointLine {
            id: r.get(0),
            url: r.get(1),
            description: r.get(2),
            event_types: r.get(3),
            enabled: r.get(4),
            paused: r.get(5),
            breaker: r.get(6),
            success_rate_1h: r.get(7),
        })
        .collect())
}

/// One endpoint with its health.
pub(super) struct Endpoint {
    pub id: i64,
    pub url: String,
    pub description: String,
    pub event_types: Vec<String>,
    pub filter: Option<String>,
    pub rate_limit: Option<f64>,
    pub enabled: bool,
    pub paused: bool,
    pub disabled_reason: Option<String>,
    pub created_at: Option<String>,
    pub breaker: String,
    pub consecutive_failures: i32,
    pub success_rate_1h: Option<f64>,
    pub last_success_at: Option<String>,
    pub last_failure_at: Option<String>,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    pub format: String,
    /// `event_versions` as `(type, version)`, by type.
    pub pins: Vec<(String, i32)>,
    /// `pending` (awaiting the answer to its verification request), `verified`, or none.
    pub verification: Option<String>,
    pub verified_at: Option<String>,
}

pub(super) async fn endpoint(
    tx: &Transaction<'_>,
    id: i64,
) -> Result<Option<Endpoint>, tokio_postgres::Error> {
    let row = tx
        .query_opt(
            "select e.id, e.url, e.description, e.event_types, e.filter::text as filter, e.rate_limit,
                    e.enabled, e.paused, e.disabled_reason,
                    to_char(e.created_at, 'YYYY-MM-DD HH24:MI:SS') as created_at,
                    coalesce(h.breaker, 'closed') as breaker, coalesce(h.consecutive_failures, 0) as failures,
                    h.success_rate_1h::float8 as rate,
                    to_char(h.last_success_at, 'YYYY-MM-DD HH24:MI:SS') as last_success_at,
                    to_char(h.last_failure_at, 'YYYY-MM-DD HH24:MI:SS') as last_failure_at,
                    h.last_status_code, h.last_error, e.format,
                    array(select p.key from jsonb_each(e.event_versions) p order by p.key) as pinned,
                    array(select (p.value #>> '{}')::int from jsonb_each(e.event_versions) p order by p.key)
                      as pinned_to,
                    e.verification, to_char(e.verified_at, 'YYYY-MM-DD HH24:MI:SS') as verified_at
               from walhook.endpoints e
               left join walhook.endpoint_health h on h.endpoint_id = e.id
              where e.id = $1",
            &[&id],
        )
        .await?;
    Ok(row.map(|r| Endpoint {
        id: r.get("id"),
        url: r.get("url"),
        description: r.get("description"),
        event_types: r.get("event_types"),
        filter: r.get("filter"),
        rate_limit: r.get("rate_limit"),
        enabled: r.get("enabled"),
        paused: r.get("paused"),
        disabled_reason: r.get("disabled_reason"),
        format: r.get("format"),
        pins: r
            .get::<_, Vec<String>>("pinned")
            .into_iter()
            .zip(r.get::<_, Vec<i32>>("pinned_to"))
            .collect(),
        verification: r.get("verification"),
        verified_at: time(&r, "verified_at"),
        created_at: time(&r, "created_at"),
        breaker: r.get("breaker"),
        consecutive_failures: r.get("failures"),
        success_rate_1h: r.get("rate"),
        last_success_at: time(&r, "last_success_at"),
        last_failure_at: time(&r, "last_failure_at"),
        last_status_code: r.get("last_status_code"),
        last_error: r.get("last_error"),
    }))
}

/// The event types of this tenant's latest deliveries, for the pattern picker (its last 1000 deliveries:
/// bounded whatever the table's size).
pub(super) async fn recent_event_types(
    tx: &Transaction<'_>,
) -> Result<Vec<String>, tokio_postgres::Error> {
    let rows = tx
        .query(
            "select distinct t from (
               select coalesce(d.event_type, o.event_type) as t
                 from walhook.deliveries d
                 left join walhook.outbox o on o.id = d.event_id
                where d.tenant = walhook.current_tenant()
                order by d.id desc limit 200) recent
              where t is not null and t not like 'walhook.%'
             union
             select name from walhook.event_types where not deprecated
              order by 1 limit 100",
            &[],
        )
        .await?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

/// What a customer may set on an endpoint.
pub(super) struct EndpointInput {
    pub url: String,
    pub event_types: Vec<String>,
    pub description: String,
    pub rate_limit: Option<f64>,
    /// `walhook.endpoints.format` (its check refuses anything else).
    pub format: String,
    /// `walhook.endpoints.event_versions`: the versions pinned, by event type (its check refuses a type or a
    /// version the catalog does not hold).
    pub pins: Vec<(String, i32)>,
    /// Inserted with `verification = 'pending'`: no events until it answers its verification request.
    pub verify: bool,
}

impl EndpointInput {
    /// The pins as the JSON object `event_versions` holds.
    fn event_versions(&self) -> String {
        let pins: serde_json::Map<String, serde_json::Value> = self
            .pins
            .iter()
            .map(|(t, v)| (t.clone(), serde_json::Value::from(*v)))
            .collect();
        serde_json::Value::Object(pins).to_string()
    }
}

pub(super) async fn create_endpoint(
    tx: &Transaction<'_>,
    input: &EndpointInput,
) -> Result<i64, tokio_postgres::Error> {
    // the tenant column defaults to the transaction's walhook.tenant
    let row = tx
        .query_one(
            "insert into walhook.endpoints
                    (url, event_types, description, rate_limit, format, event_versions, verification)
             values ($1, $2, $3, $4, $5, $6::text::jsonb, case when $7 then 'pending' end) returning id",
            &[
                &input.url,
                &input.event_types,
                &input.description,
                &input.rate_limit,
                &input.format,
                &input.event_versions(),
                &input.verify,
            ],
        )
        .await?;
    Ok(row.get(0))
}

/// Whether the endpoint was found.
pub(super) async fn update_endpoint(
    tx: &Transaction<'_>,
    id: i64,
    input: &EndpointInput,
) -> Result<bool, tokio_postgres::Error> {
    let n = tx
        .execute(
            "update walhook.endpoints set url = $2, event_types = $3, description = $4, rate_limit = $5,
                    format = $6, event_versions = $7::text::jsonb
              where id = $1",
            &[
                &id,
                &input.url,
                &input.event_types,
                &input.description,
                &input.rate_limit,
                &input.format,
                &input.event_versions(),
            ],
        )
        .await?;
    Ok(n == 1)
}

/// One of the switches on an endpoint's page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Switch {
    Pause,
    Resume,
    Enable,
    Disable,
}

/// Whether the endpoint was found.
pub(super) async fn switch(
    tx: &Transaction<'_>,
    id: i64,
    switch: Switch,
) -> Result<bool, tokio_postgres::Error> {
    let sql = match switch {
        Switch::Pause => "update walhook.endpoints set paused = true where id = $1",
        Switch::Resume => "update walhook.endpoints set paused = false where id = $1",
        Switch::Enable => "update walhook.endpoints set enabled = true where id = $1",
        Switch::Disable => "update walhook.endpoints set enabled = false where id = $1",
    };
    Ok(tx.execute(sql, &[&id]).await? == 1)
}

pub(super) async fn delete_endpoint(
    tx: &Transaction<'_>,
    id: i64,
) -> Result<bool, tokio_postgres::Error> {
    Ok(tx
        .execute("delete from walhook.endpoints where id = $1", &[&id])
        .await?
        == 1)
}

pub(super) async fn secret(
    tx: &Transaction<'_>,
    id: i64,
) -> Result<Option<String>, tokio_postgres::Error> {
    let row = tx
        .query_opt("select secret from walhook.endpoints where id = $1", &[&id])
        .await?;
    Ok(row.map(|r| r.get(0)))
}

/// The new secret; `no_data_found` for an endpoint the session does not see.
pub(super) async fn rotate_secret(
    tx: &Transaction<'_>,
    id: i64,
    grace: &str,
) -> Result<String, tokio_postgres::Error> {
    let row = tx
        .query_one(
            "select walhook.rotate_secret($1, $2::text::interval)",
            &[&id, &grace],
        )
        .await?;
    Ok(row.get(0))
}

/// The test delivery's id; `no_data_found` for an endpoint the session does not see.
pub(super) async fn send_test(tx: &Transaction<'_>, id: i64) -> Result<i64, tokio_postgres::Error> {
    Ok(tx
        .query_one("select walhook.send_test($1)", &[&id])
        .await?
        .get(0))
}

/// `walhook.verify_endpoint`: the endpoint stops until it answers the signed verification request with 2xx;
/// the request's delivery id.
pub(super) async fn verify(tx: &Transaction<'_>, id: i64) -> Result<i64, tokio_postgres::Error> {
    Ok(tx
        .query_one("select walhook.verify_endpoint($1)", &[&id])
        .await?
        .get(0))
}

/// The delivery log's filters, each optional.
#[derive(Clone, Debug, Default)]
pub(super) struct DeliveryFilter {
    pub status: Option<String>,
    pub event_type: Option<String>,
    pub endpoint: Option<i64>,
    pub since: Option<SystemTime>,
    pub before: Option<i64>,
}

pub(super) struct DeliveryLine {
    pub id: i64,
    pub endpoint_id: i64,
    pub url: Option<String>,
    pub event_type: Option<String>,
    pub status: String,
    pub attempts: i32,
    pub last_status_code: Option<i32>,
    pub created_at: String,
}

/// Deliveries a filtered page looks through at most: the filters (status, event type, endpoint, time) are not
/// indexed within a tenant, so a page reads the tenant's next `FILTER_SCAN` deliveries by its `(tenant, id)`
/// index and keeps the matching ones; when fewer than a page match, the page links to the next stretch. Every
/// page costs the same whatever the table holds (1M deliveries: see the portal bench in docs/portal.md).
pub(super) const FILTER_SCAN: i64 = 1_000;

/// Up to `limit` deliveries, newest first, older than `filter.before`; with a filter, among the next
/// [`FILTER_SCAN`] deliveries only, and then also the id a search for older ones continues below (`None` when
/// the scan reached the tenant's oldest delivery).
pub(super) async fn deliveries(
    tx: &Transaction<'_>,
    filter: &DeliveryFilter,
    limit: i64,
) -> Result<(Vec<DeliveryLine>, Option<i64>), tokio_postgres::Error> {
    let filtered = filter.status.is_some()
        || filter.event_type.is_some()
        || filter.endpoint.is_some()
        || filter.since.is_some();
    let scan = if filtered { FILTER_SCAN } else { limit };
    // unnamed statements are planned with their parameters, so the unused conditions fold away
    let rows = tx
        .query(
            "with scanned as (
               select d.id from walhook.deliveries d
                where d.tenant = walhook.current_tenant() and ($1::bigint is null or d.id < $1)
                order by d.id desc limit $7)
             select d.id, d.endpoint_id, e.display_url, coalesce(d.event_type, o.event_type) as event_type,
                    d.status, d.attempts, d.last_status_code,
                    to_char(d.created_at, 'YYYY-MM-DD HH24:MI:SS') as created_at
               from scanned s
               join walhook.deliveries d on d.id = s.id
               left join walhook.outbox o on o.id = d.event_id
               left join walhook.endpoints e on e.id = d.endpoint_id
              where ($2::text is null or d.status = $2)
                and ($3::text is null or coalesce(d.event_type, o.event_type) = $3)
                and ($4::bigint is null or d.endpoint_id = $4)
                and ($5::timestamptz is null or d.created_at >= $5)
              order by d.id desc limit $6",
            &[
                &filter.before,
                &filter.status,
                &filter.event_type,
                &filter.endpoint,
                &filter.since,
                &limit,
                &scan,
            ],
        )
        .await?;
    let mut continue_below = None;
    if filtered && (rows.len() as i64) < limit {
        let bound: Option<i64> = tx
            .query_one(
                "select case when count(*) = $2 then min(id) end from (
                   select d.id from walhook.deliveries d
                    where d.tenant = walhook.current_tenant() and ($1::bigint is null or d.id < $1)
                    order by d.id desc limit $2) s",
                &[&filter.before, &scan],
            )
            .await?
            .get(0);
        continue_below = bound;
    }
    let lines = rows
        .iter()
        .map(|r| DeliveryLine {
            id: r.get(0),
            endpoint_id: r.get(1),
            url: r.get(2),
            event_type: r.get(3),
            status: r.get(4),
            attempts: r.get(5),
            last_status_code: r.get(6),
            created_at: r.get(7),
        })
        .collect();
    Ok((lines, continue_below))
}

pub(super) struct Delivery {
    pub id: i64,
    pub endpoint_id: i64,
    pub url: Option<String>,
    pub webhook_id: String,
    pub event_type: Option<String>,
    pub status: String,
    pub attempts: i32,
    pub next_attempt_at: Option<String>,
    pub last_status_code: Option<i32>,
    pub last_error: Option<String>,
    pub created_at: String,
    pub updated_at: String,
    pub payload: Option<String>,
}

pub(super) async fn delivery(
    tx: &Transaction<'_>,
    id: i64,
) -> Result<Option<Delivery>, tokio_postgres::Error> {
    let row = tx
        .query_opt(
            "select d.id, d.endpoint_id, e.display_url, 'msg_' || replace(d.webhook_id::text, '-', ''),
                    coalesce(d.event_type, o.event_type), d.status, d.attempts,
                    to_char(d.next_attempt_at, 'YYYY-MM-DD HH24:MI:SS'), d.last_status_code, d.last_error,
                    to_char(d.created_at, 'YYYY-MM-DD HH24:MI:SS'), to_char(d.updated_at, 'YYYY-MM-DD HH24:MI:SS'),
                    left(coalesce(d.payload, o.payload)::text, 65536)
               from walhook.deliveries d
               left join walhook.outbox o on o.id = d.event_id
               left join walhook.endpoints e on e.id = d.endpoint_id
              where d.id = $1",
            &[&id],
        )
        .await?;
    Ok(row.map(|r| Delivery {
        id: r.get(0),
        endpoint_id: r.get(1),
        url: r.get(2),
        webhook_id: r.get(3),
        event_type: r.get(4),
        status: r.get(5),
        attempts: r.get(6),
        next_attempt_at: r.get(7),
        last_status_code: r.get(8),
        last_error: r.get(9),
        created_at: r.get(10),
        updated_at: r.get(11),
        payload: r.get(12),
    }))
}

pub(super) struct Attempt {
    pub attempt: i32,
    pub attempted_at: String,
    pub duration_ms: i32,
    pub status_code: Option<i32>,
    pub error: Option<String>,
    pub response_body: Option<String>,
}

/// A delivery's latest attempts (at most 100), newest first.
pub(super) async fn attempts(
    tx: &Transaction<'_>,
    delivery: i64,
) -> Result<Vec<Attempt>, tokio_postgres::Error> {
    let rows = tx
        .query(
            "select attempt, to_char(attempted_at, 'YYYY-MM-DD HH24:MI:SS'), duration_ms, status_code, error,
                    left(response_body, 2048)
               from walhook.attempts where delivery_id = $1
              order by id desc limit 100",
            &[&delivery],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Attempt {
            attempt: r.get(0),
            attempted_at: r.get(1),
            duration_ms: r.get(2),
            status_code: r.get(3),
            error: r.get(4),
            response_body: r.get(5),
        })
        .collect())
}

/// How many deliveries were put back to pending (0: not found).
pub(super) async fn resend(tx: &Transaction<'_>, id: i64) -> Result<i64, tokio_postgres::Error> {
    Ok(tx
        .query_one("select walhook.redeliver(array[$1::bigint])", &[&id])
        .await?
        .get(0))
}

/// Re-creates what the tenant's endpoints (or one of them) missed since `since`; returns how many.
pub(super) async fn recover(
    tx: &Transaction<'_>,
    since: SystemTime,
    endpoint: Option<i64>,
) -> Result<i64, tokio_postgres::Error> {
    let row = match endpoint {
        Some(id) => {
            tx.query_one(
                "select walhook.recover(endpoint_id => $1, since => $2)",
                &[&id, &since],
            )
            .await?
        }
        None => {
            tx.query_one(
                "select walhook.recover(tenant => walhook.current_tenant(), since => $1)",
                &[&since],
            )
            .await?
        }
    };
    Ok(row.get(0))
}

pub(super) struct OverviewLine {
    pub tenant: Option<String>,
    pub endpoint_id: i64,
    pub url: String,
    pub enabled: bool,
    pub paused: bool,
    pub breaker: String,
    pub success_rate_1h: Option<f64>,
    pub pending: i64,
    pub dead: i64,
    pub last_error: Option<String>,
}

pub(super) async fn overview(
    tx: &Transaction<'_>,
    session: &str,
) -> Result<Vec<OverviewLine>, tokio_postgres::Error> {
    let rows = tx
        .query(
            "select tenant, endpoint_id, url, enabled, paused, breaker, success_rate_1h, pending, dead,
                    last_error
               from walhook.portal_overview($1) limit 1000",
            &[&session],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| OverviewLine {
            tenant: r.get(0),
            endpoint_id: r.get(1),
            url: r.get(2),
            enabled: r.get(3),
            paused: r.get(4),
            breaker: r.get(5),
            success_rate_1h: r.get(6),
            pending: r.get(7),
            dead: r.get(8),
            last_error: r.get(9),
        })
        .collect())
}

pub(super) struct Slot {
    pub name: String,
    pub active: bool,
    pub lag_bytes: Option<i64>,
    pub confirmed_at: Option<String>,
}

pub(super) async fn slots(
    tx: &Transaction<'_>,
    session: &str,
) -> Result<Vec<Slot>, tokio_postgres::Error> {
    let rows = tx
        .query(
            "select slot_name, active, lag_bytes, to_char(confirmed_at, 'YYYY-MM-DD HH24:MI:SS')
               from walhook.portal_slots($1)",
            &[&session],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Slot {
            name: r.get(0),
            active: r.get(1),
            lag_bytes: r.get(2),
            confirmed_at: r.get(3),
        })
        .collect())
}

/// One version of a catalog type, as the event types page shows it.
pub(super) struct CatalogVersion {
    pub version: i32,
    pub description: String,
    pub deprecated: bool,
    /// Indented JSON.
    pub schema: String,
    pub example: Option<String>,
}

/// A type of the event catalog with its versions, newest first.
pub(super) struct CatalogType {
    pub name: String,
    pub description: String,
    pub deprecated: bool,
    pub deprecation_note: String,
    /// The version of events that name none (the newest when the row leaves it NULL).
    pub current: Option<i32>,
    pub versions: Vec<CatalogVersion>,
}

/// The event catalog (`walhook.event_types` and their versions): the same for every tenant.
pub(super) async fn catalog(
    tx: &Transaction<'_>,
) -> Result<Vec<CatalogType>, tokio_postgres::Error> {
    let rows = tx
        .query(
            "select t.name, t.description, t.deprecated, t.deprecation_note,
                    coalesce(t.current_version,
                             (select max(x.version) from walhook.event_type_versions x where x.event_type = t.name)),
                    v.version, v.description, v.deprecated, jsonb_pretty(v.schema), jsonb_pretty(v.example)
               from walhook.event_types t
               left join walhook.event_type_versions v on v.event_type = t.name
              order by t.name, v.version desc",
            &[],
        )
        .await?;
    let mut types: Vec<CatalogType> = Vec::new();
    for r in rows {
        let name: String = r.get(0);
        if types.last().is_none_or(|t| t.name != name) {
            types.push(CatalogType {
                name,
                description: r.get(1),
                deprecated: r.get(2),
                deprecation_note: r.get(3),
                current: r.get(4),
                versions: Vec::new(),
            });
        }
        if let Some(version) = r.get::<_, Option<i32>>(5) {
            types
                .last_mut()
                .expect("pushed above")
                .versions
                .push(CatalogVersion {
                    version,
                    description: r.get(6),
                    deprecated: r.get(7),
                    schema: r.get(8),
                    example: r.get(9),
                });
        }
    }
    Ok(types)
}
