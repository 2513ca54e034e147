-- Accepts or declines the InMail awaiting the responder's response.
--
-- KEYS[1]  the conversation hash
-- ARGV[1]  responder   ARGV[2]  "accepted" | "declined"
-- ARGV[3]  now ms      ARGV[4]  refund window ms
--
-- Checks before any write: the responder is in the conversation (else
-- not_found) and an InMail from the other member awaits a response. One
-- response per InMail: one already accepted (declined) answers a repeat of
-- the same response "responded" with the recorded outcome; any other state
-- is NO_INMAIL_AWAITING_RESPONSE.
-- Reply (JSON): {"s":"ok"|"responded","refund":r,"inmail_id":id,
--   "inmail_sender":m,"responded_at":ms} |
--   {"s":"not_found"} | {"s":"refused","reason":r}
local C = KEYS[1]
local f = redis.call('HMGET', C, 'a', 'b', 'im_state', 'im_from', 'im_at', 'im_id', 'im_refund',
  'im_resp_at')
if ARGV[1] ~= f[1] and ARGV[1] ~= f[2] then return cjson.encode({ s = 'not_found' }) end
if f[3] == ARGV[2] and f[4] ~= ARGV[1] then
  return cjson.encode({ s = 'responded', refund = f[7], inmail_id = f[6], inmail_sender = f[4],
    responded_at = tonumber(f[8]) })
end
if f[3] ~= 'awaiting' or f[4] == ARGV[1] then
  return cjson.encode({ s = 'refused', reason = 'NO_INMAIL_AWAITING_RESPONSE' })
end
local now = tonumber(ARGV[3])
local refund = (now <= tonumber(f[5]) + tonumber(ARGV[4])) and 'due' or 'closed'
redis.call('HSET', C, 'im_state', ARGV[2], 'im_resp_at', now, 'open', 1, 'im_refund', refund, 'last', now)
return cjson.encode({ s = 'ok', refund = refund, inmail_id = f[6], inmail_sender = f[4],
  responded_at = now })
