//! The plan-change rule under random sequences (issue 19): subscribe,
//! change (now or at the cycle end), cancel (now or at the cycle end),
//! spend, refund and advance the test clock, thousands of steps, seeded and
//! reproducible (`PLAN_RULES_SEED`, `PLAN_RULES_STEPS`). After every
//! immediate change between paid plans the balance is the new plan's month
//! less what the cycle used, never below 0; within a cycle the credits used
//! and held never exceed the largest month of the plans held in it; the
//! ledger replays to the balance.

use std::time::Duration;

use chrono::{DateTime, Utc};
use inmail_shared::contract::proto::billing::v1 as billing;
use inmail_shared::contract::proto::plans::v1 as plans;
use inmail_tests::{Stack, StackOptions, rid};

use crate::common::*;

const PAID: [(&str, i64); 4] = [
    ("premium-career", 5),
    ("premium-business", 15),
    ("recruiter-lite", 30),
    ("sales-navigator-core", 50),
];

fn monthly(plan: &str) -> i64 {
    PAID.iter().find(|(p, _)| *p == plan).map_or(0, |(_, m)| *m)
}

/// xorshift64*: a seeded sequence without another dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the test knows of one member, independently of the services.
#[derive(Default)]
struct Model {
    /// (when, plan held from then on).
    plans: Vec<(DateTime<Utc>, String)>,
    /// Confirmed debits: (message id, when, refunded).
    debits: Vec<(String, DateTime<Utc>, bool)>,
    /// Refund instants.
    refunds: Vec<DateTime<Utc>>,
}

impl Model {
    fn used_since(&self, start: DateTime<Utc>) -> i64 {
        let debited = self.debits.iter().filter(|(_, t, _)| *t >= start).count() as i64;
        let refunded = self.refunds.iter().filter(|t| **t >= start).count() as i64;
        debited - refunded
    }

    /// The largest month of the plans held at any instant since `start`.
    fn largest_month_since(&self, start: DateTime<Utc>) -> i64 {
        let held_at_start = self
            .plans
            .iter()
            .rev()
            .find(|(t, _)| *t <= start)
            .map_or(0, |(_, p)| monthly(p));
        self.plans
            .iter()
            .filter(|(t, _)| *t > start)
            .map(|(_, p)| monthly(p))
            .fold(held_at_start, i64::max)
    }
}

async fn change(
    stack: &Stack,
    member: &str,
    plan: &str,
    timing: plans::ChangeTiming,
) -> Result<(), tonic::Status> {
    stack
        .plans_as(member)
        .change_plan(plans::ChangePlanRequest {
            request_id: rid(),
            member_id: member.into(),
            plan_id: plan.into(),
            timing: timing as i32,
        })
        .await
        .map(|_| ())
}

async fn cancel(
    stack: &Stack,
    member: &str,
    timing: plans::ChangeTiming,
) -> Result<(), tonic::Status> {
    stack
        .plans_as(member)
        .cancel_subscription(plans::CancelSubscriptionRequest {
            request_id: rid(),
            member_id: member.into(),
            timing: timing as i32,
        })
        .await
        .map(|_| ())
}

async fn run(catalog: Option<&str>, rollover: bool, seed: u64, steps: u64) {
    let mut options = StackOptions {
        // Thousands of steps by one member: far past a member's daily quota
        // of changes, which is not what this test is about.
        plans_args: vec!["--mutation-burst".into(), "100000".into()],
        ..Default::default()
    };
    let dir = tempdir();
    if let Some(toml) = catalog {
        let path = dir.join("plans.toml");
        std::fs::write(&path, toml).unwrap();
        options
            .plans_args
            .extend(["--plans-file".into(), path.display().to_string()]);
    }
    let stack = Stack::start_with(options).await;
    stack.set_time(utc(2027, 1, 1, 0)).await;
    let member = "rex";
    let mut rng = Rng(seed | 1);
    let mut model = Model::default();
    model.plans.push((utc(2000, 1, 1, 0), "free".into()));
    let mut spent = 0u64;
    let mut changes = 0u64;
    for step in 0..steps {
        let sub = subscription(&stack, member).await;
        let cycle_start = ts(&sub.cycle_start);
        let paid = sub.paid;
        let context = format!("seed {seed}, step {step}, plan {}", sub.plan_id);
        match rng.below(100) {
            // Subscribe when free; change or cancel when paid.
            0..=9 => {
                if paid {
                    let others: Vec<&str> = PAID
                        .iter()
                        .map(|(p, _)| *p)
                        .filter(|p| *p != sub.plan_id)
                        .collect();
                    let to = others[rng.below(others.len() as u64) as usize];
                    let used = model.used_since(cycle_start);
                    if rng.below(3) == 0 {
                        change(&stack, member, to, plans::ChangeTiming::EndOfCycle)
                            .await
                            .unwrap();
                    } else {
                        change(&stack, member, to, plans::ChangeTiming::Immediately)
                            .await
                            .unwrap();
                        changes += 1;
                        let after = available(&stack, member).await;
                        if after != (monthly(to) - used).max(0) {
                            let entries: Vec<String> = ledger(&stack, member)
                                .await
                                .iter()
                                .map(|e| {
                                    format!(
                                        "{} {:?} {} -> {} {} {}",
                                        ts(&e.occurred_at),
                                        e.kind,
                                        e.amount,
                                        e.balance_after,
                                        e.plan_id,
                                        e.note
                                    )
                                })
                                .collect();
                            panic!(
                                "{context}: {} -> {to} with {used} used since {cycle_start}: {after}\nledger (newest first):\n{}\nmodel debits {:?}\nrefunds {:?}\nplans {:?}",
                                sub.plan_id,
                                entries.join("\n"),
                                model.debits,
                                model.refunds,
                                model.plans
                            );
                        }
                    }
                } else {
                    let (to, _) = PAID[rng.below(PAID.len() as u64) as usize];
                    subscribe(&stack, member, to).await;
                }
            }
            10..=12 if paid => {
                let now = rng.below(2) == 0;
                let timing = if now {
                    plans::ChangeTiming::Immediately
                } else {
                    plans::ChangeTiming::EndOfCycle
                };
                cancel(&stack, member, timing).await.unwrap();
                if now {
                    assert_eq!(available(&stack, member).await, 0, "{context}: cancelled");
                }
            }
            13..=59 => {
                let id = format!("m{step}");
                let before = available(&stack, member).await;
                match spend(&stack, member, &id).await {
                    Ok(after) => {
                        assert_eq!(after, before - 1, "{context}");
                        let debit = stack
                            .billing_as_messaging()
                            .get_debit(billing::GetDebitRequest {
                                member_id: member.into(),
                                message_id: id.clone(),
                            })
                            .await
                            .unwrap()
                            .into_inner()
                            .debit
                            .unwrap();
                        model.debits.push((id, ts(&debit.debited_at), false));
                        spent += 1;
                    }
                    Err(refused) => {
                        let expected = if paid {
                            "INSUFFICIENT_CREDITS"
                        } else {
                            "PAID_PLAN_REQUIRED"
                        };
                        assert_eq!(reason(&refused), expected, "{context}: {refused:?}");
                        if paid {
                            assert_eq!(before, 0, "{context}: refused with credits left");
                        }
                    }
                }
            }
            60..=74 => {
                let now = stack.now().await;
                let window = chrono::TimeDelta::days(89);
                let open: Vec<usize> = model
                    .debits
                    .iter()
                    .enumerate()
                    .filter(|(_, (_, t, refunded))| !refunded && now - *t < window)
                    .map(|(i, _)| i)
                    .collect();
                if !open.is_empty() {
                    let i = open[rng.below(open.len() as u64) as usize];
                    let refunded = stack
                        .billing_as_messaging()
                        .refund_message(billing::RefundMessageRequest {
                            request_id: rid(),
                            member_id: member.into(),
                            message_id: model.debits[i].0.clone(),
                            responded_at: None,
                        })
                        .await
                        .unwrap_or_else(|s| panic!("{context}: refund: {s:?}"))
                        .into_inner();
                    assert!(refunded.refunded_now, "{context}");
                    model.debits[i].2 = true;
                    model.refunds.push(ts(&refunded.debit.unwrap().returned_at));
                }
            }
            _ => {
                let hours = 1 + rng.below(24 * 20);
                stack.advance(Duration::from_secs(hours * 3600)).await;
            }
        }
        // Whatever came before, within the cycle in progress the credits
        // used and held never exceed the largest month of the plans held in
        // it (without rollover, which a renewal may add on top).
        let sub = subscription(&stack, member).await;
        if model.plans.last().map(|(_, p)| p.as_str()) != Some(sub.plan_id.as_str()) {
            // A change made now, or a scheduled one that took effect.
            model
                .plans
                .push((ts(&sub.period_started_at), sub.plan_id.clone()));
        }
        let cycle_start = ts(&sub.cycle_start);
        let held = available(&stack, member).await;
        let used = model.used_since(cycle_start);
        if !rollover {
            let largest = model.largest_month_since(cycle_start);
            assert!(
                used + held <= largest,
                "{context}: {used} used + {held} held in the cycle from {cycle_start} > {largest}"
            );
        }
        if step % 100 == 99 {
            let entries = ledger(&stack, member).await;
            let replayed: i64 = entries.iter().map(|e| e.amount).sum();
            assert_eq!(replayed, held, "{context}: the ledger does not replay");
        }
    }
    assert!(
        spent > steps / 20 && changes > steps / 40,
        "the sequence exercised too little: {spent} spent, {changes} changes"
    );
    assert_ledgers_reconcile(&mut stack.billing_operator()).await;
}

fn tempdir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("inmail-plan-rules-{}", rid()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The shipped catalog, rollover included: the exact balance after every
/// immediate change and the ledger replay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_plan_sequences_leave_what_the_new_plan_would_have_left() {
    let seed = env_or("PLAN_RULES_SEED", 0x19_2026);
    let steps = env_or("PLAN_RULES_STEPS", 1500);
    run(None, true, seed, steps).await;
}

/// Rollover caps equal to the monthly credits, so the bound on a cycle's
/// credits is exactly the largest month of the plans held in it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_plan_sequences_never_mint_within_a_cycle() {
    let catalog = include_str!("../../../services/subscription-plan/plans.toml")
        .replace("rollover_cap = 15", "rollover_cap = 5")
        .replace("rollover_cap = 45", "rollover_cap = 15")
        .replace("rollover_cap = 120", "rollover_cap = 30")
        .replace("rollover_cap = 150", "rollover_cap = 50");
    let seed = env_or("PLAN_RULES_SEED", 0x19_2026) ^ 0x5eed;
    let steps = env_or("PLAN_RULES_STEPS", 1500);
    run(Some(&catalog), false, seed, steps).await;
}
