-- DebitForMessage: takes credits and holds them until ConfirmDebit.
--
-- KEYS[4]  the debit record        ARGV[7]  message_id
-- ARGV[8]  amount
-- ARGV[9]  when the hold expires (epoch ms): the score its entry in the hold
--          index was given before this script ran
-- (KEYS[1..3], ARGV[1..6]: account_args.lua)
--
-- Checks before the first write of the debit: an existing debit of this id
-- (same amount: answer it; other amount: MESSAGE_ID_CONFLICT; released:
-- DEBIT_RELEASED), a paid plan (PAID_PLAN_REQUIRED), enough credits
-- (INSUFFICIENT_CREDITS), and that the hold's index entry has not expired
-- yet (HOLD_WINDOW_MISSED, not recorded: the sweeper may already have
-- dropped an entry with no debit behind it, so a hold made now could escape
-- it; the caller retries with a new entry).
-- Writes: balance and cycle counter, the HELD debit record (no expiry), a
-- DEBIT ledger entry.
-- Reply: {"s":"ok","debit":{...},"balance_after":n,"debited":n} or a refusal.
local D, MSG, AMOUNT, EXPIRES = KEYS[4], ARGV[7], tonumber(ARGV[8]), tonumber(ARGV[9])
local AMOUNT_S, EXPIRES_S = ARGV[8], ARGV[9]
local existing = debit_view(D)
if existing then
  save()
  if existing.state == 'released' then return refuse('DEBIT_RELEASED') end
  if existing.amount ~= AMOUNT then return refuse('MESSAGE_ID_CONFLICT') end
  return finish({ s = 'ok', debit = existing, balance_after = existing.balance_after })
end
if num('paid') ~= 1 then save() return refuse('PAID_PLAN_REQUIRED', { balance = { available = bal } }) end
if bal < AMOUNT then save() return refuse('INSUFFICIENT_CREDITS', { balance = { available = bal } }) end
if now >= EXPIRES then
  save()
  return cjson.encode({ s = 'refused', reason = 'HOLD_WINDOW_MISSED' })
end
bal = bal - AMOUNT
bump('debited', AMOUNT)
redis.call('HSET', D, 'state', 'held', 'amount', AMOUNT_S, 't_debit', NOW, 't_expire', EXPIRES_S,
  'bal_after', int(bal), 'req', REQ)
entry('DEBIT', -AMOUNT, MSG, '')
save()
-- Times as the strings they came as (the reply takes either; no float
-- formatting), times not reached yet left out.
return finish({ s = 'ok', balance_after = bal, debited = AMOUNT,
  debit = { state = 'held', amount = AMOUNT, debited_at = NOW, expires_at = EXPIRES_S,
    balance_after = bal } })
