//! The source's login, kept in the sync state's database for every fetcher of the account set: a
//! fetcher that restarts, or one more started beside the others, takes up the app-token already
//! fetched instead of running the auth flow again (two calls of the budget, and token calls are the
//! scarcest: Kingdee allows about two a minute).

use conveyor_base::Secret;
use conveyor_base::source::{SavedSession, SessionStore, StoreFuture};
use conveyor_base::tls::error_chain;
use conveyor_base::waiting;
use conveyor_postgres::Database;

use crate::state::failed;

/// One account set's row of `conveyor_source_session`.
pub struct SessionTable {
    database: Database,
    key: String,
}

impl SessionTable {
    /// `key` names the account set and the gateway the token is good for.
    pub fn new(database: Database, key: String) -> Self {
        Self { database, key }
    }
}

impl SessionStore for SessionTable {
    fn load(&self) -> StoreFuture<'_, Option<SavedSession>> {
        Box::pin(async move {
            let client = self.database.client().await.map_err(|e| error_chain(&e))?;
            let row = client
                .query_opt(
                    "SELECT token, address, fetched_at, expires_at FROM conveyor_source_session \
                     WHERE session = $1",
                    &[&self.key],
                )
                .await
                .map_err(failed("reading the saved login"))?;
            Ok(row.map(|row| SavedSession {
                token: Secret::new(row.get::<_, String>(0)),
                address: row.get(1),
                fetched_at: row.get(2),
                expires_at: row.get(3),
            }))
        })
    }

    fn save<'a>(&'a self, session: &'a SavedSession) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let client = self.database.client().await.map_err(|e| error_chain(&e))?;
            client
                .execute(
                    "INSERT INTO conveyor_source_session AS s \
                       (session, token, address, fetched_at, expires_at) \
                     VALUES ($1, $2, $3, $4, $5) \
                     ON CONFLICT (session) DO UPDATE SET token = $2, address = $3, \
                       fetched_at = $4, expires_at = $5",
                    &[
                        &self.key,
                        &session.token.expose(),
                        &session.address,
                        &session.fetched_at,
                        &session.expires_at,
                    ],
                )
                .await
                .map_err(failed("saving the login"))?;
            Ok(())
        })
    }

    fn forget<'a>(&'a self, refused: &'a Secret) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let client = self.database.client().await.map_err(|e| error_chain(&e))?;
            client
                .execute(
                    "DELETE FROM conveyor_source_session WHERE session = $1 AND token = $2",
                    &[&self.key, &refused.expose()],
                )
                .await
                .map_err(failed("forgetting a refused login"))?;
            Ok(())
        })
    }

    fn lock_login(&self) -> StoreFuture<'_, Box<dyn Send>> {
        Box::pin(async move {
            // A session lock on a connection of its own: dropping the guard closes the connection,
            // which releases the lock, as does this process's death.
            let client = self
                .database
                .own_client()
                .await
                .map_err(|e| error_chain(&e))?;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&self.key];
            let lock = client.execute(
                "SELECT pg_advisory_lock(hashtext('conveyor-login:' || $1))",
                &params,
            );
            waiting::reported("another fetcher's login", waiting::REPORT_EVERY, lock)
                .await
                .map_err(failed("waiting for another process's login"))?;
            Ok(Box::new(client) as Box<dyn Send>)
        })
    }
}
