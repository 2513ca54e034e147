-- Claims a request id for a multi-step operation (RequestLog::claim).
--
-- KEYS[1]  the request record (hash: fp, outcome)
-- ARGV[1]  fingerprint of the request's arguments
-- ARGV[2]  retention ms
--
-- Checks before any write: a record with another fingerprint is refused.
-- Reply: {"new"} | {"pending"} | {"done", outcome} | {"mismatch"}
local rec = redis.call('HMGET', KEYS[1], 'fp', 'outcome')
if not rec[1] then
  redis.call('HSET', KEYS[1], 'fp', ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {'new'}
end
if rec[1] ~= ARGV[1] then return {'mismatch'} end
if rec[2] then return {'done', rec[2]} end
return {'pending'}
