-- How far the current pass over a window got: the last page whose records are all confirmed by the
-- broker, the window's row count then, and the ids the pass has published. A window handed out again
-- (its fetcher died) resumes after that page when the page still holds only rows seen and the count is
-- the same; otherwise it is paged from the start. Deleted with the window.
CREATE TABLE conveyor_sync_progress (
    pipeline        text        NOT NULL,
    window_start    timestamptz NOT NULL,
    window_end      timestamptz NOT NULL,
    pages_confirmed bigint      NOT NULL,
    row_count       bigint      NOT NULL,
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pipeline, window_start, window_end)
);

CREATE TABLE conveyor_sync_seen (
    pipeline     text        NOT NULL,
    window_start timestamptz NOT NULL,
    window_end   timestamptz NOT NULL,
    id           text        NOT NULL,
    PRIMARY KEY (pipeline, window_start, window_end, id)
);
