//! Reference images for editing and multi-reference generation, prepared as the diffusers klein
//! pipeline does: decode, convert to RGB, refuse sides under 64 px or an aspect ratio over 8, scale
//! down (Lanczos) to at most 1024x1024 pixels of area, centre-crop to multiples of 2 x the VAE scale
//! factor (no resize), and map to [-1, 1].

use burn::tensor::{Device, Tensor, TensorData};
use image::imageops::FilterType;

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

fn bad(index: usize, msg: impl std::fmt::Display) -> EngineError {
    EngineError::Reference {
        index,
        message: msg.to_string(),
    }
}

/// Prepare the encoded image `bytes` (reference number `index`, for error messages).
pub fn prepare(
    bytes: &[u8],
    index: usize,
    multiple: usize,
    device: &Device,
) -> Result<Prepared, EngineError> {
    let img = kleingate_protocol::image_check::decode(bytes, MAX_DECODE_PIXELS)
        .map_err(|e| bad(index, e))?;
    let mut rgb = img.to_rgb8();
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
    Ok(Prepared {
        width: cw,
        height: ch,
        pixels: Tensor::from_data(TensorData::new(v, [1, 3, ch, cw]), device),
    })
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

    #[test]
    fn refuses_what_the_reference_refuses_naming_the_image() {
        let d = Device::flex();
        let e = prepare(&png(63, 200), 2, 16, &d).unwrap_err().to_string();
        assert!(
            e.contains("input image 2") && e.contains("at least 64"),
            "{e}"
        );
        let e = prepare(&png(64, 600), 0, 16, &d).unwrap_err().to_string();
        assert!(e.contains("aspect ratio"), "{e}");
        let e = prepare(b"definitely not an image", 1, 16, &d)
            .unwrap_err()
            .to_string();
        assert!(e.contains("input image 1"), "{e}");
    }

    #[test]
    fn centre_crops_to_multiples_and_caps_the_area() {
        let d = Device::flex();
        let p = prepare(&png(100, 70), 0, 16, &d).unwrap();
        assert_eq!((p.width, p.height), (96, 64));
        // Column 2 of the source (left offset (100-96)/2) is the first column kept: red = 2.
        let v = p.pixels.into_data().try_to_vec::<f32>().unwrap();
        assert_eq!(v[0], (2.0 / 255.0) * 2.0 - 1.0);
        let big = prepare(&png(2048, 1024), 0, 16, &d).unwrap();
        assert!((big.width * big.height) as u64 <= MAX_REFERENCE_PIXELS);
        assert_eq!((big.width, big.height), (1440, 720));
    }
}
