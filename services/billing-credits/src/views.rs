//! How billing's stored records look on the wire.

use inmail_shared::ApiError;
use inmail_shared::contract::proto::billing::v1 as pb;
use inmail_shared::contract::time::ms_to_timestamp;

use crate::store::{
    BalanceView, DebitState, DebitView, EntryKind, ReleaseCause, Reply, StoredEntry,
};

/// The balance right after a change, as the script answered it.
pub fn balance_after(reply: &Reply) -> i64 {
    reply
        .balance_after
        .or_else(|| reply.balance.as_ref().map(|b| b.available))
        .unwrap_or(0)
}

/// The debit a script answered.
pub fn debit_of(reply: &Reply, member: &str, message_id: &str) -> Result<pb::Debit, ApiError> {
    let view = reply
        .debit
        .as_ref()
        .ok_or_else(|| ApiError::internal("script answered no debit"))?;
    Ok(debit(view, member, message_id))
}

pub fn debit(view: &DebitView, member: &str, message_id: &str) -> pb::Debit {
    let state = match view.state {
        DebitState::Held => pb::DebitState::Held,
        DebitState::Confirmed => pb::DebitState::Confirmed,
        DebitState::Released => pb::DebitState::Released,
        DebitState::Refunded => pb::DebitState::Refunded,
    };
    let release_reason = match view.reason {
        Some(ReleaseCause::MessageNotStored) => pb::ReleaseReason::MessageNotStored,
        Some(ReleaseCause::HoldExpired) => pb::ReleaseReason::HoldExpired,
        Some(ReleaseCause::Abandoned) => pb::ReleaseReason::Abandoned,
        None => pb::ReleaseReason::Unspecified,
    };
    pb::Debit {
        member_id: member.to_string(),
        message_id: message_id.to_string(),
        amount: view.amount as i32,
        state: state as i32,
        debited_at: ms_to_timestamp(view.debited_at),
        hold_expires_at: ms_to_timestamp(view.expires_at),
        confirmed_at: ms_to_timestamp(view.confirmed_at),
        refundable_until: ms_to_timestamp(view.refundable_until),
        returned_at: ms_to_timestamp(view.returned_at),
        release_reason: release_reason as i32,
    }
}

pub fn balance(member: &str, view: &BalanceView) -> pb::Balance {
    pb::Balance {
        member_id: member.to_string(),
        plan_id: view.plan.clone(),
        available: view.available,
        monthly_credits: view.monthly as i32,
        rollover_cap: view.cap as i32,
        cycle_start: ms_to_timestamp(view.cstart),
        cycle_end: ms_to_timestamp(view.cend),
        debited_this_cycle: view.debited,
        refunded_this_cycle: view.refunded,
        released_this_cycle: view.released,
        granted_this_cycle: view.granted,
        plan_version: view.ver,
    }
}

pub fn entry(entry: &StoredEntry) -> pb::LedgerEntry {
    let kind = match entry.kind {
        Some(EntryKind::Renewal) => pb::LedgerEntryKind::Renewal,
        Some(EntryKind::Debit) => pb::LedgerEntryKind::Debit,
        Some(EntryKind::Release) => pb::LedgerEntryKind::Release,
        Some(EntryKind::Refund) => pb::LedgerEntryKind::Refund,
        Some(EntryKind::Grant) => pb::LedgerEntryKind::Grant,
        Some(EntryKind::WriteOff) => pb::LedgerEntryKind::WriteOff,
        Some(EntryKind::PlanChange) => pb::LedgerEntryKind::PlanChange,
        None => pb::LedgerEntryKind::Unspecified,
    };
    pb::LedgerEntry {
        entry_id: entry.id.clone(),
        kind: kind as i32,
        amount: entry.amount,
        balance_after: entry.balance_after,
        occurred_at: ms_to_timestamp(entry.at_ms),
        message_id: entry.message_id.clone(),
        request_id: entry.request_id.clone(),
        plan_id: entry.plan_id.clone(),
        plan_version: entry.plan_version,
        cycle_index: entry.cycle_index,
        note: entry.note.clone(),
    }
}
