-- Failover: the timeline a slot was created (or last streamed) on. On PostgreSQL 15 and 16 a logical slot does
-- not survive the promotion of a standby; walhook, finding its slot missing on a server whose timeline is
-- past the one recorded here, knows a failover happened (not a slot dropped by hand) and recovers by itself.

-- walhook:step slots: the timeline of the slot's server
alter table walhook.slots add column if not exists timeline integer;
