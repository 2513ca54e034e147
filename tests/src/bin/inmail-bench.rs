//! inmail-bench: the load tool. Starts its own Redis servers and the three
//! release binaries twice (secured: TLS, tokens, mutual TLS; and with
//! INSECURE_PLAINTEXT, for the price of security), then drives, at one
//! concurrency and in one run:
//!
//! 1. `thin`: the thin ideal (a tonic server whose Debit is one small Lua
//!    script; built from THIN_IDEAL_DIR, see scripts/bench.sh) with its own
//!    load tool, on the secured stack's Redis: the yardstick;
//! 2. `direct`: billing's debit scripts straight on Redis;
//! 3. `debit` / `debit-plain`: DebitForMessage over gRPC as messaging (TLS)
//!    and in plaintext;
//! 4. `send` / `send-plain`: SendMessage, InMails to distinct recipients
//!    from many senders with their tokens (the whole saga);
//! 5. `debit-archived` / `send-archived`: the same on a third secured stack
//!    whose billing archives its ledger and messaging its messages to a real
//!    PostgreSQL (started by the bench, as the tests do; a database each)
//!    with a 2 s hot window every second: the
//!    archiver's price, as a ratio to `debit` / `send`, and Redis's memory
//!    per 1,000 calls after each row (once the archiver had time to drain).
//!
//! Each row: throughput, p50/p99/p999, errors, Redis time and commands per
//! call (INFO commandstats), CPU per call of every process, and the
//! services' resident memory; then the ratios against the thin ideal and
//! TLS against plaintext. On a 2-core machine the load tools, services and
//! Redis share the cores, so only ratios from one run are honest figures.
//! `--script-profile` also splits each row's Redis time by script (named by
//! hash from every service's `store::SCRIPTS`) and command, with the
//! commands each script ran counted under it, from Redis's SLOWLOG.
//!
//! `--scenarios watch --watchers 10000 --watch-rate 500` opens that many
//! WatchInbox streams on one messaging process and prints send → event
//! latency, CPU and RSS per 1,000 idle watchers and Redis connections,
//! beside the same run's SendMessage figures without watchers, in
//! `--watch-rounds` rounds (the median round and all rounds pooled are the
//! figures), with each arm's CPU per process and the AOF fsyncs it stalled
//! on. `TMPDIR=/dev/shm` puts the test Redis's AOF in memory: the same
//! fsyncs, without this disk's stalls.
//!
//! `--scenarios idle --idle-replicas 1,2,4` measures Redis's load with the
//! services idle at each replica count (every service replicated), on a
//! fresh stack: commands and Redis time per second, Redis's CPU, and the
//! sweepers' share. `INMAIL_BIN_DIR` runs other builds of the services.
//!
//! `--members 1000,1000000` runs Debit and SendMessage at each member count
//! in one run, on the same stacks: the first 1,000 members are subscribed
//! and funded through the services; the others are copies of the first
//! written straight into Redis (subscription with its published revision
//! and Open Profile, account with balance, ledger),
//! so a million load in seconds. Members are picked spread over all of
//! them, to show cost per call flat in the member count. The thin ideal
//! runs at each count too (its load tool's users spread the same way, made
//! on first touch), beside the same grown dataset; `direct` runs once.
//!
//! Build and run: `scripts/bench.sh` (builds the thin ideal too) or
//! `cargo build --release --bins && target/release/inmail-bench`.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use billing_credits::store::{BillingStore, Call};
use clap::Parser;
use hdrhistogram::Histogram;
use inmail_shared::contract::proto::billing::v1 as billing;
use inmail_shared::contract::proto::messaging::v1 as messaging;
use inmail_shared::contract::proto::plans::v1 as plans;
use inmail_shared::state::storage::{Redis, RedisSettings};
use inmail_tests::processes::ProcessStack;
use inmail_tests::{
    As, Authed, BillingClient, MessagingClient, PlansClient, channel_as, pki, plaintext_authed,
};
use tonic::metadata::{Ascii, MetadataValue};

#[derive(Debug, Parser)]
#[command(
    name = "inmail-bench",
    about = "Load tool: the thin ideal vs Debit vs SendMessage, secured and in plaintext"
)]
struct Args {
    /// Calls in flight at once.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Measured time per scenario.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured warm-up per scenario.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Members debited (and senders of InMail): one count, or several to run
    /// Debit and SendMessage at each (e.g. 1000,1000000).
    #[arg(long, value_delimiter = ',', default_value = "1000")]
    members: Vec<usize>,
    /// Scenarios to run, in order (thin, direct, debit, debit-plain, send,
    /// send-plain).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "thin,direct,debit,debit-plain,send,send-plain,debit-archived,send-archived"
    )]
    scenarios: Vec<String>,
    /// Where the thin ideal's release binaries (`server`, `load`) are;
    /// without it the `thin` scenario is skipped. scripts/bench.sh builds
    /// them.
    #[arg(long, env = "THIN_IDEAL_DIR")]
    thin_ideal_dir: Option<PathBuf>,
    /// Calls the thin ideal's load tool makes (after its 5,000 warm-up).
    #[arg(long, default_value_t = 120_000)]
    thin_calls: u64,
    /// Also print the Redis commands behind each row.
    #[arg(long)]
    redis_stats: bool,
    /// Also print Redis time per call of each script (by name) and command,
    /// from Redis's SLOWLOG of the row's last 20,000 commands, logged with
    /// a threshold of 0. Logging every command costs Redis a little: take
    /// the throughput ratios from a run without it.
    #[arg(long)]
    script_profile: bool,
    /// Tokio worker threads of each service (TOKIO_WORKER_THREADS; default:
    /// one per core).
    #[arg(long)]
    service_worker_threads: Option<usize>,
    /// Replica counts (of every service) the `idle` scenario measures.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    idle_replicas: Vec<usize>,
    /// How long the `idle` scenario measures each replica count.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    idle_window: Duration,
    /// Watchers the `watch` scenario opens on one messaging process.
    #[arg(long, default_value_t = 10_000)]
    watchers: usize,
    /// Rounds of the `watch` scenario (each without, then with watchers).
    #[arg(long, default_value_t = 5)]
    watch_rounds: usize,
    /// Sends per second of the `watch` scenario (with and without watchers).
    #[arg(long, default_value_t = 500)]
    watch_rate: u64,
    /// Redis AOF fsync policy for the run (the shipped configuration: always).
    #[arg(long, default_value = "always")]
    appendfsync: String,
}

/// A stack the bench drives: the processes, their Redis, and how to call.
struct Bench {
    stack: ProcessStack,
    plaintext: bool,
    processes: Vec<(String, u32)>,
    redis: redis::aio::MultiplexedConnection,
    /// Members loaded, per name prefix.
    loaded: std::collections::HashMap<String, usize>,
    /// SendMessage calls this stack served so far (warm-ups included).
    sends_served: u64,
}

impl Bench {
    async fn start(args: &Args, plaintext: bool) -> Self {
        Self::start_archiving(args, plaintext, None).await
    }

    /// The stack; with `archive`, billing archives its ledger in the first
    /// database and messaging its messages in the second (hot window 2 s,
    /// every second).
    async fn start_archiving(
        args: &Args,
        plaintext: bool,
        archive: Option<(
            inmail_tests::postgres::Database,
            inmail_tests::postgres::Database,
        )>,
    ) -> Self {
        let workers = args.service_worker_threads;
        let redis = inmail_tests::RedisServer::start_single().await;
        let stack = ProcessStack::start_with(redis, plaintext, |name| {
            let mut env: Vec<(String, String)> = workers
                .map(|n| ("TOKIO_WORKER_THREADS".to_string(), n.to_string()))
                .into_iter()
                .collect();
            env.extend([
                ("TEST_CLOCK".into(), "false".into()),
                ("LOG_LEVEL".into(), "warn".into()),
            ]);
            if name == "billing-credits" {
                // Debit-only load leaves its holds unconfirmed: they must not
                // expire (and be released by the sweeper) during later rows.
                env.push(("HOLD_TTL".into(), "1h".into()));
                if let Some((db, _)) = &archive {
                    env.extend(db.env());
                    env.extend([
                        ("LEDGER_HOT_RETENTION".to_string(), "2s".to_string()),
                        ("ARCHIVE_INTERVAL".to_string(), "1s".to_string()),
                    ]);
                }
            }
            if name == "messaging" {
                env.push(("INMAIL_BURST".into(), "1000000000".into()));
                env.push(("INMAIL_PER_DAY".into(), "1000000000".into()));
                // The `watch` scenario's watchers all come from here.
                env.push(("MAX_CALLS_PER_ADDRESS".into(), "1000000".into()));
                env.push(("MAX_INBOUND_CONNECTIONS_PER_ADDRESS".into(), "2048".into()));
                env.push(("MAX_INBOUND_CONNECTIONS".into(), "4096".into()));
                if let Some((_, db)) = &archive {
                    env.extend(db.env());
                    env.extend([
                        ("HISTORY_HOT_RETENTION".to_string(), "2s".to_string()),
                        ("ARCHIVE_INTERVAL".to_string(), "1s".to_string()),
                    ]);
                }
            }
            env
        })
        .await;
        let processes: Vec<(String, u32)> = [
            ("redis".to_string(), redis_pid(&stack)),
            ("plans".to_string(), stack.plans.pid()),
            ("billing".to_string(), stack.billing.pid()),
            ("messaging".to_string(), stack.messaging.pid()),
        ]
        .into_iter()
        .filter(|(_, pid)| *pid != 0)
        .collect();
        let mut redis = redis::Client::open(stack.redis.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("appendfsync")
            .arg(&args.appendfsync)
            .query_async(&mut redis)
            .await
            .unwrap();
        Self {
            stack,
            plaintext,
            processes,
            redis,
            loaded: Default::default(),
            sends_served: 0,
        }
    }

    fn channel(&self, addr: std::net::SocketAddr, who: As) -> Authed {
        if self.plaintext {
            plaintext_authed(addr)
        } else {
            channel_as(addr, &who)
        }
    }

    /// The `authorization` value a member's calls carry (none in
    /// plaintext).
    fn token(&self, member: &str) -> Option<MetadataValue<Ascii>> {
        (!self.plaintext).then(|| format!("Bearer {}", pki().token(member)).parse().unwrap())
    }

    /// Redis's `used_memory`, bytes.
    async fn used_memory(&mut self) -> u64 {
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut self.redis)
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Bytes Redis holds in keys matching `pattern` (SCAN, then MEMORY
    /// USAGE of each): what one class of data costs.
    async fn bytes_of(&mut self, pattern: &str) -> u64 {
        let mut cursor = 0u64;
        let mut total = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut self.redis)
                .await
                .unwrap();
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for key in &keys {
                    pipe.cmd("MEMORY")
                        .arg("USAGE")
                        .arg(key)
                        .arg("SAMPLES")
                        .arg(0);
                }
                let sizes: Vec<Option<u64>> = pipe.query_async(&mut self.redis).await.unwrap();
                total += sizes.into_iter().flatten().sum::<u64>();
            }
            if next == 0 {
                return total;
            }
            cursor = next;
        }
    }

    async fn reset_redis_stats(&mut self) {
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut self.redis)
            .await
            .unwrap();
    }

    /// Starts (`on`) or stops logging every command in the SLOWLOG, and
    /// empties it.
    async fn log_every_command(&mut self, on: bool) {
        let (threshold, len) = if on {
            (0, SLOWLOG_SAMPLE)
        } else {
            (10_000, 128)
        };
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg("slowlog-log-slower-than")
            .arg(threshold)
            .arg("slowlog-max-len")
            .arg(len)
            .query_async(&mut self.redis)
            .await
            .unwrap();
        let _: () = redis::cmd("SLOWLOG")
            .arg("RESET")
            .query_async(&mut self.redis)
            .await
            .unwrap();
    }

    /// The SLOWLOG's entries, oldest first, the bench's own commands left
    /// out.
    async fn logged_commands(&mut self) -> Vec<Logged> {
        let entries: Vec<redis::Value> = redis::cmd("SLOWLOG")
            .arg("GET")
            .arg(SLOWLOG_SAMPLE)
            .query_async(&mut self.redis)
            .await
            .unwrap();
        let names = script_names();
        let mut logged: Vec<Logged> = entries
            .into_iter()
            .filter_map(|entry| {
                let redis::Value::Array(fields) = entry else {
                    return None;
                };
                let text = |v: Option<&redis::Value>| match v {
                    Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                    Some(redis::Value::SimpleString(s)) => s.clone(),
                    _ => String::new(),
                };
                let micros = match fields.get(2)? {
                    redis::Value::Int(us) => *us as u64,
                    _ => return None,
                };
                let redis::Value::Array(argv) = fields.get(3)? else {
                    return None;
                };
                let command = text(argv.first()).to_ascii_lowercase();
                if matches!(command.as_str(), "slowlog" | "config" | "info") {
                    return None;
                }
                let label = if command == "evalsha" {
                    let sha = text(argv.get(1));
                    match names.get(&sha) {
                        Some(name) => format!("script {name}"),
                        None => format!("script {}", &sha[..sha.len().min(8)]),
                    }
                } else {
                    command
                };
                // A command a script ran is logged, before its script, with
                // no client address.
                let nested = text(fields.get(4)).starts_with('?');
                Some(Logged {
                    label,
                    micros,
                    nested,
                })
            })
            .collect();
        logged.reverse();
        logged
    }

    /// Redis commands since the last reset: (name, calls, µs), busiest
    /// first.
    async fn redis_commands(&mut self) -> Vec<(String, u64, f64)> {
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut self.redis)
            .await
            .unwrap();
        let mut rows: Vec<(String, u64, f64)> = info
            .lines()
            .filter_map(|line| {
                let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                let field = |key: &str| {
                    stats
                        .split(',')
                        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
                        .and_then(|v| v.parse::<f64>().ok())
                        .unwrap_or(0.0)
                };
                Some((name.to_string(), field("calls") as u64, field("usec")))
            })
            .filter(|(name, _, _)| name != "info" && !name.starts_with("config"))
            .collect();
        rows.sort_by(|a, b| b.2.total_cmp(&a.2));
        rows
    }
}

/// One scenario's figures.
#[derive(Default)]
struct Outcome {
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    /// Calls made in all, warm-up included (what Redis saw).
    calls_total: u64,
    /// CPU of each process over the measured calls.
    cpu: Vec<(String, Duration)>,
    /// Calls the CPU figures cover.
    cpu_calls: u64,
    redis_usec: f64,
    redis_commands: Vec<(String, u64, f64)>,
    /// The row's last commands as Redis logged them, oldest first
    /// (`--script-profile`).
    logged: Vec<Logged>,
    /// Resident memory of the services, KiB.
    rss_kib: Vec<(String, u64)>,
    /// Redis's `used_memory` growth over the row per 1,000 calls made,
    /// measured a few seconds after the row (the archiver's drain).
    redis_bytes_per_1k: Option<f64>,
    /// Messages in Redis (their hashes and the conversations' timelines,
    /// MEMORY USAGE) per 1,000 sends the stack served so far.
    message_bytes_per_1k: Option<f64>,
}

impl Outcome {
    fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn redis_us_per_call(&self) -> f64 {
        self.redis_usec / self.calls_total.max(1) as f64
    }

    fn redis_cmds_per_call(&self) -> f64 {
        self.redis_commands.iter().map(|r| r.1).sum::<u64>() as f64 / self.calls_total.max(1) as f64
    }

    fn cpu_us_per_call(&self) -> f64 {
        self.cpu.iter().map(|(_, d)| d.as_secs_f64()).sum::<f64>() * 1e6
            / self.cpu_calls.max(1) as f64
    }
}

/// (utime + stime, cutime + cstime) of a process.
fn cpu_times(pid: u32) -> (Duration, Duration) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks = |i: usize| -> u64 { fields.get(i).and_then(|v| v.parse().ok()).unwrap_or(0) };
    (
        Duration::from_millis((ticks(11) + ticks(12)) * 10),
        Duration::from_millis((ticks(13) + ticks(14)) * 10),
    )
}

fn cpu_of(pid: u32) -> Duration {
    cpu_times(pid).0
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Runs `op(i)` from `concurrency` tasks with increasing `i` for warmup +
/// duration, measuring only after the warm-up.
async fn drive<F, Fut>(args: &Args, processes: &[(String, u32)], op: F) -> Outcome
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let op = Arc::new(op);
    let counter = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let stop_at = measure_from + args.duration;
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (op, counter) = (op.clone(), counter.clone());
        tasks.push(tokio::spawn(async move {
            let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
            let (mut ok, mut errors, mut first_error) = (0u64, 0u64, None);
            loop {
                let now = Instant::now();
                if now >= stop_at {
                    break;
                }
                let i = counter.fetch_add(1, Ordering::Relaxed);
                let result = op(i).await;
                if now >= measure_from {
                    let micros = now.elapsed().as_micros() as u64;
                    match result {
                        Ok(()) => {
                            ok += 1;
                            histogram.record(micros.max(1)).unwrap();
                        }
                        Err(e) => {
                            errors += 1;
                            first_error.get_or_insert(e);
                        }
                    }
                }
            }
            (histogram, ok, errors, first_error)
        }));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let me = std::process::id();
    let bench_start = cpu_of(me);
    let others_start: Vec<Duration> = processes.iter().map(|(_, pid)| cpu_of(*pid)).collect();
    let mut outcome = Outcome::default();
    let mut total: Option<Histogram<u64>> = None;
    for task in tasks {
        let (histogram, ok, errors, first_error) = task.await.unwrap();
        match &mut total {
            Some(total) => total.add(&histogram).unwrap(),
            None => total = Some(histogram),
        }
        outcome.ok += ok;
        outcome.errors += errors;
        if outcome.first_error.is_none() {
            outcome.first_error = first_error;
        }
    }
    outcome.elapsed = Instant::now()
        .saturating_duration_since(measure_from)
        .min(args.duration + Duration::from_secs(5));
    outcome.cpu = vec![("bench".to_string(), cpu_of(me).saturating_sub(bench_start))];
    outcome.cpu.extend(
        processes
            .iter()
            .zip(others_start)
            .map(|((name, pid), before)| (name.clone(), cpu_of(*pid).saturating_sub(before))),
    );
    outcome.cpu_calls = outcome.ok + outcome.errors;
    outcome.calls_total = counter.load(Ordering::Relaxed);
    let h = total.unwrap();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    (outcome.p50_ms, outcome.p99_ms, outcome.p999_ms) = (ms(0.5), ms(0.99), ms(0.999));
    outcome
}

fn report(name: &str, outcome: &Outcome, redis_detail: bool) {
    let per_call = |cpu: Duration| cpu.as_secs_f64() * 1e6 / outcome.cpu_calls.max(1) as f64;
    println!(
        "{name:<12} {:>8} ok {:>8.0}/s  p50 {:>6.2} ms  p99 {:>6.2} ms  p999 {:>6.2} ms  errors {}",
        outcome.ok,
        outcome.rate(),
        outcome.p50_ms,
        outcome.p99_ms,
        outcome.p999_ms,
        outcome.errors,
    );
    println!(
        "{:<12} redis {:.1} µs and {:.1} commands per call; CPU µs per call: {}, all {:.0}",
        "",
        outcome.redis_us_per_call(),
        outcome.redis_cmds_per_call(),
        outcome
            .cpu
            .iter()
            .map(|(n, cpu)| format!("{n} {:.0}", per_call(*cpu)))
            .collect::<Vec<_>>()
            .join(", "),
        outcome.cpu_us_per_call()
    );
    if !outcome.rss_kib.is_empty() {
        println!(
            "{:<12} RSS: {}",
            "",
            outcome
                .rss_kib
                .iter()
                .map(|(n, kib)| format!("{n} {:.1} MiB", *kib as f64 / 1024.0))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if redis_detail {
        for (name, n, usec) in outcome.redis_commands.iter().take(8) {
            println!(
                "{:<14} {name:<10} {:>5.2} calls/op {:>6.1} µs/op",
                "",
                *n as f64 / outcome.calls_total.max(1) as f64,
                usec / outcome.calls_total.max(1) as f64
            );
        }
    }
    if !outcome.logged.is_empty() {
        script_profile(outcome);
    }
    if let Some(error) = &outcome.first_error {
        println!("{:<12} first error: {error}", "");
    }
}

/// How many of a row's last commands `--script-profile` looks at.
const SLOWLOG_SAMPLE: usize = 20_000;

/// Every script of the services by its hash (what EVALSHA names).
fn script_names() -> std::collections::HashMap<String, &'static str> {
    billing_credits::store::SCRIPTS
        .iter()
        .chain(&::messaging::store::SCRIPTS)
        .chain(&subscription_plan::store::SCRIPTS)
        .chain(&inmail_shared::state::idempotency::SCRIPTS)
        .chain(&inmail_shared::state::sweep::SCRIPTS)
        .map(|(name, source)| (redis::Script::new(source).get_hash().to_string(), *name))
        .collect()
}

/// A top-level command's (or script's) calls and time, and the commands
/// it ran (for a script): name → (calls, µs).
#[derive(Default, Debug, PartialEq)]
struct Row {
    calls: u64,
    micros: u64,
    inner: std::collections::BTreeMap<String, (u64, u64)>,
}

/// The SLOWLOG's commands (oldest first) by top-level label, busiest
/// first; each script gets the nested commands logged just before it.
fn by_script(logged: &[Logged]) -> Vec<(String, Row)> {
    let mut rows: std::collections::HashMap<String, Row> = Default::default();
    let mut pending: Vec<&Logged> = Vec::new();
    for entry in logged {
        if entry.nested {
            pending.push(entry);
            continue;
        }
        let row = rows.entry(entry.label.clone()).or_default();
        row.calls += 1;
        row.micros += entry.micros;
        for inner in pending.drain(..) {
            let cell = row.inner.entry(inner.label.clone()).or_default();
            cell.0 += 1;
            cell.1 += inner.micros;
        }
    }
    let mut rows: Vec<(String, Row)> = rows.into_iter().collect();
    rows.sort_by(|a, b| b.1.micros.cmp(&a.1.micros).then(a.0.cmp(&b.0)));
    rows
}

/// One command as Redis's SLOWLOG has it.
struct Logged {
    /// `script <name>` or the command's name.
    label: String,
    micros: u64,
    /// Run by a script (its time is in the script's).
    nested: bool,
}

/// Redis time per call of the row, split by script and command: the
/// sample's share of each, scaled to the row's commands per call
/// (INFO commandstats). Commands a script ran are counted under it: the
/// script's time is its commands' plus its Lua.
fn script_profile(outcome: &Outcome) {
    let rows = by_script(&outcome.logged);
    let all = outcome.logged.len();
    let top_level: u64 = rows.iter().map(|r| r.1.calls).sum();
    // Commands per call as INFO counts them (a script's commands included),
    // and the sample's ops from its share of them.
    let ops = all as f64 / outcome.redis_cmds_per_call().max(1e-9);
    let total: u64 = rows.iter().map(|r| r.1.micros).sum();
    println!(
        "{:<14} Redis executing, per call ({} commands sampled from the SLOWLOG, {} top-level): {:.1} µs",
        "",
        all,
        top_level,
        total as f64 / ops
    );
    for (label, row) in rows.iter().take(12) {
        let inner_us: u64 = row.inner.values().map(|c| c.1).sum();
        let mut inner: Vec<_> = row.inner.iter().collect();
        inner.sort_by(|a, b| b.1.1.cmp(&a.1.1).then(a.0.cmp(b.0)));
        let detail = if inner.is_empty() {
            String::new()
        } else {
            format!(
                " = commands {:.1} ({}) + Lua {:.1}",
                inner_us as f64 / ops,
                inner
                    .iter()
                    .map(|(name, (n, _))| format!("{name} {:.1}", *n as f64 / row.calls as f64))
                    .collect::<Vec<_>>()
                    .join(", "),
                (row.micros - inner_us.min(row.micros)) as f64 / ops
            )
        };
        println!(
            "{:<16} {label:<22} {:>5.2}/op {:>6.1} µs/op{detail}",
            "",
            row.calls as f64 / ops,
            row.micros as f64 / ops,
        );
    }
}

fn main() {
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(args));
}

async fn run(args: Args) {
    if args.scenarios.iter().any(|s| s == "idle") {
        idle(&args).await;
        if args.scenarios.len() == 1 {
            return;
        }
    }
    if args.scenarios.iter().any(|s| s == "watch") {
        watch(&args).await;
        if args.scenarios.iter().all(|s| s == "watch" || s == "idle") {
            return;
        }
    }
    let mut secured = Bench::start(&args, false).await;
    let mut plain = if args.scenarios.iter().any(|s| s.ends_with("-plain")) {
        Some(Bench::start(&args, true).await)
    } else {
        None
    };
    let mut archived = if args.scenarios.iter().any(|s| s.ends_with("-archived")) {
        let pg = inmail_tests::postgres::PgServer::shared();
        let dbs = (
            pg.database("inmail_billing"),
            pg.database("inmail_messaging"),
        );
        Some(Bench::start_archiving(&args, false, Some(dbs)).await)
    } else {
        None
    };
    println!(
        "inmail-bench: concurrency {}, {:?} members, {:?} measured after {:?} warm-up, {} cores; \
         redis: appendonly yes, appendfsync {}",
        args.concurrency,
        args.members,
        args.duration,
        args.warmup,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        args.appendfsync
    );
    let mut results: Vec<(String, Outcome)> = Vec::new();
    let counts = args.members.clone();
    for (k, &members) in counts.iter().enumerate() {
        // Every row of a count runs beside the same dataset: load first.
        for scenario in &args.scenarios {
            if matches!(
                scenario.as_str(),
                "debit"
                    | "debit-plain"
                    | "send"
                    | "send-plain"
                    | "debit-archived"
                    | "send-archived"
            ) {
                let bench = if scenario.ends_with("-plain") {
                    plain.as_mut().unwrap()
                } else if scenario.ends_with("-archived") {
                    archived.as_mut().unwrap()
                } else {
                    &mut secured
                };
                load_members(
                    bench,
                    &scenario.replace('-', ""),
                    members,
                    &args.appendfsync,
                )
                .await;
            }
        }
        for scenario in &args.scenarios {
            if k > 0 && matches!(scenario.as_str(), "direct" | "idle") {
                continue;
            }
            let bench = if scenario.ends_with("-plain") {
                plain.as_mut().unwrap()
            } else if scenario.ends_with("-archived") {
                archived.as_mut().unwrap()
            } else {
                &mut secured
            };
            let prefix = scenario.replace('-', "");
            let memory_before = bench.used_memory().await;
            bench.reset_redis_stats().await;
            if args.script_profile {
                bench.log_every_command(true).await;
            }
            let mut outcome = match scenario.as_str() {
                "idle" | "watch" => continue,
                "thin" => match &args.thin_ideal_dir {
                    Some(dir) => thin(&args, bench, dir, members).await,
                    None => {
                        println!(
                            "thin         skipped: set THIN_IDEAL_DIR (scripts/bench.sh builds it)"
                        );
                        continue;
                    }
                },
                "direct" => direct(&args, bench, members).await,
                "debit" | "debit-plain" | "debit-archived" => {
                    debit(&args, bench, &prefix, members).await
                }
                "send" | "send-plain" | "send-archived" => {
                    send(&args, bench, &prefix, members).await
                }
                other => panic!(
                    "unknown scenario {other:?} (idle, thin, direct, debit, debit-plain, send, \
                     send-plain, debit-archived, send-archived)"
                ),
            };
            if matches!(scenario.as_str(), "send" | "send-archived") {
                // The same wait for both: the archived stack's hot window
                // (2 s) and two passes.
                tokio::time::sleep(Duration::from_secs(4)).await;
                let grown = bench.used_memory().await as f64 - memory_before as f64;
                outcome.redis_bytes_per_1k =
                    Some(grown / outcome.calls_total.max(1) as f64 * 1000.0);
                // Every row's messages so far: the stack's messages
                // divided by every send it served.
                let messages = bench.bytes_of("messaging:{*}:msg:*").await
                    + bench.bytes_of("messaging:{*}:timeline").await;
                bench.sends_served += outcome.calls_total;
                outcome.message_bytes_per_1k =
                    Some(messages as f64 / bench.sends_served.max(1) as f64 * 1000.0);
            }
            outcome.redis_commands = bench.redis_commands().await;
            outcome.redis_usec = outcome.redis_commands.iter().map(|r| r.2).sum();
            if args.script_profile {
                outcome.logged = bench.logged_commands().await;
                bench.log_every_command(false).await;
            }
            if outcome.rss_kib.is_empty() {
                outcome.rss_kib = bench
                    .processes
                    .iter()
                    .filter(|(n, _)| n != "redis")
                    .map(|(n, pid)| (n.clone(), rss_kib(*pid)))
                    .collect();
            }
            let name = if counts.len() > 1 && scenario != "direct" {
                format!("{scenario}@{}", short_count(members))
            } else {
                scenario.clone()
            };
            report(&name, &outcome, args.redis_stats);
            results.push((name, outcome));
        }
    }
    summary(&results);
}

fn summary(results: &[(String, Outcome)]) {
    let find = |name: &str| results.iter().find(|(n, _)| n == name).map(|(_, o)| o);
    println!();
    println!(
        "{:<12} {:>8} {:>7} {:>8} {:>9} {:>13} {:>13}",
        "", "calls/s", "x thin", "p99 ms", "p99/thin", "redis µs/call", "CPU µs/call"
    );
    for (name, o) in results {
        // Against the thin ideal at the same member count.
        let thin = match name.split_once('@') {
            Some((_, count)) => find(&format!("thin@{count}")),
            None => find("thin"),
        };
        let (x, px) = match thin {
            Some(t) => (
                format!("{:.2}", o.rate() / t.rate()),
                format!("{:.1}", o.p99_ms / t.p99_ms),
            ),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{name:<12} {:>8.0} {:>7} {:>8.2} {:>9} {:>13.1} {:>13.0}",
            o.rate(),
            x,
            o.p99_ms,
            px,
            o.redis_us_per_call(),
            o.cpu_us_per_call()
        );
    }
    for kind in ["debit", "send"] {
        if let (Some(tls), Some(plain)) = (find(kind), find(&format!("{kind}-plain"))) {
            println!(
                "{kind}: TLS and authentication / plaintext = {:.2} (throughput)",
                tls.rate() / plain.rate()
            );
        }
        if let (Some(base), Some(archived)) = (find(kind), find(&format!("{kind}-archived"))) {
            println!(
                "{kind}: with the archivers / without = {:.2} (throughput), p99 {:.2}",
                archived.rate() / base.rate(),
                archived.p99_ms / base.p99_ms
            );
            if let (Some(b), Some(a)) = (base.redis_bytes_per_1k, archived.redis_bytes_per_1k) {
                println!(
                    "{kind}: Redis memory per 1,000 calls: {:.0} KiB without the archivers, \
                     {:.0} KiB with them (after a 4 s drain)",
                    b / 1024.0,
                    a / 1024.0
                );
            }
            if let (Some(b), Some(a)) = (base.message_bytes_per_1k, archived.message_bytes_per_1k) {
                println!(
                    "{kind}: of which messages (hashes and timelines, MEMORY USAGE): \
                     {:.0} KiB without the archivers, {:.0} KiB with them",
                    b / 1024.0,
                    a / 1024.0
                );
            }
        }
    }
    // Cost per call at the largest member count against the smallest.
    let at = |name: &str| -> Vec<(&String, &Outcome)> {
        results
            .iter()
            .filter(|(n, _)| n.split('@').next() == Some(name) && n.contains('@'))
            .map(|(n, o)| (n, o))
            .collect()
    };
    for kind in ["debit", "debit-plain", "send", "send-plain"] {
        let rows = at(kind);
        if let (Some((small, s)), Some((large, l))) = (rows.first(), rows.last())
            && rows.len() > 1
        {
            println!(
                "{large} / {small}: Redis µs/call {:.2}, CPU µs/call {:.2}, throughput {:.2}",
                l.redis_us_per_call() / s.redis_us_per_call().max(1e-9),
                l.cpu_us_per_call() / s.cpu_us_per_call().max(1e-9),
                l.rate() / s.rate().max(1e-9)
            );
        }
    }
}

fn short_count(n: usize) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

/// The member a call `i` acts for, of `members`: spread over all of them
/// (a multiplicative hash), not the first few.
fn member_index(i: u64, members: u64) -> u64 {
    i.wrapping_mul(2_654_435_761) % members
}

/// Members loaded through the services; beyond them, copies.
const THROUGH_SERVICES: usize = 1000;

/// Makes `count` members `<prefix>-<n>` exist, funded: up to
/// [`THROUGH_SERVICES`] through the services (subscribed, granted 1,000
/// credits); the rest as copies of `<prefix>-0` written into Redis.
async fn load_members(bench: &mut Bench, prefix: &str, count: usize, appendfsync: &str) {
    let loaded = bench.loaded.get(prefix).copied().unwrap_or(0);
    if loaded >= count {
        return;
    }
    let through = count.min(THROUGH_SERVICES);
    if loaded < through {
        subscribe_and_fund(bench, prefix, loaded, through).await;
    }
    if count > through {
        let started = Instant::now();
        copy_members(bench, prefix, loaded.max(through), count, appendfsync).await;
        println!(
            "loaded members {}..{count} of {prefix} into Redis in {:.1}s",
            loaded.max(through),
            started.elapsed().as_secs_f64()
        );
    }
    bench.loaded.insert(prefix.to_string(), count);
}

/// Writes members `from..to` as copies of `<prefix>-0`: its subscription
/// and what subscription-plan publishes of it (revision, Open Profile), its
/// account and its ledger (billing), with the member id
/// replaced. Pipelined with AOF fsync and automatic rewrites off, then the
/// AOF is rewritten once (so no rewrite starts while measuring) and the
/// settings restored.
async fn copy_members(bench: &mut Bench, prefix: &str, from: usize, to: usize, appendfsync: &str) {
    let template = format!("{prefix}-0");
    let mut redis = bench.redis.clone();
    let subscription: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(format!("plans:{{{template}}}:subscription"))
        .query_async(&mut redis)
        .await
        .unwrap();
    let account: Vec<(String, String)> = redis::cmd("HGETALL")
        .arg(format!("billing:{{{template}}}:account"))
        .query_async(&mut redis)
        .await
        .unwrap();
    let ledger: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(format!("billing:{{{template}}}:ledger"))
        .arg("-")
        .arg("+")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        !subscription.is_empty() && !account.is_empty() && !ledger.is_empty(),
        "the template member {template} is not loaded"
    );
    let quoted = format!("\"{template}\"");
    let name = template.clone();
    let swap = move |value: &str, member: &str| -> String {
        if value == name {
            member.to_string()
        } else {
            value.replace(&quoted, &format!("\"{member}\""))
        }
    };
    let set = |name: &str, value: &str| {
        let mut redis = bench.redis.clone();
        let (name, value) = (name.to_string(), value.to_string());
        async move {
            let _: () = redis::cmd("CONFIG")
                .arg("SET")
                .arg(name)
                .arg(value)
                .query_async(&mut redis)
                .await
                .unwrap();
        }
    };
    let auto_rewrite: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("auto-aof-rewrite-percentage")
        .query_async(&mut redis)
        .await
        .unwrap();
    set("appendfsync", "no").await;
    // No automatic AOF rewrites while loading: one at the end.
    set("auto-aof-rewrite-percentage", "0").await;
    // The revision subscription-plan published for the template: the
    // copies' accounts trust their cached entitlement while it is theirs.
    let revision: String = redis::cmd("GET")
        .arg(format!("plans:{{{template}}}:rev"))
        .query_async(&mut redis)
        .await
        .unwrap();
    // And its published Open Profile, tagged with that revision.
    let open: String = redis::cmd("GET")
        .arg(format!("plans:{{{template}}}:open"))
        .query_async(&mut redis)
        .await
        .unwrap();
    let swap = Arc::new(swap);
    let (subscription, account, ledger, revision, open) = (
        Arc::new(subscription),
        Arc::new(account),
        Arc::new(ledger),
        Arc::new(revision),
        Arc::new(open),
    );
    let next = Arc::new(AtomicU64::new(from as u64));
    const CHUNK: u64 = 200;
    // A connection without a response timeout: a big pipeline into a
    // growing keyspace may take a while.
    let loader = redis::Client::open(bench.stack.redis.url())
        .unwrap()
        .get_multiplexed_async_connection_with_config(
            &redis::AsyncConnectionConfig::new().set_response_timeout(None),
        )
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (mut redis, next, swap) = (loader.clone(), next.clone(), swap.clone());
        let (subscription, account, ledger, revision, open) = (
            subscription.clone(),
            account.clone(),
            ledger.clone(),
            revision.clone(),
            open.clone(),
        );
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            loop {
                let first = next.fetch_add(CHUNK, Ordering::Relaxed);
                if first >= to as u64 {
                    return;
                }
                let mut pipe = redis::pipe();
                for m in first..(first + CHUNK).min(to as u64) {
                    let member = format!("{prefix}-{m}");
                    let hset =
                        |pipe: &mut redis::Pipeline, key: String, fields: &[(String, String)]| {
                            let cmd = pipe.cmd("HSET").arg(key);
                            for (f, v) in fields {
                                cmd.arg(f).arg(swap(v, &member));
                            }
                            cmd.ignore();
                        };
                    hset(
                        &mut pipe,
                        format!("plans:{{{member}}}:subscription"),
                        &subscription,
                    );
                    pipe.cmd("SET")
                        .arg(format!("plans:{{{member}}}:rev"))
                        .arg(revision.as_str())
                        .ignore();
                    pipe.cmd("SET")
                        .arg(format!("plans:{{{member}}}:open"))
                        .arg(open.as_str())
                        .ignore();
                    hset(&mut pipe, format!("billing:{{{member}}}:account"), &account);
                    for (id, fields) in ledger.iter() {
                        let cmd = pipe
                            .cmd("XADD")
                            .arg(format!("billing:{{{member}}}:ledger"))
                            .arg(id);
                        for (f, v) in fields {
                            cmd.arg(f).arg(swap(v, &member));
                        }
                        cmd.ignore();
                    }
                }
                let _: () = pipe.query_async(&mut redis).await.unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let _: () = redis::cmd("BGREWRITEAOF")
        .query_async(&mut redis)
        .await
        .unwrap_or(());
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let info: String = redis::cmd("INFO")
            .arg("persistence")
            .query_async(&mut redis)
            .await
            .unwrap();
        if info.contains("aof_rewrite_in_progress:0") && !info.contains("aof_rewrite_scheduled:1") {
            break;
        }
    }
    set("appendfsync", appendfsync).await;
    set("auto-aof-rewrite-percentage", &auto_rewrite[1]).await;
}

fn redis_pid(stack: &ProcessStack) -> u32 {
    stack.redis.pid()
}

fn now_ms() -> i64 {
    inmail_shared::state::clock::system_ms()
}

/// The thin ideal: its server on this stack's Redis, driven by its own load
/// tool.
async fn thin(args: &Args, bench: &Bench, dir: &std::path::Path, members: usize) -> Outcome {
    let port = inmail_tests::free_port();
    let mut server = std::process::Command::new(dir.join("server"))
        .env("ADDR", format!("127.0.0.1:{port}"))
        .env("REDIS_URL", bench.stack.redis.url())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("{}/server: {e}", dir.display()));
    for _ in 0..200 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut processes = bench.processes.clone();
    processes.push(("thin-server".to_string(), server.id()));
    let me = std::process::id();
    let before: Vec<Duration> = processes.iter().map(|(_, pid)| cpu_of(*pid)).collect();
    let (_, children_before) = cpu_times(me);
    let warm = 5000u64;
    let output = tokio::process::Command::new(dir.join("load"))
        .arg("debit")
        .arg(format!("url=http://127.0.0.1:{port}"))
        .arg(format!("c={}", args.concurrency))
        .arg(format!("n={}", args.thin_calls))
        .arg(format!("warm={warm}"))
        .arg(format!("users={members}"))
        .output()
        .await
        .unwrap_or_else(|e| panic!("{}/load: {e}", dir.display()));
    let (_, children_after) = cpu_times(me);
    let text = String::from_utf8_lossy(&output.stdout).to_string();
    let field = |key: &str| -> f64 {
        text.split_whitespace()
            .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("the thin ideal's load tool printed no {key}: {text}"))
    };
    let mut outcome = Outcome {
        errors: field("errors") as u64,
        elapsed: Duration::from_secs_f64(field("elapsed_s")),
        p50_ms: field("p50_ms"),
        p99_ms: field("p99_ms"),
        p999_ms: field("p999_ms"),
        calls_total: args.thin_calls + warm,
        cpu_calls: args.thin_calls + warm,
        ..Default::default()
    };
    outcome.ok = args.thin_calls.saturating_sub(outcome.errors);
    outcome.cpu = vec![(
        "load".to_string(),
        children_after.saturating_sub(children_before),
    )];
    outcome.cpu.extend(
        processes
            .iter()
            .zip(before)
            .filter(|((name, _), _)| name == "redis" || name == "thin-server")
            .map(|((name, pid), before)| (name.clone(), cpu_of(*pid).saturating_sub(before))),
    );
    outcome.rss_kib = vec![("thin-server".to_string(), rss_kib(server.id()))];
    let _ = server.kill();
    let _ = server.wait();
    outcome
}

/// Billing's debit scripts on Redis with nothing in between.
async fn direct(args: &Args, bench: &Bench, members: usize) -> Outcome {
    let redis = Redis::open(&RedisSettings::new(bench.stack.redis.url())).unwrap();
    let store = BillingStore::new(redis);
    let members = members as u64;
    let entitlement = format!(
        r#"{{"periods":[{{"v":1,"p":"recruiter-lite","m":30,"c":120,"paid":1,"n":1,"st":{},"cs":{},"ce":{}}}]}}"#,
        now_ms(),
        now_ms(),
        now_ms() + 30 * 24 * 3600 * 1000
    );
    let valid = now_ms() + 3600 * 1000;
    for m in 0..members {
        let member = format!("direct-{m}");
        let call = Call {
            member: &member,
            now_ms: now_ms(),
            entitlement: &entitlement,
            valid_until_ms: valid,
            request_id: "",
            fingerprint: "",
            hold_expires_ms: 0,
        };
        store
            .grant(&call, Duration::from_secs(60), 1_000_000, "bench")
            .await
            .unwrap();
    }
    let store = Arc::new(store);
    drive(args, &bench.processes, move |i| {
        let store = store.clone();
        async move {
            let member = format!("direct-{}", i % members);
            let message = format!("direct-msg-{i}");
            let request = format!("direct-req-{i}");
            let now = now_ms();
            store
                .prepare_debit(&member, &message, now + 30_000, Duration::from_secs(3600))
                .await
                .map_err(|e| e.to_string())?;
            let call = Call {
                member: &member,
                now_ms: now,
                entitlement: "",
                valid_until_ms: 0,
                request_id: &request,
                fingerprint: "fp",
                hold_expires_ms: now + 30_000,
            };
            let reply = store
                .debit(&call, Duration::from_secs(3600), &message, 1)
                .await
                .map_err(|e| e.to_string())?;
            if reply.s == billing_credits::store::Outcome::Ok {
                Ok(())
            } else {
                Err(format!("{reply:?}"))
            }
        }
    })
    .await
}

fn as_member<T>(message: T, token: &Option<MetadataValue<Ascii>>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", token.clone());
    }
    request
}

/// Members `<prefix>-<from>..<to>` on Recruiter Lite with 1,000 extra
/// credits each (subscribed with their own tokens, granted by an operator).
async fn subscribe_and_fund(bench: &Bench, prefix: &str, from: usize, count: usize) {
    let plans_client = PlansClient::new(bench.channel(bench.stack.plans.addr, As::Anonymous));
    let billing_client = BillingClient::new(bench.channel(bench.stack.billing.addr, As::Operator));
    let next = Arc::new(AtomicU64::new(from as u64));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (mut plans_client, mut billing_client, next) =
            (plans_client.clone(), billing_client.clone(), next.clone());
        let prefix = prefix.to_string();
        let plaintext = bench.plaintext;
        tasks.push(tokio::spawn(async move {
            loop {
                let m = next.fetch_add(1, Ordering::Relaxed) as usize;
                if m >= count {
                    return;
                }
                let member = format!("{prefix}-{m}");
                let token = (!plaintext)
                    .then(|| format!("Bearer {}", pki().token(&member)).parse().unwrap());
                plans_client
                    .subscribe(as_member(
                        plans::SubscribeRequest {
                            request_id: format!("bench-sub-{member}"),
                            member_id: member.clone(),
                            plan_id: "recruiter-lite".into(),
                        },
                        &token,
                    ))
                    .await
                    .unwrap();
                billing_client
                    .grant_credits(billing::GrantCreditsRequest {
                        request_id: format!("bench-grant-{member}"),
                        member_id: member,
                        amount: 1000,
                        reason: "bench".into(),
                    })
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

async fn debit(args: &Args, bench: &Bench, prefix: &str, members: usize) -> Outcome {
    let client =
        BillingClient::new(bench.channel(bench.stack.billing.addr, As::Service("messaging")));
    let members = members as u64;
    let prefix = prefix.to_string();
    drive(args, &bench.processes, move |i| {
        let mut client = client.clone();
        let member = format!("{prefix}-{}", member_index(i, members));
        async move {
            client
                .debit_for_message(billing::DebitForMessageRequest {
                    request_id: format!("debit-req-{members}-{i}"),
                    member_id: member,
                    message_id: format!("debit-msg-{members}-{i}"),
                    amount: 1,
                })
                .await
                .map(|_| ())
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        }
    })
    .await
}

/// Senders with a token ready, at most (tokens are made before the run).
const SENDER_POOL: u64 = 20_000;

async fn send(args: &Args, bench: &Bench, prefix: &str, members: usize) -> Outcome {
    let client = MessagingClient::new(bench.channel(bench.stack.messaging.addr, As::Anonymous));
    let members = members as u64;
    // Senders spread over all the members, each with its token.
    let pool: Arc<Vec<(u64, Option<MetadataValue<Ascii>>)>> = Arc::new(
        (0..members.min(SENDER_POOL))
            .map(|j| {
                let m = member_index(j, members);
                (m, bench.token(&format!("{prefix}-{m}")))
            })
            .collect(),
    );
    let prefix = prefix.to_string();
    drive(args, &bench.processes, move |i| {
        let mut client = client.clone();
        let (sender, token) = &pool[(i % pool.len() as u64) as usize];
        let request = as_member(
            messaging::SendMessageRequest {
                request_id: format!("send-req-{members}-{i}"),
                sender_id: format!("{prefix}-{sender}"),
                recipient_id: format!("recipient-{members}-{i}"),
                subject: "A role for you".into(),
                body: "Hello! I came across your profile and would like to talk.".into(),
            },
            token,
        );
        async move {
            client
                .send_message(request)
                .await
                .map(|_| ())
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        }
    })
    .await
}

/// Sends at `rate` per second for `duration`, InMails from the loaded
/// senders to `recipient(i)`, each body carrying when it was sent (µs since
/// `base`); answers the send latencies and how many failed.
async fn paced_sends(
    bench: &Bench,
    rate: u64,
    duration: Duration,
    base: Instant,
    recipient: impl Fn(u64) -> String,
) -> (Histogram<u64>, u64) {
    let client = MessagingClient::new(bench.channel(bench.stack.messaging.addr, As::Anonymous));
    let senders = bench.loaded.get("watch").copied().unwrap_or(1) as u64;
    let histogram = Arc::new(std::sync::Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap(),
    ));
    let errors = Arc::new(AtomicU64::new(0));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate.max(1) as f64));
    let stop_at = Instant::now() + duration;
    let mut tasks = Vec::new();
    let mut i = 0u64;
    while Instant::now() < stop_at {
        tick.tick().await;
        let sender = format!("watch-{}", i % senders);
        let token = bench.token(&sender);
        let sent_us = base.elapsed().as_micros() as u64;
        let request = as_member(
            messaging::SendMessageRequest {
                request_id: format!("watch-send-{}-{i}", base.elapsed().as_nanos()),
                sender_id: sender,
                recipient_id: recipient(i),
                subject: "A role for you".into(),
                body: format!("t={sent_us}"),
            },
            &token,
        );
        let (mut client, histogram, errors) = (client.clone(), histogram.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            match client.send_message(request).await {
                Ok(_) => {
                    let micros = started.elapsed().as_micros() as u64;
                    histogram.lock().unwrap().record(micros.max(1)).unwrap();
                }
                Err(_) => {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
        i += 1;
    }
    for task in tasks {
        let _ = task.await;
    }
    let histogram = histogram.lock().unwrap().clone();
    (histogram, errors.load(Ordering::Relaxed))
}

/// CPU used so far by each process of the stack and by the bench itself.
fn cpu_by_process(bench: &Bench) -> Vec<(String, Duration)> {
    bench
        .processes
        .iter()
        .cloned()
        .chain([("bench".to_string(), std::process::id())])
        .map(|(name, pid)| (name, cpu_of(pid)))
        .collect()
}

/// Each process's CPU since `start`, in ms per second of `window`.
fn cpu_since(bench: &Bench, start: &[(String, Duration)], window: Duration) -> Vec<(String, f64)> {
    cpu_by_process(bench)
        .into_iter()
        .zip(start)
        .map(|((name, now), (_, then))| {
            (
                name,
                now.saturating_sub(*then).as_secs_f64() * 1e3 / window.as_secs_f64(),
            )
        })
        .collect()
}

/// BGREWRITEAOF, then waits until Redis has finished it.
async fn rewrite_aof(bench: &Bench) {
    let mut redis = bench.redis.clone();
    let _: Result<String, _> = redis::cmd("BGREWRITEAOF").query_async(&mut redis).await;
    loop {
        let info: String = redis::cmd("INFO")
            .arg("persistence")
            .query_async(&mut redis)
            .await
            .unwrap();
        let busy = info.lines().any(|l| {
            l.trim() == "aof_rewrite_in_progress:1" || l.trim() == "aof_rewrite_scheduled:1"
        });
        if !busy {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The AOF fsyncs Redis waited on longer than its latency monitor's
/// threshold since the last call (ms each; at most one a second, the
/// second's longest), and resets them.
async fn fsync_stalls(bench: &Bench) -> Vec<u64> {
    let mut redis = bench.redis.clone();
    let history: Vec<(u64, u64)> = redis::cmd("LATENCY")
        .arg("HISTORY")
        .arg("aof-fsync-always")
        .query_async(&mut redis)
        .await
        .unwrap_or_default();
    let _: Result<u64, _> = redis::cmd("LATENCY")
        .arg("RESET")
        .arg("aof-fsync-always")
        .query_async(&mut redis)
        .await;
    history.into_iter().map(|(_, ms)| ms).collect()
}

/// Redis's `connected_clients`.
async fn redis_clients(bench: &Bench) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("clients")
        .query_async(&mut bench.redis.clone())
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("connected_clients:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// One arm of a `watch` round: the sends' latencies and errors, each
/// process's CPU (ms/s) and the AOF fsyncs Redis stalled on (ms).
struct Arm {
    latency: Histogram<u64>,
    errors: u64,
    cpu: Vec<(String, f64)>,
    stalls: Vec<u64>,
}

impl Arm {
    /// `--watch-rate` sends for `--duration` to `recipient(i)`, after an
    /// AOF rewrite.
    async fn run(
        bench: &Bench,
        args: &Args,
        base: Instant,
        recipient: impl Fn(u64) -> String,
    ) -> Self {
        rewrite_aof(bench).await;
        fsync_stalls(bench).await;
        let cpu_start = cpu_by_process(bench);
        let (latency, errors) =
            paced_sends(bench, args.watch_rate, args.duration, base, recipient).await;
        Self {
            latency,
            errors,
            cpu: cpu_since(bench, &cpu_start, args.duration),
            stalls: fsync_stalls(bench).await,
        }
    }

    fn ms(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }

    fn stalls(&self) -> String {
        match self.stalls.iter().max() {
            Some(max) => format!("{} (longest {max} ms)", self.stalls.len()),
            None => "0".into(),
        }
    }
}

/// `with` against `without`, in per cent.
fn change(with: f64, without: f64) -> f64 {
    (with / without.max(1e-9) - 1.0) * 100.0
}

/// Redis's latency monitor threshold in the `watch` scenario: an AOF
/// fsync that long is counted as a stall of its arm.
const FSYNC_STALL_MS: u64 = 20;

/// `--scenarios watch`: `--watch-rounds` rounds, each SendMessage at
/// `--watch-rate` without watchers, then with `--watchers` WatchInbox
/// streams open on the one messaging process and the same sends to the
/// watched members (the watchers are closed again between rounds): the
/// sends' latency with against without in each round (the machine is
/// shared: the median round and all rounds pooled are the figures), each
/// process's CPU, the AOF fsyncs each arm stalled on, send → event
/// latency, CPU and RSS per 1,000 idle watchers, Redis connections.
async fn watch(args: &Args) {
    let mut bench = Bench::start(args, false).await;
    let senders = args.members[0].clamp(1, THROUGH_SERVICES);
    load_members(&mut bench, "watch", senders, &args.appendfsync).await;
    let base = Instant::now();
    let messaging_pid = bench.stack.messaging.pid();
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let latencies = Arc::new(std::sync::Mutex::new(
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap(),
    ));
    let events = Arc::new(AtomicU64::new(0));
    let idle_window = Duration::from_secs(5);
    // Redis rewrites its AOF (a fork, and a child writing the whole data
    // set on one of the two cores) each time the file doubles: at these
    // sends every 10-20 s, wherever that falls. A cost of the sends, not of
    // the watchers; landing in one arm at random it decided that arm's p99.
    // So the bench rewrites it before each arm instead, outside the
    // measured windows. The other stall of the shipped `appendfsync
    // always`, an fsync this shared disk answers late (40-70 ms seen), is
    // counted per arm from Redis's latency monitor and printed beside it.
    for (key, value) in [
        ("auto-aof-rewrite-percentage", "0".to_string()),
        ("latency-monitor-threshold", FSYNC_STALL_MS.to_string()),
    ] {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(key)
            .arg(value)
            .query_async(&mut bench.redis.clone())
            .await
            .unwrap();
    }
    let mut rounds: Vec<(Arm, Arm)> = Vec::new();
    // Per round: watchers opened, RSS KiB and CPU ms/s per 1,000 idle
    // watchers, Redis connections without and with them.
    let mut idle: Vec<(usize, f64, f64, u64, u64)> = Vec::new();
    for round in 0..args.watch_rounds.max(1) {
        let alone = Arm::run(&bench, args, base, |i| format!("unwatched-{round}-{i}")).await;
        let clients_before = redis_clients(&bench).await;
        let (rss_before, cpu_before) = (rss_kib(messaging_pid), {
            let start = cpu_of(messaging_pid);
            tokio::time::sleep(idle_window).await;
            cpu_of(messaging_pid).saturating_sub(start)
        });
        let (opened, watchers) =
            open_watchers(&bench, args.watchers, base, &latencies, &events).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let clients_after = redis_clients(&bench).await;
        let (rss_after, cpu_after) = (rss_kib(messaging_pid), {
            let start = cpu_of(messaging_pid);
            tokio::time::sleep(idle_window).await;
            cpu_of(messaging_pid).saturating_sub(start)
        });
        let watched = opened.max(1) as u64;
        // Each round its own (sender, recipient) pairs: sender i mod S,
        // recipient i + round mod W (W a multiple of S), so no InMail is
        // refused for one still awaiting a response from an earlier round.
        let with = Arm::run(&bench, args, base, |i| {
            format!("watched-{}", (i + round as u64) % watched)
        })
        .await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        for watcher in watchers {
            watcher.abort();
        }
        let per_thousand = 1000.0 / opened.max(1) as f64;
        idle.push((
            opened,
            (rss_after as f64 - rss_before as f64) * per_thousand,
            (cpu_after.as_secs_f64() - cpu_before.as_secs_f64()) * 1e3 / idle_window.as_secs_f64()
                * per_thousand,
            clients_before,
            clients_after,
        ));
        println!(
            "watch round {}: no watchers {:>5} ok p50 {:>6.2} ms p99 {:>6.2} ms errors {}; \
             {opened} watchers {:>5} ok p50 {:>6.2} ms p99 {:>6.2} ms errors {} \
             ({:+.1} % p50, {:+.1} % p99)",
            round + 1,
            alone.latency.len(),
            alone.ms(0.5),
            alone.ms(0.99),
            alone.errors,
            with.latency.len(),
            with.ms(0.5),
            with.ms(0.99),
            with.errors,
            change(with.ms(0.5), alone.ms(0.5)),
            change(with.ms(0.99), alone.ms(0.99)),
        );
        println!(
            "  AOF fsyncs over {FSYNC_STALL_MS} ms: {} without, {} with watchers",
            alone.stalls(),
            with.stalls()
        );
        println!(
            "  CPU during the sends, ms/s without -> with watchers: {}",
            alone
                .cpu
                .iter()
                .zip(&with.cpu)
                .map(|((name, a), (_, w))| format!("{name} {a:.0} -> {w:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        rounds.push((alone, with));
        // The closed streams' resources go before the next round.
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    let latencies = latencies.lock().unwrap().clone();
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    let median_change = |q: f64| {
        median(
            rounds
                .iter()
                .map(|(a, w)| change(w.ms(q), a.ms(q)))
                .collect(),
        )
    };
    let pooled = |with: bool| {
        let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        for (alone, watched) in &rounds {
            all.add(if with {
                &watched.latency
            } else {
                &alone.latency
            })
            .unwrap();
        }
        all
    };
    let (alone, with) = (pooled(false), pooled(true));
    let clean: Vec<&(Arm, Arm)> = rounds
        .iter()
        .filter(|(a, w)| a.stalls.is_empty() && w.stalls.is_empty())
        .collect();
    let (opened, clients_before, clients_after) = idle
        .iter()
        .map(|&(opened, _, _, before, after)| (opened, before, after))
        .min()
        .expect("one round");
    let rss = median(idle.iter().map(|i| i.1).collect());
    let cpu = median(idle.iter().map(|i| i.2).collect());
    let cpu_change = |name: &str| {
        median(
            rounds
                .iter()
                .map(|(a, w)| {
                    let of = |arm: &Arm| {
                        arm.cpu
                            .iter()
                            .find(|(n, _)| n == name)
                            .map_or(0.0, |(_, ms)| *ms)
                    };
                    of(w) - of(a)
                })
                .collect(),
        )
    };
    println!(
        "watch: {opened} watchers on one messaging process, {} sends/s for {:?}, {} rounds",
        args.watch_rate,
        args.duration,
        rounds.len()
    );
    println!(
        "  send with watchers / without (median round): p50 {:+.1} %, p99 {:+.1} %",
        median_change(0.5),
        median_change(0.99)
    );
    println!(
        "  send, all rounds pooled: without p50 {:.2} ms p99 {:.2} ms; with p50 {:.2} ms p99 {:.2} ms ({:+.1} %, {:+.1} %)",
        ms(&alone, 0.5),
        ms(&alone, 0.99),
        ms(&with, 0.5),
        ms(&with, 0.99),
        change(ms(&with, 0.5), ms(&alone, 0.5)),
        change(ms(&with, 0.99), ms(&alone, 0.99)),
    );
    if !clean.is_empty() {
        println!(
            "  rounds with no AOF fsync over {FSYNC_STALL_MS} ms in either arm: {} of {}; their median p50 {:+.1} %, p99 {:+.1} %",
            clean.len(),
            rounds.len(),
            median(
                clean
                    .iter()
                    .map(|(a, w)| change(w.ms(0.5), a.ms(0.5)))
                    .collect()
            ),
            median(
                clean
                    .iter()
                    .map(|(a, w)| change(w.ms(0.99), a.ms(0.99)))
                    .collect()
            ),
        );
    }
    println!(
        "  send -> event:       {:>6} events  p50 {:>7.2} ms  p99 {:>7.2} ms",
        events.load(Ordering::Relaxed),
        ms(&latencies, 0.5),
        ms(&latencies, 0.99)
    );
    println!(
        "  CPU during the sends, with watchers - without (median round): messaging {:+.0} ms/s, redis {:+.0} ms/s, the load tool {:+.0} ms/s",
        cpu_change("messaging"),
        cpu_change("redis"),
        cpu_change("bench")
    );
    println!("  per 1,000 idle watchers (median round): RSS {rss:+.0} KiB, CPU {cpu:.1} ms/s");
    println!("  Redis connections: {clients_before} without watchers, {clients_after} with them");
}

/// Opens `count` WatchInbox streams (members `watched-<k>`), 200 to a
/// connection (HTTP/2 streams per connection), each recording send → event
/// latency; answers how many opened and their tasks (abort to close).
async fn open_watchers(
    bench: &Bench,
    count: usize,
    base: Instant,
    latencies: &Arc<std::sync::Mutex<Histogram<u64>>>,
    events: &Arc<AtomicU64>,
) -> (usize, Vec<tokio::task::JoinHandle<()>>) {
    let mut channel = bench.channel(bench.stack.messaging.addr, As::Anonymous);
    let mut tasks = Vec::with_capacity(count);
    for k in 0..count {
        if k % 200 == 0 {
            channel = bench.channel(bench.stack.messaging.addr, As::Anonymous);
        }
        let member = format!("watched-{k}");
        let mut client = MessagingClient::new(channel.clone());
        let request = as_member(
            messaging::WatchInboxRequest {
                member_id: member.clone(),
                resume_token: String::new(),
            },
            &bench.token(&member),
        );
        let Ok(stream) = client.watch_inbox(request).await else {
            continue;
        };
        let (latencies, events) = (latencies.clone(), events.clone());
        tasks.push(tokio::spawn(async move {
            let mut stream = stream.into_inner();
            while let Ok(Some(frame)) = stream.message().await {
                let Some(message) = frame.event.and_then(|e| e.message) else {
                    continue;
                };
                if let Some(sent_us) = message
                    .body
                    .strip_prefix("t=")
                    .and_then(|t| t.parse::<u64>().ok())
                {
                    let now_us = base.elapsed().as_micros() as u64;
                    let _ = latencies
                        .lock()
                        .unwrap()
                        .record(now_us.saturating_sub(sent_us).max(1));
                    events.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    (tasks.len(), tasks)
}

/// Redis's load with the services idle, at each replica count of every
/// service: what replicas cost when nothing happens (sweepers, health
/// checks).
async fn idle(args: &Args) {
    let mut bench = Bench::start(args, false).await;
    let redis = redis_pid(&bench.stack);
    let mut extra: Vec<inmail_tests::processes::ServiceProcess> = Vec::new();
    println!(
        "idle: Redis load with the services idle, {:?} per replica count \
         (ZRANGE: the sweepers' shard scans and group reads; PING: health checks)",
        args.idle_window
    );
    println!(
        "{:<10} {:>9} {:>11} {:>14} {:>12} {:>12}",
        "replicas", "cmds/s", "Redis µs/s", "Redis CPU ms/s", "ZRANGE/s", "PING/s"
    );
    let mut first: Option<f64> = None;
    for &count in &args.idle_replicas {
        while extra.len() < 3 * count.saturating_sub(1) {
            let stack = &bench.stack;
            for service in [&stack.plans, &stack.billing, &stack.messaging] {
                extra.push(service.replica().await);
            }
        }
        while extra.len() > 3 * count.saturating_sub(1) {
            let mut gone = extra.pop().unwrap();
            gone.terminate();
            gone.wait_exit(Duration::from_secs(10)).await;
        }
        // Registrations settle (departed replicas' run out) before measuring.
        tokio::time::sleep(Duration::from_secs(4)).await;
        bench.reset_redis_stats().await;
        let cpu_before = cpu_of(redis);
        let started = Instant::now();
        tokio::time::sleep(args.idle_window).await;
        let rows = bench.redis_commands().await;
        let secs = started.elapsed().as_secs_f64();
        let cpu = cpu_of(redis).saturating_sub(cpu_before);
        let calls = |name: &str| {
            rows.iter()
                .filter(|r| r.0 == name)
                .map(|r| r.1)
                .sum::<u64>() as f64
                / secs
        };
        let total_calls = rows.iter().map(|r| r.1).sum::<u64>() as f64 / secs;
        let usec = rows.iter().map(|r| r.2).sum::<f64>() / secs;
        println!(
            "{:<10} {:>9.1} {:>11.1} {:>14.2} {:>12.1} {:>12.1}",
            count,
            total_calls,
            usec,
            cpu.as_secs_f64() * 1e3 / secs,
            calls("zrange"),
            calls("ping")
        );
        if args.redis_stats {
            for (name, n, us) in &rows {
                println!(
                    "    {name:<24} {:>9.1}/s {:>9.1} µs/s",
                    *n as f64 / secs,
                    us / secs
                );
            }
        }
        match first {
            None => first = Some(usec),
            Some(base) => println!(
                "           Redis µs/s {:.2}x of {} replica(s)",
                usec / base.max(1e-9),
                args.idle_replicas[0]
            ),
        }
    }
    for mut process in extra {
        process.terminate();
        process.wait_exit(Duration::from_secs(10)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logged(label: &str, micros: u64, nested: bool) -> Logged {
        Logged {
            label: label.to_string(),
            micros,
            nested,
        }
    }

    #[test]
    fn a_scripts_commands_are_counted_under_it_and_top_level_ones_alone() {
        let rows = by_script(&[
            logged("hset", 2, true),
            logged("xadd", 3, true),
            logged("script debit", 20, false),
            logged("zadd", 4, false),
            logged("hset", 1, true),
            logged("script debit", 10, false),
        ]);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].0, "script debit");
        assert_eq!(
            rows[0].1,
            Row {
                calls: 2,
                micros: 30,
                inner: [("hset".to_string(), (2, 3)), ("xadd".to_string(), (1, 3))]
                    .into_iter()
                    .collect(),
            }
        );
        assert_eq!(
            rows[1],
            (
                "zadd".to_string(),
                Row {
                    calls: 1,
                    micros: 4,
                    inner: Default::default(),
                }
            )
        );
    }

    #[test]
    fn every_script_of_the_services_has_a_name_by_its_hash() {
        let names = script_names();
        assert_eq!(
            names.get(redis::Script::new(billing_credits::store::SCRIPTS[1].1).get_hash()),
            Some(&"debit")
        );
        let scripts = billing_credits::store::SCRIPTS.len()
            + ::messaging::store::SCRIPTS.len()
            + subscription_plan::store::SCRIPTS.len()
            + inmail_shared::state::idempotency::SCRIPTS.len()
            + inmail_shared::state::sweep::SCRIPTS.len();
        assert_eq!(names.len(), scripts, "two scripts share a hash");
    }
}
