//! Replays the `answer` fuzz target's seeds and every input it ever failed on
//! (`fuzz/regressions/answer/`) through the same check, on stable, in every `cargo test`.

use std::path::Path;

#[test]
fn upstream_answers_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut n = 0;
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join("answer")) else {
            continue;
        };
        for e in entries {
            let path = e.expect("dir entry").path();
            let data = std::fs::read(&path).expect("read input");
            let r = std::panic::catch_unwind(|| kleingate_verda::fuzz_checks::answer(&data));
            assert!(r.is_ok(), "{} fails the answer check", path.display());
            n += 1;
        }
    }
    assert!(n >= 4, "only {n} inputs found");
}
