//! Model weights: safetensors files memory-mapped (zero-copy where the dtype is kept), sharded
//! checkpoints (`*.safetensors.index.json`), diffusers-style model folders (`config.json`
//! beside the weights), and GGUF files ([`gguf`]: every tensor mapped as stored, the block
//! formats of [`quant`] as block-quantized dtypes that the CPU GEMM reads as they are; widened
//! at load only for a GPU).
//!
//! Every failure is a [`WeightsError`] naming the file (and the tensor, where there is one): a
//! truncated or malformed file is an error, never a crash. Mapped files stay mapped while any
//! tensor viewing them is alive.

pub mod gguf;
pub mod packed;
pub mod quant;
pub mod residency;
pub mod vram;

use crate::tensor::ops::{self, OpError};
use crate::tensor::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why weights could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("{path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("{path}: tensor '{name}': {msg}")]
    Tensor {
        path: PathBuf,
        name: String,
        msg: String,
    },
}

fn file_err(path: &Path, msg: impl std::fmt::Display) -> WeightsError {
    WeightsError::File {
        path: path.to_path_buf(),
        msg: msg.to_string(),
    }
}

/// How to load: convert floating-point tensors to `dtype` (e.g. bf16 and f16 to f32 on the CPU),
/// and put every tensor on `device`.
#[derive(Clone, Copy, Debug, Default)]
pub struct LoadOptions {
    pub float_dtype: Option<DType>,
    pub device: Device,
}

/// Named tensors from one or more files.
#[derive(Clone, Default)]
pub struct Weights {
    pub tensors: BTreeMap<String, Tensor>,
    /// The files they came from.
    pub files: Vec<PathBuf>,
    /// A GGUF file's metadata (values as text: arrays as `[1, 2, 3]`), and for each tensor stored
    /// in a block format, `ditflow.format.<name>` = its format (`Q8_0`, ...).
    pub metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Weights({} tensors from {:?})",
            self.tensors.len(),
            self.files
        )
    }
}

fn dtype_of(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::I64 => DType::I64,
        S::I32 => DType::I32,
        S::U8 | S::BOOL => DType::U8,
        _ => return None,
    })
}

impl Weights {
    /// Opens a `.safetensors` or `.gguf` file, a `*.safetensors.index.json`, or a diffusers
    /// model folder.
    pub fn open(path: &Path, opts: LoadOptions) -> Result<Weights, WeightsError> {
        if path.is_dir() {
            return Weights::open(&find_weights_in(path)?, opts);
        }
        if path.to_string_lossy().ends_with(".index.json") {
            return Weights::open_sharded(path, opts);
        }
        let mut w = Weights::default();
        w.add_file(path, opts)?;
        Ok(w)
    }

    fn open_sharded(index: &Path, opts: LoadOptions) -> Result<Weights, WeightsError> {
        let text = std::fs::read_to_string(index).map_err(|e| file_err(index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| file_err(index, format!("not valid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| file_err(index, "no \"weight_map\" object"))?;
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shards: Vec<&str> = Vec::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| {
                file_err(
                    index,
                    format!("weight_map entry '{name}' is not a file name"),
                )
            })?;
            if Path::new(file)
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                return Err(file_err(
                    index,
                    format!("shard '{file}' must be a plain file name beside the index"),
                ));
            }
            if !shards.contains(&file) {
                shards.push(file);
            }
        }
        let mut w = Weights::default();
        for shard in shards {
            w.add_file(&dir.join(shard), opts)?;
        }
        for name in map.keys() {
            if !w.tensors.contains_key(name) {
                return Err(WeightsError::Tensor {
                    path: index.to_path_buf(),
                    name: name.clone(),
                    msg: "listed in the index but in no shard".into(),
                });
            }
        }
        Ok(w)
    }

    fn add_file(&mut self, path: &Path, opts: LoadOptions) -> Result<(), WeightsError> {
        let file = std::fs::File::open(path).map_err(|e| file_err(path, e))?;
        // SAFETY: the mapping is read-only; a file truncated by another process while mapped is
        // outside what we can defend against (as for every mmap reader).
        let map = Arc::new(unsafe { memmap2::Mmap::map(&file) }.map_err(|e| file_err(path, e))?);
        if map.starts_with(b"GGUF")
            || path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            return self.add_gguf(path, &map, opts);
        }
        let st = safetensors::SafeTensors::deserialize(&map)
            .map_err(|e| file_err(path, format!("not a valid safetensors file: {e}")))?;
        let base = map.as_ptr() as usize;
        for (name, view) in st.tensors() {
            let terr = |msg: String| WeightsError::Tensor {
                path: path.to_path_buf(),
                name: name.clone(),
                msg,
            };
            let dtype = match dtype_of(view.dtype()) {
                Some(d) => d,
                None if view.dtype() == safetensors::Dtype::F64 => DType::F32,
                None => return Err(terr(format!("dtype {:?} is not supported", view.dtype()))),
            };
            let t = if view.dtype() == safetensors::Dtype::F64 {
                let vals: Vec<f32> = view
                    .data()
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                    .collect();
                Tensor::from_f32(view.shape(), &vals).map_err(|e| terr(e.to_string()))?
            } else {
                let offset = view.data().as_ptr() as usize - base;
                Tensor::from_mapped(dtype, view.shape(), &map, offset, view.data().len())
                    .map_err(|e| terr(e.to_string()))?
            };
            self.insert(path, &name, t, opts)?;
        }
        self.files.push(path.to_path_buf());
        Ok(())
    }

    /// A GGUF file's tensors, each mapped as stored (a block format as its quantized dtype; see
    /// [`Weights::insert`] for the GPU); its metadata into [`Weights::metadata`].
    fn add_gguf(
        &mut self,
        path: &Path,
        map: &Arc<memmap2::Mmap>,
        opts: LoadOptions,
    ) -> Result<(), WeightsError> {
        let file = gguf::Gguf::parse(map).map_err(|e| file_err(path, format!("GGUF: {e}")))?;
        for (k, v) in &file.metadata {
            self.metadata.insert(k.clone(), v.to_string());
        }
        for info in &file.tensors {
            let terr = |msg: String| WeightsError::Tensor {
                path: path.to_path_buf(),
                name: info.name.clone(),
                msg,
            };
            let shape = info.shape();
            let stored = match info.kind {
                gguf::GgufType::F32 => Some(DType::F32),
                gguf::GgufType::F16 => Some(DType::F16),
                gguf::GgufType::BF16 => Some(DType::BF16),
                gguf::GgufType::Blocks(_) => None,
            };
            let t = match (stored, info.kind) {
                (Some(dtype), _) => Tensor::from_mapped(dtype, &shape, map, info.start, info.len)
                    .map_err(|e| terr(e.to_string()))?,
                (None, gguf::GgufType::Blocks(format)) => {
                    self.metadata.insert(
                        format!("ditflow.format.{}", info.name),
                        format.name().to_string(),
                    );
                    Tensor::from_mapped(format.dtype(), &shape, map, info.start, info.len)
                        .map_err(|e| terr(e.to_string()))?
                }
                (None, _) => unreachable!("every unmapped type is a block format"),
            };
            self.insert(path, &info.name, t, opts)?;
        }
        self.files.push(path.to_path_buf());
        Ok(())
    }

    /// Adds tensor `name` of file `path`, cast and moved as `opts` ask.
    fn insert(
        &mut self,
        path: &Path,
        name: &str,
        mut t: Tensor,
        opts: LoadOptions,
    ) -> Result<(), WeightsError> {
        let terr = |msg: String| WeightsError::Tensor {
            path: path.to_path_buf(),
            name: name.to_string(),
            msg,
        };
        if let Some(fd) = opts.float_dtype {
            if matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) && t.dtype() != fd {
                t = ops::cast(&t, fd).map_err(|e| terr(e.to_string()))?;
            }
        }
        if let Device::Cuda(ordinal) = opts.device {
            // Under the VRAM cap a weight that does not fit stays in host memory, as stored, and
            // is staged on use (see `vram`). A block format goes up as stored too: the GPU's
            // linear layers dequantise it per layer (`kernels::cuda::ops::dequantize`).
            let charge = if vram::cap().is_some() { t.nbytes() } else { 0 };
            if vram::try_charge(ordinal, charge) {
                t = upload_weight(&t, ordinal, charge).map_err(|e| terr(e.to_string()))?;
            }
        }
        if self.tensors.insert(name.to_string(), t).is_some() {
            return Err(terr("appears in two files".into()));
        }
        Ok(())
    }

    /// The tensor `name`, with its shape checked when `shape` is given.
    pub fn get(&self, name: &str, shape: Option<&[usize]>) -> Result<&Tensor, WeightsError> {
        let path = self.files.first().cloned().unwrap_or_default();
        let t = self.tensors.get(name).ok_or_else(|| WeightsError::Tensor {
            path: path.clone(),
            name: name.into(),
            msg: "missing from the checkpoint".into(),
        })?;
        if let Some(s) = shape {
            if t.shape() != s {
                return Err(WeightsError::Tensor {
                    path,
                    name: name.into(),
                    msg: format!("has shape {:?}, expected {s:?}", t.shape()),
                });
            }
        }
        Ok(t)
    }

    /// Total bytes of all tensors.
    pub fn nbytes(&self) -> usize {
        self.tensors.values().map(|t| t.nbytes()).sum()
    }
}

/// The standard weights names of diffusers and transformers folders, most specific first.
const STANDARD_NAMES: &[&str] = &[
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
    "model.safetensors.index.json",
    "model.safetensors",
];

/// The weights file of a diffusers-style folder: a standard name (`diffusion_pytorch_model` or
/// `model`, sharded index first), else the only `*.safetensors.index.json`, else the only
/// `*.safetensors`.
fn find_weights_in(dir: &Path) -> Result<PathBuf, WeightsError> {
    if let Some(p) = STANDARD_NAMES
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
    {
        return Ok(p);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| file_err(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    files.sort();
    let name = |p: &PathBuf| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    if let Some(index) = files
        .iter()
        .find(|p| name(p).ends_with(".safetensors.index.json"))
    {
        return Ok(index.clone());
    }
    let singles: Vec<&PathBuf> = files
        .iter()
        .filter(|p| name(p).ends_with(".safetensors"))
        .collect();
    match singles[..] {
        [one] => Ok(one.clone()),
        [] => Err(file_err(dir, "no .safetensors weights in this folder")),
        _ => Err(file_err(
            dir,
            format!(
                "several .safetensors files and no index: {:?}",
                singles.iter().map(|p| name(p)).collect::<Vec<_>>()
            ),
        )),
    }
}

/// A diffusers-style model folder: its `config.json` and its weights.
#[derive(Debug)]
pub struct ModelFolder {
    pub dir: PathBuf,
    pub config: serde_json::Value,
    /// `_class_name` (diffusers) or the first of `architectures` (transformers), if present.
    pub class_name: Option<String>,
    pub weights: Weights,
}

impl ModelFolder {
    pub fn open(dir: &Path, opts: LoadOptions) -> Result<ModelFolder, WeightsError> {
        if !dir.is_dir() {
            return Err(file_err(dir, "no such model folder"));
        }
        let cfg_path = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| file_err(&cfg_path, e))?;
        let config: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| file_err(&cfg_path, format!("not valid JSON: {e}")))?;
        if !config.is_object() {
            return Err(file_err(&cfg_path, "expected a JSON object"));
        }
        let class_name = config
            .get("_class_name")
            .and_then(|v| v.as_str())
            .or_else(|| {
                config
                    .get("architectures")
                    .and_then(|a| a.get(0))
                    .and_then(|v| v.as_str())
            })
            .map(str::to_string);
        let weights = Weights::open(dir, opts)?;
        Ok(ModelFolder {
            dir: dir.to_path_buf(),
            config,
            class_name,
            weights,
        })
    }
}

impl From<WeightsError> for OpError {
    fn from(e: WeightsError) -> OpError {
        OpError::Device(e.to_string())
    }
}

/// Uploads weight `t` to GPU `ordinal`, its `charge` bytes counted by the VRAM cap while the
/// copy lives.
fn upload_weight(t: &Tensor, ordinal: usize, charge: usize) -> Result<Tensor, OpError> {
    #[cfg(feature = "cuda")]
    {
        crate::kernels::cuda::ops::to_device_charged(t, ordinal, charge)
    }
    #[cfg(not(feature = "cuda"))]
    {
        vram::uncharge(ordinal, charge);
        t.to_device(Device::Cuda(ordinal))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_st(path: &Path, tensors: &[(&str, DType, Vec<usize>, Vec<u8>)]) {
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(n, d, s, b)| {
                let dt = match d {
                    DType::F32 => safetensors::Dtype::F32,
                    DType::BF16 => safetensors::Dtype::BF16,
                    DType::F16 => safetensors::Dtype::F16,
                    _ => safetensors::Dtype::I64,
                };
                (
                    n.to_string(),
                    safetensors::tensor::TensorView::new(dt, s.clone(), b).unwrap(),
                )
            })
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ditflow-weights-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn maps_zero_copy_converts_and_reads_shards_and_folders() {
        let d = dir("ok");
        let a: Vec<u8> = [1f32, 2., 3., 4.]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let b = crate::tensor::convert::from_f32(&[0.5, -1.5], DType::BF16);
        write_st(
            &d.join("one.safetensors"),
            &[
                ("a", DType::F32, vec![2, 2], a.clone()),
                ("b", DType::BF16, vec![2], b.clone()),
            ],
        );
        let w = Weights::open(&d.join("one.safetensors"), LoadOptions::default()).unwrap();
        let ta = w.get("a", Some(&[2, 2])).unwrap();
        assert!(ta.is_mapped(), "f32 is zero-copy");
        assert_eq!(ta.as_f32(), &[1., 2., 3., 4.]);
        assert!(w
            .get("a", Some(&[4]))
            .unwrap_err()
            .to_string()
            .contains("has shape [2, 2], expected [4]"));
        assert!(w
            .get("zz", None)
            .unwrap_err()
            .to_string()
            .contains("tensor 'zz': missing"));
        let w32 = Weights::open(
            &d.join("one.safetensors"),
            LoadOptions {
                float_dtype: Some(DType::F32),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(w32.get("b", None).unwrap().as_f32(), &[0.5, -1.5]);

        // Sharded, in a diffusers-style folder.
        let m = dir("folder");
        write_st(
            &m.join("diffusion_pytorch_model-00001-of-00002.safetensors"),
            &[("a", DType::F32, vec![4], a)],
        );
        write_st(
            &m.join("diffusion_pytorch_model-00002-of-00002.safetensors"),
            &[("b", DType::BF16, vec![2], b)],
        );
        std::fs::write(
            m.join("diffusion_pytorch_model.safetensors.index.json"),
            r#"{"metadata": {}, "weight_map": {"a": "diffusion_pytorch_model-00001-of-00002.safetensors", "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        std::fs::write(
            m.join("config.json"),
            r#"{"_class_name": "PixArtTransformer2DModel", "num_layers": 2}"#,
        )
        .unwrap();
        let f = ModelFolder::open(&m, LoadOptions::default()).unwrap();
        assert_eq!(f.class_name.as_deref(), Some("PixArtTransformer2DModel"));
        assert_eq!(f.weights.tensors.len(), 2);
        assert_eq!(f.weights.files.len(), 2);
    }

    #[test]
    fn malformed_and_truncated_files_are_errors_naming_the_file() {
        let d = dir("bad");
        let good = d.join("good.safetensors");
        let a: Vec<u8> = (0..64u8).collect();
        write_st(&good, &[("a", DType::F32, vec![16], a)]);
        let bytes = std::fs::read(&good).unwrap();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("short", bytes[..5].to_vec()),
            ("truncated", bytes[..bytes.len() - 10].to_vec()),
            ("huge_header", {
                let mut b = bytes.clone();
                b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
                b
            }),
            ("garbage_header", {
                let mut b = bytes.clone();
                b[8] = b'!';
                b
            }),
        ];
        for (name, data) in cases {
            let p = d.join(format!("{name}.safetensors"));
            std::fs::write(&p, data).unwrap();
            let e = Weights::open(&p, LoadOptions::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("{name}.safetensors")), "{name}: {e}");
        }
        let e = Weights::open(&d.join("missing.safetensors"), LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.safetensors"), "{e}");
        std::fs::write(
            d.join("x.index.json"),
            r#"{"weight_map": {"a": "../etc/passwd"}}"#,
        )
        .unwrap();
        let e = Weights::open(&d.join("x.index.json"), LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("plain file name"), "{e}");
        let e = ModelFolder::open(&d.join("nope"), LoadOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no such model folder"), "{e}");
    }
}
