//! A real PostgreSQL for the tests: one server per test process, started on
//! first use on a free port (as the `postgres` user when the tests run as
//! root: initdb refuses root), and a database per test, owned by the
//! service's own database user, as in production. A test that stops
//! PostgreSQL starts a private server of its own.
//!
//! The binaries come from Debian's `postgresql` package
//! (`/usr/lib/postgresql/<version>/bin`); scripts/test.sh installs it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::redis_server::free_port;

/// The superuser's password (the server listens on loopback only).
const SUPERUSER_PASSWORD: &str = "inmail-tests-superuser";
/// The services' database users.
pub const ROLES: [&str; 2] = ["inmail_billing", "inmail_messaging"];

/// One PostgreSQL server.
pub struct PgServer {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    child: Option<Child>,
}

/// A database of one test, owned by a service's user.
#[derive(Debug, Clone)]
pub struct Database {
    pub name: String,
    pub port: u16,
    /// The owner (the service's user).
    pub role: String,
    pub password_file: PathBuf,
}

fn bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|dir| dir.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    versions.retain(|p| p.join("initdb").exists() && p.join("postgres").exists());
    versions.sort();
    versions.pop().expect(
        "PostgreSQL is not installed (/usr/lib/postgresql/*/bin): run ./scripts/test.sh, \
         which installs Debian's postgresql package, or apt-get install postgresql",
    )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `program` as the `postgres` user when we are root, else as ourselves;
/// `die_with_parent`: killed when the thread that started it ends.
fn as_postgres(program: &Path, die_with_parent: bool) -> Command {
    let mut command = Command::new("setpriv");
    if is_root() {
        command.args(["--reuid=postgres", "--regid=postgres", "--init-groups"]);
    }
    if die_with_parent {
        command.arg("--pdeathsig=KILL");
    }
    command.arg(program);
    command
}

impl PgServer {
    /// The server shared by every test of this process.
    pub fn shared() -> &'static PgServer {
        static SERVER: OnceLock<PgServer> = OnceLock::new();
        SERVER.get_or_init(|| {
            // Started from a thread that lives as long as the process, so
            // the server dies with the process (--pdeathsig) and not before.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let server = PgServer::start_blocking(true);
                tx.send(server)
                    .expect("the test process waits for PostgreSQL");
                loop {
                    std::thread::park();
                }
            });
            rx.recv().expect("PostgreSQL started")
        })
    }

    /// A server of the caller's own (to stop and start again); killed on
    /// drop.
    pub fn private() -> PgServer {
        PgServer::start_blocking(false)
    }

    fn start_blocking(die_with_parent: bool) -> PgServer {
        remove_stale_directories();
        let bin = bin_dir();
        let dir =
            std::env::temp_dir().join(format!("inmail-postgres-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the PostgreSQL directory");
        let pwfile = dir.join("superuser.password");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD).expect("write the superuser password");
        for role in ROLES {
            std::fs::write(dir.join(format!("{role}.password")), role_password(role))
                .expect("write a role's password");
        }
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&dir)
                .status()
                .expect("chown");
            assert!(status.success(), "chown {} to postgres", dir.display());
        }
        let output = as_postgres(&bin.join("initdb"), false)
            .arg("-D")
            .arg(dir.join("data"))
            .args([
                "-U",
                "postgres",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ])
            .arg(format!("--pwfile={}", pwfile.display()))
            .output()
            .expect("run initdb");
        assert!(
            output.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        // TLS as in production: the test PKI's certificate for PostgreSQL;
        // the services' users may connect over TLS only (the superuser, for
        // the tests' own inspection, either way).
        let data = dir.join("data");
        for (from, to) in [
            ("postgres.crt", "server.crt"),
            ("postgres.key", "server.key"),
        ] {
            std::fs::copy(crate::pki().file(from), data.join(to)).expect("copy the certificate");
        }
        std::fs::write(
            data.join("pg_hba.conf"),
            format!(
                "local all all trust\nhostssl all {} 127.0.0.1/32 scram-sha-256\n\
                 host all postgres 127.0.0.1/32 scram-sha-256\n",
                ROLES.join(",")
            ),
        )
        .expect("write pg_hba.conf");
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&data)
                .status()
                .expect("chown");
            assert!(status.success());
        }
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(
                data.join("server.key"),
                std::fs::Permissions::from_mode(0o600),
            )
            .expect("the key's mode");
        }
        let mut server = PgServer {
            port: free_port(),
            dir,
            bin,
            child: None,
        };
        server.spawn(die_with_parent);
        server.create_roles();
        server
    }

    fn spawn(&mut self, die_with_parent: bool) {
        let log = std::fs::File::create(self.dir.join("postgres.log")).expect("the server log");
        let child = as_postgres(&self.bin.join("postgres"), die_with_parent)
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-p")
            .arg(self.port.to_string())
            .arg("-k")
            .arg(&self.dir)
            .args([
                "-c",
                "ssl=on",
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "max_connections=400",
                "-c",
                "shared_buffers=32MB",
                // Tests stop the server only cleanly; fsync buys nothing here.
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the server log"))
            .stderr(log)
            .spawn()
            .expect("start postgres");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.ready() {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL did not start: {}",
                std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn ready(&self) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-q"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }

    fn psql(&self, database: &str, sql: &str) {
        let output = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args([
                "-U",
                "postgres",
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-q",
            ])
            .args(["-c", sql])
            .env("PGPASSWORD", SUPERUSER_PASSWORD)
            .output()
            .expect("run psql");
        assert!(
            output.status.success(),
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    fn create_roles(&self) {
        for role in ROLES {
            // Each service's user may log in and own its databases, nothing
            // more (no superuser, no creating roles or databases).
            self.psql(
                "postgres",
                &format!(
                    "CREATE ROLE {role} LOGIN PASSWORD '{}' NOSUPERUSER NOCREATEDB NOCREATEROLE",
                    role_password(role)
                ),
            );
        }
    }

    /// A new, empty database owned by `role`.
    pub fn database(&self, role: &str) -> Database {
        let name = format!("t_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        self.psql("postgres", &format!("CREATE DATABASE {name} OWNER {role}"));
        // Only its owner may connect.
        self.psql(
            "postgres",
            &format!("REVOKE ALL ON DATABASE {name} FROM PUBLIC"),
        );
        Database {
            name,
            port: self.port,
            role: role.to_string(),
            password_file: self.dir.join(format!("{role}.password")),
        }
    }

    /// Stops the server (a fast, clean shutdown) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    /// Starts a stopped server again, on the same port and data.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the server is running");
        self.spawn(false);
    }
}

/// Directories of servers whose test process is gone (the shared server
/// dies with its process, and a static is never dropped to remove its
/// directory): those with no live postmaster.
fn remove_stale_directories() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_ours = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("inmail-postgres-"));
        if !is_ours {
            continue;
        }
        let pid = std::fs::read_to_string(path.join("data/postmaster.pid"))
            .ok()
            .and_then(|text| text.lines().next().map(str::to_string));
        let running = pid.is_some_and(|pid| Path::new("/proc").join(pid.trim()).exists());
        // A directory without a pid file may be one being set up right now
        // by another test process: only an old one is stale.
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > Duration::from_secs(600));
        if !running && old {
            let _ = std::fs::remove_dir_all(&path);
        }
    }
}

fn role_password(role: &str) -> String {
    format!("{role}-test-password")
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Database {
    /// The service's flags for it.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--database-url".into(),
            self.url(),
            "--database-password-file".into(),
            self.password_file.to_string_lossy().into_owned(),
            "--database-ca-file".into(),
            crate::pki().file("ca.crt"),
        ]
    }

    /// The same as environment variables (for the binaries).
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("DATABASE_URL".into(), self.url()),
            (
                "DATABASE_PASSWORD_FILE".into(),
                self.password_file.to_string_lossy().into_owned(),
            ),
            ("DATABASE_CA_FILE".into(), crate::pki().file("ca.crt")),
        ]
    }

    /// `postgres://<role>@127.0.0.1:<port>/<name>` (the password is in
    /// `password_file`).
    pub fn url(&self) -> String {
        format!(
            "postgres://{}@127.0.0.1:{}/{}",
            self.role, self.port, self.name
        )
    }

    /// A connection as the superuser, to look at what the service stored.
    pub async fn inspect(&self) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(
            &format!(
                "host=127.0.0.1 port={} user=postgres password={SUPERUSER_PASSWORD} dbname={}",
                self.port, self.name
            ),
            tokio_postgres::NoTls,
        )
        .await
        .expect("connect to the test database");
        tokio::spawn(connection);
        client
    }
}
