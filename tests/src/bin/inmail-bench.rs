//! inmail-bench: the load tool. Starts its own Redis and the three release
//! binaries (or uses a running stack), then drives, at one concurrency and
//! in one run:
//!
//! 1. `direct`: billing's debit script straight on Redis (the same script,
//!    keys and round trips billing makes), the baseline;
//! 2. `debit`: DebitForMessage over gRPC (distinct message ids, many members);
//! 3. `send`: SendMessage over gRPC, InMails to distinct recipients from many
//!    senders (the whole saga: plans, debit, confirm, delivery).
//!
//! It prints throughput, p50/p99/p999 latency, errors, the ratios between
//! them, and the CPU each process used: on a 2-core machine the load tool,
//! the services and Redis share the cores, so ratios from one run are the
//! honest figure.
//!
//! Build and run: `cargo build --release --bins && target/release/inmail-bench`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use billing_credits::store::{BillingStore, Call};
use clap::Parser;
use hdrhistogram::Histogram;
use inmail_shared::proto::billing::v1 as billing;
use inmail_shared::proto::messaging::v1 as messaging;
use inmail_shared::proto::plans::v1 as plans;
use inmail_shared::storage::{Redis, RedisSettings};
use inmail_tests::processes::ProcessStack;
use inmail_tests::{BillingClient, MessagingClient, PlansClient, channel};

#[derive(Debug, Parser)]
#[command(
    name = "inmail-bench",
    about = "Load tool: direct Redis script vs Debit vs SendMessage"
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
    /// Members debited (and senders of InMail).
    #[arg(long, default_value_t = 1000)]
    members: usize,
    /// Scenarios to run, in order.
    #[arg(long, value_delimiter = ',', default_value = "direct,debit,send")]
    scenarios: Vec<String>,
    /// Also print Redis' INFO commandstats per measured call.
    #[arg(long)]
    redis_stats: bool,
    /// Tokio worker threads of each service (TOKIO_WORKER_THREADS; default:
    /// one per core).
    #[arg(long)]
    service_worker_threads: Option<usize>,
    /// Redis AOF fsync policy for the run (the shipped configuration: always).
    #[arg(long, default_value = "always")]
    appendfsync: String,
}

/// Redis time per measured call, by command (includes the warm-up's calls,
/// so per-call figures are slightly high).
async fn redis_stats(conn: &mut redis::aio::MultiplexedConnection, calls: u64) {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
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
        .collect();
    rows.sort_by(|a, b| b.2.total_cmp(&a.2));
    let total: f64 = rows.iter().map(|r| r.2).sum();
    println!(
        "{:<12} redis: {:.1} µs of Redis time per call",
        "",
        total / calls.max(1) as f64
    );
    for (name, n, usec) in rows.iter().take(8) {
        println!(
            "{:<14} {name:<10} {:>5.2} calls/op {:>6.1} µs/op",
            "",
            *n as f64 / calls.max(1) as f64,
            usec / calls.max(1) as f64
        );
    }
}

#[derive(Default)]
struct Outcome {
    histogram: Option<Histogram<u64>>,
    ok: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    bench_cpu: Duration,
    others_cpu: Vec<(String, Duration)>,
}

fn cpu_of(pid: u32) -> Duration {
    // utime + stime, fields 14 and 15 of /proc/<pid>/stat, in clock ticks.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_comm = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    let ticks: u64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Duration::from_millis(ticks * 10)
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
    tokio::time::sleep_until((measure_from).into()).await;
    let bench_cpu_start = cpu_of(std::process::id());
    let others_start: Vec<Duration> = processes.iter().map(|(_, pid)| cpu_of(*pid)).collect();
    let mut outcome = Outcome::default();
    for task in tasks {
        let (histogram, ok, errors, first_error) = task.await.unwrap();
        match &mut outcome.histogram {
            Some(total) => total.add(&histogram).unwrap(),
            None => outcome.histogram = Some(histogram),
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
    outcome.bench_cpu = cpu_of(std::process::id()).saturating_sub(bench_cpu_start);
    outcome.others_cpu = processes
        .iter()
        .zip(others_start)
        .map(|((name, pid), before)| (name.clone(), cpu_of(*pid).saturating_sub(before)))
        .collect();
    outcome
}

fn rate(outcome: &Outcome) -> f64 {
    outcome.ok as f64 / outcome.elapsed.as_secs_f64()
}

fn report(name: &str, outcome: &Outcome) {
    let h = outcome.histogram.as_ref().unwrap();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let share = |cpu: Duration| 100.0 * cpu.as_secs_f64() / outcome.elapsed.as_secs_f64();
    println!(
        "{name:<12} {:>8} ok {:>9.0}/s  p50 {:>6.2} ms  p99 {:>6.2} ms  p999 {:>6.2} ms  errors {:>5}  CPU: bench {:>4.0}%{}",
        outcome.ok,
        rate(outcome),
        ms(0.5),
        ms(0.99),
        ms(0.999),
        outcome.errors,
        share(outcome.bench_cpu),
        outcome
            .others_cpu
            .iter()
            .map(|(n, cpu)| format!(" {n} {:.0}%", share(*cpu)))
            .collect::<String>()
    );
    if let Some(error) = &outcome.first_error {
        println!("{:<12} first error: {error}", "");
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
    // The baseline script runs on one Redis: the bench always uses a single one.
    let workers = args.service_worker_threads;
    let stack = ProcessStack::start_on(inmail_tests::RedisServer::start_single().await, |name| {
        let mut env: Vec<(String, String)> = workers
            .map(|n| ("TOKIO_WORKER_THREADS".to_string(), n.to_string()))
            .into_iter()
            .collect();
        env.extend([
            ("TEST_CLOCK".into(), "false".into()),
            ("LOG_LEVEL".into(), "warn".into()),
        ]);
        if name == "messaging" {
            env.push(("INMAIL_BURST".into(), "1000000000".into()));
            env.push(("INMAIL_PER_DAY".into(), "1000000000".into()));
        }
        env
    })
    .await;
    let redis_pid = redis_pid(&stack);
    let processes: Vec<(String, u32)> = [
        ("redis".to_string(), redis_pid),
        ("plans".to_string(), stack.plans.pid()),
        ("billing".to_string(), stack.billing.pid()),
        ("messaging".to_string(), stack.messaging.pid()),
    ]
    .into_iter()
    .filter(|(_, pid)| *pid != 0)
    .collect();
    println!(
        "inmail-bench: concurrency {}, {} members, {:?} measured after {:?} warm-up, {} cores",
        args.concurrency,
        args.members,
        args.duration,
        args.warmup,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    let mut results: Vec<(String, Outcome)> = Vec::new();
    let mut redis_conn = redis::Client::open(stack.redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("appendfsync")
        .arg(&args.appendfsync)
        .query_async(&mut redis_conn)
        .await
        .unwrap();
    println!("redis: appendonly yes, appendfsync {}", args.appendfsync);
    for scenario in &args.scenarios {
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut redis_conn)
            .await
            .unwrap();
        let outcome = match scenario.as_str() {
            "direct" => direct(&args, &stack, &processes).await,
            "debit" => debit(&args, &stack, &processes).await,
            "send" => send(&args, &stack, &processes).await,
            other => panic!("unknown scenario {other:?} (direct, debit, send)"),
        };
        report(scenario, &outcome);
        if args.redis_stats {
            redis_stats(&mut redis_conn, outcome.ok + outcome.errors).await;
        }
        results.push((scenario.clone(), outcome));
    }
    let find = |name: &str| {
        results
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, o)| rate(o))
    };
    if let (Some(direct), Some(debit)) = (find("direct"), find("debit")) {
        println!("ratio debit/direct      = {:.2}", debit / direct);
    }
    if let (Some(debit), Some(send)) = (find("debit"), find("send")) {
        println!("ratio send/debit        = {:.2}", send / debit);
    }
}

fn redis_pid(stack: &ProcessStack) -> u32 {
    // The Redis of this run listens on its own port; find its pid by port.
    let port = stack
        .redis
        .url()
        .rsplit(':')
        .next()
        .unwrap_or("")
        .to_string();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let cmdline = std::fs::read_to_string(entry.path().join("cmdline")).unwrap_or_default();
        // Redis rewrites its title to "redis-server 127.0.0.1:<port>".
        if cmdline.contains("redis-server") && cmdline.contains(&format!(":{port}")) {
            return entry.file_name().to_string_lossy().parse().unwrap_or(0);
        }
    }
    0
}

fn now_ms() -> i64 {
    inmail_shared::clock::system_ms()
}

/// The debit script on Redis with nothing in between.
async fn direct(args: &Args, stack: &ProcessStack, processes: &[(String, u32)]) -> Outcome {
    let redis = Redis::open(&RedisSettings::new(stack.redis.url())).unwrap();
    let store = BillingStore::new(redis);
    let members = args.members as u64;
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
    drive(args, processes, move |i| {
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

async fn subscribe_and_fund(stack: &ProcessStack, prefix: &str, count: usize) {
    let mut plans_client = PlansClient::new(channel(stack.plans.addr));
    let mut billing_client = BillingClient::new(channel(stack.billing.addr));
    for m in 0..count {
        let member = format!("{prefix}-{m}");
        plans_client
            .subscribe(plans::SubscribeRequest {
                request_id: format!("bench-sub-{member}"),
                member_id: member.clone(),
                plan_id: "recruiter-lite".into(),
            })
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
}

async fn debit(args: &Args, stack: &ProcessStack, processes: &[(String, u32)]) -> Outcome {
    subscribe_and_fund(stack, "debit", args.members).await;
    let client = BillingClient::new(channel(stack.billing.addr));
    let members = args.members as u64;
    drive(args, processes, move |i| {
        let mut client = client.clone();
        async move {
            client
                .debit_for_message(billing::DebitForMessageRequest {
                    request_id: format!("debit-req-{i}"),
                    member_id: format!("debit-{}", i % members),
                    message_id: format!("debit-msg-{i}"),
                    amount: 1,
                })
                .await
                .map(|_| ())
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        }
    })
    .await
}

async fn send(args: &Args, stack: &ProcessStack, processes: &[(String, u32)]) -> Outcome {
    subscribe_and_fund(stack, "sender", args.members).await;
    let client = MessagingClient::new(channel(stack.messaging.addr));
    let members = args.members as u64;
    drive(args, processes, move |i| {
        let mut client = client.clone();
        async move {
            let sender = i % members;
            client
                .send_message(messaging::SendMessageRequest {
                    request_id: format!("send-req-{i}"),
                    sender_id: format!("sender-{sender}"),
                    recipient_id: format!("recipient-{i}"),
                    subject: "A role for you".into(),
                    body: "Hello! I came across your profile and would like to talk.".into(),
                })
                .await
                .map(|_| ())
                .map_err(|s| format!("{:?}: {}", s.code(), s.message()))
        }
    })
    .await
}
