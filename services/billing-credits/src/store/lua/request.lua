-- Request records and replies, shared by every billing script that takes a
-- request id (concatenated after the script's locals; see store/scripts.rs).
--
-- Expects the locals R (request record key), REQ (request id, "" for reads),
-- FP (fingerprint of the arguments) and RETAIN (record retention ms).
--
-- The record is one string "<fingerprint>\n<reply JSON>", written with the
-- reply and expiring after RETAIN. check_request() answers a replay (the
-- first reply, marked `replayed` so nothing is counted twice) or a mismatch
-- before anything is touched.

local renewed, written_off = 0, 0

-- A whole number as Redis stores it. Written so instead of letting Lua
-- turn the number into a string ("%.17g", a float conversion that was a
-- fifth of a debit's Redis time).
local function int(n) return string.format('%d', n) end

local function check_request()
  if REQ == '' then return nil end
  local rec = redis.call('GET', R)
  if not rec then return nil end
  local sep = string.find(rec, '\n', 1, true)
  if string.sub(rec, 1, sep - 1) ~= FP then return cjson.encode({ s = 'mismatch' }) end
  local first = cjson.decode(string.sub(rec, sep + 1))
  first.replayed, first.renewed, first.written_off = true, 0, 0
  first.released, first.refunded, first.granted, first.debited = 0, 0, 0, 0
  return cjson.encode(first)
end

-- Finishes a call: records the reply under the request id and answers it.
local function finish(reply)
  -- Counts of nothing are left out (the reply's fields default to 0).
  if renewed ~= 0 then reply.renewed = renewed end
  if written_off ~= 0 then reply.written_off = written_off end
  local out = cjson.encode(reply)
  if REQ ~= '' then redis.call('SET', R, FP .. '\n' .. out, 'PX', RETAIN) end
  return out
end

local function refuse(reason, extra)
  local reply = extra or {}
  reply.s, reply.reason = 'refused', reason
  return finish(reply)
end

-- A debit record as the reply shows it, or nil.
local function debit_view(key)
  local flat = redis.call('HGETALL', key)
  if #flat == 0 then return nil end
  local d = {}
  for i = 1, #flat, 2 do d[flat[i]] = flat[i + 1] end
  -- Times stay the strings stored (nil: not reached); compare them with
  -- tonumber().
  return { state = d.state, amount = tonumber(d.amount), debited_at = d.t_debit,
    expires_at = d.t_expire, confirmed_at = d.t_confirm,
    refundable_until = d.refundable, returned_at = d.t_return,
    reason = d.reason, balance_after = tonumber(d.bal_after or '0') }
end
