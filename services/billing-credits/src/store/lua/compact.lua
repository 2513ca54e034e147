-- Moves a member's oldest verified ledger entries out of Redis, once they
-- are safely in the archive (see archive.rs).
--
-- KEYS[1]  account hash    KEYS[2]  ledger stream
-- ARGV[1]  the archive position the caller read (`arch_id`, "" for none)
-- ARGV[2]  the last entry archived      ARGV[3]  its balance after
-- ARGV[4]  how many entries were archived
-- ARGV[5]  the stream id just after the last entry (XTRIM MINID)
--
-- Checks before any write: nobody compacted this member meanwhile (the
-- archive position is the one read), and the last entry archived is
-- verified (at or before the reconciliation checkpoint) and carries that
-- balance. Then the entries up to it are trimmed and the archive summary
-- (`arch_id`, `arch_bal`, `arch_n`) moves past them.
-- Reply: 1 when compacted, 0 when nothing was done
local A, L = KEYS[1], KEYS[2]
local f = redis.call('HMGET', A, 'arch_id', 'arch_n', 'ck_id')
if (f[1] or '') ~= ARGV[1] then return 0 end
if not f[3] then return 0 end
local last = redis.call('XRANGE', L, ARGV[2], ARGV[2])
if #last ~= 1 then return 0 end
local b
for i = 1, #last[1][2], 2 do
  if last[1][2][i] == 'b' then b = last[1][2][i + 1] end
end
if b ~= ARGV[3] then return 0 end
-- Only verified entries: the checkpoint is at or past the last archived.
if #redis.call('XRANGE', L, '(' .. f[3], ARGV[2]) > 0 then return 0 end
redis.call('XTRIM', L, 'MINID', ARGV[5])
redis.call('HSET', A, 'arch_id', ARGV[2], 'arch_bal', ARGV[3],
  'arch_n', tonumber(f[2] or '0') + tonumber(ARGV[4]))
return 1
