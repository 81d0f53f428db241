-- Endpoint changes in commit order. The daemon fans events out by an in-memory copy of walhook.endpoints (and
-- of the tenants and the catalog), reloaded when walhook.endpoints_generation changes: polled every
-- endpoints.refresh_interval. Polling alone let an event committed just after an endpoint was added (or
-- enabled, or verified) be fanned out by the copy from before, and so never be delivered to it. Now the
-- statement trigger that bumps the generation also writes it as a transactional logical decoding message
-- under walhook.publish()'s keyed prefix with ':endpoints' after it. The replication source decodes the message
-- at the changing transaction's place in commit order and reloads, before any event committed after it, until
-- its copy holds that generation; the notify source reads the generation with each claim and does the same.
-- A message costs one small WAL record per statement that changes those tables (rare: walhook's own periodic
-- check updates endpoints only when it has one to disable), written only where walhook's slot exists in this
-- database and pgoutput sends messages (PostgreSQL 14 on), as for publish(); elsewhere the poll stays.

-- walhook:step functions: endpoints_bump() writes the new generation as a message too
create or replace function walhook.endpoints_bump() returns trigger
language plpgsql security definer
set search_path = pg_catalog, walhook, pg_temp
as $$
declare
  g bigint;
  prefix text;
begin
  update walhook.endpoints_generation set generation = generation + 1 returning generation into g;
  select s.prefix into prefix
    from walhook.publish_settings s
   where current_setting('server_version_num')::integer >= 140000
     and exists (
           select 1
             from pg_catalog.pg_get_replication_slots() r
             join walhook.slots w on w.slot_name = r.slot_name
            where r.slot_type = 'logical' and r.plugin = 'pgoutput' and r.wal_status is distinct from 'lost'
              and r.datoid = (select d.oid from pg_catalog.pg_database d where d.datname = current_database()));
  if prefix is not null then
    perform pg_logical_emit_message(true, prefix || ':endpoints', g::text);
  end if;
  return null;
end $$;
