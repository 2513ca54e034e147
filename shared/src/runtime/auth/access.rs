//! Access tables: for every method of a service, who may call it. A method
//! that is not in the table is refused, never open by default.

use std::collections::HashMap;

use super::Caller;

/// A kind of caller a method admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Who {
    /// Anyone, also without credentials (health, reflection).
    Anyone,
    /// Any member with a valid token (each call then checks the member it
    /// names is that member).
    Member,
    /// The named service.
    Service(&'static str),
    /// An operator.
    Operator,
}

/// One service's table: the full method path (`/package.Service/Method`)
/// and who may call it.
pub type Table = &'static [(&'static str, &'static [Who])];

/// What every server serves besides its own methods.
pub const COMMON: Table = &[
    ("/grpc.health.v1.Health/Check", &[Who::Anyone]),
    ("/grpc.health.v1.Health/Watch", &[Who::Anyone]),
    (
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        &[Who::Anyone],
    ),
    (
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        &[Who::Anyone],
    ),
];

/// The test clock (only registered when TEST_CLOCK is on): operators only.
pub const TEST_CLOCK: Table = &[
    (
        "/inmail.testclock.v1.TestClockService/GetTime",
        &[Who::Operator],
    ),
    (
        "/inmail.testclock.v1.TestClockService/AdvanceTime",
        &[Who::Operator],
    ),
    (
        "/inmail.testclock.v1.TestClockService/SetTime",
        &[Who::Operator],
    ),
];

/// The answer of the access check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allowed,
    /// No such service is served here.
    Unimplemented,
    /// The caller has no credentials and the method needs some.
    Unauthenticated,
    /// The caller may not call this method (or it is in no table).
    Denied,
}

/// The merged tables of one server.
#[derive(Debug, Clone, Default)]
pub struct Access {
    methods: HashMap<&'static str, &'static [Who]>,
    services: std::collections::HashSet<String>,
}

impl Access {
    pub fn new() -> Self {
        let mut access = Self::default();
        access.add(COMMON);
        access
    }

    pub fn add(&mut self, table: Table) {
        for (method, who) in table {
            self.methods.insert(method, who);
        }
    }

    /// Marks `service` (its full proto name) as served here.
    pub fn serve(&mut self, service: &str) {
        self.services.insert(service.to_string());
    }

    pub fn methods(&self) -> impl Iterator<Item = &&'static str> {
        self.methods.keys()
    }

    /// The table's own copy of a method path (a label without an
    /// allocation), or "unknown" for one in no table.
    pub fn method_name(&self, method: &str) -> &'static str {
        self.methods
            .get_key_value(method)
            .map_or("unknown", |(name, _)| name)
    }

    /// Whether `caller` may call `method`.
    pub fn decide(&self, method: &str, caller: &Caller) -> Decision {
        let service = method
            .trim_start_matches('/')
            .split_once('/')
            .map_or("", |(service, _)| service);
        if !self.services.contains(service) {
            return Decision::Unimplemented;
        }
        if matches!(caller, Caller::Local) {
            return Decision::Allowed;
        }
        let Some(who) = self.methods.get(method) else {
            return Decision::Denied;
        };
        let allowed = who.iter().any(|w| match (w, caller) {
            (Who::Anyone, _) => true,
            (Who::Member, Caller::Member(_)) => true,
            (Who::Service(name), Caller::Service(service)) => name == service,
            (Who::Operator, Caller::Operator(_)) => true,
            _ => false,
        });
        match (allowed, caller) {
            (true, _) => Decision::Allowed,
            (false, Caller::Anonymous) => Decision::Unauthenticated,
            (false, _) => Decision::Denied,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: Table = &[
        ("/x.S/Debit", &[Who::Service("messaging")]),
        ("/x.S/Balance", &[Who::Member, Who::Operator]),
    ];

    #[test]
    fn the_table_decides_and_unknown_methods_are_refused() {
        let mut access = Access::new();
        access.add(TABLE);
        access.serve("x.S");
        access.serve("grpc.health.v1.Health");
        let messaging = Caller::Service("messaging".into());
        let plans = Caller::Service("subscription-plan".into());
        let sam = Caller::Member("sam".into());
        assert_eq!(access.decide("/x.S/Debit", &messaging), Decision::Allowed);
        assert_eq!(access.decide("/x.S/Debit", &plans), Decision::Denied);
        assert_eq!(access.decide("/x.S/Debit", &sam), Decision::Denied);
        assert_eq!(
            access.decide("/x.S/Debit", &Caller::Anonymous),
            Decision::Unauthenticated
        );
        assert_eq!(access.decide("/x.S/Balance", &sam), Decision::Allowed);
        assert_eq!(access.decide("/x.S/Unlisted", &messaging), Decision::Denied);
        assert_eq!(
            access.decide("/y.Other/Call", &messaging),
            Decision::Unimplemented
        );
        assert_eq!(
            access.decide("/grpc.health.v1.Health/Check", &Caller::Anonymous),
            Decision::Allowed
        );
    }
}

/// The methods of `service` (its full proto name) that `table` does not
/// list, read from the contracts' descriptor set: a new RPC without a table
/// entry is found by the services' tests.
pub fn unlisted(table: Table, service: &str) -> Vec<String> {
    use prost::Message;
    let set = prost_types::FileDescriptorSet::decode(crate::contract::proto::FILE_DESCRIPTOR_SET)
        .expect("the descriptor set decodes");
    let mut missing = Vec::new();
    let mut found = false;
    for file in &set.file {
        for svc in &file.service {
            let name = format!("{}.{}", file.package(), svc.name());
            if name != service {
                continue;
            }
            found = true;
            for method in &svc.method {
                let path = format!("/{name}/{}", method.name());
                if !table.iter().any(|(listed, _)| *listed == path) {
                    missing.push(path);
                }
            }
        }
    }
    assert!(found, "no service {service} in the contracts");
    missing
}

#[cfg(test)]
mod coverage {
    use super::*;

    #[test]
    fn the_test_clock_table_lists_every_method() {
        assert_eq!(
            unlisted(TEST_CLOCK, "inmail.testclock.v1.TestClockService"),
            Vec::<String>::new()
        );
    }
}
