//! GGUF files (the format of llama.cpp, stable-diffusion.cpp and ComfyUI-GGUF), read as ggml
//! defines them (`gguf.h`, versions 2 and 3, little-endian): the header, the metadata key-value
//! pairs, the tensor infos, and the aligned data section. Every length and offset is checked
//! against the file, so a truncated or malformed file is an error naming what is wrong.
//!
//! A tensor's dims are ggml's `ne` (fastest first); [`GgufTensor::shape`] is the usual
//! row-major shape, the dims reversed.

use super::quant::BlockFormat;
use std::collections::BTreeMap;

/// "GGUF", little-endian.
const MAGIC: u32 = 0x4655_4747;
const DEFAULT_ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Clone, Debug, PartialEq)]
pub enum GgufValue {
    Int(i64),
    /// u64 values beyond i64.
    UInt(u64),
    Float(f64),
    Bool(bool),
    String(String),
    Array(Vec<GgufValue>),
}

impl std::fmt::Display for GgufValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GgufValue::Int(v) => write!(f, "{v}"),
            GgufValue::UInt(v) => write!(f, "{v}"),
            GgufValue::Float(v) => write!(f, "{v}"),
            GgufValue::Bool(v) => write!(f, "{v}"),
            GgufValue::String(s) => write!(f, "{s}"),
            GgufValue::Array(items) => {
                write!(f, "[")?;
                for (i, v) in items.iter().enumerate() {
                    if i > 0 {
                        write!(f, ", ")?;
                    }
                    match v {
                        GgufValue::String(s) => write!(f, "{s:?}")?,
                        v => write!(f, "{v}")?,
                    }
                }
                write!(f, "]")
            }
        }
    }
}

/// How a tensor's data is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    BF16,
    Blocks(BlockFormat),
}

impl GgufType {
    fn from_ggml(id: u32) -> Option<GgufType> {
        Some(match id {
            0 => GgufType::F32,
            1 => GgufType::F16,
            30 => GgufType::BF16,
            id => GgufType::Blocks(BlockFormat::from_ggml(id)?),
        })
    }

    /// ggml's name for it.
    pub fn name(self) -> &'static str {
        match self {
            GgufType::F32 => "F32",
            GgufType::F16 => "F16",
            GgufType::BF16 => "BF16",
            GgufType::Blocks(b) => b.name(),
        }
    }
}

/// ggml's names of the types this reader does not handle, for the error.
fn unsupported_name(id: u32) -> &'static str {
    match id {
        9 => "Q8_1",
        10 => "Q2_K",
        11 => "Q3_K",
        15 => "Q8_K",
        16..=23 | 29 => "an IQ format",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        34 | 35 => "a ternary format",
        _ => "unknown",
    }
}

/// One tensor's place in the file.
#[derive(Clone, Debug)]
pub struct GgufTensor {
    pub name: String,
    /// ggml's `ne`, fastest-varying first.
    pub dims: Vec<usize>,
    pub kind: GgufType,
    /// Byte range in the file.
    pub start: usize,
    pub len: usize,
}

impl GgufTensor {
    /// The row-major shape (`dims` reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().copied().collect()
    }
}

/// A parsed GGUF file (its tensors' bytes stay in the caller's buffer).
#[derive(Clone, Debug)]
pub struct Gguf {
    pub version: u32,
    pub metadata: BTreeMap<String, GgufValue>,
    pub tensors: Vec<GgufTensor>,
}

impl Gguf {
    /// `general.architecture`, when the file says.
    pub fn architecture(&self) -> Option<&str> {
        match self.metadata.get("general.architecture") {
            Some(GgufValue::String(s)) => Some(s),
            _ => None,
        }
    }

    /// Parses `bytes`, a whole GGUF file.
    pub fn parse(bytes: &[u8]) -> Result<Gguf, String> {
        let mut r = Reader { bytes, at: 0 };
        let magic = r
            .u32()
            .map_err(|_| "not a GGUF file (too short)".to_string())?;
        if magic != MAGIC {
            return Err("not a GGUF file (no GGUF magic)".into());
        }
        let version = r.u32()?;
        if !(2..=3).contains(&version) {
            return Err(format!(
                "GGUF version {version} is not supported (versions 2 and 3 are)"
            ));
        }
        let n_tensors = r.count("tensor count")?;
        let n_kv = r.count("metadata count")?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = r.string()?;
            let ty = r.u32()?;
            let value = r
                .value(ty, 0)
                .map_err(|e| format!("metadata '{key}': {e}"))?;
            metadata.insert(key, value);
        }
        let mut infos = Vec::with_capacity(n_tensors.min(1 << 16));
        for _ in 0..n_tensors {
            let name = r.string()?;
            let n_dims = r.u32()? as usize;
            if n_dims > 8 {
                return Err(format!("tensor '{name}': {n_dims} dimensions (at most 8)"));
            }
            let dims = (0..n_dims)
                .map(|_| r.u64().map(|d| d as usize))
                .collect::<Result<Vec<_>, _>>()?;
            let ty = r.u32()?;
            let offset = r.u64()?;
            infos.push((name, dims, ty, offset));
        }
        let alignment = match metadata.get("general.alignment") {
            None => DEFAULT_ALIGNMENT,
            Some(GgufValue::Int(a)) if *a > 0 && (*a as u64).is_power_of_two() => *a as u64,
            Some(v) => return Err(format!("general.alignment {v} is not a power of two")),
        };
        let data_start = (r.at as u64).div_ceil(alignment) * alignment;
        let mut tensors = Vec::with_capacity(infos.len());
        for (name, dims, ty, offset) in infos {
            let terr = |m: String| format!("tensor '{name}': {m}");
            let kind = GgufType::from_ggml(ty).ok_or_else(|| {
                terr(format!(
                    "quantization type {ty} ({}) is not supported",
                    unsupported_name(ty)
                ))
            })?;
            let count = dims
                .iter()
                .try_fold(1usize, |a, &d| a.checked_mul(d))
                .ok_or_else(|| terr(format!("dims {dims:?} overflow")))?;
            let len = match kind {
                GgufType::F32 => count.checked_mul(4),
                GgufType::F16 | GgufType::BF16 => count.checked_mul(2),
                GgufType::Blocks(b) => {
                    let row = dims.first().copied().unwrap_or(1);
                    if row % b.block_len() != 0 {
                        return Err(terr(format!(
                            "{} blocks hold {} values, but its rows have {row}",
                            b.name(),
                            b.block_len()
                        )));
                    }
                    (count / b.block_len()).checked_mul(b.block_bytes())
                }
            }
            .ok_or_else(|| terr("size overflows".into()))?;
            if offset % alignment != 0 {
                return Err(terr(format!(
                    "offset {offset} is not aligned to {alignment}"
                )));
            }
            let start = data_start
                .checked_add(offset)
                .filter(|s| *s <= bytes.len() as u64)
                .ok_or_else(|| terr("starts past the end of the file (truncated?)".into()))?
                as usize;
            if bytes.len() - start < len {
                return Err(terr(format!(
                    "needs {len} bytes at {start}, but the file ends {} bytes later (truncated?)",
                    bytes.len() - start
                )));
            }
            tensors.push(GgufTensor {
                name,
                dims,
                kind,
                start,
                len,
            });
        }
        Ok(Gguf {
            version,
            metadata,
            tensors,
        })
    }
}

/// A cursor over the file's bytes; every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| format!("the header ends early at byte {} (truncated?)", self.at))?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }

    /// A count that must fit in what is left of the file (at least a byte per item).
    fn count(&mut self, what: &str) -> Result<usize, String> {
        let n = self.u64()?;
        if n > (self.bytes.len() - self.at) as u64 {
            return Err(format!(
                "{what} {n} is more than the rest of the file could hold (truncated?)"
            ));
        }
        Ok(n as usize)
    }

    fn string(&mut self) -> Result<String, String> {
        let n = self.count("a string length")?;
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| "a string is not UTF-8".into())
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<GgufValue, String> {
        let b = |r: &mut Self, n| r.take(n).map(|s| s.to_vec());
        Ok(match ty {
            0 => GgufValue::Int(i64::from(b(self, 1)?[0])),
            1 => GgufValue::Int(i64::from(b(self, 1)?[0] as i8)),
            2 => GgufValue::Int(i64::from(u16::from_le_bytes(
                b(self, 2)?.try_into().unwrap(),
            ))),
            3 => GgufValue::Int(i64::from(i16::from_le_bytes(
                b(self, 2)?.try_into().unwrap(),
            ))),
            4 => GgufValue::Int(i64::from(self.u32()?)),
            5 => GgufValue::Int(i64::from(self.u32()? as i32)),
            6 => GgufValue::Float(f64::from(f32::from_bits(self.u32()?))),
            7 => GgufValue::Bool(b(self, 1)?[0] != 0),
            8 => GgufValue::String(self.string()?),
            9 => {
                if depth > 4 {
                    return Err("arrays nested too deeply".into());
                }
                let inner = self.u32()?;
                let n = self.count("an array length")?;
                let items = (0..n)
                    .map(|_| self.value(inner, depth + 1))
                    .collect::<Result<Vec<_>, _>>()?;
                GgufValue::Array(items)
            }
            10 => {
                let v = self.u64()?;
                i64::try_from(v).map_or(GgufValue::UInt(v), GgufValue::Int)
            }
            11 => GgufValue::Int(self.u64()? as i64),
            12 => GgufValue::Float(f64::from_bits(self.u64()?)),
            t => return Err(format!("unknown value type {t}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::{LoadOptions, Weights};
    use std::path::{Path, PathBuf};

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/gguf/quants.gguf")
    }

    /// The reference values: the `gguf` package's `dequantize` of each tensor
    /// (tools/make_gguf_fixtures.py).
    fn expected() -> Weights {
        Weights::open(
            &fixture().with_extension("safetensors"),
            LoadOptions::default(),
        )
        .expect("the reference")
    }

    #[test]
    fn every_format_dequantises_as_the_gguf_package_does_bit_for_bit() {
        let w = Weights::open(&fixture(), LoadOptions::default()).expect("the GGUF fixture");
        let want = expected();
        let formats = [
            "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K",
        ];
        for f in formats {
            let name = format!("w.{f}");
            let got = w.get(&name, Some(&[4, 512])).expect("present, [4, 512]");
            let got = crate::tensor::ops::cast(got, crate::tensor::DType::F32).expect("f32");
            let reference = want.get(&name, Some(&[4, 512])).expect("a reference");
            let (a, b) = (got.as_f32(), reference.as_f32());
            let differ = a
                .iter()
                .zip(b)
                .filter(|(x, y)| x.to_bits() != y.to_bits())
                .count();
            assert_eq!(differ, 0, "{f}: {differ} of {} values differ", a.len());
            let stored = w.metadata.get(&format!("ditflow.format.{name}"));
            let block = !matches!(f, "F32" | "F16" | "BF16");
            assert_eq!(stored.map(String::as_str), block.then_some(f), "{f}");
        }
        // Every tensor is kept as stored: the block formats as their quantized dtypes, whose
        // bytes are the file's.
        use crate::tensor::DType;
        assert_eq!(w.get("w.BF16", None).unwrap().dtype(), DType::BF16);
        let q4k = w.get("w.Q4_K", None).unwrap();
        assert_eq!((q4k.dtype(), q4k.shape()), (DType::Q4K, &[4usize, 512][..]));
        assert_eq!(q4k.nbytes(), 4 * 2 * 144);
        let q8 = w.get("w.Q8_0", None).unwrap();
        assert_eq!((q8.dtype(), q8.nbytes()), (DType::Q8_0, 4 * 16 * 34));
    }

    #[test]
    fn the_metadata_is_read_with_its_types() {
        let bytes = std::fs::read(fixture()).unwrap();
        let g = Gguf::parse(&bytes).expect("parses");
        assert_eq!(g.version, 3);
        assert_eq!(g.architecture(), Some("flux"));
        let m = &g.metadata;
        assert_eq!(m["fixture.u32"], GgufValue::Int(7));
        assert_eq!(m["fixture.i64"], GgufValue::Int(-3));
        assert_eq!(m["fixture.f32"], GgufValue::Float(0.5));
        assert_eq!(m["fixture.bool"], GgufValue::Bool(true));
        assert_eq!(m["fixture.array"].to_string(), "[1, 2, 3]");
        assert_eq!(g.tensors.len(), 11);
        assert_eq!(g.tensors[0].shape(), [4, 512]);
        assert_eq!(g.tensors[0].dims, [512, 4]);
    }

    /// The position of tensor `name`'s type field in the header (the u32 before its u64
    /// offset, after its dims).
    fn type_field(bytes: &[u8], name: &str) -> usize {
        let at = bytes
            .windows(name.len())
            .position(|w| w == name.as_bytes())
            .expect("the name is in the header");
        // name, n_dims (u32), 2 dims (u64 each), then the type.
        at + name.len() + 4 + 16
    }

    #[test]
    fn bad_files_are_errors_that_say_why() {
        let bytes = std::fs::read(fixture()).unwrap();
        let err = |b: &[u8]| Gguf::parse(b).expect_err("refused");
        // Truncated: in the header, and in the data.
        assert!(
            err(&bytes[..100]).contains("truncated"),
            "{}",
            err(&bytes[..100])
        );
        let e = err(&bytes[..bytes.len() - 40]);
        assert!(e.contains("w.Q6_K") && e.contains("truncated"), "{e}");
        assert!(err(b"GGU").contains("not a GGUF file"));
        assert!(err(b"PK\x03\x04 not gguf").contains("no GGUF magic"));
        // An unknown quantization type, and one this reader does not handle.
        let mut b = bytes.clone();
        let at = type_field(&b, "w.Q8_0");
        assert_eq!(u32::from_le_bytes(b[at..at + 4].try_into().unwrap()), 8);
        b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
        let e = err(&b);
        assert!(
            e.contains("w.Q8_0") && e.contains("type 99") && e.contains("unknown"),
            "{e}"
        );
        b[at..at + 4].copy_from_slice(&11u32.to_le_bytes());
        assert!(err(&b).contains("Q3_K"), "{}", err(&b));
        // Another version.
        let mut b = bytes.clone();
        b[4..8].copy_from_slice(&1u32.to_le_bytes());
        assert!(err(&b).contains("version 1"));
        // Through Weights, the error names the file.
        let dir = std::env::temp_dir().join(format!("ditflow-gguf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cut = dir.join("cut.gguf");
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let e = Weights::open(&cut, LoadOptions::default()).expect_err("truncated");
        assert!(e.to_string().contains("cut.gguf"), "{e}");
    }

    #[test]
    fn no_cut_or_flipped_byte_panics() {
        let bytes = std::fs::read(fixture()).unwrap();
        for end in (0..bytes.len()).step_by(13) {
            let _ = Gguf::parse(&bytes[..end]);
        }
        // Each header byte set to 0xFF in turn (lengths, counts, types, dims and offsets).
        for at in 0..800 {
            let mut b = bytes.clone();
            b[at] = 0xFF;
            if let Ok(g) = Gguf::parse(&b) {
                for t in &g.tensors {
                    assert!(t.start + t.len <= b.len(), "{} past the end", t.name);
                }
            }
        }
    }
}
