use serde::{Deserialize, Serialize};

use crate::ErrorCode;

/// The one error shape of the API: `{"error": {"code": "...", "message": "...", "field": "..."}}`.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ErrorDetail {
    #[cfg_attr(feature = "openapi", schema(value_type = crate::ErrorCode))]
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// A request that breaks the rules. Its status (its code's) is 400, except 404 for a model we do not know and
/// 413 for a body part over its size limit.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ValidationError {
    pub code: ErrorCode,
    pub field: Option<String>,
    pub message: String,
}

impl ValidationError {
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        ValidationError {
            code: ErrorCode::InvalidRequest,
            field: Some(field.into()),
            message: message.into(),
        }
    }

    pub fn unknown_model(field: Option<&str>, given: &str) -> Self {
        ValidationError {
            code: ErrorCode::UnknownModel,
            field: field.map(str::to_owned),
            message: format!(
                "unknown model `{given}`; known models: {}",
                crate::Model::ALL.map(crate::Model::id).join(", ")
            ),
        }
    }

    pub fn too_large(field: impl Into<String>, message: impl Into<String>) -> Self {
        ValidationError {
            code: ErrorCode::TooLarge,
            field: Some(field.into()),
            message: message.into(),
        }
    }

    /// The HTTP status of this error (its code's).
    pub fn status(&self) -> u16 {
        self.code.status()
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.as_str().to_owned(),
                message: self.message.clone(),
                field: self.field.clone(),
            },
        }
    }
}
