//! A connection URL that may carry a password (`redis://:pw@host`, `postgres://user:pw@host/db`):
//! read as plain text, but printed (`check-config`, `Debug`) with the password replaced, so the
//! effective settings can be shown and logged.

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Default, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn new(url: impl Into<String>) -> SecretUrl {
        SecretUrl(url.into())
    }

    /// The URL itself, password included: for connecting, never for printing.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The URL with its password (if any) replaced; a URL that does not parse is not shown.
    pub fn redacted(&self) -> String {
        if self.0.is_empty() {
            return String::new();
        }
        match url::Url::parse(&self.0) {
            Ok(mut u) => {
                if u.password().is_some() {
                    let _ = u.set_password(Some("REDACTED"));
                }
                // A password may also come as a query parameter (`?password=`, libpq style).
                if u.query().is_some() {
                    let pairs: Vec<(String, String)> = u
                        .query_pairs()
                        .map(|(k, v)| {
                            let secret = k.eq_ignore_ascii_case("password");
                            (
                                k.into_owned(),
                                if secret {
                                    "REDACTED".into()
                                } else {
                                    v.into_owned()
                                },
                            )
                        })
                        .collect();
                    u.query_pairs_mut().clear().extend_pairs(pairs);
                }
                u.to_string()
            }
            Err(_) => "(not a URL)".into(),
        }
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl Serialize for SecretUrl {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.redacted())
    }
}

impl<'de> Deserialize<'de> for SecretUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(SecretUrl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_password_is_never_printed() {
        let u = SecretUrl::new("redis://:hunter2@redis.internal:6379/0");
        assert_eq!(u.expose(), "redis://:hunter2@redis.internal:6379/0");
        for shown in [
            format!("{u:?}"),
            serde_json::to_string(&u).unwrap(),
            u.redacted(),
        ] {
            assert!(
                !shown.contains("hunter2") && shown.contains("redis.internal"),
                "{shown}"
            );
        }
        let pg = SecretUrl::new("postgres://kg:s3cr%40t@db:5432/kleingate");
        assert!(!format!("{pg:?}").contains("s3cr"));
        assert_eq!(SecretUrl::new("garbage :pw@").redacted(), "(not a URL)");
        let q = SecretUrl::new("postgres://db/kg?user=kg&password=qu3ry&sslmode=disable");
        let shown = q.redacted();
        assert!(
            !shown.contains("qu3ry") && shown.contains("sslmode=disable"),
            "{shown}"
        );
    }
}
