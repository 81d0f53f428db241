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

-- A function is executable by PUBLIC until this runs: only the roles below may call walhook's.
revoke execute on all functions in schema walhook from public;

-- The group roles (cluster-wide; the grants below are per database).
do $$
declare
  r text;
  may boolean := (select rolsuper or rolcreaterole from pg_roles where rolname = current_user);
begin
  foreach r in array array['walhook_writer', 'walhook_reader', 'walhook_admin', 'walhook_daemon'] loop
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

-- walhook_writer: the application. Inserts events and reads back their identity, nothing else. Not
-- created_at: retention and recovery trust it to be the time of the insert.
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
  grant insert (event_type, payload, ordering_key, traceparent) on walhook.outbox to walhook_writer;
  grant select (id, uid, created_at) on walhook.outbox to walhook_writer;
  grant execute on function walhook.check_event_type(text), walhook.check_payload_size(jsonb, integer),
    walhook.check_traceparent(text)
    to walhook_writer;
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
    walhook.schema_migrations to walhook_reader;
  grant select (id, delivery_id, attempt, attempted_at, duration_ms, status_code, error) on walhook.attempts
    to walhook_reader;
  grant select (id, event_types, enabled, description, created_at, updated_at, timeout, retry_schedule,
    rate_limit, max_in_flight, metadata, ordered, disabled_reason) on walhook.endpoints to walhook_reader;
  grant execute on function walhook.matches(text, text[]), walhook.display_url(text) to walhook_reader;
end $$;

-- walhook_admin: operators. Manage endpoints and their secrets, redeliver; read everything.
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
    walhook.endpoint_health, walhook.slots, walhook.schema_migrations to walhook_admin;
  grant insert, update, delete on walhook.endpoints, walhook.endpoint_secrets to walhook_admin;
  -- the statement trigger on endpoints bumps the generation the daemons poll
  grant update on walhook.endpoints_generation to walhook_admin;
  -- redeliver(), and recover(), which re-creates the deliveries a disabled endpoint missed
  grant update (status, schedule_step, next_attempt_at, updated_at) on walhook.deliveries to walhook_admin;
  grant insert on walhook.deliveries to walhook_admin;
  grant execute on function walhook.redeliver(bigint[]), walhook.redeliver(bigint, text, timestamptz),
    walhook.recover(bigint, timestamptz, timestamptz),
    walhook.rotate_secret(bigint, interval), walhook.generate_secret(), walhook.matches(text, text[]),
    walhook.display_url(text),
    -- the checks of endpoints and endpoint_secrets
    walhook.check_url(text), walhook.check_url_characters(text), walhook.check_event_patterns(text[]),
    walhook.check_secret(text), walhook.check_secret_canonical(text), walhook.check_headers(jsonb),
    walhook.check_header_values(jsonb), walhook.check_retry_schedule(interval[]),
    walhook.check_retry_intervals(interval[]), walhook.check_rate_limit(double precision),
    walhook.check_signing_key(text), walhook.check_signing_key_canonical(text), walhook.check_url_host(text),
    walhook.check_proxy(text)
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
  grant execute on function walhook.matches(text, text[]),
    -- the checks of the rows it updates: outbox (notify) and endpoints
    walhook.check_event_type(text), walhook.check_payload_size(jsonb, integer), walhook.check_traceparent(text),
    walhook.check_url(text), walhook.check_url_characters(text), walhook.check_event_patterns(text[]),
    walhook.check_secret(text), walhook.check_secret_canonical(text), walhook.check_headers(jsonb),
    walhook.check_header_values(jsonb), walhook.check_retry_schedule(interval[]),
    walhook.check_retry_intervals(interval[]), walhook.check_rate_limit(double precision),
    walhook.check_signing_key(text), walhook.check_signing_key_canonical(text), walhook.check_url_host(text),
    walhook.check_proxy(text),
    -- creating the notify source's trigger, where the daemon's role owns the outbox
    walhook.outbox_wake()
    to walhook_daemon;
end $$;
