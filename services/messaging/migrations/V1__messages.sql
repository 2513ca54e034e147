-- messaging's history: delivered messages older than HISTORY_HOT_RETENTION,
-- moved out of Redis by the archiver (services/messaging/src/archive.rs).
-- A delivered message is written once and never changed.
--
-- Partitioned by month of when the message was sent (sent_at_ms): the
-- archiver creates each month's partition before its first insert, and an
-- operator drops or detaches whole months past the retention.
CREATE TABLE messages (
    -- The conversation ("<a>~<b>", its members sorted) and the message's
    -- place in it (1, 2, …: the order ListMessages pages in).
    conversation_id text    NOT NULL,
    seq             bigint  NOT NULL,
    message_id      text    NOT NULL,
    sender_id       text    NOT NULL,
    recipient_id    text    NOT NULL,
    kind            text    NOT NULL,
    subject         text    NOT NULL,
    body            text    NOT NULL,
    credits         integer NOT NULL,
    -- When it was sent (the service clock), ms since the Unix epoch.
    sent_at_ms      bigint  NOT NULL,
    -- The sender's balance after an InMail's debit, when known.
    balance_after   bigint,
    -- The fingerprint of the request that sent it (a retry of that request
    -- answers this message; another body is refused).
    fingerprint     text    NOT NULL,
    archived_at     timestamptz NOT NULL DEFAULT now(),
    -- A conversation's messages newest first (ListMessages) and the insert
    -- that skips what is already archived (a message's seq and time never
    -- change once delivered).
    PRIMARY KEY (conversation_id, seq, sent_at_ms)
) PARTITION BY RANGE (sent_at_ms);

-- A message by its id: a retried send, a conversation's last message.
CREATE INDEX messages_by_id ON messages (conversation_id, message_id);
