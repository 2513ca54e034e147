-- Writes a member's new subscription state together with the request's
-- outcome, if nobody changed the state since it was read (optimistic).
--
-- KEYS[1]  the subscription hash (rev, state)
-- KEYS[2]  the request record (fp, outcome)
-- KEYS[3]  the published revision (string)
-- KEYS[4]  the published Open Profile (string, tagged with the new revision)
-- KEYS[5]  the member's mutation quota (token bucket; runs after bucket.lua)
-- ARGV[1]  the revision read
-- ARGV[2]  the new state JSON ("" for a refusal: only the outcome is recorded)
-- ARGV[3]  fingerprint of the request's arguments
-- ARGV[4]  the outcome JSON
-- ARGV[5]  request record retention ms
-- ARGV[6]  the Open Profile to publish with the new state (its revision is
--          the read one + 1)
-- ARGV[7]  quota burst   ARGV[8]  quota tokens per ms
--
-- Checks before any write: the request id was not used with other arguments
-- and has no outcome yet; the revision is still the one read; a request id
-- not seen before takes a token of the member's quota (else limited).
-- Reply: {"ok"} | {"done", outcome} | {"mismatch"} | {"conflict"} |
--   {"limited", ms until a token}
local rec = redis.call('HMGET', KEYS[2], 'fp', 'outcome')
if rec[1] then
  if rec[1] ~= ARGV[3] then return {'mismatch'} end
  if rec[2] then return {'done', rec[2]} end
end
local rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
if rev ~= tonumber(ARGV[1]) then return {'conflict'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local wait, spend = bucket(KEYS[5], tonumber(ARGV[7]), tonumber(ARGV[8]), now)
if wait then return {'limited', tostring(wait)} end
spend()
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'rev', rev + 1, 'state', ARGV[2])
  redis.call('SET', KEYS[3], rev + 1)
  redis.call('SET', KEYS[4], ARGV[6])
end
redis.call('HSET', KEYS[2], 'fp', ARGV[3], 'outcome', ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[5])
return {'ok'}
