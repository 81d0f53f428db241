-- Per-endpoint delivery policy, endpoint health, secret rotation, ordered delivery, payload limits and
-- least-privilege roles. Every policy column is NULL for "use the daemon's configured default".

create function walhook.check_retry_schedule(s interval[]) returns boolean
language plpgsql immutable as $$
begin
  if s is not null and (cardinality(s) > 100 or exists (select 1 from unnest(s) d where d is null or d <= interval '0')) then
    raise exception 'invalid retry_schedule: list at most 100 positive intervals, like ''{5s,5min,30min}''; NULL uses delivery.retry_schedule'
      using errcode = 'check_violation';
  end if;
  return true;
end $$;

-- Static extra headers: a JSON object of string values. Names walhook owns or that would break the
-- request are refused: host, content-*, user-agent, hop-by-hop headers and webhook-*.
create function walhook.check_headers(h jsonb) returns boolean
language plpgsql immutable as $$
declare
  k text;
  v jsonb;
begin
  if h is null or jsonb_typeof(h) <> 'object' then
    raise exception 'invalid headers: use a JSON object of header names to string values, like ''{"x-api-key": "..."}'''
      using errcode = 'check_violation';
  end if;
  for k, v in select * from jsonb_each(h) loop
    if k !~ '^[A-Za-z0-9!#$%&''*+.^_`|~-]+$' then
      raise exception 'invalid header name %: use letters, digits and - only', quote_literal(k) using errcode = 'check_violation';
    end if;
    if lower(k) in ('host', 'user-agent', 'connection', 'keep-alive', 'proxy-authenticate', 'proxy-authorization',
                    'proxy-connection', 'te', 'trailer', 'transfer-encoding', 'upgrade', 'expect')
       or lower(k) like 'content-%' or lower(k) like 'webhook-%' then
      raise exception 'header % cannot be set per endpoint: walhook sets it, or it would break the request', quote_literal(k)
        using errcode = 'check_violation';
    end if;
    if jsonb_typeof(v) <> 'string' or (v #>> '{}') ~ '[\r\n\x00]' or length(v #>> '{}') > 4096 then
      raise exception 'invalid value for header %: use a single-line string of at most 4096 characters', quote_literal(k)
        using errcode = 'check_violation';
    end if;
  end loop;
  return true;
end $$;

-- ed25519 signing keys: 'whsk_' + base64 of the 64-byte key (seed followed by public key).
create function walhook.check_signing_key(s text) returns boolean
language plpgsql immutable as $$
declare
  key bytea;
begin
  if s is null then
    return true;
  end if;
  begin
    key := decode(substr(s, 6), 'base64');
  exception when others then
    key := null;
  end;
  if s !~ '^whsk_' or key is null or length(key) <> 64 then
    raise exception 'invalid signing_key: it must be ''whsk_'' followed by the base64 of a 64-byte ed25519 key (seed and public key); `walhook keygen` makes one'
      using errcode = 'check_violation';
  end if;
  return true;
end $$;

alter table walhook.endpoints
  add column timeout interval,
  add column retry_schedule interval[],
  add column rate_limit double precision,
  add column max_in_flight integer,
  add column headers jsonb not null default '{}',
  add column metadata jsonb not null default '{}',
  add column ordered boolean not null default false,
  add column signing_key text,
  add column disabled_reason text,
  add constraint endpoints_timeout_valid check (timeout is null or (timeout > interval '0' and timeout <= interval '10 minutes')),
  add constraint endpoints_retry_schedule_valid check (walhook.check_retry_schedule(retry_schedule)),
  add constraint endpoints_rate_limit_valid check (rate_limit is null or rate_limit > 0),
  add constraint endpoints_max_in_flight_valid check (max_in_flight is null or max_in_flight between 1 and 100000),
  add constraint endpoints_headers_valid check (walhook.check_headers(headers)),
  add constraint endpoints_metadata_valid check (jsonb_typeof(metadata) = 'object'),
  add constraint endpoints_signing_key_valid check (walhook.check_signing_key(signing_key));

-- Re-enabling an endpoint clears the reason it was disabled.
create or replace function walhook.endpoints_touch() returns trigger
language plpgsql as $$
begin
  new.updated_at := now();
  if new.enabled and not old.enabled then
    new.disabled_reason := null;
  end if;
  return new;
end $$;

-- Secrets that still sign during a rotation's grace period (at most 10 per endpoint).
create table walhook.endpoint_secrets (
  endpoint_id bigint not null references walhook.endpoints (id) on delete cascade,
  secret text not null,
  expires_at timestamptz not null,
  constraint endpoint_secrets_secret_valid check (walhook.check_secret(secret))
);
create index endpoint_secrets_endpoint on walhook.endpoint_secrets (endpoint_id);

create trigger endpoint_secrets_bump after insert or update or delete on walhook.endpoint_secrets
  for each statement execute function walhook.endpoints_bump();

-- Replaces the endpoint's secret with a new one and returns it; the old one keeps signing (a second v1
-- signature on every delivery) until the grace period ends.
create function walhook.rotate_secret(endpoint bigint, grace interval default '24 hours') returns text
language plpgsql as $$
declare
  old_secret text;
  new_secret text := walhook.generate_secret();
begin
  if grace < interval '0' or grace > interval '7 days' then
    raise exception 'grace must be between 0 and 7 days' using errcode = 'invalid_parameter_value';
  end if;
  select secret into old_secret from walhook.endpoints where id = endpoint for update;
  if not found then
    raise exception 'no endpoint with id %', endpoint using errcode = 'no_data_found';
  end if;
  delete from walhook.endpoint_secrets where endpoint_id = endpoint and expires_at <= now();
  if grace > interval '0' then
    insert into walhook.endpoint_secrets (endpoint_id, secret, expires_at) values (endpoint, old_secret, now() + grace);
    -- keep the 10 newest old secrets
    delete from walhook.endpoint_secrets s
     where s.endpoint_id = endpoint
       and s.ctid not in (select ctid from walhook.endpoint_secrets where endpoint_id = endpoint
                           order by expires_at desc limit 10);
  end if;
  update walhook.endpoints set secret = new_secret where id = endpoint;
  return new_secret;
end $$;

-- What the daemon knows of each endpoint's health, written by it every few seconds.
create table walhook.endpoint_state (
  endpoint_id bigint primary key,
  breaker text not null default 'closed',
  consecutive_failures integer not null default 0,
  failing_since timestamptz,
  last_success_at timestamptz,
  last_failure_at timestamptz,
  last_status_code integer,
  last_error text,
  successes_1h bigint not null default 0,
  failures_1h bigint not null default 0,
  updated_at timestamptz not null default now(),
  constraint endpoint_state_breaker_valid check (breaker in ('closed', 'open', 'half_open'))
);

create view walhook.endpoint_health as
select e.id as endpoint_id, e.url, e.enabled, e.disabled_reason,
       coalesce(s.breaker, 'closed') as breaker,
       coalesce(s.consecutive_failures, 0) as consecutive_failures,
       s.failing_since, s.last_success_at, s.last_failure_at, s.last_status_code, s.last_error,
       coalesce(s.successes_1h, 0) as successes_1h, coalesce(s.failures_1h, 0) as failures_1h,
       case when coalesce(s.successes_1h, 0) + coalesce(s.failures_1h, 0) = 0 then null
            else round(s.successes_1h::numeric / (s.successes_1h + s.failures_1h), 4) end as success_rate_1h,
       s.updated_at
  from walhook.endpoints e
  left join walhook.endpoint_state s on s.endpoint_id = e.id;

-- Ordered delivery: events with the same ordering_key reach an ordered endpoint in commit order.
alter table walhook.outbox add column ordering_key text;
alter table walhook.deliveries
  add column ordering_key text,
  add column commit_lsn pg_lsn;
-- due deliveries are claimed per endpoint, each no more than it has room for
drop index walhook.deliveries_due;
create index deliveries_due on walhook.deliveries (endpoint_id, next_attempt_at)
  where status = 'pending' and ordering_key is null;
create index deliveries_ordered_heads on walhook.deliveries (endpoint_id, ordering_key, commit_lsn, event_id)
  where status = 'pending' and ordering_key is not null;

-- Payload size limit, enforced at INSERT. walhook.set_max_payload_bytes(n) changes it.
create function walhook.check_payload_size(payload jsonb, max_bytes integer) returns boolean
language plpgsql immutable as $$
declare
  size integer := pg_column_size(payload);
begin
  if size > max_bytes then
    raise exception 'payload is % bytes, over the limit of % bytes: send a reference to large data instead, or raise the limit with walhook.set_max_payload_bytes()', size, max_bytes
      using errcode = 'check_violation';
  end if;
  return true;
end $$;

alter table walhook.outbox add constraint outbox_payload_size check (walhook.check_payload_size(payload, 262144));

create function walhook.set_max_payload_bytes(max_bytes integer) returns void
language plpgsql as $$
begin
  if max_bytes is null or max_bytes < 1024 or max_bytes > 67108864 then
    raise exception 'max_bytes must be between 1024 and 67108864' using errcode = 'invalid_parameter_value';
  end if;
  alter table walhook.outbox drop constraint outbox_payload_size;
  -- not valid: existing rows are not rescanned, new rows are checked
  execute format('alter table walhook.outbox add constraint outbox_payload_size check (walhook.check_payload_size(payload, %s)) not valid', max_bytes);
end $$;

-- The publication the daemon streams (it creates it itself too, when missing, if it may): created here by
-- the schema's owner, so the daemon's role needs no ownership of walhook.outbox.
do $$
begin
  if not exists (select 1 from pg_publication where pubname = 'walhook') then
    create publication walhook for table walhook.outbox with (publish = 'insert');
  end if;
end $$;

-- Least privilege. Functions are not callable by everyone: each role gets what it needs.
revoke execute on all functions in schema walhook from public;

-- Group roles, created when the migrating role may create roles (they are cluster-wide; grants are
-- per database). Log-in roles are made members: GRANT walhook_writer TO app;
--   walhook_writer: insert events into the outbox (and read back their id/uid), nothing else;
--   walhook_reader: read delivery status, attempts, health, and endpoints without their secrets;
--   walhook_admin:  manage endpoints, rotate secrets, redeliver; reads everything;
--   walhook_daemon: what `walhook run` needs (its log-in role also needs the REPLICATION attribute).
do $$
declare
  may boolean := (select rolsuper or rolcreaterole from pg_roles where rolname = current_user);
  r text;
begin
  if not may then
    raise notice 'walhook: this role may not create roles; create walhook_writer, walhook_reader, walhook_admin and walhook_daemon as described in the README';
    return;
  end if;
  foreach r in array array['walhook_writer', 'walhook_reader', 'walhook_admin', 'walhook_daemon'] loop
    if not exists (select 1 from pg_roles where rolname = r) then
      begin
        execute format('create role %I nologin', r);
      exception when duplicate_object or unique_violation then
        null; -- created concurrently by a migration of another database in this cluster
      end;
    end if;
  end loop;

  grant usage on schema walhook to walhook_writer, walhook_reader, walhook_admin, walhook_daemon;

  grant insert (event_type, payload, created_at, ordering_key) on walhook.outbox to walhook_writer;
  grant select (id, uid, created_at) on walhook.outbox to walhook_writer;
  grant execute on function walhook.check_event_type(text), walhook.check_payload_size(jsonb, integer)
    to walhook_writer, walhook_admin, walhook_daemon;

  grant select on walhook.deliveries, walhook.attempts, walhook.endpoint_state, walhook.endpoint_health,
    walhook.outbox, walhook.schema_migrations to walhook_reader;
  grant select (id, url, event_types, enabled, description, created_at, updated_at, timeout, retry_schedule,
    rate_limit, max_in_flight, metadata, ordered, disabled_reason) on walhook.endpoints to walhook_reader;
  grant execute on function walhook.matches(text, text[]) to walhook_reader, walhook_admin, walhook_daemon;

  grant walhook_reader to walhook_admin;
  grant select, insert, update, delete on walhook.endpoints, walhook.endpoint_secrets to walhook_admin;
  grant select on walhook.endpoints_generation to walhook_admin;
  grant update on walhook.endpoints_generation to walhook_admin;
  grant update (status, schedule_step, next_attempt_at, updated_at) on walhook.deliveries to walhook_admin;
  grant execute on function walhook.redeliver(bigint[]), walhook.redeliver(bigint, text, timestamptz),
    walhook.rotate_secret(bigint, interval), walhook.generate_secret(), walhook.check_url(text),
    walhook.check_event_patterns(text[]), walhook.check_secret(text), walhook.check_headers(jsonb),
    walhook.check_retry_schedule(interval[]), walhook.check_signing_key(text), walhook.endpoints_touch(),
    walhook.endpoints_bump()
    to walhook_admin;

  grant select on all tables in schema walhook to walhook_daemon;
  grant insert, update, delete on walhook.deliveries, walhook.attempts, walhook.endpoint_state to walhook_daemon;
  grant update (enabled, disabled_reason) on walhook.endpoints to walhook_daemon;
  grant update (processed_at, claimed_until) on walhook.outbox to walhook_daemon;
  grant update on walhook.endpoints_generation to walhook_daemon;
  grant execute on all functions in schema walhook to walhook_daemon;
end $$;
