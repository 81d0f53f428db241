-- Trust: pausing without losing events, recovering what a disabled endpoint missed, endpoint health shared
-- by every instance and kept across restarts, and the slot's progress for retention.

-- A paused endpoint keeps receiving deliveries, held as pending until it is resumed; a disabled one
-- (enabled = false) receives none, and walhook.recover() re-creates what it missed.
alter table walhook.endpoints
  add column if not exists paused boolean not null default false,
  -- when it was last re-enabled or resumed: `delivery.disable_after` counts failures from then at the earliest
  add column if not exists resumed_at timestamptz;

create or replace function walhook.endpoints_touch() returns trigger
language plpgsql set search_path = pg_catalog, walhook as $$
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

-- The breaker as the newest change by any instance left it (instances adopt a change newer than their own),
-- and the failing streak that `delivery.disable_after` measures: both survive restarts.
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

drop view if exists walhook.endpoint_health;
alter table walhook.endpoint_state drop column if exists successes_1h, drop column if exists failures_1h;
create view walhook.endpoint_health as
select e.id as endpoint_id, e.url, e.enabled, e.paused, e.disabled_reason,
       coalesce(s.breaker, 'closed') as breaker,
       s.open_until,
       coalesce(s.consecutive_failures, 0) as consecutive_failures,
       s.failing_since, s.last_success_at, s.last_failure_at, s.last_status_code, s.last_error,
       coalesce(h.successes, 0) as successes_1h, coalesce(h.failures, 0) as failures_1h,
       case when coalesce(h.successes, 0) + coalesce(h.failures, 0) = 0 then null
            else round(h.successes::numeric / (h.successes + h.failures), 4) end as success_rate_1h,
       s.updated_at
  from walhook.endpoints e
  left join walhook.endpoint_state s on s.endpoint_id = e.id
  left join lateral (
        select sum(t.successes) as successes, sum(t.failures) as failures
          from walhook.endpoint_stats t
         where t.endpoint_id = e.id and t.bucket > now() - interval '1 hour') h on true;

-- The commit time of the newest transaction the slot has confirmed: retention never deletes an outbox row
-- the slot may not have streamed yet (`walhook recover-slot` would need it).
alter table walhook.slots add column if not exists confirmed_at timestamptz;

-- Re-creates, as pending deliveries due now, every event of the outbox committed in [since, until) that
-- matches the endpoint and has no delivery for it yet: what it missed while disabled (or while the daemon
-- could not use its row). Idempotent; the deliveries keep the event's webhook-id and carry their own copy
-- of it, so they do not depend on the outbox row any more. Outbox rows already removed by retention
-- (`retention.outbox`) cannot be recovered.
create or replace function walhook.recover(endpoint_id bigint, since timestamptz,
                                           until timestamptz default now()) returns bigint
language plpgsql set search_path = pg_catalog, walhook as $$
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

-- Privileges on what this migration created or re-created.
do $$
begin
  if exists (select 1 from pg_roles where rolname = 'walhook_reader') then
    grant select on walhook.endpoint_health, walhook.endpoint_stats to walhook_reader;
  end if;
  if exists (select 1 from pg_roles where rolname = 'walhook_daemon') then
    grant select, insert, update, delete on walhook.endpoint_stats to walhook_daemon;
    grant select on walhook.endpoint_health to walhook_daemon;
    grant execute on function walhook.recover(bigint, timestamptz, timestamptz) to walhook_daemon;
  end if;
  if exists (select 1 from pg_roles where rolname = 'walhook_admin') then
    grant insert on walhook.deliveries to walhook_admin;
    grant update (paused) on walhook.endpoints to walhook_admin;
    grant execute on function walhook.recover(bigint, timestamptz, timestamptz) to walhook_admin;
  end if;
end $$;
revoke execute on function walhook.recover(bigint, timestamptz, timestamptz) from public;
