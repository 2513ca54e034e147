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
