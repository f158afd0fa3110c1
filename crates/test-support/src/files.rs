//! Reading the reference and fixture files (safetensors, JSON), editing safetensors files, copying
//! a fixture directory. Every function panics naming the file when it cannot do its job.

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

fn read_bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// A JSON file, parsed into `T` (a `serde_json::Value` to index it freely).
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> T {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The `step_losses` of the `trainer_state.json` in `dir` (a run's output or a checkpoint).
pub fn trainer_step_losses(dir: &Path) -> Vec<f64> {
    let v: serde_json::Value = read_json(&dir.join("trainer_state.json"));
    v["step_losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// One tensor of a reference file: its shape and its values, in `f32` for an F32 tensor or in
/// `i64` for an I64 one (token ids, masks, labels); the other vector is empty.
#[derive(Debug, Clone)]
pub struct Ref {
    pub shape: Vec<usize>,
    pub f32: Vec<f32>,
    pub i64: Vec<i64>,
}

/// Every tensor of a reference safetensors file (F32 or I64 only), by name.
pub fn read_reference(path: &Path) -> BTreeMap<String, Ref> {
    let bytes = read_bytes(path);
    let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut out = BTreeMap::new();
    for (name, view) in st.tensors() {
        let data = view.data();
        let (f32v, i64v) = match view.dtype() {
            Dtype::F32 => (
                data.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                vec![],
            ),
            Dtype::I64 => (
                vec![],
                data.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
            ),
            d => panic!("{}: unexpected dtype {d:?} for {name}", path.display()),
        };
        out.insert(
            name,
            Ref {
                shape: view.shape().to_vec(),
                f32: f32v,
                i64: i64v,
            },
        );
    }
    out
}

/// The raw tensors of a safetensors file: name -> (dtype, shape, little-endian bytes).
pub type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

/// Every tensor of a safetensors file, raw, to edit and write back with [`write_safetensors`].
pub fn read_safetensors(path: &Path) -> Tensors {
    let bytes = read_bytes(path);
    let st = SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    st.tensors()
        .into_iter()
        .map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec())))
        .collect()
}

/// Writes `t` as a safetensors file (no metadata); each shape must fit its byte count.
pub fn write_safetensors(path: &Path, t: &Tensors) {
    let views: Vec<(String, TensorView)> = t
        .iter()
        .map(|(k, (d, s, b))| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
}

/// Rewrites a safetensors file in place through `f` (change a dtype or shape, drop or add a tensor).
pub fn edit_safetensors(path: &Path, f: impl FnOnce(&mut Tensors)) {
    let mut t = read_safetensors(path);
    f(&mut t);
    write_safetensors(path, &t);
}

/// Copies the files directly in `from` (not its subdirectories) into `to`, creating it.
pub fn copy_dir_files(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("{}: {e}", to.display()));
    for e in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{}: {e}", from.display())) {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}
