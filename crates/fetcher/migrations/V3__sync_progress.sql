-- How far the current pass over a window got: the last page whose records are all confirmed by the
-- broker, the window's row count then, and the ids the pass has published. A window handed out again
-- (its fetcher died) resumes after that page when the page still holds only rows seen and the count is
-- the same; otherwise it is paged from the start. Deleted with the window.
--
-- Unlogged: progress is written after every confirmed message and need not survive a crash of
-- PostgreSQL (then windows are paged from the start, as before there was progress), so it costs no
-- WAL flush.
CREATE UNLOGGED TABLE conveyor_sync_progress (
    pipeline        text        NOT NULL,
    window_start    timestamptz NOT NULL,
    window_end      timestamptz NOT NULL,
    pages_confirmed bigint      NOT NULL,
    row_count       bigint      NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, window_start, window_end)
);

-- The ids each confirmed message of the pass added, up to its last page: one row a write, not a row an
-- id, so that recording progress costs one small insert.
CREATE UNLOGGED TABLE conveyor_sync_seen (
    pipeline     text        NOT NULL,
    window_start timestamptz NOT NULL,
    window_end   timestamptz NOT NULL,
    last_page    bigint      NOT NULL,
    ids          text[]      NOT NULL,
    PRIMARY KEY (pipeline, window_start, window_end, last_page)
);
