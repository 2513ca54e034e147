-- Trims a conversation's oldest delivered messages from Redis once they are
-- committed to the history store (see archive.rs).
--
-- KEYS[1]  the conversation hash   KEYS[2]  the conversation's timeline
-- KEYS[3..] the archived messages' hashes, in the order of ARGV's ids
-- ARGV[1]  the archive position the caller read (`arch_seq`, "" for none)
-- ARGV[2..] the archived messages: id, seq, id, seq, … oldest first
--
-- Checks before any write: nobody trimmed this conversation meanwhile (the
-- archive position is the one read) and each message is in the timeline
-- at its seq. Then exactly those messages leave Redis, and the archive
-- position (`arch_seq`, `arch_n`) moves past them.
-- Reply: 1 when trimmed, 0 when nothing was done
local C, T = KEYS[1], KEYS[2]
local f = redis.call('HMGET', C, 'arch_seq', 'arch_n')
if (f[1] or '') ~= ARGV[1] then return 0 end
local n = (#ARGV - 1) / 2
if n < 1 or #KEYS ~= n + 2 then return 0 end
local ids = {}
for i = 1, n do
  local id, seq = ARGV[2 * i], ARGV[2 * i + 1]
  if tonumber(redis.call('ZSCORE', T, id) or '-1') ~= tonumber(seq) then return 0 end
  ids[i] = id
end
for i = 1, n do redis.call('DEL', KEYS[i + 2]) end
redis.call('ZREM', T, unpack(ids))
redis.call('HSET', C, 'arch_seq', ARGV[2 * n + 1], 'arch_n', tonumber(f[2] or '0') + n)
return 1
