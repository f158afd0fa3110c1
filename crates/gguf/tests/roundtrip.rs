//! Files written by `write_gguf` read back through `GgufFile`, and one file checked byte by byte
//! against the layout of ggml's `docs/gguf.md`.

use gguf::{write_gguf, GgmlType, GgufError, GgufFile, TensorInfo, Value, ValueType};

fn info(name: &str, shape: &[usize], ty: GgmlType) -> TensorInfo {
    TensorInfo {
        name: name.into(),
        shape: shape.to_vec(),
        ty,
    }
}

fn ramp(n: usize, scale: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * scale)
        .collect()
}

#[test]
fn a_minimal_file_has_the_documented_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("min.gguf");
    let meta = vec![("a".to_string(), Value::U32(7))];
    let tensors = vec![info("t", &[2], GgmlType::F32)];
    let report = write_gguf(&path, &meta, &tensors, |_, _| Ok(vec![1.5, -2.0])).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let mut want = Vec::new();
    want.extend_from_slice(b"GGUF");
    want.extend_from_slice(&3u32.to_le_bytes());
    want.extend_from_slice(&1u64.to_le_bytes()); // tensors
    want.extend_from_slice(&1u64.to_le_bytes()); // metadata entries
    want.extend_from_slice(&1u64.to_le_bytes()); // key length
    want.extend_from_slice(b"a");
    want.extend_from_slice(&4u32.to_le_bytes()); // GGUF_METADATA_VALUE_TYPE_UINT32
    want.extend_from_slice(&7u32.to_le_bytes());
    want.extend_from_slice(&1u64.to_le_bytes()); // name length
    want.extend_from_slice(b"t");
    want.extend_from_slice(&1u32.to_le_bytes()); // n_dims
    want.extend_from_slice(&2u64.to_le_bytes()); // ne[0]
    want.extend_from_slice(&0u32.to_le_bytes()); // GGML_TYPE_F32
    want.extend_from_slice(&0u64.to_le_bytes()); // offset
    assert_eq!(want.len(), 74);
    want.resize(96, 0); // aligned to 32
    want.extend_from_slice(&1.5f32.to_le_bytes());
    want.extend_from_slice(&(-2.0f32).to_le_bytes());
    want.resize(128, 0);
    assert_eq!(bytes, want);
    assert_eq!(report.file_bytes, 128);
}

#[test]
fn every_value_type_and_tensor_type_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("all.gguf");
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("qwen2".into())),
        ("u8".into(), Value::U8(200)),
        ("i8".into(), Value::I8(-100)),
        ("u16".into(), Value::U16(65000)),
        ("i16".into(), Value::I16(-32000)),
        ("u32".into(), Value::U32(4_000_000_000)),
        ("i32".into(), Value::I32(-2_000_000_000)),
        ("f32".into(), Value::F32(1e-6)),
        ("bool".into(), Value::Bool(true)),
        ("u64".into(), Value::U64(u64::MAX)),
        ("i64".into(), Value::I64(i64::MIN)),
        ("f64".into(), Value::F64(1e6)),
        (
            "strings".into(),
            Value::strings(["Ġ Ġ", "", "<|im_end|>", "中文"]),
        ),
        ("ints".into(), Value::i32s([1, 3, 4, 5])),
        ("empty".into(), Value::Array(ValueType::F32, vec![])),
        (
            "nested".into(),
            Value::Array(ValueType::Array, vec![Value::i32s([1]), Value::i32s([])]),
        ),
    ];
    let tensors = vec![
        info("f32", &[3, 5], GgmlType::F32),
        info("f16", &[7], GgmlType::F16),
        info("bf16", &[2, 3], GgmlType::Bf16),
        info("q8", &[3, 64], GgmlType::Q8_0),
    ];
    let values: Vec<Vec<f32>> = tensors.iter().map(|t| ramp(t.len(), 0.013)).collect();
    let mut asked = Vec::new();
    write_gguf(&path, &meta, &tensors, |i, t| {
        asked.push(t.name.clone());
        Ok(values[i].clone())
    })
    .unwrap();
    // Asked once each, in order: the writer streams.
    assert_eq!(asked, ["f32", "f16", "bf16", "q8"]);

    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.metadata, meta);
    assert_eq!(f.alignment, 32);
    assert_eq!(f.data_start % 32, 0);
    let mut expected_offset = 0u64;
    for (t, want) in f.tensors.iter().zip(&tensors) {
        assert_eq!(
            (&t.name, &t.shape, t.ty),
            (&want.name, &want.shape, want.ty)
        );
        assert_eq!(t.offset, expected_offset, "tensor `{}`", t.name);
        assert_eq!(t.offset % 32, 0);
        expected_offset = (t.offset + want.bytes() as u64).div_ceil(32) * 32;
    }
    assert_eq!(f.data_start + expected_offset, f.len() as u64);
    // f32 is exact; the others equal their own encoding, decoded.
    assert_eq!(f.tensor_f32("f32").unwrap(), values[0]);
    for (i, t) in tensors.iter().enumerate().skip(1) {
        let mut enc = Vec::new();
        gguf::quant::encode(t.ty, &values[i], &mut enc);
        assert_eq!(f.tensor_bytes(f.tensor(&t.name).unwrap()), enc.as_slice());
        let got = f.tensor_f32(&t.name).unwrap();
        let err = got
            .iter()
            .zip(&values[i])
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
        // Half precision: 2^-9 relative of |x| <= 0.65; q8_0: half a step of max/127.
        assert!(err < 0.004, "{}: max error {err}", t.name);
    }
}

#[test]
fn a_chosen_alignment_is_used() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a64.gguf");
    let meta = vec![("general.alignment".to_string(), Value::U32(64))];
    let tensors = vec![
        info("x", &[3], GgmlType::F32),
        info("y", &[5], GgmlType::F16),
    ];
    write_gguf(&path, &meta, &tensors, |_, t| Ok(vec![1.0; t.len()])).unwrap();
    let f = GgufFile::open(&path).unwrap();
    assert_eq!(f.alignment, 64);
    assert_eq!(f.data_start % 64, 0);
    assert_eq!(f.tensor("y").unwrap().offset, 64);
}

#[test]
fn bad_inputs_are_refused_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    let no_data = |_: usize, _: &TensorInfo| -> Result<Vec<f32>, String> {
        panic!("data asked for an invalid file")
    };
    type Case = (Vec<(String, Value)>, Vec<TensorInfo>, &'static str);
    let cases: Vec<Case> = vec![
        (
            vec![],
            vec![info("w", &[4, 48], GgmlType::Q8_0)],
            "rows of 48 values are not whole blocks of 32",
        ),
        (
            vec![],
            vec![
                info("w", &[2], GgmlType::F32),
                info("w", &[2], GgmlType::F32),
            ],
            "tensor `w` is given twice",
        ),
        (
            vec![],
            vec![info(&"n".repeat(64), &[1], GgmlType::F32)],
            "1 to 63",
        ),
        (
            vec![],
            vec![info("w", &[2, 0], GgmlType::F32)],
            "non-zero dimensions",
        ),
        (
            vec![("k".into(), Value::U8(1)), ("k".into(), Value::U8(2))],
            vec![],
            "metadata key `k` is given twice",
        ),
        (
            vec![("k".into(), Value::Array(ValueType::I32, vec![Value::U8(1)]))],
            vec![],
            "element 0 is U8 in an array of I32",
        ),
        (
            vec![("general.alignment".into(), Value::U32(48))],
            vec![],
            "power of two",
        ),
    ];
    for (meta, tensors, want) in cases {
        let err = write_gguf(&path, &meta, &tensors, no_data).unwrap_err();
        assert!(matches!(err, GgufError::Invalid { .. }), "{err}");
        let msg = err.to_string();
        assert!(msg.contains(want) && msg.contains("bad.gguf"), "{msg}");
        assert!(!path.exists());
    }
}

#[test]
fn a_failed_write_leaves_no_file_and_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.gguf");
    std::fs::write(&path, b"previous").unwrap();
    let tensors = vec![
        info("a", &[4], GgmlType::F32),
        info("b", &[4], GgmlType::F32),
    ];
    let err = write_gguf(&path, &[], &tensors, |i, _| {
        if i == 0 {
            Ok(vec![0.0; 4])
        } else {
            Err("merge failed".into())
        }
    })
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("cannot write {}: tensor `b`: merge failed", path.display())
    );
    let err = write_gguf(&path, &[], &tensors, |_, _| Ok(vec![0.0; 3])).unwrap_err();
    assert!(
        err.to_string()
            .contains("tensor `a`: got 3 values for shape [4] (4 expected)"),
        "{err}"
    );
    assert_eq!(std::fs::read(&path).unwrap(), b"previous");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    // An output in a directory that does not exist.
    let missing = dir.path().join("no/such/dir/out.gguf");
    let err = write_gguf(&missing, &[], &tensors, |_, _| Ok(vec![0.0; 4])).unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("cannot write {}", missing.display())),
        "{err}"
    );
}

#[test]
fn corrupt_files_are_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.gguf");
    let tensors = vec![info("t", &[8], GgmlType::F32)];
    write_gguf(&path, &[("k".into(), Value::U32(1))], &tensors, |_, _| {
        Ok(vec![0.5; 8])
    })
    .unwrap();
    let good = std::fs::read(&path).unwrap();
    let check = |bytes: &[u8], want: &str| {
        std::fs::write(&path, bytes).unwrap();
        let err = GgufFile::open(&path).err().expect("refused");
        assert!(err.to_string().contains(want), "{err}");
    };
    let mut b = good.clone();
    b[0] = b'X';
    check(&b, "not `GGUF`");
    let mut b = good.clone();
    b[4] = 2;
    check(&b, "version 2");
    check(&good[..good.len() - 4], "past the end of the file");
    let mut b = good.clone();
    // The tensor's offset (the header's last 8 bytes before the padding) set to 8: misaligned.
    let off_at = 24 + (8 + 1 + 4 + 4) + (8 + 1 + 4 + 8 + 4);
    b[off_at] = 8;
    check(&b, "not a multiple of 32");
}
