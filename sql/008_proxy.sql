-- Egress proxy: an endpoint may name a proxy of its own, or go direct whatever `delivery.proxy` says. NULL (every
-- existing row) keeps the configured default. A proxy URL may hold a password: walhook_reader does not see
-- the column (sql/grants.sql), and the check's messages never repeat the value. Only walhook.endpoints, a
-- small table, is changed.

-- walhook:step endpoints: proxy (NULL, 'direct' or http://[user:password@]host:port)
-- Accepts exactly what the daemon's parser accepts (src/dispatch/proxy.rs; tests/schema compares the two).
create or replace function walhook.check_proxy(p text) returns boolean
language plpgsql immutable
set search_path = pg_catalog, walhook, pg_temp
as $$
declare
  authority text;
  userinfo text;
  hostport text;
  host text;
  port text;
  problem text;
begin
  if p is null or p = 'direct' then
    return true;
  end if;
  if p ~ '^[A-Za-z][A-Za-z0-9+]*://' and p !~* '^http://' then
    problem := format('its scheme is %s; walhook reaches a proxy over plain http:// (deliveries to https:// endpoints stay encrypted end to end through its CONNECT tunnel)',
      quote_literal(lower(substring(p from '^([A-Za-z][A-Za-z0-9+]*)://'))));
  elsif p !~* '^http://' then
    problem := 'it is neither NULL, ''direct'' nor an http:// URL';
  else
    authority := substring(p from '^[A-Za-z]+://([^/?#]*)');
    if substr(p, 8 + length(authority)) not in ('', '/') then
      problem := 'it has a path, query or fragment (percent-encode a ''/'', ''?'', ''#'' or ''@'' in the user name or password)';
    else
      userinfo := substring(authority from '^(.*)@');
      hostport := coalesce(substring(authority from '^.*@(.*)$'), authority);
      if hostport ~ '^\[' then
        host := substring(hostport from '^\[([^\]]*)\]');
        port := substring(hostport from '^\[[^\]]*\]:(.*)$');
        if host is null then
          problem := 'it names no host';
        elsif port is null and hostport <> '[' || host || ']' then
          problem := 'its port is not a number from 1 to 65535';
        else
          begin
            if host !~ '^[0-9A-Fa-f:.]+$' or family(host::inet) <> 6 then
              problem := format('its host %s is not an IPv6 address', quote_literal('[' || host || ']'));
            end if;
          exception when invalid_text_representation then
            problem := format('its host %s is not an IPv6 address', quote_literal('[' || host || ']'));
          end;
        end if;
      else
        host := coalesce(substring(hostport from '^(.*):[^:]*$'), hostport);
        port := substring(hostport from '^.*:([^:]*)$');
        if host = '' then
          problem := 'it names no host';
        elsif host !~ '^[A-Za-z0-9_][A-Za-z0-9._-]*$' or host ~ '\.\.' then
          problem := format('its host %s is not a host name or IP address', quote_literal(host));
        end if;
      end if;
      if problem is null then
        if port is null or port = '' then
          problem := 'it names no port; add the proxy''s port, like http://proxy.internal:3128';
        elsif port !~ '^[0-9]{1,5}$' or port::integer not between 1 and 65535 then
          problem := 'its port is not a number from 1 to 65535';
        elsif userinfo ~ '[^\x21-\x7e]|@|%(?![0-9A-Fa-f]{2})' then
          problem := 'its user name or password has a character that must be percent-encoded (a space, a control character, ''@'', or a ''%'' not followed by two hex digits)';
        elsif split_part(userinfo, ':', 1) ~* '%3a' then
          problem := 'its user name holds a '':'' (percent-encoded as %3A), which Basic authentication cannot carry';
        end if;
      end if;
    end if;
  end if;
  if problem is not null then
    raise exception 'invalid endpoint proxy: %; expected NULL (delivery.proxy applies), ''direct'' (no proxy) or a URL like ''http://user:password@proxy.internal:3128''',
      problem
      using errcode = 'check_violation', schema = 'walhook', table = 'endpoints', constraint = 'endpoints_proxy_valid';
  end if;
  return true;
end $$;

alter table walhook.endpoints add column if not exists proxy text;

comment on column walhook.endpoints.proxy is
  'NULL: delivery.proxy (unless delivery.no_proxy matches); ''direct'': no proxy; or http://[user:password@]host:port';

do $$
begin
  if not exists (select from pg_constraint where conname = 'endpoints_proxy_valid'
                  and conrelid = 'walhook.endpoints'::regclass) then
    -- every row is NULL here, so validating it is a scan of a small table
    alter table walhook.endpoints add constraint endpoints_proxy_valid check (walhook.check_proxy(proxy));
  end if;
end $$;
