//! DIMSE command sets arrive from the network: decoding and the field accessors the service
//! uses must refuse any input without panicking.
#![no_main]

use dicomchain::dimse::command::{field, tag, Command};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(cmd) = Command::decode(data) else {
        return;
    };
    let _ = cmd.command_field();
    let _ = cmd.message_id();
    let _ = cmd.has_data_set();
    let _ = cmd.string(tag::AFFECTED_SOP_CLASS_UID);
    let _ = cmd.string(tag::AFFECTED_SOP_INSTANCE_UID);
    let _ = cmd.string(tag::MOVE_DESTINATION);
    let _ = cmd.u16(tag::PRIORITY, "Priority");
    let _ = field::C_STORE_RQ;
});
