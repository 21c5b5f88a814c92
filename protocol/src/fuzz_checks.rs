//! The properties the fuzz targets check, shared with the regression test that replays their
//! seeds and every input they ever failed on (`protocol/tests/fuzz_regressions.rs`), so a crash
//! found on nightly stays covered by `cargo test` on stable. Each function panics on a violation.

use crate::{image_check, GenerateRequest, Limits, Model};

/// Parsing and validation of arbitrary bytes never panics, and an accepted request keeps the
/// invariants the gateway relies on: within the limits, a cache key for it, and its upstream JSON
/// parses back to the same request (what we forward is what we validated).
pub fn request(data: &[u8]) {
    let limits = Limits {
        max_input_image_bytes: 4096,
        ..Limits::default()
    };
    for path in [None, Some(Model::KleinBase9b)] {
        let Ok(req) = GenerateRequest::from_json(data, path, Model::Klein4b, &limits) else {
            continue;
        };
        assert!(req.width >= limits.min_side && req.width <= limits.max_side);
        assert!(req.height >= limits.min_side && req.height <= limits.max_side);
        assert!(u64::from(req.width) * u64::from(req.height) <= limits.max_pixels);
        assert!(req.prompt.len() <= limits.max_prompt_bytes);
        assert!(req.input_images.len() <= limits.max_input_images);
        let _ = req.cache_key(req.seed.unwrap_or(0), None);
        let upstream = serde_json::to_vec(&req.to_upstream_json()).expect("serialises");
        let again = GenerateRequest::from_json(&upstream, Some(req.model), Model::Klein4b, &limits)
            .expect("the upstream body of a valid request is valid");
        let mut expected = req.clone();
        expected.enable_base64_output = false;
        assert_eq!(again, expected);
    }
}

/// Sniffing and bounded decoding never panic and never yield more pixels than the limit.
pub fn image(data: &[u8]) {
    const MAX_PIXELS: u64 = 1 << 20;
    if let Ok(info) = image_check::inspect(data, MAX_PIXELS) {
        assert!(u64::from(info.width) * u64::from(info.height) <= MAX_PIXELS);
    }
    if let Ok(img) = image_check::decode(data, MAX_PIXELS) {
        assert!(u64::from(img.width()) * u64::from(img.height()) <= MAX_PIXELS);
    }
}
