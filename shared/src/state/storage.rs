//! The Redis connection every service uses, on a single Redis or a Redis
//! Cluster.
//!
//! Single: one multiplexed connection (ConnectionManager; docs/performance.md: a
//! pool does not add throughput) that reconnects by itself. Cluster: the
//! redis-rs cluster client, which routes each command by its key's slot.
//! Both dial lazily and use short timeouts, so a service starts while Redis
//! is down and calls fail fast with UNAVAILABLE until it is back.
//!
//! A service holds three such connections: one for commands (writes,
//! reads, sweeps, page tokens, health), one for list pages ([`Redis::bulk`])
//! and, with replicas configured, one for `WAIT` ([`Replication`]). A
//! connection only notices that Redis went away when it is used, so after
//! a failure health checks every connection ([`Redis::check`]), and the
//! `WAIT` connection, which writes nothing lasting, sends its commands again
//! once when its connection failed.
//!
//! Every script touches the keys of one hash tag (one slot). Commands that
//! touch several slots go in a [`Batch`]: one pipeline on a single Redis
//! (Redis runs it in order), one command after the other on a cluster (a
//! cluster pipeline must stay in one slot). Either way they run in order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, FromRedisValue, Pipeline, RedisFuture, Script, Value};
use tokio::sync::{mpsc, oneshot};

use crate::contract::error::ApiError;

/// How to reach Redis.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// One URL, or for a cluster the comma-separated URLs of some of its nodes.
    pub url: String,
    /// Whether `url` names Redis Cluster nodes.
    pub cluster: bool,
    /// Bound on establishing a connection.
    pub connect_timeout: Duration,
    /// Bound on any single command or script.
    pub response_timeout: Duration,
    /// Replicas that must have a write before it is acknowledged (WAIT);
    /// 0: acknowledged once the primary has it.
    pub min_replicas: u32,
    /// How long a write waits for them before it is answered UNAVAILABLE.
    pub replica_timeout: Duration,
    /// The Redis user (ACL) the service connects as, and its password.
    pub username: Option<String>,
    pub password: Option<String>,
}

impl RedisSettings {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            cluster: false,
            connect_timeout: Duration::from_millis(500),
            response_timeout: Duration::from_secs(2),
            min_replicas: 0,
            replica_timeout: Duration::from_millis(500),
            username: None,
            password: None,
        }
    }
}

/// A connection to run commands on: a single Redis or a cluster. Every
/// command answered through it is noted (see [`Redis::answered_within`]).
/// Commands of one read batch in flight at once on a cluster
/// ([`Redis::read_bulk`]).
pub const READ_FANOUT: usize = 64;

#[derive(Clone)]
pub struct RedisConn {
    link: Link,
    answered: Answered,
}

#[derive(Clone)]
enum Link {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// When Redis last answered a command of this service (ms since the
/// process's first look at the clock, 0: never), and how many commands
/// failed without an answer (I/O, timeouts). Shared by every connection of
/// a [`Redis`] and every clone.
#[derive(Clone, Default)]
struct Answered(Arc<Replies>);

#[derive(Default)]
struct Replies {
    last: AtomicU64,
    failures: AtomicU64,
    /// `failures` when every connection last answered a check.
    checked: AtomicU64,
}

fn process_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    // +1: a reply in the first millisecond is not "never".
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

impl Answered {
    fn note(&self) {
        self.0.last.fetch_max(process_ms(), Ordering::Relaxed);
    }

    fn within(&self, window: Duration) -> bool {
        let last = self.0.last.load(Ordering::Relaxed);
        last != 0 && process_ms().saturating_sub(last) <= window.as_millis() as u64
    }

    fn note_failure(&self) {
        self.0.failures.fetch_add(1, Ordering::Relaxed);
    }

    fn failures(&self) -> u64 {
        self.0.failures.load(Ordering::Relaxed)
    }

    /// Every connection answered a check that began after `failures`
    /// failures.
    fn note_checked(&self, failures: u64) {
        self.0.checked.fetch_max(failures, Ordering::Relaxed);
    }

    fn failed_since_check(&self) -> bool {
        self.failures() > self.0.checked.load(Ordering::Relaxed)
    }

    /// Notes a reply. An error reply (`-LOADING` from a Redis still
    /// loading its data, `-BUSY`, NOSCRIPT) comes as a value here, not an
    /// error: it is not Redis serving, so it is not noted.
    fn noted(&self, result: redis::RedisResult<Value>) -> redis::RedisResult<Value> {
        match &result {
            Ok(value) if !matches!(value, Value::ServerError(_)) => self.note(),
            Ok(_) => {}
            Err(_) => self.note_failure(),
        }
        result
    }

    fn noted_all(&self, result: redis::RedisResult<Vec<Value>>) -> redis::RedisResult<Vec<Value>> {
        match &result {
            Ok(values) if !values.iter().any(|v| matches!(v, Value::ServerError(_))) => self.note(),
            Ok(_) => {}
            Err(_) => self.note_failure(),
        }
        result
    }
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let answered = &self.answered;
        let reply = match &mut self.link {
            Link::Single(conn) => conn.req_packed_command(cmd),
            Link::Cluster(conn) => conn.req_packed_command(cmd),
        };
        Box::pin(async move { answered.noted(reply.await) })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let answered = &self.answered;
        let replies = match &mut self.link {
            Link::Single(conn) => conn.req_packed_commands(cmd, offset, count),
            Link::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        };
        Box::pin(async move { answered.noted_all(replies.await) })
    }

    fn get_db(&self) -> i64 {
        0
    }
}

/// A cheap-to-clone handle on the service's Redis.
#[derive(Clone)]
pub struct Redis {
    conn: RedisConn,
    bulk: RedisConn,
    url: String,
    /// Replicas a write waits for, on connections of their own.
    replication: Option<Arc<Replication>>,
}

/// Validates the URL(s) and prepares one connection without dialing.
fn connect(settings: &RedisSettings, answered: &Answered) -> Result<RedisConn, String> {
    Ok(RedisConn {
        link: link(settings)?,
        answered: answered.clone(),
    })
}

fn link(settings: &RedisSettings) -> Result<Link, String> {
    Ok(if settings.cluster {
        let nodes: Vec<&str> = settings.url.split(',').map(str::trim).collect();
        for node in &nodes {
            redis::Client::open(*node)
                .map_err(|e| format!("REDIS_URL {node:?} is not a valid Redis URL: {e}"))?;
        }
        let mut builder = redis::cluster::ClusterClient::builder(nodes)
            .connection_timeout(settings.connect_timeout)
            .response_timeout(settings.response_timeout)
            .retries(1);
        if let Some(username) = &settings.username {
            builder = builder.username(username);
        }
        if let Some(password) = &settings.password {
            builder = builder.password(password);
        }
        let client = builder
            .build()
            .map_err(|e| format!("REDIS_URL {:?}: {e}", settings.url))?;
        let config = redis::cluster::ClusterConfig::new()
            .set_connection_timeout(settings.connect_timeout)
            .set_response_timeout(settings.response_timeout);
        Link::Cluster(client.get_pending_async_connection_with_config(config))
    } else {
        use redis::IntoConnectionInfo;
        let info =
            settings.url.as_str().into_connection_info().map_err(|e| {
                format!("REDIS_URL {:?} is not a valid Redis URL: {e}", settings.url)
            })?;
        let mut credentials = info.redis_settings().clone();
        if let Some(username) = &settings.username {
            credentials = credentials.set_username(username);
        }
        if let Some(password) = &settings.password {
            credentials = credentials.set_password(password);
        }
        let client = redis::Client::open(info.set_redis_settings(credentials))
            .map_err(|e| format!("REDIS_URL {:?} is not a valid Redis URL: {e}", settings.url))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.connect_timeout))
            .set_response_timeout(Some(settings.response_timeout))
            // Few, quick reconnection attempts: a caller waits on them,
            // and the next call starts a fresh attempt anyway.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(200));
        Link::Single(
            ConnectionManager::new_lazy_with_config(client, config)
                .map_err(|e| format!("cannot prepare the Redis connection: {e}"))?,
        )
    })
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("url", &self.url)
            .field("cluster", &self.is_cluster())
            .finish()
    }
}

impl Redis {
    /// Validates the URL(s) and prepares the connection without dialing: a
    /// service starts (and reports NOT_SERVING) even while Redis is down.
    /// Needs a Tokio runtime.
    pub fn open(settings: &RedisSettings) -> Result<Self, String> {
        let answered = Answered::default();
        let replication = if settings.min_replicas > 0 {
            // WAIT holds its connection up to the replica timeout: a reply
            // within it is not late.
            let wait_link = RedisSettings {
                response_timeout: settings.response_timeout + settings.replica_timeout,
                ..settings.clone()
            };
            Some(Arc::new(Replication {
                replicas: settings.min_replicas,
                timeout: settings.replica_timeout,
                link: connect(&wait_link, &answered)?,
                lanes: Mutex::default(),
                slots: tokio::sync::Mutex::default(),
            }))
        } else {
            None
        };
        Ok(Self {
            conn: connect(settings, &answered)?,
            bulk: connect(settings, &answered)?,
            url: settings
                .url
                .split(',')
                .map(redacted)
                .collect::<Vec<_>>()
                .join(","),
            replication,
        })
    }

    /// With replicas configured, waits until enough of them have every write
    /// made so far on the primary of each of `keys` (`WAIT`, on a connection
    /// of its own: see [`Replication`]); answers UNAVAILABLE `NOT_REPLICATED`
    /// when they do not within the timeout. The write stays on the primary:
    /// a retry of the same request answers its outcome once the replicas
    /// caught up. Without replicas configured, does nothing.
    pub async fn acknowledge(&self, keys: &[&str]) -> Result<(), ApiError> {
        let Some(replication) = &self.replication else {
            return Ok(());
        };
        replication.acknowledge(keys).await
    }

    /// A handle to run commands on; clones share the connection(s).
    pub fn conn(&self) -> RedisConn {
        self.conn.clone()
    }

    /// The connection(s) for reads whose replies may be large (list pages),
    /// apart from the one money writes and health use, so a large reply never
    /// queues them.
    pub fn bulk(&self) -> RedisConn {
        self.bulk.clone()
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self.conn.link, Link::Cluster(_))
    }

    /// The URL without its password, for logs.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs the commands of `batch` in order and answers the results of those
    /// not marked ignored, like a pipeline would. When Redis answers NOSCRIPT
    /// (its script cache was flushed, or it restarted) the batch's scripts
    /// are loaded and the command runs once more, so every command of a batch
    /// must be safe to run twice.
    pub async fn run<T: FromRedisValue>(&self, batch: &Batch<'_>) -> Result<T, ApiError> {
        Self::run_on(self.conn(), batch).await
    }

    /// [`Redis::run`] on the [`Redis::bulk`] connection.
    pub async fn run_bulk<T: FromRedisValue>(&self, batch: &Batch<'_>) -> Result<T, ApiError> {
        Self::run_on(self.bulk(), batch).await
    }

    /// [`Redis::run_bulk`] for a batch of reads only. On a cluster, where a
    /// batch cannot be one pipeline (its keys live on several nodes), its
    /// commands go out together, at most [`READ_FANOUT`] in flight, instead
    /// of one round trip each; they may then run in any order, which is why
    /// a batch that writes never comes here. On one Redis it is the same
    /// pipeline as `run_bulk`. The replies come back in the batch's order.
    pub async fn read_bulk<T: FromRedisValue>(&self, batch: &Batch<'_>) -> Result<T, ApiError> {
        use futures_util::{StreamExt, TryStreamExt};
        let conn = self.bulk();
        if matches!(conn.link, Link::Single(_)) {
            return Self::run_on(conn, batch).await;
        }
        let mut reads = Vec::with_capacity(batch.cmds.len());
        for (cmd, ignored) in &batch.cmds {
            reads.push(Self::read_one(conn.clone(), batch, cmd, *ignored));
        }
        let values: Vec<Option<Value>> = futures_util::stream::iter(reads)
            .buffered(READ_FANOUT)
            .try_collect()
            .await?;
        let values = values.into_iter().flatten().collect();
        Ok(T::from_redis_value(Value::Array(values)).map_err(redis::RedisError::from)?)
    }

    /// One command of a read batch (`None`: its reply is dropped).
    async fn read_one(
        mut conn: RedisConn,
        batch: &Batch<'_>,
        cmd: &Cmd,
        ignored: bool,
    ) -> Result<Option<Value>, ApiError> {
        let value = match cmd.query_async::<Value>(&mut conn).await {
            Err(err) if is_noscript(&err) => {
                batch.load_scripts(&mut conn).await?;
                cmd.query_async::<Value>(&mut conn).await?
            }
            other => other?,
        };
        Ok((!ignored).then_some(value))
    }

    async fn run_on<T: FromRedisValue>(
        mut conn: RedisConn,
        batch: &Batch<'_>,
    ) -> Result<T, ApiError> {
        if matches!(conn.link, Link::Single(_)) {
            let mut pipe = redis::pipe();
            for (cmd, ignored) in &batch.cmds {
                pipe.add_command(cmd.clone());
                if *ignored {
                    pipe.ignore();
                }
            }
            return match pipe.query_async(&mut conn).await {
                Err(err) if is_noscript(&err) => {
                    batch.load_scripts(&mut conn).await?;
                    Ok(pipe.query_async(&mut conn).await?)
                }
                other => Ok(other?),
            };
        }
        let mut values = Vec::with_capacity(batch.cmds.len());
        for (cmd, ignored) in &batch.cmds {
            let value = match cmd.query_async::<Value>(&mut conn).await {
                Err(err) if is_noscript(&err) => {
                    batch.load_scripts(&mut conn).await?;
                    cmd.query_async::<Value>(&mut conn).await?
                }
                other => other?,
            };
            if !ignored {
                values.push(value);
            }
        }
        Ok(T::from_redis_value(Value::Array(values)).map_err(redis::RedisError::from)?)
    }

    /// One SCAN step over every key matching `pattern`. The cursor is opaque:
    /// on a cluster it also says which primary is being scanned (primaries
    /// in address order). Answers the next cursor ("0" when done) and keys.
    pub async fn scan(
        &self,
        cursor: &str,
        pattern: &str,
        count: usize,
    ) -> Result<(String, Vec<String>), ApiError> {
        let mut conn = self.conn();
        match &mut conn.link {
            Link::Single(single) => {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(count)
                    .query_async(single)
                    .await?;
                Ok((next.to_string(), keys))
            }
            Link::Cluster(cluster) => {
                let primaries = cluster_primaries(cluster).await?;
                let (mut node, mut node_cursor) = match cursor.split_once(':') {
                    Some((node, c)) => (node.parse::<usize>().unwrap_or(0), c.to_string()),
                    None => (0, "0".to_string()),
                };
                let Some((host, port)) = primaries.get(node).cloned() else {
                    return Ok(("0".into(), Vec::new()));
                };
                let mut scan = redis::cmd("SCAN");
                scan.arg(&node_cursor)
                    .arg("MATCH")
                    .arg(pattern)
                    .arg("COUNT")
                    .arg(count);
                let routing =
                    RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
                let value = cluster.route_command(scan, routing).await?;
                let (next, keys): (u64, Vec<String>) =
                    FromRedisValue::from_redis_value(value).map_err(redis::RedisError::from)?;
                node_cursor = next.to_string();
                if next == 0 {
                    node += 1;
                    if node >= primaries.len() {
                        return Ok(("0".into(), keys));
                    }
                }
                Ok((format!("{node}:{node_cursor}"), keys))
            }
        }
    }

    /// Whether Redis answered a command of this service (on any of its
    /// connections) within `window`.
    pub fn answered_within(&self, window: Duration) -> bool {
        self.conn.answered.within(window)
    }

    pub async fn ping(&self) -> Result<(), ApiError> {
        ping(self.conn()).await.map_err(ApiError::from)
    }

    /// Whether a command failed without an answer, on any connection, since
    /// every connection last answered [`Redis::check`]: a connection only
    /// learns that Redis went away when it is used, and one that failed
    /// answers its next command with that failure while it dials again.
    pub fn needs_check(&self) -> bool {
        self.conn.answered.failed_since_check()
    }

    /// Pings every connection that commands and list pages go on (on a
    /// cluster, every primary of each), so each one is dialed again before
    /// health says Redis is back; a connection that answers with the failure
    /// of its last use is pinged once more, once it dialed again. The `WAIT`
    /// connection sends its own commands again instead ([`Replication`]):
    /// a ping there would queue behind a `WAIT`.
    pub async fn check(&self) -> Result<(), ApiError> {
        let failures = self.conn.answered.failures();
        let (conn, bulk) = tokio::join!(ping_again(self.conn()), ping_again(self.bulk()));
        conn.and(bulk).map_err(ApiError::from)?;
        self.conn.answered.note_checked(failures);
        Ok(())
    }
}

async fn ping(mut conn: RedisConn) -> redis::RedisResult<()> {
    redis::cmd("PING")
        .query_async::<Value>(&mut conn)
        .await
        .map(|_| ())
}

/// [`ping`], and once more when the connection had failed (the second
/// waits for the connection the first one's failure started).
async fn ping_again(conn: RedisConn) -> redis::RedisResult<()> {
    match ping(conn.clone()).await {
        Err(err) if is_connection_error(&err) => ping(conn).await,
        other => other,
    }
}

/// The connection failed (or could not be made): nothing was answered, and
/// the connection dials again.
fn is_connection_error(err: &redis::RedisError) -> bool {
    err.is_io_error() || err.is_connection_dropped() || err.is_connection_refusal()
}

/// Waits for replicas on connection(s) of its own: Redis blocks the
/// connection a `WAIT` is sent on until the replicas answer or the timeout
/// passes, so on the shared connection a lagging replica would hold every
/// command queued behind it (health pings, reads, other members' writes).
///
/// `WAIT` counts the replicas that have the last write *of its own
/// connection*, so the `WAIT` connection first makes a write of its own on
/// the primary (a key set and deleted: [`REPLICATION_MARKER`]), after every
/// write the caller made there. One lane per primary sends the marker and
/// `WAIT` for every caller that arrived since its last `WAIT` (a group
/// commit): callers never queue one `WAIT` behind another's timeout, and a
/// caller waits at most the replica timeout.
struct Replication {
    replicas: u32,
    timeout: Duration,
    /// The connection(s) `WAIT` goes on; on a cluster one per primary.
    link: RedisConn,
    /// The lane of each primary ("host:port"; "" on a single Redis).
    lanes: Mutex<HashMap<String, mpsc::UnboundedSender<Waiter>>>,
    /// Cluster: which primary serves which slots, learnt with CLUSTER SLOTS
    /// on first use and again after a failure.
    slots: tokio::sync::Mutex<Option<Vec<SlotRange>>>,
}

/// A caller waiting for the replicas to have its writes to `key`'s primary.
struct Waiter {
    key: String,
    reply: oneshot::Sender<Result<i64, redis::RedisError>>,
}

/// Slots `first..=last` and their primary.
#[derive(Clone, Debug)]
struct SlotRange {
    first: u16,
    last: u16,
    host: String,
    port: u16,
}

/// KEYS[1]: a key nothing else uses, in the slot of the writes to confirm.
/// Sets and deletes it, so nothing stays; both are replicated, which makes
/// this connection's last write (what `WAIT` waits for) come after every
/// write made on the primary before.
const REPLICATION_MARKER: &str =
    "redis.call('SET', KEYS[1], '1') redis.call('DEL', KEYS[1]) return 1";

/// A caller waits this much past the replica timeout for its lane's
/// answer (the `WAIT` itself returns at the timeout).
const LANE_GRACE: Duration = Duration::from_millis(200);

impl Replication {
    async fn acknowledge(&self, keys: &[&str]) -> Result<(), ApiError> {
        let mut waits = Vec::new();
        for (lane, key) in self.lanes_of(keys).await? {
            let (reply, answer) = oneshot::channel();
            self.lane(&lane).send(Waiter { key, reply }).map_err(|_| {
                ApiError::unavailable(
                    crate::contract::reasons::STORAGE_UNAVAILABLE,
                    "the replica wait stopped",
                )
            })?;
            waits.push(answer);
        }
        let deadline = tokio::time::Instant::now() + self.timeout + LANE_GRACE;
        let mut acked = i64::MAX;
        for answer in waits {
            acked = acked.min(match tokio::time::timeout_at(deadline, answer).await {
                Ok(Ok(Ok(n))) => n,
                Ok(Ok(Err(err))) => {
                    // A primary moved or went away (a failover).
                    self.forget_slots().await;
                    return Err(err.into());
                }
                // The lane's WAIT began after the caller's, or it stopped.
                Ok(Err(_)) | Err(_) => 0,
            });
        }
        if acked < i64::from(self.replicas) {
            let (replicas, timeout) = (self.replicas, self.timeout);
            return Err(ApiError::unavailable(
                crate::contract::reasons::NOT_REPLICATED,
                format!(
                    "the write reached {acked} of the {replicas} replica(s) it needs within {timeout:?}; retry the same request"
                ),
            ));
        }
        Ok(())
    }

    /// The lane of each primary serving `keys`, with a key of that primary.
    async fn lanes_of(&self, keys: &[&str]) -> Result<Vec<(String, String)>, ApiError> {
        let Some(key) = keys.first() else {
            return Ok(Vec::new());
        };
        let mut link = self.link.clone();
        let Link::Cluster(cluster) = &mut link.link else {
            return Ok(vec![(String::new(), (*key).to_string())]);
        };
        let mut slots = self.slots.lock().await;
        if slots.is_none() {
            *slots = Some(cluster_slots(cluster).await?);
        }
        let ranges = slots.as_ref().expect("learnt above");
        let mut lanes: Vec<(String, String)> = Vec::new();
        for key in keys {
            let slot = hash_slot(key);
            let Some(range) = ranges.iter().find(|r| r.first <= slot && slot <= r.last) else {
                *slots = None;
                return Err(ApiError::unavailable(
                    crate::contract::reasons::STORAGE_UNAVAILABLE,
                    format!("no primary serves slot {slot}"),
                ));
            };
            let lane = format!("{}:{}", range.host, range.port);
            if !lanes.iter().any(|(l, _)| *l == lane) {
                lanes.push((lane, (*key).to_string()));
            }
        }
        Ok(lanes)
    }

    /// The lane of `primary`, started on first use.
    fn lane(&self, primary: &str) -> mpsc::UnboundedSender<Waiter> {
        let mut lanes = self.lanes.lock().unwrap();
        if let Some(lane) = lanes.get(primary)
            && !lane.is_closed()
        {
            return lane.clone();
        }
        let (sender, receiver) = mpsc::unbounded_channel();
        let address = primary.rsplit_once(':').and_then(|(host, port)| {
            Some(SingleNodeRoutingInfo::ByAddress {
                host: host.to_string(),
                port: port.parse().ok()?,
            })
        });
        tokio::spawn(run_lane(
            self.link.clone(),
            address,
            self.replicas,
            self.timeout,
            receiver,
        ));
        lanes.insert(primary.to_string(), sender.clone());
        sender
    }

    /// Forgets the slot map after a failure (a failover moves primaries).
    async fn forget_slots(&self) {
        if matches!(self.link.link, Link::Cluster(_)) {
            *self.slots.lock().await = None;
        }
    }
}

/// One primary's lane: the marker and `WAIT` for every waiter queued since
/// the last round, until every sender is gone.
async fn run_lane(
    mut link: RedisConn,
    address: Option<SingleNodeRoutingInfo>,
    replicas: u32,
    timeout: Duration,
    mut waiters: mpsc::UnboundedReceiver<Waiter>,
) {
    while let Some(first) = waiters.recv().await {
        let mut round = vec![first];
        while let Ok(next) = waiters.try_recv() {
            round.push(next);
        }
        round.retain(|w| !w.reply.is_closed());
        let Some(first) = round.first() else {
            continue;
        };
        let mut result =
            wait_for_replicas(&mut link, &address, &first.key, replicas, timeout).await;
        // The marker and WAIT leave nothing behind, so they may go again
        // once the connection that failed is dialed again.
        if let Err(err) = &result
            && is_connection_error(err)
            && !err.is_timeout()
        {
            result = wait_for_replicas(&mut link, &address, &first.key, replicas, timeout).await;
        }
        for waiter in round {
            let _ = waiter.reply.send(result.clone());
        }
    }
}

/// The marker on `key`'s primary, then `WAIT`: answers how many replicas
/// have every write made on that primary before.
async fn wait_for_replicas(
    link: &mut RedisConn,
    address: &Option<SingleNodeRoutingInfo>,
    key: &str,
    replicas: u32,
    timeout: Duration,
) -> redis::RedisResult<i64> {
    let mut pipe = redis::pipe();
    pipe.cmd("EVAL")
        .arg(REPLICATION_MARKER)
        .arg(1)
        .arg(marker_key(key))
        .cmd("WAIT")
        .arg(replicas)
        .arg(timeout.as_millis() as u64);
    let values = match (&mut link.link, address) {
        (Link::Cluster(cluster), Some(address)) => {
            let values = cluster.route_pipeline(pipe, 0, 2, address.clone()).await;
            link.answered.noted_all(values)?
        }
        _ => pipe.query_async::<Vec<Value>>(link).await?,
    };
    let mut values = values.into_iter();
    match (values.next(), values.next()) {
        (Some(marker), Some(acked)) => {
            i64::from_redis_value(marker).map_err(redis::RedisError::from)?;
            i64::from_redis_value(acked).map_err(redis::RedisError::from)
        }
        _ => Err(redis::RedisError::from((
            redis::ErrorKind::Client,
            "WAIT: missing reply",
        ))),
    }
}

/// The marker key for writes to `key`: its service's prefix (the only keys
/// its Redis user may write) and the hash tag that puts it in `key`'s slot
/// (every key has a hash tag on a cluster, or no braces at all).
fn marker_key(key: &str) -> String {
    let prefix = key.split_once(':').map_or(key, |(prefix, _)| prefix);
    let tag = hash_tag(key).unwrap_or(key);
    format!("{prefix}:replication-marker{{{tag}}}")
}

/// The part of `key` Redis Cluster hashes: the first non-empty `{...}`.
fn hash_tag(key: &str) -> Option<&str> {
    let open = key.find('{')?;
    let close = key[open + 1..].find('}')?;
    (close > 0).then(|| &key[open + 1..open + 1 + close])
}

/// The Redis Cluster slot of `key` (CRC16/XMODEM of its hash tag, mod 16384).
fn hash_slot(key: &str) -> u16 {
    let mut crc: u16 = 0;
    for byte in hash_tag(key).unwrap_or(key).bytes() {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

/// Every slot range of a cluster and its primary (CLUSTER SLOTS).
async fn cluster_slots(cluster: &mut ClusterConnection) -> Result<Vec<SlotRange>, ApiError> {
    let value = cluster
        .route_command(
            redis::cmd("CLUSTER").arg("SLOTS").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        )
        .await?;
    let Value::Array(ranges) = value else {
        return Err(ApiError::internal("unexpected CLUSTER SLOTS answer"));
    };
    let mut slots = Vec::new();
    for range in ranges {
        if let Value::Array(fields) = range
            && let (Some(first), Some(last), Some(Value::Array(node))) =
                (fields.first(), fields.get(1), fields.get(2))
            && let (Some(host), Some(port)) = (node.first(), node.get(1))
        {
            let number = |v: &Value| -> Result<u16, ApiError> {
                Ok(FromRedisValue::from_redis_value(v.clone()).map_err(redis::RedisError::from)?)
            };
            let host: String =
                FromRedisValue::from_redis_value(host.clone()).map_err(redis::RedisError::from)?;
            slots.push(SlotRange {
                first: number(first)?,
                last: number(last)?,
                host,
                port: number(port)?,
            });
        }
    }
    Ok(slots)
}

/// The primaries of a cluster, as (host, port), in address order.
async fn cluster_primaries(
    cluster: &mut ClusterConnection,
) -> Result<Vec<(String, u16)>, ApiError> {
    let mut primaries: Vec<(String, u16)> = cluster_slots(cluster)
        .await?
        .into_iter()
        .map(|range| (range.host, range.port))
        .collect();
    primaries.sort();
    primaries.dedup();
    Ok(primaries)
}

fn is_noscript(err: &redis::RedisError) -> bool {
    err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)
}

/// Commands (and scripts) to run in order; see [`Redis::run`].
#[derive(Default)]
pub struct Batch<'s> {
    cmds: Vec<(Cmd, bool)>,
    scripts: Vec<&'s Script>,
}

impl<'s> Batch<'s> {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a command whose result is answered.
    pub fn add(&mut self, cmd: Cmd) -> &mut Self {
        self.cmds.push((cmd, false));
        self
    }

    /// Adds a command whose result is dropped.
    pub fn add_ignored(&mut self, cmd: Cmd) -> &mut Self {
        self.cmds.push((cmd, true));
        self
    }

    /// Adds `EVALSHA <script> <keys> <args>`; its result is answered.
    pub fn script(&mut self, script: &'s Script, keys: &[String], args: Cmd) -> &mut Self {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(script.get_hash()).arg(keys.len()).arg(keys);
        for arg in args.args_iter() {
            if let redis::Arg::Simple(bytes) = arg {
                cmd.arg(bytes);
            }
        }
        self.scripts.push(script);
        self.cmds.push((cmd, false));
        self
    }

    async fn load_scripts(&self, conn: &mut (impl ConnectionLike + Send)) -> Result<(), ApiError> {
        for script in &self.scripts {
            script.load_async(conn).await?;
        }
        Ok(())
    }
}

/// The arguments of a script call, built like a command (`args().arg(..)`).
pub fn args() -> Cmd {
    Cmd::new()
}

fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_password_is_redacted() {
        assert_eq!(
            redacted("redis://user:secret@db:6379/0"),
            "redis://***@db:6379/0"
        );
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }

    #[tokio::test]
    async fn malformed_url_is_refused_with_a_clear_message() {
        let err = Redis::open(&RedisSettings::new("http://nope")).unwrap_err();
        assert!(err.contains("REDIS_URL"), "{err}");
        let cluster = RedisSettings {
            cluster: true,
            ..RedisSettings::new("redis://127.0.0.1:7000,nonsense")
        };
        assert!(Redis::open(&cluster).unwrap_err().contains("REDIS_URL"));
    }

    #[test]
    fn hash_slots_are_those_of_redis_cluster() {
        // CLUSTER KEYSLOT answers these.
        assert_eq!(hash_slot("foo"), 12182);
        assert_eq!(hash_slot("bar"), 5061);
        assert_eq!(hash_slot("123456789"), 12739);
        assert_eq!(hash_slot("{user1000}.following"), hash_slot("user1000"));
        assert_eq!(hash_slot("a{}b"), hash_slot("a{}b"));
        assert_ne!(hash_slot("a{}b"), hash_slot(""));
    }

    #[test]
    fn the_replication_marker_shares_the_prefix_and_slot_of_the_write() {
        for key in ["billing:{yan}:account", "plans:published", "messaging:{o3}"] {
            let marker = marker_key(key);
            assert_eq!(marker.split(':').next(), key.split(':').next(), "{marker}");
            assert_eq!(hash_slot(&marker), hash_slot(key), "{marker} for {key}");
            assert_ne!(marker, key);
        }
    }

    #[test]
    fn batch_scripts_keep_their_arguments_in_order() {
        let s = Script::new("return ARGV[1]");
        let mut batch = Batch::new();
        batch.script(&s, &["k".to_string()], {
            let mut a = args();
            a.arg("x").arg(7);
            a
        });
        let (cmd, ignored) = &batch.cmds[0];
        assert!(!ignored);
        let parts: Vec<Vec<u8>> = cmd
            .args_iter()
            .filter_map(|a| match a {
                redis::Arg::Simple(b) => Some(b.to_vec()),
                _ => None,
            })
            .collect();
        assert_eq!(parts[0], b"EVALSHA");
        assert_eq!(parts[2], b"1");
        assert_eq!(parts[3], b"k");
        assert_eq!(parts[4], b"x");
        assert_eq!(parts[5], b"7");
    }
}
