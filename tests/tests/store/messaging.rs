//! messaging's scripts.

use inmail_shared::state::storage::{Redis, RedisSettings};
use inmail_tests::RedisServer;
use messaging::domain::{InmailStage, Kind, RefundState};
use messaging::store::{
    Begin, Begun, Delivering, Delivery, Envelope, MessagingStore, Refusal, Response, SendLimits,
    Staged,
};

const T0: i64 = 1_800_000_000_000;
const WINDOW: i64 = 90 * 24 * 3600 * 1000;

async fn store() -> (RedisServer, MessagingStore) {
    let redis = RedisServer::start().await;
    let settings = RedisSettings {
        cluster: redis.is_cluster(),
        ..RedisSettings::new(redis.url())
    };
    let store = MessagingStore::new(Redis::open(&settings).unwrap());
    (redis, store)
}

fn limits(burst: u32) -> SendLimits {
    SendLimits {
        burst,
        tokens_per_ms: 1.0 / 60_000.0,
        free_burst: burst,
        free_tokens_per_ms: 1.0 / 60_000.0,
        open_profile_monthly: 800,
        open_profile_counter_ttl_ms: 3_600_000,
        request_retention_ms: 3_600_000,
        // Large enough not to be what a store test meets.
        quota: inmail_shared::state::idempotency::Quota::per_day(10_000, 10_000),
    }
}

fn envelope<'a>(sender: &'a str, recipient: &'a str, id: &'a str, conv: &'a str) -> Envelope<'a> {
    let (a, b) = messaging::domain::sorted(sender, recipient);
    Envelope {
        conv,
        a,
        b,
        message_id: id,
        sender,
        recipient,
        subject: "Hi",
        body: "Hello",
        fingerprint: "fp",
    }
}

fn begin(kind: Kind, now: i64) -> Begin<'static> {
    Begin {
        kind,
        now_ms: now,
        month: "205701",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_buckets_refuse_past_the_burst_and_refill_with_time() {
    let (_redis, store) = store().await;
    let lim = limits(2);
    for (i, expected_new) in [(0, true), (1, true), (2, false)] {
        let id = format!("m{i}");
        let e = envelope("s", "r", &id, "r~s");
        let begun = store
            .begin_send(&e, &format!("req{i}"), &begin(Kind::Connection, T0), &lim)
            .await
            .unwrap();
        assert_eq!(begun == Begun::New, expected_new, "{begun:?}");
        if !expected_new {
            assert!(matches!(begun, Begun::SendRateLimited { retry_ms } if retry_ms > 0));
        }
    }
    // InMails have a bucket of their own.
    let e = envelope("s", "t", "m9", "s~t");
    let begun = store
        .begin_send(&e, "req9", &begin(Kind::Inmail, T0), &lim)
        .await
        .unwrap();
    assert_eq!(begun, Begun::New);
    // A minute later one free send is allowed again.
    let e = envelope("s", "r", "m3", "r~s");
    let begun = store
        .begin_send(&e, "req3", &begin(Kind::Connection, T0 + 60_000), &lim)
        .await
        .unwrap();
    assert_eq!(begun, Begun::New);
    // The same request id answers what it claimed.
    let again = store
        .begin_send(&e, "req3", &begin(Kind::Connection, T0 + 60_001), &lim)
        .await
        .unwrap();
    assert!(matches!(again, Begun::Exists { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pair_has_one_pending_inmail_slot() {
    let (_redis, store) = store().await;
    let lim = limits(10);
    let first = envelope("ann", "bob", "i1", "ann~bob");
    let (begun, staged) = store
        .begin_and_stage(&first, "r1", &begin(Kind::Inmail, T0), &lim, T0 + 60_000)
        .await
        .unwrap();
    assert_eq!((begun, staged), (Begun::New, Staged::Ok));
    // The sender's second InMail to the same member is refused.
    let second = envelope("ann", "bob", "i2", "ann~bob");
    let (_, staged) = store
        .begin_and_stage(&second, "r2", &begin(Kind::Inmail, T0), &lim, T0 + 60_000)
        .await
        .unwrap();
    assert_eq!(
        staged,
        Staged::Refused {
            reason: Refusal::AwaitingResponse
        }
    );
    // The other member's InMail into the same pair must decide again.
    let back = envelope("bob", "ann", "i3", "ann~bob");
    let (_, staged) = store
        .begin_and_stage(&back, "r3", &begin(Kind::Inmail, T0), &lim, T0 + 60_000)
        .await
        .unwrap();
    assert_eq!(staged, Staged::Retry);
    let pair = store.conversation("ann~bob").await.unwrap().pair;
    assert_eq!(pair.inmail.unwrap().stage, InmailStage::Staged);
}

fn delivering(staged: bool, answering: bool, now: i64) -> Delivering {
    Delivering {
        staged,
        kind: if staged { Kind::Inmail } else { Kind::Reply },
        credits: i32::from(staged),
        now_ms: now,
        refund_window_ms: WINDOW,
        balance_after: None,
        answering,
        events_due_ms: now + 60_000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inmail_gets_exactly_one_response() {
    let (_redis, store) = store().await;
    let lim = limits(10);
    let inmail = envelope("cy", "di", "i1", "cy~di");
    store
        .begin_and_stage(&inmail, "r1", &begin(Kind::Inmail, T0), &lim, T0 + 60_000)
        .await
        .unwrap();
    let delivered = store
        .deliver(&inmail, &delivering(true, false, T0))
        .await
        .unwrap();
    assert!(matches!(delivered, Delivery::Ok(_)));

    let reply = envelope("di", "cy", "re1", "cy~di");
    let Delivery::Ok(first) = store
        .deliver(&reply, &delivering(false, true, T0 + 5))
        .await
        .unwrap()
    else {
        panic!("the first reply answers the InMail")
    };
    let response = first.response.expect("the InMail was answered");
    assert_eq!(
        (response.refund, response.responded_at),
        (RefundState::Due, T0 + 5)
    );

    // A second reply in response mode stores nothing and answers the first.
    let other = envelope("di", "cy", "re2", "cy~di");
    let again = store
        .deliver(&other, &delivering(false, true, T0 + 6))
        .await
        .unwrap();
    let Delivery::Responded(recorded) = again else {
        panic!("{again:?}")
    };
    assert_eq!(recorded.reply_id, "re1");
    assert!(store.message("cy~di", "re2").await.unwrap().is_none());

    // Accepting after a reply is refused; the refund settles once.
    let accept = store
        .respond("cy~di", "di", true, T0 + 7, WINDOW)
        .await
        .unwrap();
    assert_eq!(
        accept,
        Response::Refused {
            reason: Refusal::NoInmailAwaitingResponse
        }
    );
    assert!(
        store
            .settle_refund("cy~di", "i1", RefundState::Refunded)
            .await
            .unwrap()
    );
    assert!(
        !store
            .settle_refund("cy~di", "i1", RefundState::Refunded)
            .await
            .unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepting_twice_answers_the_recorded_response() {
    let (_redis, store) = store().await;
    let inmail = envelope("ed", "flo", "i1", "ed~flo");
    store
        .begin_and_stage(
            &inmail,
            "r1",
            &begin(Kind::Inmail, T0),
            &limits(10),
            T0 + 60_000,
        )
        .await
        .unwrap();
    store
        .deliver(&inmail, &delivering(true, false, T0))
        .await
        .unwrap();
    // Past the window: the response is recorded, the refund closed.
    let late = T0 + WINDOW + 1;
    let Response::Ok(first) = store
        .respond("ed~flo", "flo", true, late, WINDOW)
        .await
        .unwrap()
    else {
        panic!("the first accept is recorded")
    };
    assert_eq!(first.refund, RefundState::Closed);
    let again = store
        .respond("ed~flo", "flo", true, late + 1, WINDOW)
        .await
        .unwrap();
    assert_eq!(again, Response::Responded(first));
    let decline = store
        .respond("ed~flo", "flo", false, late + 2, WINDOW)
        .await
        .unwrap();
    assert!(matches!(decline, Response::Refused { .. }));
}

/// The outbox sweeper drops an item it found finished only while the item
/// is still due when it read it: a retry that added the same item again
/// meanwhile (a new time) keeps it (issue 19.6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_keeps_an_outbox_item_a_retry_re_added() {
    use messaging::store::{OutboxItem, keys};
    let (_redis, store) = store().await;
    let item = OutboxItem::Refund {
        conv: "ann~bob".into(),
        inmail_id: "m-1".into(),
        sender: "ann".into(),
    };
    let shard = keys::outbox_shard_of("ann~bob");
    store.outbox_add(&item, T0).await.unwrap();
    let due = store.outbox_due(shard, T0 + 1, 100).await.unwrap();
    assert_eq!(due, vec![(item.clone(), T0)]);
    // A retry adds the item again, due later; then the sweep drops what it
    // read as finished.
    store.outbox_add(&item, T0 + 60_000).await.unwrap();
    store.outbox_remove_many(shard, &due).await.unwrap();
    assert_eq!(
        store.outbox_due(shard, T0 + 60_000, 100).await.unwrap(),
        vec![(item.clone(), T0 + 60_000)],
        "the retry's item left the outbox"
    );
    // Unchanged since read: dropped.
    let due = store.outbox_due(shard, T0 + 60_000, 100).await.unwrap();
    store.outbox_remove_many(shard, &due).await.unwrap();
    assert!(
        store
            .outbox_due(shard, i64::MAX, 100)
            .await
            .unwrap()
            .is_empty()
    );
}
