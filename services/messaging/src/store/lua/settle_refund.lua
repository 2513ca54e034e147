-- Records what became of an InMail's refund.
--
-- KEYS[1]  the conversation hash
-- ARGV[1]  the InMail's id    ARGV[2]  "refunded" | "closed"
--
-- Checks: the refund of that InMail is still due.
-- Reply: 1 when recorded, 0 when it was not due
local f = redis.call('HMGET', KEYS[1], 'im_id', 'im_refund')
if f[1] == ARGV[1] and f[2] == 'due' then
  redis.call('HSET', KEYS[1], 'im_refund', ARGV[2])
  return 1
end
return 0
