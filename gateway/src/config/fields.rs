//! The field names a config type deserializes, read from its `Deserialize` impl: the lists that
//! decide which `KLEINGATE_*` variables are config and which keys belong to which backend kind
//! come from the types themselves, so a new field cannot be missing from them.

use serde::de::{self, Deserialize, Deserializer, Visitor};

/// The fields of struct `T` (a `#[derive(Deserialize)]` struct without `flatten`).
pub(crate) fn of<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    let mut probe = Probe(&[]);
    // The probe answers every call with an error; what matters is what it saw.
    let _ = T::deserialize(&mut probe);
    probe.0
}

struct Probe(&'static [&'static str]);

#[derive(Debug)]
struct Seen;

impl std::fmt::Display for Seen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("field probe")
    }
}

impl std::error::Error for Seen {}

impl de::Error for Seen {
    fn custom<M: std::fmt::Display>(_: M) -> Self {
        Seen
    }
}

impl<'de> Deserializer<'de> for &mut Probe {
    type Error = Seen;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Seen> {
        self.0 = fields;
        Err(Seen)
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Seen> {
        Err(Seen)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    #[derive(serde::Deserialize)]
    #[allow(dead_code)]
    struct Two {
        a: u32,
        #[serde(default)]
        b_c: String,
    }

    #[test]
    fn reads_a_structs_field_names() {
        assert_eq!(super::of::<Two>(), ["a", "b_c"]);
    }
}
