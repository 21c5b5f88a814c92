use serde::{Deserialize, Serialize};

/// The JSON answer when a request sets `enable_base64_output`. Verda's exact field names are not
/// known to us (docs/architecture.md, API contract), so this is kleingate's own documented shape; the Verda
/// client parses upstream answers tolerantly instead of relying on it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageJson {
    /// The encoded image, standard base64 with padding, no data-URL prefix.
    pub image: String,
    /// `jpeg`, `png` or `webp`.
    pub output_format: String,
    /// The seed the image was generated with; absent only if the backend did not report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(format = "uint64"))]
    pub seed: Option<u64>,
    pub has_nsfw_content: bool,
}
