//! A [`CachedImage`] as one Redis value: a magic tag, the length of a JSON header, the header
//! (what the answer's headers need) and the encoded image bytes as they are (no base64).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use kleingate_backend::GeneratedImage;
use kleingate_protocol::OutputFormat;
use serde::{Deserialize, Serialize};

use crate::cache::CachedImage;

/// Bumped when the layout changes: replicas of two versions then miss each other's entries
/// instead of misreading them.
const MAGIC: &[u8; 4] = b"KGI1";

#[derive(Serialize, Deserialize)]
struct Header {
    format: OutputFormat,
    seed: Option<u64>,
    nsfw: bool,
    image_cost_usd: Option<f64>,
    backend: String,
    backend_time_secs: f64,
    cost_usd: f64,
}

pub(super) fn encode(v: &CachedImage) -> Vec<u8> {
    let header = Header {
        format: v.image.format,
        seed: v.image.seed,
        nsfw: v.image.has_nsfw_content,
        image_cost_usd: v.image.cost_usd,
        backend: v.backend.to_string(),
        backend_time_secs: v.backend_time.as_secs_f64(),
        cost_usd: v.cost_usd,
    };
    // Serializing a struct of plain fields cannot fail.
    let h = serde_json::to_vec(&header).unwrap_or_default();
    let mut out = Vec::with_capacity(8 + h.len() + v.image.bytes.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&u32::try_from(h.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(&v.image.bytes);
    out
}

/// `None` for anything that is not a whole entry of this layout.
pub(super) fn decode(raw: &[u8]) -> Option<CachedImage> {
    let rest = raw.strip_prefix(MAGIC)?;
    let (len, rest) = rest.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
    if rest.len() < len {
        return None;
    }
    let (h, bytes) = rest.split_at(len);
    let h: Header = serde_json::from_slice(h).ok()?;
    if bytes.is_empty() {
        return None;
    }
    Some(CachedImage {
        image: GeneratedImage {
            bytes: Bytes::copy_from_slice(bytes),
            format: h.format,
            seed: h.seed,
            has_nsfw_content: h.nsfw,
            cost_usd: h.image_cost_usd,
        },
        backend: Arc::from(h.backend),
        backend_time: Duration::try_from_secs_f64(h.backend_time_secs).unwrap_or_default(),
        cost_usd: h.cost_usd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_comes_back_whole_and_damage_is_a_miss() {
        let v = CachedImage {
            image: GeneratedImage {
                bytes: Bytes::from_static(b"\xff\xd8 not really a jpeg \xff\xd9"),
                format: OutputFormat::Webp,
                seed: Some(u64::MAX),
                has_nsfw_content: true,
                cost_usd: Some(0.0125),
            },
            backend: Arc::from("gpu"),
            backend_time: Duration::from_millis(1234),
            cost_usd: 0.0125,
        };
        let raw = encode(&v);
        let back = decode(&raw).expect("decodes");
        assert_eq!(back.image, v.image);
        assert_eq!(&*back.backend, "gpu");
        assert_eq!(back.backend_time, v.backend_time);
        assert_eq!(back.cost_usd, v.cost_usd);
        // Truncated anywhere, another version's tag, or a bad header: a miss, never a panic.
        for cut in [0, 3, 7, 8, 20, raw.len() - v.image.bytes.len()] {
            assert!(decode(&raw[..cut]).is_none(), "cut at {cut}");
        }
        let mut other = raw.clone();
        other[3] = b'2';
        assert!(decode(&other).is_none());
        let mut bad = raw.clone();
        bad[9] = b'!';
        assert!(decode(&bad).is_none());
    }
}
