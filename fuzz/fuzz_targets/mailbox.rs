//! What a guest writes into the mailbox: decoded into a command frame or
//! refused; a frame that decodes encodes back to one that decodes the same.

#![no_main]

use wire::mailbox::{decode, encode};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((seq, payload)) = decode(data) {
        let framed = encode(seq, payload, 4096);
        let (seq2, payload2) = decode(&framed).expect("an encoded frame decodes");
        assert_eq!((seq2, payload2), (seq, payload));
    }
});
