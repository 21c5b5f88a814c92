//! Encoding generated images (png, jpeg with quality, lossy webp with quality) and turning the
//! decoder's float output into 8-bit RGB the way the reference does (`round(clamp(x/2+0.5) * 255)`).

use std::io::Cursor;

use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::{CompressionType, FilterType, PngEncoder};
use image::{ExtendedColorType, ImageEncoder};

use crate::error::EngineError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Png,
    Jpeg,
    Webp,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "png" => Ok(Format::Png),
            "jpeg" | "jpg" => Ok(Format::Jpeg),
            "webp" => Ok(Format::Webp),
            other => Err(format!("unknown image format `{other}` (png, jpeg, webp)")),
        }
    }
}

/// An 8-bit RGB image.
#[derive(Clone, Debug, PartialEq)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

impl Rgb8 {
    /// From `[H, W, 3]` floats in [0, 1] (values outside are clamped).
    pub fn from_unit_floats(v: &[f32], width: usize, height: usize) -> Rgb8 {
        let data = v
            .iter()
            .map(|x| (x.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect();
        Rgb8 {
            width,
            height,
            data,
        }
    }

    pub fn encode(&self, format: Format, quality: u8) -> Result<Vec<u8>, EngineError> {
        let (w, h) = (self.width as u32, self.height as u32);
        let enc_err =
            |e: &dyn std::fmt::Display| EngineError::Device(format!("image encoding failed: {e}"));
        let mut out = Vec::new();
        match format {
            Format::Png => PngEncoder::new_with_quality(
                Cursor::new(&mut out),
                CompressionType::Fast,
                FilterType::Adaptive,
            )
            .write_image(&self.data, w, h, ExtendedColorType::Rgb8)
            .map_err(|e| enc_err(&e))?,
            Format::Jpeg => {
                JpegEncoder::new_with_quality(Cursor::new(&mut out), quality.clamp(1, 100))
                    .write_image(&self.data, w, h, ExtendedColorType::Rgb8)
                    .map_err(|e| enc_err(&e))?
            }
            Format::Webp => {
                let mem = webp::Encoder::from_rgb(&self.data, w, h)
                    .encode(f32::from(quality.clamp(1, 100)));
                out.extend_from_slice(&mem);
            }
        }
        Ok(out)
    }
}
