-- Connects a pair (an operator's import), which settles a pending
-- invitation between them.
--
-- KEYS[1]  the conversation hash
-- ARGV[1]  a   ARGV[2]  b   ARGV[3]  now ms
--
-- Checks before any write: no block (BLOCKED).
-- Reply (JSON): {"s":"ok","since":ms} | {"s":"refused","reason":"BLOCKED"}
local f = redis.call('HMGET', KEYS[1], 'blk_a', 'blk_b', 'conn', 'conn_at', 'a')
if f[1] or f[2] then return cjson.encode({ s = 'refused', reason = 'BLOCKED' }) end
if f[3] == '1' then return cjson.encode({ s = 'ok', since = tonumber(f[4]) }) end
if not f[5] then redis.call('HSET', KEYS[1], 'a', ARGV[1], 'b', ARGV[2], 'created', ARGV[3]) end
redis.call('HDEL', KEYS[1], 'inv_from', 'inv_at', 'inv_note', 'inv_req')
redis.call('HSET', KEYS[1], 'conn', 1, 'conn_at', ARGV[3])
return cjson.encode({ s = 'ok', since = tonumber(ARGV[3]) })
