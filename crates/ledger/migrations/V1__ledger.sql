-- What each stage settled for each message it took (see crates/ledger/src/lib.rs). A redelivered
-- message settled again is absorbed by the key: the first settlement stands.
CREATE TABLE conveyor_ledger_settled (
    pipeline       text NOT NULL,
    stage          text NOT NULL,
    message_id     text NOT NULL,
    settled_at     timestamptz NOT NULL DEFAULT now(),
    -- done, dead_lettered (the whole message) or malformed
    outcome        text NOT NULL,
    records_in     bigint NOT NULL DEFAULT 0,
    passed_on      bigint NOT NULL DEFAULT 0,
    filtered       bigint NOT NULL DEFAULT 0,
    filtered_ids   text[] NOT NULL DEFAULT '{}',
    written        bigint NOT NULL DEFAULT 0,
    stale          bigint NOT NULL DEFAULT 0,
    dead_lettered  bigint NOT NULL DEFAULT 0,
    dead_class     text,
    dead_ids       text[] NOT NULL DEFAULT '{}',
    PRIMARY KEY (pipeline, stage, message_id)
);
CREATE INDEX conveyor_ledger_settled_at ON conveyor_ledger_settled (settled_at);

-- Each message published into a stage's queue, by the stage before it or by an operator's replay,
-- with the ids of its records: what a stage must settle, and what is named when it does not.
CREATE TABLE conveyor_ledger_sent (
    pipeline    text NOT NULL,
    stage       text NOT NULL,
    message_id  text NOT NULL,
    sent_at     timestamptz NOT NULL DEFAULT now(),
    sent_by     text NOT NULL,
    parent_id   text NOT NULL,
    records     bigint NOT NULL,
    record_ids  text[] NOT NULL,
    PRIMARY KEY (pipeline, stage, message_id)
);
CREATE INDEX conveyor_ledger_sent_at ON conveyor_ledger_sent (sent_at);

-- The operators' replays and purges of dead letters: who, when, what moved.
CREATE TABLE conveyor_ledger_action (
    id          bigserial PRIMARY KEY,
    pipeline    text NOT NULL,
    action      text NOT NULL,
    stage       text NOT NULL,
    os_user     text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    messages    bigint NOT NULL,
    records     bigint NOT NULL,
    -- the letters acted on: [{"message_id": ..., "class": ..., "records": n, "replayed_as": ...}]
    letters     jsonb NOT NULL
);
CREATE INDEX conveyor_ledger_action_at ON conveyor_ledger_action (at);
