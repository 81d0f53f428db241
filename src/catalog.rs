//! The event catalog (`walhook.event_types`, `walhook.event_type_versions`): what an event of a listed type
//! must look like, and how it reaches an endpoint that pinned an older version.
//!
//! Fan-out stage, run by dispatch just before a request: the payload is checked against its version's JSON
//! Schema, so an event the catalog says is malformed is recorded `dead` with the failing path and never sent
//! (PostgreSQL itself has no JSON Schema validator to refuse it at INSERT). Doing it at the request, rather
//! than when the event is streamed, covers every way a delivery comes to be (streamed, retried, recovered,
//! backfilled) with one rule. An endpoint pinned to an older version gets the payload rendered down by the
//! catalog's SQL downgrade functions (`walhook.render_payload`); that round trip is made only for pinned
//! endpoints, whose copies keep the published payload so that a fixed function renders it again.
//!
//! The catalog is opt-in: a type it does not list costs one hash lookup and is sent as before. The cache
//! reloads with the endpoints (the catalog's tables bump the same generation).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use tokio_postgres::Client;

use crate::conninfo::ConnInfo;
use crate::event::Event;
use crate::store::StoreError;

/// One row of the catalog query: a type and one of its versions (none when it lists no version yet).
#[derive(Debug, Clone)]
pub struct CatalogRow {
    pub event_type: String,
    pub current_version: Option<i32>,
    pub version: Option<i32>,
    /// The version's JSON Schema, as JSON text.
    pub schema: Option<String>,
}

struct Version {
    /// The compiled schema, or why it does not compile (its events are then refused with that reason).
    validator: Result<jsonschema::Validator, String>,
}

struct TypeEntry {
    current: Option<i32>,
    versions: BTreeMap<i32, Version>,
}

impl TypeEntry {
    /// The version of an event of this type that does not name one: the current version, else the newest.
    fn default_version(&self) -> Option<i32> {
        self.current
            .or_else(|| self.versions.keys().next_back().copied())
    }
}

/// The catalog, compiled.
#[derive(Default)]
pub struct Catalog {
    types: HashMap<String, TypeEntry>,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog")
            .field("types", &self.types.len())
            .finish()
    }
}

/// What an event becomes for one endpoint.
#[derive(Debug)]
pub enum Plan {
    /// Send this (the event, naming its version when it has one).
    Send(Arc<Event>),
    /// Render the payload from version `from` down to `to` (the endpoint's pin), then check it and send it.
    Render {
        event: Arc<Event>,
        from: i32,
        to: i32,
    },
    /// Do not send: record the delivery dead with this reason.
    Refuse(String),
}

impl Catalog {
    pub fn build(rows: Vec<CatalogRow>) -> Catalog {
        let mut types: HashMap<String, TypeEntry> = HashMap::new();
        for row in rows {
            let entry = types
                .entry(row.event_type.clone())
                .or_insert_with(|| TypeEntry {
                    current: row.current_version,
                    versions: BTreeMap::new(),
                });
            if let Some(v) = row.version {
                let validator = compile(&row.event_type, v, row.schema.as_deref().unwrap_or("{}"));
                if let Err(why) = &validator {
                    tracing::error!("{why}");
                }
                entry.versions.insert(v, Version { validator });
            }
        }
        Catalog { types }
    }

    pub fn is_empty(&self) -> bool {
        self.types.is_empty()
    }

    /// The version an event is published in: its row's, else its type's default; `None` outside the catalog.
    pub fn published_version(&self, event: &Event) -> Option<i32> {
        match self.types.get(&event.event_type) {
            Some(t) => event.version.or_else(|| t.default_version()),
            None => event.version,
        }
    }

    /// Checks `payload` (JSON text) against the schema of `event_type` version `version`; `Ok` for types and
    /// versions the catalog leaves unchecked (a type outside it, or one that lists no version).
    pub fn check(&self, event_type: &str, version: i32, payload: &str) -> Result<(), String> {
        let Some(entry) = self.types.get(event_type) else {
            return Ok(());
        };
        if entry.versions.is_empty() {
            return Ok(());
        }
        let Some(v) = entry.versions.get(&version) else {
            let held: Vec<String> = entry.versions.keys().map(|v| v.to_string()).collect();
            return Err(format!(
                "{event_type} version {version} is not in the catalog (walhook.event_type_versions holds \
                 versions {}): publish one of those, or add version {version} and then redeliver",
                held.join(", ")
            ));
        };
        let validator = v.validator.as_ref().map_err(Clone::clone)?;
        let instance: serde_json::Value = serde_json::from_str(payload)
            .map_err(|e| format!("{event_type} version {version}: the payload is not JSON: {e}"))?;
        let problems: Vec<String> = validator
            .iter_errors(&instance)
            .take(3)
            .map(|e| {
                let at = e.instance_path().to_string();
                let at = if at.is_empty() { "/".to_string() } else { at };
                format!("at {at}: {e}")
            })
            .collect();
        if problems.is_empty() {
            return Ok(());
        }
        Err(format!(
            "{event_type} version {version}: the payload does not match the version's JSON Schema in \
             walhook.event_type_versions ({}); it was not sent. Fix the publisher (or the schema), then \
             walhook.redeliver the delivery",
            problems.join("; ")
        ))
    }

    /// What `event` becomes for an endpoint that pinned `pin` for its type (`None`: no pin). The event's
    /// published version is checked once per event and remembered in it.
    pub fn plan(&self, event: &Arc<Event>, pin: Option<i32>) -> Plan {
        let Some(version) = self.published_version(event) else {
            return Plan::Send(event.clone());
        };
        let published = match event.checked(|| {
            self.check(&event.event_type, version, event.payload())?;
            Ok((event.version != Some(version))
                .then(|| Arc::new(event.clone_with_version(Some(version)))))
        }) {
            Ok(Some(versioned)) => versioned,
            Ok(None) => event.clone(),
            Err(why) => return Plan::Refuse(why),
        };
        match pin {
            Some(pin) if pin < version && self.types.contains_key(&event.event_type) => {
                Plan::Render {
                    event: published,
                    from: version,
                    to: pin,
                }
            }
            _ => Plan::Send(published),
        }
    }
}

fn compile(event_type: &str, version: i32, schema: &str) -> Result<jsonschema::Validator, String> {
    let fix = "fix walhook.event_type_versions.schema; its events are recorded dead until then";
    let value: serde_json::Value = serde_json::from_str(schema).map_err(|e| {
        format!("{event_type} version {version}: the schema is not JSON: {e}; {fix}")
    })?;
    jsonschema::validator_for(&value).map_err(|e| {
        format!("{event_type} version {version}: the schema is not a valid JSON Schema: {e}; {fix}")
    })
}

/// The compiled catalog the refresher replaces and dispatch reads.
#[derive(Default, Debug)]
pub struct CatalogCell(RwLock<Arc<Catalog>>);

impl CatalogCell {
    pub fn get(&self) -> Arc<Catalog> {
        self.0.read().expect("lock holders never panic").clone()
    }

    pub fn set(&self, catalog: Catalog) {
        *self.0.write().expect("lock holders never panic") = Arc::new(catalog);
    }
}

/// Why a rendering failed.
#[derive(Debug)]
pub enum RenderError {
    /// The database could not be reached: try again later.
    Later(String),
    /// The downgrade failed (the function raised, or returned what the older schema refuses).
    Refuse(String),
}

/// Renders payloads in older versions with `walhook.render_payload`, over a connection of its own.
pub struct Renderer {
    db: ConnInfo,
    client: tokio::sync::Mutex<Option<Client>>,
}

impl std::fmt::Debug for Renderer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Renderer")
    }
}

impl Renderer {
    pub fn new(db: ConnInfo) -> Renderer {
        Renderer {
            db,
            client: tokio::sync::Mutex::new(None),
        }
    }

    /// `event`'s payload (version `from`) as version `to`'s, checked against `to`'s schema.
    pub async fn render(
        &self,
        catalog: &Catalog,
        event: &Event,
        from: i32,
        to: i32,
    ) -> Result<Event, RenderError> {
        let mut client = self.client.lock().await;
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            let connected = crate::store::connect_client(&self.db)
                .await
                .map_err(|e| RenderError::Later(e.to_string()))?;
            *client = Some(connected);
        }
        let c = client.as_ref().expect("connected above");
        let rendered = c
            .query_one(
                "select walhook.render_payload($1, $2, $3, $4::text::jsonb)::text",
                &[&event.event_type, &from, &to, &event.payload()],
            )
            .await
            .map_err(StoreError::from);
        let text: String = match rendered {
            Ok(row) => row.get(0),
            Err(e) if e.is_connection() => {
                *client = None;
                return Err(RenderError::Later(e.to_string()));
            }
            Err(e) => {
                return Err(RenderError::Refuse(format!(
                    "rendering {} version {from} as version {to} (the endpoint's pin) failed: {}; fix the \
                     downgrade function in walhook.event_type_versions, then walhook.redeliver the delivery",
                    event.event_type,
                    e.describe_with(crate::pgerror::Job::Daemon, None)
                )))
            }
        };
        drop(client);
        catalog
            .check(&event.event_type, to, &text)
            .map_err(|why| {
                RenderError::Refuse(format!(
                    "the downgrade of {} from version {from} to {to} gave a payload that version {to}'s \
                     schema refuses: {why}",
                    event.event_type
                ))
            })?;
        Ok(event.rendered(Some(to), &text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(t: &str, current: Option<i32>, v: Option<i32>, schema: &str) -> CatalogRow {
        CatalogRow {
            event_type: t.into(),
            current_version: current,
            version: v,
            schema: Some(schema.into()),
        }
    }

    fn event(t: &str, payload: &str, version: Option<i32>) -> Arc<Event> {
        Arc::new(
            Event::new(
                7,
                "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
                t,
                "2026-12-02 10:00:00+00",
                payload,
            )
            .with_version(version),
        )
    }

    const AMOUNT: &str =
        r#"{"type":"object","required":["amount"],"properties":{"amount":{"type":"integer"}}}"#;

    fn catalog() -> Catalog {
        Catalog::build(vec![
            row("order.created", None, Some(1), "{}"),
            row("order.created", None, Some(2), AMOUNT),
            row("order.paid", Some(1), Some(1), "true"),
            row("order.paid", Some(1), Some(2), "true"),
            row("doc.only", None, None, "{}"),
            row("broken.schema", None, Some(1), r#"{"type": 12}"#),
        ])
    }

    #[test]
    fn types_outside_the_catalog_are_sent_as_they_are() {
        let c = catalog();
        let e = event("user.signed_up", r#"{"amount":"x"}"#, None);
        assert!(matches!(c.plan(&e, Some(1)), Plan::Send(s) if Arc::ptr_eq(&s, &e)));
        let e = event("doc.only", r#"{}"#, None);
        assert!(matches!(c.plan(&e, None), Plan::Send(s) if Arc::ptr_eq(&s, &e)));
        let empty = Catalog::default();
        let e = event("order.created", r#"{"amount":"x"}"#, None);
        assert!(matches!(empty.plan(&e, None), Plan::Send(s) if Arc::ptr_eq(&s, &e)));
    }

    #[test]
    fn a_payload_that_breaks_its_schema_is_refused_with_the_path() {
        let c = catalog();
        let e = event("order.created", r#"{"amount":"x"}"#, None);
        let Plan::Refuse(why) = c.plan(&e, None) else {
            panic!("expected a refusal");
        };
        assert!(why.contains("order.created version 2"), "{why}");
        assert!(why.contains("at /amount"), "{why}");
        assert!(why.contains("integer"), "{why}");
        // version 1 has no rules
        let e = event("order.created", r#"{"amount":"x"}"#, Some(1));
        assert!(matches!(c.plan(&e, None), Plan::Send(_)));
        // a version the catalog does not hold
        let e = event("order.created", r#"{}"#, Some(9));
        let Plan::Refuse(why) = c.plan(&e, None) else {
            panic!("expected a refusal");
        };
        assert!(why.contains("versions 1, 2"), "{why}");
        // a schema that does not compile refuses its events with the reason
        let e = event("broken.schema", r#"{}"#, None);
        let Plan::Refuse(why) = c.plan(&e, None) else {
            panic!("expected a refusal");
        };
        assert!(why.contains("not a valid JSON Schema"), "{why}");
    }

    #[test]
    fn the_version_is_the_rows_else_current_else_newest_and_the_body_names_it() {
        let c = catalog();
        let e = event("order.created", r#"{"amount":1}"#, None);
        let Plan::Send(s) = c.plan(&e, None) else {
            panic!()
        };
        assert_eq!(s.version, Some(2));
        let body = std::str::from_utf8(&s.body).unwrap();
        assert!(
            body.starts_with(r#"{"type":"order.created","version":2,"timestamp":"#),
            "{body}"
        );
        assert!(body.ends_with(r#""data":{"amount":1}}"#), "{body}");
        // checked once: the second plan reuses the versioned event
        let Plan::Send(again) = c.plan(&e, None) else {
            panic!()
        };
        assert!(Arc::ptr_eq(&s, &again));
        let e = event("order.paid", "{}", None);
        let Plan::Send(s) = c.plan(&e, None) else {
            panic!()
        };
        assert_eq!(s.version, Some(1), "current_version wins over the newest");
    }

    #[test]
    fn an_older_pin_is_rendered_and_a_newer_or_equal_one_is_not() {
        let c = catalog();
        let e = event("order.created", r#"{"amount":1}"#, Some(2));
        assert!(matches!(
            c.plan(&e, Some(1)),
            Plan::Render { from: 2, to: 1, .. }
        ));
        assert!(matches!(c.plan(&e, Some(2)), Plan::Send(_)));
        assert!(matches!(c.plan(&e, Some(3)), Plan::Send(_)));
    }
}
