//! Request parsing and validation on arbitrary bytes (see `kleingate_protocol::fuzz_checks`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kleingate_protocol::fuzz_checks::request(data));
