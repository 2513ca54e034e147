-- RefundMessage: gives a confirmed debit's credits back (the recipient
-- responded). The credit goes to the current cycle's balance.
--
-- KEYS[4]  the debit record     ARGV[7]  message_id
-- ARGV[8]  when the recipient responded (ms): the window is judged then
-- ARGV[9]  how far the caller's clock may lag billing's (ms)
-- (KEYS[1..3], ARGV[1..6]: account_args.lua)
--
-- Checks before the first write: the debit exists (DEBIT_NOT_FOUND), the
-- response is not before the debit was made, less the clock skew
-- (RESPONDED_BEFORE_DEBIT: bad input, not recorded under the request id,
-- nothing written but a settle() of the account), is confirmed (held:
-- DEBIT_NOT_CONFIRMED; released: DEBIT_RELEASED), and the refund window is
-- open (REFUND_WINDOW_CLOSED). A refunded debit answers refunded_now=false.
-- Reply: {"s":"ok","debit":{...},"refunded_now":bool,"balance_after":n}
local D, MSG, RESPONDED, SKEW = KEYS[4], ARGV[7], tonumber(ARGV[8]), tonumber(ARGV[9])
local d = debit_view(D)
if not d then save() return refuse('DEBIT_NOT_FOUND') end
if d.debited_at and RESPONDED < tonumber(d.debited_at) - SKEW then
  save()
  return cjson.encode({ s = 'refused', reason = 'RESPONDED_BEFORE_DEBIT' })
end
if d.state == 'held' then save() return refuse('DEBIT_NOT_CONFIRMED', { debit = d }) end
if d.state == 'released' then save() return refuse('DEBIT_RELEASED', { debit = d }) end
if d.state == 'refunded' then
  save()
  return finish({ s = 'ok', debit = d, refunded_now = false, balance_after = bal })
end
if RESPONDED > tonumber(d.refundable_until or '0') then save() return refuse('REFUND_WINDOW_CLOSED', { debit = d }) end
bal = bal + d.amount
bump('refunded', d.amount)
redis.call('HSET', D, 'state', 'refunded', 't_return', NOW)
entry('REFUND', d.amount, MSG, '')
save()
return finish({ s = 'ok', debit = debit_view(D), refunded_now = true, refunded = d.amount, balance_after = bal })
