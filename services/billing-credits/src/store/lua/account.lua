-- The account functions of every balance script (after account_args.lua and
-- request.lua): load, settle to the current cycle, save.

do
  local replay = check_request()
  if replay then return replay end
end

-- The account is read in two parts: the fields a debit needs, at once (one
-- HMGET); every other field when first asked for (one HGETALL, merged under
-- what is already read or set). A debit reads half the hash; a renewal or a
-- balance view reads it all, as before.
local acct, dirty = {}, {}
do
  local HOT = { 'ver', 'balance', 'valid', 'erev', 'paid', 'debited', 'plan', 'idx', 'alert',
    'alow' }
  local values = redis.call('HMGET', A, unpack(HOT))
  for i, field in ipairs(HOT) do acct[field] = values[i] or nil end
  local all = false
  setmetatable(acct, { __index = function(t, field)
    if all then return nil end
    all = true
    local flat = redis.call('HGETALL', A)
    for i = 1, #flat, 2 do
      if rawget(t, flat[i]) == nil and not dirty[flat[i]] then rawset(t, flat[i], flat[i + 1]) end
    end
    return rawget(t, field)
  end })
end
local exists = acct.ver ~= nil
local bal = tonumber(acct.balance or '0')
local bal_before = bal
local function num(field) return tonumber(acct[field] or '0') end
local function set(field, value) acct[field] = value; dirty[field] = true end

-- Balance events (WatchBalance): appended in the same script as the change
-- they describe; trimmed once, by save().
local evented, fresh = false, nil
local function event(kind, amount, msg, note, ledger_id, threshold)
  if fresh == nil then fresh = redis.call('EXISTS', E) == 0 end
  redis.call('XADD', E, '*', 'k', kind, 'a', int(amount), 'b', int(bal), 't', NOW,
    'm', msg or '', 'r', REQ, 'p', acct.plan or '', 'v', acct.ver or '0',
    'c', acct.idx or '0', 'n', note or '', 'l', ledger_id or '', 'h', int(threshold or 0))
  evented = true
end

-- Appends a ledger entry carrying the balance after it (and its event).
local function entry(kind, amount, msg, note)
  local id = redis.call('XADD', L, '*', 'k', kind, 'a', int(amount), 'b', int(bal), 't', NOW,
    'm', msg or '', 'r', REQ, 'p', acct.plan or '', 'v', acct.ver or '0',
    'c', acct.idx or '0', 'n', note or '')
  event(kind, amount, msg, note, id)
  return id
end

local function reset_cycle_counters()
  for _, field in ipairs({ 'debited', 'refunded', 'released', 'granted' }) do
    if num(field) ~= 0 or not exists then set(field, 0) end
  end
end

-- Grant windows (README.md, "How it behaves": resubscribing never mints credits). A window
-- opens with a renewal that starts after the last window ended, and lasts
-- that cycle (`wend`); `wgrant` counts the credits granted in it. A renewal
-- starting inside an open window — the first cycle of a plan change or a
-- resubscription, or a free cycle — grants only what the window has not
-- granted yet of its plan's monthly credits. `cs` nil: an intermediate cycle
-- of an idle stretch, whose start is not known and whose window is over.
local function allowance(monthly, cs, ce)
  if cs and cs < num('wend') then
    return math.max(0, monthly - num('wgrant'))
  end
  -- A cycle that grants nothing (free) opens no window: a free month before
  -- a subscription never shapes the paid cycle.
  if monthly == 0 then return 0 end
  set('wend', ce or 0)
  set('wgrant', 0)
  return monthly
end

-- Renews every cycle of period `p` up to the cycles it has begun (p.n):
-- balance = min(unused + allowance, cap), once per cycle, each a RENEWAL
-- entry.
local function renew_to(p)
  local idx = num('idx')
  if p.m == 0 and bal == 0 and idx < p.n - 1 then
    -- A free period at zero: nothing to renew in the cycles before the last.
    idx = p.n - 1
    set('idx', idx)
  end
  while idx < p.n do
    idx = idx + 1
    set('idx', idx)
    local cs, ce
    if idx == p.n then
      cs, ce = p.cs, p.ce
    elseif idx == 1 then
      cs = p.st
    end
    local grant = allowance(p.m, cs, ce)
    local new = math.min(bal + grant, p.c)
    local amount = new - bal
    bal = new
    if amount > 0 then set('wgrant', num('wgrant') + amount) end
    if p.m > 0 or amount ~= 0 then
      entry('RENEWAL', amount, '', 'cycle ' .. idx)
      renewed = renewed + amount
    end
    reset_cycle_counters()
  end
end

local function settle()
  if ENT == '*' then
    if not exists then return 'need' end
    return 'ok'
  end
  if ENT == '' then
    if not exists or now >= num('valid') then return 'need' end
    -- A plan change since the entitlement was asked for: ask again.
    if (redis.call('GET', S) or '0') ~= (acct.erev or '') then return 'need' end
    return 'ok'
  end
  local ent = cjson.decode(ENT)
  local periods = ent.periods
  local cur = periods[#periods]
  if exists then
    if cur.v < num('ver') or (cur.v == num('ver') and cur.n < num('idx')) then
      return 'stale'
    end
  else
    -- First touch: start from the current period with nothing (credits of
    -- earlier periods would have been written off at their end anyway).
    set('ver', cur.v)
    set('idx', 0)
    set('plan', cur.p)
    reset_cycle_counters()
  end
  local prev
  for _, p in ipairs(periods) do
    if p.v > num('ver') then
      -- An immediate change between paid plans keeps the cycle in progress
      -- (subscription-plan anchors the new period's cycles at the same
      -- renewal date): the balance becomes what holding the new plan since
      -- the cycle began would have left, its monthly credits less those used
      -- in the cycle, never below 0; the rest is written off and no new
      -- cycle opens (README.md, "Balances").
      local within = prev ~= nil and prev.v == num('ver') and prev.paid == 1 and p.paid == 1
        and p.st < prev.ce
      if bal ~= 0 then
        local amount = -bal
        bal = 0
        entry('WRITE_OFF', amount, '', 'plan period ' .. acct.ver .. ' (' .. (acct.plan or '') .. ') ended')
        written_off = written_off - amount
      end
      set('ver', p.v)
      set('idx', 0)
      set('plan', p.p)
      if within then
        local used = num('debited') - num('refunded') - num('released')
        local amount = math.max(0, p.m - used)
        bal = amount
        set('idx', 1)
        -- The window has now granted this plan's month (a cancellation and
        -- resubscription inside it grants no more).
        if p.m > num('wgrant') then set('wgrant', p.m) end
        entry('PLAN_CHANGE', amount, '', p.p .. ': ' .. int(p.m) .. ' a month less ' .. int(used)
          .. ' used this cycle')
      end
    end
    if p.v == num('ver') then renew_to(p) end
    prev = p
  end
  for field, value in pairs({ plan = cur.p, monthly = cur.m, cap = cur.c, paid = cur.paid,
      cstart = cur.cs, cend = cur.ce, valid = VALID, erev = string.format('%d', ent.rev or 0) }) do
    if tostring(acct[field]) ~= tostring(value) then set(field, value) end
  end
  exists = true
  return 'ok'
end

-- The low-balance alert (`alert`: the threshold, 0 or unset: off; `alow`:
-- "1" while the balance is at or below it): one event per crossing, decided
-- here, at the one write of the account, so retries and races (scripts run
-- one at a time) cannot make two.
local function check_alert()
  local threshold = num('alert')
  local was = acct.alow == '1'
  local low = threshold > 0 and bal <= threshold
  if low and not was then
    set('alow', '1')
    event('LOW_BALANCE', 0, '', '', '', threshold)
  elseif was and not low then
    set('alow', '0')
    if threshold > 0 then event('BALANCE_RECOVERED', 0, '', '', '', threshold) end
  end
end

-- Trims the events past retention (count, then time by Redis' clock, which
-- made their ids) and records the newest trimmed id as the stream's
-- max-deleted-entry-id, which tells an expired resume token.
local function trim_events()
  local t = redis.call('TIME')
  local ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local cut
  -- A stream made anew may follow one that expired: whatever it held is
  -- older than the retention, so that much counts as trimmed.
  if fresh and ms > EV_RETAIN then cut = string.format('%d-0', ms - EV_RETAIN) end
  local len = redis.call('XLEN', E)
  if len > EV_KEEP then
    local old = redis.call('XRANGE', E, '-', '+', 'COUNT', len - EV_KEEP)
    cut = old[#old][1]
    redis.call('XTRIM', E, 'MAXLEN', '=', EV_KEEP)
  end
  local minid = string.format('%d-0', ms - EV_RETAIN)
  local older = redis.call('XREVRANGE', E, '(' .. minid, '-', 'COUNT', 1)
  if #older > 0 then
    cut = older[1][1]
    redis.call('XTRIM', E, 'MINID', '=', minid)
  end
  if cut then
    local last = redis.call('XREVRANGE', E, '+', '-', 'COUNT', 1)
    redis.call('XSETID', E, last[1][1], 'MAXDELETEDID', cut)
  end
  redis.call('PEXPIRE', E, EV_RETAIN)
end

-- Writes the balance and every changed account field, once.
local function save()
  check_alert()
  if evented then trim_events() end
  if bal ~= bal_before then set('balance', bal) end
  local args = {}
  for field in pairs(dirty) do
    local value = acct[field]
    if type(value) == 'number' and value == math.floor(value) then value = int(value) end
    args[#args + 1] = field
    args[#args + 1] = value
  end
  if #args > 0 then redis.call('HSET', A, unpack(args)) end
end

local function bump(field, amount) set(field, num(field) + amount) end

local function balance_view()
  return { available = bal, plan = acct.plan, monthly = num('monthly'), cap = num('cap'),
    cstart = num('cstart'), cend = num('cend'), debited = num('debited'),
    refunded = num('refunded'), released = num('released'), granted = num('granted'),
    ver = num('ver') }
end

do
  local st = settle()
  if st ~= 'ok' then return cjson.encode({ s = st, ver = num('ver') }) end
end
