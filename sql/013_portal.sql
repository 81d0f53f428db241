-- The portal: customers manage their own webhooks in a browser, with SQL underneath. The portal process logs
-- in as a role holding only walhook_portal (a member of walhook_tenant): every request runs in a transaction
-- whose walhook.tenant comes from a session these functions verified, so row-level security, not web code,
-- decides what a customer sees.
--
-- Links, not accounts: the application mints a short-lived, single-use link for one of its customers
-- (walhook.portal_link); the portal exchanges it once for a session. Tokens are random (two
-- gen_random_uuid()s: 244 bits from the server's strong random source) and stored only as their SHA-256, so
-- reading these tables (as their owner) gives no usable token. Nobody else reads them: the portal, the
-- application and operators use the SECURITY DEFINER functions below, which check who asks.
--
-- An operator link opens a session that sees every tenant's health (portal_overview, portal_slots) and may
-- look at one tenant at a time (portal_view), through the same row-level security as the tenant itself.

-- walhook:step tables: portal links and sessions
create table if not exists walhook.portal_links (
  token_hash bytea primary key,
  tenant text,
  operator boolean not null default false,
  expires_at timestamptz not null,
  created_at timestamptz not null default now(),
  created_by text not null default current_user,
  used_at timestamptz,
  constraint portal_links_scope check (operator = (tenant is null))
);
create table if not exists walhook.portal_sessions (
  session_hash bytea primary key,
  tenant text,
  operator boolean not null default false,
  csrf text not null,
  -- the tenant an operator session is looking at
  viewing text,
  created_at timestamptz not null default now(),
  expires_at timestamptz not null,
  last_seen_at timestamptz not null default now(),
  constraint portal_sessions_scope check (operator = (tenant is null))
);
create index if not exists portal_links_expires on walhook.portal_links (expires_at);
create index if not exists portal_sessions_expires on walhook.portal_sessions (expires_at);

-- walhook:step functions: minting, exchanging and checking
-- A random token: 64 hex characters.
create or replace function walhook.portal_token() returns text
language sql volatile
set search_path = pg_catalog, walhook, pg_temp
as $$
  select replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', '')
$$;

create or replace function walhook.portal_hash(token text) returns bytea
language sql immutable
set search_path = pg_catalog, walhook, pg_temp
as $$
  select sha256(convert_to(token, 'UTF8'))
$$;

-- Whether the session calling a SECURITY DEFINER function is an operator's: its log-in role is a member of
-- walhook_admin (or a superuser). Inside such a function current_user is the schema's owner.
create or replace function walhook.caller_is_admin() returns boolean
language sql stable
set search_path = pg_catalog, walhook, pg_temp
as $$
  select pg_has_role(session_user, 'walhook_admin', 'member')
$$;

-- A link for one tenant's customer (or, for walhook_admin, an operator link with tenant NULL). A
-- walhook_tenant session mints links for its own tenant only: what its application already lets it manage.
-- Returns the path to put behind the portal's public URL, the token alone, and when the link expires (it
-- also stops working once used). Expired links and sessions are removed here, a few at a time.
create or replace function walhook.portal_link(tenant text, ttl interval default '1 hour',
                                               operator boolean default false)
returns table (path text, token text, expires_at timestamptz)
language plpgsql volatile security definer
set search_path = pg_catalog, walhook, pg_temp
as $$
declare
  t text := portal_link.tenant;
  admin boolean := walhook.caller_is_admin();
  minted text := walhook.portal_token();
  until timestamptz := now() + ttl;
begin
  if ttl is null or ttl < interval '1 minute' or ttl > interval '7 days' then
    raise exception 'invalid ttl %: a portal link lives between 1 minute and 7 days, e.g. interval ''1 hour''', ttl
      using errcode = 'invalid_parameter_value';
  end if;
  if operator then
    if t is not null then
      raise exception 'an operator link sees every tenant: pass tenant => NULL with operator => true'
        using errcode = 'invalid_parameter_value';
    end if;
    if not admin then
      raise exception 'only walhook_admin may mint operator links'
        using errcode = 'insufficient_privilege',
              hint = 'GRANT walhook_admin TO the role that mints them, or mint tenant links';
    end if;
  else
    if t is null or t = '' then
      raise exception 'a portal link needs a tenant: walhook.portal_link(''acme'', interval ''1 hour'')'
        using errcode = 'invalid_parameter_value';
    end if;
    perform walhook.check_tenant(t);
    if not admin and t is distinct from walhook.current_tenant() then
      raise exception 'this session may mint links for its own tenant only (walhook.tenant = %), not for %',
        coalesce(quote_literal(walhook.current_tenant()), 'unset'), quote_literal(t)
        using errcode = 'insufficient_privilege',
              hint = 'SET LOCAL walhook.tenant to the tenant first, or mint it as a walhook_admin role';
    end if;
  end if;
  delete from walhook.portal_links l
   where l.token_hash in (select x.token_hash from walhook.portal_links x where x.expires_at < now() limit 100);
  delete from walhook.portal_sessions s
   where s.session_hash in (select x.session_hash from walhook.portal_sessions x where x.expires_at < now() limit 100);
  insert into walhook.portal_links (token_hash, tenant, operator, expires_at)
  values (walhook.portal_hash(minted), t, operator, until);
  return query select '/login?token=' || minted, minted, until;
end $$;

-- Exchanges a link for a session, once: the link is marked used by the statement that finds it. An unknown,
-- used or expired token gives no row, the same for all three (the portal shows one page for them).
create or replace function walhook.portal_exchange(token text, session_ttl interval default '8 hours')
returns table (session text, tenant text, operator boolean, csrf text, expires_at timestamptz)
language plpgsql volatile security definer
set search_path = pg_catalog, walhook, pg_temp
as $$
declare
  link record;
  minted text := walhook.portal_token();
  forgery text := walhook.portal_token();
  until timestamptz;
begin
  if session_ttl is null or session_ttl < interval '1 minute' or session_ttl > interval '7 days' then
    raise exception 'invalid session_ttl %: between 1 minute and 7 days', session_ttl
      using errcode = 'invalid_parameter_value';
  end if;
  if token is null or token !~ '^[0-9a-f]{64}$' then
    return;
  end if;
  update walhook.portal_links l set used_at = now()
   where l.token_hash = walhook.portal_hash(token) and l.used_at is null and l.expires_at > now()
  returning l.tenant, l.operator into link;
  if not found then
    return;
  end if;
  until := now() + session_ttl;
  insert into walhook.portal_sessions (session_hash, tenant, operator, csrf, expires_at)
  values (walhook.portal_hash(minted), link.tenant, link.operator, forgery, until);
  return query select minted, link.tenant, link.operator, forgery, until;
end $$;

-- The live session behind a cookie, or no row.
create or replace function walhook.portal_session(session text)
returns table (tenant text, operator boolean, csrf text, viewing text, expires_at timestamptz)
language plpgsql volatile security definer
set search_path = pg_catalog, walhook, pg_temp
as $$
begin
  if session is null or session !~ '^[0-9a-f]{64}$' then
    return;
  end if;
  -- at most one write a minute per session
  update walhook.portal_sessions s set last_seen_at = now()
   where s.session_hash = walhook.portal_hash(session) and s.expires_at > now()
     and s.last_seen_at < now() - interval '1 minute';
  return query
    select s.tenant, s.operator, s.csrf, s.viewing, s.expires_at
      from walhook.portal_sessions s
     where s.session_hash = walhook.portal_hash(session) and s.expires_at > now();
end $$;

create or replace function walhook.portal_logout(session text) returns void
language sql volatile security definer
set search_path = pg_catalog, walhook, pg_temp
as $$
  delete from walhook.portal_sessions s where s.session_hash = walhook.portal_hash(session)
$$;

-- The live operator session behind a cookie, or an insufficient_privilege error.
create or replace function walhook.portal_operator(session text) returns void
language plpgsql stable security definer
set search_path = pg_catalog, walhook, pg_temp
as $$
begin
  if not exists (select 1 from walhook.portal_sessions s
                  where s.session_hash = walhook.portal_hash(session) and s.expires_at > now() and s.operator) then
    raise exception 'this portal session is not an operator''s'
      using errcode = 'insufficient_privilege', hint = 'mint an operator link: walhook portal-link --operator';
  end if;
end $$;

-- An operator session picks the tenant it looks at (NULL: none, the overview only).
create or replace function walhook.portal_view(session text, tenant text) returns void
language plpgsql volatile security definer
set search_path = pg_catalog, walhook, pg_temp
as $$
begin
  perform walhook.portal_operator(session);
  update walhook.portal_sessions s set viewing = nullif(portal_view.tenant, '')
   where s.session_hash = walhook.portal_hash(session);
end $$;

-- walhook:step functions: the operator's overview
-- Every endpoint of every tenant with its health and backlog, for an operator session.
create or replace function walhook.portal_overview(session text)
returns table (tenant text, endpoint_id bigint, url text, enabled boolean, paused boolean, breaker text,
               success_rate_1h double precision, pending bigint, dead bigint, last_error text)
language plpgsql stable security definer
set search_path = pg_catalog, walhook, pg_temp
as $$
begin
  perform walhook.portal_operator(session);
  return query
    select h.tenant, h.endpoint_id, h.url, h.enabled, h.paused, h.breaker, h.success_rate_1h::float8,
           (select count(*) from walhook.deliveries d where d.endpoint_id = h.endpoint_id and d.status = 'pending'),
           (select count(*) from walhook.deliveries d where d.endpoint_id = h.endpoint_id and d.status = 'dead'),
           h.last_error
      from walhook.endpoint_health h
     order by h.tenant nulls first, h.endpoint_id;
end $$;

-- The replication slots walhook records for this database, with their lag, for an operator session.
create or replace function walhook.portal_slots(session text)
returns table (slot_name text, active boolean, lag_bytes bigint, confirmed_at timestamptz)
language plpgsql stable security definer
set search_path = pg_catalog, walhook, pg_temp
as $$
begin
  perform walhook.portal_operator(session);
  return query
    select s.slot_name, coalesce(r.active, false),
           case when r.confirmed_flush_lsn is null then null
                else pg_wal_lsn_diff(
                       case when pg_is_in_recovery() then pg_last_wal_replay_lsn() else pg_current_wal_lsn() end,
                       r.confirmed_flush_lsn)::bigint end,
           s.confirmed_at
      from walhook.slots s
      left join pg_replication_slots r on r.slot_name = s.slot_name and r.database = current_database()
     order by s.slot_name;
end $$;

-- walhook:step functions: a test event
-- walhook.test is sent only to the endpoint it is for: '*' and 'walhook.*' never match it, in SQL as in the
-- daemon's fan-out (src/fanout.rs), so no other endpoint receives someone's test.
create or replace function walhook.matches(event_type text, patterns text[]) returns boolean
language sql immutable
set search_path = pg_catalog, walhook, pg_temp
as $$
  select event_type <> 'walhook.test' and exists (
    select 1 from unnest(patterns) p
     where (p = '*' and left(event_type, 8) <> 'walhook.')
        or p = event_type
        or (right(p, 2) = '.*' and length(event_type) > length(p) - 1
            and left(event_type, length(p) - 1) = left(p, length(p) - 1))
  )
$$;

-- Publishes a walhook.test event for the endpoint's tenant and queues its delivery to that endpoint only,
-- due now: signed, sent, retried and recorded like any delivery. Returns the delivery's id. As the schema's
-- owner, so it checks what row-level security would: an operator (walhook_admin) tests any endpoint, a
-- tenant's session only its own (not the firehose); to anyone else the endpoint does not exist.
create or replace function walhook.send_test(endpoint_id bigint, payload jsonb default null) returns bigint
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
  select x.id, x.tenant, x.enabled, x.all_tenants into e from walhook.endpoints x where x.id = send_test.endpoint_id;
  -- (is true: an endpoint without a tenant is no tenant's, NULL = NULL is not true)
  if not found or not (walhook.caller_is_admin()
                       or (e.tenant = walhook.current_tenant() and not e.all_tenants) is true) then
    raise exception 'no endpoint %', send_test.endpoint_id
      using errcode = 'no_data_found', hint = 'SELECT id, url FROM walhook.endpoints lists the ones you may test';
  end if;
  if not e.enabled then
    raise exception 'endpoint % is disabled: enable it first (UPDATE walhook.endpoints SET enabled = true)', e.id
      using errcode = 'object_not_in_prerequisite_state';
  end if;
  body := coalesce(payload, jsonb_build_object(
    'message', 'a test event from walhook: answer 2xx to show that your endpoint works',
    'endpoint_id', e.id));
  perform set_config('walhook.publishing_operational', 'on', true);
  insert into walhook.outbox (event_type, tenant, payload)
  values ('walhook.test', e.tenant, body)
  returning id, created_at into event;
  perform set_config('walhook.publishing_operational', was, true);
  insert into walhook.deliveries (event_id, endpoint_id, webhook_id, status, next_attempt_at, event_type,
                                  payload, event_created_at, tenant)
  values (event.id, e.id, gen_random_uuid(), 'pending', now(), 'walhook.test', body, event.created_at, e.tenant)
  returning id into delivery;
  return delivery;
end $$;

