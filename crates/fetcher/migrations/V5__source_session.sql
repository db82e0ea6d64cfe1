-- The source's login (an app-token and the address it is good at), one row per account set and
-- gateway, shared by every fetcher of it (see crates/fetcher/src/session.rs). It holds a live token:
-- the sync state's schema deserves the access rules of a credential store.
CREATE TABLE conveyor_source_session (
    session     text PRIMARY KEY,
    token       text NOT NULL,
    address     text NOT NULL,
    fetched_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL
);
