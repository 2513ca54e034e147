-- One member of a pair invites the other to connect.
--
-- KEYS[1]  the conversation hash
-- ARGV[1]  a   ARGV[2]  b   ARGV[3]  the inviter (a or b)
-- ARGV[4]  the note   ARGV[5]  now ms   ARGV[6]  the request id
--
-- Checks before any write: no block either way (BLOCKED); not connected
-- (ALREADY_CONNECTED); no pending invitation from the inviter
-- (INVITATION_PENDING; but the one this request made answers again, so a
-- retry after a crash gets the first outcome). A pending invitation from the other member is
-- accepted instead (both consented). Otherwise the inviter's cooling-off
-- after a withdrawn or ignored invitation must have passed (cooling_off).
-- Reply (JSON): {"s":"invited","at":ms} | {"s":"connected","since":ms} |
--   {"s":"refused","reason":R} | {"s":"cooling_off","ends":ms}
local f = redis.call('HMGET', KEYS[1], 'blk_a', 'blk_b', 'conn', 'inv_from', 'cool_a', 'cool_b', 'a',
  'inv_req', 'inv_at')
if f[1] or f[2] then return cjson.encode({ s = 'refused', reason = 'BLOCKED' }) end
if f[3] == '1' then return cjson.encode({ s = 'refused', reason = 'ALREADY_CONNECTED' }) end
local inviter, now = ARGV[3], tonumber(ARGV[5])
if f[4] == inviter then
  if f[8] == ARGV[6] then return cjson.encode({ s = 'invited', at = tonumber(f[9]) }) end
  return cjson.encode({ s = 'refused', reason = 'INVITATION_PENDING' })
end
if f[4] then
  redis.call('HDEL', KEYS[1], 'inv_from', 'inv_at', 'inv_note', 'inv_req')
  redis.call('HSET', KEYS[1], 'conn', 1, 'conn_at', ARGV[5])
  return cjson.encode({ s = 'connected', since = now })
end
local cool = f[6]
if inviter == ARGV[1] then cool = f[5] end
if cool and tonumber(cool) > now then
  return cjson.encode({ s = 'cooling_off', ends = tonumber(cool) })
end
if not f[7] then redis.call('HSET', KEYS[1], 'a', ARGV[1], 'b', ARGV[2], 'created', ARGV[5]) end
redis.call('HSET', KEYS[1], 'inv_from', inviter, 'inv_at', ARGV[5], 'inv_note', ARGV[4],
  'inv_req', ARGV[6])
return cjson.encode({ s = 'invited', at = now })
