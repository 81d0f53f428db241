-- walhook core schema: the outbox applications write to, the endpoints users manage, and the delivery and
-- attempt records walhook writes back. Invariants are named CHECK constraints whose functions raise messages
-- that say what is wrong and how to fix it, so a bad row is refused at INSERT with a clear error.
-- Deliveries and attempts carry no foreign keys: they are the large tables, cleaned up in batches, and an
-- application may delete its outbox row right after inserting it (the event is still delivered).

create function walhook.check_event_type(t text) returns boolean
language plpgsql immutable as $$
begin
  if t is null or t !~ '^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$' or length(t) > 255 then
    raise exception 'invalid event_type %: use dot-separated segments of letters, digits and underscores, like ''order.created''', coalesce(quote_literal(t), 'NULL')
      using errcode = 'check_violation';
  end if;
  return true;
end $$;

create function walhook.check_event_patterns(p text[]) returns boolean
language plpgsql immutable as $$
declare
  item text;
begin
  if p is null or cardinality(p) = 0 then
    raise exception 'event_types is empty: list at least one pattern, e.g. ''{*}'' for every event or ''{order.*}'''
      using errcode = 'check_violation';
  end if;
  foreach item in array p loop
    if item is null or item !~ '^(\*|([A-Za-z0-9_]+\.)*([A-Za-z0-9_]+|\*))$' then
      raise exception 'invalid event_types pattern %: use ''*'', an exact type like ''order.created'', or a prefix like ''order.*''', coalesce(quote_literal(item), 'NULL')
        using errcode = 'check_violation';
    end if;
  end loop;
  return true;
end $$;

create function walhook.check_url(u text) returns boolean
language plpgsql immutable as $$
begin
  if u is null or length(u) > 2048 or u !~* '^https?://[^\s/?#@]*@?[^\s/?#@]+([/?#]\S*)?$' then
    raise exception 'invalid endpoint url %: use an absolute http:// or https:// URL with a host, like ''https://example.com/webhooks''', coalesce(quote_literal(u), 'NULL')
      using errcode = 'check_violation';
  end if;
  return true;
end $$;

create function walhook.check_secret(s text) returns boolean
language plpgsql immutable as $$
declare
  key bytea;
begin
  if s is null or s !~ '^whsec_[A-Za-z0-9+/]+={0,2}$' then
    raise exception 'invalid secret: it must be ''whsec_'' followed by the base64 of 24 to 64 random bytes; omit it to have one generated'
      using errcode = 'check_violation';
  end if;
  begin
    key := decode(substr(s, 7), 'base64');
  exception when others then
    raise exception 'invalid secret: the part after ''whsec_'' is not valid base64; omit the secret to have one generated'
      using errcode = 'check_violation';
  end;
  if length(key) < 24 or length(key) > 64 then
    raise exception 'invalid secret: it decodes to % bytes, it must be 24 to 64; omit it to have one generated', length(key)
      using errcode = 'check_violation';
  end if;
  return true;
end $$;

-- 32 random bytes from two v4 UUIDs (gen_random_uuid is built in since PostgreSQL 13; 244 random bits).
create function walhook.generate_secret() returns text
language sql volatile as $$
  select 'whsec_' || encode(decode(replace(gen_random_uuid()::text || gen_random_uuid()::text, '-', ''), 'hex'), 'base64')
$$;

create table walhook.outbox (
  id bigint generated always as identity primary key,
  -- the event's global identity: webhook-id is 'msg_' followed by these 32 hex digits
  uid uuid not null default gen_random_uuid(),
  event_type text not null,
  payload jsonb not null,
  created_at timestamptz not null default now(),
  constraint outbox_event_type_valid check (walhook.check_event_type(event_type))
);

create table walhook.endpoints (
  id bigint generated always as identity primary key,
  url text not null,
  event_types text[] not null default '{*}',
  secret text not null default walhook.generate_secret(),
  enabled boolean not null default true,
  description text not null default '',
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint endpoints_url_valid check (walhook.check_url(url)),
  constraint endpoints_event_types_valid check (walhook.check_event_patterns(event_types)),
  constraint endpoints_secret_valid check (walhook.check_secret(secret))
);

-- The daemon's endpoint cache polls this one row; a statement trigger bumps it on every change to endpoints,
-- in the same transaction, so the cache reloads exactly when a committed change exists.
create table walhook.endpoints_generation (
  singleton boolean primary key default true check (singleton),
  generation bigint not null default 0
);
insert into walhook.endpoints_generation default values;

create function walhook.endpoints_touch() returns trigger
language plpgsql as $$
begin
  new.updated_at := now();
  return new;
end $$;

create function walhook.endpoints_bump() returns trigger
language plpgsql as $$
begin
  update walhook.endpoints_generation set generation = generation + 1;
  return null;
end $$;

create trigger endpoints_touch before update on walhook.endpoints
  for each row execute function walhook.endpoints_touch();
create trigger endpoints_bump after insert or update or delete or truncate on walhook.endpoints
  for each statement execute function walhook.endpoints_bump();

create table walhook.deliveries (
  id bigint generated always as identity primary key,
  event_id bigint not null,
  endpoint_id bigint not null,
  status text not null default 'pending',
  attempts integer not null default 0,
  -- attempts made in the current run of the retry schedule; redeliver() starts a new run
  schedule_step integer not null default 0,
  next_attempt_at timestamptz,
  last_status_code integer,
  last_error text,
  last_attempt_at timestamptz,
  webhook_id uuid not null,
  -- a copy of the event, kept only while it may be needed for a retry (pending or dead deliveries), so
  -- retries never depend on the outbox row still existing
  event_type text,
  payload jsonb,
  event_created_at timestamptz,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint deliveries_status_valid check (status in ('pending', 'succeeded', 'dead')),
  constraint deliveries_event_endpoint_unique unique (event_id, endpoint_id)
);
create index deliveries_due on walhook.deliveries (next_attempt_at) where status = 'pending';

create table walhook.attempts (
  id bigint generated always as identity primary key,
  delivery_id bigint not null,
  attempt integer not null,
  attempted_at timestamptz not null,
  duration_ms integer not null,
  status_code integer,
  error text,
  response_body text
);
create index attempts_delivery on walhook.attempts (delivery_id);

-- Put deliveries back to pending for a fresh run of the retry schedule, due now.
create function walhook.redeliver(delivery_ids bigint[]) returns bigint
language sql as $$
  with redone as (
    update walhook.deliveries
       set status = 'pending', schedule_step = 0, next_attempt_at = now(), updated_at = now()
     where id = any(delivery_ids)
    returning 1
  )
  select count(*) from redone
$$;

-- Every delivery in the given status (dead by default), optionally only one endpoint's or only recent ones.
create function walhook.redeliver(endpoint_id bigint default null, status text default 'dead',
                                  since timestamptz default '-infinity') returns bigint
language sql as $$
  with redone as (
    update walhook.deliveries d
       set status = 'pending', schedule_step = 0, next_attempt_at = now(), updated_at = now()
     where d.status = redeliver.status
       and (redeliver.endpoint_id is null or d.endpoint_id = redeliver.endpoint_id)
       and d.updated_at >= redeliver.since
    returning 1
  )
  select count(*) from redone
$$;

-- The event-type pattern semantics of the daemon's fan-out, for SQL that fans out (backfill after the slot
-- is created) and for users' own queries: '*', an exact type, or a prefix ending in '.*'.
create function walhook.matches(event_type text, patterns text[]) returns boolean
language sql immutable as $$
  select exists (
    select 1 from unnest(patterns) p
     where p = '*'
        or p = event_type
        or (right(p, 2) = '.*' and length(event_type) > length(p) - 1
            and left(event_type, length(p) - 1) = left(p, length(p) - 1))
  )
$$;
