//! Control-socket request lines as any client may send them: parsed into a
//! command, or refused with a reason.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(line) = std::str::from_utf8(data) {
        if let Err(why) = wire::control::parse_request(line) {
            assert!(!why.is_empty());
        }
    }
});
