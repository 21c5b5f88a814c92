//! The canonical cache key.
//!
//! Key = SHA-256 over a versioned, length-prefixed encoding of the *parsed* request, never the raw
//! JSON, so key order, whitespace, omitted defaults and data-URL prefixes do not matter. The layout
//! (all integers big-endian, strings as `u32 length ‖ UTF-8 bytes`):
//!
//! ```text
//! "kleingate-cache-v1"  model-id  prompt  seed:u64  width:u32  height:u32  num_steps:u32
//!   (width/height 0 = left open on an editing request)
//! guidance:f64-bits  n_images:u32  (image-digest:32 bytes)*n  output-format  output-quality:u8
//! enable-safety-checker:u8  backend-pin
//! ```
//!
//! `enable_base64_output` is not part of the key: the cache holds image bytes and the response shape
//! is built per request. `backend-pin` is the backend the client forced (empty when any backend may
//! answer), because backends do not produce bit-identical images. Changing anything here means
//! bumping [`CACHE_KEY_VERSION`]; the test `key_is_stable_across_versions` pins a known digest.

use sha2::{Digest, Sha256};

use crate::GenerateRequest;

pub const CACHE_KEY_VERSION: &str = "kleingate-cache-v1";

#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(pub [u8; 32]);

impl std::fmt::Display for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "CacheKey({self})")
    }
}

fn put_str(h: &mut Sha256, s: &str) {
    h.update((s.len() as u32).to_be_bytes());
    h.update(s.as_bytes());
}

impl GenerateRequest {
    /// The key of this request when generated with `seed` (the request's own seed, or the one a
    /// backend reported for an unseeded request). `partition` separates entries that must not be
    /// shared (the gateway's: a forced backend, a key's backend scope).
    pub fn cache_key(&self, seed: u64, partition: Option<&str>) -> CacheKey {
        let mut h = Sha256::new();
        put_str(&mut h, CACHE_KEY_VERSION);
        put_str(&mut h, self.model.id());
        put_str(&mut h, &self.prompt);
        h.update(seed.to_be_bytes());
        // A side left open on an editing request is 0: its size comes from the first reference,
        // whose digest is in the key. Text-to-image requests always have both sides given.
        h.update((if self.width_given { self.width } else { 0 }).to_be_bytes());
        h.update((if self.height_given { self.height } else { 0 }).to_be_bytes());
        h.update(self.num_steps.to_be_bytes());
        // +0.0 so that -0.0 and 0.0 (equal guidance) share a key.
        h.update((self.guidance + 0.0).to_bits().to_be_bytes());
        h.update((self.input_images.len() as u32).to_be_bytes());
        for img in &self.input_images {
            h.update(img.digest());
        }
        put_str(&mut h, self.output_format.as_str());
        h.update([self.output_quality, u8::from(self.enable_safety_checker)]);
        put_str(&mut h, partition.unwrap_or(""));
        CacheKey(h.finalize().into())
    }
}

#[cfg(test)]
mod tests {
    use crate::{GenerateRequest, Limits, Model};

    fn req(json: &str) -> GenerateRequest {
        GenerateRequest::from_json(json.as_bytes(), None, Model::Klein4b, &Limits::default())
            .unwrap()
    }

    #[test]
    fn key_is_stable_across_versions() {
        // Pinned to a digest computed independently (Python hashlib over the layout documented at
        // the top of this file). If it changes, deployed caches are silently invalidated: bump the
        // version instead.
        let k = req(r#"{"prompt":"a red fox","seed":42}"#).cache_key(42, None);
        assert_eq!(
            k.to_string(),
            "79d58e91ae8f990a67e76b431d91a94bb6f2a2224b268c1630f49e22c427f76e"
        );
    }

    #[test]
    fn key_ignores_spelling_but_not_meaning() {
        let a = req(r#"{"prompt":"a red fox","seed":42}"#);
        let b = req(
            r#"{ "seed": 42, "width": 1024, "prompt": "a red fox", "num_steps": 4,
                       "output_quality": 95, "enable_base64_output": true }"#,
        );
        assert_eq!(a.cache_key(42, None), b.cache_key(42, None));
        for other in [
            r#"{"prompt":"a red fox ","seed":42}"#,
            r#"{"prompt":"a red fox","seed":42,"width":1040}"#,
            r#"{"prompt":"a red fox","seed":42,"height":784}"#,
            r#"{"prompt":"a red fox","seed":42,"output_format":"png"}"#,
            r#"{"prompt":"a red fox","seed":42,"output_quality":94}"#,
            r#"{"prompt":"a red fox","seed":42,"enable_safety_checker":false}"#,
            r#"{"prompt":"a red fox","seed":42,"model":"flux2-klein-9b"}"#,
            r#"{"prompt":"a red fox","seed":42,"input_images":["https://a/b.png"]}"#,
        ] {
            assert_ne!(
                a.cache_key(42, None),
                req(other).cache_key(42, None),
                "{other}"
            );
        }
        assert_ne!(a.cache_key(42, None), a.cache_key(43, None));
        assert_ne!(a.cache_key(42, None), a.cache_key(42, Some("local")));
        let base = req(r#"{"prompt":"x","model":"flux2-klein-base-4b","num_steps":20}"#);
        let base2 = req(r#"{"prompt":"x","model":"flux2-klein-base-4b","num_steps":21}"#);
        assert_ne!(base.cache_key(1, None), base2.cache_key(1, None));
    }
}
