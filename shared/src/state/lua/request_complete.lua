-- Ends the owner's claim of a request (RequestLog::complete): stores its
-- outcome, or (no outcome: a transient failure) lets a waiting duplicate
-- take over at once.
--
-- KEYS[1]  the request record (hash: fp, outcome, owner, lease)
-- ARGV[1]  fingerprint of the request's arguments
-- ARGV[2]  the outcome (JSON), or "" for none
-- ARGV[3]  retention ms
-- ARGV[4]  the owner token
--
-- Checks before any write: the record still carries this fingerprint; the
-- first stored outcome wins; only the owner gives its lease up.
-- Reply: 1 when an outcome was stored, 0 otherwise
local rec = redis.call('HMGET', KEYS[1], 'fp', 'owner')
if rec[1] and rec[1] ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  if rec[2] == ARGV[4] then redis.call('HDEL', KEYS[1], 'owner', 'lease') end
  return 0
end
if redis.call('HSETNX', KEYS[1], 'outcome', ARGV[2]) == 1 then
  redis.call('HSET', KEYS[1], 'fp', ARGV[1])
  redis.call('HDEL', KEYS[1], 'owner', 'lease')
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
