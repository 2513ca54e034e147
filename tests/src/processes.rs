//! The services as their real binaries, in child processes: for what only a
//! process can show (SIGKILL in the middle of sends, SIGTERM draining, the
//! command line, metrics endpoints).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::redis_server::{RedisServer, free_port};

/// A workspace binary, built next to the test executable (`cargo build
/// --workspace --bins` builds them; the README's test command does), or in
/// `INMAIL_BIN_DIR` when set (the bench, to compare another build).
pub fn binary(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("INMAIL_BIN_DIR") {
        let path = PathBuf::from(dir).join(name);
        assert!(
            path.is_file(),
            "{} is missing (INMAIL_BIN_DIR)",
            path.display()
        );
        return path;
    }
    let exe = std::env::current_exe().expect("test executable path");
    // Next to a binary (target/release/inmail-bench), or one level up from a
    // test (target/debug/deps/e2e-…).
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .collect();
    candidates.iter().find(|p| p.is_file()).cloned().unwrap_or_else(|| {
        panic!(
            "{} is missing: run `cargo build --workspace --bins` before the tests (the README's test command does)",
            candidates[candidates.len() - 1].display()
        )
    })
}

pub struct ServiceProcess {
    pub name: &'static str,
    pub addr: SocketAddr,
    env: Vec<(String, String)>,
    child: Option<Child>,
    log: PathBuf,
}

impl ServiceProcess {
    pub async fn start(name: &'static str, env: Vec<(String, String)>) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::env::temp_dir().join(format!(
            "inmail-{name}-{}.log",
            uuid::Uuid::new_v4().simple()
        ));
        let mut service = Self {
            name,
            addr,
            env,
            child: None,
            log,
        };
        service.spawn().await;
        service
    }

    /// Another process of the same binary with the same settings, on its
    /// own port: a replica.
    pub async fn replica(&self) -> Self {
        Self::start(self.name, self.env.clone()).await
    }

    /// Starts the binary without waiting for it to serve.
    pub fn spawn_only(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("service log file");
        let child = Command::new(binary(self.name))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("LISTEN_ADDR", self.addr.to_string())
            .env("LOG_LEVEL", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.name));
        self.child = Some(child);
    }

    async fn spawn(&mut self) {
        self.spawn_only();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let plaintext = self
                .env
                .iter()
                .any(|(k, v)| k == "INSECURE_PLAINTEXT" && v == "true");
            let health = if plaintext {
                crate::health_plaintext(self.addr).await
            } else {
                crate::health(self.addr).await
            };
            if matches!(health, Ok(crate::SERVING)) {
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "{} exited with {status} before serving:\n{}",
                    self.name,
                    self.logs()
                );
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} never became SERVING:\n{}",
                self.name,
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: the process dies wherever it is.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM: the process should drain and exit by itself.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits up to `within` for the process to exit.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Some(status);
            }
            if tokio::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Redis and the three binaries, wired by their environment variables.
pub struct ProcessStack {
    pub redis: RedisServer,
    pub plans: ServiceProcess,
    pub billing: ServiceProcess,
    pub messaging: ServiceProcess,
}

impl ProcessStack {
    /// `extra` applies to every service (e.g. METRICS_ADDR is per service:
    /// use `extra_for`).
    pub async fn start(extra_for: impl Fn(&str) -> Vec<(String, String)>) -> Self {
        Self::start_on(RedisServer::start().await, extra_for).await
    }

    /// The stack on a Redis of the caller's choosing.
    pub async fn start_on(
        redis: RedisServer,
        extra_for: impl Fn(&str) -> Vec<(String, String)>,
    ) -> Self {
        Self::start_with(redis, false, extra_for).await
    }

    /// The stack with TLS and authentication, or (`plaintext`) with
    /// INSECURE_PLAINTEXT on loopback (the bench's comparison).
    pub async fn start_with(
        redis: RedisServer,
        plaintext: bool,
        extra_for: impl Fn(&str) -> Vec<(String, String)>,
    ) -> Self {
        crate::init_logs();
        let base = |name: &str| {
            let mut env = redis.service_env();
            if plaintext {
                env.push(("INSECURE_PLAINTEXT".to_string(), "true".to_string()));
            } else {
                env.extend(crate::pki().service_env(name));
            }
            env.push(("TEST_CLOCK".to_string(), "true".to_string()));
            env.extend(extra_for(name));
            env
        };
        let scheme = if plaintext { "http" } else { "https" };
        let plans = ServiceProcess::start("subscription-plan", base("subscription-plan")).await;
        let mut billing_env = base("billing-credits");
        billing_env.push((
            "SUBSCRIPTION_PLAN_URL".into(),
            format!("{scheme}://{}", plans.addr),
        ));
        let billing = ServiceProcess::start("billing-credits", billing_env).await;
        let mut messaging_env = base("messaging");
        messaging_env.push((
            "SUBSCRIPTION_PLAN_URL".into(),
            format!("{scheme}://{}", plans.addr),
        ));
        messaging_env.push((
            "BILLING_CREDITS_URL".into(),
            format!("{scheme}://{}", billing.addr),
        ));
        let messaging = ServiceProcess::start("messaging", messaging_env).await;
        Self {
            redis,
            plans,
            billing,
            messaging,
        }
    }
}
