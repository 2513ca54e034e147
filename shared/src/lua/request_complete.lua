-- Stores the first outcome of a claimed request (RequestLog::complete).
--
-- KEYS[1]  the request record (hash: fp, outcome)
-- ARGV[1]  fingerprint of the request's arguments
-- ARGV[2]  the outcome (JSON)
-- ARGV[3]  retention ms
--
-- Checks before any write: the record still carries this fingerprint; the
-- first stored outcome wins.
-- Reply: 1 when stored, 0 when an outcome was there already
local fp = redis.call('HGET', KEYS[1], 'fp')
if fp and fp ~= ARGV[1] then return 0 end
if redis.call('HSETNX', KEYS[1], 'outcome', ARGV[2]) == 1 then
  if not fp then redis.call('HSET', KEYS[1], 'fp', ARGV[1]) end
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
