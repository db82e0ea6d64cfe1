-- Every dead letter a stage sent, indexed for browsing: operators list, group and read letters here
-- without taking them from their queue, which keeps each letter byte for byte for a replay. Written
-- with the settlement that sent it, before the message it came from is acked.
CREATE TABLE conveyor_ledger_letter (
    pipeline      text NOT NULL,
    stage         text NOT NULL,
    -- the letter's own message id in its dead-letter queue
    message_id    text NOT NULL,
    -- the message whose settlement sent it (the same id for a whole message dead-lettered)
    parent_id     text NOT NULL,
    failed_at     timestamptz NOT NULL DEFAULT now(),
    class         text NOT NULL,
    reason        text NOT NULL,
    record_ids    text[] NOT NULL,
    attempts      integer NOT NULL,
    replays       integer NOT NULL,
    headers       jsonb NOT NULL,
    -- as text (decompressed), or hex; cut at 1 MiB (payload_bytes tells the whole length)
    payload       text NOT NULL,
    payload_bytes bigint NOT NULL,
    -- dead (in its queue), replayed or purged
    state         text NOT NULL DEFAULT 'dead',
    -- the operator's action that moved it
    action_id     bigint,
    PRIMARY KEY (pipeline, stage, message_id)
);
CREATE INDEX conveyor_ledger_letter_browse ON conveyor_ledger_letter (pipeline, state, failed_at DESC, message_id);
CREATE INDEX conveyor_ledger_letter_records ON conveyor_ledger_letter USING gin (record_ids);
CREATE INDEX conveyor_ledger_letter_parent ON conveyor_ledger_letter (pipeline, parent_id);

-- Who ran an action, through which tool, and the job it belongs to.
ALTER TABLE conveyor_ledger_action ADD COLUMN job_id bigint;

-- An operator's replay or purge run as a job (the console's): the letters it covers and those that
-- failed (its progress is in the actions it recorded, by job_id); a job still running when its console stopped is resumed.
CREATE TABLE conveyor_ledger_job (
    id            bigserial PRIMARY KEY,
    pipeline      text NOT NULL,
    action        text NOT NULL,
    requested_by  text NOT NULL,
    requested_at  timestamptz NOT NULL DEFAULT now(),
    -- [{"stage": ..., "message_id": ...}]
    letters       jsonb NOT NULL,
    total         bigint NOT NULL,
    failed        jsonb NOT NULL DEFAULT '[]',
    -- running, done
    state         text NOT NULL DEFAULT 'running',
    finished_at   timestamptz
);
