-- A token bucket, put before the scripts that spend one (the request claim
-- and the plans' commit for the member's mutation quota; messaging's
-- BEGIN_SEND and RESERVE_INVITATION): answers the ms until a token when
-- there is none, else nil and a function that spends one.
--
-- key: a hash (tokens, ts)   burst: most tokens   rate: tokens per ms
-- now: ms. Writes nothing until the returned function is called.
local function bucket(key, burst, rate, now)
  local b = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens, ts = tonumber(b[1] or burst), tonumber(b[2] or now)
  if now > ts then tokens = math.min(burst, tokens + (now - ts) * rate) end
  if tokens < 1 then return math.ceil((1 - tokens) / rate), nil end
  return nil, function()
    redis.call('HSET', key, 'tokens', tostring(tokens - 1), 'ts', math.max(now, ts))
    redis.call('PEXPIRE', key, math.ceil(burst / rate) + 60000)
  end
end

