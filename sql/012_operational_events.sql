-- Operational events: walhook tells the application what happened through its own pipeline. When an
-- endpoint is disabled, when its circuit breaker opens or closes, when a delivery goes dead and when a
-- recovery finishes, a row is inserted into walhook.outbox with a type under the reserved prefix `walhook.`,
-- the tenant of the endpoint it is about, and a documented payload; endpoints subscribe to it like to any
-- other event. Each is written by a trigger in the transaction that made the change, so it exists if and only
-- if the change committed, and never blocks anything else: the change's transaction inserts one small row.
--
-- The pattern '*' does not match the reserved prefix: a receiver written for the application's events gets
-- walhook's only when its patterns name them ('walhook.*' or an exact type). Applications cannot insert
-- reserved types. There is no loop: a delivery of an operational event that goes dead publishes nothing, and
-- the other events follow state changes (an endpoint disabled once, a breaker that opens once per cool-down).
--
-- The trigger functions run as the schema's owner (SECURITY DEFINER): whoever disables an endpoint, the
-- daemon, an operator or a tenant's session, publishes the event without any right on the outbox. They are
-- not callable as functions, so no one can publish an operational event of their choosing; a recovery is
-- published from the walhook.recoveries row that recover() writes with its caller's rights (a tenant's session
-- may write rows for its own tenant only, see sql/grants.sql).

-- walhook:step functions: '*' leaves out the reserved prefix; publishing an operational event
-- The event-type pattern semantics of the daemon's fan-out (src/fanout.rs), for SQL that fans out and users'
-- own queries: '*' (every type but walhook's own, under 'walhook.'), an exact type, or a prefix ending '.*'.
create or replace function walhook.matches(event_type text, patterns text[]) returns boolean
language sql immutable
set search_path = pg_catalog, walhook, pg_temp
as $$
  select exists (
    select 1 from unnest(patterns) p
     where (p = '*' and left(event_type, 8) <> 'walhook.')
        or p = event_type
        or (right(p, 2) = '.*' and length(event_type) > length(p) - 1
            and left(event_type, length(p) - 1) = left(p, length(p) - 1))
  )
$$;

-- Inserts one operational event. The setting lets the outbox's guard admit the reserved type, for this insert
-- only. (Not a SET clause of the function: only a superuser may create one for a custom setting.)
create or replace function walhook.publish_operational(event_type text, tenant text, payload jsonb) returns void
language plpgsql
set search_path = pg_catalog, walhook, pg_temp
as $$
declare
  was text := coalesce(current_setting('walhook.publishing_operational', true), '');
begin
  perform set_config('walhook.publishing_operational', 'on', true);
  insert into walhook.outbox (event_type, tenant, payload)
  values (publish_operational.event_type, publish_operational.tenant, publish_operational.payload);
  perform set_config('walhook.publishing_operational', was, true);
end $$;

-- The outbox's guard: a reserved type is walhook's to publish.
create or replace function walhook.outbox_refuse_reserved() returns trigger
language plpgsql
set search_path = pg_catalog, walhook, pg_temp
as $$
begin
  if current_setting('walhook.publishing_operational', true) is distinct from 'on' then
    raise exception 'event_type % is reserved: types starting with ''walhook.'' are walhook''s operational events; use a prefix of your own, like ''order.created''',
      quote_literal(new.event_type)
      using errcode = 'check_violation';
  end if;
  return new;
end $$;

-- An endpoint's URL as events show it (no credentials), and text fields cut to keep each event small.
create or replace function walhook.operational_text(t text, max_chars integer) returns text
language sql immutable
set search_path = pg_catalog, walhook, pg_temp
as $$
  select case when length(t) > max_chars then left(t, max_chars - 1) || '…' else t end
$$;

-- walhook.endpoint.disabled: by hand, after a 410 Gone, or after failing longer than delivery.disable_after.
create or replace function walhook.endpoint_disabled_event() returns trigger
language plpgsql security definer
set search_path = pg_catalog, walhook, pg_temp
as $$
begin
  perform walhook.publish_operational('walhook.endpoint.disabled', new.tenant, jsonb_build_object(
    'endpoint_id', new.id,
    'url', walhook.operational_text(walhook.display_url(new.url), 512),
    'description', walhook.operational_text(new.description, 256),
    'tenant', new.tenant,
    'cause', case when new.disabled_reason like 'the endpoint answered 410 Gone%' then 'gone'
                  when new.disabled_reason like 'failing continuously since%' then 'failing'
                  else 'manual' end,
    'reason', walhook.operational_text(new.disabled_reason, 1024),
    'disabled_at', now()));
  return null;
end $$;

-- walhook.endpoint.breaker_opened and walhook.endpoint.breaker_closed, as the daemons' shared state records
-- them (open and half-open are one state to the application: deliveries held back).
create or replace function walhook.breaker_event() returns trigger
language plpgsql security definer
set search_path = pg_catalog, walhook, pg_temp
as $$
declare
  e walhook.endpoints;
begin
  select * into e from walhook.endpoints where id = new.endpoint_id;
  if not found then
    return null;
  end if;
  perform walhook.publish_operational(
    case when new.breaker = 'closed' then 'walhook.endpoint.breaker_closed'
         else 'walhook.endpoint.breaker_opened' end,
    e.tenant,
    jsonb_build_object(
      'endpoint_id', e.id,
      'url', walhook.operational_text(walhook.display_url(e.url), 512),
      'tenant', e.tenant,
      'open_until', case when new.breaker = 'closed' then null else new.open_until end,
      'consecutive_failures', new.consecutive_failures,
      'last_status_code', new.last_status_code,
      'last_error', walhook.operational_text(new.last_error, 1024),
      'changed_at', coalesce(new.breaker_changed_at, now())));
  return null;
end $$;

-- walhook.delivery.dead: the retry schedule ran out, 410 Gone, or a row the daemon could not use. Not for
-- deliveries of operational events (no loop).
create or replace function walhook.delivery_dead_event() returns trigger
language plpgsql security definer
set search_path = pg_catalog, walhook, pg_temp
as $$
declare
  e walhook.endpoints;
  type_ text := new.event_type;
begin
  if type_ is null then
    select o.event_type into type_ from walhook.outbox o where o.id = new.event_id;
  end if;
  if type_ is null or left(type_, 8) = 'walhook.' then
    return null;
  end if;
  select * into e from walhook.endpoints where id = new.endpoint_id;
  perform walhook.publish_operational('walhook.delivery.dead', e.tenant, jsonb_build_object(
    'delivery_id', new.id,
    'endpoint_id', new.endpoint_id,
    'url', walhook.operational_text(walhook.display_url(e.url), 512),
    'tenant', e.tenant,
    'event_id', new.event_id,
    'webhook_id', new.webhook_id,
    'event_type', type_,
    'event_tenant', new.tenant,
    'attempts', new.attempts,
    'last_status_code', new.last_status_code,
    'last_error', walhook.operational_text(new.last_error, 1024),
    'last_attempt_at', new.last_attempt_at,
    'dead_at', now()));
  return null;
end $$;

-- walhook.recovery.finished: a row of walhook.recoveries, written by recover() and by the daemon's recovery
-- after a lost slot (recover-slot, failover).
create or replace function walhook.recovery_event() returns trigger
language plpgsql security definer
set search_path = pg_catalog, walhook, pg_temp
as $$
begin
  perform walhook.publish_operational('walhook.recovery.finished', new.tenant, jsonb_build_object(
    'recovery_id', new.id,
    'kind', new.kind,
    'endpoint_id', new.endpoint_id,
    'tenant', new.tenant,
    'event_type', new.event_type,
    'since', new.since,
    'until', new.until,
    'deliveries', new.deliveries,
    'recovered_by', new.recovered_by,
    'finished_at', new.finished_at));
  return null;
end $$;

-- walhook:step recoveries: what was recovered, when and by whom (one row per recovery)
create table if not exists walhook.recoveries (
  id bigint generated always as identity primary key,
  -- 'recover': walhook.recover(); 'slot': the daemon re-created a lost slot (recover-slot, failover) and
  -- queued what the old one had not confirmed
  kind text not null,
  endpoint_id bigint,
  tenant text,
  event_type text,
  since timestamptz,
  until timestamptz,
  -- deliveries created
  deliveries bigint not null,
  recovered_by text not null default current_user,
  finished_at timestamptz not null default now(),
  constraint recoveries_kind_valid check (kind in ('recover', 'slot'))
);
create index if not exists recoveries_tenant on walhook.recoveries (tenant, finished_at);
do $$
begin
  if not exists (select from pg_policy where polname = 'by_grants' and polrelid = 'walhook.recoveries'::regclass) then
    create policy by_grants on walhook.recoveries as permissive for all to public using (true) with check (true);
  end if;
end $$;
alter table walhook.recoveries enable row level security;
create or replace trigger recoveries_event after insert on walhook.recoveries
  for each row execute function walhook.recovery_event();

-- walhook:step recover(): each recovery is recorded (and published)
create or replace function walhook.recover(endpoint_id bigint default null, since timestamptz default null,
                                           until timestamptz default now(), tenant text default null,
                                           event_type text default null) returns bigint
language plpgsql
set search_path = pg_catalog, walhook, pg_temp
as $$
declare
  n bigint;
begin
  if recover.since is null then
    raise exception 'since is null: pass the time from which to recover, e.g. since => now() - interval ''1 day'''
      using errcode = 'invalid_parameter_value';
  end if;
  if recover.endpoint_id is null and recover.tenant is null then
    raise exception 'nothing to recover for: pass endpoint_id (one endpoint) or tenant => ''…'' (every enabled endpoint of a tenant)'
      using errcode = 'invalid_parameter_value';
  end if;
  if recover.event_type is not null
     and recover.event_type !~ '^(\*|([A-Za-z0-9_]+\.)*([A-Za-z0-9_]+|\*))$' then
    raise exception 'invalid event_type pattern %: use ''*'', an exact type like ''order.created'', or a prefix like ''order.*''',
      quote_literal(recover.event_type)
      using errcode = 'invalid_parameter_value';
  end if;
  if recover.endpoint_id is not null
     and not exists (select 1 from walhook.endpoints e where e.id = recover.endpoint_id) then
    raise exception 'no endpoint with id %', recover.endpoint_id using errcode = 'no_data_found';
  end if;
  insert into walhook.deliveries as d
    (event_id, endpoint_id, webhook_id, status, next_attempt_at, event_type, payload, event_created_at,
     ordering_key, traceparent, tenant)
  select o.id, e.id, o.uid, 'pending', now(), o.event_type, o.payload, o.created_at,
         case when e.ordered then o.ordering_key end, o.traceparent, o.tenant
    from walhook.endpoints e
    join walhook.outbox o
      on o.created_at >= recover.since and o.created_at < recover.until
     and walhook.endpoint_accepts(o.event_type, o.tenant, o.payload, e.event_types, e.tenant, e.all_tenants,
                                  e.filter)
   where (case when recover.endpoint_id is not null then e.id = recover.endpoint_id
               else e.tenant = recover.tenant and e.enabled and e.created_at <= o.created_at end)
     and (recover.tenant is null or o.tenant = recover.tenant)
     and (recover.event_type is null or walhook.matches(o.event_type, array[recover.event_type]))
  on conflict on constraint deliveries_event_endpoint_unique do nothing;
  get diagnostics n = row_count;
  -- the recovery is the endpoint's tenant's (a firehose's: the tenant asked for, or the operator's)
  insert into walhook.recoveries (kind, endpoint_id, tenant, event_type, since, until, deliveries)
  values ('recover', recover.endpoint_id,
          coalesce((select e.tenant from walhook.endpoints e where e.id = recover.endpoint_id), recover.tenant),
          recover.event_type, recover.since, recover.until, n);
  return n;
end $$;

-- walhook:step endpoints and their state: the disabled and breaker events (small tables)
create or replace trigger endpoints_disabled_event after update of enabled on walhook.endpoints
  for each row when (old.enabled and not new.enabled) execute function walhook.endpoint_disabled_event();
create or replace trigger endpoint_state_opened_event after insert on walhook.endpoint_state
  for each row when (new.breaker <> 'closed') execute function walhook.breaker_event();
create or replace trigger endpoint_state_changed_event after update of breaker on walhook.endpoint_state
  for each row when ((old.breaker = 'closed' and new.breaker <> 'closed')
                     or (old.breaker <> 'closed' and new.breaker = 'closed'))
  execute function walhook.breaker_event();

-- walhook:step outbox: reserved types are refused, operational events pass the payload limit (short locks)
create or replace trigger outbox_reserved_types before insert on walhook.outbox
  for each row when (left(new.event_type, 8) = 'walhook.') execute function walhook.outbox_refuse_reserved();
create or replace trigger outbox_payload_limit before insert on walhook.outbox
  for each row when (left(new.event_type, 8) <> 'walhook.') execute function walhook.outbox_payload_limit();

-- walhook:step deliveries: the dead event (a short lock)
create or replace trigger deliveries_dead_inserted_event after insert on walhook.deliveries
  for each row when (new.status = 'dead' and left(coalesce(new.event_type, ''), 8) <> 'walhook.')
  execute function walhook.delivery_dead_event();
create or replace trigger deliveries_dead_event after update of status on walhook.deliveries
  for each row when (new.status = 'dead' and old.status <> 'dead'
                     and left(coalesce(new.event_type, ''), 8) <> 'walhook.')
  execute function walhook.delivery_dead_event();
