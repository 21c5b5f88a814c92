use serde::{Deserialize, Serialize};

/// The FLUX.2 [klein] variants the API serves. The id strings are Verda's endpoint names.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Model {
    #[serde(rename = "flux2-klein-4b")]
    Klein4b,
    #[serde(rename = "flux2-klein-9b")]
    Klein9b,
    #[serde(rename = "flux2-klein-base-4b")]
    KleinBase4b,
    #[serde(rename = "flux2-klein-base-9b")]
    KleinBase9b,
}

impl Model {
    pub const ALL: [Model; 4] = [
        Model::Klein4b,
        Model::Klein9b,
        Model::KleinBase4b,
        Model::KleinBase9b,
    ];

    pub fn id(self) -> &'static str {
        match self {
            Model::Klein4b => "flux2-klein-4b",
            Model::Klein9b => "flux2-klein-9b",
            Model::KleinBase4b => "flux2-klein-base-4b",
            Model::KleinBase9b => "flux2-klein-base-9b",
        }
    }

    pub fn from_id(id: &str) -> Option<Model> {
        Model::ALL.into_iter().find(|m| m.id() == id)
    }

    /// Distilled models run a fixed 4-step schedule without classifier-free guidance; the base
    /// models run CFG with a configurable number of steps.
    pub fn is_distilled(self) -> bool {
        matches!(self, Model::Klein4b | Model::Klein9b)
    }

    pub fn default_steps(self) -> u32 {
        if self.is_distilled() {
            4
        } else {
            50
        }
    }

    pub fn default_guidance(self) -> f64 {
        if self.is_distilled() {
            1.0
        } else {
            4.0
        }
    }

    /// Parameter count of the transformer in billions, as the model's name states.
    pub fn size_billions(self) -> u32 {
        match self {
            Model::Klein4b | Model::KleinBase4b => 4,
            Model::Klein9b | Model::KleinBase9b => 9,
        }
    }
}

impl std::fmt::Display for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.id())
    }
}

impl std::str::FromStr for Model {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Model::from_id(s).ok_or_else(|| {
            format!(
                "unknown model `{s}`; known models: {}",
                Model::ALL.map(Model::id).join(", ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_defaults_follow_verda() {
        for m in Model::ALL {
            assert_eq!(Model::from_id(m.id()), Some(m));
            assert_eq!(
                serde_json::to_string(&m).unwrap(),
                format!("\"{}\"", m.id())
            );
        }
        assert_eq!(Model::from_id("flux2-klein-12b"), None);
        assert_eq!(Model::Klein4b.default_steps(), 4);
        assert_eq!(Model::Klein9b.default_guidance(), 1.0);
        assert_eq!(Model::KleinBase4b.default_steps(), 50);
        assert_eq!(Model::KleinBase9b.default_guidance(), 4.0);
        assert!(!Model::KleinBase9b.is_distilled());
    }
}
