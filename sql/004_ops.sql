-- Operations: slot bookkeeping for recovery, and the index that dead-delivery counts and retention use.
--
-- Shipped as one transaction, this file was later split into steps (see src/schema.rs and 003) so that the
-- index on walhook.deliveries is built concurrently; the resulting schema is the same.

-- walhook:step slots: the replication slots walhook created
-- The replication slots walhook created. A slot that is missing although it is listed here was dropped (by
-- hand, or by a failover that did not carry it over): walhook refuses to quietly start afresh, because events
-- committed meanwhile were never streamed, and points to `walhook recover-slot`.
create table if not exists walhook.slots (
  slot_name text primary key,
  created_at timestamptz not null default now(),
  -- set by `walhook recover-slot`
  recovered_at timestamptz,
  -- false from just before the slot is created until the rows committed before it are queued: a slot whose
  -- backfill never finished is dropped and created again, so those rows are not missed
  backfilled boolean not null default true
);

-- walhook:step deliveries: the index of dead deliveries
-- Dead deliveries are few; this serves the dead count sampled for metrics, `walhook status` and the
-- retention of dead rows, and costs nothing on the hot path (only rows that give up enter it).
create index concurrently if not exists deliveries_dead on walhook.deliveries (updated_at) where status = 'dead';
