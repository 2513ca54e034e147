//! What every service does the same way: health that follows Redis, load
//! shedding, deadlines, the shared test clock.

use std::time::{Duration, Instant};

use inmail_shared::contract::proto::messaging::v1 as pb;
use inmail_shared::contract::proto::testclock::v1 as clock;
use inmail_tests::{NOT_SERVING, SERVING, Stack, StackOptions, health, rid};
use tonic::Code;

use crate::common::*;

/// A Redis that answers nothing but errors is not serving: while a script
/// runs past `busy-reply-threshold`, every command (the services' sweeps
/// and health pings alike) gets `-BUSY`, and health turns NOT_SERVING;
/// once the script is killed it is SERVING again. (Error replies do not
/// count as Redis answering, which lets a health check skip its ping.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_turns_not_serving_while_redis_answers_only_errors() {
    // Blocks one Redis with a script.
    inmail_tests::redis_server::single_redis_only();
    let stack = Stack::start().await;
    let addrs = [stack.plans.addr, stack.billing.addr, stack.messaging.addr];
    for addr in addrs {
        assert_eq!(health(addr).await.unwrap(), SERVING);
    }
    let client = redis::Client::open(stack.redis.url()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("busy-reply-threshold")
        .arg(100)
        .query_async(&mut admin)
        .await
        .unwrap();
    let mut blocked = client.get_multiplexed_async_connection().await.unwrap();
    let busy = tokio::spawn(async move {
        redis::cmd("EVAL")
            .arg("while true do end")
            .arg(0)
            .query_async::<redis::Value>(&mut blocked)
            .await
    });
    for addr in addrs {
        assert!(
            eventually(Duration::from_secs(6), || async {
                matches!(health(addr).await, Ok(NOT_SERVING))
            })
            .await,
            "{addr} kept reporting SERVING while Redis answered only BUSY"
        );
    }
    let killed = eventually(Duration::from_secs(5), || {
        let mut admin = admin.clone();
        async move {
            redis::cmd("SCRIPT")
                .arg("KILL")
                .query_async::<()>(&mut admin)
                .await
                .is_ok()
        }
    })
    .await;
    assert!(killed, "SCRIPT KILL did not stop the script");
    assert!(busy.await.unwrap().is_err(), "the killed script answered");
    for addr in addrs {
        assert!(
            eventually(Duration::from_secs(10), || async {
                matches!(health(addr).await, Ok(SERVING))
            })
            .await,
            "{addr} did not come back to SERVING"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_redis_and_service_resumes_by_itself() {
    let mut stack = Stack::start().await;
    let addrs = [stack.plans.addr, stack.billing.addr, stack.messaging.addr];
    for addr in addrs {
        assert_eq!(health(addr).await.unwrap(), SERVING);
    }
    stack.redis.kill();
    for addr in addrs {
        assert!(
            eventually(Duration::from_secs(5), || async {
                matches!(health(addr).await, Ok(NOT_SERVING))
            })
            .await,
            "{addr} kept reporting SERVING without Redis"
        );
    }
    for (name, started, result) in [
        ("plans", Instant::now(), subscription_status(&stack).await),
        ("messaging", Instant::now(), preference_status(&stack).await),
    ] {
        let status = result.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{name}: {status:?}");
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{name} took {:?}",
            started.elapsed()
        );
    }
    stack.redis.restart().await;
    for addr in addrs {
        assert!(
            eventually(Duration::from_secs(10), || async {
                matches!(health(addr).await, Ok(SERVING))
            })
            .await,
            "{addr} did not come back"
        );
    }
    subscription_status(&stack).await.expect("plans resumed");
    preference_status(&stack).await.expect("messaging resumed");
}

async fn subscription_status(stack: &Stack) -> Result<(), tonic::Status> {
    stack
        .plans_as("any")
        .get_subscription(
            inmail_shared::contract::proto::plans::v1::GetSubscriptionRequest {
                member_id: "any".into(),
            },
        )
        .await
        .map(|_| ())
}

async fn preference_status(stack: &Stack) -> Result<(), tonic::Status> {
    stack
        .messaging_as("any")
        .get_inmail_preference(pb::GetInmailPreferenceRequest {
            member_id: "any".into(),
        })
        .await
        .map(|_| ())
}

/// Beyond MAX_CONCURRENT_REQUESTS a call is shed at once with
/// RESOURCE_EXHAUSTED and RetryInfo; health still answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_shed_with_retry_info() {
    // An InMail whose saga stalls after the debit (then fails UNAVAILABLE)
    // holds the only slot meanwhile.
    let hook: messaging::send::AfterDebitHook = std::sync::Arc::new(|| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            Some(inmail_shared::ApiError::unavailable(
                "STORAGE_UNAVAILABLE",
                "injected stall",
            ))
        })
    });
    let stack = Stack::start_with(StackOptions {
        messaging_args: vec!["--max-concurrent-requests".into(), "1".into()],
        faults: messaging::send::Faults {
            after_debit: Some(hook),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    subscribe(&stack, "xia", "premium-career").await;
    let mut client = stack.messaging_as("xia");
    let slow = tokio::spawn(async move {
        let mut call = tonic::Request::new(send_request("xia", "yan", "Hi", "Hello"));
        call.set_timeout(Duration::from_secs(3));
        client.send_message(call).await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let shed = preference_status(&stack).await.unwrap_err();
    assert_eq!(shed.code(), Code::ResourceExhausted);
    assert_eq!(reason(&shed), "SERVER_OVERLOADED");
    use tonic_types::StatusExt;
    assert!(
        shed.get_details_retry_info()
            .and_then(|r| r.retry_delay)
            .is_some()
    );
    assert_eq!(health(stack.messaging.addr).await.unwrap(), SERVING);
    let slow = slow.await.unwrap().unwrap_err();
    assert_eq!(slow.code(), Code::Unavailable, "{slow:?}");
    preference_status(&stack)
        .await
        .expect("the slot is free again");
}

/// A call's deadline bounds the whole chain: messaging gives up on a
/// missing subscription-plan within the caller's budget, not its own 10s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_deadline_bounds_downstream_calls() {
    let mut stack = Stack::start().await;
    stack.plans.stop().await;
    let started = Instant::now();
    let mut call = tonic::Request::new(send_request("amy", "ben", "Hi", "Hello"));
    call.set_timeout(Duration::from_millis(700));
    let status = stack
        .messaging_as("amy")
        .send_message(call)
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(
        matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded),
        "{status:?}"
    );
    assert!(took < Duration::from_millis(1500), "took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_advance_moves_the_clock_of_all_three_services() {
    let stack = Stack::start().await;
    let before = stack.now().await;
    let mut via_plans = inmail_tests::clock_at(stack.plans.addr);
    inmail_tests::advance(&mut via_plans, DAY * 30).await;
    for addr in [stack.plans.addr, stack.billing.addr, stack.messaging.addr] {
        let now = inmail_tests::clock_at(addr)
            .get_time(clock::GetTimeRequest {})
            .await
            .unwrap()
            .into_inner();
        assert!(now.test_clock_enabled);
        let now = ts(&now.now);
        let moved = now - before;
        assert!(
            moved >= chrono::TimeDelta::days(30)
                && moved < chrono::TimeDelta::days(30) + chrono::TimeDelta::seconds(30)
        );
    }
    let back = stack
        .clock()
        .set_time(clock::SetTimeRequest {
            request_id: rid(),
            time: Some(inmail_shared::contract::time::to_timestamp(before)),
        })
        .await
        .unwrap_err();
    assert_eq!(reason(&back), "CLOCK_WOULD_GO_BACK");
}

/// Off by default: a service started without --test-clock does not serve
/// the test clock at all (issue 10).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_clock_is_refused_when_off() {
    let redis = inmail_tests::RedisServer::start().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let cli = inmail_shared::runtime::cli::parse_from::<subscription_plan::Service, _, _>(
        std::iter::once("subscription-plan".to_string())
            .chain(redis.service_args())
            .chain(inmail_tests::pki().service_args("subscription-plan")),
    );
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(subscription_plan::serve(cli.args, listener, stop.clone()));
    inmail_tests::wait_serving(addr).await;
    // Not served at all: even an operator cannot reach it.
    let mut clock = inmail_tests::clock_at(addr);
    let refused = clock
        .advance_time(clock::AdvanceTimeRequest {
            request_id: rid(),
            by: Some(Duration::from_secs(60).try_into().unwrap()),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");
    // It says how to turn it on (issue 18: it answered "not served here").
    assert!(refused.message().contains("TEST_CLOCK=true"), "{refused:?}");
    let refused = clock.get_time(clock::GetTimeRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unimplemented, "{refused:?}");
    stop.cancel();
    server.await.unwrap().unwrap();
}

/// Each service reaches Redis as its own ACL user, limited to its own key
/// prefix: the stack works so, and billing's user cannot read messaging's
/// keys, nor subscription-plan's (but what it publishes: the subscription
/// revision for billing; the revision and Open Profile, read-only, for
/// messaging), nor run what the rules leave out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_service_uses_its_own_redis_user_limited_to_its_prefix() {
    use inmail_shared::runtime::auth::redis_acl::PROBE_USER;
    // Every test Redis has the services' users with the shipped rules, and
    // every test service connects as its own (tests/src/identity.rs).
    let stack = Stack::start().await;
    let credentials: std::collections::HashMap<&str, &str> = inmail_tests::pki()
        .pki
        .redis_passwords
        .iter()
        .map(|(service, password)| (service.as_str(), password.as_str()))
        .collect();
    subscribe(&stack, "acl", "premium-career").await;
    send(&stack, "acl", "bee").await.unwrap();
    respond(&stack, "bee", "acl~bee", pb::InmailResponse::Accept, "")
        .await
        .unwrap();
    assert_eq!(available(&stack, "acl").await, 5);
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;

    // As billing's user: its own keys, nothing of messaging's.
    // A connection as a service's Redis user, routed as the services route.
    let connect_as = |service: &str| {
        let settings = inmail_shared::state::storage::RedisSettings {
            cluster: stack.redis.is_cluster(),
            username: Some(service.into()),
            password: Some(credentials[service].to_string()),
            ..inmail_shared::state::storage::RedisSettings::new(stack.redis.url())
        };
        inmail_shared::state::storage::Redis::open(&settings)
            .unwrap()
            .conn()
    };
    let password = credentials["billing-credits"];
    let mut conn = connect_as("billing-credits");
    let own: Option<String> = redis::cmd("HGET")
        .arg("billing:{acl}:account")
        .arg("balance")
        .query_async(&mut conn)
        .await
        .expect("billing reads its own keys");
    assert_eq!(own.as_deref(), Some("5"));
    // Of subscription-plan's keys only the revision it publishes.
    let revision: Option<String> = redis::cmd("GET")
        .arg("plans:{acl}:rev")
        .query_async(&mut conn)
        .await
        .expect("billing reads a member's subscription revision");
    assert_eq!(revision.as_deref(), Some("1"));
    let keyed = [
        redis::cmd("HGETALL")
            .arg("messaging:{acl~bee}:conv")
            .clone(),
        redis::cmd("HGETALL")
            .arg("plans:{acl}:subscription")
            .clone(),
        redis::cmd("EVAL")
            .arg("return redis.call('HSET', KEYS[1], 'rev', 99)")
            .arg(1)
            .arg("plans:{acl}:subscription")
            .clone(),
        redis::cmd("HGETALL").arg("plans:{acl}:request:any").clone(),
        redis::cmd("EVAL")
            .arg("return redis.call('HGETALL', KEYS[1])")
            .arg(1)
            .arg("messaging:{acl~bee}:conv")
            .clone(),
    ];
    for command in keyed {
        let refused: Result<redis::Value, _> = command.query_async(&mut conn).await;
        let error = refused.expect_err("billing's user was let through");
        assert!(
            error.to_string().to_uppercase().contains("NOPERM"),
            "{error}"
        );
    }
    // As messaging's user: of subscription-plan's keys only what it
    // publishes, and only to read (the send above read them).
    let mut messaging_conn = connect_as("messaging");
    let open: Option<String> = redis::cmd("GET")
        .arg("plans:{acl}:open")
        .query_async(&mut messaging_conn)
        .await
        .expect("messaging reads a member's published Open Profile");
    assert_eq!(open.as_deref(), Some("1:0:0:0"));
    let all: bool = redis::cmd("EXISTS")
        .arg("plans:published")
        .query_async(&mut messaging_conn)
        .await
        .expect("messaging reads whether all is published");
    assert!(all);
    for command in [
        redis::cmd("SET")
            .arg("plans:{acl}:open")
            .arg("1:1:0:1")
            .clone(),
        redis::cmd("SET").arg("plans:{acl}:rev").arg("9").clone(),
        redis::cmd("DEL").arg("plans:published").clone(),
        redis::cmd("HGETALL")
            .arg("plans:{acl}:subscription")
            .clone(),
        redis::cmd("EVAL")
            .arg("return redis.call('GET', KEYS[1])")
            .arg(1)
            .arg("plans:{acl}:open")
            .clone(),
        redis::cmd("HGETALL").arg("billing:{acl}:account").clone(),
    ] {
        let refused: Result<redis::Value, _> = command.query_async(&mut messaging_conn).await;
        let error = refused.expect_err("messaging's user was let through");
        assert!(
            error.to_string().to_uppercase().contains("NOPERM"),
            "{error}"
        );
    }

    // Commands without keys, on one node.
    let node = stack.redis.url().split(',').next().unwrap().to_string();
    let node = node.replacen(
        "redis://",
        &format!("redis://billing-credits:{password}@"),
        1,
    );
    let client = redis::Client::open(node).unwrap();
    let mut node = client.get_multiplexed_async_connection().await.unwrap();
    for command in [
        redis::cmd("KEYS").arg("*").clone(),
        redis::cmd("FLUSHALL").clone(),
        redis::cmd("CONFIG").arg("GET").arg("*").clone(),
        // Issue 17: functions, other databases and key-change tracking of
        // other prefixes were allowed (they are outside the allow-list).
        redis::cmd("FUNCTION").arg("FLUSH").clone(),
        redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("#!lua name=evil\nredis.register_function('f', function() return 1 end)")
            .clone(),
        redis::cmd("SELECT").arg(1).clone(),
        redis::cmd("MOVE")
            .arg("billing:{acl}:account")
            .arg(1)
            .clone(),
        redis::cmd("SWAPDB").arg(0).arg(1).clone(),
        redis::cmd("CLIENT")
            .arg("TRACKING")
            .arg("ON")
            .arg("BCAST")
            .arg("PREFIX")
            .arg("messaging:")
            .clone(),
        redis::cmd("OBJECT")
            .arg("ENCODING")
            .arg("billing:{acl}:account")
            .clone(),
        redis::cmd("HKEYS").arg("billing:{acl}:account").clone(),
    ] {
        let refused: Result<redis::Value, _> = command.query_async(&mut node).await;
        let error = refused.expect_err("billing's user was let through");
        assert!(
            error.to_string().to_uppercase().contains("NOPERM"),
            "{error}"
        );
    }
    // The health checks' user: PING, nothing else.
    let probe = stack.redis.url().split(',').next().unwrap().replacen(
        "redis://",
        &format!("redis://{PROBE_USER}:anything@"),
        1,
    );
    let client = redis::Client::open(probe).unwrap();
    let mut probe = client.get_multiplexed_async_connection().await.unwrap();
    let pong: String = redis::cmd("PING").query_async(&mut probe).await.unwrap();
    assert_eq!(pong, "PONG");
    let refused: Result<Option<String>, _> = redis::cmd("GET")
        .arg("billing:{acl}:account")
        .query_async(&mut probe)
        .await;
    let error = refused.expect_err("the probe user read a key");
    assert!(
        error.to_string().to_uppercase().contains("NOPERM"),
        "{error}"
    );
}

/// A Redis run with the shipped ACL file keeps what scripts wrote across a
/// restart. Redis replays its AOF as the default user and re-checks ACLs at
/// each EXEC (a script's writes are logged as MULTI/EXEC): with the default
/// user off, every credit written by a script vanished at the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shipped_redis_users_keep_script_writes_across_a_restart() {
    use inmail_shared::runtime::auth::redis_acl::{PROBE_USER, acl_file};
    let dir = std::env::temp_dir().join(format!("inmail-acl-aof-{}", rid()));
    std::fs::create_dir_all(&dir).unwrap();
    let password = rid();
    std::fs::write(
        dir.join("users.acl"),
        acl_file(&rid(), &[("billing-credits", &password)], false),
    )
    .unwrap();
    let port = inmail_tests::free_port();
    let start = || {
        std::process::Command::new(inmail_tests::redis_server_binary())
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(&dir)
            .arg("--aclfile")
            .arg(dir.join("users.acl"))
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .args(["--logfile", "redis.log"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn redis-server")
    };
    let connect = |user: &str, password: &str| {
        redis::Client::open(format!("redis://{user}:{password}@127.0.0.1:{port}")).unwrap()
    };
    async fn ready(client: &redis::Client) -> redis::aio::MultiplexedConnection {
        for _ in 0..200 {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut conn)
                    .await
                    .is_ok()
            {
                return conn;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("redis-server did not start");
    }
    let mut redis = start();
    let mut billing = ready(&connect("billing-credits", &password)).await;
    let _: () = redis::cmd("EVAL")
        .arg(
            "redis.call('HSET', KEYS[1], 'balance', 5) \
             redis.call('XADD', KEYS[2], '*', 'kind', 'grant', 'amount', 5)",
        )
        .arg(2)
        .arg("billing:{aof}:account")
        .arg("billing:{aof}:ledger")
        .query_async(&mut billing)
        .await
        .expect("billing's user runs its script");
    // Killed, not shut down: only the fsynced AOF is left.
    redis.kill().unwrap();
    redis.wait().unwrap();

    let mut redis = start();
    ready(&connect(PROBE_USER, "x")).await;
    let mut billing = ready(&connect("billing-credits", &password)).await;
    let balance: Option<String> = redis::cmd("HGET")
        .arg("billing:{aof}:account")
        .arg("balance")
        .query_async(&mut billing)
        .await
        .unwrap();
    // (XRANGE, not XLEN: billing's user may send only what billing sends.)
    let entries: Vec<redis::Value> = redis::cmd("XRANGE")
        .arg("billing:{aof}:ledger")
        .arg("-")
        .arg("+")
        .query_async(&mut billing)
        .await
        .unwrap();
    let entries = entries.len();
    redis.kill().unwrap();
    redis.wait().unwrap();
    let log = std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(
        (balance.as_deref(), entries),
        (Some("5"), 1),
        "the script's writes were lost on restart; redis.log:\n{log}"
    );
}
