-- ConfirmDebit's body (after confirm_args.lua and request.lua).
do
  local replay = check_request()
  if replay then return replay end
end
local d = debit_view(D)
if not d then return refuse('DEBIT_NOT_FOUND') end
if d.state == 'released' then return refuse('DEBIT_RELEASED', { debit = d }) end
if d.state == 'held' then
  if now >= tonumber(d.expires_at or '0') then return cjson.encode({ s = 'expired' }) end
  local refundable = int(now + WINDOW)
  redis.call('HSET', D, 'state', 'confirmed', 't_confirm', NOW, 'refundable', refundable)
  redis.call('PEXPIRE', D, int(WINDOW + KEEP))
  d.state, d.confirmed_at, d.refundable_until = 'confirmed', NOW, refundable
end
return finish({ s = 'ok', debit = d })
