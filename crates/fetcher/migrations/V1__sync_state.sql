-- The fetchers' shared state. Unqualified names: created in the schema CONVEYOR_PG_SCHEMA.

-- Per pipeline: how far windows have been handed out, and the watermark below which every modified
-- record is confirmed by the broker.
CREATE TABLE conveyor_sync_state (
    pipeline      text PRIMARY KEY,
    planned_until timestamptz NOT NULL,
    watermark     timestamptz NOT NULL,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

-- Windows handed out and not yet finished. A finished window's row is deleted.
CREATE TABLE conveyor_sync_windows (
    pipeline     text        NOT NULL,
    window_start timestamptz NOT NULL,
    window_end   timestamptz NOT NULL,
    published_at timestamptz NOT NULL,
    PRIMARY KEY (pipeline, window_start, window_end)
);

-- The call budget per account set, shared by every fetcher: the time of the next free call slot.
CREATE TABLE conveyor_rate_budget (
    budget    text PRIMARY KEY,
    next_slot timestamptz NOT NULL
);
