//! The `portal` scenario: how fast the portal's pages answer with a large delivery log.
//!
//! One million deliveries (20,000 with `--quick`; `--events` × 5 otherwise) with their outbox rows and one
//! attempt each, spread over 100 tenants of 5 endpoints each, mostly succeeded, some dead and pending, are
//! written straight into the scratch database. The portal then serves them in this process, as a log-in role
//! holding only `walhook_portal` (so row-level security is what it is in production), and each page is
//! requested over loopback by one client, one request at a time: a tenant's endpoints, an endpoint, the
//! delivery log unfiltered, filtered by status, endpoint and a rare event type, an older page, one delivery
//! with its attempts, and the operator's overview. Each page's p50/p99 is the answer as the browser sees it
//! (session check, the transaction, the queries, rendering).

use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use tokio_util::sync::CancellationToken;

use super::report::{Portal, PortalPage};
use super::server::Scratch;
use super::{db_err, Bench, BenchError, Latency};

const TENANTS: i64 = 100;
const ENDPOINTS_PER_TENANT: i64 = 5;
/// Requests per page (after a few to warm up).
const REQUESTS: usize = 200;
const ROLE: &str = "walhook_bench_portal";

impl Bench {
    pub(super) async fn portal(&self, scratch: &Scratch) -> Result<Portal, BenchError> {
        let deliveries: i64 = if self.plan.quick {
            20_000
        } else {
            (self.plan.events as i64 * 5).max(1_000)
        };
        let started = Instant::now();
        self.fill_portal(scratch, deliveries).await?;
        let filled = started.elapsed();
        eprintln!(
            "bench:   {deliveries} deliveries, outbox rows and attempts written in {:.1} s",
            filled.as_secs_f64()
        );

        // the portal, as a role that row-level security holds to each request's tenant
        let mut db = scratch.db.clone();
        db.user(ROLE).password("bench");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|source| BenchError::Io {
                what: "binding the portal's loopback port".into(),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| BenchError::Io {
            what: "reading the portal's port".into(),
            source,
        })?;
        let config = crate::config::PortalConfig {
            listen: addr,
            ..Default::default()
        };
        let settings = crate::portal::Settings::new(&config, Default::default());
        let stop = CancellationToken::new();
        let server = tokio::spawn(crate::portal::serve(
            listener,
            settings,
            db,
            config.connections,
            stop.clone(),
        ));

        let result = self.request_pages(scratch, addr).await;
        stop.cancel();
        let _ = server.await;
        let pages = result?;
        let p99 = pages
            .iter()
            .filter_map(|p| p.latency.as_ref().map(|l| l.p99_ms))
            .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))));
        Ok(Portal {
            deliveries: deliveries as u64,
            tenants: TENANTS as u64,
            fill_s: filled.as_secs_f64(),
            requests_per_page: REQUESTS,
            slowest_page_p99_ms: p99,
            pages,
        })
    }

    /// Tenants, endpoints, outbox rows, deliveries and attempts, written as the superuser, and the portal's role.
    async fn fill_portal(&self, scratch: &Scratch, deliveries: i64) -> Result<(), BenchError> {
        let c = &scratch.client;
        c.batch_execute(&format!(
            "/* walhook-bench */ do $$ begin
               if not exists (select from pg_roles where rolname = '{ROLE}') then
                 create role {ROLE} login password 'bench' in role walhook_portal;
               end if; end $$;
             /* walhook-bench */ insert into walhook.endpoints (url, tenant, description)
               select format('http://127.0.0.1:9/t%s/%s', t, e), 't' || t, 'walhook bench'
                 from generate_series(0, {t}) t, generate_series(0, {e}) e",
            t = TENANTS - 1,
            e = ENDPOINTS_PER_TENANT - 1,
        ))
        .await
        .map_err(db_err(
            "creating the portal's role and the tenants' endpoints",
        ))?;
        // in chunks, so that no statement holds a million rows at once
        let chunk = 100_000i64;
        let mut from = 1i64;
        while from <= deliveries {
            let to = (from + chunk - 1).min(deliveries);
            c.execute(
                "/* walhook-bench */ with events as (
                   insert into walhook.outbox (event_type, payload, tenant, created_at)
                   select case when g / 100 % 1000 = 0 then 'order.refunded' when g % 3 = 0 then 'order.paid'
                               else 'order.created' end,
                          jsonb_build_object('order_id', g, 'total_cents', 1000 + g % 9000),
                          't' || (g % 100), now() - make_interval(secs => ($2 - g)::float8 / 10)
                     from generate_series($1::bigint, $2::bigint) g
                   returning id, tenant, created_at),
                 placed as (
                   insert into walhook.deliveries (event_id, endpoint_id, webhook_id, status, attempts,
                                                   schedule_step, next_attempt_at, last_status_code,
                                                   last_attempt_at, tenant, created_at, updated_at)
                   select v.id, e.id, gen_random_uuid(),
                          case when v.id / 100 % 50 = 0 then 'dead' when v.id / 100 % 100 = 1 then 'pending' else 'succeeded' end,
                          1, 1, case when v.id / 100 % 100 = 1 then now() + interval '1 hour' end,
                          case when v.id / 100 % 50 = 0 then 500 else 200 end, v.created_at, v.tenant, v.created_at,
                          v.created_at
                     from events v
                     join lateral (select x.id from walhook.endpoints x where x.tenant = v.tenant
                                    order by x.id offset (v.id / 100 % 5) limit 1) e on true
                   returning id, status, last_attempt_at)
                 insert into walhook.attempts (delivery_id, attempt, attempted_at, duration_ms, status_code,
                                               error, response_body)
                 select id, 1, last_attempt_at, 12, case when status = 'dead' then 500 else 200 end,
                        case when status = 'dead' then 'HTTP 500' end, 'ok'
                   from placed",
                &[&from, &to],
            )
            .await
            .map_err(db_err("writing the deliveries"))?;
            from = to + 1;
        }
        c.batch_execute(
            "/* walhook-bench */ analyze walhook.outbox, walhook.deliveries, walhook.attempts",
        )
        .await
        .map_err(db_err("analyzing the tables"))?;
        Ok(())
    }

    /// Opens a tenant's and an operator's session and times every page.
    async fn request_pages(
        &self,
        scratch: &Scratch,
        addr: std::net::SocketAddr,
    ) -> Result<Vec<PortalPage>, BenchError> {
        let c = &scratch.client;
        let link = |tenant: Option<&'static str>, operator: bool| async move {
            c.query_one(
                "/* walhook-bench */ select path from walhook.portal_link($1::text, interval '1 hour', $2)",
                &[&tenant, &operator],
            )
            .await
            .map(|r| r.get::<_, String>(0))
            .map_err(db_err("minting a portal link"))
        };
        let mut client = PageClient::connect(addr).await?;
        let tenant_cookie = client.login(&link(Some("t7"), false).await?).await?;
        let operator_cookie = client.login(&link(None, true).await?).await?;
        let row = c
            .query_one(
                "/* walhook-bench */ select (select min(id) from walhook.endpoints where tenant = 't7'),
                        (select max(id) from walhook.deliveries where tenant = 't7' and status = 'dead'),
                        (select id from walhook.deliveries where tenant = 't7' order by id
                          offset (select count(*) / 2 from walhook.deliveries where tenant = 't7') limit 1)",
                &[],
            )
            .await
            .map_err(db_err("choosing the pages"))?;
        let (endpoint, dead, older): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
        let pages = [
            ("endpoints", "/".to_string(), &tenant_cookie),
            ("endpoint", format!("/endpoints/{endpoint}"), &tenant_cookie),
            ("deliveries", "/deliveries".into(), &tenant_cookie),
            (
                "deliveries, older page",
                format!("/deliveries?before={older}"),
                &tenant_cookie,
            ),
            (
                "deliveries, dead",
                "/deliveries?status=dead".into(),
                &tenant_cookie,
            ),
            (
                "deliveries, one endpoint",
                format!("/deliveries?endpoint={endpoint}"),
                &tenant_cookie,
            ),
            (
                "deliveries, a rare type",
                "/deliveries?event_type=order.refunded".into(),
                &tenant_cookie,
            ),
            (
                "delivery and attempts",
                format!("/deliveries/{dead}"),
                &tenant_cookie,
            ),
            ("operator overview", "/operator".into(), &operator_cookie),
        ];
        let mut measured = Vec::new();
        for (name, path, cookie) in pages {
            for _ in 0..5 {
                client.get(&path, cookie).await?;
            }
            let mut ms = Vec::with_capacity(REQUESTS);
            for _ in 0..REQUESTS {
                let t = Instant::now();
                client.get(&path, cookie).await?;
                ms.push(t.elapsed().as_secs_f64() * 1000.0);
            }
            let latency = Latency::from_ms(ms);
            eprintln!(
                "bench:   {name:<26} p50 {} ms, p99 {} ms",
                latency
                    .as_ref()
                    .map_or("-".into(), |l| format!("{:.1}", l.p50_ms)),
                latency
                    .as_ref()
                    .map_or("-".into(), |l| format!("{:.1}", l.p99_ms)),
            );
            measured.push(PortalPage {
                name: name.into(),
                path,
                latency,
            });
        }
        Ok(measured)
    }
}

/// One keep-alive HTTP/1 connection to the portal.
struct PageClient {
    addr: std::net::SocketAddr,
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

impl PageClient {
    async fn connect(addr: std::net::SocketAddr) -> Result<PageClient, BenchError> {
        let io = |source| BenchError::Io {
            what: "connecting to the portal".into(),
            source,
        };
        let stream = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| BenchError::Internal(format!("portal handshake: {e}")))?;
        tokio::spawn(connection);
        Ok(PageClient { addr, sender })
    }

    async fn send(
        &mut self,
        path: &str,
        cookie: &str,
    ) -> Result<hyper::Response<Bytes>, BenchError> {
        let request = hyper::Request::get(path)
            .header("host", self.addr.to_string())
            .header("cookie", cookie)
            .body(Empty::<Bytes>::new())
            .map_err(|e| BenchError::Internal(format!("portal request {path}: {e}")))?;
        let failed = |e: String| BenchError::Internal(format!("portal request {path}: {e}"));
        self.sender
            .ready()
            .await
            .map_err(|e| failed(e.to_string()))?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| failed(e.to_string()))?
            .to_bytes();
        Ok(hyper::Response::from_parts(parts, body))
    }

    /// Exchanges a link; returns the session cookie (`name=value`).
    async fn login(&mut self, path: &str) -> Result<String, BenchError> {
        let response = self.send(path, "").await?;
        response
            .headers()
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find(|v| v.starts_with("walhook_portal="))
            .and_then(|v| v.split(';').next())
            .map(str::to_string)
            .ok_or_else(|| {
                BenchError::Internal(format!(
                    "the portal did not open a session for {path}: {}",
                    response.status()
                ))
            })
    }

    async fn get(&mut self, path: &str, cookie: &str) -> Result<(), BenchError> {
        let response = self.send(path, cookie).await?;
        if !response.status().is_success() {
            return Err(BenchError::Internal(format!(
                "the portal answered {path} with {}",
                response.status()
            )));
        }
        Ok(())
    }
}
