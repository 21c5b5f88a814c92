//! Image sniffing and bounded decoding on arbitrary bytes (see `kleingate_protocol::fuzz_checks`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kleingate_protocol::fuzz_checks::image(data));
