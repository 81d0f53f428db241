-- Table-free publish: walhook.publish(event_type, payload, tenant, ordering_key, traceparent) writes an event
-- as a transactional logical decoding message (pg_logical_emit_message(true, …)) instead of an outbox row:
-- one WAL record, and no heap tuple, index entry, vacuum or retention work on walhook.outbox. The replication
-- source asks pgoutput for messages and turns each of walhook's, inside its transaction, into the event the
-- same row would have been: its id from the outbox's id sequence, a uid, created_at = the publishing
-- transaction's now(). A message is decoded if and only if its transaction commits, at the transaction's place
-- in commit order, so it is committed-only, replayed from the slot's confirmed position after a crash like an
-- insert, and checked against walhook.deliveries by its id like one.
--
-- Where the event goes. A message exists only in the WAL: only a logical slot that was already consistent
-- when the publishing transaction wrote it will ever decode it. So publish() writes a message only when
-- walhook's own slot exists in this database, is usable (not invalidated) and is recorded in walhook.slots as
-- backfilled; otherwise it inserts the outbox row, exactly as `INSERT INTO walhook.outbox` would (with its
-- checks, triggers and defaults). That covers every way the slot can be absent:
--   - PostgreSQL before 14, whose pgoutput cannot send messages;
--   - source = "notify", or wal_level below logical: no logical slot can exist, the notify source claims the
--     row (the notify source refuses to start while walhook's slot exists, since nothing would read it);
--   - the daemon never started yet: its first start backfills the rows committed before its slot;
--   - the slot is being created: its confirmed_flush_lsn is null until it is consistent, which it becomes
--     only once every transaction that held a transaction id before a point after its creation began has
--     ended; every transaction that gets its id after that point is decoded whole. So a transaction that,
--     while it runs, finds the slot consistent is decoded whole, message included. (This holds whatever the
--     transaction's snapshot says of walhook.slots: a REPEATABLE READ snapshot may predate a re-creation.)
--     walhook.slots.backfilled, false from before walhook creates the slot until the rows committed before it
--     are queued, is required too, so that publish() writes messages only once walhook counts on the slot.
--     Rows inserted meanwhile are found by the backfill, or streamed;
--   - a dropped, invalidated or (PostgreSQL 15, 16) failed-over slot: the rows go to the outbox, where
--     `walhook recover-slot` and failover recovery find them.
-- What a message gives up is whatever needs the row: messages written before a slot is lost (dropped,
-- invalidated, or missing after a failover on PostgreSQL 15 and 16) and not yet streamed cannot be recovered
-- from the outbox, and walhook.recover() re-creates deliveries from outbox rows only. Every delivery of a
-- message event keeps its own copy of the event (type, payload, created_at, tenant, traceparent), also once
-- succeeded, so redeliver(), the portal and the operational events work without the row.
--
-- Whose messages are events. pg_logical_emit_message is executable by every role, and pgoutput sends every
-- message of the database whatever its publication. An event must be something only walhook_writer may
-- publish, so publish() writes its messages under a prefix holding a random key that only the schema's owner
-- and the daemon may read; the daemon streams messages with exactly this prefix and ignores (with a warning)
-- any other that starts with 'walhook'. A role that may read the WAL may read the key too, and may do far more.

-- walhook:step publish: the messages' prefix and the payload limit publish() applies
create table if not exists walhook.publish_settings (
  one_row boolean primary key default true,
  -- 'walhook:' and 16 random hex digits (64 bits, which no one tries out unseen: every guess is a message in
  -- the WAL and a warning in the daemon's log): the prefix of every message publish() writes
  prefix text not null,
  -- the outbox's payload limit (kept equal to it by walhook.set_max_payload_bytes)
  max_payload_bytes integer not null,
  constraint publish_settings_one_row check (one_row)
);
insert into walhook.publish_settings (prefix, max_payload_bytes)
select 'walhook:' || left(md5(gen_random_uuid()::text), 16),
       coalesce((select substring(p.prosrc from 'check_payload_size\(new\.payload, (\d+)\)')::integer
                   from pg_proc p where p.oid = to_regprocedure('walhook.outbox_payload_limit()')),
                262144)
on conflict (one_row) do nothing;

-- walhook:step functions: set_max_payload_bytes keeps publish()'s limit equal to the outbox's
create or replace function walhook.set_max_payload_bytes(max_bytes integer) returns void
language plpgsql
set search_path = pg_catalog, walhook, pg_temp
as $fn$
begin
  if max_bytes is null or max_bytes < 1024 or max_bytes > 67108864 then
    raise exception 'max_bytes must be between 1024 and 67108864' using errcode = 'invalid_parameter_value';
  end if;
  execute format($f$
    create or replace function walhook.outbox_payload_limit() returns trigger
    language plpgsql
    set search_path = pg_catalog, walhook, pg_temp
    as $body$
    begin
      perform walhook.check_payload_size(new.payload, %s);
      return new;
    end $body$
  $f$, max_bytes);
  update walhook.publish_settings set max_payload_bytes = max_bytes;
end $fn$;

-- walhook:step functions: publish()
-- SECURITY DEFINER: the writer may neither read walhook.slots nor the prefix's key, nor draw ids from the
-- outbox's sequence; what it may do is exactly what this function does. Returns the event's id (the outbox
-- row's, or the one its message carries): walhook.deliveries.event_id. It runs for every event, so it runs
-- three statements: the slot check with the settings, nextval, the message.
create or replace function walhook.publish(event_type text, payload jsonb, tenant text default null,
                                           ordering_key text default null, traceparent text default null,
                                           event_version integer default null)
returns bigint
language plpgsql volatile security definer
set search_path = pg_catalog, walhook, pg_temp
as $$
declare
  settings walhook.publish_settings;
  id_ bigint;
begin
  if left(publish.event_type, 8) = 'walhook.' then
    raise exception 'event_type % is reserved: types starting with ''walhook.'' are walhook''s operational events; use a prefix of your own, like ''order.created''',
      quote_literal(publish.event_type)
      using errcode = 'check_violation';
  end if;
  -- walhook's slot of this database, consistent, usable, backfilled (see above); pgoutput sends messages
  -- from 14 on.
  -- pg_get_replication_slots() rather than its view, which joins pg_database for names it does not need.
  select s.* into settings
    from walhook.publish_settings s
   where exists (
           select 1
             from pg_catalog.pg_get_replication_slots() r
             join walhook.slots w on w.slot_name = r.slot_name
            where w.backfilled and r.slot_type = 'logical' and r.plugin = 'pgoutput'
              and r.confirmed_flush_lsn is not null and r.wal_status is distinct from 'lost'
              and r.datoid = (select d.oid from pg_catalog.pg_database d where d.datname = current_database()))
     and current_setting('server_version_num')::integer >= 140000;
  if not found then
    insert into walhook.outbox (event_type, payload, tenant, ordering_key, traceparent, event_version)
    values (publish.event_type, publish.payload, publish.tenant, publish.ordering_key, publish.traceparent,
            publish.event_version)
    returning id into id_;
    return id_;
  end if;
  -- the outbox's checks, with the same messages
  perform walhook.check_event_type(publish.event_type);
  if publish.payload is null then
    raise exception 'payload is null: pass a JSON value, like ''{}''' using errcode = 'not_null_violation';
  end if;
  perform walhook.check_payload_size(publish.payload, settings.max_payload_bytes);
  if publish.tenant is not null or publish.traceparent is not null then
    perform walhook.check_tenant(publish.tenant), walhook.check_traceparent(publish.traceparent);
  end if;
  if publish.event_version < 1 then
    raise exception 'new row for relation "outbox" violates check constraint "outbox_event_version_valid"'
      using errcode = 'check_violation', hint = 'a version is a positive integer, like 2';
  end if;
  id_ := nextval('walhook.outbox_id_seq');
  -- a header line, [id, uid, created_at, event_type] and, when any is set, tenant, ordering_key,
  -- traceparent and event_version (created_at as JSON prints a timestamp: in UTC whatever the session's settings), then the
  -- payload as jsonb prints it, as pgoutput sends the outbox's column
  perform pg_logical_emit_message(true, settings.prefix,
    case when publish.tenant is null and publish.ordering_key is null and publish.traceparent is null
              and publish.event_version is null
         then json_build_array(id_, gen_random_uuid(), now() at time zone 'UTC', publish.event_type)
         else json_build_array(id_, gen_random_uuid(), now() at time zone 'UTC', publish.event_type,
                               publish.tenant, publish.ordering_key, publish.traceparent, publish.event_version)
    end::text || E'\n' || publish.payload::text);
  return id_;
end $$;
