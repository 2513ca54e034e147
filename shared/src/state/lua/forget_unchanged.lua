-- Drops entries a sweeper read from an index (a sorted set scored by when
-- to look at them) and found finished, each only while it still has the
-- score it was read with: an entry re-added meanwhile (a retry indexing
-- the same hold or send again, with a new score) stays for a later round.
--
-- KEYS[1]  the sorted set
-- ARGV     member, score as read, member, score as read, ...
--
-- Checks before each write: the member is still there with the score read.
-- Reply: how many entries were dropped
local dropped = 0
for i = 1, #ARGV, 2 do
  local score = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if score and tonumber(score) == tonumber(ARGV[i + 1]) then
    dropped = dropped + redis.call('ZREM', KEYS[1], ARGV[i])
  end
end
return dropped
