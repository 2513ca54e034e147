-- Takes one of the inviter's weekly invitations and a place among their
-- pending ones. Runs after bucket.lua.
--
-- KEYS[1]  the inviter's sent invitations (sorted set: invitee by ms)
-- KEYS[2]  the inviter's invitation token bucket (hash: tokens, ts)
-- ARGV[1]  the invitee   ARGV[2]  now ms   ARGV[3]  burst (the weekly budget)
-- ARGV[4]  tokens per ms   ARGV[5]  most pending invitations
--
-- Checks before any write: the invitee listed already (present: nothing is
-- taken; the pair's script decides); fewer pending than the cap
-- (too_many_pending); a token (rate_limited, with the ms until one).
-- Reply (JSON): {"s":"reserved"} | {"s":"present"} | {"s":"too_many_pending"} |
--   {"s":"rate_limited","retry_ms":n}
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return cjson.encode({ s = 'present' }) end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[5]) then
  return cjson.encode({ s = 'too_many_pending' })
end
local now = tonumber(ARGV[2])
local wait, spend = bucket(KEYS[2], tonumber(ARGV[3]), tonumber(ARGV[4]), now)
if wait then return cjson.encode({ s = 'rate_limited', retry_ms = wait }) end
spend()
redis.call('ZADD', KEYS[1], now, ARGV[1])
return cjson.encode({ s = 'reserved' })
