//! Sniffing and bounded decoding of client-supplied images (`input_images`), shared by the
//! gateway's URL fetcher, the local engine and the fuzz targets. Nothing here trusts a file's
//! name, a `Content-Type` or a data-URL prefix: the bytes decide, and the declared size is checked
//! against a pixel limit before a single pixel is allocated.

use image::{DynamicImage, ImageFormat, ImageReader};
use std::io::Cursor;

/// What an encoded image declares about itself, read from its header only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
    /// Bytes per pixel of the decoded image (16-bit RGBA: 8): with the size, what decoding it
    /// allocates.
    pub bytes_per_pixel: u8,
}

impl ImageInfo {
    pub fn pixels(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }

    /// Bytes the decoded image takes.
    pub fn decoded_bytes(&self) -> u64 {
        self.pixels() * u64::from(self.bytes_per_pixel)
    }
}

/// Why an image was refused; the text is meant for the client.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ImageError(pub String);

fn reader(bytes: &[u8]) -> Result<ImageReader<Cursor<&[u8]>>, ImageError> {
    let format = image::guess_format(bytes).map_err(|_| {
        ImageError("the content is not an image (no jpeg, png or webp signature)".into())
    })?;
    if !matches!(
        format,
        ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP
    ) {
        return Err(ImageError(format!(
            "{} images are not accepted; send jpeg, png or webp",
            format.extensions_str().first().unwrap_or(&"such")
        )));
    }
    let mut r = ImageReader::new(Cursor::new(bytes));
    r.set_format(format);
    Ok(r)
}

/// The format and declared size of `bytes`, refusing anything that is not a jpeg, png or webp or
/// that declares more than `max_pixels` pixels. Reads the header only.
pub fn inspect(bytes: &[u8], max_pixels: u64) -> Result<ImageInfo, ImageError> {
    use image::ImageDecoder as _;
    let r = reader(bytes)?;
    let format = r.format().unwrap_or(ImageFormat::Png);
    let decoder = r
        .into_decoder()
        .map_err(|e| ImageError(format!("cannot read the image header: {e}")))?;
    let (width, height) = decoder.dimensions();
    let bytes_per_pixel = decoder.color_type().bytes_per_pixel();
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(ImageError(format!(
            "the image is {width}x{height} ({pixels} pixels); at most {max_pixels} pixels are decoded"
        )));
    }
    if pixels == 0 {
        return Err(ImageError(format!("the image is {width}x{height}: empty")));
    }
    Ok(ImageInfo {
        format,
        width,
        height,
        bytes_per_pixel,
    })
}

/// Decode `bytes` after [`inspect`]ing them, with the decoder's own allocation limit set from the
/// declared size so that a header that lies cannot make it allocate more.
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage, ImageError> {
    let info = inspect(bytes, max_pixels)?;
    let mut r = reader(bytes)?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(info.width);
    limits.max_image_height = Some(info.height);
    // 16-bit RGBA is the widest pixel these formats decode to.
    let declared = u64::from(info.width) * u64::from(info.height);
    limits.max_alloc = Some(declared.saturating_mul(8).max(1 << 20));
    r.limits(limits);
    r.decode()
        .map_err(|e| ImageError(format!("cannot decode the image: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_pixel(w, h, image::Rgb([10, 20, 30]));
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png)
            .expect("encode");
        out
    }

    #[test]
    fn accepts_a_png_and_reports_its_size() {
        let info = inspect(&png(70, 65), 1 << 20).expect("png");
        assert_eq!(
            (info.format, info.width, info.height, info.bytes_per_pixel),
            (ImageFormat::Png, 70, 65, 3)
        );
        assert_eq!(info.decoded_bytes(), 70 * 65 * 3);
        let img = decode(&png(70, 65), 1 << 20).expect("decodes");
        assert_eq!((img.width(), img.height()), (70, 65));
    }

    #[test]
    fn refuses_what_is_not_an_image_or_too_many_pixels() {
        assert!(inspect(b"<html>hello</html>", 1 << 20)
            .unwrap_err()
            .0
            .contains("not an image"));
        let e = inspect(&png(100, 100), 9_999).unwrap_err().0;
        assert!(e.contains("100x100") && e.contains("9999"), "{e}");
        // A GIF is an image, but not one we take.
        let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;";
        assert!(inspect(gif, 1 << 20).unwrap_err().0.contains("gif"));
    }

    /// PNG's CRC-32 (so the doctored header below passes the decoder's checksum).
    fn crc32(data: &[u8]) -> u32 {
        let mut c = 0xFFFF_FFFFu32;
        for &b in data {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }

    #[test]
    fn a_header_claiming_a_huge_image_is_refused_before_decoding() {
        // A valid PNG signature and IHDR declaring 100000 x 100000, then nothing.
        let mut bytes = png(1, 1);
        bytes[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        bytes[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let crc = crc32(&bytes[12..29]);
        bytes[29..33].copy_from_slice(&crc.to_be_bytes());
        let e = decode(&bytes, 64 << 20).unwrap_err().0;
        assert!(e.contains("100000x100000"), "{e}");
    }

    #[test]
    fn truncated_images_are_errors_not_panics() {
        let full = png(80, 80);
        for cut in [8, 20, 33, full.len() / 2, full.len() - 20] {
            assert!(decode(&full[..cut], 1 << 20).is_err(), "cut at {cut}");
        }
    }
}
