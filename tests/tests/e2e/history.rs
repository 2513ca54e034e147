//! The history store (issue 20): ledger entries older than the hot window
//! move from Redis to a real PostgreSQL (inserted idempotently and committed
//! before Redis is trimmed), ListLedgerEntries reads on into it with no gap
//! and no duplicate at the boundary, and PostgreSQL down or billing killed
//! mid-archive loses nothing and duplicates nothing.

use std::collections::HashSet;
use std::time::Duration;

use inmail_shared::contract::proto::billing::v1 as billing;
use inmail_shared::contract::reasons;
use inmail_tests::postgres::{Database, PgServer};
use inmail_tests::processes::ProcessStack;
use inmail_tests::redis_server::RedisServer;
use inmail_tests::{As, Stack, StackOptions, billing_at, reason, rid};
use tonic::Code;

use crate::common::*;

fn history_options(db: &Database, hot: &str, interval: &str) -> StackOptions {
    let mut billing_args = db.args();
    billing_args.extend([
        "--ledger-hot-retention".into(),
        hot.into(),
        "--archive-interval".into(),
        interval.into(),
    ]);
    StackOptions {
        billing_args,
        ..Default::default()
    }
}

/// Every archived entry id of `member`, oldest first, as PostgreSQL holds
/// them (one row per id: the primary key).
async fn archived_ids(db: &Database, member: &str) -> Vec<String> {
    db.inspect()
        .await
        .query(
            "SELECT entry_ms, entry_seq FROM ledger_entries WHERE member_id = $1 \
             ORDER BY entry_ms, entry_seq",
            &[&member],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| format!("{}-{}", row.get::<_, i64>(0), row.get::<_, i64>(1)))
        .collect()
}

async fn archived_count(db: &Database) -> i64 {
    db.inspect()
        .await
        .query_one("SELECT count(*) FROM ledger_entries", &[])
        .await
        .unwrap()
        .get(0)
}

/// Entries of every member's ledger still in Redis.
async fn hot_entries(redis: &RedisServer, members: &[String]) -> u64 {
    let mut conn = redis.conn().await;
    let mut total = 0;
    for member in members {
        total += redis::cmd("XLEN")
            .arg(format!("billing:{{{member}}}:ledger"))
            .query_async::<u64>(&mut conn)
            .await
            .unwrap();
    }
    total
}

/// Bytes Redis uses for the members' ledger streams (`MEMORY USAGE`).
async fn ledger_bytes(redis: &RedisServer, members: &[String]) -> u64 {
    let mut conn = redis.conn().await;
    let mut total = 0;
    for member in members {
        let bytes: Option<u64> = redis::cmd("MEMORY")
            .arg("USAGE")
            .arg(format!("billing:{{{member}}}:ledger"))
            .arg("SAMPLES")
            .arg(0)
            .query_async(&mut conn)
            .await
            .unwrap();
        total += bytes.unwrap_or(0);
    }
    total
}

/// A member's whole ledger through ListLedgerEntries, `page_size` at a time.
async fn ledger_paged(
    client: &mut inmail_tests::BillingClient,
    member: &str,
    page_size: i32,
) -> Result<Vec<billing::LedgerEntry>, tonic::Status> {
    let mut entries = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_ledger_entries(billing::ListLedgerEntriesRequest {
                member_id: member.into(),
                page_size,
                page_token: token,
            })
            .await?
            .into_inner();
        entries.extend(page.entries);
        if page.next_page_token.is_empty() {
            return Ok(entries);
        }
        token = page.next_page_token;
    }
}

fn ids(entries: &[billing::LedgerEntry]) -> Vec<String> {
    entries.iter().map(|e| e.entry_id.clone()).collect()
}

/// Verified entries older than the hot retention move to PostgreSQL: the
/// ledger in Redis shrinks, each entry is in PostgreSQL once and as it was,
/// ListLedgerEntries still returns every entry newest first across the two
/// tiers, and the balance and the reconciliation still add up. The archiver
/// verifies what it moves itself (no reconciliation was asked for).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn old_entries_move_to_postgresql_and_the_ledger_reads_on_into_it() {
    let db = PgServer::shared().database("inmail_billing");
    let stack = Stack::start_with(history_options(&db, "1day", "200ms")).await;
    subscribe(&stack, "arc", "premium-career").await;
    let first_grant = billing::GrantCreditsRequest {
        request_id: rid(),
        member_id: "arc".into(),
        amount: 1,
        reason: "first".into(),
    };
    let granted = stack
        .billing_operator()
        .grant_credits(first_grant.clone())
        .await
        .unwrap()
        .into_inner();
    for _ in 0..4 {
        grant(&stack, "arc", 1).await;
    }
    let old = ledger(&stack, "arc").await;
    assert_eq!(old.len(), 6, "a renewal and five grants");
    stack.advance(2 * DAY).await;
    grant(&stack, "arc", 1).await;
    grant(&stack, "arc", 1).await;

    let members = ["arc".to_string()];
    assert!(
        eventually(Duration::from_secs(10), || async {
            hot_entries(&stack.redis, &members).await == 2
        })
        .await,
        "the old entries did not leave Redis"
    );
    // PostgreSQL holds each old entry once, as it was.
    let mut expected: Vec<String> = ids(&old);
    expected.reverse();
    assert_eq!(archived_ids(&db, "arc").await, expected);
    let row = db
        .inspect()
        .await
        .query_one(
            "SELECT kind, amount, balance_after, note FROM ledger_entries \
             WHERE member_id = 'arc' ORDER BY entry_ms DESC, entry_seq DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    let newest_old = &old[0];
    assert_eq!(row.get::<_, String>(0), "GRANT");
    assert_eq!(row.get::<_, i64>(1), newest_old.amount);
    assert_eq!(row.get::<_, i64>(2), newest_old.balance_after);
    assert_eq!(row.get::<_, String>(3), newest_old.note);

    // The ledger reads across both tiers, newest first, whatever the page
    // size: the two hot entries, then the six archived.
    let all = ledger(&stack, "arc").await;
    assert_eq!(all.len(), 8);
    assert_eq!(ids(&all[2..]), ids(&old));
    for size in [1, 2, 3, 7] {
        let paged = ledger_paged(&mut stack.billing_as("arc"), "arc", size)
            .await
            .unwrap();
        assert_eq!(ids(&paged), ids(&all), "page size {size}");
    }
    assert_eq!(available(&stack, "arc").await, 12);
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
    // A retried grant answers its entry as written, read back from
    // PostgreSQL (the request record keeps only its id), and grants nothing.
    let replayed = stack
        .billing_operator()
        .grant_credits(first_grant)
        .await
        .unwrap()
        .into_inner();
    assert!(granted.entry.is_some());
    assert_eq!(replayed.entry, granted.entry);
    assert_eq!(available(&stack, "arc").await, 12);
    // billing reached PostgreSQL over TLS only (its user may not connect
    // otherwise: pg_hba.conf), and did connect.
    let tls: Vec<bool> = db
        .inspect()
        .await
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.usename = 'inmail_billing'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert!(!tls.is_empty() && tls.iter().all(|ssl| *ssl), "{tls:?}");
}

/// 20,000 ledger entries (real grants over gRPC, 100 members), then the
/// test clock moves past their hot window (a day; the archiver's own pace,
/// a pass a second, is the real one): afterwards every entry is in
/// PostgreSQL exactly once, Redis's ledger streams are empty (their memory
/// is flat: at most 1 KiB per member whatever the history; before and after
/// are printed), and paging — also while the
/// archiver runs — returns every entry in order with no duplicate at the
/// boundary.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_thousand_entries_end_in_postgresql_once_and_redis_stays_flat() {
    const MEMBERS: usize = 100;
    const GRANTS: usize = 200;
    let db = PgServer::shared().database("inmail_billing");
    let stack = Stack::start_with(history_options(&db, "1day", "1s")).await;
    let members: Vec<String> = (0..MEMBERS).map(|i| format!("hist{i}")).collect();
    let billing_addr = stack.billing.addr;
    let workers: Vec<_> = members
        .chunks(2)
        .map(|pair| {
            let pair = pair.to_vec();
            tokio::spawn(async move {
                let mut client = billing_at(billing_addr, &As::Operator);
                for _ in 0..GRANTS {
                    for member in &pair {
                        client
                            .grant_credits(billing::GrantCreditsRequest {
                                request_id: rid(),
                                member_id: member.clone(),
                                amount: 1,
                                reason: "bulk".into(),
                            })
                            .await
                            .unwrap();
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.unwrap();
    }
    // What each member's ledger is, read before anything can be archived.
    let mut expected = Vec::new();
    for member in &members {
        expected.push(ids(&ledger(&stack, member).await));
    }
    let total: usize = expected.iter().map(Vec::len).sum();
    assert!(
        total >= MEMBERS * GRANTS,
        "{total} entries for {} grants",
        MEMBERS * GRANTS
    );
    let bytes_before = ledger_bytes(&stack.redis, &members).await;
    assert_eq!(hot_entries(&stack.redis, &members).await, total as u64);
    stack.advance(2 * DAY).await;

    // While the archiver runs, a member's ledger pages identically.
    let mut reads_while_archiving = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while hot_entries(&stack.redis, &members).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the archiver did not drain Redis in 120 s"
        );
        let i = reads_while_archiving % MEMBERS;
        let paged = ledger_paged(&mut stack.billing_as(&members[i]), &members[i], 37)
            .await
            .unwrap();
        assert_eq!(ids(&paged), expected[i], "{} while archiving", members[i]);
        reads_while_archiving += 1;
    }
    assert!(
        reads_while_archiving > 0,
        "the archiver drained Redis before any read: nothing was paged while it ran"
    );
    let bytes_after = ledger_bytes(&stack.redis, &members).await;
    println!(
        "ledger streams in Redis: {bytes_before} bytes for {total} entries before, \
         {bytes_after} after ({reads_while_archiving} reads while archiving)"
    );
    // The bound (README.md, "The history store"): once archived, a member's
    // ledger stream in Redis is at most 1 KiB, however long its history.
    assert!(
        bytes_after <= 1024 * MEMBERS as u64,
        "Redis still holds {bytes_after} bytes of ledger"
    );

    // Every entry exactly once in PostgreSQL, and every ledger whole.
    assert_eq!(archived_count(&db).await, total as i64);
    for (member, expected) in members.iter().zip(&expected) {
        let mut archived = archived_ids(&db, member).await;
        archived.reverse();
        assert_eq!(&archived, expected, "{member} in PostgreSQL");
        let paged = ledger_paged(&mut stack.billing_as(member), member, 500)
            .await
            .unwrap();
        assert_eq!(&ids(&paged), expected, "{member} paged");
    }
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

/// PostgreSQL stopped for a while: grants and balances go on, the entries
/// due for the archive wait in Redis (the lag grows), a page that needs the
/// archive answers UNAVAILABLE (HISTORY_UNAVAILABLE) while recent pages
/// answer, health stays SERVING; once PostgreSQL is back the lag drains and
/// nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgresql_down_for_a_while_loses_nothing_and_blocks_only_archived_reads() {
    let mut pg = PgServer::private();
    let db = pg.database("inmail_billing");
    let stack = Stack::start_with(history_options(&db, "1day", "200ms")).await;
    let members = ["pgd".to_string()];
    subscribe(&stack, "pgd", "premium-career").await;
    for _ in 0..3 {
        grant(&stack, "pgd", 1).await;
    }
    stack.advance(2 * DAY).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            hot_entries(&stack.redis, &members).await == 0
        })
        .await,
        "the first entries were not archived"
    );

    pg.stop();
    grant(&stack, "pgd", 1).await;
    grant(&stack, "pgd", 1).await;
    assert_eq!(available(&stack, "pgd").await, 10);
    stack.advance(2 * DAY).await;
    // Several archive passes fail meanwhile; the two entries stay in Redis.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(hot_entries(&stack.redis, &members).await, 2);
    assert_eq!(
        inmail_tests::health(stack.billing.addr).await.unwrap(),
        inmail_tests::SERVING
    );
    let mut client = stack.billing_as("pgd");
    let first = client
        .list_ledger_entries(billing::ListLedgerEntriesRequest {
            member_id: "pgd".into(),
            page_size: 2,
            page_token: String::new(),
        })
        .await
        .expect("the recent page needs Redis only")
        .into_inner();
    assert_eq!(first.entries.len(), 2);
    let archived = client
        .list_ledger_entries(billing::ListLedgerEntriesRequest {
            member_id: "pgd".into(),
            page_size: 2,
            page_token: first.next_page_token,
        })
        .await
        .unwrap_err();
    assert_eq!(archived.code(), Code::Unavailable, "{archived:?}");
    assert_eq!(reason(&archived), reasons::HISTORY_UNAVAILABLE);

    pg.restart();
    assert!(
        eventually(Duration::from_secs(15), || async {
            hot_entries(&stack.redis, &members).await == 0
        })
        .await,
        "the lag did not drain once PostgreSQL was back"
    );
    let all = ledger(&stack, "pgd").await;
    assert_eq!(all.len(), 6, "a renewal and five grants");
    let unique: HashSet<&str> = all.iter().map(|e| e.entry_id.as_str()).collect();
    assert_eq!(unique.len(), 6);
    assert_eq!(archived_count(&db).await, 6);
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

/// billing-credits killed (SIGKILL) in the middle of archiving, then
/// started again: every entry ends in PostgreSQL exactly once and out of
/// Redis, and the ledgers reconcile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn billing_killed_while_archiving_loses_and_doubles_nothing() {
    const MEMBERS: usize = 40;
    const ENTRIES: usize = 500;
    let db = PgServer::shared().database("inmail_billing");
    let env_db = db.clone();
    let mut stack = ProcessStack::start(move |name| match name {
        "billing-credits" => {
            let mut env = env_db.env();
            env.extend([
                ("LEDGER_HOT_RETENTION".into(), "1s".into()),
                ("ARCHIVE_INTERVAL".into(), "100ms".into()),
            ]);
            env
        }
        _ => vec![],
    })
    .await;
    let members: Vec<String> = (0..MEMBERS).map(|i| format!("kill{i}")).collect();
    for member in &members {
        grow_ledger(&stack.redis, member, ENTRIES, 0).await;
    }
    let total = (MEMBERS * ENTRIES) as i64;
    // Kill once the archive is part way.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let archived = archived_count(&db).await;
        if archived > 0 {
            assert!(archived < total, "the archive finished before the kill");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing was archived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stack.billing.kill();
    let at_kill = archived_count(&db).await;
    assert!(at_kill < total, "the archive finished before the kill");
    stack.billing.restart().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while hot_entries(&stack.redis, &members).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restarted billing did not finish the archive"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(archived_count(&db).await, total);
    let mut client = billing_at(stack.billing.addr, &As::Operator);
    for member in &members {
        let all = ledger_paged(&mut client, member, 500).await.unwrap();
        // Newest first: balances ENTRIES down to 1, each once, no gap.
        let balances: Vec<i64> = all.iter().map(|e| e.balance_after).collect();
        let expected: Vec<i64> = (1..=ENTRIES as i64).rev().collect();
        assert_eq!(balances, expected, "{member}");
    }
    inmail_tests::assert_ledgers_reconcile(&mut client).await;
}

/// The balance over a time range reads across both tiers: the opening
/// balance from PostgreSQL or Redis, the entries oldest first on pages of
/// any size; bad ranges are refused naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn balance_history_spans_redis_and_postgresql() {
    let db = PgServer::shared().database("inmail_billing");
    let stack = Stack::start_with(history_options(&db, "1day", "200ms")).await;
    let members = ["bh".to_string()];
    let t0 = stack.now().await;
    subscribe(&stack, "bh", "premium-career").await; // +5
    grant(&stack, "bh", 1).await; // 6
    let t1 = stack.advance(DAY).await;
    grant(&stack, "bh", 2).await; // 8
    let t3 = stack.advance(2 * DAY).await;
    grant(&stack, "bh", 3).await; // 11
    assert!(
        eventually(Duration::from_secs(10), || async {
            hot_entries(&stack.redis, &members).await == 1
        })
        .await,
        "the old entries did not leave Redis"
    );
    let ts = |t: chrono::DateTime<chrono::Utc>| {
        Some(prost_types::Timestamp {
            seconds: t.timestamp(),
            nanos: t.timestamp_subsec_nanos() as i32,
        })
    };
    let history = |start, end, page_size, page_token| {
        let mut client = stack.billing_as("bh");
        async move {
            client
                .get_balance_history(billing::GetBalanceHistoryRequest {
                    member_id: "bh".into(),
                    start_time: start,
                    end_time: end,
                    page_size,
                    page_token,
                })
                .await
                .map(|r| r.into_inner())
        }
    };
    let minute = chrono::Duration::minutes(1);
    // From before the first entry: opening 0, all four, whatever the page.
    for size in [1, 3, 10] {
        let mut balances = Vec::new();
        let mut token = String::new();
        loop {
            let page = history(ts(t0 - minute), None, size, token).await.unwrap();
            assert_eq!(page.opening_balance, 0);
            balances.extend(page.entries.iter().map(|e| e.balance_after));
            if page.next_page_token.is_empty() {
                break;
            }
            token = page.next_page_token;
        }
        assert_eq!(balances, [5, 6, 8, 11], "page size {size}");
    }
    // From between: the opening balance is an archived entry's.
    let page = history(ts(t1 - minute), None, 10, String::new())
        .await
        .unwrap();
    assert_eq!(page.opening_balance, 6);
    let balances: Vec<i64> = page.entries.iter().map(|e| e.balance_after).collect();
    assert_eq!(balances, [8, 11]);
    // A closed range around the last grant.
    let page = history(ts(t3 - minute), ts(t3 + minute), 10, String::new())
        .await
        .unwrap();
    assert_eq!(page.opening_balance, 8);
    assert_eq!(page.entries.len(), 1);
    assert_eq!(page.entries[0].amount, 3);
    // Bad ranges name their field.
    for (start, end, field) in [(None, None, "start_time"), (ts(t3), ts(t1), "end_time")] {
        let status = history(start, end, 10, String::new()).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains(field), "{field}: {status:?}");
    }
}

/// A member whose entries PostgreSQL refuses (a NUL character, which text
/// there cannot hold; the edge refuses it now, older data may carry it)
/// keeps them in Redis, and the other members are archived all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_member_postgresql_refuses_does_not_hold_up_the_others() {
    let db = PgServer::shared().database("inmail_billing");
    let stack = Stack::start_with(history_options(&db, "1s", "200ms")).await;
    // Scanned in some order: the refused member among several good ones.
    let good: Vec<String> = (0..6).map(|i| format!("good{i}")).collect();
    grow_ledger_noted(&stack.redis, "bad", 3, 0, "broken\0note").await;
    for member in &good {
        grow_ledger(&stack.redis, member, 3, 0).await;
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            hot_entries(&stack.redis, &good).await == 0
        })
        .await,
        "the good members were not archived"
    );
    assert_eq!(archived_count(&db).await, 3 * good.len() as i64);
    assert_eq!(hot_entries(&stack.redis, &["bad".to_string()]).await, 3);
    // And the edge refuses a NUL now.
    let status = stack
        .billing_operator()
        .grant_credits(billing::GrantCreditsRequest {
            request_id: rid(),
            member_id: "good0".into(),
            amount: 1,
            reason: "nul\0".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("reason"), "{status:?}");
}

/// Runs `billing-credits export-ledger` as the operator against the
/// running billing (no Redis or database settings: the service streams it);
/// answers stdout.
fn export_ledger(stack: &Stack, extra: &[&str]) -> String {
    let pki = inmail_tests::pki();
    let output = std::process::Command::new(inmail_tests::processes::binary("billing-credits"))
        .env_clear()
        .env(
            "BILLING_CREDITS_URL",
            format!("https://127.0.0.1:{}", stack.billing.addr.port()),
        )
        .env("OPERATOR_CERT_FILE", pki.file("operator.crt"))
        .env("OPERATOR_KEY_FILE", pki.file("operator.key"))
        .env("OPERATOR_CA_FILE", pki.file("ca.crt"))
        .arg("export-ledger")
        .args(extra)
        .output()
        .expect("run billing-credits export-ledger");
    assert!(
        output.status.success(),
        "export-ledger failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

/// The audit export writes every entry of the range once — those still in
/// Redis and those archived — as JSON Lines or CSV, for everyone or one
/// member.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn export_ledger_writes_every_entry_of_both_tiers_once() {
    let db = PgServer::shared().database("inmail_billing");
    let stack = Stack::start_with(history_options(&db, "1day", "200ms")).await;
    let members = ["ex1".to_string(), "ex2".to_string()];
    subscribe(&stack, "ex1", "premium-career").await;
    for _ in 0..3 {
        grant(&stack, "ex1", 1).await;
    }
    grant(&stack, "ex2", 2).await;
    grant(&stack, "ex2", 2).await;
    let later = stack.advance(2 * DAY).await;
    grant(&stack, "ex1", 1).await;
    grant(&stack, "ex2", 1).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            hot_entries(&stack.redis, &members).await == 2
        })
        .await,
        "the old entries did not leave Redis"
    );
    let mut expected: Vec<(String, String)> = Vec::new();
    for member in &members {
        for entry in ledger(&stack, member).await {
            expected.push((member.clone(), entry.entry_id));
        }
    }
    expected.sort();
    assert_eq!(
        expected.len(),
        8,
        "ex1: a renewal and four grants; ex2: three grants"
    );

    let jsonl = export_ledger(&stack, &["--since", "2000-01-01T00:00:00Z"]);
    let mut exported: Vec<(String, String)> = jsonl
        .lines()
        .map(|line| {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            assert!(
                row["balance_after"].is_i64() && row["kind"].is_string(),
                "{row}"
            );
            (
                row["member_id"].as_str().unwrap().to_string(),
                row["entry_id"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    exported.sort();
    assert_eq!(exported, expected, "every entry once");

    let csv = export_ledger(
        &stack,
        &[
            "--since",
            "2000-01-01T00:00:00Z",
            "--member",
            "ex2",
            "--format",
            "csv",
        ],
    );
    let lines: Vec<&str> = csv.lines().collect();
    assert!(
        lines[0].starts_with("member_id,entry_id,occurred_at,kind"),
        "{}",
        lines[0]
    );
    assert_eq!(lines.len(), 1 + 3, "{csv}");
    assert!(lines[1..].iter().all(|l| l.starts_with("ex2,")), "{csv}");

    let since = (later - chrono::Duration::minutes(1)).to_rfc3339();
    let recent = export_ledger(&stack, &["--since", &since]);
    assert_eq!(recent.lines().count(), 2, "{recent}");
}

/// Appends `count` grant entries of +1 straight to a member's ledger in
/// Redis (each carrying the running balance, at `at_ms`), and sets the
/// counter to match.
async fn grow_ledger(redis: &RedisServer, member: &str, count: usize, at_ms: i64) {
    grow_ledger_noted(redis, member, count, at_ms, "bulk").await;
}

async fn grow_ledger_noted(
    redis: &RedisServer,
    member: &str,
    count: usize,
    at_ms: i64,
    note: &str,
) {
    let script = redis::Script::new(
        r#"
local bal = tonumber(redis.call('HGET', KEYS[1], 'balance') or '0')
for i = 1, tonumber(ARGV[1]) do
  bal = bal + 1
  redis.call('XADD', KEYS[2], '*', 'k', 'GRANT', 'a', 1, 'b', bal, 't', ARGV[2], 'm', '',
    'r', '', 'p', '', 'v', 0, 'c', 0, 'n', ARGV[3])
end
redis.call('HSET', KEYS[1], 'balance', bal)
return bal
"#,
    );
    let mut conn = redis.conn().await;
    let _: i64 = script
        .key(format!("billing:{{{member}}}:account"))
        .key(format!("billing:{{{member}}}:ledger"))
        .arg(count)
        .arg(at_ms)
        .arg(note)
        .invoke_async(&mut conn)
        .await
        .unwrap();
}
