//! Tensor file nodes: `LoadTensor` reads one tensor from a safetensors file and `SaveTensor`
//! writes one. The dtype mapping and the file parsing are plain functions
//! ([`read_safetensor`], [`tensor_view`]).

use crate::tensor::check_cpu_data;
use ditflow_plugin::files::{absolute, file_fingerprint, input_path, io_error, output_path};
use ditflow_plugin::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::path::Path;

/// How many tensor names an error about a missing name lists.
const LIST_NAMES: usize = 10;

/// The ditflow dtype of a safetensors dtype, or `None` for one ditflow does not support.
pub fn dtype_from_safetensors(dtype: Dtype) -> Option<DType> {
    Some(match dtype {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::I64 => DType::I64,
        Dtype::I32 => DType::I32,
        Dtype::U8 => DType::U8,
        _ => return None,
    })
}

/// The safetensors dtype of a ditflow dtype; `None` for a block format (safetensors has none).
pub fn dtype_to_safetensors(dtype: DType) -> Option<Dtype> {
    Some(match dtype {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::I64 => Dtype::I64,
        DType::I32 => Dtype::I32,
        DType::U8 => Dtype::U8,
        _ => return None,
    })
}

/// Finds tensor `name` in `bytes`, the contents of the safetensors file `file` (used in errors),
/// and returns its dtype, shape and row-major little-endian data.
///
/// A malformed file, a missing name (listing up to ten of the names there are) and an unsupported
/// dtype are errors naming the file and the tensor.
pub fn read_safetensor<'a>(
    bytes: &'a [u8],
    file: &Path,
    name: &str,
) -> Result<(DType, Vec<usize>, &'a [u8])> {
    let file = file.display();
    let tensors = SafeTensors::deserialize(bytes).map_err(|e| {
        Error(format!(
            "cannot read tensor {name:?}: {file} is not a valid safetensors file: {e}"
        ))
    })?;
    let view = match tensors.tensor(name) {
        Ok(view) => view,
        Err(_) => {
            let mut names = tensors.names();
            names.sort_unstable();
            let listed = names.iter().take(LIST_NAMES).map(|n| format!("{n:?}"));
            let mut list = listed.collect::<Vec<_>>().join(", ");
            if names.len() > LIST_NAMES {
                list.push_str(&format!(" and {} more", names.len() - LIST_NAMES));
            }
            if names.is_empty() {
                bail!("{file} has no tensor {name:?}: the file holds no tensors");
            }
            let n = names.len();
            let plural = if n == 1 { "" } else { "s" };
            bail!("{file} has no tensor {name:?}; it holds {n} tensor{plural}: {list}");
        }
    };
    let dtype = dtype_from_safetensors(view.dtype()).ok_or_else(|| {
        Error(format!(
            "tensor {name:?} in {file} has dtype {}, which ditflow does not support \
             (supported: F32, F16, BF16, I64, I32, U8)",
            view.dtype()
        ))
    })?;
    Ok((dtype, view.shape().to_vec(), view.data()))
}

/// A safetensors view of one tensor's row-major little-endian `data`, ready to serialise.
pub fn tensor_view<'a>(
    name: &str,
    dtype: DType,
    shape: &[usize],
    data: &'a [u8],
) -> Result<TensorView<'a>> {
    let st = dtype_to_safetensors(dtype).ok_or_else(|| {
        Error(format!(
            "cannot save tensor {name:?}: safetensors has no {} (a block-quantized dtype); \
             cast it to f32 first",
            dtype.name()
        ))
    })?;
    TensorView::new(st, shape.to_vec(), data)
        .map_err(|e| Error(format!("cannot save tensor {name:?}: {e}")))
}

/// `LoadTensor`: one tensor from a safetensors file.
#[derive(Default)]
pub struct LoadTensor;

impl Node for LoadTensor {
    fn schema() -> NodeSchema {
        NodeSchema::new("LoadTensor")
            .category("tensor")
            .doc(
                "Reads one tensor from a safetensors file, keeping its dtype (f32, f16, bf16, \
                 i64, i32 or u8) and shape. The result is cached until the file's size or \
                 modification time changes. The whole file is read into memory.",
            )
            .input(
                Port::new("path", "String").doc(
                    "The .safetensors file; a relative path is taken from the graph's folder.",
                ),
            )
            .input(Port::new("name", "String").doc("The name of the tensor in the file."))
            .output(
                Port::new("tensor", "Tensor").doc("The tensor, with the file's dtype and shape."),
            )
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let path = input_path(ctx, "path")?;
        let name: String = ctx.input("name")?;
        let what = format!("cannot read tensor {name:?} from");
        let bytes = std::fs::read(&path).map_err(|e| io_error(&what, &path, &e))?;
        let (dtype, shape, data) = read_safetensor(&bytes, &path, &name)?;
        let tensor = Tensor::from_bytes(Kind::Tensor, dtype, &shape, data).map_err(|e| {
            Error(format!(
                "cannot load tensor {name:?} from {}: {e}",
                path.display()
            ))
        })?;
        ctx.set_output("tensor", tensor)
    }

    fn fingerprint(&self, ctx: &mut Context) -> Result<Option<u64>> {
        let name: String = ctx.input("name")?;
        let what = format!("cannot read tensor {name:?} from");
        file_fingerprint(&what, &input_path(ctx, "path")?).map(Some)
    }
}

/// `SaveTensor`: one tensor to a safetensors file.
#[derive(Default)]
pub struct SaveTensor;

impl Node for SaveTensor {
    fn schema() -> NodeSchema {
        NodeSchema::new("SaveTensor")
            .category("tensor")
            .doc(
                "Writes a tensor to a safetensors file under the given name, keeping its dtype \
                 and shape. An existing file is replaced.",
            )
            .input(Port::new("tensor", "Tensor").doc("The tensor to save."))
            .input(
                Port::new("path", "String")
                    .default("tensor.safetensors")
                    .doc("Where to write; a relative path goes under the run's output folder."),
            )
            .input(
                Port::new("name", "String")
                    .default("tensor")
                    .doc("The tensor's name inside the file."),
            )
            .output(Port::new("path", "String").doc("The absolute path of the file written."))
            .side_effects()
    }

    fn execute(&self, ctx: &mut Context) -> Result<()> {
        let tensor: Tensor = ctx.input("tensor")?;
        let name: String = ctx.input("name")?;
        if name.is_empty() {
            bail!("input 'name' is empty: give the tensor a name");
        }
        check_cpu_data(&tensor, "input")?;
        let view = tensor_view(&name, tensor.dtype(), tensor.shape(), tensor.bytes())?;
        let path = output_path(ctx, "path")?;
        safetensors::serialize_to_file([(name.as_str(), view)], None, &path)
            .map_err(|e| Error(format!("cannot write {}: {e}", path.display())))?;
        ctx.set_output("path", absolute(&path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_safetensor(name: &str, dtype: DType, shape: &[usize], data: &[u8]) -> Result<Vec<u8>> {
        let view = tensor_view(name, dtype, shape, data)?;
        safetensors::serialize([(name, view)], None).map_err(|e| Error(e.to_string()))
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn round_trips_one_tensor() {
        let data = f32_bytes(&[1.0, -2.0, 3.5, 0.0, 5.0, 6.0]);
        let file = write_safetensor("w", DType::F32, &[2, 3], &data).unwrap();
        let (dtype, shape, read) = read_safetensor(&file, Path::new("t.safetensors"), "w").unwrap();
        assert_eq!((dtype, shape, read), (DType::F32, vec![2, 3], &data[..]));
    }

    #[test]
    fn every_dtype_round_trips() {
        for dtype in [
            DType::F32,
            DType::F16,
            DType::BF16,
            DType::I64,
            DType::I32,
            DType::U8,
        ] {
            let data = vec![7u8; 4 * dtype.size()];
            let file = write_safetensor("x", dtype, &[4], &data).unwrap();
            let (got, shape, _) = read_safetensor(&file, Path::new("t"), "x").unwrap();
            assert_eq!((got, shape), (dtype, vec![4]));
            assert_eq!(
                dtype_to_safetensors(dtype).and_then(dtype_from_safetensors),
                Some(dtype)
            );
        }
    }

    #[test]
    fn missing_name_lists_names() {
        let views: Vec<(String, TensorView<'_>)> = (0..12)
            .map(|i| {
                let view = TensorView::new(Dtype::U8, vec![1], &[0u8][..]);
                (format!("t{i:02}"), view.unwrap())
            })
            .collect();
        let file = safetensors::serialize(views, None).unwrap();
        let e = read_safetensor(&file, Path::new("m.safetensors"), "nope")
            .unwrap_err()
            .0;
        assert!(e.contains("m.safetensors") && e.contains("\"nope\""), "{e}");
        assert!(
            e.contains("\"t00\"") && e.contains("\"t09\"") && !e.contains("\"t10\""),
            "{e}"
        );
        assert!(e.contains("and 2 more"), "{e}");
    }

    #[test]
    fn unsupported_dtype_is_named() {
        let data = [0u8; 8];
        let view = TensorView::new(Dtype::F64, vec![1], &data[..]).unwrap();
        let file = safetensors::serialize([("d", view)], None).unwrap();
        let e = read_safetensor(&file, Path::new("d.safetensors"), "d")
            .unwrap_err()
            .0;
        assert!(
            e.contains("F64") && e.contains("\"d\"") && e.contains("d.safetensors"),
            "{e}"
        );
    }

    #[test]
    fn view_size_must_match_the_shape() {
        let e = tensor_view("v", DType::F32, &[3], &[0u8; 8]).unwrap_err().0;
        assert!(e.contains("\"v\""), "{e}");
    }

    #[test]
    fn writes_a_file() {
        let dir = std::env::temp_dir().join(format!("ditflow-nodes-st-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.safetensors");
        let data = f32_bytes(&[1.0, 2.0]);
        let view = tensor_view("x", DType::F32, &[1, 2], &data).unwrap();
        safetensors::serialize_to_file([("x", view)], None, &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let (dtype, shape, read) = read_safetensor(&bytes, &path, "x").unwrap();
        assert_eq!((dtype, shape, read), (DType::F32, vec![1, 2], &data[..]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn malformed_file_is_named() {
        let e = read_safetensor(b"not a file", Path::new("bad.safetensors"), "x")
            .unwrap_err()
            .0;
        assert!(
            e.contains("bad.safetensors") && e.contains("not a valid"),
            "{e}"
        );
        assert!(e.contains("\"x\""), "{e}");
    }
}
