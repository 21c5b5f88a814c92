//! The request body's JSON Schema, made from the same [`Limits`] and field list the validation
//! uses, so the OpenAPI document states the rules the gateway applies (with the configured
//! limits when it is served by a gateway).

use utoipa::openapi::schema::{ArrayBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::PartialSchema;

use crate::{Limits, Model, OutputFormat};

/// The body of `POST /{model}/generate` and `POST /generate`.
pub fn generate_body(limits: &Limits) -> Schema {
    let integer = |min: u64, max: u64, what: &str| {
        ObjectBuilder::new()
            .schema_type(Type::Integer)
            .minimum(Some(min as usize))
            .maximum(Some(max as usize))
            .description(Some(what))
    };
    let side = |what: &str| {
        integer(u64::from(limits.min_side), u64::from(limits.max_side), what)
            .multiple_of(Some(16.0))
    };
    let distilled: Vec<&str> = Model::ALL
        .iter()
        .filter(|m| m.is_distilled())
        .map(|m| m.id())
        .collect();
    let properties: [(&str, RefOr<Schema>); 12] = [
        ("model", RefOr::T(model_schema(&format!(
            "The model, when the URL names none (`POST /generate`); with `POST /{{model}}/generate` it must name the same one. Default: the gateway's `default_model`. Distilled models ({}) run exactly 4 steps with guidance 1.0",
            distilled.join(", ")
        )))),
        ("prompt", ObjectBuilder::new()
            .schema_type(Type::String)
            .max_length(Some(limits.max_prompt_bytes))
            .pattern(Some(r"\S"))
            .description(Some(format!("At most {} bytes of UTF-8, not only white space", limits.max_prompt_bytes)))
            .into()),
        ("width", side("Output width; a multiple of 16. Default 1024, or with input images the first one's").into()),
        ("height", side("Output height; a multiple of 16. Default 768, or with input images the first one's").into()),
        ("num_steps", integer(u64::from(limits.min_steps), u64::from(limits.max_steps), "Denoising steps: base models only (default 50); distilled models run exactly 4").into()),
        ("guidance", ObjectBuilder::new()
            .schema_type(Type::Number)
            .minimum(Some(limits.min_guidance))
            .maximum(Some(limits.max_guidance))
            .description(Some("Guidance scale: base models only (default 4.0); distilled models use 1.0"))
            .into()),
        ("seed", integer(0, u64::MAX, "Random when absent; the seed used comes back in `X-Seed`").into()),
        ("input_images", ArrayBuilder::new()
            .items(ObjectBuilder::new().schema_type(Type::String).description(Some(format!(
                "A reference image: standard base64 (at most {} bytes of it), or an http(s) URL",
                limits.max_input_image_bytes
            ))))
            .max_items(Some(limits.max_input_images))
            .description(Some("Reference images for editing and multi-reference generation"))
            .into()),
        ("enable_safety_checker", ObjectBuilder::new().schema_type(Type::Boolean).description(Some("Default true")).into()),
        ("output_format", OutputFormat::schema()),
        ("output_quality", integer(1, 100, "jpeg and webp quality, default 95").into()),
        ("enable_base64_output", ObjectBuilder::new().schema_type(Type::Boolean).description(Some("Answer JSON with the image in base64 instead of the image bytes. Default false")).into()),
    ];
    let mut body = ObjectBuilder::new()
        .schema_type(Type::Object)
        .examples([serde_json::json!({
            "prompt": "a red fox in the snow",
            "seed": 42,
            "width": limits.min_side,
            "height": limits.min_side,
        })])
        .required("prompt")
        .additional_properties(Some(
            utoipa::openapi::schema::AdditionalProperties::FreeForm(false),
        ))
        .description(Some("Unknown fields are refused (400)"));
    for (name, schema) in properties {
        body = body.property(name, schema);
    }
    body.into()
}

fn model_schema(description: &str) -> Schema {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(Model::ALL.iter().map(|m| m.id())))
        .description(Some(description))
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schema names exactly the fields the validation accepts.
    #[test]
    fn the_body_schema_lists_the_accepted_fields() {
        let Schema::Object(o) = generate_body(&Limits::default()) else {
            panic!("not an object schema");
        };
        let mut names: Vec<&str> = o.properties.keys().map(String::as_str).collect();
        let mut fields = crate::request::FIELDS.to_vec();
        names.sort_unstable();
        fields.sort_unstable();
        assert_eq!(names, fields);
    }
}
