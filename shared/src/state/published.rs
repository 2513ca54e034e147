//! What subscription-plan publishes in its own keys for the other services
//! to read directly, instead of asking it over gRPC on every call. Both keys
//! carry the member's hash tag (one slot with the member's subscription) and
//! are written by subscription-plan only.
//!
//! - `plans:{M}:rev`: the subscription's revision (absent: 0). Billing's
//!   balance scripts compare it with the revision their cached entitlement
//!   came from.
//! - `plans:{M}:open`: the member's Open Profile as a schedule, tagged with
//!   the revision it was computed from (see [`OpenProfile`]). Messaging
//!   trusts it only while the tag equals `plans:{M}:rev`: a value left by an
//!   older writer, or not written yet, is ignored and subscription-plan is
//!   asked.
//! - `plans:published`: set once every stored subscription has both keys
//!   (subscription-plan backfills, at start, subscriptions stored before
//!   they were published). From then on a member with neither key never
//!   subscribed: Open Profile closed, no need to ask.

/// Set once every stored subscription is published (see the module header).
pub const ALL_PUBLISHED_KEY: &str = "plans:published";

/// The key of `member`'s published revision.
pub fn revision_key(member: &str) -> String {
    format!("plans:{{{member}}}:rev")
}

/// The key of `member`'s published Open Profile.
pub fn open_profile_key(member: &str) -> String {
    format!("plans:{{{member}}}:open")
}

/// Whether a member's profile is open, until the next change that needs no
/// write: a scheduled plan change or cancellation applies lazily at its
/// effective instant (and turns Open Profile off when it leaves paid plans),
/// so the value says what holds before it and after it. Any other change is
/// a write, which publishes again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenProfile {
    pub before: bool,
    /// The effective instant of the scheduled change (epoch ms), if any.
    pub switch_ms: Option<i64>,
    pub after: bool,
}

impl OpenProfile {
    /// Open at `now_ms`.
    pub fn at(&self, now_ms: i64) -> bool {
        match self.switch_ms {
            Some(switch) if now_ms >= switch => self.after,
            _ => self.before,
        }
    }

    /// The stored form, tagged with `revision`: `<rev>:<before>:<switch>:<after>`
    /// (0/1 flags, switch 0 when none).
    pub fn encode(&self, revision: u64) -> String {
        format!(
            "{revision}:{}:{}:{}",
            u8::from(self.before),
            self.switch_ms.unwrap_or(0),
            u8::from(self.after)
        )
    }

    /// The revision a stored value was computed from and the value; `None`
    /// when it is not one (messaging then asks subscription-plan).
    pub fn decode(stored: &str) -> Option<(u64, Self)> {
        let mut parts = stored.split(':');
        let revision = parts.next()?.parse().ok()?;
        let flag = |s: Option<&str>| match s? {
            "0" => Some(false),
            "1" => Some(true),
            _ => None,
        };
        let before = flag(parts.next())?;
        let switch: i64 = parts.next()?.parse().ok()?;
        let after = flag(parts.next())?;
        if parts.next().is_some() {
            return None;
        }
        Some((
            revision,
            Self {
                before,
                switch_ms: (switch != 0).then_some(switch),
                after,
            },
        ))
    }

    /// What the published keys say of a member: `open` as stored, the
    /// published `revision` (`None`: absent), and whether every subscription
    /// is published. `None`: they cannot say (not published for the current
    /// revision, or by an older writer): ask subscription-plan.
    pub fn trusted(
        open: Option<&str>,
        revision: Option<&str>,
        all_published: bool,
    ) -> Option<Self> {
        let Some(open) = open else {
            // Neither key, once every subscription is published: the member
            // never subscribed.
            return (revision.is_none() && all_published).then_some(Self::CLOSED);
        };
        let (tag, value) = Self::decode(open)?;
        let current: u64 = match revision {
            None => 0,
            Some(r) => r.parse().ok()?,
        };
        (tag == current).then_some(value)
    }

    pub const CLOSED: Self = Self {
        before: false,
        switch_ms: None,
        after: false,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_switches_at_the_effective_instant() {
        let open = OpenProfile {
            before: true,
            switch_ms: Some(1_000),
            after: false,
        };
        let stored = open.encode(7);
        assert_eq!(stored, "7:1:1000:0");
        assert_eq!(OpenProfile::decode(&stored), Some((7, open)));
        assert!(open.at(999));
        assert!(!open.at(1_000));
        let steady = OpenProfile {
            before: false,
            switch_ms: None,
            after: false,
        };
        assert_eq!(OpenProfile::decode(&steady.encode(0)), Some((0, steady)));
        assert!(!steady.at(i64::MAX));
    }

    #[test]
    fn only_a_value_tagged_with_the_published_revision_is_trusted() {
        let stored = OpenProfile {
            before: true,
            switch_ms: None,
            after: true,
        }
        .encode(3);
        assert!(OpenProfile::trusted(Some(&stored), Some("3"), false).is_some());
        assert!(OpenProfile::trusted(Some(&stored), Some("4"), true).is_none());
        assert!(OpenProfile::trusted(Some(&stored), None, true).is_none());
        // A revision without an Open Profile: written by an older writer.
        assert!(OpenProfile::trusted(None, Some("3"), true).is_none());
        // Neither: never subscribed, once everything is published.
        assert_eq!(
            OpenProfile::trusted(None, None, true),
            Some(OpenProfile::CLOSED)
        );
        assert!(OpenProfile::trusted(None, None, false).is_none());
        for bad in ["", "3", "3:1:0", "3:2:0:0", "x:1:0:1", "3:1:0:1:9"] {
            assert_eq!(OpenProfile::decode(bad), None, "{bad:?}");
        }
    }
}
