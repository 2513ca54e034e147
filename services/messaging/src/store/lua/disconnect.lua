-- Disconnects a pair.
--
-- KEYS[1]  the conversation hash
--
-- Checks: none (disconnecting strangers changes nothing).
-- Reply: 1 when they were connected, 0 otherwise
if redis.call('HGET', KEYS[1], 'conn') == '1' then
  redis.call('HSET', KEYS[1], 'conn', 0)
  redis.call('HDEL', KEYS[1], 'conn_at')
  return 1
end
return 0
