-- One member blocks the other, which also disconnects them and drops a
-- pending invitation between them.
--
-- KEYS[1]  the conversation hash
-- ARGV[1]  a   ARGV[2]  b   ARGV[3]  side of the blocker ("a" | "b")
-- ARGV[4]  now ms
--
-- Checks: none (blocking twice keeps the first block's time).
-- Reply: when the block started (ms)
if not redis.call('HGET', KEYS[1], 'a') then
  redis.call('HSET', KEYS[1], 'a', ARGV[1], 'b', ARGV[2], 'created', ARGV[4])
end
redis.call('HSETNX', KEYS[1], 'blk_' .. ARGV[3], ARGV[4])
redis.call('HSET', KEYS[1], 'conn', 0)
redis.call('HDEL', KEYS[1], 'conn_at', 'inv_from', 'inv_at', 'inv_note', 'inv_req')
return tonumber(redis.call('HGET', KEYS[1], 'blk_' .. ARGV[3]))
