//! Events that `walhook.publish()` wrote as logical decoding messages (sql/016_publish.sql), turned into the
//! [`Event`] their outbox row would have been.
//!
//! A message's content is a header line, the JSON array `[id, uid, created_at, event_type]` or, when any of
//! them is set, `[id, uid, created_at, event_type, tenant, ordering_key, traceparent, event_version]` (short: every event's
//! WAL record carries it), then the payload as jsonb prints it. `created_at` is a timestamp in UTC as JSON
//! prints one (`2026-11-29T20:18:59.12`), turned here into what the daemon's sessions print for the column
//! (`2026-11-29 20:18:59.12+00`), so both capture paths and every retry build the same envelope. The payload is
//! never parsed: the envelope is built around its text exactly as around the row's column text. Pure, and
//! never panics on bad content.

use serde::Deserialize;

use crate::event::Event;
use crate::lsn::Lsn;

/// The header line (JSON text escapes newlines, so it holds none).
#[derive(Deserialize)]
struct Header(
    i64,
    String,
    String,
    String,
    #[serde(default)] Option<String>,
    #[serde(default)] Option<String>,
    #[serde(default)] Option<String>,
    #[serde(default)] Option<i32>,
);

/// Why a message under walhook's prefix is not an event.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MessageError {
    #[error("the content has no newline between its header and its payload")]
    NoPayload,
    #[error("the content is not UTF-8")]
    NotUtf8,
    #[error("the header is not walhook.publish()'s: {0}")]
    Header(String),
    #[error("the uid {0:?} is not 32 hex digits")]
    Uid(String),
    #[error("created_at {0:?} is not a timestamp as JSON prints one")]
    CreatedAt(String),
    #[error("the payload is empty")]
    EmptyPayload,
}

/// The event a message carries, committed by the transaction whose commit record is at `commit_lsn`.
pub fn event(content: &[u8], commit_lsn: Lsn) -> Result<Event, MessageError> {
    let text = std::str::from_utf8(content).map_err(|_| MessageError::NotUtf8)?;
    let (header, payload) = text.split_once('\n').ok_or(MessageError::NoPayload)?;
    let Header(id, uid, created_at, event_type, tenant, ordering_key, traceparent, version) =
        serde_json::from_str(header).map_err(|e| MessageError::Header(e.to_string()))?;
    // the uid goes into SQL as a uuid with every delivery: a bad one would fail the recorder's batch
    let hex = uid.chars().filter(|c| *c != '-').count();
    if hex != 32 || !uid.chars().all(|c| c == '-' || c.is_ascii_hexdigit()) {
        return Err(MessageError::Uid(uid));
    }
    let created_at = pg_text(&created_at).ok_or(MessageError::CreatedAt(created_at))?;
    if payload.trim().is_empty() {
        return Err(MessageError::EmptyPayload);
    }
    let mut event = Event::new(id, &uid, &event_type, &created_at, payload)
        .with_ordering(ordering_key, Some(commit_lsn))
        .with_traceparent(traceparent.as_deref())
        .with_tenant(tenant)
        .with_version(version);
    event.in_outbox = false;
    Ok(event)
}

/// `2026-11-29T20:18:59.12` (JSON's timestamp, UTC) as PostgreSQL prints the timestamptz in a UTC session:
/// `2026-11-29 20:18:59.12+00`. `None` unless it is `YYYY-MM-DDTHH:MM:SS` with an optional fraction.
fn pg_text(json: &str) -> Option<String> {
    let b = json.as_bytes();
    let shape = b.len() >= 19
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            _ => c.is_ascii_digit(),
        })
        && b.len() != 20;
    shape.then(|| format!("{} {}+00", &json[..10], &json[11..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";

    #[test]
    fn a_message_becomes_the_event_its_row_would_be() {
        let content = format!(
            "[7, \"{UID}\", \"2026-11-29T20:18:59.12\", \"order.created\", \"acme\", \"o-1\", \
             \"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\"]\n\
             {{\"id\": 42, \"note\": \"a\\nb é\"}}"
        );
        let e = event(content.as_bytes(), Lsn(99)).unwrap();
        let row = Event::new(
            7,
            UID,
            "order.created",
            "2026-11-29 20:18:59.12+00",
            r#"{"id": 42, "note": "a\nb é"}"#,
        );
        assert_eq!(e.body, row.body);
        assert_eq!(e.webhook_id, row.webhook_id);
        assert_eq!(e.created_at, row.created_at);
        assert_eq!(e.id, 7);
        assert_eq!(e.tenant.as_deref(), Some("acme"));
        assert_eq!(e.ordering_key.as_deref(), Some("o-1"));
        assert_eq!(e.commit_lsn, Some(Lsn(99)));
        assert!(e.traceparent.is_some());
        assert!(!e.in_outbox);
    }

    #[test]
    fn the_short_header_leaves_the_optional_columns_out() {
        let content = format!("[1, \"{UID}\", \"2026-11-29T20:18:59\", \"a\"]\n{{}}");
        let e = event(content.as_bytes(), Lsn(1)).unwrap();
        assert_eq!(e.created_at, "2026-11-29 20:18:59+00");
        assert_eq!(e.tenant, None);
        assert_eq!(e.ordering_key, None);
        assert_eq!(e.payload(), "{}");
        let nulls = format!("[1, \"{UID}\", \"2026-11-29T20:18:59\", \"a\", null, \"k\", null]\n1");
        let e = event(nulls.as_bytes(), Lsn(1)).unwrap();
        assert_eq!((e.tenant, e.ordering_key.as_deref()), (None, Some("k")));
    }

    #[test]
    fn timestamps_become_what_a_utc_session_prints() {
        assert_eq!(
            pg_text("2026-11-29T20:18:59.123456").as_deref(),
            Some("2026-11-29 20:18:59.123456+00")
        );
        assert_eq!(
            pg_text("0099-01-01T00:00:00").as_deref(),
            Some("0099-01-01 00:00:00+00")
        );
        for bad in [
            "",
            "2026-11-29",
            "2026-11-29 20:18:59",
            "2026-11-29T20:18:59.",
            "2026-11-29T20:18:59+00",
            "2026-11-29T20:18:5x",
            "2026-11-29T20:18:59.1é",
        ] {
            assert_eq!(pg_text(bad), None, "{bad}");
        }
    }

    #[test]
    fn bad_content_is_refused_without_panicking() {
        let header = format!("[1, \"{UID}\", \"2026-11-29T20:18:59\", \"a\"]");
        let refused = |content: &[u8]| event(content, Lsn(1)).expect_err("refused");
        assert_eq!(refused(header.as_bytes()), MessageError::NoPayload);
        assert_eq!(refused(b""), MessageError::NoPayload);
        assert_eq!(
            refused(format!("{header}\n ").as_bytes()),
            MessageError::EmptyPayload
        );
        assert_eq!(refused(&[0xff, b'\n', b'1']), MessageError::NotUtf8);
        for header in [
            "[1]",
            "not json",
            "{\"id\": 1}",
            "[\"1\", \"u\", \"t\", \"a\"]",
            "[1, \"u\", \"t\", \"a\", null, null, null, null, null]",
        ] {
            let err = refused(format!("{header}\n{{}}").as_bytes());
            assert!(matches!(err, MessageError::Header(_)), "{header}: {err}");
        }
        assert_eq!(
            refused(
                header
                    .replace(UID, "a0eebc99-zzzz")
                    .replace('\n', "")
                    .as_bytes()
            ),
            MessageError::NoPayload
        );
        assert_eq!(
            refused(format!("{}\n{{}}", header.replace(UID, "a0eebc99-zzzz")).as_bytes()),
            MessageError::Uid("a0eebc99-zzzz".into())
        );
        assert_eq!(
            refused(format!("{}\n{{}}", header.replace("T20", " 20")).as_bytes()),
            MessageError::CreatedAt("2026-11-29 20:18:59".into())
        );
    }
}
