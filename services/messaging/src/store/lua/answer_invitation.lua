-- The invitee accepts or ignores a pending invitation, or its inviter
-- withdraws it.
--
-- KEYS[1]  the conversation hash
-- ARGV[1]  the inviter   ARGV[2]  accept | ignore | withdraw
-- ARGV[3]  now ms        ARGV[4]  the inviter's side ("a" | "b")
-- ARGV[5]  when the inviter may invite again (ignore, withdraw), ms
--
-- Checks before any write: an invitation from the inviter is pending (else
-- none; accepting when the two are connected answers the connection, so a
-- retry of an accept that was applied answers it again).
-- Reply (JSON): {"s":"connected","since":ms} | {"s":"done"} | {"s":"none"}
local f = redis.call('HMGET', KEYS[1], 'inv_from', 'conn', 'conn_at')
if f[1] ~= ARGV[1] then
  if ARGV[2] == 'accept' and f[2] == '1' then
    return cjson.encode({ s = 'connected', since = tonumber(f[3]) })
  end
  return cjson.encode({ s = 'none' })
end
redis.call('HDEL', KEYS[1], 'inv_from', 'inv_at', 'inv_note', 'inv_req')
if ARGV[2] == 'accept' then
  redis.call('HSET', KEYS[1], 'conn', 1, 'conn_at', ARGV[3])
  return cjson.encode({ s = 'connected', since = tonumber(ARGV[3]) })
end
redis.call('HSET', KEYS[1], 'cool_' .. ARGV[4], ARGV[5])
return cjson.encode({ s = 'done' })
