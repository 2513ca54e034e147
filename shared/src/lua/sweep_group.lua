-- Registers a sweeping replica for one more term and answers the replicas
-- that share the sweep (SweepGroup::shards).
--
-- KEYS[1]  the group: a sorted set of replica ids, each scored by when its
--          registration runs out (epoch ms)
-- ARGV[1]  this replica's id
-- ARGV[2]  how long its registration lasts (ms)
--
-- Time is Redis's own (TIME), so every replica judges registrations alike.
-- A replica that died drops out when its registration runs out.
-- Reply: the ids of the registered replicas (this one among them)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return redis.call('ZRANGE', KEYS[1], 0, -1)
