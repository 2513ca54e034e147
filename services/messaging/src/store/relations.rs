//! Connections, blocks and InMail preferences in Redis.

use inmail_shared::ApiError;
use inmail_shared::storage::Batch;

use super::reply::parse;
use super::{Connected, MessagingStore, keys};

impl MessagingStore {
    pub async fn connect(
        &self,
        conv: &str,
        a: &str,
        b: &str,
        now_ms: i64,
    ) -> Result<Connected, ApiError> {
        let reply: String = self
            .connect
            .key(keys::conv(conv))
            .arg(a)
            .arg(b)
            .arg(now_ms)
            .invoke_async(&mut self.redis.conn())
            .await?;
        parse("connect", &reply)
    }

    /// Both members' connection lists show the other since `at_ms`.
    pub async fn index_connection(
        &self,
        one: &str,
        other: &str,
        at_ms: i64,
    ) -> Result<(), ApiError> {
        let mut batch = Batch::new();
        for (list, member) in [(one, other), (other, one)] {
            batch.add_ignored(
                redis::cmd("ZADD")
                    .arg(keys::connections(list))
                    .arg(at_ms)
                    .arg(member)
                    .clone(),
            );
        }
        let () = self.redis.run(&batch).await?;
        Ok(())
    }

    /// Disconnects the pair; answers whether they were connected.
    pub async fn disconnect(&self, conv: &str, one: &str, other: &str) -> Result<bool, ApiError> {
        let was: i64 = self
            .disconnect
            .key(keys::conv(conv))
            .invoke_async(&mut self.redis.conn())
            .await?;
        self.unindex_connection(one, other).await?;
        Ok(was == 1)
    }

    async fn unindex_connection(&self, one: &str, other: &str) -> Result<(), ApiError> {
        let mut batch = Batch::new();
        for (list, member) in [(one, other), (other, one)] {
            batch.add_ignored(
                redis::cmd("ZREM")
                    .arg(keys::connections(list))
                    .arg(member)
                    .clone(),
            );
        }
        let () = self.redis.run(&batch).await?;
        Ok(())
    }

    /// `blocker` blocks `blocked`; answers when the block started.
    pub async fn block(
        &self,
        conv: &str,
        a: &str,
        b: &str,
        blocker: &str,
        blocked: &str,
        now_ms: i64,
    ) -> Result<i64, ApiError> {
        let side = if blocker == a { "a" } else { "b" };
        let since: i64 = self
            .block
            .key(keys::conv(conv))
            .arg(a)
            .arg(b)
            .arg(side)
            .arg(now_ms)
            .invoke_async(&mut self.redis.conn())
            .await?;
        self.unindex_connection(blocker, blocked).await?;
        let _: () = redis::cmd("ZADD")
            .arg(keys::blocked(blocker))
            .arg(since)
            .arg(blocked)
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(since)
    }

    /// Lifts `blocker`'s block of `blocked`; answers whether there was one.
    pub async fn unblock(
        &self,
        conv: &str,
        a: &str,
        blocker: &str,
        blocked: &str,
    ) -> Result<bool, ApiError> {
        let field = if blocker == a { "blk_a" } else { "blk_b" };
        let mut batch = Batch::new();
        batch
            .add(redis::cmd("HDEL").arg(keys::conv(conv)).arg(field).clone())
            .add_ignored(
                redis::cmd("ZREM")
                    .arg(keys::blocked(blocker))
                    .arg(blocked)
                    .clone(),
            );
        let (removed,): (i64,) = self.redis.run(&batch).await?;
        Ok(removed == 1)
    }

    pub async fn set_accepts_inmail(&self, member: &str, accepts: bool) -> Result<(), ApiError> {
        let _: () = redis::cmd("HSET")
            .arg(keys::prefs(member))
            .arg("inmail")
            .arg(if accepts { "1" } else { "0" })
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(())
    }

    pub async fn accepts_inmail(&self, member: &str) -> Result<bool, ApiError> {
        let value: Option<String> = redis::cmd("HGET")
            .arg(keys::prefs(member))
            .arg("inmail")
            .query_async(&mut self.redis.conn())
            .await?;
        Ok(value.as_deref() != Some("0"))
    }
}
