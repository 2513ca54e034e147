-- Reconciliation of one member. Reads only.
--
-- KEYS[1]  account hash    KEYS[2]  ledger stream
--
-- Replays the whole ledger in one atomic snapshot: the amounts must add up
-- to the counter and each entry's balance_after must be the running sum.
-- Reply: {counter, sum, entries, first_bad_entry_id or ""}
local counter = tonumber(redis.call('HGET', KEYS[1], 'balance') or '0')
local sum, count, bad = 0, 0, ''
local cursor = '-'
while true do
  local batch = redis.call('XRANGE', KEYS[2], cursor, '+', 'COUNT', 500)
  if #batch == 0 then break end
  for _, e in ipairs(batch) do
    local f = {}
    for i = 1, #e[2], 2 do f[e[2][i]] = e[2][i + 1] end
    sum = sum + tonumber(f.a)
    count = count + 1
    if bad == '' and tonumber(f.b) ~= sum then bad = e[1] end
  end
  cursor = '(' .. batch[#batch][1]
end
return { counter, sum, count, bad }
