-- Hardening: every function pins its search_path, SQL refuses the endpoint values the daemon cannot send,
-- policy values are bounded, readers see URLs without credentials, and changing the payload limit gives up
-- quickly instead of queuing inserts behind it.
--
-- search_path: a function that resolves names through the caller's search_path runs whatever a role that may
-- create objects in one of those schemas put there (an exact-type cardinality(text[]) in public beats the
-- built-in cardinality(anyarray)), with the privileges of whoever calls it: an admin inserting an endpoint,
-- the daemon, the migrating superuser (CVE-2018-1058). Every walhook function now runs with
-- `search_path = pg_catalog, walhook, pg_temp`; functions defined from here on say so themselves.
--
-- The new checks are separate constraints, added NOT VALID so that existing rows that break them do not fail
-- the migration (new and updated rows are checked), then validated where the existing rows allow it; a
-- warning names the endpoints to fix otherwise.

-- walhook:step functions: pinned search_path, stricter endpoint checks, readable URLs, payload limit
-- Control characters: the http crate refuses them in a request line or header value (it accepts tab and
-- every byte from 0x20 except 0x7f). Spaces and line breaks are refused by endpoints_url_valid already.
create or replace function walhook.check_url_characters(u text) returns boolean
language plpgsql immutable
set search_path = pg_catalog, walhook, pg_temp
as $$
declare
  at integer := regexp_instr(u, '[\x01-\x1f\x7f]');
begin
  if at > 0 then
    raise exception 'invalid endpoint url: it has a control character (code %) at position %; percent-encode it (%%%) or remove it',
      ascii(substr(u, at, 1)), at, upper(lpad(to_hex(ascii(substr(u, at, 1))), 2, '0'))
      using errcode = 'check_violation', schema = 'walhook', table = 'endpoints', constraint = 'endpoints_url_characters';
  end if;
  return true;
end $$;

create or replace function walhook.check_header_values(h jsonb) returns boolean
language plpgsql immutable
set search_path = pg_catalog, walhook, pg_temp
as $$
declare
  k text;
  v text;
  at integer;
begin
  if h is null or jsonb_typeof(h) <> 'object' then
    return true; -- endpoints_headers_valid says what is wrong
  end if;
  for k, v in select key, value #>> '{}' from jsonb_each(h) where jsonb_typeof(value) = 'string' loop
    at := regexp_instr(v, '[\x01-\x08\x0b\x0c\x0e-\x1f\x7f]');
    if at > 0 then
      raise exception 'invalid value for header %: it has a control character (code %) at position %; header values may hold printable characters and tabs only',
        quote_literal(k), ascii(substr(v, at, 1)), at
        using errcode = 'check_violation', schema = 'walhook', table = 'endpoints', constraint = 'endpoints_header_values_valid';
    end if;
  end loop;
  return true;
end $$;

-- The daemon decodes secrets and signing keys strictly (padding required, no stray bits after the last
-- byte, no whitespace), where decode(…, 'base64') is lenient: a key must be exactly what encoding its bytes
-- gives (encode() breaks lines every 76 characters).
create or replace function walhook.check_secret_canonical(s text) returns boolean
language plpgsql immutable
set search_path = pg_catalog, walhook, pg_temp
as $$
declare
  canonical text;
begin
  if s is null or s !~ '^whsec_' then
    return true; -- endpoints_secret_valid says what is wrong
  end if;
  begin
    canonical := replace(encode(decode(substr(s, 7), 'base64'), 'base64'), E'\n', '');
  exception when invalid_parameter_value then
    return true; -- not base64 at all: endpoints_secret_valid says so
  end;
  if canonical <> substr(s, 7) then
    raise exception 'invalid secret: the base64 after ''whsec_'' is not in canonical form (padding, and zero bits after the last byte, as base64 encoders write it); omit the secret to have one generated'
      using errcode = 'check_violation', schema = 'walhook', table = 'endpoints', constraint = 'endpoints_secret_canonical';
  end if;
  return true;
end $$;

create or replace function walhook.check_signing_key_canonical(s text) returns boolean
language plpgsql immutable
set search_path = pg_catalog, walhook, pg_temp
as $$
declare
  canonical text;
begin
  if s is null or s !~ '^whsk_' then
    return true; -- endpoints_signing_key_valid says what is wrong
  end if;
  begin
    canonical := replace(encode(decode(substr(s, 6), 'base64'), 'base64'), E'\n', '');
  exception when invalid_parameter_value then
    return true;
  end;
  if canonical <> substr(s, 6) then
    raise exception 'invalid signing_key: the base64 after ''whsk_'' is not in canonical form (padding, no whitespace, zero bits after the last byte); `walhook keygen` makes one'
      using errcode = 'check_violation', schema = 'walhook', table = 'endpoints', constraint = 'endpoints_signing_key_canonical';
  end if;
  return true;
end $$;

-- Bounds that keep the daemon's arithmetic on times in range: a token every 1000 s at the slowest, a retry at
-- most 30 days after the previous attempt.
create or replace function walhook.check_rate_limit(r double precision) returns boolean
language plpgsql immutable
set search_path = pg_catalog, walhook, pg_temp
as $$
begin
  -- NaN compares above every number, so the upper bound refuses it
  if r is not null and not (r >= 0.001 and r <= 1000000) then
    raise exception 'invalid rate_limit %: use deliveries per second between 0.001 (one every 1000 s) and 1000000, or NULL for no limit', r
      using errcode = 'check_violation', schema = 'walhook', table = 'endpoints', constraint = 'endpoints_rate_limit_range';
  end if;
  return true;
end $$;

create or replace function walhook.check_retry_intervals(s interval[]) returns boolean
language plpgsql immutable
set search_path = pg_catalog, walhook, pg_temp
as $$
declare
  too_long interval;
begin
  select d into too_long from unnest(s) d where d > interval '30 days' limit 1;
  if too_long is not null then
    raise exception 'invalid retry_schedule: % is longer than 30 days; use intervals of at most 30 days, like ''{5s,5min,30min}''; NULL uses delivery.retry_schedule', too_long
      using errcode = 'check_violation', schema = 'walhook', table = 'endpoints', constraint = 'endpoints_retry_schedule_range';
  end if;
  return true;
end $$;

-- An endpoint's URL as readers see it: without credentials, query or fragment, which may carry secrets.
create or replace function walhook.display_url(u text) returns text
language sql immutable strict
set search_path = pg_catalog, walhook, pg_temp
as $$
  select regexp_replace(regexp_replace(u, '^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@', '\1'), '[?#].*$', '')
$$;

create or replace view walhook.endpoint_health as
select e.id as endpoint_id, walhook.display_url(e.url) as url, e.enabled, e.disabled_reason,
       coalesce(s.breaker, 'closed') as breaker,
       coalesce(s.consecutive_failures, 0) as consecutive_failures,
       s.failing_since, s.last_success_at, s.last_failure_at, s.last_status_code, s.last_error,
       coalesce(s.successes_1h, 0) as successes_1h, coalesce(s.failures_1h, 0) as failures_1h,
       case when coalesce(s.successes_1h, 0) + coalesce(s.failures_1h, 0) = 0 then null
            else round(s.successes_1h::numeric / (s.successes_1h + s.failures_1h), 4) end as success_rate_1h,
       s.updated_at
  from walhook.endpoints e
  left join walhook.endpoint_state s on s.endpoint_id = e.id;

-- Replacing the check takes ACCESS EXCLUSIVE on the outbox, which every insert queues behind while it waits:
-- it waits 1 s at most, then says who holds the table.
create or replace function walhook.set_max_payload_bytes(max_bytes integer) returns void
language plpgsql
set search_path = pg_catalog, walhook, pg_temp
set lock_timeout = '1s'
as $$
declare
  holders text;
begin
  if max_bytes is null or max_bytes < 1024 or max_bytes > 67108864 then
    raise exception 'max_bytes must be between 1024 and 67108864' using errcode = 'invalid_parameter_value';
  end if;
  alter table walhook.outbox drop constraint outbox_payload_size;
  -- not valid: existing rows are not rescanned, new rows are checked
  execute format('alter table walhook.outbox add constraint outbox_payload_size check (walhook.check_payload_size(payload, %s)) not valid', max_bytes);
exception when lock_not_available then
  select string_agg(format('pid %s (user %s, application %s, %s)', a.pid, a.usename,
                           coalesce(quote_ident(nullif(a.application_name, '')), 'unnamed'), coalesce(a.state, '?')), '; ')
    into holders
    from pg_stat_activity a
   where a.pid <> pg_backend_pid()
     and a.pid in (select l.pid from pg_locks l
                    where l.locktype = 'relation' and l.relation = 'walhook.outbox'::regclass);
  raise exception 'could not change the payload limit: walhook.outbox stayed locked for 1 s by %; the limit is unchanged', coalesce(holders, 'a session that has ended since')
    using errcode = 'lock_not_available',
          hint = 'try again when those transactions have ended (inserts into the outbox waited at most 1 s for this attempt)';
end $$;

-- Every walhook function, including those above and those of earlier migrations.
do $$
declare
  f regprocedure;
begin
  for f in select p.oid::regprocedure from pg_proc p where p.pronamespace = 'walhook'::regnamespace order by p.oid loop
    execute format('alter routine %s set search_path = pg_catalog, walhook, pg_temp', f);
  end loop;
end $$;

-- walhook:step endpoints: the new checks, for new and updated rows (endpoints is small)
do $$
begin
  if not exists (select from pg_constraint where conrelid = 'walhook.endpoints'::regclass and conname = 'endpoints_url_characters') then
    alter table walhook.endpoints
      add constraint endpoints_url_characters check (walhook.check_url_characters(url)) not valid,
      add constraint endpoints_header_values_valid check (walhook.check_header_values(headers)) not valid,
      add constraint endpoints_secret_canonical check (walhook.check_secret_canonical(secret)) not valid,
      add constraint endpoints_signing_key_canonical check (walhook.check_signing_key_canonical(signing_key)) not valid,
      add constraint endpoints_rate_limit_range check (walhook.check_rate_limit(rate_limit)) not valid,
      add constraint endpoints_retry_schedule_range check (walhook.check_retry_intervals(retry_schedule)) not valid;
  end if;
end $$;

-- walhook:step endpoints: validate the new checks where existing rows allow it
do $$
declare
  c record;
  bad bigint[];
  problem text;
  e record;
begin
  for c in select conname, substring(pg_get_constraintdef(oid) from '^CHECK \((.*)\) NOT VALID$') as expr
             from pg_constraint
            where conrelid = 'walhook.endpoints'::regclass and not convalidated
              and conname in ('endpoints_url_characters', 'endpoints_header_values_valid', 'endpoints_secret_canonical',
                              'endpoints_signing_key_canonical', 'endpoints_rate_limit_range', 'endpoints_retry_schedule_range')
            order by conname loop
    begin
      execute format('alter table walhook.endpoints validate constraint %I', c.conname);
    exception when check_violation then
      bad := '{}';
      problem := null;
      for e in select id from walhook.endpoints order by id loop
        begin
          execute format('select %s from walhook.endpoints where id = $1', c.expr) using e.id;
        exception when check_violation then
          bad := bad || e.id;
          if problem is null then
            get stacked diagnostics problem = message_text;
          end if;
        end;
      end loop;
      raise warning 'walhook: endpoints % break the new constraint % (%): they were kept, and new or changed rows are checked; fix them, then run ALTER TABLE walhook.endpoints VALIDATE CONSTRAINT %',
        array_to_string(bad, ', '), c.conname, problem, c.conname;
    end;
  end loop;
end $$;
