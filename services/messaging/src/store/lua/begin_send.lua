-- Claims a send's request id and spends the sender's allowance for its kind.
-- Runs after bucket.lua.
--
-- KEYS[1]  the sender's request record (hash: fp, msg, conv, refused)
-- KEYS[2]  the sender's InMail token bucket (hash: tokens, ts)
-- KEYS[3]  the sender's Open Profile counter of this calendar month
-- KEYS[4]  the sender's token bucket of free sends (hash: tokens, ts)
-- KEYS[5]  the sender's mutation quota (token bucket)
-- ARGV[1]  fingerprint        ARGV[2]  message id     ARGV[3]  conversation
-- ARGV[4]  kind (INMAIL, OPEN_PROFILE, CONNECTION, REPLY, FOLLOW_UP)
-- ARGV[5]  now ms             ARGV[6]  InMail burst   ARGV[7]  tokens per ms
-- ARGV[8]  Open Profile monthly limit                 ARGV[9]  counter ttl ms
-- ARGV[10] request record retention ms
-- ARGV[11] free-send burst        ARGV[12] free-send tokens per ms
-- ARGV[13] quota burst            ARGV[14] quota tokens per ms
--
-- Checks before any write: request id reuse; a token of the mutation quota
-- (else mutation_limited); for an INMAIL a token of the
-- InMail bucket (else rate_limited with the ms until one); for the free
-- kinds a token of the free-send bucket (else send_rate_limited), and for
-- OPEN_PROFILE the monthly limit.
-- Reply (JSON): {"s":"new"} | {"s":"exists","msg":id,"conv":c} |
--   {"s":"mismatch"} | {"s":"rate_limited","retry_ms":n} |
--   {"s":"send_rate_limited","retry_ms":n} | {"s":"open_profile_limited"} |
--   {"s":"mutation_limited","retry_ms":n}
local rec = redis.call('HMGET', KEYS[1], 'fp', 'msg', 'conv')
if rec[1] then
  if rec[1] ~= ARGV[1] then return cjson.encode({ s = 'mismatch' }) end
  return cjson.encode({ s = 'exists', msg = rec[2], conv = rec[3] })
end
local now = tonumber(ARGV[5])

-- The quota runs on Redis's clock, as the request claim's does (the same
-- bucket; a test clock moves neither).
local t = redis.call('TIME')
local real_now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local quota_wait, spend_quota = bucket(KEYS[5], tonumber(ARGV[13]), tonumber(ARGV[14]), real_now)
if quota_wait then return cjson.encode({ s = 'mutation_limited', retry_ms = quota_wait }) end
local spend
if ARGV[4] == 'INMAIL' then
  local wait
  wait, spend = bucket(KEYS[2], tonumber(ARGV[6]), tonumber(ARGV[7]), now)
  if wait then return cjson.encode({ s = 'rate_limited', retry_ms = wait }) end
else
  local wait
  wait, spend = bucket(KEYS[4], tonumber(ARGV[11]), tonumber(ARGV[12]), now)
  if wait then return cjson.encode({ s = 'send_rate_limited', retry_ms = wait }) end
  if ARGV[4] == 'OPEN_PROFILE' then
    if tonumber(redis.call('GET', KEYS[3]) or '0') >= tonumber(ARGV[8]) then
      return cjson.encode({ s = 'open_profile_limited' })
    end
    redis.call('INCR', KEYS[3])
    redis.call('PEXPIRE', KEYS[3], ARGV[9])
  end
end
spend()
spend_quota()
redis.call('HSET', KEYS[1], 'fp', ARGV[1], 'msg', ARGV[2], 'conv', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[10])
return cjson.encode({ s = 'new' })
