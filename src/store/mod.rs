//! SQLite storage: one database file in WAL mode, versioned migrations applied
//! on open. The data plane never queries it on the request path; it reads
//! in-memory snapshots that background tasks refresh.

pub mod admin_audit;
pub mod audit;
pub mod fields;
pub mod keys;
pub mod pool_keys;
pub mod rollup;
pub mod settings;
pub mod sync;
pub mod users;

use rusqlite::Connection;
use rusqlite_migration::{M, Migrations};
use std::{path::Path, sync::LazyLock, time::Duration};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database {path}: {source}")]
    Open { path: String, source: rusqlite::Error },
    #[error("cannot create the database directory {path}: {source}")]
    Dir { path: String, source: std::io::Error },
    #[error("cannot create the database {path}: {source}")]
    Create { path: String, source: std::io::Error },
    #[error("database migration failed: {0}")]
    Migrate(#[from] rusqlite_migration::Error),
    #[error("database: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    /// A field out of bounds; the message starts with the field's name.
    #[error("{0}")]
    Field(String),
    #[error("{0}")]
    Conflict(String),
    /// Refused by a rule about who may do what (a user's ceilings).
    #[error("{0}")]
    Denied(String),
}

/// Schema history. Append only: never edit a migration that has shipped.
static MIGRATIONS: LazyLock<Migrations<'static>> = LazyLock::new(|| {
    Migrations::new(vec![
        M::up(
            "CREATE TABLE gateway_keys (
            id            TEXT PRIMARY KEY,
            name          TEXT NOT NULL,
            owner         TEXT NOT NULL DEFAULT '',
            secret_sha256 BLOB NOT NULL UNIQUE,
            masked        TEXT NOT NULL,
            permissions   TEXT NOT NULL DEFAULT '[]',
            allowed_routes TEXT NOT NULL DEFAULT '[]',
            allowed_models TEXT NOT NULL DEFAULT '[]',
            expires_at    INTEGER,
            enabled       INTEGER NOT NULL DEFAULT 1,
            created_at    INTEGER NOT NULL,
            revoked_at    INTEGER
        );",
        ),
        M::up(
            "CREATE TABLE audit_log (
            id                INTEGER PRIMARY KEY,
            request_id        TEXT NOT NULL,
            ts_ms             INTEGER NOT NULL,
            key_id            TEXT,
            owner             TEXT,
            route             TEXT,
            upstream          TEXT,
            endpoint          TEXT,
            upstream_key_id   TEXT,
            method            TEXT NOT NULL,
            path              TEXT NOT NULL,
            status            INTEGER NOT NULL,
            model             TEXT,
            stream            INTEGER NOT NULL,
            ttfb_ms           REAL,
            duration_ms       REAL NOT NULL,
            request_bytes     INTEGER NOT NULL,
            response_bytes    INTEGER NOT NULL,
            chunks            INTEGER NOT NULL,
            prompt_tokens     INTEGER,
            completion_tokens INTEGER,
            retries           INTEGER NOT NULL,
            error             TEXT,
            client_ip         TEXT,
            user_agent        TEXT,
            request_headers   TEXT,
            response_headers  TEXT,
            request_body      TEXT,
            response_body     TEXT
        );
        CREATE INDEX audit_log_ts ON audit_log (ts_ms);
        CREATE INDEX audit_log_key_ts ON audit_log (key_id, ts_ms);
        CREATE INDEX audit_log_request_id ON audit_log (request_id);",
        ),
        M::up(
            "CREATE TABLE users (
            id            TEXT PRIMARY KEY,
            username      TEXT NOT NULL UNIQUE,
            password_hash TEXT NOT NULL,
            role          TEXT NOT NULL CHECK (role IN ('admin', 'user')),
            created_at    INTEGER NOT NULL
        );
        CREATE TABLE settings (
            name  TEXT PRIMARY KEY,
            value TEXT NOT NULL
        );
        CREATE TABLE admin_audit (
            id     INTEGER PRIMARY KEY,
            ts_ms  INTEGER NOT NULL,
            actor  TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT,
            before TEXT,
            after  TEXT
        );
        ALTER TABLE gateway_keys ADD COLUMN prev_secret_sha256 BLOB;
        ALTER TABLE gateway_keys ADD COLUMN prev_valid_until INTEGER;
        CREATE INDEX audit_log_owner_id ON audit_log (owner, id);",
        ),
        M::up(
            "ALTER TABLE gateway_keys ADD COLUMN rpm INTEGER;
        ALTER TABLE gateway_keys ADD COLUMN tpm INTEGER;",
        ),
        M::up(
            "ALTER TABLE gateway_keys ADD COLUMN token_quota INTEGER;
        ALTER TABLE gateway_keys ADD COLUMN quota_period TEXT;",
        ),
        // Ownership by user id (a new user with an old name inherits
        // nothing; visibility filters move to user_id, so the owner index
        // goes and the writer keeps one index less), user status and
        // ceilings, admin-set key limits, and a change counter for the data
        // plane's key cache.
        M::up(
            "ALTER TABLE users ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE users ADD COLUMN token_version INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE users ADD COLUMN ceilings TEXT;
        ALTER TABLE gateway_keys ADD COLUMN owner_id TEXT;
        ALTER TABLE gateway_keys ADD COLUMN admin_locked TEXT NOT NULL DEFAULT '[]';
        UPDATE gateway_keys SET owner_id = (SELECT id FROM users WHERE users.username = gateway_keys.owner);
        ALTER TABLE audit_log ADD COLUMN user_id TEXT;
        UPDATE audit_log SET user_id = (SELECT id FROM users WHERE users.username = audit_log.owner)
            WHERE owner IS NOT NULL;
        DROP INDEX audit_log_owner_id;
        CREATE INDEX audit_log_user_id ON audit_log (user_id, id);
        CREATE TABLE change_counter (name TEXT PRIMARY KEY, version INTEGER NOT NULL);
        INSERT INTO change_counter (name, version) VALUES ('keys', 0);
        CREATE TRIGGER gateway_keys_insert AFTER INSERT ON gateway_keys
            BEGIN UPDATE change_counter SET version = version + 1 WHERE name = 'keys'; END;
        CREATE TRIGGER gateway_keys_update AFTER UPDATE ON gateway_keys
            BEGIN UPDATE change_counter SET version = version + 1 WHERE name = 'keys'; END;
        CREATE TRIGGER gateway_keys_delete AFTER DELETE ON gateway_keys
            BEGIN UPDATE change_counter SET version = version + 1 WHERE name = 'keys'; END;
        CREATE TRIGGER users_insert AFTER INSERT ON users
            BEGIN UPDATE change_counter SET version = version + 1 WHERE name = 'keys'; END;
        CREATE TRIGGER users_update AFTER UPDATE ON users
            BEGIN UPDATE change_counter SET version = version + 1 WHERE name = 'keys'; END;
        CREATE TRIGGER users_delete AFTER DELETE ON users
            BEGIN UPDATE change_counter SET version = version + 1 WHERE name = 'keys'; END;",
        ),
        // Upstream keys added through the admin API (sealed with
        // secrets.master_key), and the live state of every pool key.
        M::up(
            "CREATE TABLE pool_keys (
            pool       TEXT NOT NULL,
            key_id     TEXT NOT NULL,
            secret     TEXT NOT NULL,
            weight     INTEGER NOT NULL DEFAULT 1,
            added_by   TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            PRIMARY KEY (pool, key_id)
        );
        CREATE TABLE pool_key_state (
            pool         TEXT NOT NULL,
            key_id       TEXT NOT NULL,
            status       TEXT NOT NULL,
            requests     INTEGER NOT NULL DEFAULT 0,
            errors       INTEGER NOT NULL DEFAULT 0,
            tokens       INTEGER NOT NULL DEFAULT 0,
            last_used_ms INTEGER NOT NULL DEFAULT 0,
            updated_ms   INTEGER NOT NULL,
            PRIMARY KEY (pool, key_id)
        );
        ALTER TABLE audit_log ADD COLUMN attempts TEXT;",
        ),
        // Cluster mode with Postgres: every change to gateway keys, users and
        // API-added pool keys, in order, for the node's sender to send (only while the node runs
        // with Postgres: the `cluster_sync` setting).
        M::up(
            "CREATE TABLE sync_outbox (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            tbl TEXT NOT NULL,
            id  TEXT NOT NULL
        );
        CREATE TRIGGER gateway_keys_sync_insert AFTER INSERT ON gateway_keys
            WHEN EXISTS (SELECT 1 FROM settings WHERE name = 'cluster_sync')
            BEGIN INSERT INTO sync_outbox (tbl, id) VALUES ('gateway_keys', NEW.id); END;
        CREATE TRIGGER gateway_keys_sync_update AFTER UPDATE ON gateway_keys
            WHEN EXISTS (SELECT 1 FROM settings WHERE name = 'cluster_sync')
            BEGIN INSERT INTO sync_outbox (tbl, id) VALUES ('gateway_keys', NEW.id); END;
        CREATE TRIGGER gateway_keys_sync_delete AFTER DELETE ON gateway_keys
            WHEN EXISTS (SELECT 1 FROM settings WHERE name = 'cluster_sync')
            BEGIN INSERT INTO sync_outbox (tbl, id) VALUES ('gateway_keys', OLD.id); END;
        CREATE TRIGGER users_sync_insert AFTER INSERT ON users
            WHEN EXISTS (SELECT 1 FROM settings WHERE name = 'cluster_sync')
            BEGIN INSERT INTO sync_outbox (tbl, id) VALUES ('users', NEW.id); END;
        CREATE TRIGGER users_sync_update AFTER UPDATE ON users
            WHEN EXISTS (SELECT 1 FROM settings WHERE name = 'cluster_sync')
            BEGIN INSERT INTO sync_outbox (tbl, id) VALUES ('users', NEW.id); END;
        CREATE TRIGGER users_sync_delete AFTER DELETE ON users
            WHEN EXISTS (SELECT 1 FROM settings WHERE name = 'cluster_sync')
            BEGIN INSERT INTO sync_outbox (tbl, id) VALUES ('users', OLD.id); END;
        CREATE TRIGGER pool_keys_sync_insert AFTER INSERT ON pool_keys
            WHEN EXISTS (SELECT 1 FROM settings WHERE name = 'cluster_sync')
            BEGIN INSERT INTO sync_outbox (tbl, id) VALUES ('pool_keys', NEW.pool || '/' || NEW.key_id); END;
        CREATE TRIGGER pool_keys_sync_update AFTER UPDATE ON pool_keys
            WHEN EXISTS (SELECT 1 FROM settings WHERE name = 'cluster_sync')
            BEGIN INSERT INTO sync_outbox (tbl, id) VALUES ('pool_keys', NEW.pool || '/' || NEW.key_id); END;
        CREATE TRIGGER pool_keys_sync_delete AFTER DELETE ON pool_keys
            WHEN EXISTS (SELECT 1 FROM settings WHERE name = 'cluster_sync')
            BEGIN INSERT INTO sync_outbox (tbl, id) VALUES ('pool_keys', OLD.pool || '/' || OLD.key_id); END;",
        ),
        // A request that ended without the provider's usage is charged an
        // estimate; its row says so (old rows: reported usage, 0).
        M::up("ALTER TABLE audit_log ADD COLUMN usage_estimated INTEGER NOT NULL DEFAULT 0;"),
        // Cluster mode, exact: the record revision each synced row was last
        // in step with (a local edit is sent with it, so a concurrent change
        // is seen and resolved), and the rows Postgres refused, kept aside
        // with the error so the rest keeps flowing. The audit log's ids
        // become AUTOINCREMENT: retention emptying the table must not hand
        // out ids at or below the shipped watermark again (such rows were
        // never shipped); the sequence starts above that watermark.
        M::up(
            "CREATE TABLE sync_base (
            tbl      TEXT NOT NULL,
            id       TEXT NOT NULL,
            revision INTEGER NOT NULL,
            PRIMARY KEY (tbl, id)
        );
        CREATE TABLE sync_quarantine (
            id     INTEGER PRIMARY KEY AUTOINCREMENT,
            ts_ms  INTEGER NOT NULL,
            kind   TEXT NOT NULL,
            tbl    TEXT NOT NULL,
            row_id TEXT NOT NULL,
            error  TEXT NOT NULL,
            row    TEXT
        );
        CREATE TABLE audit_log_next (
            id                INTEGER PRIMARY KEY AUTOINCREMENT,
            request_id        TEXT NOT NULL,
            ts_ms             INTEGER NOT NULL,
            key_id            TEXT,
            owner             TEXT,
            route             TEXT,
            upstream          TEXT,
            endpoint          TEXT,
            upstream_key_id   TEXT,
            method            TEXT NOT NULL,
            path              TEXT NOT NULL,
            status            INTEGER NOT NULL,
            model             TEXT,
            stream            INTEGER NOT NULL,
            ttfb_ms           REAL,
            duration_ms       REAL NOT NULL,
            request_bytes     INTEGER NOT NULL,
            response_bytes    INTEGER NOT NULL,
            chunks            INTEGER NOT NULL,
            prompt_tokens     INTEGER,
            completion_tokens INTEGER,
            retries           INTEGER NOT NULL,
            error             TEXT,
            client_ip         TEXT,
            user_agent        TEXT,
            request_headers   TEXT,
            response_headers  TEXT,
            request_body      TEXT,
            response_body     TEXT,
            user_id           TEXT,
            attempts          TEXT,
            usage_estimated   INTEGER NOT NULL DEFAULT 0
        );
        INSERT INTO audit_log_next SELECT id, request_id, ts_ms, key_id, owner, route, upstream, endpoint,
            upstream_key_id, method, path, status, model, stream, ttfb_ms, duration_ms, request_bytes,
            response_bytes, chunks, prompt_tokens, completion_tokens, retries, error, client_ip, user_agent,
            request_headers, response_headers, request_body, response_body, user_id, attempts, usage_estimated
            FROM audit_log;
        DROP TABLE audit_log;
        ALTER TABLE audit_log_next RENAME TO audit_log;
        CREATE INDEX audit_log_ts ON audit_log (ts_ms);
        CREATE INDEX audit_log_key_ts ON audit_log (key_id, ts_ms);
        CREATE INDEX audit_log_request_id ON audit_log (request_id);
        CREATE INDEX audit_log_user_id ON audit_log (user_id, id);
        DELETE FROM sqlite_sequence WHERE name = 'audit_log';
        INSERT INTO sqlite_sequence (name, seq) VALUES ('audit_log', max(
            coalesce((SELECT max(id) FROM audit_log), 0),
            coalesce((SELECT CAST(value AS INTEGER) FROM settings WHERE name = 'audit_shipped_id'), 0)));",
        ),
        // Per-minute totals for the admin's whole-gateway stats
        // (`store::rollup`). Rows already there are not rolled up; the
        // stats read them one by one, from before `audit_rollup_from_ms`.
        M::up(
            "CREATE TABLE audit_rollup (
            minute            INTEGER NOT NULL,
            route             TEXT NOT NULL,
            upstream          TEXT NOT NULL,
            model             TEXT NOT NULL,
            requests          INTEGER NOT NULL,
            errors            INTEGER NOT NULL,
            sum_ms            REAL NOT NULL,
            n_ttfb            INTEGER NOT NULL,
            sum_ttfb          REAL NOT NULL,
            prompt_tokens     INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            latency           BLOB NOT NULL,
            ttfb              BLOB NOT NULL,
            PRIMARY KEY (minute, route, upstream, model)
        ) WITHOUT ROWID;
        INSERT INTO settings (name, value)
            SELECT 'audit_rollup_from_ms', CAST(coalesce(max(ts_ms) + 1, 0) AS TEXT) FROM audit_log;",
        ),
        // A row's captured headers and bodies stay in its segment file
        // (`audit::captured`): the file (`<stream>/<segment>`) and the
        // record's offset. Rows from before keep theirs in the row.
        M::up(
            "ALTER TABLE audit_log ADD COLUMN captured_in TEXT;
            ALTER TABLE audit_log ADD COLUMN captured_at INTEGER;",
        ),
        // What each request cost (`pricing`), with the token parts it was
        // priced from; the per-minute totals carry the cost too.
        M::up(
            "ALTER TABLE audit_log ADD COLUMN cache_read_tokens INTEGER;
            ALTER TABLE audit_log ADD COLUMN cache_write_tokens INTEGER;
            ALTER TABLE audit_log ADD COLUMN reasoning_tokens INTEGER;
            ALTER TABLE audit_log ADD COLUMN cost REAL;
            ALTER TABLE audit_log ADD COLUMN price_version TEXT;
            ALTER TABLE audit_rollup ADD COLUMN cost REAL NOT NULL DEFAULT 0;",
        ),
        // A gateway key's budget in money (`budget`: JSON amount and period).
        M::up("ALTER TABLE gateway_keys ADD COLUMN budget TEXT;"),
    ])
});

/// How long a connection waits for another's lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Create the database file readable by this user only, if it is not
/// there: it holds password hashes, sealed keys and captured prompts, and
/// SQLite gives its `-wal` and `-shm` files the database's mode. An
/// existing file keeps the mode its operator gave it.
fn create_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Open (creating if needed) the database at `path` and bring its schema up to date.
pub fn open(path: &Path) -> Result<Connection, StoreError> {
    if let Some(dir) = path.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.display().to_string(),
            source,
        })?;
    }
    create_private(path).map_err(|source| StoreError::Create {
        path: path.display().to_string(),
        source,
    })?;
    let mut conn = Connection::open(path).map_err(|source| StoreError::Open {
        path: path.display().to_string(),
        source,
    })?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    MIGRATIONS.to_latest(&mut conn)?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    #[test]
    fn migrations_are_valid() {
        assert!(super::MIGRATIONS.validate().is_ok());
    }

    /// A new database and its write-ahead log are this user's only; an
    /// existing one keeps its mode.
    #[test]
    fn a_new_database_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("sub").join("a.db");
        let conn = super::open(&db).unwrap();
        conn.execute_batch("CREATE TABLE t (x); INSERT INTO t VALUES (1);")
            .unwrap();
        for f in ["a.db", "a.db-wal", "a.db-shm"] {
            let mode = std::fs::metadata(dir.path().join("sub").join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}: {mode:o}");
        }
        drop(conn);
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o640)).unwrap();
        drop(super::open(&db).unwrap());
        assert_eq!(std::fs::metadata(&db).unwrap().permissions().mode() & 0o777, 0o640);
    }

    /// A database whose audit log retention emptied before the upgrade:
    /// its next ids start above what was shipped, not at 1.
    #[test]
    fn audit_ids_start_above_the_shipped_watermark_after_the_upgrade() {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = rusqlite::Connection::open(dir.path().join("a.db")).unwrap();
        super::MIGRATIONS.to_version(&mut conn, 9).unwrap();
        conn.execute(
            "INSERT INTO settings (name, value) VALUES ('audit_shipped_id', '50')",
            [],
        )
        .unwrap();
        super::MIGRATIONS.to_latest(&mut conn).unwrap();
        let rec = super::audit::AuditRecord {
            request_id: "r".into(),
            method: "GET".into(),
            path: "/".into(),
            ..Default::default()
        };
        super::audit::insert_batch(&mut conn, &[rec]).unwrap();
        let id: i64 = conn
            .query_row("SELECT max(id) FROM audit_log", [], |r| r.get(0))
            .unwrap();
        assert_eq!(id, 51);
    }
}
