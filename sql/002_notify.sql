-- source = "notify": outbox rows are claimed under a lease and marked processed once every delivery of them
-- is recorded. Nullable columns without defaults are a catalog change only: no table rewrite, no long lock.
-- The partial index on unprocessed rows and the trigger that wakes pollers are created by the notify source
-- when it starts, not here: with source = "replication" processed_at stays null, so such an index would grow
-- with every row, and the trigger would make every insert pay for a NOTIFY nobody listens to.

alter table walhook.outbox
  -- set when every delivery of the row is recorded (notify source only)
  add column processed_at timestamptz,
  -- a daemon's claim: the row is its own until then; renewed while its deliveries are in flight
  add column claimed_until timestamptz;

-- Wakes notify pollers once per inserting statement (notifications with the same payload in one transaction
-- are folded into one). Polling alone is correct; this only shortens the wait.
create function walhook.outbox_wake() returns trigger
language plpgsql as $$
begin
  perform pg_notify('walhook_outbox', '');
  return null;
end $$;
