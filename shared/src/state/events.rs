//! Server-streamed events (WatchInbox, WatchBalance): what a service writes
//! to a member's Redis stream (`<prefix>:{M}:events`) is read by one
//! dispatcher task per process and handed to that member's watchers.
//!
//! The dispatcher is the only reader: it wakes every `poll`, reads the
//! notify streams (a writer appends the stream key it wrote to one of
//! [`NOTIFY_SHARDS`] after the event, in the same batch) and then the
//! streams of the watched members that were notified, with plain XRANGEs on
//! the service's own connection. Every rescan period it reads every watched
//! stream, whatever the notify streams said, a slice each poll (a notice
//! lost when a writer died between its two writes delays an event by at
//! most that): `rescan` (2 s), longer past [`RESCAN_RATE`] streams a second. So the
//! number of Redis connections and of Redis commands per poll does not grow
//! with the watchers of one member, and no watcher holds a connection or a
//! blocking read.
//!
//! Each watcher has a bounded buffer; events it has no room for wait in
//! Redis (it is handed them as it makes room: a resume's catch-up), and a
//! watcher that takes nothing for `slow_grace` while events wait is ended
//! (RESOURCE_EXHAUSTED, WATCH_BUFFER_FULL, with the resume token of the
//! last frame it was sent). A full watcher never slows the others.
//! Watches are bounded per member and per process, end with UNAVAILABLE
//! (SHUTTING_DOWN, with RetryInfo) when the server stops, and hold no
//! request-concurrency slot (the server's permit is released once the
//! handler answers the stream).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redis::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tonic_types::{ErrorDetails, StatusExt};

use crate::contract::error::ApiError;
use crate::contract::reasons;
use crate::state::storage::{Batch, Redis};
use crate::state::sweep::shard_of;

/// Shards of the notify stream (spread over cluster nodes).
pub const NOTIFY_SHARDS: u32 = 8;
/// Entries kept in each notify stream (a reader further behind than that
/// catches up at the next rescan).
pub const NOTIFY_MAXLEN: usize = 10_000;
/// Events read from one member's stream per poll.
const READ_BATCH: usize = 256;

/// The notify stream that announces writes to `stream_key`.
pub fn notify_key(prefix: &str, stream_key: &str) -> String {
    format!(
        "{prefix}:eventnotify:{{n{}}}",
        shard_of(stream_key, NOTIFY_SHARDS)
    )
}

/// The XADD that announces a write to `stream_key` (after the write).
pub fn notify_cmd(prefix: &str, stream_key: &str) -> redis::Cmd {
    redis::cmd("XADD")
        .arg(notify_key(prefix, stream_key))
        .arg("MAXLEN")
        .arg("~")
        .arg(NOTIFY_MAXLEN)
        .arg("*")
        .arg("k")
        .arg(stream_key)
        .clone()
}

/// The bounds of the events of one service.
#[derive(Debug, Clone)]
pub struct EventLimits {
    /// Watches open at once on this process for one member.
    pub max_per_member: usize,
    /// Watches open at once on this process.
    pub max_per_process: usize,
    /// Events buffered for one watcher; the rest wait in Redis.
    pub buffer: usize,
    /// A watcher whose buffer stays full (no event taken) this long is
    /// ended as too slow.
    pub slow_grace: Duration,
    /// A heartbeat frame after this long without one.
    pub heartbeat: Duration,
    /// How often the dispatcher looks for new events.
    pub poll: Duration,
    /// How often it reads every watched stream regardless of notices (at
    /// least: see [`rescan_period`]).
    pub rescan: Duration,
    /// How long events are kept (the writers trim older ones).
    pub retention: Duration,
    /// The most events kept per member (the writers trim the oldest).
    pub max_events: usize,
}

/// The watch settings of a service binary (flags with environment
/// variables).
#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// Watches one member may have open at once on one process.
    #[arg(long, env = "MAX_WATCHES_PER_MEMBER", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_watches_per_member: u32,
    /// Watches open at once on one process.
    #[arg(long, env = "MAX_WATCHES", default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_watches: u32,
    /// Events buffered for one watcher (the rest wait in Redis).
    #[arg(long, env = "WATCH_BUFFER", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..))]
    pub watch_buffer: u32,
    /// A watcher whose buffer stays full this long (it takes no event) is
    /// ended: RESOURCE_EXHAUSTED (WATCH_BUFFER_FULL) with its resume token.
    #[arg(long, env = "WATCH_SLOW_GRACE", default_value = "5s", value_parser = humantime::parse_duration)]
    pub watch_slow_grace: Duration,
    /// A heartbeat frame after this long without a frame.
    #[arg(long, env = "WATCH_HEARTBEAT", default_value = "15s", value_parser = humantime::parse_duration)]
    pub watch_heartbeat: Duration,
    /// How often the process looks for new events.
    #[arg(long, env = "WATCH_POLL", default_value = "50ms", value_parser = humantime::parse_duration)]
    pub watch_poll: Duration,
}

impl WatchArgs {
    pub fn limits(&self, retention: Duration, max_events: usize) -> EventLimits {
        EventLimits {
            max_per_member: self.max_watches_per_member as usize,
            max_per_process: self.max_watches as usize,
            buffer: self.watch_buffer as usize,
            slow_grace: self.watch_slow_grace,
            heartbeat: self.watch_heartbeat.max(Duration::from_millis(100)),
            poll: self.watch_poll.max(Duration::from_millis(5)),
            rescan: Duration::from_secs(2),
            retention,
            max_events,
        }
    }
}

/// A stream id (`<ms>-<seq>`), ordered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct StreamId(pub u64, pub u64);

impl StreamId {
    pub fn parse(text: &str) -> Option<Self> {
        let (ms, seq) = text.split_once('-')?;
        Some(Self(ms.parse().ok()?, seq.parse().ok()?))
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// One event read from a member's stream: its id and its fields.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: StreamId,
    pub fields: HashMap<String, Vec<u8>>,
}

/// What a watch yields next.
#[derive(Debug)]
pub enum Frame {
    Event(Entry),
    Heartbeat,
    /// The watch is over: this status ends the stream (`token`: the resume
    /// token of the last frame sent, which the caller puts in it).
    End(EndReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    /// The watcher did not keep up with its buffer.
    TooSlow,
    /// The server is stopping.
    ShuttingDown,
}

impl EndReason {
    /// The status that ends the stream; `resume_token` goes into ErrorInfo
    /// metadata (`resume_token`).
    pub fn status(self, domain: &str, resume_token: &str) -> Status {
        let mut details = ErrorDetails::new();
        let metadata = HashMap::from([("resume_token".to_string(), resume_token.to_string())]);
        match self {
            Self::TooSlow => {
                details.set_error_info(reasons::WATCH_BUFFER_FULL, domain, metadata);
                details.set_retry_info(Some(Duration::from_millis(100)));
                Status::with_error_details(
                    tonic::Code::ResourceExhausted,
                    "the watch did not read its events fast enough and was ended; watch again with resume_token",
                    details,
                )
            }
            Self::ShuttingDown => {
                details.set_error_info(reasons::SHUTTING_DOWN, domain, metadata);
                details.set_retry_info(Some(Duration::from_millis(100)));
                Status::with_error_details(
                    tonic::Code::Unavailable,
                    "the server is shutting down; watch again (on another replica) with resume_token",
                    details,
                )
            }
        }
    }
}

struct Watcher {
    id: u64,
    /// The last event handed to this watcher.
    cursor: StreamId,
    tx: mpsc::Sender<Entry>,
    too_slow: Arc<AtomicBool>,
    /// Since when its buffer is full with events still to hand it.
    full_since: Option<tokio::time::Instant>,
}

#[derive(Default)]
struct State {
    /// Watchers by the stream key they watch (ordered: the rescan walks
    /// them a slice at a time from where it stopped).
    streams: BTreeMap<String, Vec<Watcher>>,
    /// Members (stream keys) to read at the next poll.
    dirty: HashSet<String>,
    open: usize,
}

struct Inner {
    redis: Redis,
    prefix: &'static str,
    limits: EventLimits,
    state: Mutex<State>,
    next_id: AtomicU64,
    stop: CancellationToken,
    wake: tokio::sync::Notify,
}

/// The events of one service process: its watchers and its dispatcher.
#[derive(Clone)]
pub struct EventHub {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for EventHub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventHub")
            .field("prefix", &self.inner.prefix)
            .finish()
    }
}

impl EventHub {
    /// Starts the dispatcher; it stops, and every watch ends, when `stop`
    /// is cancelled. `prefix`: the service's key prefix (its notify
    /// streams).
    pub fn spawn(
        redis: Redis,
        prefix: &'static str,
        limits: EventLimits,
        stop: CancellationToken,
    ) -> Self {
        let hub = Self {
            inner: Arc::new(Inner {
                redis,
                prefix,
                limits,
                state: Mutex::new(State::default()),
                next_id: AtomicU64::new(1),
                stop,
                wake: tokio::sync::Notify::new(),
            }),
        };
        let dispatcher = hub.clone();
        tokio::spawn(async move { dispatcher.dispatch().await });
        hub
    }

    pub fn limits(&self) -> &EventLimits {
        &self.inner.limits
    }

    /// Where a watch of `key` starts: after `token_id` (a resume token's
    /// stream id), or after the stream's last event when `None` (from now).
    /// A token older than what the stream keeps is refused with
    /// FAILED_PRECONDITION RESUME_TOKEN_EXPIRED.
    ///
    /// A missing stream expired (nothing was appended for the retention) or
    /// never was: a token within the retention lost nothing, and a watch
    /// from now starts just before Redis' current time (the writers' ids
    /// come from it). A stream made anew counts everything before the
    /// retention as trimmed (see the writers' scripts).
    pub async fn start_after(
        &self,
        key: &str,
        token_id: Option<StreamId>,
    ) -> Result<StreamId, ApiError> {
        let (now_ms, info) = stream_info(&self.inner.redis, key).await?;
        let retention = self.inner.limits.retention.as_millis() as u64;
        match (token_id, info) {
            (None, None) => Ok(StreamId(now_ms.saturating_sub(1), u64::MAX)),
            (None, Some(info)) => Ok(info.last_generated),
            (Some(token), None) => {
                if token < StreamId(now_ms.saturating_sub(retention), 0) {
                    Err(expired())
                } else {
                    Ok(token)
                }
            }
            (Some(token), Some(info)) => {
                if token < info.max_deleted || token > info.last_generated.max(StreamId(now_ms, 0))
                {
                    Err(expired())
                } else {
                    Ok(token)
                }
            }
        }
    }

    /// Opens a watch of stream `key` after `cursor` ([`EventHub::start_after`]).
    pub fn watch(&self, key: &str, cursor: StreamId) -> Result<Watch, ApiError> {
        let limits = &self.inner.limits;
        let (tx, rx) = mpsc::channel(limits.buffer.max(1));
        let too_slow = Arc::new(AtomicBool::new(false));
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut state = self.inner.state.lock().unwrap();
            if state.open >= limits.max_per_process {
                return Err(ApiError::resource_exhausted(
                    reasons::SERVER_OVERLOADED,
                    format!(
                        "this server serves its maximum of {} watches; retry shortly (another replica may have room)",
                        limits.max_per_process
                    ),
                    Duration::from_secs(1),
                ));
            }
            let watchers = state.streams.entry(key.to_string()).or_default();
            if watchers.len() >= limits.max_per_member {
                return Err(ApiError::resource_exhausted(
                    reasons::TOO_MANY_WATCHES,
                    format!(
                        "this member already has {} watches open here; close one first",
                        limits.max_per_member
                    ),
                    Duration::from_secs(1),
                ));
            }
            watchers.push(Watcher {
                id,
                cursor,
                tx,
                too_slow: too_slow.clone(),
                full_since: None,
            });
            state.open += 1;
            state.dirty.insert(key.to_string());
        }
        self.inner.wake.notify_one();
        // The first heartbeat between half and the whole period, spread by
        // the watch's id: watches opened together (a reconnect storm, a
        // deploy) do not all beat in the same instant ever after.
        let spread = (id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54) as u32; // 0..1024
        let first = limits.heartbeat / 2 + limits.heartbeat / 2 * spread / 1024;
        let mut heartbeat =
            tokio::time::interval_at(tokio::time::Instant::now() + first, limits.heartbeat);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(Watch {
            rx,
            too_slow,
            heartbeat,
            stop: self.inner.stop.clone(),
            _guard: WatchGuard {
                hub: self.clone(),
                key: key.to_string(),
                id,
            },
        })
    }

    fn unregister(&self, key: &str, id: u64) {
        let mut state = self.inner.state.lock().unwrap();
        let mut removed = false;
        if let Some(watchers) = state.streams.get_mut(key) {
            let before = watchers.len();
            watchers.retain(|w| w.id != id);
            removed = watchers.len() < before;
            if watchers.is_empty() {
                state.streams.remove(key);
            }
        }
        if removed {
            state.open -= 1;
        }
    }

    async fn dispatch(&self) {
        let inner = &self.inner;
        let mut notify_after: Vec<(String, StreamId)> = (0..NOTIFY_SHARDS)
            .map(|n| {
                (
                    format!("{}:eventnotify:{{n{n}}}", inner.prefix),
                    StreamId::default(),
                )
            })
            .collect();
        let mut started = false;
        let mut last_rescan = tokio::time::Instant::now();
        // A slice of the watched streams is read again every poll, in key
        // order from where the last slice ended.
        let slice_every = inner.limits.poll;
        let mut rescan_after: Option<String> = None;
        loop {
            tokio::select! {
                () = inner.stop.cancelled() => break,
                () = tokio::time::sleep(inner.limits.poll) => {}
                () = inner.wake.notified() => {}
            }
            if !started {
                // Notices written before this process started are not news.
                match last_ids(&inner.redis, &notify_after).await {
                    Ok(ids) => {
                        for ((_, after), id) in notify_after.iter_mut().zip(ids) {
                            *after = id;
                        }
                        started = true;
                    }
                    Err(_) => continue,
                }
            }
            let watched = !inner.state.lock().unwrap().streams.is_empty();
            if !watched {
                continue;
            }
            if let Ok(notified) = read_notices(&inner.redis, &mut notify_after).await {
                let mut state = inner.state.lock().unwrap();
                for key in notified {
                    if state.streams.contains_key(&key) {
                        state.dirty.insert(key);
                    }
                }
            }
            // The safety net for a lost notice: every watched stream is read
            // again once per rescan period, a slice of them each poll (the
            // next keys in order), so the reads are spread over the period
            // instead of all landing on Redis in one batch; and the period
            // grows with the watched streams past RESCAN_RATE reads per
            // second, so the safety net's cost stays bounded. A poll touches
            // only its slice and the streams it reads, never every watcher.
            if last_rescan.elapsed() >= slice_every {
                last_rescan = tokio::time::Instant::now();
                let mut state = inner.state.lock().unwrap();
                let keys = rescan_slice(
                    &state.streams,
                    &mut rescan_after,
                    rescan_period(inner.limits.rescan, state.streams.len()),
                    slice_every,
                );
                state.dirty.extend(keys);
            }
            // Read every dirty stream from the cursor of its slowest watcher
            // that has room (a full one is handed more at a later poll).
            let (reads, checked): (Vec<(String, StreamId)>, Vec<String>) = {
                let mut state = inner.state.lock().unwrap();
                let dirty: Vec<String> = state.dirty.drain().collect();
                let mut reads = Vec::new();
                for key in &dirty {
                    let Some(watchers) = state.streams.get(key) else {
                        continue;
                    };
                    let from = watchers
                        .iter()
                        .filter(|w| w.tx.capacity() > 0)
                        .map(|w| w.cursor)
                        .min();
                    match from {
                        Some(from) => reads.push((key.clone(), from)),
                        None => {
                            state.dirty.insert(key.clone());
                        }
                    }
                }
                (reads, dirty)
            };
            let replies: Vec<Value> = if reads.is_empty() {
                Vec::new()
            } else {
                let mut batch = Batch::new();
                for (key, after) in &reads {
                    batch.add(
                        redis::cmd("XRANGE")
                            .arg(key)
                            .arg(format!("({after}"))
                            .arg("+")
                            .arg("COUNT")
                            .arg(READ_BATCH)
                            .clone(),
                    );
                }
                match inner.redis.read_bulk(&batch).await {
                    Ok(replies) => replies,
                    Err(err) => {
                        tracing::debug!(error = %err, "event read failed; retrying");
                        let mut state = inner.state.lock().unwrap();
                        state.dirty.extend(reads.into_iter().map(|(k, _)| k));
                        continue;
                    }
                }
            };
            let now = tokio::time::Instant::now();
            let mut state = inner.state.lock().unwrap();
            let mut removed = 0;
            for ((key, from), reply) in reads.into_iter().zip(replies) {
                let entries = parse_entries(reply);
                let mut again = entries.len() >= READ_BATCH;
                let Some(watchers) = state.streams.get_mut(&key) else {
                    continue;
                };
                let before = watchers.len();
                watchers.retain_mut(|watcher| {
                    if watcher.cursor < from {
                        // Full when the read was planned: what follows its
                        // cursor was not read; it is, at a later poll.
                        if watcher.tx.capacity() == 0 {
                            watcher.full_since.get_or_insert(now);
                        }
                        again = true;
                        return !watcher.tx.is_closed();
                    }
                    deliver(watcher, &entries, now)
                });
                removed += before - watchers.len();
                if again {
                    state.dirty.insert(key);
                }
            }
            // Watchers that took nothing for the grace are ended; those
            // still behind are handed more at the next poll. Only streams
            // this poll looked at can hold one: a stream with a full watcher
            // is dirty again at every poll until none is.
            let grace = inner.limits.slow_grace;
            for key in checked {
                let Some(watchers) = state.streams.get_mut(&key) else {
                    continue;
                };
                let before = watchers.len();
                watchers.retain(|w| match w.full_since {
                    Some(since) if now.duration_since(since) >= grace => {
                        w.too_slow.store(true, Ordering::Relaxed);
                        metrics::counter!("inmail_event_watches_too_slow_total").increment(1);
                        false
                    }
                    _ => true,
                });
                removed += before - watchers.len();
                let behind = watchers.iter().any(|w| w.full_since.is_some());
                if watchers.is_empty() {
                    state.streams.remove(&key);
                } else if behind {
                    state.dirty.insert(key);
                }
            }
            state.open -= removed;
            metrics::gauge!("inmail_event_watches", "service" => inner.prefix)
                .set(state.open as f64);
        }
        // Stopping: every watch ends (its sender dropped).
        let mut state = inner.state.lock().unwrap();
        state.streams.clear();
        state.open = 0;
    }
}

/// The next slice of the lost-notice rescan: the keys after `after` in
/// order (on from the first past the last), as many as make every stream
/// read once per `period` at one slice per `every`; `after` moves to the
/// last of them.
fn rescan_slice<V>(
    streams: &BTreeMap<String, V>,
    after: &mut Option<String>,
    period: Duration,
    every: Duration,
) -> Vec<String> {
    let slices = (period.as_millis() / every.as_millis().max(1)).max(1) as usize;
    let take = streams.len().div_ceil(slices);
    let from = match after.take() {
        Some(key) => Bound::Excluded(key),
        None => Bound::Unbounded,
    };
    let mut keys: Vec<String> = streams
        .range::<String, _>((from, Bound::Unbounded))
        .take(take)
        .map(|(key, _)| key.clone())
        .collect();
    // Past the end: on from the start.
    let short = take - keys.len();
    keys.extend(streams.keys().take(short).cloned());
    *after = keys.last().cloned();
    keys
}

/// Hands the watcher the `entries` after its cursor while its buffer has
/// room (`entries` follow a cursor at or before the watcher's, so none is
/// skipped); false when the watcher is gone.
fn deliver(watcher: &mut Watcher, entries: &[Entry], now: tokio::time::Instant) -> bool {
    for entry in entries {
        if entry.id <= watcher.cursor {
            continue;
        }
        match watcher.tx.try_send(entry.clone()) {
            Ok(()) => {
                watcher.cursor = entry.id;
                watcher.full_since = None;
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                watcher.full_since.get_or_insert(now);
                return true;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
        }
    }
    // Caught up with what was read.
    watcher.full_since = None;
    !watcher.tx.is_closed()
}

fn expired() -> ApiError {
    ApiError::failed_precondition(
        reasons::RESUME_TOKEN_EXPIRED,
        "resume_token is older than the events kept (EVENTS_RETENTION, EVENTS_MAX_PER_MEMBER); \
         list again, then watch with an empty resume_token",
    )
}

struct StreamInfo {
    last_generated: StreamId,
    max_deleted: StreamId,
}

/// Redis' time (ms, read first) and XINFO STREAM's ids (`None`: no such
/// stream).
async fn stream_info(redis: &Redis, key: &str) -> Result<(u64, Option<StreamInfo>), ApiError> {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut redis.conn()).await?;
    let now_ms = secs * 1000 + micros / 1000;
    // XINFO of a missing key is an error: ask only when it exists.
    let exists: i64 = redis::cmd("EXISTS")
        .arg(key)
        .query_async(&mut redis.conn())
        .await?;
    if exists == 0 {
        return Ok((now_ms, None));
    }
    let info: Value = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(key)
        .query_async(&mut redis.conn())
        .await?;
    let pairs = map_pairs(info);
    let id_of = |name: &str| {
        pairs
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| value_string(v))
            .and_then(|s| StreamId::parse(&s))
            .unwrap_or_default()
    };
    Ok((
        now_ms,
        Some(StreamInfo {
            last_generated: id_of("last-generated-id"),
            max_deleted: id_of("max-deleted-entry-id"),
        }),
    ))
}

fn map_pairs(value: Value) -> Vec<(String, Value)> {
    match value {
        Value::Map(pairs) => pairs
            .into_iter()
            .filter_map(|(k, v)| Some((value_string(&k)?, v)))
            .collect(),
        Value::Array(items) => {
            let mut out = Vec::new();
            let mut it = items.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                if let Some(k) = value_string(&k) {
                    out.push((k, v));
                }
            }
            out
        }
        _ => Vec::new(),
    }
}

fn value_string(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

fn value_bytes(value: Value) -> Option<Vec<u8>> {
    match value {
        Value::BulkString(bytes) => Some(bytes),
        Value::SimpleString(s) => Some(s.into_bytes()),
        _ => None,
    }
}

/// XRANGE's reply as entries.
pub fn parse_entries(reply: Value) -> Vec<Entry> {
    let Value::Array(items) = reply else {
        return Vec::new();
    };
    items
        .into_iter()
        .filter_map(|item| {
            let Value::Array(mut parts) = item else {
                return None;
            };
            if parts.len() != 2 {
                return None;
            }
            let fields = parts.pop()?;
            let id = StreamId::parse(&value_string(&parts.pop()?)?)?;
            let fields = map_pairs(fields)
                .into_iter()
                .filter_map(|(k, v)| Some((k, value_bytes(v)?)))
                .collect();
            Some(Entry { id, fields })
        })
        .collect()
}

/// The last id of each notify stream (where this process starts reading).
async fn last_ids(redis: &Redis, keys: &[(String, StreamId)]) -> Result<Vec<StreamId>, ApiError> {
    let mut batch = Batch::new();
    for (key, _) in keys {
        batch.add(
            redis::cmd("XREVRANGE")
                .arg(key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .clone(),
        );
    }
    let replies: Vec<Value> = redis.read_bulk(&batch).await?;
    Ok(replies
        .into_iter()
        .map(|r| parse_entries(r).first().map(|e| e.id).unwrap_or_default())
        .collect())
}

/// The stream keys announced since the last read, moving the positions.
async fn read_notices(
    redis: &Redis,
    after: &mut [(String, StreamId)],
) -> Result<HashSet<String>, ApiError> {
    let mut batch = Batch::new();
    for (key, id) in after.iter() {
        batch.add(
            redis::cmd("XRANGE")
                .arg(key)
                .arg(format!("({id}"))
                .arg("+")
                .arg("COUNT")
                .arg(NOTIFY_MAXLEN)
                .clone(),
        );
    }
    let replies: Vec<Value> = redis.read_bulk(&batch).await?;
    let mut keys = HashSet::new();
    for ((_, position), reply) in after.iter_mut().zip(replies) {
        for entry in parse_entries(reply) {
            *position = entry.id;
            if let Some(key) = entry.fields.get("k") {
                keys.insert(String::from_utf8_lossy(key).into_owned());
            }
        }
    }
    Ok(keys)
}

/// Watched streams read again per second at most by the lost-notice
/// rescan.
pub const RESCAN_RATE: usize = 500;

/// How long one round of the lost-notice rescan over `streams` watched
/// streams takes: `rescan`, or longer when that would read more than
/// [`RESCAN_RATE`] streams a second (10,000 watched streams: 20 s).
pub fn rescan_period(rescan: Duration, streams: usize) -> Duration {
    rescan.max(Duration::from_millis((streams * 1000 / RESCAN_RATE) as u64))
}

/// One open watch; dropping it closes it.
pub struct Watch {
    rx: mpsc::Receiver<Entry>,
    too_slow: Arc<AtomicBool>,
    heartbeat: tokio::time::Interval,
    stop: CancellationToken,
    _guard: WatchGuard,
}

struct WatchGuard {
    hub: EventHub,
    key: String,
    id: u64,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.hub.unregister(&self.key, self.id);
    }
}

impl Watch {
    /// The next frame: buffered events first, a heartbeat when nothing
    /// happened for a while, or the end.
    pub async fn next(&mut self) -> Frame {
        if self.stop.is_cancelled() {
            return Frame::End(EndReason::ShuttingDown);
        }
        tokio::select! {
            biased;
            () = self.stop.cancelled() => Frame::End(EndReason::ShuttingDown),
            entry = self.rx.recv() => match entry {
                Some(entry) => {
                    self.heartbeat.reset();
                    Frame::Event(entry)
                }
                None if self.too_slow.load(Ordering::Relaxed) => Frame::End(EndReason::TooSlow),
                None => Frame::End(EndReason::ShuttingDown),
            },
            _ = self.heartbeat.tick() => Frame::Heartbeat,
        }
    }
}

/// Serves one watch: each frame `frame_of` makes of an event (`None`:
/// skipped) or of a heartbeat (`frame_of(None, token)`), with the resume
/// token `token_of` makes of its stream id, goes to `out` until the client
/// leaves or the watch ends (its status is the last item, with the token of
/// the last frame sent).
pub async fn serve_watch<T, Tok, TokFut, Make>(
    mut watch: Watch,
    after: StreamId,
    domain: &'static str,
    token_of: Tok,
    frame_of: Make,
    out: mpsc::Sender<Result<T, Status>>,
) where
    Tok: Fn(StreamId) -> TokFut,
    TokFut: std::future::Future<Output = Result<String, ApiError>>,
    Make: Fn(Option<&Entry>, String) -> Option<T>,
{
    let mut last = after;
    loop {
        let frame = tokio::select! {
            frame = watch.next() => frame,
            () = out.closed() => return,
        };
        let item = match frame {
            Frame::Event(entry) => {
                last = entry.id;
                let token = match token_of(last).await {
                    Ok(token) => token,
                    Err(err) => {
                        let _ = out.send(Err(err.into_status(domain))).await;
                        return;
                    }
                };
                match frame_of(Some(&entry), token) {
                    Some(item) => item,
                    None => {
                        tracing::warn!(id = %entry.id, "an unreadable event was skipped");
                        continue;
                    }
                }
            }
            Frame::Heartbeat => match token_of(last).await {
                Ok(token) => match frame_of(None, token) {
                    Some(item) => item,
                    None => continue,
                },
                Err(err) => {
                    let _ = out.send(Err(err.into_status(domain))).await;
                    return;
                }
            },
            Frame::End(reason) => {
                let token = token_of(last).await.unwrap_or_default();
                let _ = out.send(Err(reason.status(domain, &token))).await;
                return;
            }
        };
        if out.send(Ok(item)).await.is_err() {
            return;
        }
    }
}

/// The current time for heartbeat frames (the server's clock, not the
/// test clock: a heartbeat says the stream is alive).
pub fn wall_clock_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Reads the `resume_token` of `member`'s events kept under `list` (None:
/// from now). A token that does not verify, or names no event, is added to
/// `checks` (`what`: whose events, for the message).
pub async fn decode_resume_token(
    tokens: &crate::state::paging::PageTokens,
    checks: &mut crate::contract::validate::Checks,
    list: &str,
    member: &str,
    token: &str,
    what: &str,
) -> Result<Option<StreamId>, ApiError> {
    let mut own = crate::contract::validate::Checks::new();
    let cursor = tokens.decode(&mut own, list, &[member], token).await?;
    let id = cursor.as_deref().and_then(StreamId::parse);
    if !own.is_empty() || (cursor.is_some() && id.is_none()) {
        checks.add(
            "resume_token",
            format!("is not a resume_token of {what} (use a frame's resume_token as-is)"),
        );
    }
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_order_by_time_then_sequence() {
        let a = StreamId::parse("5-2").unwrap();
        assert!(a < StreamId::parse("5-10").unwrap());
        assert!(a < StreamId::parse("6-0").unwrap());
        assert!(a > StreamId::default());
        assert_eq!(a.to_string(), "5-2");
        assert!(StreamId::parse("5").is_none());
    }

    #[test]
    fn the_rescan_period_grows_past_its_rate() {
        let two = Duration::from_secs(2);
        assert_eq!(rescan_period(two, 0), two);
        assert_eq!(rescan_period(two, 1000), two);
        assert_eq!(rescan_period(two, 10_000), Duration::from_secs(20));
    }

    #[test]
    fn the_rescan_reads_every_stream_once_per_period_a_slice_a_poll() {
        let streams: BTreeMap<String, ()> = (0..10).map(|i| (format!("k{i}"), ())).collect();
        let (poll, period) = (Duration::from_millis(50), Duration::from_millis(250));
        let mut after = None;
        let mut seen = Vec::new();
        for _ in 0..5 {
            let slice = rescan_slice(&streams, &mut after, period, poll);
            assert_eq!(slice.len(), 2, "{slice:?}");
            seen.extend(slice);
        }
        let all: Vec<String> = streams.keys().cloned().collect();
        assert_eq!(seen, all, "one period reads each stream once, in order");
        // Then it starts over.
        assert_eq!(
            rescan_slice(&streams, &mut after, period, poll),
            ["k0", "k1"]
        );
        // A stream added mid-sweep is read in its turn; one removed is not.
        let mut streams = streams;
        streams.insert("k15".into(), ());
        streams.remove("k2");
        let next = rescan_slice(&streams, &mut after, period, poll);
        assert_eq!(next, ["k15", "k3"]);
    }

    #[test]
    fn notify_keys_are_sharded_under_the_prefix() {
        let key = notify_key("messaging", "messaging:{m}:events");
        assert!(key.starts_with("messaging:eventnotify:{n"), "{key}");
    }
}
