-- The call rate adapts to the source's throttling (see crates/fetcher/src/budget.rs): the rate the
-- last cut set and when, and the last pause guessed without Retry-After and when a call was refused.
ALTER TABLE conveyor_rate_budget
    ADD COLUMN rate_cut     double precision,
    ADD COLUMN cut_at       timestamptz,
    ADD COLUMN pause_secs   double precision NOT NULL DEFAULT 0,
    ADD COLUMN throttled_at timestamptz;
