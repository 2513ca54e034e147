//! Request checks shared by messaging's RPCs: member pairs and the
//! conversation a member asks about.

use inmail_shared::ApiError;
use inmail_shared::contract::validate::Checks;

use crate::domain;
use crate::error::conversation_not_found;

/// Checks a conversation id a member asks about; answers its members.
pub fn member_conversation(
    checks: &mut Checks,
    member: &str,
    conversation_id: &str,
) -> Option<(String, String)> {
    checks.member_id("member_id", member);
    if conversation_id.is_empty() {
        checks.add("conversation_id", "is required");
        return None;
    }
    match domain::conversation_members(conversation_id) {
        Some((a, b)) => Some((a.to_string(), b.to_string())),
        None => {
            checks.add(
                "conversation_id",
                "is not a conversation id (as returned by this service)",
            );
            None
        }
    }
}

/// The member must be one of the conversation's two; answers the other.
pub fn other_member<'a>(member: &str, (a, b): &'a (String, String)) -> Result<&'a str, ApiError> {
    if member == a {
        Ok(b)
    } else if member == b {
        Ok(a)
    } else {
        Err(conversation_not_found())
    }
}

pub fn check_pair(
    checks: &mut Checks,
    member_field: &str,
    member: &str,
    other_field: &str,
    other: &str,
) {
    checks
        .member_id(member_field, member)
        .member_id(other_field, other);
    if !member.is_empty() && member == other {
        checks.add(other_field, format!("must differ from {member_field}"));
    }
}

pub fn request_and_pair(
    request_id: &str,
    member_field: &str,
    member: &str,
    other_field: &str,
    other: &str,
) -> Result<(), ApiError> {
    let mut checks = Checks::new();
    checks.request_id(request_id);
    check_pair(&mut checks, member_field, member, other_field, other);
    checks.finish()
}
