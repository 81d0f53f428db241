-- Tracing: an optional W3C `traceparent` on each outbox row (the application's span when it published the
-- event), carried to receivers as the parent of every delivery attempt. Deliveries keep it in their copy of
-- the event, so a retry after the outbox row is gone stays in the same trace.
--
-- The outbox is the application's hot table: its changes here are catalog-only (a nullable column without a
-- default rewrites nothing; a NOT VALID constraint scans nothing), each in a step of its own so that each
-- holds its lock for an instant, and the validation scan runs under a lock that inserts pass.

-- walhook:step functions: check_traceparent
-- 00-<trace id: 32 hex>-<parent span id: 16 hex>-<flags: 2 hex>, lowercase, neither id all zeros (W3C Trace
-- Context, version 00). A function rather than a bare regular expression, so that the error says what is
-- expected instead of only naming the constraint.
create or replace function walhook.check_traceparent(t text) returns boolean
language plpgsql immutable
set search_path = pg_catalog, walhook, pg_temp
as $$
begin
  if t is not null and (t !~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$'
                        or substr(t, 4, 32) = repeat('0', 32) or substr(t, 37, 16) = repeat('0', 16)) then
    raise exception 'invalid traceparent %: expected the W3C format 00-<32 hex digits trace id>-<16 hex digits span id>-<2 hex digits flags> in lowercase, ids not all zeros, e.g. ''00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01'' (NULL for none)',
      quote_literal(left(t, 80))
      using errcode = 'check_violation', schema = 'walhook', table = 'outbox', constraint = 'outbox_traceparent_valid';
  end if;
  return true;
end $$;

-- walhook:step outbox: traceparent column
alter table walhook.outbox add column if not exists traceparent text;

-- walhook:step outbox: traceparent check, for new rows
do $$
begin
  if not exists (select from pg_constraint where conname = 'outbox_traceparent_valid'
                  and conrelid = 'walhook.outbox'::regclass) then
    alter table walhook.outbox
      add constraint outbox_traceparent_valid check (walhook.check_traceparent(traceparent)) not valid;
  end if;
end $$;

-- walhook:step outbox: validate the traceparent check (a scan under a lock that inserts pass)
-- Rows written before the column existed have none, and later ones were checked: this cannot fail, it only
-- marks the constraint valid.
do $$
begin
  if exists (select from pg_constraint where conname = 'outbox_traceparent_valid'
              and conrelid = 'walhook.outbox'::regclass and not convalidated) then
    alter table walhook.outbox validate constraint outbox_traceparent_valid;
  end if;
end $$;

-- walhook:step deliveries: their copy of the event keeps its traceparent
alter table walhook.deliveries add column if not exists traceparent text;

-- walhook:step recover() copies the traceparent too
-- As in migration 6, with the event's traceparent in the deliveries' copy.
create or replace function walhook.recover(endpoint_id bigint, since timestamptz,
                                           until timestamptz default now()) returns bigint
language plpgsql
set search_path = pg_catalog, walhook, pg_temp
as $$
declare
  e walhook.endpoints;
  n bigint;
begin
  if since is null then
    raise exception 'since is null: pass the time from which to recover, e.g. now() - interval ''1 day'''
      using errcode = 'invalid_parameter_value';
  end if;
  select * into e from walhook.endpoints where id = recover.endpoint_id;
  if not found then
    raise exception 'no endpoint with id %', recover.endpoint_id using errcode = 'no_data_found';
  end if;
  insert into walhook.deliveries as d
    (event_id, endpoint_id, webhook_id, status, next_attempt_at, event_type, payload, event_created_at,
     ordering_key, traceparent)
  select o.id, e.id, o.uid, 'pending', now(), o.event_type, o.payload, o.created_at,
         case when e.ordered then o.ordering_key end, o.traceparent
    from walhook.outbox o
   where o.created_at >= since and o.created_at < until
     and walhook.matches(o.event_type, e.event_types)
  on conflict on constraint deliveries_event_endpoint_unique do nothing;
  get diagnostics n = row_count;
  return n;
end $$;
