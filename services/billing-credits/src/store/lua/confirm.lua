-- ConfirmDebit's body (after confirm_args.lua and request.lua).
do
  local replay = check_request()
  if replay then return replay end
end
local d = debit_view(D)
if not d then return refuse('DEBIT_NOT_FOUND') end
if d.state == 'released' then return refuse('DEBIT_RELEASED', { debit = d }) end
if d.state == 'held' then
  if now >= d.expires_at then return cjson.encode({ s = 'expired' }) end
  redis.call('HSET', D, 'state', 'confirmed', 't_confirm', now, 'refundable', now + WINDOW)
  redis.call('PEXPIRE', D, WINDOW + KEEP)
  d.state, d.confirmed_at, d.refundable_until = 'confirmed', now, now + WINDOW
end
return finish({ s = 'ok', debit = d })
