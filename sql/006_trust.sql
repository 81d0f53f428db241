-- Trust: pausing without losing events, recovering what a disabled endpoint missed, endpoint health shared
-- by every instance and kept across restarts, the slot's progress for retention, and hosts the daemon can
-- reach. Only walhook's small tables are changed here; the outbox and deliveries are not touched.

-- walhook:step endpoints: paused, resumed_at, hosts in ASCII
-- A paused endpoint keeps receiving deliveries, held as pending until it is resumed; a disabled one
-- (enabled = false) receives none, and walhook.recover() re-creates what it missed.
alter table walhook.endpoints
  add column if not exists paused boolean not null default false,
  -- when it was last re-enabled or resumed: `delivery.disable_after` counts failures from then at the earliest
  add column if not exists resumed_at timestamptz;

create or replace function walhook.endpoints_touch() returns trigger
language plpgsql
set search_path = pg_catalog, walhook, pg_temp
as $$
begin
  new.updated_at := now();
  if new.enabled and not old.enabled then
    new.disabled_reason := null;
  end if;
  if (new.enabled and not old.enabled) or (old.paused and not new.paused) then
    new.resumed_at := now();
  end if;
  return new;
end $$;

-- The daemon percent-encodes what the path and query hold, but a host name must be ASCII: an international
-- domain name is written in punycode (xn--...), which only the application can do right.
create or replace function walhook.check_url_host(u text) returns boolean
language plpgsql immutable
set search_path = pg_catalog, walhook, pg_temp
as $$
begin
  if u is not null and substring(u from '^[A-Za-z]+://([^/?#]*)') ~ '[^\x01-\x7f]' then
    raise exception 'invalid endpoint url %: its host is not ASCII; write an international domain name in punycode (xn--...)',
      quote_literal(u)
      using errcode = 'check_violation', schema = 'walhook', table = 'endpoints', constraint = 'endpoints_url_host_ascii';
  end if;
  return true;
end $$;

do $$
begin
  if not exists (select from pg_constraint where conname = 'endpoints_url_host_ascii'
                  and conrelid = 'walhook.endpoints'::regclass) then
    alter table walhook.endpoints
      add constraint endpoints_url_host_ascii check (walhook.check_url_host(url)) not valid;
  end if;
end $$;

-- walhook:step endpoints: validate the host check where existing rows allow it
do $$
begin
  alter table walhook.endpoints validate constraint endpoints_url_host_ascii;
exception when check_violation then
  raise warning 'walhook: some endpoints have a host that is not ASCII; their deliveries are recorded dead until the url is fixed; then run: ALTER TABLE walhook.endpoints VALIDATE CONSTRAINT endpoints_url_host_ascii';
end $$;

-- walhook:step health shared by instances: breaker changes, attempt counts
-- The breaker as the newest change by any instance left it (instances adopt a change newer than their own).
alter table walhook.endpoint_state
  add column if not exists open_until timestamptz,
  add column if not exists breaker_changed_at timestamptz;

-- Attempts per endpoint and 10-minute bucket, added to by every instance: the success rate of the last hour
-- counts what all instances saw, and a restart forgets nothing.
create table if not exists walhook.endpoint_stats (
  endpoint_id bigint not null,
  bucket timestamptz not null,
  successes bigint not null default 0,
  failures bigint not null default 0,
  primary key (endpoint_id, bucket)
);

-- the same columns as before (so grants and users' queries keep working), counted from endpoint_stats, and
-- two more at the end
create or replace view walhook.endpoint_health as
select e.id as endpoint_id, walhook.display_url(e.url) as url, e.enabled, e.disabled_reason,
       coalesce(s.breaker, 'closed') as breaker,
       coalesce(s.consecutive_failures, 0) as consecutive_failures,
       s.failing_since, s.last_success_at, s.last_failure_at, s.last_status_code, s.last_error,
       coalesce(h.successes, 0)::bigint as successes_1h, coalesce(h.failures, 0)::bigint as failures_1h,
       case when coalesce(h.successes, 0) + coalesce(h.failures, 0) = 0 then null
            else round(h.successes / (h.successes + h.failures), 4) end as success_rate_1h,
       s.updated_at,
       e.paused,
       s.open_until
  from walhook.endpoints e
  left join walhook.endpoint_state s on s.endpoint_id = e.id
  left join lateral (
        select sum(t.successes) as successes, sum(t.failures) as failures
          from walhook.endpoint_stats t
         where t.endpoint_id = e.id and t.bucket > now() - interval '1 hour') h on true;

alter table walhook.endpoint_state drop column if exists successes_1h, drop column if exists failures_1h;

-- walhook:step slots: the commit time the slot has confirmed
-- Retention never deletes an outbox row the slot may not have streamed yet (`walhook recover-slot` would need
-- it): rows committed after this, less a margin, are kept.
alter table walhook.slots add column if not exists confirmed_at timestamptz;

-- walhook:step recover(): what a disabled endpoint missed
-- Re-creates, as pending deliveries due now, every event of the outbox created in [since, until) that matches
-- the endpoint and has no delivery for it yet: what it missed while disabled (or while the daemon could not
-- use its row). Idempotent; the deliveries keep the event's webhook-id and carry their own copy of it, so
-- they do not depend on the outbox row any more. Outbox rows already removed by retention
-- (`retention.outbox`) cannot be recovered.
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
     ordering_key)
  select o.id, e.id, o.uid, 'pending', now(), o.event_type, o.payload, o.created_at,
         case when e.ordered then o.ordering_key end
    from walhook.outbox o
   where o.created_at >= since and o.created_at < until
     and walhook.matches(o.event_type, e.event_types)
  on conflict on constraint deliveries_event_endpoint_unique do nothing;
  get diagnostics n = row_count;
  return n;
end $$;
