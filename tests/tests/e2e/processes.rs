//! The real binaries in child processes: configuration errors, SIGTERM
//! draining, the healthcheck subcommand, and SIGKILL in the middle of sends.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use inmail_shared::contract::proto::billing::v1 as billing;
use inmail_shared::contract::proto::messaging::v1 as pb;
use inmail_shared::contract::proto::plans::v1 as plans;
use inmail_tests::processes::{ProcessStack, ServiceProcess, binary};
use inmail_tests::redis_server::free_port;
use inmail_tests::{As, RedisServer, billing_at, channel, clock_at, messaging_at, plans_at, rid};
use tonic::Code;

use crate::common::*;

/// Runs a binary to its end: its exit code and what it wrote to stderr. A
/// binary still running after 10 s is killed (exit code `None`).
pub(crate) fn run(name: &str, env: &[(&str, &str)], args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(binary(name))
        .env_clear()
        .envs(env.iter().copied())
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the binary");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait for the binary") {
            break status.code();
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        use std::io::Read;
        let _ = pipe.read_to_string(&mut stderr);
    }
    (code, stderr)
}

#[test]
fn malformed_configuration_is_refused_with_a_clear_message() {
    let listen = format!("127.0.0.1:{}", free_port());
    for (name, env, names) in [
        (
            "billing-credits",
            vec![
                ("REDIS_URL", "http://not-redis"),
                ("LISTEN_ADDR", listen.as_str()),
            ],
            "REDIS_URL",
        ),
        (
            "messaging",
            vec![("LISTEN_ADDR", "not-an-address")],
            "LISTEN_ADDR",
        ),
        ("billing-credits", vec![("HOLD_TTL", "soon")], "HOLD_TTL"),
        (
            "messaging",
            vec![
                ("BILLING_CREDITS_URL", "not a url"),
                ("LISTEN_ADDR", listen.as_str()),
            ],
            "BILLING_CREDITS_URL",
        ),
        (
            "subscription-plan",
            vec![
                ("PLANS_FILE", "/nonexistent/plans.toml"),
                ("LISTEN_ADDR", listen.as_str()),
            ],
            "PLANS_FILE",
        ),
        ("messaging", vec![("INMAIL_BURST", "0")], "INMAIL_BURST"),
        (
            "subscription-plan",
            vec![("LOG_FORMAT", "xml")],
            "LOG_FORMAT",
        ),
    ] {
        let (code, stderr) = run(name, &env, &[]);
        assert!(
            matches!(code, Some(c) if c != 0),
            "{name} {env:?} exited with {code:?}"
        );
        assert!(
            stderr.contains(names),
            "{name}: the message does not name {names}: {stderr}"
        );
    }
    // A catalog that breaks the rules is refused before serving.
    let dir = std::env::temp_dir().join(format!("inmail-catalog-{}", rid()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("plans.toml");
    std::fs::write(
        &file,
        "[[plans]]\nid = \"free\"\nname = \"Free\"\nmonthly_credits = 0\nrollover_cap = 0\ncycle = \"calendar-month\"\npaid = false\n\
         [[plans]]\nid = \"free\"\nname = \"Again\"\nmonthly_credits = 0\nrollover_cap = 0\ncycle = \"calendar-month\"\npaid = false\n",
    )
    .unwrap();
    let (code, stderr) = run(
        "subscription-plan",
        &[
            ("PLANS_FILE", file.to_str().unwrap()),
            ("LISTEN_ADDR", &listen),
        ],
        &[],
    );
    assert_eq!(code, Some(1));
    assert!(stderr.contains("duplicate id"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

/// SIGTERM: health turns NOT_SERVING first, the call in flight still gets its
/// answer, and the process exits by itself within the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_reports_not_serving_drains_and_exits() {
    let redis = RedisServer::start().await;
    // No subscription-plan: a first balance query waits on it until its deadline.
    let mut billing_process = ServiceProcess::start(
        "billing-credits",
        redis
            .service_env()
            .into_iter()
            .chain(inmail_tests::pki().service_env("billing-credits"))
            .chain([
                (
                    "SUBSCRIPTION_PLAN_URL".into(),
                    format!("https://127.0.0.1:{}", free_port()),
                ),
                ("SHUTDOWN_GRACE".into(), "5s".into()),
            ])
            .collect(),
    )
    .await;
    let mut health = inmail_tests::HealthClient::new(channel(billing_process.addr));
    let mut watch = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status,
        inmail_tests::SERVING
    );

    let mut client = billing_at(billing_process.addr, &As::member("zoe"));
    let in_flight = tokio::spawn(async move {
        let mut call = tonic::Request::new(billing::GetBalanceRequest {
            member_id: "zoe".into(),
        });
        call.set_timeout(Duration::from_secs(2));
        client.get_balance(call).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    billing_process.terminate();

    let next = tokio::time::timeout(Duration::from_secs(2), watch.message()).await;
    let status = next.expect("health update").unwrap().unwrap().status;
    assert_eq!(status, inmail_tests::NOT_SERVING);

    let answer = in_flight.await.unwrap().unwrap_err();
    assert!(
        matches!(answer.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{answer:?}"
    );
    if answer.code() == Code::Unavailable {
        assert_eq!(
            reason(&answer),
            "SUBSCRIPTION_PLAN_UNAVAILABLE",
            "a drained answer, not a dropped call"
        );
    }
    let exited = billing_process
        .wait_exit(Duration::from_secs(7))
        .await
        .expect("exited within the grace period");
    assert!(exited.success(), "{exited:?}");
    assert!(billing_process.logs().contains("NOT_SERVING"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_subcommand_exits_zero_only_when_serving() {
    let redis = RedisServer::start().await;
    let tls = inmail_tests::pki().service_env("subscription-plan");
    let plans_process = ServiceProcess::start(
        "subscription-plan",
        redis.service_env().into_iter().chain(tls.clone()).collect(),
    )
    .await;
    let addr = plans_process.addr.to_string();
    let with_tls = |listen: &str| -> Vec<(String, String)> {
        let mut env = tls.clone();
        env.push(("LISTEN_ADDR".into(), listen.into()));
        env
    };
    fn env_of(env: &[(String, String)]) -> Vec<(&str, &str)> {
        env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
    }
    let serving = with_tls(&addr);
    let (code, stderr) = run("subscription-plan", &env_of(&serving), &["healthcheck"]);
    assert_eq!(code, Some(0), "{stderr}");
    let dead = with_tls(&format!("127.0.0.1:{}", free_port()));
    let (code, _) = run("subscription-plan", &env_of(&dead), &["healthcheck"]);
    assert_eq!(code, Some(1));
    drop(redis);
    assert!(
        eventually(Duration::from_secs(5), || async {
            run("subscription-plan", &env_of(&serving), &["healthcheck"]).0 == Some(1)
        })
        .await,
        "healthcheck kept passing without Redis"
    );
}

/// SIGKILL messaging and billing in the middle of a storm of InMails; clients
/// retry with their request ids, as they should. After the bounded recovery
/// time every delivered InMail has a confirmed charge, every charge belongs
/// to a delivered InMail, and every ledger adds up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_sends_leaves_no_orphan_charge_and_no_free_inmail() {
    let mut stack = ProcessStack::start(|name| match name {
        "messaging" => vec![("INMAIL_BURST".into(), "1000".into())],
        _ => vec![],
    })
    .await;
    let senders: Vec<String> = (0..8).map(|i| format!("sender{i}")).collect();
    for sender in &senders {
        plans_at(stack.plans.addr, &As::member(sender))
            .subscribe(plans::SubscribeRequest {
                request_id: rid(),
                member_id: sender.clone(),
                plan_id: "recruiter-lite".into(),
            })
            .await
            .unwrap();
    }
    let requests: Vec<pb::SendMessageRequest> = senders
        .iter()
        .flat_map(|s| {
            (0..12).map(move |i| send_request(s, &format!("{s}-lead{i}"), "Hi", "A role for you"))
        })
        .collect();
    let messaging_addr = stack.messaging.addr;
    let storm: Vec<_> = requests
        .iter()
        .cloned()
        .map(|request| {
            tokio::spawn(async move {
                let mut client = messaging_at(messaging_addr, &As::member(&request.sender_id));
                let mut call = tonic::Request::new(request);
                call.set_timeout(Duration::from_secs(3));
                client.send_message(call).await
            })
        })
        .collect();
    // Kill while InMails are in flight: once some are staged (each has an
    // outbox entry until it is delivered or given up).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while inmail_tests::outbox_len(&stack.redis).await == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no InMail was ever in flight"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stack.messaging.kill();
    tokio::time::sleep(Duration::from_millis(100)).await;
    stack.billing.kill();
    let mut interrupted = 0;
    for call in storm {
        if let Err(status) = call.await.unwrap()
            && matches!(
                status.code(),
                Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
            )
        {
            interrupted += 1;
        }
    }
    assert!(interrupted > 0, "the kill interrupted no send in flight");
    stack.billing.restart().await;
    stack.messaging.restart().await;

    // Clients retry what did not get a definitive answer.
    let mut outcomes: HashMap<String, Result<(), String>> = HashMap::new();
    for request in &requests {
        let mut client = messaging_at(stack.messaging.addr, &As::member(&request.sender_id));
        let mut outcome = Err("never answered".to_string());
        for _ in 0..20 {
            match client.send_message(request.clone()).await {
                Ok(_) => {
                    outcome = Ok(());
                    break;
                }
                Err(s)
                    if matches!(
                        s.code(),
                        Code::Unavailable
                            | Code::Aborted
                            | Code::DeadlineExceeded
                            | Code::Unknown
                            | Code::Cancelled
                    ) =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(s) => {
                    outcome = Err(reason(&s));
                    break;
                }
            }
        }
        outcomes.insert(request.request_id.clone(), outcome);
    }
    for (id, outcome) in &outcomes {
        // Delivered, or given up (SEND_ABANDONED): nothing else.
        assert!(
            outcome.as_ref().err().is_none_or(|r| r == "SEND_ABANDONED"),
            "request {id}: {outcome:?}"
        );
    }

    // Past every bound: holds (30s) and unfinished sends (60s) are settled.
    let mut clock = clock_at(stack.messaging.addr);
    inmail_tests::advance(&mut clock, Duration::from_secs(120)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        inmail_tests::outbox_len(&stack.redis).await,
        0,
        "unfinished work left behind"
    );

    let mut billing_client = billing_at(stack.billing.addr, &As::Operator);
    for sender in &senders {
        let delivered: Vec<pb::Conversation> =
            messaging_at(stack.messaging.addr, &As::member(sender))
                .list_conversations(pb::ListConversationsRequest {
                    member_id: sender.clone(),
                    page_size: 500,
                    page_token: String::new(),
                })
                .await
                .unwrap()
                .into_inner()
                .conversations
                .into_iter()
                .filter(|c| c.inmail.as_ref().is_some_and(|i| &i.sender_id == sender))
                .collect();
        let succeeded = requests
            .iter()
            .filter(|r| &r.sender_id == sender && outcomes[&r.request_id].is_ok())
            .count();
        assert_eq!(
            delivered.len(),
            succeeded,
            "{sender}: delivered InMails vs successful sends"
        );
        for conversation in &delivered {
            let inmail = conversation.inmail.as_ref().unwrap();
            let debit = billing_client
                .get_debit(billing::GetDebitRequest {
                    member_id: sender.clone(),
                    message_id: inmail.message_id.clone(),
                })
                .await
                .unwrap()
                .into_inner()
                .debit
                .unwrap();
            assert_eq!(
                debit.state,
                billing::DebitState::Confirmed as i32,
                "delivered without a final charge"
            );
        }
        let balance = billing_client
            .get_balance(billing::GetBalanceRequest {
                member_id: sender.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .balance
            .unwrap();
        assert_eq!(
            balance.available,
            30 - delivered.len() as i64,
            "{sender}: a charge without a delivered InMail"
        );
    }
    inmail_tests::assert_ledgers_reconcile(&mut billing_client).await;
}

/// The replicas of billing share the hold sweeper's shards: while three run,
/// each registers in the group and the hold index is scanned about as often
/// as with one (not three times as often). When one is killed, the others
/// take its shards once its registration runs out: holds in every shard are
/// still released; one stopped gracefully leaves the group at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hold_sweeping_is_shared_by_the_replicas_and_taken_over_from_a_killed_one() {
    // Counts commands on one Redis (INFO commandstats).
    inmail_tests::redis_server::single_redis_only();
    let mut stack = ProcessStack::start(|name| match name {
        "billing-credits" => vec![
            ("HOLD_TTL".into(), "1s".into()),
            ("SWEEP_INTERVAL".into(), "200ms".into()),
        ],
        _ => Vec::new(),
    })
    .await;
    let mut redis = redis::Client::open(stack.redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // Registrations that have not run out (scored by when they do).
    async fn registered(redis: &mut redis::aio::MultiplexedConnection) -> u64 {
        let now = chrono::Utc::now().timestamp_millis();
        redis::cmd("ZCOUNT")
            .arg("billing:sweepers")
            .arg(now)
            .arg("+inf")
            .query_async(redis)
            .await
            .unwrap()
    }

    // Hold-index scans (ZRANGE on billing:holds:*) per second: with one
    // billing, then with three.
    async fn zrange_calls_in(
        redis: &mut redis::aio::MultiplexedConnection,
        window: Duration,
    ) -> u64 {
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(redis)
            .await
            .unwrap();
        tokio::time::sleep(window).await;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(redis)
            .await
            .unwrap();
        info.lines()
            .find_map(|l| l.strip_prefix("cmdstat_zrange:calls="))
            .and_then(|rest| rest.split(',').next())
            .map(|n| n.parse().unwrap())
            .unwrap_or(0)
    }
    let window = Duration::from_secs(3);
    let alone = zrange_calls_in(&mut redis, window).await;
    let mut second = stack.billing.replica().await;
    let third = stack.billing.replica().await;
    let three = eventually(Duration::from_secs(5), || {
        let mut redis = redis.clone();
        async move { registered(&mut redis).await == 3 }
    })
    .await;
    assert!(three, "three replicas never registered in billing:sweepers");
    let shared = zrange_calls_in(&mut redis, window).await;
    // The messaging sweeper scans its outbox with ZRANGE too: both counts
    // include its 16 shards per round. Unshared, three billings would make
    // it (16 * 3 + 16) / (16 + 16) = 2x.
    assert!(
        alone > 0 && (shared as f64) < 1.4 * alone as f64,
        "hold index scans: {alone} with one replica, {shared} with three"
    );

    // SIGKILL one replica; then holds made in every shard (members spread
    // over the 16) must all be released by the survivors.
    stack.billing.kill();
    let survivor = billing_at(second.addr, &As::Service("messaging"));
    let members: Vec<String> = (0..48).map(|i| format!("takeover-{i}")).collect();
    for member in &members {
        plans_at(stack.plans.addr, &As::member(member))
            .subscribe(plans::SubscribeRequest {
                request_id: rid(),
                member_id: member.clone(),
                plan_id: "premium-career".into(),
            })
            .await
            .unwrap();
        // A hold lives max(HOLD_TTL, the call's deadline).
        let mut debit = tonic::Request::new(billing::DebitForMessageRequest {
            request_id: rid(),
            member_id: member.clone(),
            message_id: format!("{member}-held"),
            amount: 1,
        });
        debit.set_timeout(Duration::from_secs(1));
        survivor.clone().debit_for_message(debit).await.unwrap();
    }
    // HOLD_TTL (1 s) + the dead replica's registration (3 intervals) + a
    // sweep, with margin for a loaded machine.
    let all_released = eventually(Duration::from_secs(6), || {
        let survivor = survivor.clone();
        let members = members.clone();
        async move {
            for member in &members {
                let state = survivor
                    .clone()
                    .get_debit(billing::GetDebitRequest {
                        member_id: member.clone(),
                        message_id: format!("{member}-held"),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .debit
                    .unwrap()
                    .state;
                if state == billing::DebitState::Held as i32 {
                    return false;
                }
            }
            true
        }
    })
    .await;
    assert!(
        all_released,
        "holds in the killed replica's shards were not taken over"
    );
    let two = eventually(Duration::from_secs(3), || {
        let mut redis = redis.clone();
        async move { registered(&mut redis).await == 2 }
    })
    .await;
    assert!(two, "the killed replica did not drop out of the group");

    // SIGTERM: the replica takes its entry out of the group as it stops (an
    // entry that merely runs out stays until a cleanup round).
    let now = chrono::Utc::now().timestamp_millis();
    let live: Vec<String> = redis::cmd("ZRANGE")
        .arg("billing:sweepers")
        .arg(now)
        .arg("+inf")
        .arg("BYSCORE")
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(live.len(), 2, "{live:?}");
    second.terminate();
    second
        .wait_exit(Duration::from_secs(10))
        .await
        .expect("exited");
    let entries: Vec<String> = redis::cmd("ZRANGE")
        .arg("billing:sweepers")
        .arg(0)
        .arg(-1)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(
        live.iter().filter(|id| !entries.contains(id)).count(),
        1,
        "a replica stopped gracefully did not leave the group: {live:?} then {entries:?}"
    );
    let one = eventually(Duration::from_secs(3), || {
        let mut redis = redis.clone();
        async move { registered(&mut redis).await == 1 }
    })
    .await;
    assert!(one, "one replica should be left in the group");
    drop(third);
}

/// `messaging dev-pki` on a directory that holds a PKI keeps it (the CA,
/// keys and passwords) but rewrites its Redis ACL files to the current
/// rules, so an older development PKI gets the grants a release adds.
#[test]
fn dev_pki_keeps_an_existing_pki_and_refreshes_its_acl_files() {
    let dir = std::env::temp_dir().join(format!("inmail-devpki-{}", rid()));
    let path = dir.to_string_lossy().into_owned();
    let (code, stderr) = run("messaging", &[], &["dev-pki", "--dir", &path]);
    assert_eq!(code, Some(0), "{stderr}");
    let ca = std::fs::read(dir.join("ca.crt")).unwrap();
    let acl = std::fs::read_to_string(dir.join("redis-users.acl")).unwrap();
    assert!(acl.contains("~plans:*:rev"), "{acl}");
    // An ACL file from an older release.
    std::fs::write(
        dir.join("redis-users.acl"),
        "user default on nopass ~* +@all\n",
    )
    .unwrap();
    std::fs::write(dir.join("redis-users-test-clock.acl"), "stale\n").unwrap();
    let (code, stderr) = run("messaging", &[], &["dev-pki", "--dir", &path]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        std::fs::read(dir.join("ca.crt")).unwrap(),
        ca,
        "the CA was replaced"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("redis-users.acl")).unwrap(),
        acl,
        "the ACL file was not brought to the current rules"
    );
    let test_clock = std::fs::read_to_string(dir.join("redis-users-test-clock.acl")).unwrap();
    assert!(test_clock.contains("~testclock:*"), "{test_clock}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Health does not ping a Redis that answered the service's own work within
/// the last two check intervals: idle billing and messaging, whose sweeps
/// talk to Redis every SWEEP_INTERVAL (1 s), add no PINGs, so an idle replica
/// costs Redis its sweep registration and no more. subscription-plan, which
/// has no background work, still pings (twice a second). Health stays
/// SERVING throughout (that a dead Redis still turns it NOT_SERVING is
/// `foundation::health_follows_redis_and_service_resumes_by_itself`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_services_whose_sweeps_reach_redis_do_not_ping_it_for_health() {
    // Counts commands on one Redis (INFO commandstats).
    inmail_tests::redis_server::single_redis_only();
    let stack = ProcessStack::start(|_| Vec::new()).await;
    let mut redis = redis::Client::open(stack.redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // Past start-up (the first sweep rounds run at once).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut redis)
        .await
        .unwrap();
    let window = Duration::from_secs(4);
    tokio::time::sleep(window).await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut redis)
        .await
        .unwrap();
    let calls = |command: &str| -> u64 {
        info.lines()
            .find_map(|l| l.strip_prefix(&format!("cmdstat_{command}:calls=")))
            .and_then(|rest| rest.split(',').next())
            .map(|n| n.parse().unwrap())
            .unwrap_or(0)
    };
    let (pings, zadds) = (calls("ping"), calls("zadd"));
    // The rule: subscription-plan, without background work, pings once per
    // check interval; billing and messaging add none while their sweeps
    // reach Redis within two intervals. Slack: one ping for where the window
    // falls, one for a sweep round a loaded machine delays past two
    // intervals (every service pinging would be three times as many).
    let interval = inmail_shared::runtime::bootstrap::REDIS_WATCH_INTERVAL;
    let plans_alone = (window.as_millis() / interval.as_millis()) as u64;
    assert!(
        pings <= plans_alone + 2,
        "{pings} PINGs in {window:?} with the services idle (ZADD, the sweep registrations: {zadds})"
    );
    assert!(
        zadds >= 4,
        "the sweepers did not run during the window ({zadds} registrations)"
    );
    for addr in [stack.plans.addr, stack.billing.addr, stack.messaging.addr] {
        assert_eq!(
            inmail_tests::health(addr).await.unwrap(),
            inmail_tests::SERVING,
            "{addr}"
        );
    }
}
