//! Small value types that appear in config and job files: sizes (`2GiB`), durations (`30m`),
//! column types (`int64`), Parquet compression (`zstd(3)`), scalar params and an insertion-ordered
//! map (column order in `columns:` is the table's column order).

use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

/// Parses through `FromStr` and reports its message as a serde error.
macro_rules! deserialize_from_str {
    ($ty:ty, $expecting:expr) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str($expecting)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$ty, E> {
                        v.parse().map_err(E::custom)
                    }
                    fn visit_u64<E: de::Error>(self, v: u64) -> Result<$ty, E> {
                        v.to_string().parse().map_err(E::custom)
                    }
                    fn visit_i64<E: de::Error>(self, v: i64) -> Result<$ty, E> {
                        v.to_string().parse().map_err(E::custom)
                    }
                }
                d.deserialize_any(V)
            }
        }
    };
}

/// A byte count written as `512MiB`, `2GiB`, `1.5GB` or a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a size; write e.g. 512MiB or 2GiB"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "TiB" => 1 << 40,
            u => {
                return Err(format!(
                    "unknown size unit `{u}`; use B, KiB, MiB, GiB, KB, MB or GB"
                ));
            }
        };
        let bytes = n * mult as f64;
        // `as` would saturate silently: a size beyond 16 EiB is a typo, not a limit.
        if !bytes.is_finite() || bytes >= u64::MAX as f64 {
            return Err(format!("`{s}` is too large for a size"));
        }
        Ok(ByteSize(bytes as u64))
    }
}
deserialize_from_str!(ByteSize, "a size such as 2GiB");

/// A duration written as `90s`, `30m`, `2h`, `1d`, `500ms` or a combination (`1h 30m`); parsed
/// by humantime, so an amount too large to represent is an error, never a wrap-around.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationSpec(pub Duration);

/// The longest duration accepted (100 years): far beyond any timeout or backoff, and far
/// below what makes instant arithmetic overflow.
const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

impl FromStr for DurationSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let bad =
            |why: String| format!("`{s}` is not a duration ({why}); write e.g. 90s, 30m, 2h or 1d");
        if t.chars().next().is_some_and(|c| c.is_ascii_digit())
            && t.chars().all(|c| c.is_ascii_digit())
        {
            return Err(bad("it has no unit".into()));
        }
        let d = humantime::parse_duration(t).map_err(|e| bad(e.to_string()))?;
        if d > MAX_DURATION {
            return Err(format!(
                "`{s}` is longer than 100 years; write a shorter duration"
            ));
        }
        Ok(DurationSpec(d))
    }
}
deserialize_from_str!(DurationSpec, "a duration such as 30m");

/// A declared column type. `timestamp` accepts any unit and time zone; `utf8` any string layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    Bool,
    Int32,
    Int64,
    Float32,
    Float64,
    Utf8,
    Date,
    Timestamp,
    Decimal,
}

impl FromStr for ColumnType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "bool" | "boolean" => Self::Bool,
            "int32" | "int" => Self::Int32,
            "int64" | "bigint" => Self::Int64,
            "float32" | "float" => Self::Float32,
            "float64" | "double" => Self::Float64,
            "utf8" | "string" => Self::Utf8,
            "date" => Self::Date,
            "timestamp" => Self::Timestamp,
            "decimal" => Self::Decimal,
            _ => {
                return Err(format!(
                    "unknown column type `{s}`; use one of bool, int32, int64, float32, float64, \
                     utf8, date, timestamp, decimal"
                ));
            }
        })
    }
}
deserialize_from_str!(ColumnType, "a column type such as int64");

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Self::Bool => "bool",
            Self::Int32 => "int32",
            Self::Int64 => "int64",
            Self::Float32 => "float32",
            Self::Float64 => "float64",
            Self::Utf8 => "utf8",
            Self::Date => "date",
            Self::Timestamp => "timestamp",
            Self::Decimal => "decimal",
        };
        f.write_str(s)
    }
}

/// Parquet compression of output files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Snappy,
    Zstd(i32),
}

impl Default for Compression {
    fn default() -> Self {
        Self::Zstd(3)
    }
}

impl FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("unknown compression `{s}`; use none, snappy, zstd or zstd(1..22)");
        match s {
            "none" | "uncompressed" => Ok(Self::None),
            "snappy" => Ok(Self::Snappy),
            "zstd" => Ok(Self::Zstd(3)),
            _ => {
                let level = s
                    .strip_prefix("zstd(")
                    .and_then(|r| r.strip_suffix(')'))
                    .and_then(|n| n.parse::<i32>().ok())
                    .filter(|n| (1..=22).contains(n))
                    .ok_or_else(bad)?;
                Ok(Self::Zstd(level))
            }
        }
    }
}
deserialize_from_str!(Compression, "a compression such as zstd(3)");

impl Compression {
    /// The spelling DataFusion's `TableParquetOptions` expects.
    pub fn datafusion_name(&self) -> String {
        match self {
            Self::None => "uncompressed".into(),
            Self::Snappy => "snappy".into(),
            Self::Zstd(l) => format!("zstd({l})"),
        }
    }
}

/// A job parameter: a scalar that templates render as written.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(untagged)]
pub enum ParamValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
}

impl fmt::Display for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bool(b) => write!(f, "{b}"),
            Self::Int(i) => write!(f, "{i}"),
            Self::Float(x) => write!(f, "{x}"),
            Self::Str(s) => f.write_str(s),
        }
    }
}

/// A mapping that keeps the order it was written in and rejects duplicate keys.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderedMap<V>(pub Vec<(String, V)>);

impl<V> Default for OrderedMap<V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<V> OrderedMap<V> {
    pub fn get(&self, key: &str) -> Option<&V> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
    pub fn iter(&self) -> impl Iterator<Item = (&String, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.0.iter().map(|(k, _)| k)
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for OrderedMap<V> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MapVisitor<V>(PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for MapVisitor<V> {
            type Value = OrderedMap<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out: Vec<(String, V)> = Vec::new();
                while let Some(k) = map.next_key::<String>()? {
                    if out.iter().any(|(e, _)| *e == k) {
                        return Err(de::Error::custom(format!("duplicate key `{k}`")));
                    }
                    let v = map.next_value()?;
                    out.push((k, v));
                }
                Ok(OrderedMap(out))
            }
        }
        d.deserialize_map(MapVisitor(PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!("2GiB".parse::<ByteSize>().unwrap().0, 2 << 30);
        assert_eq!("512MiB".parse::<ByteSize>().unwrap().0, 512 << 20);
        assert_eq!("1.5GB".parse::<ByteSize>().unwrap().0, 1_500_000_000);
        assert!("2 lots".parse::<ByteSize>().is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(
            "30m".parse::<DurationSpec>().unwrap().0,
            Duration::from_secs(1800)
        );
        assert_eq!(
            "500ms".parse::<DurationSpec>().unwrap().0,
            Duration::from_millis(500)
        );
        assert_eq!(
            "1h 30m".parse::<DurationSpec>().unwrap().0,
            Duration::from_secs(5400)
        );
        assert!("30".parse::<DurationSpec>().is_err());
        assert!("soon".parse::<DurationSpec>().is_err());
    }

    /// Before humantime, `99999999999d` multiplied past u64 (a panic in debug builds, a wrapped
    /// small duration in release).
    #[test]
    fn huge_durations_are_an_error_not_an_overflow() {
        for huge in ["99999999999d", "18446744073709551615s", "200000d"] {
            let err = huge.parse::<DurationSpec>().unwrap_err();
            assert!(err.contains(huge), "{err}");
        }
        assert!("99999999999999999999TiB".parse::<ByteSize>().is_err());
    }

    #[test]
    fn compression() {
        assert_eq!(
            "zstd(9)".parse::<Compression>().unwrap(),
            Compression::Zstd(9)
        );
        assert_eq!(
            "snappy".parse::<Compression>().unwrap(),
            Compression::Snappy
        );
        assert!("zstd(99)".parse::<Compression>().is_err());
        assert!("gzip".parse::<Compression>().is_err());
    }
}
