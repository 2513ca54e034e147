//! A real Redis per test, on free ports, with AOF on (fsync always, as
//! shipped), in its own directory, so it can be killed and restarted with
//! its data: a single `redis-server`, or — with `INMAIL_TEST_REDIS=cluster` —
//! a Redis Cluster of three primaries, so the same tests run on both.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use inmail_shared::state::storage::{Redis, RedisConn, RedisSettings};

/// The redis-server binary: on PATH, or where Debian puts it.
pub fn redis_server_binary() -> PathBuf {
    find_binary("redis-server")
}

fn find_binary(name: &str) -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|p| p.join(name))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([PathBuf::from("/usr/bin").join(name), PathBuf::from("/usr/sbin").join(name)])
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{name} not found: install it (Debian: apt-get install -y redis-server), or run `bash .ci/run`")
        })
}

/// A port nobody listens on right now, for a server a test starts (Redis, a
/// service process, a metrics endpoint).
///
/// Ports come from one counter below the kernel's ephemeral range, not from
/// binding port 0: a port learnt from `bind(0)` and then closed goes back to
/// the ephemeral pool, where the kernel may hand it to any outgoing
/// connection or to another test's `bind(0)` before the server binds it
/// ("Address already in use" in a service that never served). The counter
/// gives each call of this test process another port, and connections never
/// draw from below the range. When the range leaves no room below it, this
/// falls back to `bind(0)`.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const SPAN: u32 = TEST_PORTS.end - TEST_PORTS.start;
    if ephemeral_low() < TEST_PORTS.end + CLUSTER_BUS_OFFSET as u32 {
        return std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
    }
    // Start where another test process (the cluster run after the single
    // one, a bench beside the tests) is unlikely to be.
    let _ = NEXT.compare_exchange(
        0,
        1 + std::process::id().wrapping_mul(7919) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let port = (TEST_PORTS.start + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {TEST_PORTS:?}");
}

/// Where [`free_port`] takes ports from: below the usual ephemeral range
/// (32768–60999) together with a cluster node's bus port (+10000).
const TEST_PORTS: std::ops::Range<u32> = 12_000..22_000;
const CLUSTER_BUS_OFFSET: u16 = 10_000;

/// The low end of the kernel's ephemeral port range (Linux), 32768 when it
/// cannot be read.
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A port for a cluster node: it and its cluster bus port (+10000) are free.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port <= 55_000
            && std::net::TcpListener::bind(("127.0.0.1", port + CLUSTER_BUS_OFFSET)).is_ok()
        {
            return port;
        }
    }
}

/// Whether this test run uses a Redis Cluster.
pub fn cluster_mode() -> bool {
    std::env::var("INMAIL_TEST_REDIS").is_ok_and(|v| v == "cluster")
}

/// For a test that needs a single Redis (a replica, INFO commandstats of one
/// node, a script blocking the one Redis): `scripts/test.sh` skips it on the
/// cluster run and names it in its summary; run there anyway, it fails
/// instead of passing without testing anything.
pub fn single_redis_only() {
    assert!(
        !cluster_mode(),
        "this test needs a single Redis; scripts/test.sh skips it on the cluster run"
    );
}

struct Node {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// The primary's port, for a replica.
    replica_of: Option<u16>,
}

pub struct RedisServer {
    nodes: Vec<Node>,
    dir: PathBuf,
    cluster: bool,
}

impl RedisServer {
    /// A single Redis, or a cluster when `INMAIL_TEST_REDIS=cluster`.
    pub async fn start() -> Self {
        if cluster_mode() {
            Self::start_cluster(3).await
        } else {
            Self::start_single().await
        }
    }

    pub async fn start_single() -> Self {
        let dir = new_dir();
        for _ in 0..5 {
            let mut node = Node {
                port: free_port(),
                dir: dir.clone(),
                child: None,
                replica_of: None,
            };
            if node.spawn(false).await {
                return Self {
                    nodes: vec![node],
                    dir,
                    cluster: false,
                };
            }
        }
        panic!(
            "redis-server did not start; see {}",
            dir.join("redis.log").display()
        );
    }

    /// A replica of this (single) Redis, in its own directory, once its
    /// link to the primary is up.
    pub async fn start_replica(&self) -> RedisServer {
        assert!(!self.cluster, "replicas of a single Redis only");
        let primary = self.nodes[0].port;
        let dir = new_dir();
        for _ in 0..5 {
            let mut node = Node {
                port: free_port(),
                dir: dir.clone(),
                child: None,
                replica_of: None,
            };
            node.replica_of = Some(primary);
            if node.spawn(false).await {
                let replica = Self {
                    nodes: vec![node],
                    dir,
                    cluster: false,
                };
                replica.wait_replication_link().await;
                return replica;
            }
        }
        panic!(
            "the replica did not start; see {}",
            dir.join("redis.log").display()
        );
    }

    /// Waits until this replica's link to its primary is up (after a start,
    /// or after its primary restarted).
    pub async fn wait_replication_link(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        let client = redis::Client::open(self.nodes[0].url()).unwrap();
        let mut conn = client.get_multiplexed_async_connection().await.unwrap();
        loop {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut conn)
                .await
                .unwrap();
            if info.contains("master_link_status:up") {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the replica never linked to its primary: {info}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The pid of the (first) node's process.
    pub fn pid(&self) -> u32 {
        self.nodes[0].child.as_ref().expect("running").id()
    }

    /// SIGSTOP every node: the processes stay, their sockets stay open, and
    /// nothing is answered (a stalled machine) until [`RedisServer::resume`].
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// SIGCONT every node paused by [`RedisServer::pause`].
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        for node in &self.nodes {
            let pid = node.child.as_ref().expect("running").id();
            let status = Command::new("kill")
                .args([signal, &pid.to_string()])
                .status()
                .expect("run kill");
            assert!(status.success(), "kill {signal} {pid}");
        }
    }

    pub async fn start_cluster(primaries: usize) -> Self {
        let dir = new_dir();
        let mut nodes = Vec::new();
        for i in 0..primaries {
            let node_dir = dir.join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            let mut started = None;
            for _ in 0..10 {
                let mut node = Node {
                    port: free_cluster_port(),
                    dir: node_dir.clone(),
                    child: None,
                    replica_of: None,
                };
                if node.spawn(true).await {
                    started = Some(node);
                    break;
                }
            }
            nodes.push(started.unwrap_or_else(|| panic!("cluster node {i} did not start")));
        }
        // What `redis-cli --cluster create` does, without its one-second
        // waits: split the slots, introduce the nodes, wait for "ok".
        let per_node = 16384 / nodes.len();
        for (i, node) in nodes.iter().enumerate() {
            let first = i * per_node;
            let last = if i + 1 == nodes.len() {
                16383
            } else {
                first + per_node - 1
            };
            let client = redis::Client::open(node.url()).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let () = redis::cmd("CLUSTER")
                .arg("ADDSLOTSRANGE")
                .arg(first)
                .arg(last)
                .query_async(&mut conn)
                .await
                .expect("CLUSTER ADDSLOTSRANGE");
            let () = redis::cmd("CLUSTER")
                .arg("SET-CONFIG-EPOCH")
                .arg(i + 1)
                .query_async(&mut conn)
                .await
                .expect("CLUSTER SET-CONFIG-EPOCH");
        }
        let client = redis::Client::open(nodes[0].url()).unwrap();
        let mut first = client.get_multiplexed_async_connection().await.unwrap();
        for node in &nodes[1..] {
            let () = redis::cmd("CLUSTER")
                .arg("MEET")
                .arg("127.0.0.1")
                .arg(node.port)
                .query_async(&mut first)
                .await
                .expect("CLUSTER MEET");
        }
        let server = Self {
            nodes,
            dir,
            cluster: true,
        };
        server.wait_cluster_ok().await;
        server
    }

    async fn wait_cluster_ok(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        for node in &self.nodes {
            loop {
                let info: Option<String> = async {
                    let client = redis::Client::open(node.url()).ok()?;
                    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
                    redis::cmd("CLUSTER")
                        .arg("INFO")
                        .query_async(&mut conn)
                        .await
                        .ok()
                }
                .await;
                if info.is_some_and(|i| i.contains("cluster_state:ok")) {
                    break;
                }
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the cluster never became ok"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    pub fn is_cluster(&self) -> bool {
        self.cluster
    }

    /// REDIS_URL for the services (comma-separated nodes for a cluster).
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(Node::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The flags that point a service at this Redis.
    pub fn service_args(&self) -> Vec<String> {
        let mut args = vec!["--redis-url".to_string(), self.url()];
        if self.cluster {
            args.push("--redis-cluster".into());
        }
        args
    }

    /// The environment that points a service binary at this Redis.
    pub fn service_env(&self) -> Vec<(String, String)> {
        vec![
            ("REDIS_URL".into(), self.url()),
            ("REDIS_CLUSTER".into(), self.cluster.to_string()),
        ]
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// SIGKILL every node: no shutdown, no final fsync beyond what AOF did.
    pub fn kill(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }

    /// Starts every node again on its port, from its AOF.
    pub async fn restart(&mut self) {
        self.kill();
        let cluster = self.cluster;
        for node in &mut self.nodes {
            let mut started = false;
            for _ in 0..50 {
                if node.spawn(cluster).await {
                    started = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert!(
                started,
                "redis-server did not restart on port {}",
                node.port
            );
        }
        if cluster {
            self.wait_cluster_ok().await;
        }
    }

    /// A handle routing key commands the way the services do.
    pub async fn conn(&self) -> RedisConn {
        let settings = RedisSettings {
            cluster: self.cluster,
            ..RedisSettings::new(self.url())
        };
        Redis::open(&settings).expect("open the test Redis").conn()
    }

    /// Runs a command on every node (e.g. SCRIPT FLUSH, CONFIG SET).
    pub async fn on_every_node(&self, command: &redis::Cmd) {
        for node in &self.nodes {
            let client = redis::Client::open(node.url()).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let _: redis::Value = command.query_async(&mut conn).await.unwrap();
        }
    }

    /// A digest of every node's data, to show a call changed nothing: each
    /// key's name, value (DEBUG DIGEST-VALUE) and expiry, in key order. The
    /// sweepers' group registrations (`*:sweepers`), which the replicas
    /// renew every round whatever the calls do, are left out.
    pub async fn digest(&self) -> String {
        let mut digests = Vec::new();
        for node in &self.nodes {
            let client = redis::Client::open(node.url()).unwrap();
            let mut conn = client.get_multiplexed_async_connection().await.unwrap();
            let mut keys: Vec<String> = Vec::new();
            let mut cursor = 0u64;
            loop {
                let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await
                    .expect("SCAN");
                keys.extend(batch.into_iter().filter(|k| !k.ends_with(":sweepers")));
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
            keys.sort_unstable();
            keys.dedup();
            let mut node_digest = Vec::with_capacity(keys.len());
            for key in &keys {
                let (value, expiry): (Vec<String>, i64) = redis::pipe()
                    .cmd("DEBUG")
                    .arg("DIGEST-VALUE")
                    .arg(key)
                    .cmd("PEXPIRETIME")
                    .arg(key)
                    .query_async(&mut conn)
                    .await
                    .expect("DEBUG DIGEST-VALUE");
                node_digest.push(format!("{key}={}@{expiry}", value.join("")));
            }
            digests.push(node_digest.join(";"));
        }
        digests.join(",")
    }

    /// Ports of the nodes (the pid of a node's process is found by its port).
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }
}

impl Node {
    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self, cluster: bool) -> bool {
        let mut command = Command::new(redis_server_binary());
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&self.dir)
            .args(crate::pki().redis_user_args())
            .args([
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--maxmemory-policy",
                "noeviction",
                "--enable-debug-command",
                "yes",
                "--protected-mode",
                "no",
                "--logfile",
                "redis.log",
            ]);
        if let Some(primary) = self.replica_of {
            command
                .arg("--replicaof")
                .arg("127.0.0.1")
                .arg(primary.to_string());
        }
        if cluster {
            command.args([
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
            ]);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                self.child = None;
                return false;
            }
            if self.ping().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    async fn ping(&self) -> bool {
        let Ok(client) = redis::Client::open(self.url()) else {
            return false;
        };
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
            return false;
        };
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .is_ok()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn new_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("inmail-redis-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("create the Redis directory");
    dir
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
