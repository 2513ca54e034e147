//! The ledger at scale (issue 9.6): reconciliation is incremental and
//! bounded (a verified checkpoint, replayed past in bounded chunks). Old
//! verified entries moving to PostgreSQL: history.rs. Each test failed on
//! the code before its fix.

use std::time::{Duration, Instant};

use inmail_shared::contract::proto::billing::v1 as billing;
use inmail_tests::{NOT_SERVING, Stack, health};

use crate::common::*;

/// Appends `count` entries of +1 to a member's ledger straight in Redis,
/// each carrying the running balance, and sets the counter to match: what
/// years of a busy member's activity leave behind.
async fn grow_ledger(stack: &Stack, member: &str, count: usize) {
    const CHUNK: usize = 20_000;
    let script = redis::Script::new(
        r#"
local bal = tonumber(redis.call('HGET', KEYS[1], 'balance') or '0')
for i = 1, tonumber(ARGV[1]) do
  bal = bal + 1
  redis.call('XADD', KEYS[2], '*', 'k', 'GRANT', 'a', 1, 'b', bal, 't', ARGV[2], 'm', '',
    'r', '', 'p', 'premium-career', 'v', 1, 'c', 1, 'n', 'bulk')
end
redis.call('HSET', KEYS[1], 'balance', bal)
return bal
"#,
    );
    let mut conn = stack.redis.conn().await;
    let now = stack.now().await.timestamp_millis();
    let mut left = count;
    while left > 0 {
        let n = left.min(CHUNK);
        let _: i64 = script
            .key(format!("billing:{{{member}}}:account"))
            .key(format!("billing:{{{member}}}:ledger"))
            .arg(n)
            .arg(now)
            .invoke_async(&mut conn)
            .await
            .unwrap();
        left -= n;
    }
}

async fn reconcile(stack: &Stack) -> Result<billing::ReconcileLedgersResponse, tonic::Status> {
    let mut token = String::new();
    let mut total = billing::ReconcileLedgersResponse::default();
    loop {
        let page = stack
            .billing_operator()
            .reconcile_ledgers(billing::ReconcileLedgersRequest {
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await?
            .into_inner();
        total.members_checked += page.members_checked;
        total.entries_replayed += page.entries_replayed;
        total.mismatches.extend(page.mismatches);
        if page.next_page_token.is_empty() {
            return Ok(total);
        }
        token = page.next_page_token;
    }
}

/// A member with 600,000 ledger entries is reconciled without stalling
/// Redis (health stays SERVING, every call answers), and reconciling again
/// replays only what was added since.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_huge_ledger_reconciles_in_bounded_steps_and_then_incrementally() {
    let stack = Stack::start().await;
    subscribe(&stack, "big", "premium-career").await;
    available(&stack, "big").await;
    grow_ledger(&stack, "big", 600_000).await;

    let watch = tokio::spawn({
        let addrs = [stack.plans.addr, stack.billing.addr, stack.messaging.addr];
        async move {
            let until = Instant::now() + Duration::from_secs(4);
            while Instant::now() < until {
                for addr in addrs {
                    // An unanswered health check fails too (it used to pass
                    // as "not NOT_SERVING").
                    let status = health(addr)
                        .await
                        .unwrap_or_else(|e| panic!("{addr} did not answer health: {e:?}"));
                    assert_ne!(status, NOT_SERVING, "{addr} went NOT_SERVING");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });
    let first = reconcile(&stack).await.expect("the huge ledger reconciles");
    assert!(first.mismatches.is_empty(), "{:?}", first.mismatches);
    assert!(first.entries_replayed >= 600_000);
    watch.await.unwrap();

    for _ in 0..10 {
        grant(&stack, "big", 1).await;
    }
    let started = Instant::now();
    let again = reconcile(&stack).await.unwrap();
    assert!(again.mismatches.is_empty());
    assert_eq!(
        again.entries_replayed, 10,
        "only the new entries are replayed"
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );

    // A tampered entry past the checkpoint is still found.
    let mut conn = stack.redis.conn().await;
    let _: String = redis::cmd("XADD")
        .arg("billing:{big}:ledger")
        .arg("*")
        .arg(&["k", "GRANT", "a", "1", "b", "1", "t", "0"])
        .query_async(&mut conn)
        .await
        .unwrap();
    let tampered = reconcile(&stack).await.unwrap();
    assert_eq!(tampered.mismatches.len(), 1, "{tampered:?}");
}

/// Pages cut short by their deadline hand back a token, also when the
/// member left unfinished was in the first SCAN batch (whose cursor is "0",
/// which used to end the check as if every member was done).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reconciliation_cut_short_by_its_deadline_resumes_from_its_token() {
    let stack = Stack::start().await;
    subscribe(&stack, "long", "premium-career").await;
    available(&stack, "long").await;
    grow_ledger(&stack, "long", 300_000).await;
    let (mut token, mut pages, mut replayed, mut checked) = (String::new(), 0, 0, 0);
    loop {
        let mut request = tonic::Request::new(billing::ReconcileLedgersRequest {
            page_size: 1000,
            page_token: token,
            ..Default::default()
        });
        // 500 ms of it is the margin the service keeps: ~200 ms of work.
        request.set_timeout(Duration::from_millis(700));
        let page = stack
            .billing_operator()
            .reconcile_ledgers(request)
            .await
            .unwrap()
            .into_inner();
        assert!(page.mismatches.is_empty(), "{:?}", page.mismatches);
        pages += 1;
        replayed += page.entries_replayed;
        checked += page.members_checked;
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
        assert!(pages < 1000, "no progress");
    }
    assert!(
        replayed >= 300_000,
        "{replayed} entries replayed in {pages} pages"
    );
    assert!(
        pages > 1,
        "one page replayed all {replayed} entries: make the ledger longer"
    );
    assert_eq!(checked, 1);
}
