-- One bounded step of a member's reconciliation (README.md, "Money guarantees").
--
-- KEYS[1]  account hash    KEYS[2]  ledger stream
-- ARGV[1]  the most entries to replay in this step
-- ARGV[2]  the epoch of a full re-verification ("" for an incremental one)
--
-- The account keeps a checkpoint: the last verified entry (`ck_id`), the
-- running balance there (`ck_bal`) and the entries verified (`ck_n`);
-- entries moved to the archive are summed up by `arch_id`, `arch_bal`,
-- `arch_n`. A step replays the entries after the checkpoint: each amount
-- must add up to the balance the entry carries. It moves the checkpoint to
-- the last good entry, and stops at a bad one (the checkpoint stays before
-- it, so every later run reports it too). A full re-verification (a new
-- epoch) starts over from the archived prefix, once per epoch.
-- When the step reaches the end of the ledger it compares the running
-- balance with the counter, in the same atomic snapshot.
-- Reply: {"done", counter, sum, verified, replayed} |
--   {"more", sum, verified, replayed} | {"bad", entry id, sum, verified, replayed}
local A, L = KEYS[1], KEYS[2]
local CHUNK, EPOCH = tonumber(ARGV[1]), ARGV[2]
local f = redis.call('HMGET', A, 'ck_id', 'ck_bal', 'ck_n', 'ck_epoch', 'arch_id', 'arch_bal', 'arch_n')
local from, sum, n = f[1], tonumber(f[2] or '0'), tonumber(f[3] or '0')
if not from or (EPOCH ~= '' and f[4] ~= EPOCH) then
  from, sum, n = f[5] or '0-0', tonumber(f[6] or '0'), tonumber(f[7] or '0')
end
local batch = redis.call('XRANGE', L, '(' .. from, '+', 'COUNT', CHUNK)
local last, replayed = nil, 0
for _, e in ipairs(batch) do
  local a, b
  for i = 1, #e[2], 2 do
    if e[2][i] == 'a' then a = tonumber(e[2][i + 1]) elseif e[2][i] == 'b' then b = tonumber(e[2][i + 1]) end
  end
  if a == nil or b ~= sum + a then
    if last then redis.call('HSET', A, 'ck_id', last, 'ck_bal', sum, 'ck_n', n, 'ck_epoch', EPOCH) end
    return { 'bad', e[1], sum, n, replayed }
  end
  sum, n, replayed, last = sum + a, n + 1, replayed + 1, e[1]
end
if last then redis.call('HSET', A, 'ck_id', last, 'ck_bal', sum, 'ck_n', n, 'ck_epoch', EPOCH) end
if #batch < CHUNK then
  return { 'done', tonumber(redis.call('HGET', A, 'balance') or '0'), sum, n, replayed }
end
return { 'more', sum, n, replayed }
