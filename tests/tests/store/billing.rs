//! billing-credits' scripts.

use std::time::Duration;

use billing_credits::store::{
    BillingStore, Call, DebitState, EntryKind, Outcome, ReconcileStep, Refusal, ReleaseCause, Reply,
};
use inmail_shared::state::storage::{Redis, RedisSettings};
use inmail_tests::RedisServer;

const DAY: i64 = 24 * 3600 * 1000;
const T0: i64 = 1_800_000_000_000;
const KEEP: Duration = Duration::from_secs(3600);
const SKEW: Duration = Duration::from_secs(60);

async fn store() -> (RedisServer, BillingStore) {
    let redis = RedisServer::start().await;
    let settings = RedisSettings {
        cluster: redis.is_cluster(),
        ..RedisSettings::new(redis.url())
    };
    let store = BillingStore::new(Redis::open(&settings).unwrap());
    (redis, store)
}

/// One plan period as subscription-plan reports it.
#[derive(Clone, Copy)]
struct Period {
    v: u64,
    monthly: i64,
    cap: i64,
    cycles: u32,
    started: i64,
    cycle_start: i64,
}

fn entitlement(periods: &[Period]) -> String {
    let list: Vec<String> = periods
        .iter()
        .map(|p| {
            format!(
                r#"{{"v":{},"p":"plan-{}","m":{},"c":{},"paid":1,"n":{},"st":{},"cs":{},"ce":{}}}"#,
                p.v,
                p.v,
                p.monthly,
                p.cap,
                p.cycles,
                p.started,
                p.cycle_start,
                p.cycle_start + 30 * DAY
            )
        })
        .collect();
    format!(r#"{{"periods":[{}]}}"#, list.join(","))
}

fn call<'a>(member: &'a str, now: i64, ent: &'a str, request: &'a str) -> Call<'a> {
    Call {
        member,
        now_ms: now,
        entitlement: ent,
        valid_until_ms: now + 1000,
        request_id: request,
        fingerprint: "fp",
        hold_expires_ms: now + 30_000,
    }
}

async fn balance(store: &BillingStore, member: &str, now: i64, ent: &str) -> Reply {
    let reply = store
        .balance(&call(member, now, ent, ""), KEEP)
        .await
        .unwrap();
    assert_eq!(reply.s, Outcome::Ok, "{reply:?}");
    reply
}

async fn entries(store: &BillingStore, member: &str) -> Vec<(EntryKind, i64, i64)> {
    let mut page = store.ledger_page(member, None, 1000).await.unwrap();
    page.reverse();
    page.into_iter()
        .map(|e| (e.kind.unwrap(), e.amount, e.balance_after))
        .collect()
}

fn career(cycles: u32) -> Period {
    Period {
        v: 1,
        monthly: 5,
        cap: 15,
        cycles,
        started: T0,
        cycle_start: T0 + i64::from(cycles - 1) * 30 * DAY,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_happens_once_per_cycle_also_across_idle_cycles_up_to_the_cap() {
    let (_redis, store) = store().await;
    let first = entitlement(&[career(1)]);
    assert_eq!(
        balance(&store, "m", T0, &first)
            .await
            .balance
            .unwrap()
            .available,
        5
    );
    // The same cycle again renews nothing.
    balance(&store, "m", T0 + DAY, &first).await;
    assert_eq!(entries(&store, "m").await.len(), 1);
    // Three idle cycles later: each renews once, up to the cap of 15.
    let later = entitlement(&[career(4)]);
    let reply = balance(&store, "m", T0 + 91 * DAY, &later).await;
    assert_eq!(reply.balance.unwrap().available, 15);
    assert_eq!(
        entries(&store, "m").await,
        [
            (EntryKind::Renewal, 5, 5),
            (EntryKind::Renewal, 5, 10),
            (EntryKind::Renewal, 5, 15),
            (EntryKind::Renewal, 0, 15),
        ]
    );
    // A stale entitlement (an older cycle) is refused, not applied.
    let stale = store
        .balance(&call("m", T0 + 91 * DAY, &first, ""), KEEP)
        .await
        .unwrap();
    assert_eq!(stale.s, Outcome::Stale);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_caps_grants_above_the_rollover_cap() {
    let (_redis, store) = store().await;
    let first = entitlement(&[career(1)]);
    balance(&store, "g", T0, &first).await;
    let granted = store
        .grant(&call("g", T0, "", "grant-1"), KEEP, 100, "top-up")
        .await
        .unwrap();
    assert_eq!(granted.balance_after, Some(105));
    let next = entitlement(&[career(2)]);
    let reply = balance(&store, "g", T0 + 31 * DAY, &next).await;
    assert_eq!(
        reply.balance.unwrap().available,
        15,
        "capped at the rollover cap"
    );
    assert_eq!(
        entries(&store, "g").await.last(),
        Some(&(EntryKind::Renewal, -90, 15))
    );
}

/// An immediate change between paid plans inside a cycle: the balance is
/// written off and becomes the new plan's month less what the cycle used;
/// no cycle opens (issue 19).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_immediate_plan_change_leaves_the_new_month_less_the_cycles_use() {
    let (_redis, store) = store().await;
    let first = entitlement(&[career(1)]);
    balance(&store, "w", T0, &first).await;
    let held = store
        .debit(&call("w", T0 + DAY, &first, "d1"), KEEP, "msg-1", 1)
        .await
        .unwrap();
    assert_eq!(held.balance_after, Some(4));
    // Upgraded ten days in, the cycle in progress continuing (it started
    // at T0): career's 4 written off, 30 - 1 used.
    let changed = T0 + 10 * DAY;
    let upgrade = Period {
        v: 2,
        monthly: 30,
        cap: 120,
        cycles: 1,
        started: changed,
        cycle_start: T0,
    };
    let ended = Period {
        cycles: 1,
        ..career(1)
    };
    let reply = balance(&store, "w", changed, &entitlement(&[ended, upgrade])).await;
    assert_eq!(reply.balance.unwrap().available, 29);
    let all = entries(&store, "w").await;
    assert_eq!(all[2], (EntryKind::WriteOff, -4, 0));
    assert_eq!(all[3], (EntryKind::PlanChange, 29, 29));
    // Back down a day later: 5 - 1.
    let again = changed + DAY;
    let down = Period {
        v: 3,
        monthly: 5,
        cap: 15,
        cycles: 1,
        started: again,
        cycle_start: T0,
    };
    let reply = balance(&store, "w", again, &entitlement(&[upgrade, down])).await;
    assert_eq!(reply.balance.unwrap().available, 4);
    // The next cycle renews the plan's month in full.
    let next = Period {
        cycles: 2,
        cycle_start: T0 + 30 * DAY,
        ..down
    };
    let reply = balance(&store, "w", T0 + 30 * DAY, &entitlement(&[next])).await;
    assert_eq!(reply.balance.unwrap().available, 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_confirm_release_and_refund_once() {
    let (_redis, store) = store().await;
    balance(&store, "h", T0, &entitlement(&[career(1)])).await;
    let held = store
        .debit(&call("h", T0, "", "d1"), KEEP, "msg-1", 1)
        .await
        .unwrap();
    assert_eq!(held.debit.as_ref().unwrap().state, DebitState::Held);
    assert_eq!(held.balance_after, Some(4));
    // A hold whose index entry already expired is refused, nothing written.
    let late = Call {
        hold_expires_ms: T0,
        ..call("h", T0 + 1, "", "d2")
    };
    let missed = store.debit(&late, KEEP, "msg-2", 1).await.unwrap();
    assert_eq!(
        (missed.s, missed.reason),
        (Outcome::Refused, Some(Refusal::HoldWindowMissed))
    );
    assert!(store.get_debit("h", "msg-2").await.unwrap().is_none());

    let confirmed = store
        .confirm(
            &call("h", T0 + 1, "", "c1"),
            &retention(),
            "msg-1",
            Duration::from_secs(90 * 86400),
        )
        .await
        .unwrap();
    assert_eq!(confirmed.debit.unwrap().state, DebitState::Confirmed);
    let refund = |request: &'static str, responded: i64| {
        let store = store.clone();
        async move {
            store
                .refund(
                    &call("h", T0 + 2, "", request),
                    KEEP,
                    "msg-1",
                    responded,
                    SKEW,
                )
                .await
                .unwrap()
        }
    };
    // A response before the debit (beyond the clock skew) is refused and
    // not recorded.
    let early = refund("r0", T0 - 61_000).await;
    assert_eq!(
        (early.s, early.reason),
        (Outcome::Refused, Some(Refusal::RespondedBeforeDebit))
    );
    let first = refund("r1", T0 + 2).await;
    assert_eq!(
        (first.refunded_now, first.balance_after),
        (Some(true), Some(5))
    );
    let second = refund("r2", T0 + 2).await;
    assert_eq!(
        (second.refunded_now, second.balance_after),
        (Some(false), Some(5))
    );
    assert_eq!(
        entries(&store, "h")
            .await
            .iter()
            .filter(|e| e.0 == EntryKind::Refund)
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_refund_window_is_judged_at_the_response() {
    let (_redis, store) = store().await;
    balance(&store, "j", T0, &entitlement(&[career(1)])).await;
    store
        .debit(&call("j", T0, "", "d"), KEEP, "m", 1)
        .await
        .unwrap();
    store
        .confirm(
            &call("j", T0, "", "c"),
            &retention(),
            "m",
            Duration::from_millis(10 * DAY as u64),
        )
        .await
        .unwrap();
    // Responded in time, refund arriving after the window: refunded.
    let ent = entitlement(&[career(1)]);
    let late = store
        .refund(
            &call("j", T0 + 20 * DAY, &ent, "r"),
            KEEP,
            "m",
            T0 + 9 * DAY,
            SKEW,
        )
        .await
        .unwrap();
    assert_eq!(late.refunded_now, Some(true), "{late:?}");
    // Responded after the window: refused, whenever it arrives.
    store
        .debit(&call("j", T0 + 20 * DAY, "", "d2"), KEEP, "m2", 1)
        .await
        .unwrap();
    store
        .confirm(
            &call("j", T0 + 20 * DAY, "", "c2"),
            &retention(),
            "m2",
            Duration::from_millis(DAY as u64),
        )
        .await
        .unwrap();
    let closed = store
        .refund(
            &call("j", T0 + 20 * DAY, "", "r2"),
            KEEP,
            "m2",
            T0 + 22 * DAY,
            SKEW,
        )
        .await
        .unwrap();
    assert_eq!(
        closed.reason,
        Some(Refusal::RefundWindowClosed),
        "{closed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn releasing_an_unknown_id_blocks_a_late_debit_of_it() {
    let (_redis, store) = store().await;
    balance(&store, "u", T0, &entitlement(&[career(1)])).await;
    let released = store
        .release(
            &call("u", T0, "", "rel"),
            &retention(),
            "ghost",
            ReleaseCause::Abandoned,
            false,
        )
        .await
        .unwrap();
    assert_eq!(released.released_now, Some(false));
    assert_eq!(released.debit.unwrap().state, DebitState::Released);
    let late = store
        .debit(&call("u", T0 + 1, "", "d"), KEEP, "ghost", 1)
        .await
        .unwrap();
    assert_eq!(
        (late.s, late.reason),
        (Outcome::Refused, Some(Refusal::DebitReleased))
    );
    assert_eq!(
        balance(&store, "u", T0 + 2, "")
            .await
            .balance
            .unwrap()
            .available,
        5
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconciliation_steps_are_bounded_and_keep_a_checkpoint() {
    let (_redis, store) = store().await;
    balance(&store, "r", T0, &entitlement(&[career(1)])).await;
    for i in 0..25 {
        store
            .grant(&call("r", T0, "", &format!("g{i}")), KEEP, 1, "x")
            .await
            .unwrap();
    }
    // 26 entries in steps of 10: more, more, done.
    let mut steps = Vec::new();
    loop {
        let step = store.reconcile_step("r", 10, "").await.unwrap();
        let done = matches!(step, ReconcileStep::Done { .. });
        steps.push(step);
        if done {
            break;
        }
    }
    assert_eq!(steps.len(), 3);
    assert_eq!(
        steps[2],
        ReconcileStep::Done {
            counter: 30,
            sum: 30,
            verified: 26,
            replayed: 6
        }
    );
    // Past the checkpoint nothing is left to replay.
    assert!(matches!(
        store.reconcile_step("r", 10, "").await.unwrap(),
        ReconcileStep::Done { replayed: 0, .. }
    ));
    // A new epoch replays everything again.
    assert!(matches!(
        store.reconcile_step("r", 100, "epoch-2").await.unwrap(),
        ReconcileStep::Done { replayed: 26, .. }
    ));
}

fn retention() -> billing_credits::store::Retention {
    billing_credits::store::Retention {
        request: KEEP,
        confirmed_margin: KEEP,
        tombstone: KEEP,
        message_owner: KEEP,
    }
}

/// The hold sweeper drops an index entry it read as settled (no debit
/// behind it, long expired) only while the entry still has the expiry it
/// read: a retry that re-indexed the message meanwhile and then debited
/// keeps its entry, so its hold is still released if the retry dies too.
/// The unconditional ZREM dropped it (issue 19.6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_keeps_a_hold_entry_a_retry_re_added() {
    let (_redis, store) = store().await;
    let shard = billing_credits::store::keys::hold_shard_of("k");
    balance(&store, "k", T0, &entitlement(&[career(1)])).await;
    // A send indexed its hold and died before its debit ran.
    store
        .prepare_debit("k", "msg-r", T0 + 1000, KEEP)
        .await
        .unwrap();
    // The sweeper reads the entry long after: nothing behind it, settled.
    let now = T0 + 60_000;
    let due = store.expired_holds(shard, now, 100).await.unwrap();
    assert_eq!(due, vec![("k".to_string(), "msg-r".to_string(), T0 + 1000)]);
    assert_eq!(
        store
            .debit_states(&[("k".into(), "msg-r".into())])
            .await
            .unwrap(),
        vec![None]
    );
    // Meanwhile a retry of the send indexes a new hold and debits.
    let expires = now + 30_000;
    store
        .prepare_debit("k", "msg-r", expires, KEEP)
        .await
        .unwrap();
    let ent = entitlement(&[career(1)]);
    let retry = Call {
        hold_expires_ms: expires,
        ..call("k", now + 1, &ent, "retry")
    };
    let held = store.debit(&retry, KEEP, "msg-r", 1).await.unwrap();
    assert_eq!(
        held.debit.as_ref().map(|d| d.state),
        Some(DebitState::Held),
        "{held:?}"
    );
    // The sweeper drops what it read as settled.
    store.forget_holds(shard, &due).await.unwrap();
    // The retry's hold is still indexed, due when it expires.
    let later = store.expired_holds(shard, expires, 100).await.unwrap();
    assert_eq!(
        later,
        vec![("k".to_string(), "msg-r".to_string(), expires)],
        "the retry's hold left the index: nothing would release it"
    );
    // Unchanged since read: dropped.
    store.forget_holds(shard, &later).await.unwrap();
    assert!(
        store
            .expired_holds(shard, i64::MAX, 100)
            .await
            .unwrap()
            .is_empty()
    );
}
