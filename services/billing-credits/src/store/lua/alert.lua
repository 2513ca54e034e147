-- SetLowBalanceAlert: sets the member's low-balance threshold (0: off).
--
-- ARGV[7]  the threshold (validated at the edge)
-- (KEYS, ARGV[1..6] and the two last: account_args.lua)
--
-- Checks: none beyond the request id. save() then decides the alert against
-- the new threshold: a balance already at or below it gets its LOW_BALANCE
-- event now; a low state under a threshold turned off ends silently.
-- Reply: {"s":"ok","threshold":n,"balance":{...},"low":bool}
local THRESHOLD = tonumber(ARGV[7])
if num('alert') ~= THRESHOLD then set('alert', THRESHOLD) end
save()
return finish({ s = 'ok', threshold = THRESHOLD, balance = balance_view(), low = acct.alow == '1' })
