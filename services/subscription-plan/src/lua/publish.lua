-- Publishes the revision and Open Profile of a member whose subscription
-- was stored before they were published (the start-up backfill), if the
-- subscription is still at the revision they were computed from.
--
-- KEYS[1]  the subscription hash   KEYS[2]  the published revision
-- KEYS[3]  the published Open Profile
-- ARGV[1]  the revision read       ARGV[2]  the Open Profile (tagged ARGV[1])
-- Reply: 1 published, 0 the subscription changed meanwhile (that write
-- published them).
local rev = tonumber(redis.call('HGET', KEYS[1], 'rev') or '0')
if rev == 0 or rev ~= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[2], rev)
redis.call('SET', KEYS[3], ARGV[2])
return 1
