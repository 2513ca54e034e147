//! Each service reaches Redis as its own user (README.md, "Who may call what"), which can
//! touch only its own key prefix (and the test clock's keys where that is
//! on). The rules here are what `scripts/dev-up.sh`, the shipped compose
//! file and the tests install, so they are tested as shipped.
//!
//! Scripts run with the caller's permissions: every key a script touches is
//! checked. SCAN (billing's reconciliation and archive walk every account)
//! is allowed; Redis answers it with key names of every prefix (names only,
//! never values): a known limit of Redis ACLs.

use sha2::{Digest, Sha256};

/// The key prefix of each service's user.
pub const USERS: &[(&str, &str)] = &[
    ("subscription-plan", "plans"),
    ("billing-credits", "billing"),
    ("messaging", "messaging"),
];

/// The user health checks connect as: PING and nothing else, no password
/// (it can learn only that Redis is up).
pub const PROBE_USER: &str = "probe";

/// Keys of another service a service's user may reach: (its prefix, the
/// Redis key selector). They are what subscription-plan publishes for the
/// others (`inmail_shared::state::published`):
/// - billing's balance scripts read the revision of a member's
///   subscription. Only read, but Redis checks every key handed to a script
///   as read-write, so a read-only selector (`%R~`) would refuse the
///   scripts: the grant is kept to that one small key instead.
/// - messaging reads the revision, the Open Profile and whether all are
///   published with plain reads (never in a script), so its grant is
///   read-only.
pub const SHARED: &[(&str, &str)] = &[
    ("billing", "~plans:*:rev"),
    ("messaging", "%R~plans:*:rev"),
    ("messaging", "%R~plans:*:open"),
    ("messaging", "%R~plans:published"),
];

/// The commands the services send, directly or from their scripts (a
/// script's commands are checked against its caller's rules): nothing else
/// is allowed — no FUNCTION, SELECT, MOVE, SWAPDB, CLIENT TRACKING, KEYS,
/// CONFIG, FLUSH… The whole test suite runs under these rules (every test
/// Redis has the services' users), so a command the code starts to send
/// must be added here or the tests fail.
pub const ALLOWED_COMMANDS: &[&str] = &[
    // Connecting, health, time, replication acknowledgement, routing.
    // (CLIENT SETINFO, which redis-rs sends to Redis 7.2+ and whose refusal
    // it ignores, does not exist in 7.0 and cannot be named.)
    "hello",
    "auth",
    "client|setname",
    "ping",
    "time",
    "wait",
    "cluster|slots",
    "cluster|shards",
    // Scripts (redis-rs loads a script on NOSCRIPT).
    "evalsha",
    "eval",
    "script|load",
    // Reconciliation and the archive walk every account.
    "scan",
    // Data.
    "get",
    "set",
    "mget",
    "exists",
    "del",
    "incr",
    "pexpire",
    "hget",
    "hset",
    "hsetnx",
    "hmget",
    "hgetall",
    "hdel",
    "hincrby",
    "zadd",
    "zrem",
    "zscore",
    "zcard",
    "zrange",
    "zremrangebyscore",
    "xadd",
    "xrange",
    "xrevrange",
    "xtrim",
    // Events: where a resume token stands against the trimmed events
    // (trimming records the newest trimmed id with XSETID).
    "xinfo|stream",
    "xsetid",
    "xlen",
];

/// The ACL rule list (after the user name and password) of `service`.
pub fn rules(prefix: &str, test_clock: bool) -> String {
    let mut keys = format!("~{prefix}:*");
    for (reader, selector) in SHARED {
        if *reader == prefix {
            keys.push(' ');
            keys.push_str(selector);
        }
    }
    if test_clock {
        keys.push_str(" ~testclock:*");
    }
    let commands: Vec<String> = ALLOWED_COMMANDS.iter().map(|c| format!("+{c}")).collect();
    format!("{keys} resetchannels -@all {}", commands.join(" "))
}

/// A whole `users.acl` file: the default user as the administrator (its
/// password `admin_password`), the probe user, and one user per service
/// (`passwords`: service, password). Passwords are stored as their SHA-256
/// (`#hex`), so the file itself gives none away.
///
/// The default user keeps every permission on purpose: Redis replays the
/// AOF as the default user and re-checks ACLs at each EXEC (Lua script
/// effects are written as MULTI/EXEC), so with the default user off or
/// limited every script's writes are silently dropped at the next restart
/// (redis/redis#14541, fixed upstream only after 7.x; the test
/// `shipped_redis_users_keep_script_writes_across_a_restart` shows it).
pub fn acl_file(admin_password: &str, passwords: &[(&str, &str)], test_clock: bool) -> String {
    let hashed = |password: &str| hex::encode(Sha256::digest(password.as_bytes()));
    let mut text = format!("user default on #{} ~* &* +@all\n", hashed(admin_password));
    text.push_str(&format!(
        "user {PROBE_USER} on nopass resetchannels -@all +ping\n"
    ));
    for (service, prefix) in USERS {
        let Some((_, password)) = passwords.iter().find(|(s, _)| s == service) else {
            continue;
        };
        text.push_str(&format!(
            "user {service} on #{} {}\n",
            hashed(password),
            rules(prefix, test_clock)
        ));
    }
    text
}
