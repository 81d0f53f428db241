//! Events that `walhook.publish()` wrote as logical decoding messages (sql/016_publish.sql), turned into the
//! [`Event`] their outbox row would have been.
//!
//! A message's content is one line of JSON with the outbox columns (`id`, `uid`, `created_at`, `event_type`,
//! and `tenant`, `ordering_key`, `traceparent` when set), a newline, then the payload as jsonb prints it. The
//! payload is never parsed: the envelope is built around its text exactly as around the row's column text,
//! so both capture paths send the same bytes for the same event. Pure, and never panics on bad content.

use serde::Deserialize;

use crate::event::Event;
use crate::lsn::Lsn;

/// The header line (JSON text escapes newlines, so it holds none).
#[derive(Deserialize)]
struct Header {
    id: i64,
    uid: String,
    created_at: String,
    event_type: String,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    ordering_key: Option<String>,
    #[serde(default)]
    traceparent: Option<String>,
}

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
    #[error("the payload is empty")]
    EmptyPayload,
}

/// The event a message carries, committed by the transaction whose commit record is at `commit_lsn`.
pub fn event(content: &[u8], commit_lsn: Lsn) -> Result<Event, MessageError> {
    let text = std::str::from_utf8(content).map_err(|_| MessageError::NotUtf8)?;
    let (header, payload) = text.split_once('\n').ok_or(MessageError::NoPayload)?;
    let h: Header =
        serde_json::from_str(header).map_err(|e| MessageError::Header(e.to_string()))?;
    // the uid goes into SQL as a uuid with every delivery: a bad one would fail the recorder's batch
    let hex = h.uid.chars().filter(|c| *c != '-').count();
    if hex != 32 || !h.uid.chars().all(|c| c == '-' || c.is_ascii_hexdigit()) {
        return Err(MessageError::Uid(h.uid));
    }
    if payload.trim().is_empty() {
        return Err(MessageError::EmptyPayload);
    }
    let mut event = Event::new(h.id, &h.uid, &h.event_type, &h.created_at, payload)
        .with_ordering(h.ordering_key, Some(commit_lsn))
        .with_traceparent(h.traceparent.as_deref())
        .with_tenant(h.tenant);
    event.in_outbox = false;
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11";

    #[test]
    fn a_message_becomes_the_event_its_row_would_be() {
        let content = format!(
            "{{\"id\":7,\"uid\":\"{UID}\",\"created_at\":\"2026-11-29 20:18:59.12+00\",\
             \"event_type\":\"order.created\",\"tenant\":\"acme\",\"ordering_key\":\"o-1\",\
             \"traceparent\":\"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\"}}\n\
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
        assert_eq!(e.id, 7);
        assert_eq!(e.tenant.as_deref(), Some("acme"));
        assert_eq!(e.ordering_key.as_deref(), Some("o-1"));
        assert_eq!(e.commit_lsn, Some(Lsn(99)));
        assert!(e.traceparent.is_some());
        assert!(!e.in_outbox);
    }

    #[test]
    fn optional_columns_may_be_left_out() {
        let content = format!(
            "{{\"id\":1,\"uid\":\"{UID}\",\"created_at\":\"2026-11-29 20:18:59+00\",\"event_type\":\"a\",\
             \"future\":[1]}}\n{{}}"
        );
        let e = event(content.as_bytes(), Lsn(1)).unwrap();
        assert_eq!(e.tenant, None);
        assert_eq!(e.ordering_key, None);
        assert_eq!(e.payload(), "{}");
    }

    #[test]
    fn bad_content_is_refused_without_panicking() {
        let header = format!(
            "{{\"id\":1,\"uid\":\"{UID}\",\"created_at\":\"2026-11-29 20:18:59+00\",\"event_type\":\"a\"}}"
        );
        let bad_uid = header.replace(UID, "a0eebc99-zzzz");
        let refused = |content: &[u8]| event(content, Lsn(1)).expect_err("refused");
        assert_eq!(refused(header.as_bytes()), MessageError::NoPayload);
        assert_eq!(refused(b""), MessageError::NoPayload);
        assert_eq!(
            refused(format!("{header}\n ").as_bytes()),
            MessageError::EmptyPayload
        );
        assert_eq!(refused(&[0xff, b'\n', b'1']), MessageError::NotUtf8);
        for header in ["{\"id\":1}", "not json", "{\"id\":\"1\"}", "[]"] {
            let err = refused(format!("{header}\n{{}}").as_bytes());
            assert!(matches!(err, MessageError::Header(_)), "{header}: {err}");
        }
        assert_eq!(
            refused(format!("{bad_uid}\n{{}}").as_bytes()),
            MessageError::Uid("a0eebc99-zzzz".into())
        );
    }
}
