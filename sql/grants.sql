-- What walhook's group roles may do, applied by every `walhook migrate` after the migrations (also when the
-- schema is up to date): repeatable and idempotent. Each role's block first takes back everything the role
-- holds in the schema, then grants exactly what it needs for the current schema, in one transaction, so a
-- role gained later (or an older grant that is no longer right) is put right by running `walhook migrate`
-- again, and sessions never see the role without its rights. Grant extra rights to log-in roles, not to
-- these group roles: they are reset here.
--
-- A table or function added by a migration gets its lines in the block of each role that uses it, and only
-- there. Functions called by CHECK constraints and column defaults need EXECUTE by whoever writes the row
-- (INSERT, and UPDATE, which checks every constraint again); trigger functions need none.
--
-- A role that does not exist is created when the migrating role may (superuser or CREATEROLE); otherwise its
-- block is skipped with a warning that names the statement to run.
--
-- Row-level security is on for the tables a tenant may touch, each with a permissive policy (from the
-- migrations) that admits every row to every role: grants decide for every role but walhook_tenant, whose
-- block adds the restrictive policies that hold it to one tenant.

-- A function is executable by PUBLIC until this runs: only the roles below may call walhook's.
revoke execute on all functions in schema walhook from public;

-- The group roles (cluster-wide; the grants below are per database).
do $$
declare
  r text;
  may boolean := (select rolsuper or rolcreaterole from pg_roles where rolname = current_user);
begin
  foreach r in array array['walhook_writer', 'walhook_reader', 'walhook_admin', 'walhook_daemon', 'walhook_tenant',
                         'walhook_portal'] loop
    if exists (select from pg_roles where rolname = r) then
      continue;
    end if;
    if may then
      begin
        execute format('create role %I nologin', r);
      exception when duplicate_object or unique_violation then
        null; -- created meanwhile by a migration of another database in this cluster
      end;
    else
      raise warning 'walhook: role % does not exist and % may not create roles; as a superuser run: CREATE ROLE % NOLOGIN; then run `walhook migrate` again to grant it its rights',
        r, current_user, r;
    end if;
  end loop;
end $$;

-- walhook_writer: the application. Inserts events (or publishes them with walhook.publish()) and reads back
-- their identity, nothing else. Not created_at: retention and recovery trust it to be the time of the insert.
do $$
begin
  if not exists (select from pg_roles where rolname = 'walhook_writer') then
    return;
  end if;
  revoke all on schema walhook from walhook_writer;
  revoke all on all tables in schema walhook from walhook_writer;
  revoke all on all sequences in schema walhook from walhook_writer;
  revoke all on all functions in schema walhook from walhook_writer;

  grant usage on schema walhook to walhook_writer;
  grant insert (event_type, payload, ordering_key, traceparent, tenant, event_version) on walhook.outbox
    to walhook_writer;
  -- the event catalog, to read what a type's versions must look like
  grant select on walhook.event_types, walhook.event_type_versions to walhook_writer;
  grant select (id, uid, created_at) on walhook.outbox to walhook_writer;
  grant execute on function walhook.check_event_type(text), walhook.check_payload_size(jsonb, integer),
    walhook.check_traceparent(text), walhook.check_tenant(text)
    to walhook_writer;
  -- publish(): the same events without an outbox row when the daemon streams the slot (SECURITY DEFINER)
  grant execute on function walhook.publish(text, jsonb, text, text, text, integer) to walhook_writer;
end $$;

-- walhook_reader: dashboards. Delivery status, attempts without the receivers' response bodies (which may
-- echo the endpoints' secret headers), health with URLs stripped of credentials and query, and endpoints
-- without their URL, secret, headers, signing key or proxy (whose URL may hold a password).
do $$
begin
  if not exists (select from pg_roles where rolname = 'walhook_reader') then
    return;
  end if;
  revoke all on schema walhook from walhook_reader;
  revoke all on all tables in schema walhook from walhook_reader;
  revoke all on all sequences in schema walhook from walhook_reader;
  revoke all on all functions in schema walhook from walhook_reader;

  grant usage on schema walhook to walhook_reader;
  grant select on walhook.outbox, walhook.deliveries, walhook.endpoint_state, walhook.endpoint_health,
    walhook.schema_migrations, walhook.tenants, walhook.recoveries, walhook.event_types,
    walhook.event_type_versions to walhook_reader;
  grant select (id, delivery_id, attempt, attempted_at, duration_ms, status_code, error) on walhook.attempts
    to walhook_reader;
  -- display_url and paused, and endpoint_stats, for endpoint_health, which reads with the reader's rights
  grant select (id, event_types, enabled, description, created_at, updated_at, timeout, retry_schedule,
    rate_limit, max_in_flight, metadata, ordered, disabled_reason, paused, resumed_at, tenant, all_tenants,
    filter, display_url, event_versions, format, verification, verified_at) on walhook.endpoints
    to walhook_reader;
  grant select on walhook.endpoint_stats to walhook_reader;
  grant execute on function walhook.matches(text, text[]), walhook.display_url(text),
    walhook.endpoint_accepts(text, text, jsonb, text[], text, boolean, jsonb)
    to walhook_reader;
end $$;

-- walhook_admin: operators. Manage endpoints and their secrets, tenants' limits, redeliver; read everything.
-- (walhook.set_max_payload_bytes alters the outbox: only its owner, the migrating role, may run it.)
do $$
begin
  if not exists (select from pg_roles where rolname = 'walhook_admin') then
    return;
  end if;
  revoke all on schema walhook from walhook_admin;
  revoke all on all tables in schema walhook from walhook_admin;
  revoke all on all sequences in schema walhook from walhook_admin;
  revoke all on all functions in schema walhook from walhook_admin;

  grant usage on schema walhook to walhook_admin;
  grant select on walhook.outbox, walhook.endpoints, walhook.endpoint_secrets, walhook.endpoints_generation,
    walhook.deliveries, walhook.attempts, walhook.endpoint_state, walhook.endpoint_stats,
    walhook.endpoint_health, walhook.slots, walhook.schema_migrations, walhook.tenants, walhook.recoveries
    to walhook_admin;
  grant insert, update, delete on walhook.endpoints, walhook.endpoint_secrets, walhook.tenants to walhook_admin;
  -- the event catalog (its statement triggers bump the generation too)
  grant select, insert, update, delete on walhook.event_types, walhook.event_type_versions to walhook_admin;
  -- the statement trigger on endpoints bumps the generation the daemons poll
  grant update on walhook.endpoints_generation to walhook_admin;
  -- redeliver(), and recover(), which re-creates the deliveries a disabled endpoint missed
  grant update (status, schedule_step, next_attempt_at, updated_at) on walhook.deliveries to walhook_admin;
  grant insert on walhook.deliveries to walhook_admin;
  grant insert (kind, endpoint_id, tenant, event_type, since, until, deliveries) on walhook.recoveries
    to walhook_admin;
  grant execute on function walhook.redeliver(bigint[]), walhook.redeliver(bigint, text, timestamptz),
    walhook.recover(bigint, timestamptz, timestamptz, text, text),
    walhook.rotate_secret(bigint, interval), walhook.generate_secret(), walhook.matches(text, text[]),
    walhook.portal_link(text, interval, boolean), walhook.send_test(bigint, jsonb),
    walhook.send_test(bigint, text), walhook.render_payload(text, integer, integer, jsonb),
    walhook.verify_endpoint(bigint),
    walhook.endpoint_accepts(text, text, jsonb, text[], text, boolean, jsonb),
    walhook.display_url(text), walhook.current_tenant(),
    -- the checks of the catalog
    walhook.check_downgrade(regprocedure), walhook.check_event_versions(jsonb), walhook.check_event_type(text),
    -- the checks of endpoints, endpoint_secrets and tenants
    walhook.check_url(text), walhook.check_url_characters(text), walhook.check_event_patterns(text[]),
    walhook.check_secret(text), walhook.check_secret_canonical(text), walhook.check_headers(jsonb),
    walhook.check_header_values(jsonb), walhook.check_retry_schedule(interval[]),
    walhook.check_retry_intervals(interval[]), walhook.check_rate_limit(double precision),
    walhook.check_signing_key(text), walhook.check_signing_key_canonical(text), walhook.check_url_host(text),
    walhook.check_proxy(text), walhook.check_tenant(text), walhook.check_endpoint_tenancy(text, boolean),
    walhook.check_filter(jsonb), walhook.check_tenant_limits(integer, double precision)
    to walhook_admin;
end $$;

-- walhook_daemon: `walhook run`, `walhook status` and `walhook recover-slot`, with either source. Its log-in
-- role also needs the REPLICATION attribute for source = "replication" (attributes are not inherited).
do $$
begin
  if not exists (select from pg_roles where rolname = 'walhook_daemon') then
    return;
  end if;
  revoke all on schema walhook from walhook_daemon;
  revoke all on all tables in schema walhook from walhook_daemon;
  revoke all on all sequences in schema walhook from walhook_daemon;
  revoke all on all functions in schema walhook from walhook_daemon;

  grant usage on schema walhook to walhook_daemon;
  -- the schema version check
  grant select on walhook.schema_migrations to walhook_daemon;
  -- the endpoint cache (its generation, the endpoints, secrets in a rotation's grace period); disabling an
  -- endpoint (410, disable_after) updates two columns, and its statement trigger bumps the generation
  grant select on walhook.endpoints, walhook.endpoint_secrets, walhook.endpoints_generation to walhook_daemon;
  grant update (enabled, disabled_reason) on walhook.endpoints to walhook_daemon;
  grant update on walhook.endpoints_generation to walhook_daemon;
  -- events: backfill and recovery read the outbox, the notify source claims and marks rows, retention
  -- deletes old ones
  grant select, delete on walhook.outbox to walhook_daemon;
  grant update (processed_at, claimed_until) on walhook.outbox to walhook_daemon;
  -- recording, the retry scheduler, retention
  grant select, insert, update, delete on walhook.deliveries to walhook_daemon;
  grant select, insert, delete on walhook.attempts to walhook_daemon;
  -- endpoint health, shared by instances: state merged, attempt counts added up and pruned
  grant select, insert, update on walhook.endpoint_state to walhook_daemon;
  grant select, insert, update, delete on walhook.endpoint_stats to walhook_daemon;
  -- `walhook status`, which the README runs as the daemon's role: per-endpoint health as dashboards see it
  grant select on walhook.endpoint_health to walhook_daemon;
  grant execute on function walhook.display_url(text) to walhook_daemon;
  -- the slots walhook created (replication source)
  grant select, insert, update on walhook.slots to walhook_daemon;
  -- recover-slot and failover record what they queued (published as walhook.recovery.finished)
  grant insert (kind, since, deliveries) on walhook.recoveries to walhook_daemon;
  -- per-tenant rate limits, for the endpoint cache
  grant select on walhook.tenants to walhook_daemon;
  -- the event catalog: schemas to check payloads against, downgrades for pinned endpoints
  grant select on walhook.event_types, walhook.event_type_versions to walhook_daemon;
  -- the prefix of walhook.publish()'s messages, which the replication source streams as events
  grant select on walhook.publish_settings to walhook_daemon;
  grant execute on function walhook.matches(text, text[]),
    walhook.render_payload(text, integer, integer, jsonb), walhook.check_event_versions(jsonb),
    walhook.endpoint_accepts(text, text, jsonb, text[], text, boolean, jsonb),
    -- the checks of the rows it updates: outbox (notify) and endpoints
    walhook.check_event_type(text), walhook.check_payload_size(jsonb, integer), walhook.check_traceparent(text),
    walhook.check_url(text), walhook.check_url_characters(text), walhook.check_event_patterns(text[]),
    walhook.check_secret(text), walhook.check_secret_canonical(text), walhook.check_headers(jsonb),
    walhook.check_header_values(jsonb), walhook.check_retry_schedule(interval[]),
    walhook.check_retry_intervals(interval[]), walhook.check_rate_limit(double precision),
    walhook.check_signing_key(text), walhook.check_signing_key_canonical(text), walhook.check_url_host(text),
    walhook.check_proxy(text), walhook.check_tenant(text), walhook.check_endpoint_tenancy(text, boolean),
    walhook.check_filter(jsonb),
    -- creating the notify source's trigger, where the daemon's role owns the outbox
    walhook.outbox_wake()
    to walhook_daemon;
end $$;

-- walhook_tenant: one tenant's own rows, for an application's customer-facing pages. A session runs
-- `SET LOCAL walhook.tenant = '…'` (its application decides the tenant, from its own sign-in) and then sees
-- and manages that tenant's endpoints (secrets included, not the operator's proxy), their secrets, health and
-- statistics, the tenant's events, deliveries and attempts and its limits, redelivers and recovers them, and
-- nothing else: with the setting unset or empty it sees no row. Row-level security enforces it, with the
-- restrictive policies below (every walhook table with row-level security has a permissive one for every
-- role, from the migrations): they apply to every member of walhook_tenant, whatever else it may be granted.
-- A delivery or attempt is the tenant's when its delivery's event is, and its endpoint too (the firehose's
-- deliveries of the tenant's events are the operator's). A tenant inserts deliveries only for recover():
-- for its own events and endpoints, so that no delivery can make the daemon send it another tenant's event.
-- The policies are created when missing (creating one locks its table); a later migration that changes one
-- drops it first.
do $$
declare
  own_tenant constant text := 'tenant = (select walhook.current_tenant())';
  own_endpoint constant text :=
    'exists (select 1 from walhook.endpoints e where e.id = endpoint_id and e.tenant = (select walhook.current_tenant()))';
  p record;
begin
  if not exists (select from pg_roles where rolname = 'walhook_tenant') then
    return;
  end if;
  for p in select * from (values
      ('walhook.outbox', 'walhook_tenant', 'all', own_tenant, own_tenant),
      ('walhook.endpoints', 'walhook_tenant', 'all', own_tenant, own_tenant || ' and not all_tenants'),
      ('walhook.endpoint_secrets', 'walhook_tenant', 'all', own_endpoint, own_endpoint),
      ('walhook.endpoint_state', 'walhook_tenant', 'all', own_endpoint, own_endpoint),
      ('walhook.endpoint_stats', 'walhook_tenant', 'all', own_endpoint, own_endpoint),
      ('walhook.tenants', 'walhook_tenant', 'all', own_tenant, own_tenant),
      ('walhook.recoveries', 'walhook_tenant', 'all', own_tenant, own_tenant),
      ('walhook.deliveries', 'walhook_tenant', 'all', own_tenant || ' and ' || own_endpoint,
       own_tenant || ' and ' || own_endpoint),
      ('walhook.deliveries', 'walhook_tenant_events', 'insert', null,
       'exists (select 1 from walhook.outbox o where o.id = event_id and o.tenant = (select walhook.current_tenant()))'),
      ('walhook.attempts', 'walhook_tenant', 'all',
       'exists (select 1 from walhook.deliveries d where d.id = delivery_id and d.tenant = (select walhook.current_tenant()))',
       'exists (select 1 from walhook.deliveries d where d.id = delivery_id and d.tenant = (select walhook.current_tenant()))')
    ) as v(tab, name, command, using_, check_) loop
    if not exists (select from pg_policy where polrelid = p.tab::regclass and polname = p.name) then
      execute format('create policy %I on %s as restrictive for %s to walhook_tenant', p.name, p.tab, p.command)
        || case when p.using_ is null then '' else format(' using (%s)', p.using_) end
        || format(' with check (%s)', p.check_);
    end if;
  end loop;

  revoke all on schema walhook from walhook_tenant;
  revoke all on all tables in schema walhook from walhook_tenant;
  revoke all on all sequences in schema walhook from walhook_tenant;
  revoke all on all functions in schema walhook from walhook_tenant;

  grant usage on schema walhook to walhook_tenant;
  -- endpoints: every column but the operator's proxy (whose URL may hold a password); it sets what a
  -- customer may choose, not the operator's delivery policy (timeout, retries, in-flight limit, proxy) nor
  -- its tenant once the endpoint exists
  grant select (id, url, event_types, secret, enabled, description, created_at, updated_at, timeout,
    retry_schedule, rate_limit, max_in_flight, headers, metadata, ordered, signing_key, disabled_reason, paused,
    resumed_at, tenant, all_tenants, filter, display_url, event_versions, format, verification, verified_at)
    on walhook.endpoints to walhook_tenant;
  grant insert (tenant, url, event_types, secret, enabled, description, rate_limit, headers, metadata, ordered,
    signing_key, paused, filter, event_versions, format, verification) on walhook.endpoints to walhook_tenant;
  grant update (url, event_types, secret, enabled, description, rate_limit, headers, metadata, ordered,
    signing_key, paused, filter, event_versions, format) on walhook.endpoints to walhook_tenant;
  -- the event catalog: the types, their schemas and examples
  grant select on walhook.event_types, walhook.event_type_versions to walhook_tenant;
  grant delete on walhook.endpoints to walhook_tenant;
  -- rotate_secret(), and ending a rotation's grace period early
  grant select, insert, update, delete on walhook.endpoint_secrets to walhook_tenant;
  -- health, statistics, limits, events, deliveries and attempts: to read
  grant select on walhook.endpoint_state, walhook.endpoint_stats, walhook.endpoint_health, walhook.tenants,
    walhook.outbox, walhook.deliveries, walhook.attempts, walhook.recoveries to walhook_tenant;
  -- redeliver(), and recover(), which re-creates the deliveries its endpoints missed
  grant update (status, schedule_step, next_attempt_at, updated_at) on walhook.deliveries to walhook_tenant;
  grant insert (event_id, endpoint_id, webhook_id, status, next_attempt_at, event_type, payload,
    event_created_at, ordering_key, traceparent, tenant, event_version) on walhook.deliveries to walhook_tenant;
  grant insert (kind, endpoint_id, tenant, event_type, since, until, deliveries) on walhook.recoveries
    to walhook_tenant;
  grant execute on function walhook.redeliver(bigint[]), walhook.redeliver(bigint, text, timestamptz),
    walhook.recover(bigint, timestamptz, timestamptz, text, text),
    walhook.rotate_secret(bigint, interval), walhook.generate_secret(), walhook.matches(text, text[]),
    walhook.portal_link(text, interval, boolean), walhook.send_test(bigint, jsonb),
    walhook.send_test(bigint, text), walhook.check_event_versions(jsonb), walhook.check_event_type(text),
    walhook.verify_endpoint(bigint),
    walhook.endpoint_accepts(text, text, jsonb, text[], text, boolean, jsonb),
    walhook.display_url(text), walhook.current_tenant(),
    -- the checks of endpoints and endpoint_secrets
    walhook.check_url(text), walhook.check_url_characters(text), walhook.check_event_patterns(text[]),
    walhook.check_secret(text), walhook.check_secret_canonical(text), walhook.check_headers(jsonb),
    walhook.check_header_values(jsonb), walhook.check_retry_schedule(interval[]),
    walhook.check_retry_intervals(interval[]), walhook.check_rate_limit(double precision),
    walhook.check_signing_key(text), walhook.check_signing_key_canonical(text), walhook.check_url_host(text),
    walhook.check_proxy(text), walhook.check_tenant(text), walhook.check_endpoint_tenancy(text, boolean),
    walhook.check_filter(jsonb)
    to walhook_tenant;
end $$;

-- walhook_portal: the portal process (`walhook portal`). A tenant's rights, held by row-level security to the
-- tenant of each request's transaction (walhook_tenant's policies apply to its members), plus the functions
-- that turn a link into a session and a cookie into its tenant, and an operator session's overview. The role
-- the portal logs in as holds this one and nothing else: no superuser, BYPASSRLS or table ownership, which
-- would step over row-level security (the portal refuses to start with them).
do $$
begin
  if not exists (select from pg_roles where rolname = 'walhook_portal')
     or not exists (select from pg_roles where rolname = 'walhook_tenant') then
    return;
  end if;
  revoke all on schema walhook from walhook_portal;
  revoke all on all tables in schema walhook from walhook_portal;
  revoke all on all sequences in schema walhook from walhook_portal;
  revoke all on all functions in schema walhook from walhook_portal;
  if not pg_has_role('walhook_portal', 'walhook_tenant', 'member') then
    if (select rolsuper or rolcreaterole from pg_roles where rolname = current_user) then
      grant walhook_tenant to walhook_portal;
    else
      raise warning 'walhook: % may not grant roles; as a superuser run: GRANT walhook_tenant TO walhook_portal;',
        current_user;
    end if;
  end if;
  grant usage on schema walhook to walhook_portal;
  grant execute on function walhook.portal_exchange(text, interval), walhook.portal_session(text),
    walhook.portal_logout(text), walhook.portal_view(text, text), walhook.portal_overview(text),
    walhook.portal_slots(text)
    to walhook_portal;
end $$;
