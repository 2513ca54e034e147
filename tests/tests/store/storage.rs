//! The shared Redis access layer against a real Redis (one, or a cluster
//! with `INMAIL_TEST_REDIS=cluster`).

use inmail_shared::state::storage::{Batch, READ_FANOUT, Redis, RedisSettings};
use inmail_tests::RedisServer;

/// A read batch over keys of many slots (on a cluster: several nodes, more
/// commands than go out at once) answers each command's reply in the
/// batch's order, missing keys as nil, ignored commands left out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_batch_answers_in_its_order() {
    let server = RedisServer::start().await;
    let settings = RedisSettings {
        cluster: server.is_cluster(),
        ..RedisSettings::new(server.url())
    };
    let redis = Redis::open(&settings).unwrap();
    let count = READ_FANOUT * 5 + 3;
    let mut writes = Batch::new();
    for i in (0..count).filter(|i| i % 7 != 0) {
        writes.add_ignored(
            redis::cmd("SET")
                .arg(format!("read-batch:{i}"))
                .arg(format!("value {i}"))
                .clone(),
        );
    }
    let () = redis.run(&writes).await.unwrap();

    let mut reads = Batch::new();
    let mut expected = Vec::new();
    for i in 0..count {
        reads.add(redis::cmd("GET").arg(format!("read-batch:{i}")).clone());
        expected.push((i % 7 != 0).then(|| format!("value {i}")));
        if i % 50 == 0 {
            reads.add_ignored(redis::cmd("EXISTS").arg(format!("read-batch:{i}")).clone());
        }
    }
    let got: Vec<Option<String>> = redis.read_bulk(&reads).await.unwrap();
    assert_eq!(got, expected);
}
