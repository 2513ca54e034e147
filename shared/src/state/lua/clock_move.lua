-- Moves the shared test clock forward (AdvanceTime "by", SetTime "to").
--
-- KEYS[1]  the clock's offset from system time (ms)
-- KEYS[2]  the request record of this move
-- ARGV[1]  fingerprint of the request's arguments
-- ARGV[2]  mode: "by" (ARGV[3] is a delta) or "to" (ARGV[3] is a target epoch ms)
-- ARGV[3]  amount ms
-- ARGV[4]  system time ms
-- ARGV[5]  request record retention ms
--
-- Checks before any write: the request id is not reused with other
-- arguments (a replay answers the first outcome); the clock never goes back.
-- Reply: {"ok", now_ms} | {"mismatch"} | {"back", now_ms}
local rec = redis.call('HMGET', KEYS[2], 'fp', 'now')
if rec[1] then
  if rec[1] ~= ARGV[1] then return {'mismatch'} end
  return {'ok', rec[2]}
end
local offset = tonumber(redis.call('GET', KEYS[1]) or '0')
local system = tonumber(ARGV[4])
local new_offset
if ARGV[2] == 'by' then
  new_offset = offset + tonumber(ARGV[3])
else
  if tonumber(ARGV[3]) < system + offset then return {'back', tostring(system + offset)} end
  new_offset = tonumber(ARGV[3]) - system
end
redis.call('SET', KEYS[1], string.format('%d', new_offset))
local now = string.format('%d', system + new_offset)
redis.call('HSET', KEYS[2], 'fp', ARGV[1], 'now', now)
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return {'ok', now}
