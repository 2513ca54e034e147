-- ReleaseDebit (and the hold sweeper): gives a held debit's credits back.
--
-- KEYS[4]  the debit record     ARGV[7]  message_id
-- ARGV[8]  reason (MESSAGE_NOT_STORED, HOLD_EXPIRED, ABANDONED)
-- ARGV[9]  tombstone retention ms
-- ARGV[10] "1": release only a hold whose time has run out (the sweeper)
-- (KEYS[1..3], ARGV[1..6]: account_args.lua)
--
-- Checks: a confirmed or refunded debit is never released (DEBIT_CONFIRMED).
-- An unknown id is recorded as released (amount 0), so a late
-- DebitForMessage with it is refused.
-- Reply: {"s":"ok","debit":{...},"released_now":bool,"balance_after":n}
local D, MSG, REASON, KEEP, ONLY_EXPIRED = KEYS[4], ARGV[7], ARGV[8], tonumber(ARGV[9]), ARGV[10] == '1'
local d = debit_view(D)
if not d then
  if ONLY_EXPIRED then save() return finish({ s = 'ok', released_now = false, balance_after = bal }) end
  redis.call('HSET', D, 'state', 'released', 'amount', 0, 't_return', NOW, 'reason', REASON)
  redis.call('PEXPIRE', D, KEEP)
  save()
  return finish({ s = 'ok', debit = debit_view(D), released_now = false, balance_after = bal })
end
if d.state == 'confirmed' or d.state == 'refunded' then
  save()
  return refuse('DEBIT_CONFIRMED', { debit = d, balance_after = bal })
end
if d.state == 'held' and not (ONLY_EXPIRED and now < tonumber(d.expires_at or '0')) then
  bal = bal + d.amount
  bump('released', d.amount)
  redis.call('HSET', D, 'state', 'released', 't_return', NOW, 'reason', REASON)
  redis.call('PEXPIRE', D, KEEP)
  entry('RELEASE', d.amount, MSG, REASON)
  save()
  return finish({ s = 'ok', debit = debit_view(D), released_now = true, released = d.amount, balance_after = bal })
end
save()
return finish({ s = 'ok', debit = d, released_now = false, balance_after = bal })
