-- Tenants: events and endpoints scoped to a tenant (a key the application already has, such as a customer
-- id), an optional payload filter per endpoint, per-tenant limits, and row-level security so that a session
-- of the group role walhook_tenant, after `SET LOCAL walhook.tenant = 'acme'`, sees and changes only acme's
-- rows.
--
-- The rule of who receives what is one SQL function, walhook.endpoint_accepts (the daemon's fan-out applies
-- the same rule in Rust): the event type matches the endpoint's patterns, the endpoint's tenant is the event's
-- (NULL matches NULL, so a single-tenant install sees no change) or the endpoint was created to receive every
-- tenant's events (all_tenants, the operator's firehose), and the payload contains the endpoint's filter.
--
-- Row-level security is enabled on every table a tenant may touch, with one permissive policy that admits
-- every row to every role: the tables' grants alone decide, as before, for walhook's roles and for log-in
-- roles given rights by hand. sql/grants.sql adds restrictive policies for walhook_tenant, which exists only
-- where the migrating role may create it. Each table's policy and its switch are one transaction: a table with
-- row-level security on and no policy would hide every row from every role but its owner.
--
-- On the outbox and deliveries, only catalog changes take their locks: nullable columns without defaults, a
-- check added NOT VALID and validated under a lock that inserts pass, indexes built concurrently.

-- walhook:step functions: tenant and filter checks, the matching rule, the session's tenant
create or replace function walhook.check_tenant(t text) returns boolean
language plpgsql immutable
set search_path = pg_catalog, walhook, pg_temp
as $$
declare
  at integer := regexp_instr(t, '[\x01-\x1f\x7f-\x9f]');
begin
  if t is null then
    return true;
  end if;
  if length(t) < 1 or length(t) > 255 then
    raise exception 'invalid tenant: it is % characters long; use 1 to 255 characters, like ''acme'', or NULL for no tenant (the empty string is refused: SET walhook.tenant = '''' means no tenant)',
      length(t)
      using errcode = 'check_violation';
  end if;
  if at > 0 then
    raise exception 'invalid tenant: it has a control character (code %) at position %; use printable characters only, like ''acme''',
      ascii(substr(t, at, 1)), at
      using errcode = 'check_violation';
  end if;
  return true;
end $$;

-- The firehose receives every tenant's events, so it belongs to none.
create or replace function walhook.check_endpoint_tenancy(tenant text, all_tenants boolean) returns boolean
language plpgsql immutable
set search_path = pg_catalog, walhook, pg_temp
as $$
begin
  if all_tenants and tenant is not null then
    raise exception 'an endpoint with all_tenants = true receives every tenant''s events, so it cannot belong to tenant %: set its tenant to NULL, or all_tenants to false for an endpoint of that tenant only',
      quote_literal(tenant)
      using errcode = 'check_violation', schema = 'walhook', table = 'endpoints', constraint = 'endpoints_tenancy_valid';
  end if;
  return true;
end $$;

-- A filter is a JSON object that the payload must contain (payload @> filter), bounded so that the daemon's
-- fan-out, which applies it to every event, stays cheap.
create or replace function walhook.check_filter(f jsonb) returns boolean
language plpgsql immutable
set search_path = pg_catalog, walhook, pg_temp
as $$
begin
  if f is null then
    return true;
  end if;
  if jsonb_typeof(f) <> 'object' then
    raise exception 'invalid filter: it is a JSON %, it must be an object that payloads contain, like ''{"region": "eu"}'' (an endpoint receives an event only if payload @> filter), or NULL for every payload',
      jsonb_typeof(f)
      using errcode = 'check_violation', schema = 'walhook', table = 'endpoints', constraint = 'endpoints_filter_valid';
  end if;
  if length(f::text) > 8192 then
    raise exception 'invalid filter: it is % characters long as text, over 8192; match on a few fields, like ''{"region": "eu"}''',
      length(f::text)
      using errcode = 'check_violation', schema = 'walhook', table = 'endpoints', constraint = 'endpoints_filter_valid';
  end if;
  return true;
end $$;

-- Whether an endpoint receives an event: the one rule of fan-out, recovery and backfills (src/fanout.rs
-- applies the same; tests/tenants/containment_vectors.json holds cases both sides check).
create or replace function walhook.endpoint_accepts(event_type text, tenant text, payload jsonb,
                                                    event_types text[], endpoint_tenant text,
                                                    all_tenants boolean, filter jsonb) returns boolean
language sql immutable
set search_path = pg_catalog, walhook, pg_temp
as $$
  select walhook.matches(event_type, event_types)
     and (coalesce(all_tenants, false) or endpoint_tenant is not distinct from tenant)
     and (filter is null or coalesce(payload @> filter, false))
$$;

-- The session's tenant: `SET [LOCAL] walhook.tenant = 'acme'`; NULL when unset or empty (after a SET LOCAL's
-- transaction ends the setting reads as ''), so that the tenant's policies then match no row.
create or replace function walhook.current_tenant() returns text
language sql stable parallel safe
set search_path = pg_catalog, walhook, pg_temp
as $$
  select nullif(current_setting('walhook.tenant', true), '')
$$;

-- The generation the daemons poll is bumped by statement triggers in the writer's transaction. As the
-- schema's owner: a tenant's session changes its endpoints without any right on the counter (which it could
-- otherwise set back, hiding another change from the daemons' caches).
alter function walhook.endpoints_bump() security definer;

-- walhook:step tenants: per-tenant limits
create or replace function walhook.check_tenant_limits(max_endpoints integer, rate_limit double precision)
returns boolean
language plpgsql immutable
set search_path = pg_catalog, walhook, pg_temp
as $$
begin
  if max_endpoints < 0 then
    raise exception 'invalid max_endpoints %: use 0 or more endpoints, or NULL for no limit', max_endpoints
      using errcode = 'check_violation', schema = 'walhook', table = 'tenants', constraint = 'tenants_limits_valid';
  end if;
  -- NaN compares above every number, so the upper bound refuses it
  if rate_limit is not null and not (rate_limit >= 0.001 and rate_limit <= 1000000) then
    raise exception 'invalid rate_limit %: use deliveries per second for all of the tenant''s endpoints together, between 0.001 (one every 1000 s) and 1000000, or NULL for no limit',
      rate_limit
      using errcode = 'check_violation', schema = 'walhook', table = 'tenants', constraint = 'tenants_limits_valid';
  end if;
  return true;
end $$;

-- Optional: a tenant without a row has no limits.
create table if not exists walhook.tenants (
  tenant text primary key,
  -- endpoints the tenant may have (checked when one is inserted or moved to it); NULL: no limit
  max_endpoints integer,
  -- deliveries per second to all of the tenant's endpoints together, enforced by the daemon; NULL: no limit
  rate_limit double precision,
  created_at timestamptz not null default now(),
  constraint tenants_tenant_valid check (walhook.check_tenant(tenant)),
  constraint tenants_limits_valid check (walhook.check_tenant_limits(max_endpoints, rate_limit))
);

-- the daemons' endpoint caches read the rate limits: a change reloads them like a change of endpoints
create or replace trigger tenants_bump after insert or update or delete or truncate on walhook.tenants
  for each statement execute function walhook.endpoints_bump();

-- After the row is written, so that row-level security has refused another tenant's row before this looks
-- at that tenant's limit. Updating the tenant's row (to itself) serialises the inserts of one tenant: a second
-- session waits here until the first ends, then counts what it committed (READ COMMITTED), or fails to
-- serialise (REPEATABLE READ, SERIALIZABLE) rather than count without it. As the schema's owner, since a
-- tenant's session may read its limits but not update them.
create or replace function walhook.endpoints_tenant_limit() returns trigger
language plpgsql security definer
set search_path = pg_catalog, walhook, pg_temp
as $$
declare
  most integer;
  n bigint;
begin
  update walhook.tenants t set tenant = t.tenant
   where t.tenant = new.tenant and t.max_endpoints is not null
  returning t.max_endpoints into most;
  if most is null then
    return null;
  end if;
  select count(*) into n from walhook.endpoints e where e.tenant = new.tenant;
  if n > most then
    raise exception 'tenant % may have at most % endpoints (walhook.tenants.max_endpoints), and this would make %',
      quote_literal(new.tenant), most, n
      using errcode = 'check_violation', schema = 'walhook', table = 'endpoints', constraint = 'endpoints_tenant_limit',
            hint = format('delete one of its endpoints first, or raise its limit: UPDATE walhook.tenants SET max_endpoints = %s WHERE tenant = %s',
                          n, quote_literal(new.tenant));
  end if;
  return null;
end $$;

-- walhook:step endpoints: tenant, all_tenants, filter, display_url and the tenant's limit (endpoints is small)
alter table walhook.endpoints
  add column if not exists tenant text,
  add column if not exists all_tenants boolean not null default false,
  add column if not exists filter jsonb;
-- set apart from the column, so that existing rows are NULL whatever the migrating session's setting:
-- an endpoint inserted in a tenant's session belongs to that tenant unless it says otherwise
alter table walhook.endpoints alter column tenant set default walhook.current_tenant();

comment on column walhook.endpoints.tenant is
  'receives the events of this tenant only (NULL: the events of no tenant); defaults to the session''s walhook.tenant';
comment on column walhook.endpoints.all_tenants is
  'the operator''s firehose: receives the events of every tenant (its tenant is NULL)';
comment on column walhook.endpoints.filter is
  'a JSON object: the endpoint receives an event only if payload @> filter (NULL: every payload)';

do $$
begin
  if not exists (select from pg_constraint where conname = 'endpoints_tenant_valid'
                  and conrelid = 'walhook.endpoints'::regclass) then
    -- every existing row is NULL (or false): validating is a scan of a small table
    alter table walhook.endpoints
      add constraint endpoints_tenant_valid check (walhook.check_tenant(tenant)),
      add constraint endpoints_tenancy_valid check (walhook.check_endpoint_tenancy(tenant, all_tenants)),
      add constraint endpoints_filter_valid check (walhook.check_filter(filter));
  end if;
end $$;

-- The URL as walhook.endpoint_health shows it (without credentials, query or fragment), kept in the row: the
-- view reads it with the rights of whoever queries it, and dashboards may read this column but not the URL.
alter table walhook.endpoints
  add column if not exists display_url text generated always as (walhook.display_url(url)) stored;

create or replace trigger endpoints_tenant_limit after insert or update of tenant on walhook.endpoints
  for each row when (new.tenant is not null) execute function walhook.endpoints_tenant_limit();

-- walhook:step outbox: tenant column and its check for new rows (catalog only)
alter table walhook.outbox add column if not exists tenant text;
comment on column walhook.outbox.tenant is
  'the tenant whose endpoints receive this event (NULL: endpoints of no tenant), and the firehoses';
do $$
begin
  if not exists (select from pg_constraint where conname = 'outbox_tenant_valid'
                  and conrelid = 'walhook.outbox'::regclass) then
    alter table walhook.outbox add constraint outbox_tenant_valid check (walhook.check_tenant(tenant)) not valid;
  end if;
end $$;

-- walhook:step outbox: validate the tenant check (a scan under a lock that inserts pass; every row is NULL)
do $$
begin
  if exists (select from pg_constraint where conname = 'outbox_tenant_valid'
              and conrelid = 'walhook.outbox'::regclass and not convalidated) then
    alter table walhook.outbox validate constraint outbox_tenant_valid;
  end if;
end $$;

-- walhook:step deliveries: tenant column (catalog only)
-- The event's tenant, copied by whoever creates the delivery (the daemon, recover(), the backfills): what a
-- tenant's session is allowed to see is decided on this row alone, whatever became of the outbox row.
alter table walhook.deliveries add column if not exists tenant text;

-- walhook:step deliveries: the index of tenants' deliveries (a tenant's session reads through it)
create index concurrently if not exists deliveries_tenant on walhook.deliveries (tenant, id) where tenant is not null;

-- walhook:step endpoints: the index of tenants' endpoints
create index concurrently if not exists endpoints_tenant on walhook.endpoints (tenant) where tenant is not null;

-- walhook:step outbox: row-level security, every row visible to whoever the grants admit (catalog only)
do $$
begin
  if not exists (select from pg_policy where polname = 'by_grants' and polrelid = 'walhook.outbox'::regclass) then
    create policy by_grants on walhook.outbox as permissive for all to public using (true) with check (true);
  end if;
end $$;
alter table walhook.outbox enable row level security;

-- walhook:step deliveries and attempts: row-level security, every row visible to whoever the grants admit
do $$
declare
  t text;
begin
  foreach t in array array['walhook.deliveries', 'walhook.attempts'] loop
    if not exists (select from pg_policy where polname = 'by_grants' and polrelid = t::regclass) then
      execute format('create policy by_grants on %s as permissive for all to public using (true) with check (true)', t);
    end if;
    execute format('alter table %s enable row level security', t);
  end loop;
end $$;

-- walhook:step endpoints and their state: row-level security, every row visible to whoever the grants admit;
-- endpoint_health with the rights of whoever queries it
do $$
declare
  t text;
begin
  foreach t in array array['walhook.endpoints', 'walhook.endpoint_secrets', 'walhook.endpoint_state',
                           'walhook.endpoint_stats', 'walhook.tenants'] loop
    if not exists (select from pg_policy where polname = 'by_grants' and polrelid = t::regclass) then
      execute format('create policy by_grants on %s as permissive for all to public using (true) with check (true)', t);
    end if;
    execute format('alter table %s enable row level security', t);
  end loop;
end $$;

-- The same columns as before, and the endpoint's tenant; with the rights (and so the row-level security) of
-- whoever queries it, so that a tenant's session sees its own endpoints' health only.
create or replace view walhook.endpoint_health with (security_invoker = true) as
select e.id as endpoint_id, e.display_url as url, e.enabled, e.disabled_reason,
       coalesce(s.breaker, 'closed') as breaker,
       coalesce(s.consecutive_failures, 0) as consecutive_failures,
       s.failing_since, s.last_success_at, s.last_failure_at, s.last_status_code, s.last_error,
       coalesce(h.successes, 0)::bigint as successes_1h, coalesce(h.failures, 0)::bigint as failures_1h,
       case when coalesce(h.successes, 0) + coalesce(h.failures, 0) = 0 then null
            else round(h.successes / (h.successes + h.failures), 4) end as success_rate_1h,
       s.updated_at,
       e.paused,
       s.open_until,
       e.tenant
  from walhook.endpoints e
  left join walhook.endpoint_state s on s.endpoint_id = e.id
  left join lateral (
        select sum(t.successes) as successes, sum(t.failures) as failures
          from walhook.endpoint_stats t
         where t.endpoint_id = e.id and t.bucket > now() - interval '1 hour') h on true;

-- walhook:step recover(): by tenant and by event type
-- Re-creates, as pending deliveries due now, every event of the outbox created in [since, until) that the
-- endpoint accepts (walhook.endpoint_accepts) and that has no delivery for it yet. By endpoint_id: that
-- endpoint (enabled or not), as before. By tenant alone: every enabled endpoint of the tenant, each for the
-- events written since it was created (a new endpoint is not sent history it never subscribed to). With
-- tenant and endpoint_id: that endpoint, the tenant's events only (a firehose's share of one tenant).
-- event_type (a pattern such as 'order.*') narrows the events. Idempotent; with the caller's rights, so a
-- tenant's session recovers its own endpoints and events only.
drop function if exists walhook.recover(bigint, timestamptz, timestamptz);
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
  return n;
end $$;
