-- Reserves the conversation's InMail slot and stores the InMail, not yet
-- visible (the first step of the InMail saga).
--
-- KEYS[1]  the conversation hash    KEYS[2]  the message hash
-- ARGV[1]  a (the lower member id)  ARGV[2]  b
-- ARGV[3]  message id   ARGV[4]  sender   ARGV[5]  recipient
-- ARGV[6]  subject      ARGV[7]  body     ARGV[8]  now ms
-- ARGV[9]  the request's fingerprint
--
-- Checks before any write: the message is new (else "exists" with its state
-- and the fingerprint of the request that staged it); no block (BLOCKED);
-- the pair is still strangers with no pending InMail (else
-- AWAITING_RESPONSE for the sender's own, or "retry": the kind would differ
-- now, decide again).
-- Reply (JSON): {"s":"ok"} | {"s":"exists","state":st,"fp":fp} |
--   {"s":"refused","reason":r} | {"s":"retry"}
local C, M = KEYS[1], KEYS[2]
local mine = redis.call('HMGET', M, 'state', 'fp')
if mine[1] then return cjson.encode({ s = 'exists', state = mine[1], fp = mine[2] or '' }) end
local f = redis.call('HMGET', C, 'blk_a', 'blk_b', 'conn', 'im_state', 'im_from', 'w_a', 'w_b', 'open', 'a')
if f[1] or f[2] then return cjson.encode({ s = 'refused', reason = 'BLOCKED' }) end
if f[3] == '1' or f[8] == '1' then return cjson.encode({ s = 'retry' }) end
if f[4] == 'staged' or f[4] == 'awaiting' then
  if f[5] == ARGV[4] then return cjson.encode({ s = 'refused', reason = 'AWAITING_RESPONSE' }) end
  return cjson.encode({ s = 'retry' })
end
local recipient_side = (ARGV[5] == ARGV[1]) and 6 or 7
if tonumber(f[recipient_side] or '0') > 0 then return cjson.encode({ s = 'retry' }) end
if not f[9] then redis.call('HSET', C, 'a', ARGV[1], 'b', ARGV[2], 'created', ARGV[8]) end
redis.call('HSET', M, 'from', ARGV[4], 'to', ARGV[5], 'kind', 'INMAIL', 'subject', ARGV[6],
  'body', ARGV[7], 'credits', 1, 'at', ARGV[8], 'state', 'staged', 'fp', ARGV[9])
redis.call('HSET', C, 'im_id', ARGV[3], 'im_from', ARGV[4], 'im_at', ARGV[8], 'im_state', 'staged',
  'im_refund', '')
redis.call('HDEL', C, 'im_resp_at')
return cjson.encode({ s = 'ok' })
