-- Gives up a staged message (its debit was refused or released): kept as
-- failed, so a retry of its request answers the failure; or, with reason ""
-- (a send refused before any credit could move), forgotten, so a retry
-- sends it.
--
-- KEYS[1]  the conversation hash   KEYS[2]  the message hash
-- ARGV[1]  message id   ARGV[2]  reason ("" = forget)
-- ARGV[3]  how long a failed message is kept (ms)
-- ARGV[4]  (forgetting) the fingerprint of the request that staged it
--
-- Checks before any write: the message is still staged (else "exists"), and
-- a forgotten one was staged by that request. Frees the conversation's
-- InMail slot when this was its InMail.
-- Reply (JSON): {"s":"ok"} | {"s":"exists","state":st,"fp":fp}
local C, M = KEYS[1], KEYS[2]
local st, fp = unpack(redis.call('HMGET', M, 'state', 'fp'))
if st ~= 'staged' then return cjson.encode({ s = 'exists', state = st or nil, fp = fp or '' }) end
if ARGV[2] == '' then
  if fp ~= ARGV[4] then return cjson.encode({ s = 'exists', state = st or nil, fp = fp or '' }) end
  redis.call('DEL', M)
else
  redis.call('HSET', M, 'state', 'failed', 'reason', ARGV[2])
  redis.call('PEXPIRE', M, ARGV[3])
end
local im = redis.call('HMGET', C, 'im_id', 'im_state')
if im[1] == ARGV[1] and im[2] == 'staged' then
  redis.call('HDEL', C, 'im_id', 'im_from', 'im_at', 'im_state', 'im_refund', 'im_resp_at')
end
return cjson.encode({ s = 'ok' })
