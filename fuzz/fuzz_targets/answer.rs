//! Upstream answers of any shape (see `kleingate_verda::fuzz_checks`): an upstream is input too.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kleingate_verda::fuzz_checks::answer(data));
