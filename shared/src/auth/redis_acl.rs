//! Each service reaches Redis as its own user (DESIGN.md §8), which can
//! touch only its own key prefix (and the test clock's keys where that is
//! on). The rules here are what `scripts/dev-up.sh`, the shipped compose
//! file and the tests install, so they are tested as shipped.
//!
//! Scripts run with the caller's permissions: every key a script touches is
//! checked. SCAN (billing's reconciliation and archive walk every account)
//! is allowed; Redis answers it with key names of every prefix (names only,
//! never values): a known limit of Redis ACLs.

/// The key prefix of each service's user.
pub const USERS: &[(&str, &str)] = &[
    ("subscription-plan", "plans"),
    ("billing-credits", "billing"),
    ("messaging", "messaging"),
];

/// The ACL rule list (after the user name and password) of `service`.
pub fn rules(prefix: &str, test_clock: bool) -> String {
    let mut keys = format!("~{prefix}:*");
    if test_clock {
        keys.push_str(" ~testclock:*");
    }
    format!(
        "{keys} resetchannels -@all +@read +@write +@connection +@transaction -@dangerous \
         +evalsha +eval +script|load +scan +wait +time +cluster|slots +cluster|shards"
    )
}

/// A whole `users.acl` file: the default user off, one user per service
/// with its password (`passwords`: service, password).
pub fn acl_file(passwords: &[(&str, &str)], test_clock: bool) -> String {
    let mut text = String::from("user default off\n");
    for (service, prefix) in USERS {
        let Some((_, password)) = passwords.iter().find(|(s, _)| s == service) else {
            continue;
        };
        text.push_str(&format!(
            "user {service} on >{password} {}\n",
            rules(prefix, test_clock)
        ));
    }
    text
}
