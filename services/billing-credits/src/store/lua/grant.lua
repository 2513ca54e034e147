-- GrantCredits: an operator top-up, a GRANT ledger entry.
--
-- ARGV[7]  amount (validated at the edge)    ARGV[8]  reason
-- (KEYS[1..3], ARGV[1..6]: account_args.lua)
--
-- Checks: none beyond the request id.
-- Reply: {"s":"ok","entry_id":id,"balance_after":n,"granted":n}
local AMOUNT, REASON = tonumber(ARGV[7]), ARGV[8]
bal = bal + AMOUNT
bump('granted', AMOUNT)
local id = entry('GRANT', AMOUNT, '', REASON)
save()
return finish({ s = 'ok', entry_id = id, balance_after = bal, granted = AMOUNT })
