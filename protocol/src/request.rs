use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::{ErrorCode, Model, ValidationError};

/// Bounds we add on top of Verda's rules. All configurable; the defaults are the API contract's (docs/architecture.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub min_side: u32,
    pub max_side: u32,
    /// Largest `width * height`; 4 MiP (2048 x 2048) by default.
    pub max_pixels: u64,
    pub max_prompt_bytes: usize,
    pub min_steps: u32,
    pub max_steps: u32,
    pub min_guidance: f64,
    pub max_guidance: f64,
    pub max_input_images: usize,
    /// Largest accepted base64 input image, counted on the encoded text (checked before decoding).
    pub max_input_image_bytes: usize,
}

impl Limits {
    /// Limits a request can meet: each range the right way round, sides on the 16-pixel grid,
    /// the smallest image within the pixel limit, finite guidance.
    pub fn validate(&self) -> Result<(), String> {
        let sides = self.min_side >= 16
            && self.min_side.is_multiple_of(16)
            && self.max_side >= self.min_side
            && u64::from(self.min_side) * u64::from(self.min_side) <= self.max_pixels;
        if !sides {
            return Err(format!(
                "limits: min_side ({}) must be a multiple of 16, at most max_side ({}), and its square at most max_pixels ({})",
                self.min_side, self.max_side, self.max_pixels
            ));
        }
        if self.min_steps == 0 || self.max_steps < self.min_steps {
            return Err(format!(
                "limits: steps must satisfy 1 <= min_steps ({}) <= max_steps ({})",
                self.min_steps, self.max_steps
            ));
        }
        let g = (self.min_guidance, self.max_guidance);
        if !(g.0.is_finite() && g.1.is_finite() && g.0 >= 0.0 && g.0 <= g.1) {
            return Err(format!(
                "limits: guidance must satisfy 0 <= min_guidance ({}) <= max_guidance ({}), both finite",
                g.0, g.1
            ));
        }
        if self.max_prompt_bytes == 0 || self.max_input_image_bytes == 0 {
            return Err(
                "limits: max_prompt_bytes and max_input_image_bytes must be at least 1".into(),
            );
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            min_side: 64,
            max_side: 2048,
            max_pixels: 2048 * 2048,
            max_prompt_bytes: 4096,
            min_steps: 1,
            max_steps: 100,
            min_guidance: 0.0,
            max_guidance: 20.0,
            max_input_images: 4,
            max_input_image_bytes: 16 * 1024 * 1024,
        }
    }
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    Jpeg,
    Png,
    Webp,
}

impl OutputFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputFormat::Jpeg => "jpeg",
            OutputFormat::Png => "png",
            OutputFormat::Webp => "webp",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            OutputFormat::Jpeg => "image/jpeg",
            OutputFormat::Png => "image/png",
            OutputFormat::Webp => "image/webp",
        }
    }

    pub fn from_content_type(ct: &str) -> Option<OutputFormat> {
        let mime = ct.split(';').next().unwrap_or("").trim();
        match mime.to_ascii_lowercase().as_str() {
            "image/jpeg" | "image/jpg" => Some(OutputFormat::Jpeg),
            "image/png" => Some(OutputFormat::Png),
            "image/webp" => Some(OutputFormat::Webp),
            _ => None,
        }
    }

    /// Recognise an encoded image by its magic bytes.
    pub fn sniff(bytes: &[u8]) -> Option<OutputFormat> {
        if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(OutputFormat::Jpeg)
        } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            Some(OutputFormat::Png)
        } else if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
            Some(OutputFormat::Webp)
        } else {
            None
        }
    }

    fn parse(s: &str) -> Option<OutputFormat> {
        match s {
            "jpeg" => Some(OutputFormat::Jpeg),
            "png" => Some(OutputFormat::Png),
            "webp" => Some(OutputFormat::Webp),
            _ => None,
        }
    }
}

/// One entry of `input_images`, kept exactly as the client sent it (it is forwarded verbatim),
/// with a SHA-256 digest for the cache key.
#[derive(Clone, Debug, PartialEq)]
pub enum InputImage {
    /// An http(s) URL. The digest covers the URL text: the cache assumes the content behind a URL
    /// does not change within the cache TTL (send `Cache-Control: no-cache` if it does).
    Url { url: String, digest: [u8; 32] },
    /// Base64 image bytes, optionally with a `data:image/...;base64,` prefix. The digest covers
    /// the decoded bytes, so the same image with or without the prefix is the same cache entry.
    Base64 { text: String, digest: [u8; 32] },
}

impl InputImage {
    pub fn as_str(&self) -> &str {
        match self {
            InputImage::Url { url, .. } => url,
            InputImage::Base64 { text, .. } => text,
        }
    }

    pub fn digest(&self) -> &[u8; 32] {
        match self {
            InputImage::Url { digest, .. } | InputImage::Base64 { digest, .. } => digest,
        }
    }

    /// The decoded bytes of a base64 input (None for URLs).
    pub fn decoded_bytes(&self) -> Option<Vec<u8>> {
        match self {
            InputImage::Url { .. } => None,
            InputImage::Base64 { text, .. } => decode_base64(strip_data_url(text)).ok(),
        }
    }
}

/// A validated request with every default filled in. Only `seed` stays optional: absent means the
/// backend picks one and reports it in `X-Seed`.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerateRequest {
    pub model: Model,
    pub prompt: String,
    /// The output size. With `input_images`, a side the client left open is decided by the
    /// backend from the first reference (as the reference pipeline does); `width_given` /
    /// `height_given` say which sides the client set, and `width` / `height` then hold only the
    /// text-to-image default (1024 x 768). Without input images both are always `true`.
    pub width: u32,
    pub height: u32,
    pub width_given: bool,
    pub height_given: bool,
    pub num_steps: u32,
    pub guidance: f64,
    pub seed: Option<u64>,
    pub input_images: Vec<InputImage>,
    pub enable_safety_checker: bool,
    pub output_format: OutputFormat,
    pub output_quality: u8,
    pub enable_base64_output: bool,
}

pub(crate) const FIELDS: &[&str] = &[
    "model",
    "prompt",
    "width",
    "height",
    "num_steps",
    "guidance",
    "seed",
    "input_images",
    "enable_safety_checker",
    "output_format",
    "output_quality",
    "enable_base64_output",
];

impl GenerateRequest {
    /// Parse and validate a request body.
    ///
    /// `path_model` is the model named in the URL (`POST /{model}/generate`); then a `model` field in
    /// the body, if present, must name the same model. Without a path model the body's `model`
    /// field decides, else `default_model`.
    pub fn from_json(
        body: &[u8],
        path_model: Option<Model>,
        default_model: Model,
        limits: &Limits,
    ) -> Result<GenerateRequest, ValidationError> {
        let value: Value = serde_json::from_slice(body).map_err(|e| ValidationError {
            code: ErrorCode::InvalidJson,
            field: None,
            message: format!("the body is not valid JSON: {e}"),
        })?;
        let Value::Object(obj) = value else {
            return Err(ValidationError {
                code: ErrorCode::InvalidJson,
                field: None,
                message: "the body must be a JSON object".into(),
            });
        };
        Self::from_object(&obj, path_model, default_model, limits)
    }

    pub fn from_object(
        obj: &Map<String, Value>,
        path_model: Option<Model>,
        default_model: Model,
        limits: &Limits,
    ) -> Result<GenerateRequest, ValidationError> {
        // Unknown fields are an error: a typo such as `num_step` must not silently run defaults.
        if let Some(unknown) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
            return Err(ValidationError::invalid(
                unknown.as_str(),
                format!(
                    "unknown field `{unknown}`; allowed fields: {}",
                    FIELDS.join(", ")
                ),
            ));
        }

        let model = match (obj.get("model"), path_model) {
            (None, Some(m)) => m,
            (None, None) => default_model,
            (Some(v), path) => {
                let id = v
                    .as_str()
                    .ok_or_else(|| type_error("model", "a string", v))?;
                let m = Model::from_id(id)
                    .ok_or_else(|| ValidationError::unknown_model(Some("model"), id))?;
                if let Some(p) = path {
                    if p != m {
                        return Err(ValidationError::invalid(
                            "model",
                            format!("the body names model `{m}` but the URL names `{p}`; drop the field or make them agree"),
                        ));
                    }
                }
                m
            }
        };

        let prompt = match obj.get("prompt") {
            None | Some(Value::Null) => {
                return Err(ValidationError::invalid("prompt", "`prompt` is required"))
            }
            Some(Value::String(s)) => s.clone(),
            Some(v) => return Err(type_error("prompt", "a string", v)),
        };
        if prompt.trim().is_empty() {
            return Err(ValidationError::invalid(
                "prompt",
                "`prompt` must not be empty",
            ));
        }
        if prompt.len() > limits.max_prompt_bytes {
            return Err(ValidationError::invalid(
                "prompt",
                format!(
                    "`prompt` is {} bytes; at most {} bytes are allowed",
                    prompt.len(),
                    limits.max_prompt_bytes
                ),
            ));
        }

        let width = side(obj, "width", 1024, limits)?;
        let height = side(obj, "height", 768, limits)?;
        let pixels = u64::from(width) * u64::from(height);
        if pixels > limits.max_pixels {
            return Err(ValidationError::invalid(
                "width",
                format!(
                    "{width}x{height} is {pixels} pixels; at most {} pixels are allowed",
                    limits.max_pixels
                ),
            ));
        }

        let num_steps = match get_u64(obj, "num_steps")? {
            None => model.default_steps(),
            Some(n) if model.is_distilled() => {
                if n != 4 {
                    return Err(ValidationError::invalid(
                        "num_steps",
                        format!("`{model}` is distilled and runs exactly 4 steps; got {n}. Omit `num_steps` or use a base model"),
                    ));
                }
                4
            }
            Some(n) => {
                if n < u64::from(limits.min_steps) || n > u64::from(limits.max_steps) {
                    return Err(ValidationError::invalid(
                        "num_steps",
                        format!(
                            "`num_steps` must be between {} and {}; got {n}",
                            limits.min_steps, limits.max_steps
                        ),
                    ));
                }
                n as u32
            }
        };

        let guidance = match obj.get("guidance") {
            None | Some(Value::Null) => model.default_guidance(),
            Some(Value::Number(n)) => {
                let g = n.as_f64().unwrap_or(f64::NAN);
                if model.is_distilled() {
                    if g != 1.0 {
                        return Err(ValidationError::invalid(
                            "guidance",
                            format!("`{model}` is distilled and runs with guidance 1.0; got {g}. Omit `guidance` or use a base model"),
                        ));
                    }
                } else if !(limits.min_guidance..=limits.max_guidance).contains(&g) {
                    return Err(ValidationError::invalid(
                        "guidance",
                        format!(
                            "`guidance` must be between {} and {}; got {g}",
                            limits.min_guidance, limits.max_guidance
                        ),
                    ));
                }
                g
            }
            Some(v) => return Err(type_error("guidance", "a number", v)),
        };

        let seed = get_u64(obj, "seed")?;

        let input_images = match obj.get("input_images") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => {
                if items.len() > limits.max_input_images {
                    return Err(ValidationError::invalid(
                        "input_images",
                        format!(
                            "at most {} input images are allowed; got {}",
                            limits.max_input_images,
                            items.len()
                        ),
                    ));
                }
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| input_image(i, v, limits))
                    .collect::<Result<Vec<_>, _>>()?
            }
            Some(v) => return Err(type_error("input_images", "an array of strings", v)),
        };

        let given = |f: &str| !matches!(obj.get(f), None | Some(Value::Null));
        let (width_given, height_given) = if input_images.is_empty() {
            (true, true)
        } else {
            (given("width"), given("height"))
        };

        let enable_safety_checker = get_bool(obj, "enable_safety_checker", true)?;
        let enable_base64_output = get_bool(obj, "enable_base64_output", false)?;

        let output_format = match obj.get("output_format") {
            None | Some(Value::Null) => OutputFormat::Jpeg,
            Some(Value::String(s)) => OutputFormat::parse(s).ok_or_else(|| {
                ValidationError::invalid(
                    "output_format",
                    format!("`output_format` must be one of jpeg, png, webp; got `{s}`"),
                )
            })?,
            Some(v) => return Err(type_error("output_format", "a string", v)),
        };

        let output_quality = match get_u64(obj, "output_quality")? {
            None => 95,
            Some(q @ 1..=100) => q as u8,
            Some(q) => {
                return Err(ValidationError::invalid(
                    "output_quality",
                    format!("`output_quality` must be between 1 and 100; got {q}"),
                ))
            }
        };

        Ok(GenerateRequest {
            model,
            prompt,
            width,
            height,
            width_given,
            height_given,
            num_steps,
            guidance,
            seed,
            input_images,
            enable_safety_checker,
            output_format,
            output_quality,
            enable_base64_output,
        })
    }

    /// The body sent to a Verda-compatible upstream: every field explicit (so the upstream's own
    /// defaults cannot differ from ours), no `model` (it is in the URL), and binary output, because
    /// the gateway caches image bytes and builds the client's base64 answer itself. The one
    /// exception: a side left open on an editing request stays open, because only the backend
    /// that decodes the references knows the first reference's size.
    pub fn to_upstream_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("prompt".into(), Value::String(self.prompt.clone()));
        if self.width_given {
            m.insert("width".into(), self.width.into());
        }
        if self.height_given {
            m.insert("height".into(), self.height.into());
        }
        m.insert("num_steps".into(), self.num_steps.into());
        m.insert("guidance".into(), self.guidance.into());
        if let Some(seed) = self.seed {
            m.insert("seed".into(), seed.into());
        }
        if !self.input_images.is_empty() {
            m.insert(
                "input_images".into(),
                Value::Array(
                    self.input_images
                        .iter()
                        .map(|i| Value::String(i.as_str().to_owned()))
                        .collect(),
                ),
            );
        }
        m.insert(
            "enable_safety_checker".into(),
            self.enable_safety_checker.into(),
        );
        m.insert(
            "output_format".into(),
            Value::String(self.output_format.as_str().into()),
        );
        m.insert("output_quality".into(), self.output_quality.into());
        m.insert("enable_base64_output".into(), false.into());
        Value::Object(m)
    }

    /// Megapixels of the output; for a side left open on an editing request this counts the
    /// default size (the references are capped at about 1 MP, so this is an upper bound).
    pub fn megapixels(&self) -> f64 {
        f64::from(self.width) * f64::from(self.height) / 1_000_000.0
    }
}

fn type_error(field: &str, expected: &str, got: &Value) -> ValidationError {
    let kind = match got {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    ValidationError::invalid(field, format!("`{field}` must be {expected}; got {kind}"))
}

fn get_u64(obj: &Map<String, Value>, field: &str) -> Result<Option<u64>, ValidationError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(|| {
            ValidationError::invalid(
                field,
                format!("`{field}` must be a non-negative integer that fits in 64 bits; got {n}"),
            )
        }),
        Some(v) => Err(type_error(field, "an integer", v)),
    }
}

fn get_bool(obj: &Map<String, Value>, field: &str, default: bool) -> Result<bool, ValidationError> {
    match obj.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(type_error(field, "a boolean", v)),
    }
}

fn side(
    obj: &Map<String, Value>,
    field: &str,
    default: u32,
    limits: &Limits,
) -> Result<u32, ValidationError> {
    let v = get_u64(obj, field)?.unwrap_or(u64::from(default));
    if v % 16 != 0 {
        return Err(ValidationError::invalid(
            field,
            format!("`{field}` must be a multiple of 16; got {v}"),
        ));
    }
    if v < u64::from(limits.min_side) || v > u64::from(limits.max_side) {
        return Err(ValidationError::invalid(
            field,
            format!(
                "`{field}` must be between {} and {}; got {v}",
                limits.min_side, limits.max_side
            ),
        ));
    }
    Ok(v as u32)
}

fn strip_data_url(s: &str) -> &str {
    if let Some(rest) = s.strip_prefix("data:") {
        if let Some(idx) = rest.find(";base64,") {
            return &rest[idx + ";base64,".len()..];
        }
    }
    s
}

fn decode_base64(s: &str) -> Result<Vec<u8>, base64::DecodeError> {
    // Clients send standard base64, with or without padding; tolerate line breaks from tools
    // that wrap output at 76 columns.
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    if s.contains(['\n', '\r']) {
        let joined: String = s.chars().filter(|c| !matches!(c, '\n' | '\r')).collect();
        engine.decode(joined)
    } else {
        engine.decode(s)
    }
}

fn input_image(index: usize, v: &Value, limits: &Limits) -> Result<InputImage, ValidationError> {
    let field = format!("input_images[{index}]");
    let Value::String(s) = v else {
        return Err(type_error(
            &field,
            "a string (an http(s) URL or base64 image)",
            v,
        ));
    };
    let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        if s.len() > 8192 || s.chars().any(char::is_whitespace) {
            return Err(ValidationError::invalid(
                field,
                "the URL is malformed (whitespace, or longer than 8192 bytes)",
            ));
        }
        return Ok(InputImage::Url {
            url: s.clone(),
            digest: Sha256::digest(s.as_bytes()).into(),
        });
    }
    if s.contains("://") {
        return Err(ValidationError::invalid(
            field,
            "only http and https URLs are accepted; otherwise send the image as base64",
        ));
    }
    if s.len() > limits.max_input_image_bytes {
        return Err(ValidationError::too_large(
            field,
            format!(
                "the base64 image is {} bytes; at most {} bytes are allowed",
                s.len(),
                limits.max_input_image_bytes
            ),
        ));
    }
    let payload = strip_data_url(s);
    let bytes = decode_base64(payload).map_err(|e| {
        ValidationError::invalid(
            field.clone(),
            format!("not an http(s) URL and not valid base64: {e}"),
        )
    })?;
    if bytes.is_empty() {
        return Err(ValidationError::invalid(field, "the image is empty"));
    }
    Ok(InputImage::Base64 {
        text: s.clone(),
        digest: Sha256::digest(&bytes).into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_that_no_request_can_meet_are_refused() {
        assert_eq!(Limits::default().validate(), Ok(()));
        for bad in [
            Limits {
                min_side: 65,
                ..Limits::default()
            },
            Limits {
                min_side: 512,
                max_side: 256,
                ..Limits::default()
            },
            Limits {
                max_pixels: 100,
                ..Limits::default()
            },
            Limits {
                min_steps: 0,
                ..Limits::default()
            },
            Limits {
                min_steps: 9,
                max_steps: 4,
                ..Limits::default()
            },
            Limits {
                max_guidance: f64::NAN,
                ..Limits::default()
            },
            Limits {
                min_guidance: 5.0,
                max_guidance: 1.0,
                ..Limits::default()
            },
            Limits {
                max_prompt_bytes: 0,
                ..Limits::default()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
    use serde_json::json;

    fn parse(v: Value) -> Result<GenerateRequest, ValidationError> {
        parse_for(None, v)
    }

    fn parse_for(path: Option<Model>, v: Value) -> Result<GenerateRequest, ValidationError> {
        GenerateRequest::from_json(
            v.to_string().as_bytes(),
            path,
            Model::Klein4b,
            &Limits::default(),
        )
    }

    fn field_of(v: Value) -> (u16, Option<String>, String) {
        let e = parse(v).unwrap_err();
        (e.status(), e.field, e.message)
    }

    #[test]
    fn defaults_follow_verda() {
        let r = parse(json!({"prompt": "a cat"})).unwrap();
        assert_eq!((r.width, r.height), (1024, 768));
        assert_eq!((r.num_steps, r.guidance), (4, 1.0));
        assert_eq!(r.model, Model::Klein4b);
        assert_eq!(r.seed, None);
        assert!(r.enable_safety_checker);
        assert!(!r.enable_base64_output);
        assert_eq!(r.output_format, OutputFormat::Jpeg);
        assert_eq!(r.output_quality, 95);
        let b = parse_for(Some(Model::KleinBase9b), json!({"prompt": "a cat"})).unwrap();
        assert_eq!((b.num_steps, b.guidance), (50, 4.0));
    }

    #[test]
    fn distilled_models_fix_steps_and_guidance() {
        let (s, f, m) = field_of(json!({"prompt": "x", "num_steps": 8}));
        assert_eq!((s, f.as_deref()), (400, Some("num_steps")));
        assert!(m.contains("exactly 4"), "{m}");
        let (_, f, _) = field_of(json!({"prompt": "x", "guidance": 3.5}));
        assert_eq!(f.as_deref(), Some("guidance"));
        // The fixed values themselves are accepted.
        assert!(parse(json!({"prompt": "x", "num_steps": 4, "guidance": 1.0})).is_ok());
        assert!(parse(json!({"prompt": "x", "guidance": 1})).is_ok());
        // Base models take other values within bounds.
        let b = parse(json!({"model": "flux2-klein-base-4b", "prompt": "x", "num_steps": 28, "guidance": 2.5})).unwrap();
        assert_eq!((b.num_steps, b.guidance), (28, 2.5));
        let e = parse(json!({"model": "flux2-klein-base-4b", "prompt": "x", "num_steps": 101}))
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("num_steps"));
        let e = parse(json!({"model": "flux2-klein-base-4b", "prompt": "x", "num_steps": 0}))
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("num_steps"));
        let e = parse(json!({"model": "flux2-klein-base-4b", "prompt": "x", "guidance": 20.5}))
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("guidance"));
    }

    #[test]
    fn sizes_must_be_multiples_of_16_within_bounds() {
        assert_eq!(
            field_of(json!({"prompt": "x", "width": 1000})).1.as_deref(),
            Some("width")
        );
        assert_eq!(
            field_of(json!({"prompt": "x", "height": 48})).1.as_deref(),
            Some("height")
        );
        assert_eq!(
            field_of(json!({"prompt": "x", "width": 4096})).1.as_deref(),
            Some("width")
        );
        assert_eq!(
            field_of(json!({"prompt": "x", "width": -16})).1.as_deref(),
            Some("width")
        );
        assert_eq!(
            field_of(json!({"prompt": "x", "width": 512.5}))
                .1
                .as_deref(),
            Some("width")
        );
        assert_eq!(
            field_of(json!({"prompt": "x", "width": "512"}))
                .1
                .as_deref(),
            Some("width")
        );
        let r = parse(json!({"prompt": "x", "width": 2048, "height": 2048})).unwrap();
        assert_eq!(r.width * r.height, 2048 * 2048);
        let tight = Limits {
            max_pixels: 1024 * 1024,
            ..Limits::default()
        };
        let e = GenerateRequest::from_json(
            br#"{"prompt":"x","width":2048,"height":1024}"#,
            None,
            Model::Klein4b,
            &tight,
        )
        .unwrap_err();
        assert!(e.message.contains("pixels"), "{}", e.message);
    }

    #[test]
    fn unknown_fields_wrong_types_and_empty_prompt_are_named() {
        let (s, f, m) = field_of(json!({"prompt": "x", "num_step": 4}));
        assert_eq!((s, f.as_deref()), (400, Some("num_step")));
        assert!(m.contains("unknown field"));
        assert_eq!(field_of(json!({"prompt": ""})).1.as_deref(), Some("prompt"));
        assert_eq!(
            field_of(json!({"prompt": "   "})).1.as_deref(),
            Some("prompt")
        );
        assert_eq!(field_of(json!({})).1.as_deref(), Some("prompt"));
        assert_eq!(field_of(json!({"prompt": 5})).1.as_deref(), Some("prompt"));
        assert_eq!(
            field_of(json!({"prompt": "x", "seed": -1})).1.as_deref(),
            Some("seed")
        );
        assert_eq!(
            field_of(json!({"prompt": "x", "seed": "7"})).1.as_deref(),
            Some("seed")
        );
        assert_eq!(
            field_of(json!({"prompt": "x", "enable_safety_checker": "no"}))
                .1
                .as_deref(),
            Some("enable_safety_checker")
        );
        assert_eq!(
            field_of(json!({"prompt": "x", "output_format": "gif"}))
                .1
                .as_deref(),
            Some("output_format")
        );
        assert_eq!(
            field_of(json!({"prompt": "x", "output_quality": 0}))
                .1
                .as_deref(),
            Some("output_quality")
        );
        assert_eq!(
            field_of(json!({"prompt": "x", "output_quality": 101}))
                .1
                .as_deref(),
            Some("output_quality")
        );
        let long = "a".repeat(4097);
        assert_eq!(
            field_of(json!({"prompt": long})).1.as_deref(),
            Some("prompt")
        );
        let e = GenerateRequest::from_json(b"[1,2]", None, Model::Klein4b, &Limits::default())
            .unwrap_err();
        assert_eq!((e.status(), e.code.as_str()), (400, "invalid_json"));
        let e =
            GenerateRequest::from_json(b"{\"prompt\":", None, Model::Klein4b, &Limits::default())
                .unwrap_err();
        assert_eq!((e.status(), e.code.as_str()), (400, "invalid_json"));
    }

    #[test]
    fn model_field_and_path_must_agree() {
        let e = parse(json!({"model": "flux2-klein-99b", "prompt": "x"})).unwrap_err();
        assert_eq!((e.status(), e.code.as_str()), (404, "unknown_model"));
        let e = parse_for(
            Some(Model::Klein9b),
            json!({"model": "flux2-klein-4b", "prompt": "x"}),
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("model"));
        let r = parse_for(
            Some(Model::Klein9b),
            json!({"model": "flux2-klein-9b", "prompt": "x"}),
        )
        .unwrap();
        assert_eq!(r.model, Model::Klein9b);
    }

    #[test]
    fn input_images_urls_and_base64_with_or_without_data_prefix() {
        let png = b"\x89PNG\r\n\x1a\nfake";
        let b64 = base64::engine::general_purpose::STANDARD.encode(png);
        let r = parse(json!({"prompt": "x", "input_images": [
            "https://example.com/a.png",
            b64.clone(),
            format!("data:image/png;base64,{b64}"),
        ]}))
        .unwrap();
        assert_eq!(r.input_images.len(), 3);
        assert!(matches!(r.input_images[0], InputImage::Url { .. }));
        assert_eq!(r.input_images[1].digest(), r.input_images[2].digest());
        assert_eq!(r.input_images[1].decoded_bytes().unwrap(), png);
        // Forwarded verbatim.
        assert_eq!(
            r.to_upstream_json()["input_images"][2],
            json!(format!("data:image/png;base64,{b64}"))
        );

        let five = vec![b64.clone(); 5];
        assert_eq!(
            field_of(json!({"prompt": "x", "input_images": five}))
                .1
                .as_deref(),
            Some("input_images")
        );
        let (_, f, m) = field_of(json!({"prompt": "x", "input_images": ["ftp://host/a.png"]}));
        assert_eq!(f.as_deref(), Some("input_images[0]"));
        assert!(m.contains("http"));
        let (_, f, _) = field_of(json!({"prompt": "x", "input_images": [b64, "not base64!!"]}));
        assert_eq!(f.as_deref(), Some("input_images[1]"));
        assert_eq!(
            field_of(json!({"prompt": "x", "input_images": [3]}))
                .1
                .as_deref(),
            Some("input_images[0]")
        );
        assert_eq!(
            field_of(json!({"prompt": "x", "input_images": "x"}))
                .1
                .as_deref(),
            Some("input_images")
        );
        let small = Limits {
            max_input_image_bytes: 8,
            ..Limits::default()
        };
        let e = GenerateRequest::from_json(
            json!({"prompt": "x", "input_images": ["aGVsbG8gd29ybGQ="]})
                .to_string()
                .as_bytes(),
            None,
            Model::Klein4b,
            &small,
        )
        .unwrap_err();
        assert_eq!(
            (e.status(), e.field.as_deref()),
            (413, Some("input_images[0]"))
        );
    }

    #[test]
    fn upstream_body_is_explicit_and_binary() {
        let r = parse(
            json!({"prompt": "x", "seed": 7, "enable_base64_output": true, "output_format": "png"}),
        )
        .unwrap();
        let v = r.to_upstream_json();
        assert_eq!(v["seed"], 7);
        assert_eq!(v["num_steps"], 4);
        assert_eq!(v["guidance"], 1.0);
        assert_eq!(v["enable_base64_output"], false);
        assert_eq!(v["output_format"], "png");
        assert!(v.get("model").is_none());
        // What we forward is itself a valid request with the same meaning.
        let back = GenerateRequest::from_object(
            v.as_object().unwrap(),
            Some(r.model),
            Model::Klein9b,
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(
            GenerateRequest {
                enable_base64_output: true,
                ..back
            },
            r
        );
    }

    #[test]
    fn an_editing_request_may_leave_its_size_to_the_first_reference() {
        let img = "https://example.com/a.png";
        let open = parse(json!({"prompt": "x", "input_images": [img], "width": 512})).unwrap();
        assert!(open.width_given && !open.height_given);
        let v = open.to_upstream_json();
        assert_eq!(v["width"], 512);
        assert!(v.get("height").is_none(), "{v}");
        // Left open and explicitly 768 are different requests (the reference decides the first).
        let set = parse(json!({"prompt": "x", "input_images": [img], "width": 512, "height": 768}))
            .unwrap();
        assert_ne!(open.cache_key(1, None), set.cache_key(1, None));
        // Forwarding keeps the side open.
        let back = GenerateRequest::from_object(
            v.as_object().unwrap(),
            Some(open.model),
            Model::Klein9b,
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(back, open);
        // Text-to-image: the default is the size, whether given or not.
        let t = parse(json!({"prompt": "x"})).unwrap();
        assert!(t.width_given && t.height_given);
        assert_eq!(
            t.cache_key(1, None),
            parse(json!({"prompt": "x", "width": 1024, "height": 768}))
                .unwrap()
                .cache_key(1, None)
        );
    }

    #[test]
    fn sniffs_formats() {
        assert_eq!(
            OutputFormat::sniff(&[0xFF, 0xD8, 0xFF, 0xE0]),
            Some(OutputFormat::Jpeg)
        );
        assert_eq!(
            OutputFormat::sniff(b"RIFF\0\0\0\0WEBPVP8 "),
            Some(OutputFormat::Webp)
        );
        assert_eq!(OutputFormat::sniff(b"GIF89a"), None);
        assert_eq!(
            OutputFormat::from_content_type("image/png; charset=binary"),
            Some(OutputFormat::Png)
        );
    }
}
