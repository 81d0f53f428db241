-- The event catalog, schema versions and delivery formats.
--
-- walhook.event_types documents the events an application publishes (name, description, deprecation) and
-- walhook.event_type_versions holds one JSON Schema and example payload per version. The catalog is opt-in:
-- a type it does not list is delivered exactly as before.
--
-- Validation runs in the daemon, before any request: stock PostgreSQL has no JSON Schema validator (the
-- pg_jsonschema extension is not packaged for the PostgreSQL most users run), and a validator written in
-- PL/pgSQL would be a second, partial implementation of the standard. An event whose payload breaks its
-- version's schema is recorded `dead` for every endpoint it matched, with the failing path and rule, and is
-- never sent.
--
-- Versions: an event is published once, in one version (outbox.event_version, or the type's current_version
-- when the row leaves it NULL). An endpoint pins the versions it understands (endpoints.event_versions, e.g.
-- '{"order.created": 1}'); an event newer than the pin is rendered down one step at a time by the SQL
-- functions the catalog names (event_type_versions.downgrade: version N's payload as N - 1's). We chose
-- transforms over publishing every version in one transaction because the catalog then guarantees that every
-- pinned endpoint can be served (version N > 1 cannot be added without its downgrade, nor a version removed
-- while a later one needs it), instead of relying on every publisher to write every version a subscriber may
-- still pin; and because a pinned endpoint is rare, the daemon renders in SQL only for those deliveries.
-- The delivered body names its version.
--
-- Formats: endpoints.format chooses the body: 'standard' (the Standard Webhooks envelope, as before),
-- 'cloudevents' (CloudEvents 1.0 structured JSON) or 'cloudevents-binary' (CloudEvents binary mode: ce-*
-- headers, the payload as the body). Every format is signed with the Standard Webhooks headers.
--
-- Only catalog changes lock the outbox and deliveries: nullable columns without defaults, checks added NOT
-- VALID (every existing row is NULL).

-- walhook:step catalog: event types and their versions
create table if not exists walhook.event_types (
  name text primary key,
  description text not null default '',
  -- the version of rows that leave outbox.event_version NULL (NULL: the newest version listed)
  current_version integer,
  deprecated boolean not null default false,
  -- what to use instead, shown with the deprecation
  deprecation_note text not null default '',
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint event_types_name_valid check (walhook.check_event_type(name)),
  constraint event_types_name_not_reserved check (name !~ '^walhook\.'),
  constraint event_types_current_version_valid check (current_version >= 1)
);

create or replace function walhook.check_downgrade(fn regprocedure) returns boolean
language plpgsql stable
set search_path = pg_catalog, walhook, pg_temp
as $$
begin
  if fn is null then
    return true;
  end if;
  if not exists (select 1 from pg_catalog.pg_proc p
                  where p.oid = fn and p.prorettype = 'jsonb'::regtype
                    and p.proargtypes = '3802'::oidvector and p.prokind = 'f') then
    raise exception 'invalid downgrade %: it must be a function taking one jsonb (this version''s payload) and returning jsonb (the previous version''s)', fn
      using errcode = 'check_violation',
            hint = 'CREATE FUNCTION app.order_created_v2_to_v1(p jsonb) RETURNS jsonb LANGUAGE sql IMMUTABLE AS $f$ SELECT p - ''currency'' $f$';
  end if;
  return true;
end $$;

create table if not exists walhook.event_type_versions (
  event_type text not null references walhook.event_types (name) on update cascade on delete cascade,
  version integer not null,
  -- a JSON Schema (draft 2020-12 unless "$schema" says otherwise) that every payload of this version matches
  schema jsonb not null default '{}',
  -- a payload of this version: documentation, and what walhook.send_test(endpoint, type) sends
  example jsonb,
  -- turns this version's payload into the previous version's; required from version 2 on
  downgrade regprocedure,
  description text not null default '',
  deprecated boolean not null default false,
  created_at timestamptz not null default now(),
  -- the version this one renders into: versions are contiguous, and none is removed while a later one needs it
  previous_version integer generated always as (nullif(version - 1, 0)) stored,
  primary key (event_type, version),
  constraint event_type_versions_version_valid check (version >= 1),
  constraint event_type_versions_schema_valid check (jsonb_typeof(schema) in ('object', 'boolean')),
  constraint event_type_versions_downgrade_needed check (version = 1 or downgrade is not null),
  constraint event_type_versions_downgrade_valid check (walhook.check_downgrade(downgrade)),
  constraint event_type_versions_previous foreign key (event_type, previous_version)
    references walhook.event_type_versions (event_type, version)
);

-- the current version must be one the catalog holds
do $$
begin
  if not exists (select 1 from pg_constraint where conname = 'event_types_current_version_exists') then
    alter table walhook.event_types add constraint event_types_current_version_exists
      foreign key (name, current_version) references walhook.event_type_versions (event_type, version)
      deferrable initially deferred;
  end if;
end $$;

-- the daemons reload the catalog with the endpoints: a change bumps the generation they poll
create or replace trigger event_types_bump after insert or update or delete or truncate on walhook.event_types
  for each statement execute function walhook.endpoints_bump();
create or replace trigger event_type_versions_bump after insert or update or delete or truncate
  on walhook.event_type_versions for each statement execute function walhook.endpoints_bump();
create or replace trigger event_types_touch before update on walhook.event_types
  for each row execute function walhook.endpoints_touch();

-- walhook:step functions: rendering a payload in an older version, pins
-- The payload of `from_version` as `to_version`'s, through each step's downgrade in turn. Unchanged when
-- to_version is NULL or not older. Runs with the caller's rights (the daemon's, or recover()'s caller's).
create or replace function walhook.render_payload(event_type text, from_version integer, to_version integer,
                                                  payload jsonb) returns jsonb
language plpgsql volatile
set search_path = pg_catalog, walhook, pg_temp
as $$
declare
  v integer := from_version;
  step regprocedure;
  rendered jsonb := payload;
begin
  if from_version is null or to_version is null or to_version >= from_version then
    return payload;
  end if;
  while v > to_version loop
    select x.downgrade into step from walhook.event_type_versions x
     where x.event_type = render_payload.event_type and x.version = v;
    if step is null then
      raise exception 'no downgrade of % from version % to %', render_payload.event_type, v, v - 1
        using errcode = 'no_data_found',
              hint = 'walhook.event_type_versions needs a row for each version with its downgrade function';
    end if;
    execute format('select %s($1)', step::oid::regproc) using rendered into rendered;
    v := v - 1;
  end loop;
  return rendered;
end $$;

-- endpoints.event_versions: an object of exact event types and the version each is pinned to, every one in
-- the catalog
create or replace function walhook.check_event_versions(pins jsonb) returns boolean
language plpgsql stable
set search_path = pg_catalog, walhook, pg_temp
as $$
declare
  k text;
  v jsonb;
  held text;
begin
  if pins is null or jsonb_typeof(pins) <> 'object' then
    raise exception 'invalid event_versions %: use an object of event types and versions, like ''{"order.created": 2}''',
      coalesce(pins::text, 'NULL') using errcode = 'check_violation';
  end if;
  for k, v in select * from jsonb_each(pins) loop
    perform walhook.check_event_type(k);
    if jsonb_typeof(v) <> 'number' or v::text !~ '^[1-9][0-9]{0,8}$' then
      raise exception 'invalid event_versions: % is pinned to %, a version is a positive integer like 2', k, v
        using errcode = 'check_violation';
    end if;
    if not exists (select 1 from walhook.event_type_versions x where x.event_type = k and x.version = v::text::integer) then
      select string_agg(x.version::text, ', ' order by x.version) into held
        from walhook.event_type_versions x where x.event_type = k;
      raise exception 'invalid event_versions: % version % is not in the catalog (walhook.event_type_versions)', k, v
        using errcode = 'check_violation',
              hint = case when held is null then 'add the type and its versions to walhook.event_types and walhook.event_type_versions first, or remove the pin'
                          else format('%s has versions %s', k, held) end;
    end if;
  end loop;
  return true;
end $$;

-- walhook:step outbox: the event's version (catalog only)
alter table walhook.outbox add column if not exists event_version integer;
do $$
begin
  if not exists (select 1 from pg_constraint where conname = 'outbox_event_version_valid') then
    alter table walhook.outbox add constraint outbox_event_version_valid check (event_version >= 1) not valid;
  end if;
end $$;

-- walhook:step deliveries: the version of the delivery's copy (catalog only)
alter table walhook.deliveries add column if not exists event_version integer;

-- walhook:step endpoints: pinned versions and the delivery format (endpoints is small)
alter table walhook.endpoints add column if not exists event_versions jsonb not null default '{}';
alter table walhook.endpoints add column if not exists format text not null default 'standard';
do $$
begin
  if not exists (select 1 from pg_constraint where conname = 'endpoints_event_versions_valid') then
    alter table walhook.endpoints add constraint endpoints_event_versions_valid
      check (walhook.check_event_versions(event_versions));
  end if;
  if not exists (select 1 from pg_constraint where conname = 'endpoints_format_valid') then
    alter table walhook.endpoints add constraint endpoints_format_valid
      check (format in ('standard', 'cloudevents', 'cloudevents-binary'));
  end if;
end $$;

-- walhook:step functions: recover() keeps each event's version with its copy (dispatch renders it for a pin)
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
     ordering_key, traceparent, tenant, event_version)
  select o.id, e.id, o.uid, 'pending', now(), o.event_type, o.payload, o.created_at,
         case when e.ordered then o.ordering_key end, o.traceparent, o.tenant, o.event_version
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

-- walhook:step functions: send_test(endpoint, event_type) sends the catalog's example
create or replace function walhook.send_test(endpoint_id bigint, event_type text) returns bigint
language plpgsql volatile security definer
set search_path = pg_catalog, walhook, pg_temp
as $$
declare
  e record;
  was text := coalesce(current_setting('walhook.publishing_operational', true), '');
  ex record;
  event record;
  delivery bigint;
begin
  select x.id, x.tenant, x.enabled, x.all_tenants, x.event_versions into e
    from walhook.endpoints x where x.id = send_test.endpoint_id;
  if not found or not (walhook.caller_is_admin()
                       or (e.tenant = walhook.current_tenant() and not e.all_tenants) is true) then
    raise exception 'no endpoint %', send_test.endpoint_id
      using errcode = 'no_data_found', hint = 'SELECT id, url FROM walhook.endpoints lists the ones you may test';
  end if;
  if not e.enabled then
    raise exception 'endpoint % is disabled: enable it first (UPDATE walhook.endpoints SET enabled = true)', e.id
      using errcode = 'object_not_in_prerequisite_state';
  end if;
  -- the endpoint's pinned version, else the type's current one, else its newest
  select x.version, x.example into ex
    from walhook.event_types t join walhook.event_type_versions x on x.event_type = t.name
   where t.name = send_test.event_type
     and x.version = coalesce((e.event_versions ->> t.name)::integer, t.current_version,
                              (select max(y.version) from walhook.event_type_versions y where y.event_type = t.name));
  if not found then
    raise exception 'event type % is not in the catalog', send_test.event_type
      using errcode = 'no_data_found',
            hint = 'SELECT name FROM walhook.event_types lists the types with examples; walhook.send_test(endpoint_id) sends a walhook.test event';
  end if;
  if ex.example is null then
    raise exception '% version % has no example to send', send_test.event_type, ex.version
      using errcode = 'no_data_found',
            hint = 'UPDATE walhook.event_type_versions SET example = ''{…}'' WHERE event_type = … AND version = …';
  end if;
  -- the outbox row is a walhook.test (never fanned out); the delivery carries the example as its type
  perform set_config('walhook.publishing_operational', 'on', true);
  insert into walhook.outbox (event_type, tenant, payload)
  values ('walhook.test', e.tenant, ex.example)
  returning id, created_at into event;
  perform set_config('walhook.publishing_operational', was, true);
  insert into walhook.deliveries (event_id, endpoint_id, webhook_id, status, next_attempt_at, event_type,
                                  payload, event_created_at, tenant, event_version)
  values (event.id, e.id, gen_random_uuid(), 'pending', now(), send_test.event_type, ex.example,
          event.created_at, e.tenant, ex.version)
  returning id into delivery;
  return delivery;
end $$;

-- walhook:step functions: walhook.delivery.dead names the webhook-id as its requests carried it (msg_…)
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
    'webhook_id', 'msg_' || replace(new.webhook_id::text, '-', ''),
    'event_type', type_,
    'event_tenant', new.tenant,
    'attempts', new.attempts,
    'last_status_code', new.last_status_code,
    'last_error', walhook.operational_text(new.last_error, 1024),
    'last_attempt_at', new.last_attempt_at,
    'dead_at', now()));
  return null;
end $$;

-- walhook:step endpoints: the registration handshake (endpoints is small)
-- An endpoint inserted with verification = 'pending' (or put through walhook.verify_endpoint) stays disabled
-- until it answers a signed walhook.endpoint.verification request with 2xx: proof that the URL is up and that
-- its receiver holds the secret. Until then it receives nothing else; the daemon loads it only to send the
-- verification. Once that delivery succeeds, a trigger enables the endpoint; if it ends dead, the endpoint's
-- disabled_reason says why and how to try again.
alter table walhook.endpoints add column if not exists verification text;
alter table walhook.endpoints add column if not exists verified_at timestamptz;
do $$
begin
  if not exists (select 1 from pg_constraint where conname = 'endpoints_verification_valid') then
    alter table walhook.endpoints add constraint endpoints_verification_valid
      check (verification in ('pending', 'verified'));
  end if;
end $$;

-- walhook:step functions: verify_endpoint() and the handshake's triggers
create or replace function walhook.verify_endpoint(endpoint_id bigint) returns bigint
language plpgsql volatile security definer
set search_path = pg_catalog, walhook, pg_temp
as $$
declare
  e record;
  was text := coalesce(current_setting('walhook.publishing_operational', true), '');
  body jsonb;
  event record;
  delivery bigint;
begin
  select x.id, x.tenant, x.all_tenants, x.url into e from walhook.endpoints x where x.id = verify_endpoint.endpoint_id;
  if not found or not (walhook.caller_is_admin()
                       or (e.tenant = walhook.current_tenant() and not e.all_tenants) is true) then
    raise exception 'no endpoint %', verify_endpoint.endpoint_id
      using errcode = 'no_data_found', hint = 'SELECT id, url FROM walhook.endpoints lists the ones you may verify';
  end if;
  update walhook.endpoints x
     set verification = 'pending', verified_at = null, enabled = false,
         disabled_reason = 'awaiting verification: walhook sent a signed walhook.endpoint.verification request; '
                           || 'the endpoint is enabled once it answers 2xx'
   where x.id = e.id;
  body := jsonb_build_object(
    'endpoint_id', e.id,
    'url', walhook.operational_text(walhook.display_url(e.url), 512),
    'message', 'walhook verifies this endpoint: verify the signature and answer 2xx to start receiving events');
  perform set_config('walhook.publishing_operational', 'on', true);
  insert into walhook.outbox (event_type, tenant, payload)
  values ('walhook.endpoint.verification', e.tenant, body)
  returning id, created_at into event;
  perform set_config('walhook.publishing_operational', was, true);
  insert into walhook.deliveries (event_id, endpoint_id, webhook_id, status, next_attempt_at, event_type,
                                  payload, event_created_at, tenant)
  values (event.id, e.id, gen_random_uuid(), 'pending', now(), 'walhook.endpoint.verification', body,
          event.created_at, e.tenant)
  returning id into delivery;
  return delivery;
end $$;

-- An endpoint inserted with verification = 'pending' starts disabled (it was never live: no
-- walhook.endpoint.disabled event) and is sent its verification request.
create or replace function walhook.endpoint_verification_requested() returns trigger
language plpgsql security definer
set search_path = pg_catalog, walhook, pg_temp
as $$
begin
  if tg_when = 'BEFORE' then
    new.enabled := false;
    return new;
  end if;
  perform walhook.verify_endpoint(new.id);
  return null;
end $$;

-- The verification's outcome: 2xx enables the endpoint; a dead verification says why it stays disabled.
create or replace function walhook.endpoint_verification_finished() returns trigger
language plpgsql security definer
set search_path = pg_catalog, walhook, pg_temp
as $$
begin
  if new.status = 'succeeded' then
    update walhook.endpoints e
       set enabled = true, verification = 'verified', verified_at = now(), disabled_reason = null
     where e.id = new.endpoint_id and e.verification = 'pending';
  else
    update walhook.endpoints e
       set disabled_reason = 'verification failed: ' || coalesce(walhook.operational_text(new.last_error, 512), 'no answer')
                             || format('; fix the receiver, then SELECT walhook.verify_endpoint(%s)', e.id)
     where e.id = new.endpoint_id and e.verification = 'pending';
  end if;
  return null;
end $$;

create or replace trigger endpoints_verification_pending before insert on walhook.endpoints
  for each row when (new.verification = 'pending') execute function walhook.endpoint_verification_requested();
create or replace trigger endpoints_verification_requested after insert on walhook.endpoints
  for each row when (new.verification = 'pending') execute function walhook.endpoint_verification_requested();
-- the copy's type is the verification's until the delivery succeeds (a succeeded delivery drops its copy)
create or replace trigger deliveries_verification_finished after update of status on walhook.deliveries
  for each row when (old.event_type = 'walhook.endpoint.verification' and old.status = 'pending'
                     and new.status in ('succeeded', 'dead'))
  execute function walhook.endpoint_verification_finished();

-- walhook:step functions: a verification, like a test, goes only to the endpoint it is for
create or replace function walhook.matches(event_type text, patterns text[]) returns boolean
language sql immutable
set search_path = pg_catalog, walhook, pg_temp
as $$
  select event_type not in ('walhook.test', 'walhook.endpoint.verification') and exists (
    select 1 from unnest(patterns) p
     where (p = '*' and left(event_type, 8) <> 'walhook.')
        or p = event_type
        or (right(p, 2) = '.*' and length(event_type) > length(p) - 1
            and left(event_type, length(p) - 1) = left(p, length(p) - 1))
  )
$$;
