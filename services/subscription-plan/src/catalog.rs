//! The plan catalog: configuration, not code. Read from a TOML file (the
//! defaults ship in `plans.toml`) and refused at start when anything is off.

use std::collections::HashSet;
use std::path::Path;

use serde::Deserialize;

use crate::cycles::CycleKind;

/// The catalog that ships with the service.
pub const DEFAULT_CATALOG: &str = include_str!("../plans.toml");
pub const FREE_PLAN_ID: &str = "free";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub id: String,
    pub name: String,
    pub monthly_credits: u32,
    pub rollover_cap: u32,
    pub cycle: CycleKind,
    pub paid: bool,
}

#[derive(Debug, Clone)]
pub struct Catalog {
    plans: Vec<Plan>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    plans: Vec<PlanEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanEntry {
    id: String,
    name: String,
    monthly_credits: i64,
    rollover_cap: i64,
    cycle: String,
    paid: bool,
}

/// Largest credit figure a plan may name (keeps every sum far from overflow).
const MAX_CREDITS: i64 = 1_000_000;

impl Catalog {
    pub fn load(path: Option<&Path>) -> Result<Self, String> {
        match path {
            None => Self::parse(DEFAULT_CATALOG, "the built-in catalog"),
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read PLANS_FILE {}: {e}", path.display()))?;
                Self::parse(&text, &path.display().to_string())
            }
        }
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, String> {
        let file: CatalogFile =
            toml::from_str(text).map_err(|e| format!("plan catalog {origin}: {e}"))?;
        let mut seen = HashSet::new();
        let mut plans = Vec::with_capacity(file.plans.len());
        for entry in file.plans {
            let at = |msg: String| format!("plan catalog {origin}: plan {:?}: {msg}", entry.id);
            if entry.id.is_empty()
                || entry.id.len() > 64
                || !entry
                    .id
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            {
                return Err(at("id must be 1-64 characters of a-z, 0-9 and '-'".into()));
            }
            if !seen.insert(entry.id.clone()) {
                return Err(at("duplicate id".into()));
            }
            if entry.name.trim().is_empty() {
                return Err(at("name must not be empty".into()));
            }
            for (field, value) in [
                ("monthly_credits", entry.monthly_credits),
                ("rollover_cap", entry.rollover_cap),
            ] {
                if !(0..=MAX_CREDITS).contains(&value) {
                    return Err(at(format!(
                        "{field} must be between 0 and {MAX_CREDITS}, got {value}"
                    )));
                }
            }
            if entry.rollover_cap < entry.monthly_credits {
                return Err(at(format!(
                    "rollover_cap ({}) must be at least monthly_credits ({})",
                    entry.rollover_cap, entry.monthly_credits
                )));
            }
            let cycle = match entry.cycle.as_str() {
                "anniversary" => CycleKind::Anniversary,
                "calendar-month" => CycleKind::CalendarMonth,
                other => {
                    return Err(at(format!(
                        "cycle must be \"anniversary\" or \"calendar-month\", got {other:?}"
                    )));
                }
            };
            plans.push(Plan {
                id: entry.id,
                name: entry.name,
                monthly_credits: entry.monthly_credits as u32,
                rollover_cap: entry.rollover_cap as u32,
                cycle,
                paid: entry.paid,
            });
        }
        match plans.iter().find(|p| p.id == FREE_PLAN_ID) {
            None => {
                return Err(format!(
                    "plan catalog {origin}: a plan with id \"free\" is required"
                ));
            }
            Some(free) if free.paid || free.monthly_credits != 0 => {
                return Err(format!(
                    "plan catalog {origin}: plan \"free\" must be unpaid with 0 monthly_credits"
                ));
            }
            Some(_) => {}
        }
        Ok(Self { plans })
    }

    pub fn plans(&self) -> &[Plan] {
        &self.plans
    }

    pub fn get(&self, id: &str) -> Option<&Plan> {
        self.plans.iter().find(|p| p.id == id)
    }

    pub fn free(&self) -> &Plan {
        self.get(FREE_PLAN_ID).expect("validated at load")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_catalog_has_the_design_defaults() {
        let catalog = Catalog::load(None).unwrap();
        let summary: Vec<_> = catalog
            .plans()
            .iter()
            .map(|p| {
                (
                    p.id.as_str(),
                    p.monthly_credits,
                    p.rollover_cap,
                    p.cycle,
                    p.paid,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("free", 0, 0, CycleKind::CalendarMonth, false),
                ("premium-career", 5, 15, CycleKind::Anniversary, true),
                ("premium-business", 15, 45, CycleKind::Anniversary, true),
                ("recruiter-lite", 30, 120, CycleKind::Anniversary, true),
                (
                    "sales-navigator-core",
                    50,
                    150,
                    CycleKind::CalendarMonth,
                    true
                ),
            ]
        );
    }

    fn plan(id: &str, extra: &str) -> String {
        format!(
            "[[plans]]\nid = \"{id}\"\nname = \"X\"\nmonthly_credits = 1\nrollover_cap = 2\ncycle = \"anniversary\"\npaid = true\n{extra}"
        )
    }

    const FREE: &str = "[[plans]]\nid = \"free\"\nname = \"Free\"\nmonthly_credits = 0\nrollover_cap = 0\ncycle = \"calendar-month\"\npaid = false\n";

    #[test]
    fn duplicate_ids_are_refused() {
        let text = format!("{FREE}{}{}", plan("a", ""), plan("a", ""));
        let err = Catalog::parse(&text, "t").unwrap_err();
        assert!(err.contains("duplicate id"), "{err}");
    }

    #[test]
    fn negative_numbers_are_refused() {
        let text = format!(
            "{FREE}{}",
            plan("a", "").replace("monthly_credits = 1", "monthly_credits = -1")
        );
        let err = Catalog::parse(&text, "t").unwrap_err();
        assert!(err.contains("monthly_credits"), "{err}");
    }

    #[test]
    fn unknown_fields_are_refused() {
        let text = format!("{FREE}{}", plan("a", "price = 10\n"));
        let err = Catalog::parse(&text, "t").unwrap_err();
        assert!(err.contains("price"), "{err}");
    }

    #[test]
    fn unknown_cycle_and_missing_free_are_refused() {
        let text = format!("{FREE}{}", plan("a", "").replace("anniversary", "weekly"));
        assert!(Catalog::parse(&text, "t").unwrap_err().contains("cycle"));
        let err = Catalog::parse(&plan("a", ""), "t").unwrap_err();
        assert!(err.contains("\"free\""), "{err}");
    }

    #[test]
    fn cap_below_monthly_is_refused() {
        let text = format!(
            "{FREE}{}",
            plan("a", "").replace("rollover_cap = 2", "rollover_cap = 0")
        );
        assert!(
            Catalog::parse(&text, "t")
                .unwrap_err()
                .contains("rollover_cap")
        );
    }
}
