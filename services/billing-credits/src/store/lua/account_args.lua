-- The prelude of every balance script: reads the member's account, answers a
-- replay, and brings the account to the current cycle (settle).
--
-- KEYS[1]  account hash    KEYS[2]  ledger stream    KEYS[3]  request record
-- KEYS[#KEYS - 1]  the member's balance events (WatchBalance): every ledger
--          entry is copied there, with the low-balance alerts
-- KEYS[#KEYS]  the revision of the member's subscription subscription-plan
--          publishes (read only: says whether the cached entitlement still
--          holds)
-- ARGV[1]  now ms
-- ARGV[2]  entitlement JSON {"rev":n,"periods":[{v,p,m,c,paid,n,st,cs,ce}, ...]}
--          (the subscription revision it comes from; ended periods oldest
--          first, then the current one; see entitlement.rs), "" = the
--          cached one while it may be trusted (not past `valid`, and the
--          subscription still at the revision it came from), "*" = the
--          cached one however old (releases must not wait)
-- ARGV[3]  until when a fresh entitlement may be trusted (ms)
-- ARGV[4]  request_id ("" for reads)   ARGV[5]  fingerprint
-- ARGV[6]  request retention ms        ARGV[7..]  the script's own
-- ARGV[#ARGV - 1], ARGV[#ARGV]  the most balance events kept per member and
--          how long, ms (after the script's own: EVENTS_MAX_PER_MEMBER,
--          EVENTS_RETENTION)
--
-- A replay or a request id reused with other arguments is answered first.
-- Then settle() replays the plan periods subscription-plan reported since
-- the version last applied: renewal once per cycle (balance = min(unused +
-- monthly, cap)), a write-off of everything at each plan change, each a
-- ledger entry. Nothing is written before the script's own checks pass:
-- the account hash is written once, by save(), and only the fields that
-- changed. A script whose entitlement cannot be trusted answers
-- {"s":"need"|"stale","ver":n} without writing.

local A, L, R, S = KEYS[1], KEYS[2], KEYS[3], KEYS[#KEYS]
local E = KEYS[#KEYS - 1]
local EV_KEEP, EV_RETAIN = tonumber(ARGV[#ARGV - 1]), tonumber(ARGV[#ARGV])
local now, NOW = tonumber(ARGV[1]), ARGV[1]
local ENT, VALID, REQ, FP, RETAIN = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
