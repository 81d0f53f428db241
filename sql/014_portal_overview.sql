-- The operator's overview counts every endpoint's pending and dead deliveries in one pass over those rows
-- (the partial indexes deliveries_due, deliveries_ordered_heads and deliveries_dead hold exactly
-- them) instead of two counts per
-- endpoint: with 500 endpoints and a million deliveries, 2 % of them dead, the per-endpoint count of dead rows
-- read the whole deliveries_dead index once per endpoint, and the page took seconds.

-- walhook:step functions: portal_overview in one pass
create or replace function walhook.portal_overview(session text)
returns table (tenant text, endpoint_id bigint, url text, enabled boolean, paused boolean, breaker text,
               success_rate_1h double precision, pending bigint, dead bigint, last_error text)
language plpgsql stable security definer
set search_path = pg_catalog, walhook, pg_temp
as $$
begin
  perform walhook.portal_operator(session);
  return query
    -- one condition per scan, so that each reads its partial index (status in (...) matches neither)
    with backlog as (
      select c.endpoint_id, sum(c.pending)::bigint as pending, sum(c.dead)::bigint as dead
        from (select d.endpoint_id, count(*) as pending, 0 as dead
                from walhook.deliveries d where d.status = 'pending' and d.ordering_key is null
               group by d.endpoint_id
              union all
              select d.endpoint_id, count(*), 0
                from walhook.deliveries d where d.status = 'pending' and d.ordering_key is not null
               group by d.endpoint_id
              union all
              select d.endpoint_id, 0, count(*)
                from walhook.deliveries d where d.status = 'dead' group by d.endpoint_id) c
       group by c.endpoint_id)
    select h.tenant, h.endpoint_id, h.url, h.enabled, h.paused, h.breaker, h.success_rate_1h::float8,
           coalesce(b.pending, 0), coalesce(b.dead, 0), h.last_error
      from walhook.endpoint_health h
      left join backlog b on b.endpoint_id = h.endpoint_id
     order by h.tenant nulls first, h.endpoint_id;
end $$;
