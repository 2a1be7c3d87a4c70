//! DIMSE command sets (PS3.7 §9.3, §E): always Implicit VR Little Endian, group 0000 only.
//!
//! A tiny hand-written codec rather than a general data set parser: command sets are flat, small
//! and fully specified, and this code sees raw network bytes, so it must be simple enough to fuzz
//! and to trust.

use std::collections::BTreeMap;

/// Command Field values (PS3.7 §E.1).
pub mod field {
    pub const C_STORE_RQ: u16 = 0x0001;
    pub const C_STORE_RSP: u16 = 0x8001;
    pub const C_GET_RQ: u16 = 0x0010;
    pub const C_FIND_RQ: u16 = 0x0020;
    pub const C_MOVE_RQ: u16 = 0x0021;
    pub const C_ECHO_RQ: u16 = 0x0030;
    pub const C_GET_RSP: u16 = 0x8010;
    pub const C_FIND_RSP: u16 = 0x8020;
    pub const C_MOVE_RSP: u16 = 0x8021;
    pub const C_ECHO_RSP: u16 = 0x8030;
    pub const C_CANCEL_RQ: u16 = 0x0FFF;
}

/// Command element tags, as (group << 16 | element).
pub mod tag {
    pub const GROUP_LENGTH: u32 = 0x0000_0000;
    pub const AFFECTED_SOP_CLASS_UID: u32 = 0x0000_0002;
    pub const COMMAND_FIELD: u32 = 0x0000_0100;
    pub const MESSAGE_ID: u32 = 0x0000_0110;
    pub const MESSAGE_ID_BEING_RESPONDED_TO: u32 = 0x0000_0120;
    pub const MOVE_DESTINATION: u32 = 0x0000_0600;
    pub const PRIORITY: u32 = 0x0000_0700;
    pub const COMMAND_DATA_SET_TYPE: u32 = 0x0000_0800;
    pub const STATUS: u32 = 0x0000_0900;
    pub const ERROR_COMMENT: u32 = 0x0000_0902;
    pub const AFFECTED_SOP_INSTANCE_UID: u32 = 0x0000_1000;
    pub const MOVE_ORIGINATOR_AE_TITLE: u32 = 0x0000_1030;
    pub const MOVE_ORIGINATOR_MESSAGE_ID: u32 = 0x0000_1031;
    pub const REMAINING_SUBOPERATIONS: u32 = 0x0000_1020;
    pub const COMPLETED_SUBOPERATIONS: u32 = 0x0000_1021;
    pub const FAILED_SUBOPERATIONS: u32 = 0x0000_1022;
    pub const WARNING_SUBOPERATIONS: u32 = 0x0000_1023;
}

/// Command Data Set Type (0000,0800) value meaning "no data set follows".
pub const NO_DATA_SET: u16 = 0x0101;

/// Why a command set could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommandError {
    #[error("command set truncated at byte {offset}")]
    Truncated { offset: usize },
    #[error("element ({group:04X},{element:04X}) outside group 0000 in command set")]
    NotCommandGroup { group: u16, element: u16 },
    #[error("command set lacks {what}")]
    Missing { what: &'static str },
    #[error("command element {what} has a malformed value")]
    Malformed { what: &'static str },
}

/// A decoded command set: raw values by tag.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Command {
    elements: BTreeMap<u32, Vec<u8>>,
}

impl Command {
    /// Decodes an Implicit VR LE command set.
    pub fn decode(bytes: &[u8]) -> Result<Command, CommandError> {
        let mut elements = BTreeMap::new();
        let mut pos = 0usize;
        while pos < bytes.len() {
            let header = bytes
                .get(pos..pos + 8)
                .ok_or(CommandError::Truncated { offset: pos })?;
            let group = u16::from_le_bytes([header[0], header[1]]);
            let element = u16::from_le_bytes([header[2], header[3]]);
            let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
            if group != 0 {
                return Err(CommandError::NotCommandGroup { group, element });
            }
            let start = pos + 8;
            let value = start
                .checked_add(len)
                .and_then(|end| bytes.get(start..end))
                .ok_or(CommandError::Truncated { offset: start })?;
            elements.insert(u32::from(element), value.to_vec());
            pos = start + len;
        }
        let cmd = Command { elements };
        cmd.command_field()?;
        Ok(cmd)
    }

    fn raw(&self, tag: u32) -> Option<&[u8]> {
        self.elements.get(&tag).map(Vec::as_slice)
    }

    /// A US value.
    pub fn u16(&self, tag: u32, what: &'static str) -> Result<Option<u16>, CommandError> {
        match self.raw(tag) {
            None => Ok(None),
            Some([a, b]) => Ok(Some(u16::from_le_bytes([*a, *b]))),
            Some(_) => Err(CommandError::Malformed { what }),
        }
    }

    /// A string value (UI, AE, LO…), trailing NUL and space padding removed.
    pub fn string(&self, tag: u32) -> Option<String> {
        self.raw(tag).map(|v| {
            String::from_utf8_lossy(v)
                .trim_end_matches(['\0', ' '])
                .trim_start_matches(' ')
                .to_string()
        })
    }

    pub fn command_field(&self) -> Result<u16, CommandError> {
        self.u16(tag::COMMAND_FIELD, "CommandField")?
            .ok_or(CommandError::Missing {
                what: "CommandField (0000,0100)",
            })
    }

    pub fn message_id(&self) -> Result<u16, CommandError> {
        self.u16(tag::MESSAGE_ID, "MessageID")?
            .ok_or(CommandError::Missing {
                what: "MessageID (0000,0110)",
            })
    }

    /// Whether a data set follows this command (PS3.7 §E.1: any value other than 0101H).
    pub fn has_data_set(&self) -> Result<bool, CommandError> {
        Ok(self
            .u16(tag::COMMAND_DATA_SET_TYPE, "CommandDataSetType")?
            .ok_or(CommandError::Missing {
                what: "CommandDataSetType (0000,0800)",
            })?
            != NO_DATA_SET)
    }
}

/// A C-STORE-RQ command set (PS3.7 §9.3.1.1), for C-MOVE and C-GET sub-operations.
/// `move_originator`: the C-MOVE requestor's AE title and message ID.
pub fn store_rq(
    sop_class_uid: &str,
    sop_instance_uid: &str,
    message_id: u16,
    move_originator: Option<(&str, u16)>,
) -> Vec<u8> {
    let mut rq = CommandBuilder::new()
        .uid(tag::AFFECTED_SOP_CLASS_UID, sop_class_uid)
        .u16(tag::COMMAND_FIELD, field::C_STORE_RQ)
        .u16(tag::MESSAGE_ID, message_id)
        .u16(tag::PRIORITY, 0)
        .u16(tag::COMMAND_DATA_SET_TYPE, 0x0000)
        .uid(tag::AFFECTED_SOP_INSTANCE_UID, sop_instance_uid);
    if let Some((ae, id)) = move_originator {
        rq = rq
            .text(tag::MOVE_ORIGINATOR_AE_TITLE, ae, 16)
            .u16(tag::MOVE_ORIGINATOR_MESSAGE_ID, id);
    }
    rq.encode()
}

/// Builds a command set; the group length is computed at `encode`.
#[derive(Debug, Default)]
pub struct CommandBuilder {
    elements: BTreeMap<u32, Vec<u8>>,
}

impl CommandBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn u16(mut self, tag: u32, value: u16) -> Self {
        self.elements.insert(tag, value.to_le_bytes().to_vec());
        self
    }

    /// A UI value: padded to even length with NUL (PS3.5 §6.2).
    pub fn uid(mut self, tag: u32, value: &str) -> Self {
        let mut v = value.as_bytes().to_vec();
        if v.len() % 2 == 1 {
            v.push(0);
        }
        self.elements.insert(tag, v);
        self
    }

    /// A text value (AE, LO): padded to even length with a space. Truncated to `max` bytes.
    pub fn text(mut self, tag: u32, value: &str, max: usize) -> Self {
        let mut v: Vec<u8> = value
            .bytes()
            .filter(|b| (0x20..0x7f).contains(b))
            .take(max)
            .collect();
        if v.len() % 2 == 1 {
            v.push(b' ');
        }
        self.elements.insert(tag, v);
        self
    }

    pub fn encode(self) -> Vec<u8> {
        let body_len: usize = self
            .elements
            .iter()
            .filter(|(t, _)| **t != tag::GROUP_LENGTH)
            .map(|(_, v)| 8 + v.len())
            .sum();
        let mut out = Vec::with_capacity(12 + body_len);
        out.extend_from_slice(&[0, 0, 0, 0, 4, 0, 0, 0]);
        out.extend_from_slice(&(body_len as u32).to_le_bytes());
        for (t, v) in self
            .elements
            .iter()
            .filter(|(t, _)| **t != tag::GROUP_LENGTH)
        {
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(&((*t & 0xFFFF) as u16).to_le_bytes());
            out.extend_from_slice(&(v.len() as u32).to_le_bytes());
            out.extend_from_slice(v);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_rq_carries_the_move_originator() {
        let c = Command::decode(&store_rq("1.2.3", "4.5.6", 9, Some(("MOVESCU", 3)))).unwrap();
        assert_eq!(c.command_field().unwrap(), field::C_STORE_RQ);
        assert_eq!(c.message_id().unwrap(), 9);
        assert!(c.has_data_set().unwrap());
        assert_eq!(c.string(tag::AFFECTED_SOP_INSTANCE_UID).unwrap(), "4.5.6");
        assert_eq!(c.string(tag::MOVE_ORIGINATOR_AE_TITLE).unwrap(), "MOVESCU");
        assert_eq!(
            c.u16(tag::MOVE_ORIGINATOR_MESSAGE_ID, "id").unwrap(),
            Some(3)
        );
        let plain = Command::decode(&store_rq("1.2.3", "4.5.6", 1, None)).unwrap();
        assert_eq!(plain.string(tag::MOVE_ORIGINATOR_AE_TITLE), None);
    }

    #[test]
    fn round_trip_with_group_length() {
        let bytes = CommandBuilder::new()
            .uid(tag::AFFECTED_SOP_CLASS_UID, "1.2.840.10008.1.1")
            .u16(tag::COMMAND_FIELD, field::C_ECHO_RSP)
            .u16(tag::MESSAGE_ID_BEING_RESPONDED_TO, 7)
            .u16(tag::COMMAND_DATA_SET_TYPE, NO_DATA_SET)
            .u16(tag::STATUS, 0)
            .encode();
        // Group length counts every byte after itself.
        let gl = u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize;
        assert_eq!(gl, bytes.len() - 12);
        let cmd = Command::decode(&bytes).unwrap();
        assert_eq!(cmd.command_field().unwrap(), field::C_ECHO_RSP);
        assert_eq!(
            cmd.string(tag::AFFECTED_SOP_CLASS_UID).unwrap(),
            "1.2.840.10008.1.1"
        );
        assert!(!cmd.has_data_set().unwrap());
    }

    proptest::proptest! {
        /// Command sets come off the network: arbitrary bytes decode or fail, never panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            if let Ok(cmd) = Command::decode(&bytes) {
                let _ = (cmd.message_id(), cmd.has_data_set(), cmd.string(tag::AFFECTED_SOP_CLASS_UID));
            }
        }
    }

    #[test]
    fn rejects_truncation_and_foreign_groups() {
        let bytes = CommandBuilder::new().u16(tag::COMMAND_FIELD, 1).encode();
        assert!(matches!(
            Command::decode(&bytes[..bytes.len() - 1]),
            Err(CommandError::Truncated { .. })
        ));
        let mut other = bytes.clone();
        other.extend_from_slice(&[8, 0, 0x18, 0, 0, 0, 0, 0]);
        assert!(matches!(
            Command::decode(&other),
            Err(CommandError::NotCommandGroup { .. })
        ));
        let no_field = CommandBuilder::new().u16(tag::MESSAGE_ID, 1).encode();
        assert!(matches!(
            Command::decode(&no_field),
            Err(CommandError::Missing { .. })
        ));
        // A huge length must not overflow or panic.
        let huge = [0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff];
        assert!(Command::decode(&huge).is_err());
    }
}
