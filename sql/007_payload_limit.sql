-- The payload limit is checked when a row is inserted, and only then. As a CHECK constraint it was checked
-- again by every UPDATE of the row: with the notify source, whose claims and marks update outbox rows,
-- lowering the limit below a row already committed made every claim fail (a crash loop, that row never
-- delivered). A BEFORE INSERT trigger holds the limit in its own body, so changing it replaces a function
-- and takes no lock on the outbox at all.

-- walhook:step functions: the limit's trigger (keeping the current limit) and set_max_payload_bytes
do $do$
declare
  current_limit integer := 262144;
  definition text;
begin
  select pg_get_constraintdef(c.oid) into definition
    from pg_constraint c
   where c.conname = 'outbox_payload_size' and c.conrelid = 'walhook.outbox'::regclass;
  if definition is not null then
    current_limit := coalesce(substring(definition from 'check_payload_size\(payload, (\d+)\)')::integer,
                              current_limit);
  end if;
  if to_regprocedure('walhook.outbox_payload_limit()') is null then
    execute format($f$
      create function walhook.outbox_payload_limit() returns trigger
      language plpgsql
      set search_path = pg_catalog, walhook, pg_temp
      as $body$
      begin
        perform walhook.check_payload_size(new.payload, %s);
        return new;
      end $body$
    $f$, current_limit);
  end if;
end $do$;

-- Replaces the limit's trigger function: new rows are checked against `max_bytes`, committed ones never
-- again. Only the owner of the schema's functions (the role that migrates) may run it.
create or replace function walhook.set_max_payload_bytes(max_bytes integer) returns void
language plpgsql
set search_path = pg_catalog, walhook, pg_temp
as $fn$
begin
  if max_bytes is null or max_bytes < 1024 or max_bytes > 67108864 then
    raise exception 'max_bytes must be between 1024 and 67108864' using errcode = 'invalid_parameter_value';
  end if;
  execute format($f$
    create or replace function walhook.outbox_payload_limit() returns trigger
    language plpgsql
    set search_path = pg_catalog, walhook, pg_temp
    as $body$
    begin
      perform walhook.check_payload_size(new.payload, %s);
      return new;
    end $body$
  $f$, max_bytes);
end $fn$;

-- walhook:step outbox: the limit's trigger (a short lock that inserts wait for at most lock_timeout)
create or replace trigger outbox_payload_limit before insert on walhook.outbox
  for each row execute function walhook.outbox_payload_limit();

-- walhook:step outbox: the old constraint, now that the trigger checks the limit
alter table walhook.outbox drop constraint if exists outbox_payload_size;
