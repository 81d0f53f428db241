//! `Event`: one committed outbox row, with its Standard Webhooks envelope built once.
//!
//! The envelope `{"type":…,"timestamp":…,"data":…}` is assembled around the payload *text* that pgoutput (or
//! SQL) already delivers, with no JSON parse and re-encode: jsonb's text output is valid JSON. Every endpoint
//! and every retry sends these same bytes, so the body, and with it the signed content, is stable.
//!
//! A versioned event (its type is in the catalog, [`crate::catalog`]) names its version in the envelope,
//! `{"type":…,"version":2,"timestamp":…,"data":…}`. CloudEvents bodies ([`Format`]) are built from the same
//! parts when an endpoint asks for them, once per event.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::lsn::Lsn;
use crate::trace::TraceParent;

/// A committed outbox row, ready to send.
#[derive(Debug)]
pub struct Event {
    /// `walhook.outbox.id`; `walhook.deliveries.event_id` refers to it.
    pub id: i64,
    /// `webhook-id` header: `msg_` and the 32 hex digits of the row's `uid`.
    pub webhook_id: String,
    pub event_type: String,
    /// `created_at` as PostgreSQL prints it (ISO, UTC); stored back with retry copies.
    pub created_at: String,
    /// The envelope, byte for byte as sent.
    pub body: Bytes,
    /// The transaction's commit time when the source knows it (replication's Begin message); for the
    /// commit-to-delivery latency metric only.
    pub committed_at: Option<SystemTime>,
    payload_start: usize,
    /// `walhook.outbox.ordering_key`: ordered endpoints get events of one key in commit order.
    pub ordering_key: Option<String>,
    /// The commit position of the event's transaction, which orders events of one key.
    pub commit_lsn: Option<Lsn>,
    /// `walhook.outbox.traceparent`: the application's span, parent of every attempt's span.
    pub traceparent: Option<TraceParent>,
    /// `walhook.outbox.tenant`: only endpoints of this tenant (or the firehose) receive the event.
    pub tenant: Option<String>,
    /// False for an event `walhook.publish()` wrote as a message: with no outbox row to read it back from,
    /// its deliveries keep their copy of it even once succeeded.
    pub in_outbox: bool,
    /// The payload parsed, for endpoints with a filter; parsed once, when the first one needs it.
    parsed: std::sync::OnceLock<Option<serde_json::Value>>,
    /// `walhook.outbox.event_version` (or the delivery copy's): the catalog version of the payload, `None`
    /// when the row left it to the catalog's current version, or for types outside the catalog.
    pub version: Option<i32>,
    /// The CloudEvents structured body, built when the first such endpoint needs it.
    cloudevent: std::sync::OnceLock<Bytes>,
    /// The catalog's verdict on the payload ([`crate::catalog::Catalog::plan`]), reached once per event:
    /// the event naming its published version (`None`: this one as it is), or why it must not be sent.
    checked: std::sync::OnceLock<Result<Option<std::sync::Arc<Event>>, String>>,
}

/// How an endpoint wants its requests (`walhook.endpoints.format`). Every format carries the Standard
/// Webhooks signature headers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    /// The Standard Webhooks envelope `{"type","timestamp","data"}` as the JSON body.
    #[default]
    Standard,
    /// CloudEvents 1.0 structured mode: the event and its attributes as one `application/cloudevents+json`
    /// body.
    CloudEvents,
    /// CloudEvents 1.0 binary mode: the attributes as `ce-*` headers, the payload alone as the JSON body.
    CloudEventsBinary,
}

impl Format {
    /// The column's value; `None` for text the schema's check would refuse.
    pub fn parse(text: &str) -> Option<Format> {
        match text {
            "standard" => Some(Format::Standard),
            "cloudevents" => Some(Format::CloudEvents),
            "cloudevents-binary" => Some(Format::CloudEventsBinary),
            _ => None,
        }
    }
}

/// What one request carries besides the Standard Webhooks headers: the body, its content type and any
/// CloudEvents binary-mode headers.
#[derive(Debug)]
pub struct Rendition {
    pub body: Bytes,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
}

/// The `source` attribute of walhook's CloudEvents: a URI reference naming the producer.
pub const CLOUDEVENTS_SOURCE: &str = "/walhook";

/// The envelope around `payload`, and where the payload starts in it.
fn envelope(
    event_type: &str,
    version: Option<i32>,
    timestamp: &str,
    payload: &str,
) -> (String, usize) {
    let mut body = String::with_capacity(payload.len() + event_type.len() + timestamp.len() + 56);
    body.push_str("{\"type\":");
    push_json_string(&mut body, event_type);
    if let Some(v) = version {
        body.push_str(",\"version\":");
        body.push_str(&v.to_string());
    }
    body.push_str(",\"timestamp\":");
    push_json_string(&mut body, timestamp);
    body.push_str(",\"data\":");
    let payload_start = body.len();
    body.push_str(payload);
    body.push('}');
    (body, payload_start)
}

impl Event {
    /// Builds the event from the outbox row's text columns. `uid` is the UUID text (dashes optional).
    pub fn new(id: i64, uid: &str, event_type: &str, created_at: &str, payload: &str) -> Event {
        let mut webhook_id = String::with_capacity(36);
        webhook_id.push_str("msg_");
        webhook_id.extend(uid.chars().filter(|c| *c != '-'));
        let (body, payload_start) = envelope(event_type, None, &rfc3339(created_at), payload);
        Event {
            id,
            webhook_id,
            event_type: event_type.to_string(),
            created_at: created_at.to_string(),
            body: Bytes::from(body),
            committed_at: None,
            payload_start,
            ordering_key: None,
            commit_lsn: None,
            traceparent: None,
            tenant: None,
            in_outbox: true,
            parsed: std::sync::OnceLock::new(),
            version: None,
            cloudevent: std::sync::OnceLock::new(),
            checked: std::sync::OnceLock::new(),
        }
    }

    /// The catalog's verdict, computed by `verdict` the first time only.
    pub fn checked(
        &self,
        verdict: impl FnOnce() -> Result<Option<std::sync::Arc<Event>>, String>,
    ) -> Result<Option<std::sync::Arc<Event>>, String> {
        self.checked.get_or_init(verdict).clone()
    }

    /// A copy naming `version` in its envelope.
    pub fn clone_with_version(&self, version: Option<i32>) -> Event {
        self.rendered(version, self.payload())
    }

    /// Sets the payload's catalog version, which the envelope then names.
    pub fn with_version(self, version: Option<i32>) -> Event {
        if version == self.version {
            return self;
        }
        self.clone_with_version(version)
    }

    /// The same event (id, `webhook-id`, type, time, tenant, trace and ordering) with another payload in
    /// another version: what an endpoint pinned to an older version receives.
    pub fn rendered(&self, version: Option<i32>, payload: &str) -> Event {
        let (body, payload_start) = envelope(
            &self.event_type,
            version,
            &rfc3339(&self.created_at),
            payload,
        );
        Event {
            id: self.id,
            webhook_id: self.webhook_id.clone(),
            event_type: self.event_type.clone(),
            created_at: self.created_at.clone(),
            body: Bytes::from(body),
            committed_at: self.committed_at,
            payload_start,
            ordering_key: self.ordering_key.clone(),
            commit_lsn: self.commit_lsn,
            traceparent: self.traceparent,
            tenant: self.tenant.clone(),
            parsed: std::sync::OnceLock::new(),
            in_outbox: self.in_outbox,
            version,
            cloudevent: std::sync::OnceLock::new(),
            checked: std::sync::OnceLock::new(),
        }
    }

    /// The body, content type and extra headers of a request in `format`. The Standard Webhooks body is the
    /// one built with the event; the CloudEvents structured body is built once, on first use.
    ///
    /// The CloudEvents attributes: `id` is the `webhook-id`, `source` is [`CLOUDEVENTS_SOURCE`], `type` the
    /// event type, `time` the row's `created_at`, `datacontenttype` `application/json`, and the extensions
    /// `dataversion` (the catalog version, when there is one) and `tenant` (when the event has one).
    pub fn rendition(&self, format: Format) -> Rendition {
        match format {
            Format::Standard => Rendition {
                body: self.body.clone(),
                content_type: "application/json",
                headers: Vec::new(),
            },
            Format::CloudEvents => Rendition {
                body: self
                    .cloudevent
                    .get_or_init(|| Bytes::from(self.cloudevent_json()))
                    .clone(),
                content_type: "application/cloudevents+json",
                headers: Vec::new(),
            },
            Format::CloudEventsBinary => {
                let mut headers = vec![
                    ("ce-specversion", "1.0".to_string()),
                    ("ce-id", self.webhook_id.clone()),
                    ("ce-source", CLOUDEVENTS_SOURCE.to_string()),
                    ("ce-type", self.event_type.clone()),
                    ("ce-time", rfc3339(&self.created_at)),
                ];
                if let Some(v) = self.version {
                    headers.push(("ce-dataversion", v.to_string()));
                }
                if let Some(t) = &self.tenant {
                    // header values must be visible ASCII: a tenant outside it is percent-encoded
                    headers.push(("ce-tenant", percent_encode_header(t)));
                }
                Rendition {
                    body: self.body.slice(self.payload_start..self.body.len() - 1),
                    content_type: "application/json",
                    headers,
                }
            }
        }
    }

    fn cloudevent_json(&self) -> String {
        let payload = self.payload();
        let mut out = String::with_capacity(payload.len() + 200);
        out.push_str("{\"specversion\":\"1.0\",\"id\":");
        push_json_string(&mut out, &self.webhook_id);
        out.push_str(",\"source\":");
        push_json_string(&mut out, CLOUDEVENTS_SOURCE);
        out.push_str(",\"type\":");
        push_json_string(&mut out, &self.event_type);
        out.push_str(",\"time\":");
        push_json_string(&mut out, &rfc3339(&self.created_at));
        out.push_str(",\"datacontenttype\":\"application/json\"");
        if let Some(v) = self.version {
            out.push_str(",\"dataversion\":");
            out.push_str(&v.to_string());
        }
        if let Some(t) = &self.tenant {
            out.push_str(",\"tenant\":");
            push_json_string(&mut out, t);
        }
        out.push_str(",\"data\":");
        out.push_str(payload);
        out.push('}');
        out
    }

    /// Sets the trace context from the row's (or the delivery copy's) `traceparent` text. Text the outbox's
    /// constraint would refuse (a copy made otherwise) is ignored: tracing never stops a delivery.
    /// Sets the tenant (from the outbox row, or the delivery's copy).
    pub fn with_tenant(mut self, tenant: Option<String>) -> Event {
        self.tenant = tenant;
        self
    }

    /// The payload as JSON (`None` if it does not parse, which a jsonb column's text always does).
    pub fn payload_json(&self) -> Option<&serde_json::Value> {
        self.parsed
            .get_or_init(|| serde_json::from_str(self.payload()).ok())
            .as_ref()
    }

    pub fn with_traceparent(mut self, text: Option<&str>) -> Event {
        self.traceparent = text.and_then(|t| {
            let parsed = TraceParent::parse(t);
            if parsed.is_none() {
                tracing::debug!(event_id = self.id, "ignoring an invalid traceparent");
            }
            parsed
        });
        self
    }

    /// Sets the ordering key and commit position (both known only to the source or the stored delivery).
    pub fn with_ordering(mut self, key: Option<String>, commit_lsn: Option<Lsn>) -> Event {
        self.ordering_key = key;
        self.commit_lsn = commit_lsn;
        self
    }

    /// When the event came to be: its commit time if known, else the row's `created_at`.
    pub fn committed_or_created(&self) -> Option<SystemTime> {
        self.committed_at
            .or_else(|| parse_pg_timestamp(&self.created_at))
    }

    /// The payload JSON text, as stored in the outbox.
    pub fn payload(&self) -> &str {
        let bytes = &self.body[self.payload_start..self.body.len() - 1];
        std::str::from_utf8(bytes).expect("built from a &str at a char boundary")
    }

    /// The row's UUID in hex, without the `msg_` prefix (what SQL's `uuid` input accepts).
    pub fn uid_hex(&self) -> &str {
        &self.webhook_id[4..]
    }
}

/// PostgreSQL's ISO timestamptz text (`2026-11-29 20:18:59.123456+00`) as RFC 3339
/// (`2026-11-29T20:18:59.123456Z`). Other offsets keep their sign and gain minutes (`+05:30`, `-03:00`).
pub fn rfc3339(pg: &str) -> String {
    let mut out = pg.replacen(' ', "T", 1);
    // the offset starts at the last '+' or '-' after the time part
    let time_start = out.find('T').map_or(0, |i| i + 1);
    if let Some(rel) = out[time_start..].rfind(['+', '-']) {
        let at = time_start + rel;
        let offset = out[at..].to_string();
        out.truncate(at);
        match offset.as_str() {
            "+00" | "+00:00" | "-00" => out.push('Z'),
            o if o.len() == 3 => {
                out.push_str(o);
                out.push_str(":00");
            }
            o => out.push_str(o),
        }
    }
    out
}

/// PostgreSQL's ISO timestamptz text (`2026-11-29 20:18:59.123456+00`, also `+05:30`) as a `SystemTime`;
/// `None` for anything else (BC dates, infinity), which only costs a latency sample.
fn parse_pg_timestamp(pg: &str) -> Option<SystemTime> {
    let num = |s: &str| -> Option<i64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    let (date, rest) = pg.split_once(' ')?;
    let mut d = date.splitn(3, '-');
    let (y, m, day) = (num(d.next()?)?, num(d.next()?)?, num(d.next()?)?);
    let at = rest.rfind(['+', '-'])?;
    let (time, offset) = rest.split_at(at);
    let (hms, frac) = time.split_once('.').unwrap_or((time, ""));
    let mut t = hms.splitn(3, ':');
    let (h, mi, sec) = (num(t.next()?)?, num(t.next()?)?, num(t.next()?)?);
    let sign = if offset.starts_with('-') { -1 } else { 1 };
    let (oh, om) = offset[1..].split_once(':').unwrap_or((&offset[1..], "0"));
    let offset_secs = sign * (num(oh)? * 3600 + num(om)? * 60);
    // days from civil (Howard Hinnant's algorithm), proleptic Gregorian
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_secs;
    let micros = match frac.len() {
        0 => 0,
        n if n <= 6 => num(frac)? * 10i64.pow(6 - n as u32),
        _ => return None,
    };
    let secs = u64::try_from(secs).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_micros(micros as u64))
}

/// CloudEvents' HTTP binding percent-encodes header values outside printable ASCII (and `%` itself).
fn percent_encode_header(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if (0x20..0x7f).contains(&b) && b != b'%' && b != b'"' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn push_json_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_wraps_the_payload_text_unchanged() {
        let e = Event::new(
            7,
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "order.created",
            "2026-11-29 20:18:59.12+00",
            r#"{"id": 42, "note": "é"}"#,
        );
        assert_eq!(e.webhook_id, "msg_a0eebc999c0b4ef8bb6d6bb9bd380a11");
        assert_eq!(e.uid_hex(), "a0eebc999c0b4ef8bb6d6bb9bd380a11");
        assert_eq!(
            std::str::from_utf8(&e.body).unwrap(),
            r#"{"type":"order.created","timestamp":"2026-11-29T20:18:59.12Z","data":{"id": 42, "note": "é"}}"#
        );
        assert_eq!(e.payload(), r#"{"id": 42, "note": "é"}"#);
        let v: serde_json::Value = serde_json::from_slice(&e.body).unwrap();
        assert_eq!(v["data"]["id"], 42);
    }

    #[test]
    fn timestamps_parse_to_system_time() {
        let at = |s: &str| {
            parse_pg_timestamp(s).map(|t| t.duration_since(UNIX_EPOCH).unwrap().as_micros())
        };
        assert_eq!(at("1970-01-01 00:00:00+00"), Some(0));
        assert_eq!(at("2026-11-29 20:18:59.5+00"), Some(1_795_983_539_500_000));
        assert_eq!(at("2026-11-29 21:18:59.5+01"), Some(1_795_983_539_500_000));
        assert_eq!(
            at("2026-11-29 15:48:59.5-04:30"),
            Some(1_795_983_539_500_000)
        );
        assert_eq!(
            at("2024-02-29 00:00:00.000001+00"),
            Some(1_709_164_800_000_001)
        );
        for bad in [
            "",
            "infinity",
            "2026-11-29",
            "2026-11-29 20:18:59",
            "x-1-1 00:00:00+00",
        ] {
            assert_eq!(at(bad), None, "{bad}");
        }
    }

    #[test]
    fn timestamps_become_rfc3339() {
        assert_eq!(rfc3339("2026-11-29 20:18:59+00"), "2026-11-29T20:18:59Z");
        assert_eq!(
            rfc3339("2026-11-29 20:18:59.5+05:30"),
            "2026-11-29T20:18:59.5+05:30"
        );
        assert_eq!(
            rfc3339("2026-11-29 20:18:59-03"),
            "2026-11-29T20:18:59-03:00"
        );
    }
}
