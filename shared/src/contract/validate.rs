//! Field checks shared by every service. A handler collects every violation of
//! a request, then refuses it as a whole, before touching any state.

use crate::contract::error::{ApiError, Violation};

/// Longest member id (README.md, "How it behaves").
pub const MEMBER_ID_MAX_LEN: usize = 64;
/// Longest request_id we keep as an idempotency key.
pub const REQUEST_ID_MAX_LEN: usize = 128;

/// Collects the violations of one request.
#[derive(Debug, Default)]
pub struct Checks {
    violations: Vec<Violation>,
}

impl Checks {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, field: &str, description: impl Into<String>) {
        self.violations.push(Violation::new(field, description));
    }

    /// Member ids are 1-64 characters from `[A-Za-z0-9._-]`.
    pub fn member_id(&mut self, field: &str, value: &str) -> &mut Self {
        if let Err(description) = check_member_id(value) {
            self.add(field, description);
        }
        self
    }

    /// A request_id is required on every mutation: 1-128 printable ASCII
    /// characters (a UUID fits).
    pub fn request_id(&mut self, value: &str) -> &mut Self {
        if value.is_empty() {
            self.add(
                "request_id",
                "is required (an idempotency key, e.g. a UUID)",
            );
        } else if value.len() > REQUEST_ID_MAX_LEN {
            self.add(
                "request_id",
                format!("must be at most {REQUEST_ID_MAX_LEN} characters"),
            );
        } else if !value.bytes().all(|b| b.is_ascii_graphic()) {
            self.add(
                "request_id",
                "must be printable ASCII without spaces (e.g. a UUID)",
            );
        }
        self
    }

    /// Text measured in Unicode scalar values (not bytes).
    pub fn text(
        &mut self,
        field: &str,
        value: &str,
        required: bool,
        max_chars: usize,
    ) -> &mut Self {
        let chars = value.chars().count();
        if required && value.trim().is_empty() {
            self.add(field, "is required");
        } else if chars > max_chars {
            self.add(
                field,
                format!("must be at most {max_chars} characters, got {chars}"),
            );
        } else if value.contains('\0') {
            // Text is kept as text everywhere, PostgreSQL included, which
            // has no NUL character.
            self.add(field, "must not contain NUL characters");
        }
        self
    }

    /// An enum field must hold one of its declared values.
    pub fn known_enum<E: TryFrom<i32>>(&mut self, field: &str, value: i32) -> &mut Self {
        if E::try_from(value).is_err() {
            self.add(field, format!("unknown value {value}"));
        }
        self
    }

    pub fn is_empty(&self) -> bool {
        self.violations.is_empty()
    }

    /// `Ok` when nothing was wrong, else INVALID_ARGUMENT naming every field.
    pub fn finish(&mut self) -> Result<(), ApiError> {
        if self.violations.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid(std::mem::take(&mut self.violations)))
        }
    }
}

pub fn check_member_id(value: &str) -> Result<(), &'static str> {
    if value.is_empty() {
        return Err("is required");
    }
    if value.len() > MEMBER_ID_MAX_LEN {
        return Err("must be at most 64 characters");
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err("may contain only letters, digits, '.', '_' and '-'");
    }
    Ok(())
}

pub fn is_member_id(value: &str) -> bool {
    check_member_id(value).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_ids_follow_the_identity_rule() {
        assert!(is_member_id("alice"));
        assert!(is_member_id("A.b_c-9"));
        assert!(is_member_id(&"x".repeat(64)));
        assert!(!is_member_id(""));
        assert!(!is_member_id(&"x".repeat(65)));
        assert!(!is_member_id("al ice"));
        assert!(!is_member_id("{alice}"));
        assert!(!is_member_id("bob:1"));
        assert!(!is_member_id("élodie"));
    }

    #[test]
    fn text_counts_unicode_scalar_values_not_bytes() {
        let mut checks = Checks::new();
        // 200 characters, 400 bytes.
        checks.text("subject", &"é".repeat(200), true, 200);
        assert!(checks.is_empty());
        checks.text("subject", &"é".repeat(201), true, 200);
        let err = checks.finish().unwrap_err();
        assert!(err.to_string().contains("subject"));
    }

    #[test]
    fn blank_required_text_is_refused() {
        let mut checks = Checks::new();
        checks.text("body", "   ", true, 10);
        assert!(checks.finish().is_err());
    }

    #[test]
    fn text_with_a_nul_character_is_refused() {
        let mut checks = Checks::new();
        checks.text("reason", "top-up\0", true, 200);
        let error = checks.finish().unwrap_err();
        assert!(format!("{error:?}").contains("NUL"), "{error:?}");
        let mut checks = Checks::new();
        checks.text("reason", "line one\nline two\ttab", true, 200);
        assert!(checks.finish().is_ok());
    }

    #[test]
    fn request_id_is_required_and_bounded() {
        for bad in ["", "has space", &"r".repeat(129)] {
            let mut checks = Checks::new();
            checks.request_id(bad);
            assert!(checks.finish().is_err(), "{bad:?} accepted");
        }
        let mut checks = Checks::new();
        checks.request_id("0b9f7c1e-8f5c-4c9e-9a57-3f1b2f0f2a11");
        assert!(checks.finish().is_ok());
    }
}
