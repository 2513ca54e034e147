-- ConfirmDebit: makes a held debit final. Touches only the debit record and
-- the request record, never the balance.
--
-- KEYS[1]  the debit record    KEYS[2]  unused    KEYS[3]  request record
-- ARGV[1]  now ms              ARGV[4]  request_id    ARGV[5]  fingerprint
-- ARGV[6]  request retention ms
-- ARGV[7]  refund window ms    ARGV[8]  confirmed-record retention ms
--
-- Checks: the debit exists (DEBIT_NOT_FOUND), is not released
-- (DEBIT_RELEASED), and its hold has not run out ({"s":"expired"}, not
-- recorded: the caller releases it). Confirming twice answers the same.
-- Reply: {"s":"ok","debit":{...}} or a refusal.
local D, R = KEYS[1], KEYS[3]
local now, NOW = tonumber(ARGV[1]), ARGV[1]
local REQ, FP, RETAIN = ARGV[4], ARGV[5], ARGV[6]
local WINDOW, KEEP = tonumber(ARGV[7]), tonumber(ARGV[8])
