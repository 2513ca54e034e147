//! The outbox: sends and refunds a process must finish, indexed in
//! [`keys::OUTBOX_SHARDS`](super::keys::OUTBOX_SHARDS) sorted sets by when to
//! look at them, so the sweeper finishes them if that process dies.

/// Work the sweeper finishes if the process handling it died.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboxItem {
    /// A staged InMail: deliver it or give it up, by its debit's state.
    Send {
        conv: String,
        message_id: String,
        sender: String,
    },
    /// An InMail's refund that is due.
    Refund {
        conv: String,
        inmail_id: String,
        sender: String,
    },
}

impl OutboxItem {
    /// As stored: `send|conv|id|sender` or `refund|conv|id|sender` (ids and
    /// member ids contain no '|').
    pub fn encode(&self) -> String {
        match self {
            Self::Send {
                conv,
                message_id,
                sender,
            } => format!("send|{conv}|{message_id}|{sender}"),
            Self::Refund {
                conv,
                inmail_id,
                sender,
            } => format!("refund|{conv}|{inmail_id}|{sender}"),
        }
    }

    pub fn decode(value: &str) -> Option<Self> {
        let mut parts = value.split('|');
        let (kind, conv, id, sender) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let (conv, id, sender) = (conv.to_string(), id.to_string(), sender.to_string());
        match kind {
            "send" => Some(Self::Send {
                conv,
                message_id: id,
                sender,
            }),
            "refund" => Some(Self::Refund {
                conv,
                inmail_id: id,
                sender,
            }),
            _ => None,
        }
    }

    pub fn conv(&self) -> &str {
        match self {
            Self::Send { conv, .. } | Self::Refund { conv, .. } => conv,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_items_round_trip() {
        for item in [
            OutboxItem::Send {
                conv: "a~b".into(),
                message_id: "m-1".into(),
                sender: "a".into(),
            },
            OutboxItem::Refund {
                conv: "a~b".into(),
                inmail_id: "m-2".into(),
                sender: "b".into(),
            },
        ] {
            assert_eq!(OutboxItem::decode(&item.encode()), Some(item));
        }
        assert_eq!(OutboxItem::decode("bogus|x"), None);
    }
}
