//! Safetensors weights in the Hugging Face diffusers layout, memory-mapped and read by name.
//!
//! One component (`transformer/`, `text_encoder/`, `vae/`) is either one
//! `{stem}.safetensors` or shards listed in `{stem}.safetensors.index.json`. Tensors are read on
//! demand from the map (bf16, f16 or f32 as stored) and handed to burn in the store's compute
//! dtype on the target device: a bf16 checkpoint goes to a bf16 engine value for value, without
//! an f32 copy on the way (other pairs convert element by element); a missing tensor, a wrong shape or an unsupported dtype is an error naming the file and
//! the tensor. The per-model name tables live next to each model (one `fn` per part that asks for
//! its weights by their checkpoint names), so there is exactly one place per name.

use std::cell::Cell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorCreationOptions, TensorData};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, Metadata};
use safetensors::SafeTensors;

use crate::error::EngineError;
use crate::nn::LinearWeight;
use crate::precision::Precision;

struct Shard {
    path: PathBuf,
    map: Mmap,
    header_len: usize,
    meta: Metadata,
}

pub struct WeightStore {
    shards: Vec<Shard>,
    /// tensor name -> shard index
    index: HashMap<String, usize>,
    device: Device,
    /// The dtype tensors are created in.
    precision: Precision,
    /// Bytes of the tensors made so far (what the model holds on the device).
    made: Cell<u64>,
    /// `Some(seed)`: no files; every tensor asked for is made up (see [`Source::Random`]).
    random: Option<u64>,
}

/// Where the weights come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The checkpoint's safetensors files.
    Files,
    /// Random weights of exactly the shapes the configs ask for, for benchmarks at real size
    /// without a download: deterministic per tensor name and seed. Matrices are uniform with
    /// standard deviation 1/sqrt(fan_in) (activations stay in range), 1-D scales and variances
    /// are 1, biases and means 0. Images from them are noise; their timings are real.
    Random(u64),
}

fn io(path: &Path, e: impl std::fmt::Display) -> EngineError {
    EngineError::io(path, e)
}

impl WeightStore {
    /// Open `dir/{stem}.safetensors` (or its shards), or a random store for [`Source::Random`].
    pub fn open_from(
        dir: &Path,
        stem: &str,
        source: Source,
        device: &Device,
        precision: Precision,
    ) -> Result<Self, EngineError> {
        match source {
            Source::Files => Ok(Self::open(dir, stem, device)?.in_precision(precision)),
            Source::Random(seed) => Ok(WeightStore {
                shards: Vec::new(),
                index: HashMap::new(),
                device: device.clone(),
                precision,
                made: Cell::new(0),
                random: Some(seed),
            }),
        }
    }

    /// The same store, creating its tensors in `precision` (f32 unless set).
    pub fn in_precision(mut self, precision: Precision) -> Self {
        self.precision = precision;
        self
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Bytes of all tensors this store has made, in its precision.
    pub fn bytes_made(&self) -> u64 {
        self.made.get()
    }

    /// Open `dir/{stem}.safetensors`, or the shards of `dir/{stem}.safetensors.index.json`.
    pub fn open(dir: &Path, stem: &str, device: &Device) -> Result<Self, EngineError> {
        let single = dir.join(format!("{stem}.safetensors"));
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        let files: Vec<PathBuf> = if single.exists() {
            vec![single]
        } else if index.exists() {
            let text = std::fs::read_to_string(&index).map_err(|e| io(&index, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| EngineError::WeightFile {
                    file: index.display().to_string(),
                    message: format!("malformed index: {e}"),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| EngineError::WeightFile {
                    file: index.display().to_string(),
                    message: "no `weight_map` object".into(),
                })?;
            let mut names: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            names.into_iter().map(|n| dir.join(n)).collect()
        } else {
            return Err(EngineError::WeightFile {
                file: single.display().to_string(),
                message: "not found (nor a sharded .index.json beside it)".into(),
            });
        };
        Self::from_files(&files, device)
    }

    pub fn from_files(files: &[PathBuf], device: &Device) -> Result<Self, EngineError> {
        let mut shards = Vec::new();
        let mut index = HashMap::new();
        for path in files {
            let file = std::fs::File::open(path).map_err(|e| io(path, e))?;
            // SAFETY: the map is read-only and the file is not modified while the engine runs;
            // a checkpoint rewritten underneath a running process is outside what we support.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| io(path, e))?;
            let (header_len, meta) =
                SafeTensors::read_metadata(&map).map_err(|e| EngineError::WeightFile {
                    file: path.display().to_string(),
                    message: format!("not a valid safetensors file: {e}"),
                })?;
            for name in meta.tensors().keys() {
                index.insert(name.clone(), shards.len());
            }
            shards.push(Shard {
                path: path.clone(),
                map,
                header_len,
                meta,
            });
        }
        Ok(WeightStore {
            shards,
            index,
            device: device.clone(),
            precision: Precision::F32,
            made: Cell::new(0),
            random: None,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn contains(&self, name: &str) -> bool {
        self.random.is_some() || self.index.contains_key(name)
    }

    /// The stored shape of `name`, if present.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let shard = &self.shards[*self.index.get(name)?];
        shard.meta.info(name).map(|i| i.shape.clone())
    }

    /// The stored bytes of `name` and their dtype, after checking its shape.
    fn raw(&self, name: &str, shape: &[usize]) -> Result<(&[u8], Dtype), EngineError> {
        let err = |file: &Path, message: String| EngineError::Weight {
            file: file.display().to_string(),
            tensor: name.to_owned(),
            message,
        };
        let Some(&si) = self.index.get(name) else {
            let file = self
                .shards
                .first()
                .map_or(PathBuf::new(), |s| s.path.clone());
            return Err(err(&file, "missing".into()));
        };
        let shard = &self.shards[si];
        let info = shard
            .meta
            .info(name)
            .ok_or_else(|| err(&shard.path, "missing".into()))?;
        if info.shape != shape {
            return Err(err(
                &shard.path,
                format!(
                    "shape {:?}, expected {:?} (from the config)",
                    info.shape, shape
                ),
            ));
        }
        let start = 8 + shard.header_len + info.data_offsets.0;
        let end = 8 + shard.header_len + info.data_offsets.1;
        let bytes = shard.map.get(start..end).ok_or_else(|| {
            err(
                &shard.path,
                "data offsets point past the end of the file".into(),
            )
        })?;
        let width = match info.dtype {
            Dtype::F32 => 4,
            Dtype::BF16 | Dtype::F16 => 2,
            other => {
                return Err(err(
                    &shard.path,
                    format!("dtype {other:?} is not supported (bf16, f16 or f32)"),
                ))
            }
        };
        let n: usize = shape.iter().product();
        if bytes.len() != n * width {
            return Err(err(
                &shard.path,
                format!("holds {} values for shape {shape:?}", bytes.len() / width),
            ));
        }
        Ok((bytes, info.dtype))
    }

    /// Read `name` as f32 values, checking its shape.
    pub fn values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, EngineError> {
        if let Some(seed) = self.random {
            return Ok(random_values(seed, name, shape));
        }
        let (bytes, dtype) = self.raw(name, shape)?;
        Ok(match dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::BF16 => halves(bytes, |b| half::bf16::from_le_bytes(b).to_f32()),
            _ => halves(bytes, |b| half::f16::from_le_bytes(b).to_f32()),
        })
    }

    /// `name` as tensor data in the store's precision: stored values of that dtype are taken
    /// as they are (no f32 copy of a bf16 checkpoint); other dtypes are rounded to it.
    fn data(&self, name: &str, shape: &[usize]) -> Result<TensorData, EngineError> {
        if self.random.is_none() {
            let (bytes, dtype) = self.raw(name, shape)?;
            match (dtype, self.precision) {
                (Dtype::BF16, Precision::Bf16) => {
                    return Ok(TensorData::new(
                        halves(bytes, half::bf16::from_le_bytes),
                        shape.to_vec(),
                    ))
                }
                (Dtype::F16, Precision::F16) => {
                    return Ok(TensorData::new(
                        halves(bytes, half::f16::from_le_bytes),
                        shape.to_vec(),
                    ))
                }
                _ => {}
            }
        }
        let v = self.values(name, shape)?;
        Ok(match self.precision {
            Precision::F32 => TensorData::new(v, shape.to_vec()),
            Precision::Bf16 => TensorData::new(
                v.into_iter().map(half::bf16::from_f32).collect::<Vec<_>>(),
                shape.to_vec(),
            ),
            Precision::F16 => TensorData::new(
                v.into_iter().map(half::f16::from_f32).collect::<Vec<_>>(),
                shape.to_vec(),
            ),
        })
    }

    /// Read `name` into a tensor of the given shape on the store's device, in its precision.
    pub fn tensor<const D: usize>(
        &self,
        name: &str,
        shape: [usize; D],
    ) -> Result<Tensor<D>, EngineError> {
        let data = self.data(name, &shape)?;
        let n: usize = shape.iter().product();
        self.made
            .set(self.made.get() + (n * self.precision.size()) as u64);
        Ok(Tensor::from_data(
            data,
            TensorCreationOptions::new(self.device.clone()).with_dtype(self.precision.dtype()),
        ))
    }

    /// A PyTorch `Linear` weight `[out, in]`, transposed to burn's `[in, out]`. On the CPU the
    /// transpose is laid out once here: burn's `linear` reshapes its weight, and burn-flex copies
    /// a transposed view to do that, on every call (a step took 715 ms before this, 446 after).
    /// GPU devices keep the view, which their matmul kernels read as it is.
    /// On an x86 CPU with AVX2 or AVX-512 the f32 weight is then packed for the engine's own kernel
    /// ([`LinearWeight`]).
    pub fn linear(
        &self,
        name: &str,
        d_in: usize,
        d_out: usize,
    ) -> Result<LinearWeight, EngineError> {
        Ok(LinearWeight::new(self.linear_tensor(name, d_in, d_out)?))
    }

    /// Several PyTorch `Linear` weights with the same input, side by side as one layer
    /// `[d_in, sum of d_out]`: one product instead of several (q, k and v; gate and up).
    pub fn linear_fused(
        &self,
        parts: &[(&str, usize)],
        d_in: usize,
    ) -> Result<LinearWeight, EngineError> {
        let parts = parts
            .iter()
            .map(|&(name, d_out)| self.linear_tensor(name, d_in, d_out))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(LinearWeight::new(Tensor::cat(parts, 1)))
    }

    fn linear_tensor(
        &self,
        name: &str,
        d_in: usize,
        d_out: usize,
    ) -> Result<Tensor<2>, EngineError> {
        let t = self.tensor(name, [d_out, d_in])?.transpose();
        Ok(crate::cpu::contiguous(&t).unwrap_or(t))
    }
}

/// Little-endian 2-byte values, each read by `f`.
fn halves<T>(bytes: &[u8], f: impl Fn([u8; 2]) -> T) -> Vec<T> {
    bytes.chunks_exact(2).map(|c| f([c[0], c[1]])).collect()
}

fn random_values(seed: u64, name: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    if shape.len() == 1 {
        let one = name.ends_with("running_var")
            || (!name.ends_with("bias") && !name.ends_with("running_mean"));
        return vec![if one { 1.0 } else { 0.0 }; n];
    }
    let fan_in: usize = shape[1..].iter().product();
    // Uniform on [-a, a] has standard deviation a / sqrt(3).
    let a = (3.0 / fan_in.max(1) as f64).sqrt() as f32;
    // FNV-1a of the name, so every tensor differs and the same name always gives the same values.
    let mut state = name.bytes().fold(0xcbf2_9ce4_8422_2325u64 ^ seed, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    (0..n)
        .map(|_| {
            // xorshift64*: fast enough for billions of values, and plenty random for timing.
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            let r = state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40; // 24 bits
            (r as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * a
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn write(path: &Path, tensors: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)>) {
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .map(|(n, d, s, b)| (n.to_string(), TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        safetensors::serialize_to_file(views, None, path).unwrap();
    }

    #[test]
    fn reads_bf16_f16_and_f32_and_names_every_failure() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let f32s: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let bf16s: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect();
        let f16s: Vec<u8> = [1.5f32, -2.0]
            .iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect();
        let i64s: Vec<u8> = [1i64, 2].iter().flat_map(|x| x.to_le_bytes()).collect();
        write(
            &dir.join("m.safetensors"),
            vec![
                ("a", Dtype::F32, vec![2], f32s),
                ("b", Dtype::BF16, vec![2], bf16s),
                ("c", Dtype::F16, vec![1, 2], f16s),
                ("d", Dtype::I64, vec![2], i64s),
            ],
        );
        let w = WeightStore::open(dir, "m", &Device::flex()).unwrap();
        for (name, shape) in [("a", vec![2]), ("b", vec![2]), ("c", vec![1, 2])] {
            assert_eq!(w.values(name, &shape).unwrap(), vec![1.5, -2.0], "{name}");
        }
        let e = w.values("a", &[3]).unwrap_err().to_string();
        assert!(
            e.contains("`a`")
                && e.contains("[2]")
                && e.contains("[3]")
                && e.contains("m.safetensors"),
            "{e}"
        );
        let e = w.values("d", &[2]).unwrap_err().to_string();
        assert!(e.contains("`d`") && e.contains("I64"), "{e}");
        let e = w.values("zz", &[2]).unwrap_err().to_string();
        assert!(e.contains("`zz`") && e.contains("missing"), "{e}");
        let e = WeightStore::open(dir, "nope", &Device::flex())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("nope.safetensors"), "{e}");
        std::fs::write(dir.join("bad.safetensors"), b"garbage").unwrap();
        let e = WeightStore::open(dir, "bad", &Device::flex())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("bad.safetensors") && e.contains("not a valid safetensors"),
            "{e}"
        );
    }

    #[test]
    fn tensors_are_made_in_the_store_precision() {
        use burn::tensor::DType;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        // 1 + 2^-9 is not a bf16 value (8 significant bits): it rounds to 1 in bf16.
        let vals = [1.5f32, 1.0 + 1.0 / 512.0, -3.0];
        let bf16s: Vec<u8> = vals
            .iter()
            .flat_map(|x| half::bf16::from_f32(*x).to_le_bytes())
            .collect();
        let f32s: Vec<u8> = vals.iter().flat_map(|x| x.to_le_bytes()).collect();
        write(
            &dir.join("m.safetensors"),
            vec![
                ("b", Dtype::BF16, vec![3], bf16s),
                ("f", Dtype::F32, vec![3], f32s),
            ],
        );
        let read = |p: Precision, name: &str| {
            let w = WeightStore::open(dir, "m", &Device::flex())
                .unwrap()
                .in_precision(p);
            let t = w.tensor::<1>(name, [3]).unwrap();
            assert_eq!(w.bytes_made(), 3 * p.size() as u64);
            (
                t.dtype(),
                t.cast(burn::tensor::FloatDType::F32)
                    .into_data()
                    .try_to_vec::<f32>()
                    .unwrap(),
            )
        };
        // bf16 as stored, value for value; f32 rounded once; f16 holds all three exactly.
        assert_eq!(
            read(Precision::Bf16, "b"),
            (DType::BF16, vec![1.5, 1.0, -3.0])
        );
        assert_eq!(
            read(Precision::Bf16, "f"),
            (DType::BF16, vec![1.5, 1.0, -3.0])
        );
        assert_eq!(read(Precision::F16, "f"), (DType::F16, vals.to_vec()));
        assert_eq!(read(Precision::F32, "f"), (DType::F32, vals.to_vec()));
    }

    #[test]
    fn reads_sharded_checkpoints_through_their_index() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let one: Vec<u8> = 1f32.to_le_bytes().to_vec();
        let two: Vec<u8> = 2f32.to_le_bytes().to_vec();
        write(
            &dir.join("model-00001-of-00002.safetensors"),
            vec![("x", Dtype::F32, vec![1], one)],
        );
        write(
            &dir.join("model-00002-of-00002.safetensors"),
            vec![("y", Dtype::F32, vec![1], two)],
        );
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            r#"{"metadata": {}, "weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}"#,
        )
        .unwrap();
        let w = WeightStore::open(dir, "model", &Device::flex()).unwrap();
        assert_eq!(w.values("x", &[1]).unwrap(), vec![1.0]);
        assert_eq!(w.values("y", &[1]).unwrap(), vec![2.0]);
    }
}
