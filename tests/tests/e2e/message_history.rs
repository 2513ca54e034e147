//! Messages in the history store (issue 20): delivered messages older than
//! HISTORY_HOT_RETENTION move from Redis to a real PostgreSQL (inserted
//! idempotently and committed before Redis is trimmed); ListMessages,
//! ListConversations, GetConversation and retried requests read on into it
//! with no gap and no duplicate at the boundary; PostgreSQL down or
//! messaging killed mid-archive loses nothing and duplicates nothing.

use std::collections::HashSet;
use std::time::Duration;

use inmail_shared::contract::proto::messaging::v1 as pb;
use inmail_shared::contract::proto::messaging::v1::{InmailResponse, RefundStatus};
use inmail_shared::contract::reasons;
use inmail_tests::postgres::{Database, PgServer};
use inmail_tests::processes::ProcessStack;
use inmail_tests::redis_server::RedisServer;
use inmail_tests::{As, Stack, StackOptions, messaging_at, reason, rid};
use tonic::Code;

use crate::common::*;

fn history_options(db: &Database, hot: &str, interval: &str) -> StackOptions {
    let mut messaging_args = db.args();
    messaging_args.extend(
        [
            "--history-hot-retention",
            hot,
            "--archive-interval",
            interval,
            // Bulk sends: the free-send and change allowances out of the way.
            "--free-send-burst",
            "100000",
            "--free-sends-per-minute",
            "1000000",
            "--mutation-burst",
            "100000",
        ]
        .map(String::from),
    );
    StackOptions {
        messaging_args,
        ..Default::default()
    }
}

async fn archived_count(db: &Database) -> i64 {
    db.inspect()
        .await
        .query_one("SELECT count(*) FROM messages", &[])
        .await
        .unwrap()
        .get(0)
}

/// A conversation's archived message ids, newest first, as PostgreSQL holds
/// them (one row per seq: the primary key).
async fn archived_ids(db: &Database, conv: &str) -> Vec<String> {
    db.inspect()
        .await
        .query(
            "SELECT message_id FROM messages WHERE conversation_id = $1 ORDER BY seq DESC",
            &[&conv],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Delivered messages still in Redis over the conversations' timelines.
async fn hot_messages(redis: &RedisServer, convs: &[String]) -> u64 {
    let mut conn = redis.conn().await;
    let mut total = 0;
    for conv in convs {
        total += redis::cmd("ZCARD")
            .arg(format!("messaging:{{{conv}}}:timeline"))
            .query_async::<u64>(&mut conn)
            .await
            .unwrap();
    }
    total
}

/// Bytes Redis uses for the conversations' messages and timelines
/// (`MEMORY USAGE` of each message hash named and each timeline).
async fn history_bytes(redis: &RedisServer, convs: &[(String, Vec<String>)]) -> u64 {
    let mut conn = redis.conn().await;
    let mut total = 0;
    for (conv, ids) in convs {
        let mut pipe = redis::pipe();
        pipe.cmd("MEMORY")
            .arg("USAGE")
            .arg(format!("messaging:{{{conv}}}:timeline"))
            .arg("SAMPLES")
            .arg(0);
        for id in ids {
            pipe.cmd("MEMORY")
                .arg("USAGE")
                .arg(format!("messaging:{{{conv}}}:msg:{id}"));
        }
        let sizes: Vec<Option<u64>> = pipe.query_async(&mut conn).await.unwrap();
        total += sizes.into_iter().flatten().sum::<u64>();
    }
    total
}

/// A conversation's whole history through ListMessages, `page_size` at a
/// time, newest first.
async fn messages_paged(
    client: &mut inmail_tests::MessagingClient,
    member: &str,
    conv: &str,
    page_size: i32,
) -> Result<Vec<pb::Message>, tonic::Status> {
    let mut messages = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_messages(pb::ListMessagesRequest {
                member_id: member.into(),
                conversation_id: conv.into(),
                page_size,
                page_token: token,
            })
            .await?
            .into_inner();
        messages.extend(page.messages);
        if page.next_page_token.is_empty() {
            return Ok(messages);
        }
        token = page.next_page_token;
    }
}

fn ids(messages: &[pb::Message]) -> Vec<String> {
    messages.iter().map(|m| m.message_id.clone()).collect()
}

async fn inbox(stack: &Stack, member: &str) -> Vec<pb::Conversation> {
    stack
        .messaging_as(member)
        .list_conversations(pb::ListConversationsRequest {
            member_id: member.into(),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .conversations
}

/// Delivered messages older than the hot window move to PostgreSQL, and
/// every read goes on as before: ListMessages on pages of any size,
/// ListConversations and GetConversation with their last messages, a retry
/// of a SendMessage and of an accept (their request records hold ids and
/// outcomes, and the replay re-reads the message from PostgreSQL), and a
/// reply to an archived InMail is still refunded. New messages page on
/// into the archived ones with no gap and no duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn old_messages_move_to_postgresql_and_every_read_goes_on() {
    let db = PgServer::shared().database("inmail_messaging");
    let stack = Stack::start_with(history_options(&db, "1day", "200ms")).await;
    subscribe(&stack, "mha", "premium-career").await;
    // mha InMails mhb and mhc; mhc accepts; mha and mhd are connected and
    // talk.
    stack
        .messaging_as("mha")
        .send_message(send_request("mha", "mhb", "Role", "Interested?"))
        .await
        .unwrap();
    send(&stack, "mha", "mhc").await.unwrap();
    let to_mhb = messaging::domain::conversation_id("mha", "mhb");
    let to_mhc = messaging::domain::conversation_id("mha", "mhc");
    let accept_request = pb::RespondToInmailRequest {
        request_id: rid(),
        member_id: "mhc".into(),
        conversation_id: to_mhc.clone(),
        response: InmailResponse::Accept as i32,
        body: String::new(),
    };
    let accepted = stack
        .messaging_as("mhc")
        .respond_to_inmail(accept_request.clone())
        .await
        .unwrap()
        .into_inner();
    connect(&stack, "mha", "mhd").await;
    let mut sent_to_mhd = Vec::new();
    for i in 0..7 {
        let (from, to) = if i % 2 == 0 {
            ("mha", "mhd")
        } else {
            ("mhd", "mha")
        };
        let request = send_request(from, to, "", &format!("message {i}"));
        stack
            .messaging_as(from)
            .send_message(request.clone())
            .await
            .unwrap();
        sent_to_mhd.push((from, request));
    }
    let to_mhd = messaging::domain::conversation_id("mha", "mhd");
    let convs = [to_mhb.clone(), to_mhc.clone(), to_mhd.clone()];
    let mut client = stack.messaging_as("mha");
    let before: Vec<Vec<pb::Message>> = {
        let mut all = Vec::new();
        for conv in &convs {
            all.push(messages_paged(&mut client, "mha", conv, 100).await.unwrap());
        }
        all
    };
    assert_eq!(before[2].len(), 7);
    let inbox_before = inbox(&stack, "mha").await;
    let balance_before = available(&stack, "mha").await;

    stack.advance(2 * DAY).await;
    assert!(
        eventually(Duration::from_secs(20), || async {
            hot_messages(&stack.redis, &convs).await == 0
        })
        .await,
        "the messages were not archived"
    );
    assert_eq!(archived_count(&db).await, 9);

    // Every read as before, on pages of every size.
    for (conv, expected) in convs.iter().zip(&before) {
        for size in [1, 2, 3, 100] {
            let paged = messages_paged(&mut client, "mha", conv, size)
                .await
                .unwrap();
            assert_eq!(&paged, expected, "{conv} on pages of {size}");
        }
    }
    assert_eq!(inbox(&stack, "mha").await, inbox_before);
    let shown = conversation(&stack, "mhd", &to_mhd).await.unwrap();
    assert_eq!(shown.last_message.as_ref(), before[2].first());

    // A retried send answers the same message, read from PostgreSQL, and
    // charges nothing more.
    let again = stack
        .messaging_as("mha")
        .send_message(sent_to_mhd[0].1.clone())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.message, before[2].last().cloned());
    // A retried accept answers the recorded outcome and the conversation as
    // it is now, its last message read from PostgreSQL.
    let replayed = stack
        .messaging_as("mhc")
        .respond_to_inmail(accept_request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(replayed.refund_status, accepted.refund_status);
    assert_eq!(
        replayed.conversation.as_ref().unwrap().last_message,
        accepted.conversation.as_ref().unwrap().last_message
    );
    assert!(replayed.conversation.unwrap().last_message.is_some());

    // mhb replies to the archived InMail: refunded as ever.
    let reply = respond(&stack, "mhb", &to_mhb, InmailResponse::Reply, "Yes!")
        .await
        .unwrap();
    assert_eq!(reply.refund_status, RefundStatus::Refunded as i32);
    assert_eq!(available(&stack, "mha").await, balance_before + 1);

    // New messages page on into the archived ones: newest first, each once.
    send(&stack, "mha", "mhd").await.unwrap();
    send(&stack, "mhd", "mha").await.unwrap();
    for size in [1, 2, 3, 100] {
        let paged = messages_paged(&mut client, "mha", &to_mhd, size)
            .await
            .unwrap();
        assert_eq!(paged.len(), 9, "pages of {size}");
        assert_eq!(&paged[2..], &before[2][..], "pages of {size}");
        let unique: HashSet<&str> = paged.iter().map(|m| m.message_id.as_str()).collect();
        assert_eq!(unique.len(), 9);
    }
    let mut archived = archived_ids(&db, &to_mhd).await;
    assert_eq!(archived, ids(&before[2]));
    archived.dedup();
    assert_eq!(archived.len(), 7);
}

/// 20,000 real messages over 100 conversations, then the test clock moves
/// past their hot window (a day; the archiver's own pace, a pass a second,
/// is the real one): afterwards every message is in PostgreSQL exactly
/// once, Redis holds none of them (their memory is flat: nothing per
/// message whatever the history; before and after are printed), and paging
/// — also while the archiver runs — returns every message in order with no
/// duplicate at the boundary.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_thousand_messages_end_in_postgresql_once_and_redis_stays_flat() {
    const PAIRS: usize = 100;
    const MESSAGES: usize = 200;
    let db = PgServer::shared().database("inmail_messaging");
    let stack = Stack::start_with(history_options(&db, "1day", "1s")).await;
    let pairs: Vec<(String, String)> = (0..PAIRS)
        .map(|i| (format!("fa{i}"), format!("fb{i}")))
        .collect();
    for (a, b) in &pairs {
        connect(&stack, a, b).await;
    }
    let addr = stack.messaging.addr;
    let workers: Vec<_> = pairs
        .chunks(2)
        .map(|chunk| {
            let chunk = chunk.to_vec();
            tokio::spawn(async move {
                for (a, b) in &chunk {
                    let mut client = messaging_at(addr, &As::member(a));
                    for i in 0..MESSAGES {
                        client
                            .send_message(send_request(a, b, "", &format!("note {i} to {b}")))
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
    let convs: Vec<String> = pairs
        .iter()
        .map(|(a, b)| messaging::domain::conversation_id(a, b))
        .collect();
    // What each conversation holds, read before anything can be archived.
    let mut expected = Vec::new();
    for ((a, _), conv) in pairs.iter().zip(&convs) {
        let paged = messages_paged(&mut stack.messaging_as(a), a, conv, 100)
            .await
            .unwrap();
        assert_eq!(paged.len(), MESSAGES, "{conv}");
        expected.push((conv.clone(), ids(&paged)));
    }
    let total = PAIRS * MESSAGES;
    assert_eq!(hot_messages(&stack.redis, &convs).await, total as u64);
    let bytes_before = history_bytes(&stack.redis, &expected).await;
    stack.advance(2 * DAY).await;

    // While the archiver runs, a conversation pages identically.
    let mut reads_while_archiving = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while hot_messages(&stack.redis, &convs).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the archiver did not drain Redis in 120 s"
        );
        let i = (reads_while_archiving * 7) % PAIRS;
        let a = &pairs[i].0;
        let paged = messages_paged(&mut stack.messaging_as(a), a, &convs[i], 37)
            .await
            .unwrap();
        assert_eq!(ids(&paged), expected[i].1, "{} while archiving", convs[i]);
        reads_while_archiving += 1;
    }
    assert!(
        reads_while_archiving > 0,
        "the archiver drained Redis before any read: nothing was paged while it ran"
    );
    let bytes_after = history_bytes(&stack.redis, &expected).await;
    println!(
        "messages in Redis: {bytes_before} bytes for {total} messages before, {bytes_after} \
         after ({reads_while_archiving} reads while archiving)"
    );
    // The bound (README.md, "The history store"): once archived, a message
    // leaves nothing in Redis (the conversation's hash, its counters and
    // the inbox entries stay: state, not history).
    assert_eq!(
        bytes_after, 0,
        "Redis still holds {bytes_after} bytes of messages"
    );

    // Every message exactly once in PostgreSQL, and every conversation
    // whole.
    assert_eq!(archived_count(&db).await, total as i64);
    for ((a, _), (conv, expected)) in pairs.iter().zip(&expected) {
        assert_eq!(
            &archived_ids(&db, conv).await,
            expected,
            "{conv} in PostgreSQL"
        );
        let paged = messages_paged(&mut stack.messaging_as(a), a, conv, 100)
            .await
            .unwrap();
        assert_eq!(&ids(&paged), expected, "{conv} paged");
    }
}

/// PostgreSQL stopped for a while: sends go on, the messages due for the
/// archive wait in Redis (the lag grows), a page that needs the archive
/// answers UNAVAILABLE (HISTORY_UNAVAILABLE) while a page Redis can begin
/// answers what Redis holds, health stays SERVING; once PostgreSQL is back
/// the lag drains and nothing is lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgresql_down_for_a_while_loses_no_message_and_blocks_only_archived_reads() {
    let mut pg = PgServer::private();
    let db = pg.database("inmail_messaging");
    let stack = Stack::start_with(history_options(&db, "1day", "200ms")).await;
    connect(&stack, "pda", "pdb").await;
    let conv = messaging::domain::conversation_id("pda", "pdb");
    // pdc's InMail to pdd, archived before PostgreSQL stops.
    subscribe(&stack, "pdc", "premium-career").await;
    send(&stack, "pdc", "pdd").await.unwrap();
    let inmail_conv = messaging::domain::conversation_id("pdc", "pdd");
    let convs = [conv.clone(), inmail_conv.clone()];
    for _ in 0..3 {
        send(&stack, "pda", "pdb").await.unwrap();
    }
    stack.advance(2 * DAY).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            hot_messages(&stack.redis, &convs).await == 0
        })
        .await,
        "the first messages were not archived"
    );

    pg.stop();
    send(&stack, "pdb", "pda").await.unwrap();
    send(&stack, "pda", "pdb").await.unwrap();
    stack.advance(2 * DAY).await;
    // Several archive passes fail meanwhile; the two messages stay in Redis.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(hot_messages(&stack.redis, &convs).await, 2);
    assert_eq!(
        inmail_tests::health(stack.messaging.addr).await.unwrap(),
        inmail_tests::SERVING
    );
    // The conversation's last message is in Redis: the inbox lists.
    assert_eq!(inbox(&stack, "pda").await.len(), 1);
    // pdd accepts the archived InMail: done, refunded, and answered with
    // the conversation without its archived last message.
    let accepted = respond(&stack, "pdd", &inmail_conv, InmailResponse::Accept, "")
        .await
        .expect("a response needs Redis only");
    assert_eq!(accepted.refund_status, RefundStatus::Refunded as i32);
    let shown = accepted.conversation.expect("the conversation");
    assert_eq!(shown.message_count, 1);
    assert!(shown.last_message.is_none());
    assert_eq!(available(&stack, "pdc").await, 5);
    // Showing it alone needs its last message: refused until PostgreSQL is
    // back.
    let refused = conversation(&stack, "pdd", &inmail_conv).await.unwrap_err();
    assert_eq!(reason(&refused), reasons::HISTORY_UNAVAILABLE);
    let mut client = stack.messaging_as("pda");
    let list = |size: i32, token: String| pb::ListMessagesRequest {
        member_id: "pda".into(),
        conversation_id: conv.clone(),
        page_size: size,
        page_token: token,
    };
    // A page Redis begins ends where Redis does, its token leading on.
    let recent = client.list_messages(list(5, String::new())).await;
    let recent = recent
        .expect("the recent page needs Redis only")
        .into_inner();
    assert_eq!(recent.messages.len(), 2);
    assert!(!recent.next_page_token.is_empty());
    let archived = client
        .list_messages(list(5, recent.next_page_token))
        .await
        .unwrap_err();
    assert_eq!(archived.code(), Code::Unavailable, "{archived:?}");
    assert_eq!(reason(&archived), reasons::HISTORY_UNAVAILABLE);

    pg.restart();
    assert!(
        eventually(Duration::from_secs(15), || async {
            hot_messages(&stack.redis, &convs).await == 0
        })
        .await,
        "the lag did not drain once PostgreSQL was back"
    );
    let all = messages_paged(&mut client, "pda", &conv, 2).await.unwrap();
    assert_eq!(all.len(), 5);
    let unique: HashSet<&str> = all.iter().map(|m| m.message_id.as_str()).collect();
    assert_eq!(unique.len(), 5);
    assert_eq!(archived_count(&db).await, 6);
    let shown = conversation(&stack, "pdd", &inmail_conv).await.unwrap();
    assert_eq!(shown.last_message.unwrap().subject, "Hello");
}

/// Delivered messages written straight into Redis the way DELIVER writes
/// them, sent at `at_ms`: `count` of them from `a` to `b`, seqs 1..=count,
/// bodies "bulk 1", "bulk 2", ….
async fn grow_conversation(redis: &RedisServer, a: &str, b: &str, count: usize, at_ms: i64) {
    grow_conversation_saying(redis, a, b, count, at_ms, "bulk ").await;
}

async fn grow_conversation_saying(
    redis: &RedisServer,
    a: &str,
    b: &str,
    count: usize,
    at_ms: i64,
    body: &str,
) {
    let script = redis::Script::new(
        r#"
for i = 1, tonumber(ARGV[3]) do
  local id = ARGV[5] .. '-' .. i
  redis.call('HSET', KEYS[2] .. id, 'from', ARGV[1], 'to', ARGV[2], 'kind', 'CONNECTION',
    'subject', '', 'body', ARGV[6] .. i, 'credits', 0, 'at', ARGV[4], 'fp', 'f' .. i,
    'state', 'delivered', 'seq', i, 'bal_after', '')
  redis.call('ZADD', KEYS[3], i, id)
  redis.call('HSET', KEYS[1], 'last_msg', id)
end
redis.call('HSET', KEYS[1], 'a', ARGV[1], 'b', ARGV[2], 'created', ARGV[4], 'conn', 1,
  'conn_at', ARGV[4], 'seq', ARGV[3], 'count', ARGV[3], 'w_a', ARGV[3], 'last', ARGV[4])
return 1
"#,
    );
    let conv = messaging::domain::conversation_id(a, b);
    let mut conn = redis.conn().await;
    let _: i64 = script
        .key(format!("messaging:{{{conv}}}:conv"))
        .key(format!("messaging:{{{conv}}}:msg:"))
        .key(format!("messaging:{{{conv}}}:timeline"))
        .arg(a)
        .arg(b)
        .arg(count)
        .arg(at_ms)
        .arg(format!("m{a}"))
        .arg(body)
        .invoke_async(&mut conn)
        .await
        .unwrap();
}

/// messaging killed (SIGKILL) in the middle of archiving, then started
/// again: every message ends in PostgreSQL exactly once and out of Redis,
/// and every conversation pages whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn messaging_killed_while_archiving_loses_and_doubles_no_message() {
    const CONVS: usize = 40;
    const MESSAGES: usize = 300;
    let db = PgServer::shared().database("inmail_messaging");
    let env_db = db.clone();
    let mut stack = ProcessStack::start(move |name| match name {
        "messaging" => {
            let mut env = env_db.env();
            env.extend([
                ("HISTORY_HOT_RETENTION".into(), "1s".into()),
                ("ARCHIVE_INTERVAL".into(), "100ms".into()),
            ]);
            env
        }
        _ => vec![],
    })
    .await;
    let pairs: Vec<(String, String)> = (0..CONVS)
        .map(|i| (format!("ka{i}"), format!("kb{i}")))
        .collect();
    for (a, b) in &pairs {
        grow_conversation(&stack.redis, a, b, MESSAGES, 0).await;
    }
    let convs: Vec<String> = pairs
        .iter()
        .map(|(a, b)| messaging::domain::conversation_id(a, b))
        .collect();
    let total = (CONVS * MESSAGES) as i64;
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
    stack.messaging.kill();
    let at_kill = archived_count(&db).await;
    assert!(at_kill < total, "the archive finished before the kill");
    stack.messaging.restart().await;
    // Generous: on a Redis Cluster a batch's commands go one round trip
    // each, and CI shares 2 cores among 4 tests.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while hot_messages(&stack.redis, &convs).await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the restarted messaging did not finish the archive"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(archived_count(&db).await, total);
    for ((a, _), conv) in pairs.iter().zip(&convs) {
        let mut client = messaging_at(stack.messaging.addr, &As::member(a));
        let all = messages_paged(&mut client, a, conv, 100).await.unwrap();
        // Newest first: bodies MESSAGES down to 1, each once, no gap.
        let bodies: Vec<String> = all.iter().map(|m| m.body.clone()).collect();
        let expected: Vec<String> = (1..=MESSAGES).rev().map(|i| format!("bulk {i}")).collect();
        assert_eq!(bodies, expected, "{conv}");
    }
}

/// A conversation whose messages PostgreSQL refuses (a NUL byte, written
/// straight into Redis: the edge refuses one) stays whole in Redis, and the
/// conversations archived in the same batch still move.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_conversation_postgresql_refuses_does_not_hold_up_the_others() {
    let db = PgServer::shared().database("inmail_messaging");
    let stack = Stack::start_with(history_options(&db, "1s", "200ms")).await;
    grow_conversation_saying(&stack.redis, "bada", "badb", 3, 0, "broken\0").await;
    let good: Vec<String> = (0..6)
        .map(|i| messaging::domain::conversation_id(&format!("gooda{i}"), &format!("goodb{i}")))
        .collect();
    for i in 0..6 {
        grow_conversation(
            &stack.redis,
            &format!("gooda{i}"),
            &format!("goodb{i}"),
            3,
            0,
        )
        .await;
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            hot_messages(&stack.redis, &good).await == 0
        })
        .await,
        "the good conversations were not archived"
    );
    assert_eq!(archived_count(&db).await, 3 * good.len() as i64);
    let bad = [messaging::domain::conversation_id("bada", "badb")];
    assert_eq!(hot_messages(&stack.redis, &bad).await, 3);
    // And the edge refuses a NUL now.
    let status = stack
        .messaging_as("gooda0")
        .send_message(send_request("gooda0", "goodb0", "", "nul\0"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("body"), "{status:?}");
}
