-- A call slot is reserved before every call to the source: the reservation need not survive a crash
-- of PostgreSQL (the gateway's 429s are backed off in any case), and an unlogged table spares each
-- call a WAL flush.
ALTER TABLE conveyor_rate_budget SET UNLOGGED;
