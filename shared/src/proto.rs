//! The generated gRPC contracts of `proto/inmail/**`. No service hand-writes a
//! message type: they all come from here.

/// Encoded `FileDescriptorSet` of every InMail proto, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/inmail_descriptor.bin"));

pub mod plans {
    pub mod v1 {
        tonic::include_proto!("inmail.plans.v1");
    }
}

pub mod billing {
    pub mod v1 {
        tonic::include_proto!("inmail.billing.v1");
    }
}

pub mod messaging {
    pub mod v1 {
        tonic::include_proto!("inmail.messaging.v1");
    }
}

pub mod testclock {
    pub mod v1 {
        tonic::include_proto!("inmail.testclock.v1");
    }
}

crate::mutations!(
    plans::v1::SubscribeRequest,
    plans::v1::ChangePlanRequest,
    plans::v1::CancelSubscriptionRequest,
    plans::v1::ClearScheduledChangeRequest,
    plans::v1::SetOpenProfileRequest,
    billing::v1::DebitForMessageRequest,
    billing::v1::ConfirmDebitRequest,
    billing::v1::ReleaseDebitRequest,
    billing::v1::RefundMessageRequest,
    billing::v1::GrantCreditsRequest,
    messaging::v1::SendInvitationRequest,
    messaging::v1::AcceptInvitationRequest,
    messaging::v1::IgnoreInvitationRequest,
    messaging::v1::WithdrawInvitationRequest,
    messaging::v1::AddConnectionRequest,
    messaging::v1::RemoveConnectionRequest,
    messaging::v1::BlockMemberRequest,
    messaging::v1::UnblockMemberRequest,
    messaging::v1::SetInmailPreferenceRequest,
    messaging::v1::SendMessageRequest,
    messaging::v1::RespondToInmailRequest,
    testclock::v1::AdvanceTimeRequest,
    testclock::v1::SetTimeRequest,
);
