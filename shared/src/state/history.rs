//! The history store: PostgreSQL, where what is older than Redis's hot
//! window lives (billing's archived ledger, messaging's old messages). Each
//! service has its own database and connects as its own user; its schema is
//! versioned migrations embedded in its binary (refinery), run at start.
//!
//! The hot path never waits for it: only archivers and reads of old history
//! call it, and while it is down they answer `UNAVAILABLE`
//! (`HISTORY_UNAVAILABLE`) and the archive lag grows.

use std::path::PathBuf;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

use crate::contract::error::ApiError;
use crate::contract::reasons;

/// How to reach a service's history database.
#[derive(Debug, Clone)]
pub struct HistorySettings {
    /// `postgres://user@host:port/database` (a password in the URL is
    /// refused: it belongs in `password_file`).
    pub url: String,
    /// The database user's password, one line.
    pub password_file: Option<PathBuf>,
    /// The CA that signed PostgreSQL's certificate: with it, connections
    /// are TLS only and the server must prove the URL's host name; without
    /// it, plaintext (loopback or a private network only).
    pub ca_file: Option<PathBuf>,
    /// Connections at most in the pool.
    pub pool_size: usize,
    /// How long one statement may run, and how long to wait for a
    /// connection.
    pub timeout: Duration,
}

/// A pool of connections to the history database.
#[derive(Clone)]
pub struct History {
    pool: Pool,
}

impl std::fmt::Debug for History {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("History")
            .field("pool", &self.pool.status())
            .finish()
    }
}

/// TLS towards PostgreSQL: the server's chain must lead to the CA in
/// `ca_file` and its certificate name the URL's host (rustls checks both).
fn tls_to(ca_file: &std::path::Path) -> Result<tokio_postgres_rustls::MakeRustlsConnect, String> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let context =
        |e: &dyn std::fmt::Display| format!("DATABASE_CA_FILE {}: {e}", ca_file.display());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).map_err(|e| context(&e))? {
        roots
            .add(cert.map_err(|e| context(&e))?)
            .map_err(|e| context(&e))?;
    }
    if roots.is_empty() {
        return Err(context(&"holds no certificate"));
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// A pooled connection.
pub type Connection = deadpool_postgres::Object;

impl History {
    /// A lazily connecting pool (nothing is dialled until first use, so a
    /// service starts while PostgreSQL is down).
    pub fn open(settings: &HistorySettings) -> Result<Self, String> {
        let mut config: tokio_postgres::Config = settings
            .url
            .parse()
            .map_err(|e| format!("DATABASE_URL: {e}"))?;
        if config.get_password().is_some() {
            return Err(
                "DATABASE_URL carries a password: put it in DATABASE_PASSWORD_FILE instead".into(),
            );
        }
        if let Some(path) = &settings.password_file {
            let password = std::fs::read_to_string(path)
                .map_err(|e| format!("DATABASE_PASSWORD_FILE {}: {e}", path.display()))?;
            config.password(password.trim_end_matches(['\r', '\n']));
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(settings.timeout);
        }
        config.options(format!(
            "-c statement_timeout={}",
            settings.timeout.as_millis()
        ));
        let recycling = || ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        let manager = match &settings.ca_file {
            Some(ca) => {
                config.ssl_mode(tokio_postgres::config::SslMode::Require);
                Manager::from_config(config, tls_to(ca)?, recycling())
            }
            None => Manager::from_config(config, NoTls, recycling()),
        };
        let pool = Pool::builder(manager)
            .max_size(settings.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(settings.timeout))
            .create_timeout(Some(settings.timeout))
            .recycle_timeout(Some(settings.timeout))
            .build()
            .map_err(|e| format!("DATABASE_URL: {e}"))?;
        Ok(Self { pool })
    }

    /// A connection, or `UNAVAILABLE` (`HISTORY_UNAVAILABLE`).
    pub async fn connection(&self) -> Result<Connection, ApiError> {
        self.pool.get().await.map_err(unavailable)
    }

    /// Whether an error of [`unavailable`] says the store cannot answer now
    /// (rather than that it refused what was asked).
    pub fn is_unavailable(error: &ApiError) -> bool {
        error.reason() == reasons::HISTORY_UNAVAILABLE
    }

    /// Runs the service's migrations, forward only: a database that holds a
    /// migration this binary does not know (a newer release ran), or one
    /// whose applied migration differs from this binary's, is refused.
    pub async fn migrate(&self, runner: refinery::Runner) -> Result<usize, MigrateError> {
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|e| MigrateError::Unreachable(e.to_string()))?;
        let client: &mut tokio_postgres::Client = &mut client;
        // Replicas starting together migrate one at a time.
        let unreachable = |e: tokio_postgres::Error| MigrateError::Unreachable(e.to_string());
        client
            .batch_execute("SELECT pg_advisory_lock(hashtext('inmail migrations'))")
            .await
            .map_err(unreachable)?;
        let report = runner
            .set_abort_divergent(true)
            .set_abort_missing(true)
            .run_async(&mut *client)
            .await;
        let _ = client
            .batch_execute("SELECT pg_advisory_unlock(hashtext('inmail migrations'))")
            .await;
        let report = report.map_err(|e| {
            // refinery reports every SQL failure as a connection error:
            // what PostgreSQL refused (a broken migration, a permission) is
            // a refusal, never retried; only a failure to answer is.
            let refused = match e.kind() {
                refinery::error::Kind::Connection(_, source) => source
                    .downcast_ref::<tokio_postgres::Error>()
                    .is_some_and(is_refusal),
                _ => true,
            };
            if refused {
                MigrateError::Refused(e.to_string())
            } else {
                MigrateError::Unreachable(e.to_string())
            }
        })?;
        Ok(report.applied_migrations().len())
    }
}

/// The month partition of a table partitioned by a time in ms since the
/// epoch: its name (`<table>_YYYYMM`) and its range `[from, to)`.
pub fn month_partition(table: &str, ms: i64) -> (String, i64, i64) {
    use chrono::{Datelike, TimeZone, Utc};
    let at = Utc
        .timestamp_millis_opt(ms)
        .single()
        .unwrap_or(chrono::DateTime::<Utc>::MIN_UTC);
    let first = |y: i32, m: u32| {
        Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0)
            .single()
            .expect("the first of a month exists")
            .timestamp_millis()
    };
    let (y, m) = if at.month() == 12 {
        (at.year() + 1, 1)
    } else {
        (at.year(), at.month() + 1)
    };
    (
        format!("{table}_{}{:02}", at.year(), at.month()),
        first(at.year(), at.month()),
        first(y, m),
    )
}

/// Creates the month partitions of `table` that rows at `times` (ms) need,
/// inside the inserting transaction. Only a missing month takes the lock
/// (and creating it, the table's lock): every other insert runs alongside
/// the others; two archivers creating one take turns.
pub async fn ensure_month_partitions(
    tx: &deadpool_postgres::Transaction<'_>,
    table: &str,
    times: impl IntoIterator<Item = i64>,
) -> Result<(), ApiError> {
    let mut months: Vec<(String, i64, i64)> = times
        .into_iter()
        .map(|ms| month_partition(table, ms))
        .collect();
    months.sort();
    months.dedup();
    for (name, from, to) in months {
        let exists: bool = tx
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&name])
            .await
            .map_err(unavailable)?
            .get(0);
        if exists {
            continue;
        }
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            &[&format!("{table} partitions")],
        )
        .await
        .map_err(unavailable)?;
        tx.batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {name} PARTITION OF {table} \
             FOR VALUES FROM ({from}) TO ({to})"
        ))
        .await
        .map_err(unavailable)?;
    }
    Ok(())
}

/// Opens a service's history store and runs its migrations before it
/// serves. A schema this binary cannot move forward from refuses to start
/// (`Err`); PostgreSQL unreachable at start does not (the hot path needs
/// Redis only): the answer says whether the migrations ran, and
/// [`when_migrated`] retries them.
pub async fn open_and_migrate(
    settings: &HistorySettings,
    migrations: fn() -> refinery::Runner,
) -> Result<(History, bool), String> {
    let db = History::open(settings)?;
    match db.migrate(migrations()).await {
        Ok(applied) => {
            tracing::info!(applied, "history store migrated");
            Ok((db, true))
        }
        Err(e @ MigrateError::Refused(_)) => Err(e.to_string()),
        Err(e @ MigrateError::Unreachable(_)) => {
            tracing::warn!(error = %e, "history store not reachable at start; archiving waits for it");
            Ok((db, false))
        }
    }
}

/// Runs `then` (the archiver) once the migrations have run: at once when
/// `migrated`, else after retrying them every `retry` (at least a second)
/// until they do, or never if `stop` comes first.
pub fn when_migrated<F>(
    db: History,
    mut migrated: bool,
    migrations: fn() -> refinery::Runner,
    retry: Duration,
    stop: tokio_util::sync::CancellationToken,
    then: F,
) where
    F: FnOnce(tokio_util::sync::CancellationToken) + Send + 'static,
{
    tokio::spawn(async move {
        while !migrated {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(retry.max(Duration::from_secs(1))) => {}
            }
            match db.migrate(migrations()).await {
                Ok(applied) => {
                    tracing::info!(applied, "history store migrated");
                    migrated = true;
                }
                Err(e) => tracing::warn!(error = %e, "history store not ready; archiving waits"),
            }
        }
        then(stop);
    });
}

/// Why the migrations did not run.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// PostgreSQL cannot be reached (or failed mid-way): try again later.
    #[error("the history store cannot be reached: {0}")]
    Unreachable(String),
    /// The database's schema is not one this binary can move forward from
    /// (it is newer, or it diverged): never retried.
    #[error("the history store's schema is refused: {0}")]
    Refused(String),
}

/// Whether PostgreSQL refused this statement for what it is (bad data, a
/// permission, a broken migration) rather than because it cannot answer
/// now (connection, resources, shutdown, timeout: SQLSTATE classes 08, 53,
/// 57): the first is not cured by retrying.
pub fn is_refusal(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some_and(|db| {
        let code = db.code().code();
        !(code.starts_with("08") || code.starts_with("53") || code.starts_with("57"))
    })
}

/// A PostgreSQL failure as the caller sees it: `UNAVAILABLE`
/// (`HISTORY_UNAVAILABLE`) when it cannot answer now, `INTERNAL` when it
/// refused the statement.
pub fn unavailable(e: impl Into<HistoryError>) -> ApiError {
    match e.into() {
        HistoryError::Postgres(e) if is_refusal(&e) => {
            tracing::error!(error = %e, "the history store refused a statement");
            ApiError::internal(format!("the history store refused a statement: {e}"))
        }
        e => ApiError::unavailable(
            reasons::HISTORY_UNAVAILABLE,
            format!("the history store (PostgreSQL) cannot be reached: {e}"),
        ),
    }
}

/// What reaching the history store can fail with.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("{0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Pool(#[from] deadpool_postgres::PoolError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_partition_the_time() {
        // 2026-12-05T04:00:00Z
        let (name, from, to) = month_partition("ledger_entries", 1_796_443_200_000);
        assert_eq!(name, "ledger_entries_202612");
        assert_eq!(from, 1_796_083_200_000); // 2026-12-01
        assert_eq!(to, 1_798_761_600_000); // 2027-01-01
        let (name, from, _) = month_partition("messages", 1_798_761_600_000);
        assert_eq!(name, "messages_202701");
        assert_eq!(from, 1_798_761_600_000);
    }
}
