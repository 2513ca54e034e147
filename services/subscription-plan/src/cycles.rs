//! Billing-cycle arithmetic, pure and in UTC.
//!
//! A plan period starts at an anchor instant. Anniversary cycles start on the
//! anchor's day of each later month at the anchor's time of day, clamped to
//! the month's last day, always counted from the anchor (Jan 31 → Feb 28/29 →
//! Mar 31, never drifting to the 28th). Calendar-month cycles start on the 1st
//! at 00:00; the first cycle runs from the anchor to the next 1st.

use chrono::{DateTime, Datelike, Months, NaiveDate, TimeDelta, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CycleKind {
    Anniversary,
    CalendarMonth,
}

/// One billing cycle: `[start, end)`, `index` counted from 0 within its period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cycle {
    pub index: u32,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// Start of cycle `n` (0-based) of a period anchored at `anchor`.
pub fn cycle_start(kind: CycleKind, anchor: DateTime<Utc>, n: u32) -> DateTime<Utc> {
    match kind {
        // chrono clamps to the month's last day, and we always add from the
        // anchor, so the 31st comes back after a short month.
        CycleKind::Anniversary => anchor
            .checked_add_months(Months::new(n))
            .unwrap_or(DateTime::<Utc>::MAX_UTC),
        CycleKind::CalendarMonth if n == 0 => anchor,
        CycleKind::CalendarMonth => first_of_month(anchor)
            .checked_add_months(Months::new(n))
            .unwrap_or(DateTime::<Utc>::MAX_UTC),
    }
}

/// The cycle containing `t`; instants before the anchor fall in cycle 0.
pub fn cycle_at(kind: CycleKind, anchor: DateTime<Utc>, t: DateTime<Utc>) -> Cycle {
    let months = if t <= anchor {
        0
    } else {
        let diff = (t.year() - anchor.year()) * 12 + t.month0() as i32 - anchor.month0() as i32;
        diff.max(0) as u32
    };
    let mut n = months;
    while n > 0 && cycle_start(kind, anchor, n) > t {
        n -= 1;
    }
    while cycle_start(kind, anchor, n + 1) <= t {
        n += 1;
    }
    Cycle {
        index: n,
        start: cycle_start(kind, anchor, n),
        end: cycle_start(kind, anchor, n + 1),
    }
}

/// How many cycles of a period anchored at `anchor` began before `end` (a
/// period ending exactly when a cycle would start does not get that cycle).
pub fn cycles_begun_before(kind: CycleKind, anchor: DateTime<Utc>, end: DateTime<Utc>) -> u32 {
    if end <= anchor {
        return 0;
    }
    cycle_at(kind, anchor, end - TimeDelta::milliseconds(1)).index + 1
}

fn first_of_month(t: DateTime<Utc>) -> DateTime<Utc> {
    NaiveDate::from_ymd_opt(t.year(), t.month(), 1)
        .expect("the 1st exists")
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap()
    }

    fn starts(kind: CycleKind, anchor: DateTime<Utc>, n: u32) -> Vec<DateTime<Utc>> {
        (0..n).map(|i| cycle_start(kind, anchor, i)).collect()
    }

    #[test]
    fn anniversary_on_the_31st_clamps_and_comes_back() {
        let anchor = at(2027, 1, 31, 9);
        assert_eq!(
            starts(CycleKind::Anniversary, anchor, 5),
            [
                at(2027, 1, 31, 9),
                at(2027, 2, 28, 9),
                at(2027, 3, 31, 9),
                at(2027, 4, 30, 9),
                at(2027, 5, 31, 9),
            ]
        );
    }

    #[test]
    fn anniversary_in_a_leap_year_uses_the_29th() {
        let anchor = at(2028, 1, 31, 0);
        assert_eq!(
            cycle_start(CycleKind::Anniversary, anchor, 1),
            at(2028, 2, 29, 0)
        );
        assert_eq!(
            cycle_start(CycleKind::Anniversary, anchor, 2),
            at(2028, 3, 31, 0)
        );
    }

    #[test]
    fn anniversary_on_feb_29_renews_on_the_29th_when_it_exists() {
        let anchor = at(2028, 2, 29, 12);
        assert_eq!(
            cycle_start(CycleKind::Anniversary, anchor, 1),
            at(2028, 3, 29, 12)
        );
        assert_eq!(
            cycle_start(CycleKind::Anniversary, anchor, 12),
            at(2029, 2, 28, 12)
        );
        assert_eq!(
            cycle_start(CycleKind::Anniversary, anchor, 48),
            at(2032, 2, 29, 12)
        );
    }

    #[test]
    fn anniversary_on_the_30th_and_29th_in_february() {
        assert_eq!(
            cycle_start(CycleKind::Anniversary, at(2027, 1, 30, 0), 1),
            at(2027, 2, 28, 0)
        );
        assert_eq!(
            cycle_start(CycleKind::Anniversary, at(2027, 1, 29, 0), 1),
            at(2027, 2, 28, 0)
        );
        assert_eq!(
            cycle_start(CycleKind::Anniversary, at(2027, 1, 29, 0), 2),
            at(2027, 3, 29, 0)
        );
    }

    #[test]
    fn anniversary_crosses_the_year_end() {
        let anchor = at(2027, 12, 31, 23);
        assert_eq!(
            starts(CycleKind::Anniversary, anchor, 3),
            [
                at(2027, 12, 31, 23),
                at(2028, 1, 31, 23),
                at(2028, 2, 29, 23)
            ]
        );
    }

    #[test]
    fn calendar_month_first_cycle_is_partial_then_the_1st() {
        let anchor = at(2027, 12, 17, 15);
        assert_eq!(
            starts(CycleKind::CalendarMonth, anchor, 4),
            [
                at(2027, 12, 17, 15),
                at(2028, 1, 1, 0),
                at(2028, 2, 1, 0),
                at(2028, 3, 1, 0)
            ]
        );
    }

    #[test]
    fn cycle_at_finds_the_containing_cycle_on_every_edge() {
        let anchor = at(2027, 1, 31, 9);
        let kind = CycleKind::Anniversary;
        let c = cycle_at(kind, anchor, anchor);
        assert_eq!((c.index, c.start, c.end), (0, anchor, at(2027, 2, 28, 9)));
        // One millisecond before the renewal is still cycle 0.
        let c = cycle_at(
            kind,
            anchor,
            at(2027, 2, 28, 9) - TimeDelta::milliseconds(1),
        );
        assert_eq!(c.index, 0);
        // The renewal instant belongs to the new cycle.
        let c = cycle_at(kind, anchor, at(2027, 2, 28, 9));
        assert_eq!((c.index, c.end), (1, at(2027, 3, 31, 9)));
        // Mar 30 is still the cycle that started Feb 28.
        assert_eq!(cycle_at(kind, anchor, at(2027, 3, 30, 0)).index, 1);
        // Years later.
        let c = cycle_at(kind, anchor, at(2031, 7, 1, 0));
        assert_eq!(c.start, at(2031, 6, 30, 9));
        assert_eq!(c.end, at(2031, 7, 31, 9));
        assert_eq!(c.index, 53);
    }

    #[test]
    fn cycle_at_before_the_day_of_month_in_the_same_calendar_month() {
        // Anchor on the 15th; on the 10th of a later month we are still in the
        // cycle that started on the 15th of the month before.
        let anchor = at(2027, 3, 15, 0);
        let c = cycle_at(CycleKind::Anniversary, anchor, at(2027, 6, 10, 0));
        assert_eq!((c.index, c.start), (2, at(2027, 5, 15, 0)));
    }

    #[test]
    fn calendar_cycle_at_and_year_end() {
        let anchor = at(2027, 11, 20, 8);
        let kind = CycleKind::CalendarMonth;
        let c = cycle_at(kind, anchor, at(2027, 11, 30, 23));
        assert_eq!((c.index, c.start, c.end), (0, anchor, at(2027, 12, 1, 0)));
        let c = cycle_at(kind, anchor, at(2028, 1, 1, 0));
        assert_eq!(
            (c.index, c.start, c.end),
            (2, at(2028, 1, 1, 0), at(2028, 2, 1, 0))
        );
        let c = cycle_at(kind, anchor, at(2028, 2, 29, 23));
        assert_eq!((c.index, c.end), (3, at(2028, 3, 1, 0)));
    }

    #[test]
    fn every_cycle_is_contiguous_over_a_decade() {
        for kind in [CycleKind::Anniversary, CycleKind::CalendarMonth] {
            for anchor in [at(2027, 1, 31, 5), at(2028, 2, 29, 0), at(2027, 8, 30, 23)] {
                for n in 0..130 {
                    let start = cycle_start(kind, anchor, n);
                    let next = cycle_start(kind, anchor, n + 1);
                    assert!(next > start, "{kind:?} {anchor} {n}");
                    let length = next - start;
                    if n > 0 {
                        assert!(length >= TimeDelta::days(28) && length <= TimeDelta::days(31));
                    }
                    let c = cycle_at(kind, anchor, start);
                    assert_eq!((c.index, c.start, c.end), (n, start, next));
                    let c = cycle_at(kind, anchor, next - TimeDelta::milliseconds(1));
                    assert_eq!(c.index, n);
                }
            }
        }
    }

    #[test]
    fn cycles_begun_before_an_end_instant() {
        let anchor = at(2027, 1, 31, 9);
        let kind = CycleKind::Anniversary;
        assert_eq!(cycles_begun_before(kind, anchor, anchor), 0);
        assert_eq!(
            cycles_begun_before(kind, anchor, anchor + TimeDelta::milliseconds(1)),
            1
        );
        // Ending exactly at the renewal: the second cycle never began.
        assert_eq!(cycles_begun_before(kind, anchor, at(2027, 2, 28, 9)), 1);
        assert_eq!(
            cycles_begun_before(
                kind,
                anchor,
                at(2027, 2, 28, 9) + TimeDelta::milliseconds(1)
            ),
            2
        );
    }
}
