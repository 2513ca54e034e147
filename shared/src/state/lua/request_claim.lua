-- Claims a request id for a multi-step operation (RequestLog::claim): one
-- caller at a time does the work; duplicates wait for its outcome.
--
-- Runs after bucket.lua.
--
-- KEYS[1]  the request record (hash: fp, outcome, owner, lease)
-- KEYS[2]  the member's mutation quota (token bucket), when charged
-- ARGV[1]  fingerprint of the request's arguments
-- ARGV[2]  retention ms
-- ARGV[3]  lease ms: how long the owner may take (its call's bound)
-- ARGV[4]  this caller's owner token
-- ARGV[5]  quota burst   ARGV[6]  quota tokens per ms (with KEYS[2])
--
-- Time is Redis's own (TIME), so every replica judges a lease alike.
-- Checks before any write: a record with another fingerprint is refused; a
-- stored outcome is answered; a live lease of another owner is waited for.
-- An expired lease (its owner died) is taken over. A request id not seen
-- before takes a token of the quota (else limited): every record a member
-- makes us keep is paid for.
-- Reply: {"new"} | {"done", outcome} | {"wait", ms left} | {"mismatch"} |
--   {"limited", ms until a token}
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rec = redis.call('HMGET', KEYS[1], 'fp', 'outcome', 'owner', 'lease')
if rec[1] and rec[1] ~= ARGV[1] then return {'mismatch'} end
if rec[2] then return {'done', rec[2]} end
local lease = tonumber(rec[4] or '0')
if rec[3] and rec[3] ~= ARGV[4] and lease > now then return {'wait', tostring(lease - now)} end
if not rec[1] and KEYS[2] then
  local wait, spend = bucket(KEYS[2], tonumber(ARGV[5]), tonumber(ARGV[6]), now)
  if wait then return {'limited', tostring(wait)} end
  spend()
end
redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'owner', ARGV[4], 'lease', now + tonumber(ARGV[3]))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {'new'}
