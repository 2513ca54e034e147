-- billing-credits' history: ledger entries older than LEDGER_HOT_RETENTION,
-- moved out of Redis by the archiver (services/billing-credits/src/archive.rs).
-- An entry is written once and never changed.
--
-- Partitioned by month of the entry's id time (entry_ms): the archiver
-- creates each month's partition before its first insert (history.rs), and
-- an operator drops or detaches whole months past the audit retention.
CREATE TABLE ledger_entries (
    member_id     text    NOT NULL,
    -- The entry's id in Redis's stream, "<entry_ms>-<entry_seq>": its order
    -- in the member's ledger.
    entry_ms      bigint  NOT NULL,
    entry_seq     bigint  NOT NULL,
    -- When it happened (the service clock), ms since the Unix epoch.
    at_ms         bigint  NOT NULL,
    kind          text    NOT NULL,
    amount        bigint  NOT NULL,
    balance_after bigint  NOT NULL,
    message_id    text    NOT NULL,
    request_id    text    NOT NULL,
    plan_id       text    NOT NULL,
    plan_version  bigint  NOT NULL,
    cycle_index   integer NOT NULL,
    note          text    NOT NULL,
    archived_at   timestamptz NOT NULL DEFAULT now(),
    -- A member's ledger newest first (ListLedgerEntries) and the insert that
    -- skips what is already archived.
    PRIMARY KEY (member_id, entry_ms, entry_seq)
) PARTITION BY RANGE (entry_ms);

-- The audit export over a time range, and a member's balance as of a time.
CREATE INDEX ledger_entries_at ON ledger_entries (at_ms);
CREATE INDEX ledger_entries_member_at ON ledger_entries (member_id, at_ms);
