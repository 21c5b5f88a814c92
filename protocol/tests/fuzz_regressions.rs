//! Replays the fuzz targets' seeds and every input they ever failed on (`fuzz/regressions/`)
//! through the same checks, on the stable toolchain, in every `cargo test`.

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut n = 0;
    for dir in ["seeds", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries {
            let path = e.expect("dir entry").path();
            let data = std::fs::read(&path).expect("read input");
            let r = std::panic::catch_unwind(|| check(&data));
            assert!(r.is_ok(), "{} fails the {target} check", path.display());
            n += 1;
        }
    }
    assert!(n > 0, "no inputs found for {target}");
}

#[test]
fn request_inputs_pass() {
    replay("request", kleingate_protocol::fuzz_checks::request);
}

#[test]
fn image_inputs_pass() {
    replay("image", kleingate_protocol::fuzz_checks::image);
}
