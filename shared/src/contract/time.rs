//! Conversions between chrono, epoch milliseconds and `google.protobuf.Timestamp`.

use chrono::{DateTime, TimeZone, Utc};

pub fn to_timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    }
}

/// `None` for a timestamp outside chrono's range or with invalid nanos.
pub fn from_timestamp(ts: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    if !(0..1_000_000_000).contains(&ts.nanos) {
        return None;
    }
    Utc.timestamp_opt(ts.seconds, ts.nanos as u32).single()
}

/// Epoch milliseconds to a Timestamp; 0 or less means "not set".
pub fn ms_to_timestamp(ms: i64) -> Option<prost_types::Timestamp> {
    (ms > 0).then(|| prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn millis_convert_exactly() {
        let ts = ms_to_timestamp(1_700_000_000_123).unwrap();
        assert_eq!(ts.seconds, 1_700_000_000);
        assert_eq!(ts.nanos, 123_000_000);
        assert_eq!(
            from_timestamp(&ts).unwrap().timestamp_millis(),
            1_700_000_000_123
        );
        assert!(ms_to_timestamp(0).is_none());
    }

    #[test]
    fn invalid_nanos_are_refused() {
        let ts = prost_types::Timestamp {
            seconds: 1,
            nanos: -5,
        };
        assert!(from_timestamp(&ts).is_none());
    }
}
