//! The rules of subscriptions (README.md, "How it behaves"), pure: state in, time
//! passed in, new state or a refusal out.
//!
//! A member's history is a chain of plan periods, each with a version (0 for
//! the `free` period of a member who never subscribed, +1 per change). A change
//! scheduled for the end of a cycle is stored as such and takes effect lazily:
//! whoever reads the state after that instant sees the new period, as if it
//! had been applied on time.

use chrono::{DateTime, Utc};
use inmail_shared::state::clock::millis_to_datetime;
use inmail_shared::state::published::OpenProfile;
use serde::{Deserialize, Serialize};

use crate::catalog::{Catalog, Plan};
use crate::cycles::{Cycle, CycleKind, cycle_at};

/// Ended periods kept per member (billing only ever needs the last few).
pub const HISTORY_LIMIT: usize = 100;

/// A plan's terms, copied into the period when it starts, so a later catalog
/// edit never rewrites what a member was entitled to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Terms {
    pub plan_id: String,
    pub monthly_credits: u32,
    pub rollover_cap: u32,
    pub cycle: CycleKind,
    pub paid: bool,
}

impl From<&Plan> for Terms {
    fn from(plan: &Plan) -> Self {
        Self {
            plan_id: plan.id.clone(),
            monthly_credits: plan.monthly_credits,
            rollover_cap: plan.rollover_cap,
            cycle: plan.cycle,
            paid: plan.paid,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndReason {
    PlanChanged,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Period {
    pub version: u64,
    pub terms: Terms,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    pub end_reason: Option<EndReason>,
    /// The instant its cycles are counted from, when not its start: a plan
    /// change keeps the subscription's renewal date (README.md, "Plans and
    /// cycles"), so the new plan's first cycle is the one in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor_ms: Option<i64>,
    /// The start of the cycle in progress that an immediate change between
    /// paid plans continues: the period's first cycle runs from there (not
    /// from its own start) to the new plan's next renewal, so no change opens
    /// a cycle (billing counts the credits used since that instant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub continues_cycle_from_ms: Option<i64>,
}

impl Period {
    /// The instant its cycles are counted from.
    pub fn anchor_ms(&self) -> i64 {
        self.anchor_ms.unwrap_or(self.started_ms)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scheduled {
    pub terms: Terms,
    pub cancellation: bool,
    pub effective_ms: i64,
    /// The new period's cycle anchor (a plan change keeps the renewal date).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor_ms: Option<i64>,
}

/// Everything stored about one member's subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubscriptionState {
    pub current: Period,
    pub scheduled: Option<Scheduled>,
    pub open_profile: bool,
    /// Ended periods, oldest first.
    pub history: Vec<Period>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timing {
    Immediately,
    EndOfCycle,
}

/// Why a change is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("plan {0:?} does not exist")]
    PlanNotFound(String),
    #[error("plan {0:?} is not a paid plan one can subscribe to (to leave a paid plan, cancel)")]
    NotSubscribable(String),
    #[error("member is already subscribed to {0:?}; use ChangePlan")]
    AlreadySubscribed(String),
    #[error("member has no paid subscription; use Subscribe")]
    NotSubscribed,
    #[error("member is already on plan {0:?}")]
    SamePlan(String),
    #[error("no plan change or cancellation is scheduled")]
    NoScheduledChange,
    #[error("Open Profile is only for members on a paid plan")]
    PaidPlanRequired,
}

impl SubscriptionState {
    /// A member who never subscribed: on `free` since the epoch.
    pub fn never_subscribed(catalog: &Catalog) -> Self {
        Self {
            current: Period {
                version: 0,
                terms: Terms::from(catalog.free()),
                started_ms: 0,
                ended_ms: None,
                end_reason: None,
                anchor_ms: None,
                continues_cycle_from_ms: None,
            },
            scheduled: None,
            open_profile: false,
            history: Vec::new(),
        }
    }

    /// The state as of `now_ms`: a scheduled change whose time has come is
    /// applied at its effective instant.
    pub fn at(mut self, now_ms: i64) -> Self {
        if let Some(scheduled) = self.scheduled.take() {
            if scheduled.effective_ms <= now_ms {
                let reason = if scheduled.cancellation {
                    EndReason::Cancelled
                } else {
                    EndReason::PlanChanged
                };
                self.start_period(
                    scheduled.terms,
                    scheduled.effective_ms,
                    reason,
                    scheduled.anchor_ms,
                );
            } else {
                self.scheduled = Some(scheduled);
            }
        }
        self
    }

    /// Ends the current period at `at_ms` and starts one of `terms`, its
    /// cycles counted from `anchor_ms` (`None`: from `at_ms`).
    fn start_period(
        &mut self,
        terms: Terms,
        at_ms: i64,
        reason: EndReason,
        anchor_ms: Option<i64>,
    ) {
        // An immediate change between paid plans (not at a cycle's end)
        // continues the cycle in progress.
        let in_progress = self.cycle(at_ms).start.timestamp_millis();
        let continues =
            (self.current.terms.paid && terms.paid && in_progress < at_ms).then_some(in_progress);
        let next = Period {
            version: self.current.version + 1,
            terms,
            started_ms: at_ms,
            ended_ms: None,
            end_reason: None,
            anchor_ms,
            continues_cycle_from_ms: continues,
        };
        let mut ended = std::mem::replace(&mut self.current, next);
        ended.ended_ms = Some(at_ms);
        ended.end_reason = Some(reason);
        self.history.push(ended);
        if self.history.len() > HISTORY_LIMIT {
            let excess = self.history.len() - HISTORY_LIMIT;
            self.history.drain(..excess);
        }
        self.scheduled = None;
        // Open Profile turns off when the member leaves paid plans.
        self.open_profile &= self.current.terms.paid;
    }

    /// The current cycle at `now_ms`.
    pub fn cycle(&self, now_ms: i64) -> Cycle {
        PeriodView::of(&self.current, now_ms).cycle
    }

    /// The 1-based number of the current cycle within the current period.
    pub fn cycle_number(&self, now_ms: i64) -> u32 {
        PeriodView::of(&self.current, now_ms).cycles_started
    }

    /// A paid plan's renewal date stays when it changes to a plan that
    /// renews the same way: the new period counts its cycles from the same
    /// anchor. Between an anniversary plan and a calendar-month one (Sales
    /// Navigator, the 1st) the new plan's rule starts at the change.
    fn paid_anchor(&self, to: &Terms) -> Option<i64> {
        (self.current.terms.paid && self.current.terms.cycle == to.cycle)
            .then(|| self.current.anchor_ms())
    }

    pub fn subscribe(mut self, plan: &Plan, now_ms: i64) -> Result<Self, PlanError> {
        if self.current.terms.paid {
            return Err(PlanError::AlreadySubscribed(
                self.current.terms.plan_id.clone(),
            ));
        }
        if !plan.paid {
            return Err(PlanError::NotSubscribable(plan.id.clone()));
        }
        self.start_period(Terms::from(plan), now_ms, EndReason::PlanChanged, None);
        Ok(self)
    }

    pub fn change_plan(
        mut self,
        plan: &Plan,
        timing: Timing,
        now_ms: i64,
    ) -> Result<Self, PlanError> {
        if !self.current.terms.paid {
            return Err(PlanError::NotSubscribed);
        }
        if !plan.paid {
            return Err(PlanError::NotSubscribable(plan.id.clone()));
        }
        if plan.id == self.current.terms.plan_id {
            return Err(PlanError::SamePlan(plan.id.clone()));
        }
        match timing {
            Timing::Immediately => {
                let terms = Terms::from(plan);
                let anchor = self.paid_anchor(&terms);
                self.start_period(terms, now_ms, EndReason::PlanChanged, anchor)
            }
            Timing::EndOfCycle => {
                let terms = Terms::from(plan);
                self.scheduled = Some(Scheduled {
                    anchor_ms: self.paid_anchor(&terms),
                    terms,
                    cancellation: false,
                    effective_ms: self.cycle(now_ms).end.timestamp_millis(),
                });
            }
        }
        Ok(self)
    }

    pub fn cancel(mut self, free: &Plan, timing: Timing, now_ms: i64) -> Result<Self, PlanError> {
        if !self.current.terms.paid {
            return Err(PlanError::NotSubscribed);
        }
        match timing {
            Timing::Immediately => {
                self.start_period(Terms::from(free), now_ms, EndReason::Cancelled, None)
            }
            Timing::EndOfCycle => {
                self.scheduled = Some(Scheduled {
                    terms: Terms::from(free),
                    cancellation: true,
                    effective_ms: self.cycle(now_ms).end.timestamp_millis(),
                    anchor_ms: None,
                });
            }
        }
        Ok(self)
    }

    pub fn clear_scheduled(mut self) -> Result<Self, PlanError> {
        match self.scheduled.take() {
            Some(_) => Ok(self),
            None => Err(PlanError::NoScheduledChange),
        }
    }

    /// Open Profile as of any instant until the next write: what
    /// [`Self::at`] gives, before and after the scheduled change.
    pub fn open_profile_schedule(&self) -> OpenProfile {
        let before = self.open_profile && self.current.terms.paid;
        OpenProfile {
            before,
            switch_ms: self.scheduled.as_ref().map(|s| s.effective_ms),
            // Leaving paid plans turns it off (start_period).
            after: self
                .scheduled
                .as_ref()
                .map_or(before, |s| self.open_profile && s.terms.paid),
        }
    }

    pub fn set_open_profile(mut self, enabled: bool) -> Result<Self, PlanError> {
        if enabled && !self.current.terms.paid {
            return Err(PlanError::PaidPlanRequired);
        }
        self.open_profile = enabled;
        Ok(self)
    }

    /// The current period and the ended periods with version >=
    /// `after_version`, oldest first, with their cycles as of `now_ms`.
    pub fn entitlement(&self, after_version: u64, now_ms: i64) -> (PeriodView, Vec<PeriodView>) {
        let ended = self
            .history
            .iter()
            .filter(|p| p.version >= after_version)
            .map(|p| PeriodView::of(p, now_ms))
            .collect();
        (PeriodView::of(&self.current, now_ms), ended)
    }
}

/// A period with its cycles worked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeriodView {
    pub period: Period,
    /// Cycles begun in the period (up to now, or up to its end).
    pub cycles_started: u32,
    /// The latest of those cycles.
    pub cycle: Cycle,
}

impl PeriodView {
    fn of(period: &Period, now_ms: i64) -> Self {
        let anchor = millis_to_datetime(period.anchor_ms());
        let start = millis_to_datetime(period.started_ms);
        let kind = period.terms.cycle;
        // The cycle the period started in is its first (after a plan change,
        // one that began before it).
        let first = cycle_at(kind, anchor, start).index;
        let (cycles_started, cycle) = match period.ended_ms {
            None => {
                let cycle = cycle_at(kind, anchor, millis_to_datetime(now_ms).max(start));
                (cycle.index - first + 1, cycle)
            }
            Some(end_ms) if end_ms <= period.started_ms => (
                0,
                Cycle {
                    index: first,
                    start,
                    end: millis_to_datetime(end_ms),
                },
            ),
            Some(end_ms) => {
                let end = millis_to_datetime(end_ms) - chrono::TimeDelta::milliseconds(1);
                let last = cycle_at(kind, anchor, end);
                (last.index - first + 1, last)
            }
        };
        let mut cycle = cycle;
        if let Some(from) = period.continues_cycle_from_ms
            && cycle.index == first
        {
            cycle.start = millis_to_datetime(from);
        }
        Self {
            period: period.clone(),
            cycles_started,
            cycle,
        }
    }

    pub fn started_at(&self) -> DateTime<Utc> {
        millis_to_datetime(self.period.started_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn ms(y: i32, m: u32, d: u32) -> i64 {
        Utc.with_ymd_and_hms(y, m, d, 10, 0, 0)
            .unwrap()
            .timestamp_millis()
    }

    fn catalog() -> Catalog {
        Catalog::load(None).unwrap()
    }

    fn plan<'a>(c: &'a Catalog, id: &str) -> &'a Plan {
        c.get(id).unwrap()
    }

    #[test]
    fn subscribing_starts_version_one_and_a_cycle_now() {
        let c = catalog();
        let s = SubscriptionState::never_subscribed(&c)
            .subscribe(plan(&c, "premium-career"), ms(2027, 1, 31))
            .unwrap();
        assert_eq!(s.current.version, 1);
        assert_eq!(s.current.terms.plan_id, "premium-career");
        assert_eq!(s.history.len(), 1);
        assert_eq!(s.history[0].end_reason, Some(EndReason::PlanChanged));
        let cycle = s.cycle(ms(2027, 2, 1));
        assert_eq!(cycle.end.timestamp_millis(), ms(2027, 2, 28));
    }

    #[test]
    fn subscribing_twice_or_to_free_is_refused() {
        let c = catalog();
        let s = SubscriptionState::never_subscribed(&c);
        assert_eq!(
            s.clone().subscribe(plan(&c, "free"), 0).unwrap_err(),
            PlanError::NotSubscribable("free".into())
        );
        let s = s.subscribe(plan(&c, "premium-career"), 0).unwrap();
        assert!(matches!(
            s.subscribe(plan(&c, "recruiter-lite"), 0),
            Err(PlanError::AlreadySubscribed(_))
        ));
    }

    #[test]
    fn scheduled_change_takes_effect_at_cycle_end_lazily() {
        let c = catalog();
        let s = SubscriptionState::never_subscribed(&c)
            .subscribe(plan(&c, "premium-career"), ms(2027, 1, 31))
            .unwrap()
            .change_plan(
                plan(&c, "recruiter-lite"),
                Timing::EndOfCycle,
                ms(2027, 2, 10),
            )
            .unwrap();
        assert_eq!(s.scheduled.as_ref().unwrap().effective_ms, ms(2027, 2, 28));
        let before = s.clone().at(ms(2027, 2, 28) - 1);
        assert_eq!(before.current.terms.plan_id, "premium-career");
        let after = s.at(ms(2027, 2, 28));
        assert_eq!(after.current.terms.plan_id, "recruiter-lite");
        assert_eq!(after.current.version, 2);
        assert_eq!(after.current.started_ms, ms(2027, 2, 28));
        assert!(after.scheduled.is_none());
    }

    #[test]
    fn an_open_profile_stays_open_through_a_change_between_paid_plans() {
        let c = catalog();
        let s = SubscriptionState::never_subscribed(&c)
            .subscribe(plan(&c, "premium-career"), ms(2027, 1, 31))
            .unwrap()
            .set_open_profile(true)
            .unwrap()
            .change_plan(
                plan(&c, "recruiter-lite"),
                Timing::EndOfCycle,
                ms(2027, 2, 10),
            )
            .unwrap();
        let schedule = s.open_profile_schedule();
        assert_eq!(schedule.switch_ms, Some(ms(2027, 2, 28)));
        for t in [ms(2027, 2, 10), ms(2027, 2, 28), ms(2027, 6, 1)] {
            assert!(schedule.at(t), "at {t}");
            assert!(s.clone().at(t).open_profile, "at {t}");
        }
        let closed = SubscriptionState::never_subscribed(&c).open_profile_schedule();
        assert!(!closed.at(0) && !closed.at(i64::MAX));
    }

    #[test]
    fn cancel_at_cycle_end_moves_to_free_and_turns_open_profile_off() {
        let c = catalog();
        let s = SubscriptionState::never_subscribed(&c)
            .subscribe(plan(&c, "premium-business"), ms(2027, 3, 5))
            .unwrap()
            .set_open_profile(true)
            .unwrap()
            .cancel(c.free(), Timing::EndOfCycle, ms(2027, 3, 20))
            .unwrap();
        let schedule = s.open_profile_schedule();
        for t in [
            ms(2027, 3, 20),
            ms(2027, 4, 5) - 1,
            ms(2027, 4, 5),
            ms(2028, 1, 1),
        ] {
            let at = s.clone().at(t);
            assert_eq!(
                schedule.at(t),
                at.open_profile && at.current.terms.paid,
                "at {t}"
            );
        }
        let still = s.clone().at(ms(2027, 4, 5) - 1);
        assert!(still.open_profile);
        assert!(still.current.terms.paid);
        let after = s.at(ms(2027, 4, 5));
        assert_eq!(after.current.terms.plan_id, "free");
        assert!(!after.open_profile);
        assert_eq!(
            after.history.last().unwrap().end_reason,
            Some(EndReason::Cancelled)
        );
        // Resubscribing does not bring Open Profile back by itself.
        let again = after
            .subscribe(plan(&c, "premium-career"), ms(2027, 5, 1))
            .unwrap();
        assert!(!again.open_profile);
    }

    #[test]
    fn open_profile_needs_a_paid_plan_but_can_always_be_turned_off() {
        let c = catalog();
        let s = SubscriptionState::never_subscribed(&c);
        assert_eq!(
            s.clone().set_open_profile(true).unwrap_err(),
            PlanError::PaidPlanRequired
        );
        assert!(!s.set_open_profile(false).unwrap().open_profile);
    }

    #[test]
    fn change_to_same_plan_or_when_free_is_refused() {
        let c = catalog();
        let free = SubscriptionState::never_subscribed(&c);
        assert_eq!(
            free.clone()
                .change_plan(plan(&c, "premium-career"), Timing::Immediately, 0)
                .unwrap_err(),
            PlanError::NotSubscribed
        );
        assert_eq!(
            free.clone()
                .cancel(c.free(), Timing::Immediately, 0)
                .unwrap_err(),
            PlanError::NotSubscribed
        );
        let s = free.subscribe(plan(&c, "premium-career"), 0).unwrap();
        assert!(matches!(
            s.change_plan(plan(&c, "premium-career"), Timing::EndOfCycle, 0),
            Err(PlanError::SamePlan(_))
        ));
    }

    #[test]
    fn entitlement_reports_cycles_of_ended_and_current_periods() {
        let c = catalog();
        // Career from Jan 31; upgraded in its third cycle (started Mar 31).
        let s = SubscriptionState::never_subscribed(&c)
            .subscribe(plan(&c, "premium-career"), ms(2027, 1, 31))
            .unwrap()
            .change_plan(
                plan(&c, "premium-business"),
                Timing::Immediately,
                ms(2027, 4, 15),
            )
            .unwrap();
        let (current, ended) = s.entitlement(1, ms(2027, 6, 1));
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].period.terms.plan_id, "premium-career");
        assert_eq!(ended[0].cycles_started, 3);
        assert_eq!(ended[0].cycle.start.timestamp_millis(), ms(2027, 3, 31));
        assert_eq!(ended[0].cycle.end.timestamp_millis(), ms(2027, 4, 30));
        assert_eq!(current.period.version, 2);
        // Business from Apr 15 keeps the renewal date: its first cycle is
        // the one in progress (Mar 31 - Apr 30), then Apr 30 and May 31, so
        // 3 begun by Jun 1.
        assert_eq!(current.cycles_started, 3);
        assert_eq!(current.cycle.start.timestamp_millis(), ms(2027, 5, 31));
        // Asking from version 2 returns no ended period.
        assert!(s.entitlement(2, ms(2027, 6, 1)).1.is_empty());
    }

    #[test]
    fn a_plan_change_keeps_the_renewal_date_and_a_resubscription_starts_a_new_one() {
        let c = catalog();
        let s = SubscriptionState::never_subscribed(&c)
            .subscribe(plan(&c, "premium-business"), ms(2027, 1, 25))
            .unwrap()
            .change_plan(
                plan(&c, "premium-career"),
                Timing::Immediately,
                ms(2027, 2, 3),
            )
            .unwrap();
        let cycle = s.cycle(ms(2027, 2, 3));
        assert_eq!(
            (cycle.start.timestamp_millis(), cycle.end.timestamp_millis()),
            (ms(2027, 1, 25), ms(2027, 2, 25))
        );
        assert_eq!(s.cycle_number(ms(2027, 2, 3)), 1);
        assert_eq!(s.cycle_number(ms(2027, 2, 25)), 2);
        // A scheduled change keeps it too, also from a clamped month end.
        let s = SubscriptionState::never_subscribed(&c)
            .subscribe(plan(&c, "premium-career"), ms(2027, 1, 31))
            .unwrap()
            .change_plan(
                plan(&c, "recruiter-lite"),
                Timing::EndOfCycle,
                ms(2027, 2, 10),
            )
            .unwrap()
            .at(ms(2027, 3, 1));
        assert_eq!(s.current.started_ms, ms(2027, 2, 28));
        assert_eq!(
            s.cycle(ms(2027, 3, 1)).end.timestamp_millis(),
            ms(2027, 3, 31)
        );
        // To Sales Navigator (the 1st) and back: each plan's own rule from
        // the change.
        let s = s
            .change_plan(
                plan(&c, "sales-navigator-core"),
                Timing::Immediately,
                ms(2027, 3, 4),
            )
            .unwrap();
        assert_eq!(s.cycle(ms(2027, 3, 4)).end.timestamp_millis(), {
            Utc.with_ymd_and_hms(2027, 4, 1, 0, 0, 0)
                .unwrap()
                .timestamp_millis()
        });
        let s = s
            .change_plan(
                plan(&c, "premium-career"),
                Timing::Immediately,
                ms(2027, 4, 6),
            )
            .unwrap();
        assert_eq!(
            s.cycle(ms(2027, 4, 7)).end.timestamp_millis(),
            ms(2027, 5, 6)
        );
        // Cancelled and subscribed again: a new sign-up, a new date.
        let s = s
            .cancel(c.free(), Timing::Immediately, ms(2027, 3, 5))
            .unwrap()
            .subscribe(plan(&c, "premium-career"), ms(2027, 3, 9))
            .unwrap();
        assert_eq!(
            s.cycle(ms(2027, 3, 9)).end.timestamp_millis(),
            ms(2027, 4, 9)
        );
    }

    #[test]
    fn history_is_bounded() {
        let c = catalog();
        let mut s = SubscriptionState::never_subscribed(&c)
            .subscribe(plan(&c, "premium-career"), 0)
            .unwrap();
        for i in 0..150 {
            let to = if i % 2 == 0 {
                "premium-business"
            } else {
                "premium-career"
            };
            s = s.change_plan(plan(&c, to), Timing::Immediately, i).unwrap();
        }
        assert_eq!(s.history.len(), HISTORY_LIMIT);
        assert_eq!(s.current.version, 151);
    }
}
