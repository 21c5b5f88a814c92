//! Reference images for editing and multi-reference generation, prepared as the diffusers klein
//! pipeline does: decode, convert to RGB, refuse sides under 64 px or an aspect ratio over 8, scale
//! down (Lanczos) to at most 1024x1024 pixels of area ([`load`]: the costly part, done before a
//! request reaches the engine), then centre-crop to multiples of 2 x the VAE scale factor (no
//! resize) and map to [-1, 1] ([`prepare`]).

use burn::tensor::{Device, Tensor, TensorData};
use image::imageops::FilterType;
pub use image::RgbImage;

use crate::error::EngineError;

/// Largest area of a reference after preprocessing (the reference pipeline's cap).
pub const MAX_REFERENCE_PIXELS: u64 = 1024 * 1024;
/// Decoding refuses images larger than this before allocating them.
pub const MAX_DECODE_PIXELS: u64 = 64 * 1024 * 1024;

#[derive(Clone, Debug)]
pub struct Prepared {
    pub width: usize,
    pub height: usize,
    /// `(1, 3, H, W)` in [-1, 1].
    pub pixels: Tensor<4>,
}

/// What the references of one request may cost to decode, checked on their headers before a
/// single pixel is decoded: a 700 KB PNG can declare 8192 x 8192 at 16 bits per channel (0.5 GB
/// and half a minute of decoding) for a picture the model scales down to 1 MP anyway.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DecodeLimits {
    /// Largest `width * height` of one reference.
    pub max_pixels: u64,
    /// Largest sum over the request's references of `width * height * bytes per pixel`.
    pub max_decoded_bytes: u64,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        DecodeLimits {
            // 16x the area the model uses: plenty for photos, nothing like a bomb.
            max_pixels: 4096 * 4096,
            max_decoded_bytes: 256 * 1024 * 1024,
        }
    }
}

fn bad(index: usize, msg: impl std::fmt::Display) -> EngineError {
    EngineError::Reference {
        index,
        message: msg.to_string(),
    }
}

/// Check what decoding `refs` would cost, from their headers only.
pub fn check_cost(refs: &[Vec<u8>], limits: DecodeLimits) -> Result<(), EngineError> {
    let mut total: u64 = 0;
    for (i, bytes) in refs.iter().enumerate() {
        let info = kleingate_protocol::image_check::inspect(
            bytes,
            limits.max_pixels.min(MAX_DECODE_PIXELS),
        )
        .map_err(|e| bad(i, e))?;
        total = total.saturating_add(info.decoded_bytes());
        if total > limits.max_decoded_bytes {
            return Err(bad(
                i,
                format!(
                    "decoding the input images would take {} MiB (this one is {}x{} at {} bytes per pixel); at most {} MiB per request",
                    total >> 20,
                    info.width,
                    info.height,
                    info.bytes_per_pixel,
                    limits.max_decoded_bytes >> 20
                ),
            ));
        }
    }
    Ok(())
}

/// Decode the encoded image `bytes` (reference number `index`, for error messages) as the
/// reference pipeline does before cropping: to RGB, refusing sides under 64 px and aspect ratios
/// over 8, scaled down (Lanczos) to at most [`MAX_REFERENCE_PIXELS`]. Costly: run it off the
/// engine's thread, after [`check_cost`].
pub fn load(bytes: &[u8], index: usize, max_pixels: u64) -> Result<RgbImage, EngineError> {
    let img = kleingate_protocol::image_check::decode(bytes, max_pixels.min(MAX_DECODE_PIXELS))
        .map_err(|e| bad(index, e))?;
    let mut rgb = img.to_rgb8();
    drop(img);
    let (w, h) = (rgb.width() as u64, rgb.height() as u64);
    if w < 64 || h < 64 {
        return Err(bad(
            index,
            format!("{w}x{h} is too small: each side must be at least 64 px"),
        ));
    }
    if w.max(h) > 8 * w.min(h) {
        return Err(bad(index, format!("{w}x{h} has an aspect ratio over 8")));
    }
    if w * h > MAX_REFERENCE_PIXELS {
        let s = (MAX_REFERENCE_PIXELS as f64 / (w * h) as f64).sqrt();
        let (nw, nh) = (((w as f64) * s) as u32, ((h as f64) * s) as u32);
        rgb = image::imageops::resize(&rgb, nw, nh, FilterType::Lanczos3);
    }
    Ok(rgb)
}

/// Centre-crop a [`load`]ed reference to multiples of `multiple` and map it to [-1, 1].
pub fn prepare(rgb: &RgbImage, multiple: usize, device: &Device) -> Prepared {
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let (cw, ch) = (w - w % multiple, h - h % multiple);
    let (left, top) = ((w - cw) / 2, (h - ch) / 2);
    let mut v = vec![0f32; 3 * cw * ch];
    for y in 0..ch {
        for x in 0..cw {
            let p = rgb.get_pixel((left + x) as u32, (top + y) as u32);
            for c in 0..3 {
                v[(c * ch + y) * cw + x] = (f32::from(p[c]) / 255.0) * 2.0 - 1.0;
            }
        }
    }
    Prepared {
        width: cw,
        height: ch,
        pixels: Tensor::from_data(TensorData::new(v, [1, 3, ch, cw]), device),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 7])
        });
        let mut out = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    fn prepared(bytes: &[u8], d: &Device) -> Prepared {
        prepare(&load(bytes, 0, MAX_DECODE_PIXELS).unwrap(), 16, d)
    }

    #[test]
    fn refuses_what_the_reference_refuses_naming_the_image() {
        let e = load(&png(63, 200), 2, MAX_DECODE_PIXELS)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("input image 2") && e.contains("at least 64"),
            "{e}"
        );
        let e = load(&png(64, 600), 0, MAX_DECODE_PIXELS)
            .unwrap_err()
            .to_string();
        assert!(e.contains("aspect ratio"), "{e}");
        let e = load(b"definitely not an image", 1, MAX_DECODE_PIXELS)
            .unwrap_err()
            .to_string();
        assert!(e.contains("input image 1"), "{e}");
    }

    /// A 16-bit RGBA PNG of one colour: tiny to send, 8 bytes a pixel to decode.
    fn png16(w: u32, h: u32) -> Vec<u8> {
        let img = image::ImageBuffer::<image::Rgba<u16>, _>::from_pixel(
            w,
            h,
            image::Rgba([1000, 2000, 3000, 65535]),
        );
        let mut out = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)
            .unwrap();
        out
    }

    #[test]
    fn decoding_costs_are_bounded_from_the_headers() {
        let limits = DecodeLimits {
            max_pixels: 1024 * 1024,
            max_decoded_bytes: 10 * 1024 * 1024,
        };
        // Over the per-image pixel limit: refused on its header, naming the image.
        let e = check_cost(&[png(64, 64), png16(1025, 1024)], limits)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("input image 1") && e.contains("1025x1024"),
            "{e}"
        );
        // Each within it, but two 16-bit 1 MP images are 16 MiB to decode: over 10 MiB.
        let one = png16(1024, 1024);
        assert!(one.len() < 100_000, "small to send: {}", one.len());
        check_cost(std::slice::from_ref(&one), limits).unwrap();
        let e = check_cost(&[one.clone(), one], limits)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("16 MiB") && e.contains("8 bytes per pixel"),
            "{e}"
        );
    }

    #[test]
    fn centre_crops_to_multiples_and_caps_the_area() {
        let d = Device::flex();
        let p = prepared(&png(100, 70), &d);
        assert_eq!((p.width, p.height), (96, 64));
        // Column 2 of the source (left offset (100-96)/2) is the first column kept: red = 2.
        let v = p.pixels.into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(v[0], (2.0 / 255.0) * 2.0 - 1.0);
        let big = prepared(&png(2048, 1024), &d);
        assert!((big.width * big.height) as u64 <= MAX_REFERENCE_PIXELS);
        assert_eq!((big.width, big.height), (1440, 720));
    }
}
