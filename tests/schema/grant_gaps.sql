-- The walhook functions a role would call without the right to (tests/schema: every_function_a_role_runs_...).
with recursive roles(rolname) as (
  values ('walhook_tenant'), ('walhook_writer'), ('walhook_admin'), ('walhook_daemon'), ('walhook_reader'), ('walhook_portal')
), fns as (
  -- the body without its string literals and comments (an error message may name a function it does not call)
  select p.oid, p.proname, p.prosecdef, pg_get_function_identity_arguments(p.oid) as args,
         regexp_replace(regexp_replace(p.prosrc, $re$'([^']|'')*'$re$, '', 'g'), '--[^\n]*', '', 'g') as prosrc
    from pg_proc p join pg_namespace n on n.oid = p.pronamespace
   where n.nspname = 'walhook'
), -- what a role's statements run as itself: functions it may execute, and invoker trigger functions on tables it may write
runs_as_role as (
  select r.rolname, f.oid, f.proname, f.prosrc
    from roles r join fns f on not f.prosecdef
   where has_function_privilege(r.rolname, f.oid, 'execute')
      or exists (select 1 from pg_trigger t join pg_class c on c.oid = t.tgrelid
                  where t.tgfoid = f.oid and not t.tgisinternal
                    and (has_table_privilege(r.rolname, c.oid, 'insert') or has_table_privilege(r.rolname, c.oid, 'update')
                         or has_table_privilege(r.rolname, c.oid, 'delete')))
)
select x.rolname, x.proname as caller, c.proname || '(' || c.args || ')' as callee
  from runs_as_role x join fns c on x.prosrc ~ ('walhook\.' || c.proname || '\s*\(')
 where not has_function_privilege(x.rolname, c.oid, 'execute')
 order by 1, 2, 3;
