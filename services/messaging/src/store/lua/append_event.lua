-- Appends one event to a member's event stream (WatchInbox) and trims what
-- is past retention.
--
-- KEYS[1]  the member's event stream (messaging:{M}:events)
-- ARGV[1]  the encoded inmail.messaging.v1.InboxEvent (without its stream id)
-- ARGV[2]  the most events kept (EVENTS_MAX_PER_MEMBER)
-- ARGV[3]  how long events are kept, ms (EVENTS_RETENTION)
--
-- No checks: an append always succeeds. The stream's ids come from Redis'
-- clock, and so does the time trim, so they agree. The newest trimmed id is
-- recorded as the stream's max-deleted-entry-id (XSETID; trimming alone does
-- not record it): a resume token before it has lost events. The stream
-- expires after the retention when nothing is appended (an idle member holds
-- no memory); one made anew records everything before the retention as
-- trimmed, since that is all an expired one could have held.
-- Reply: the event's stream id
local S = KEYS[1]
local keep, retention = tonumber(ARGV[2]), tonumber(ARGV[3])
local fresh = redis.call('EXISTS', S) == 0
local id = redis.call('XADD', S, '*', 'e', ARGV[1])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local cut
-- A stream made anew may follow one that expired: whatever it held is older
-- than the retention, so that much counts as trimmed.
if fresh and now > retention then cut = string.format('%d-0', now - retention) end
local len = redis.call('XLEN', S)
if len > keep then
  local old = redis.call('XRANGE', S, '-', '+', 'COUNT', len - keep)
  cut = old[#old][1]
  redis.call('XTRIM', S, 'MAXLEN', '=', keep)
end
local minid = string.format('%d-0', now - retention)
local older = redis.call('XREVRANGE', S, '(' .. minid, '-', 'COUNT', 1)
if #older > 0 then
  cut = older[1][1]
  redis.call('XTRIM', S, 'MINID', '=', minid)
end
if cut then redis.call('XSETID', S, id, 'MAXDELETEDID', cut) end
redis.call('PEXPIRE', S, retention)
return id
