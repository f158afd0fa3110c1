//! PEFT's PiSSA and OLoRA initializations (`init_lora_weights="pissa"`, `"pissa_niter_N"`,
//! `"olora"`), and PEFT's conversion of a trained PiSSA/OLoRA adapter into a plain LoRA, as pure
//! functions on row-major `f32` buffers (the weight is `[out, in]`, as in `nn.Linear`; `out` may be
//! smaller or larger than `in`).
//!
//! Both inits take the base weight apart: the adapter gets the principal part (`scaling · B·A`)
//! and the base weight keeps the rest (`residual`), so the layer computes the same map before any
//! training. They mirror PEFT 0.21.2's `LoraLayer.pissa_init` / `olora_init`, including the order
//! of the float32 operations; the decomposition itself (faer's SVD / QR) runs in f64 on the f32
//! weight, which matches PEFT's float32 LAPACK results more closely than faer in f32 does (against
//! `tests/fixtures/lora-inits`: residual within 2.7e-6 of PEFT's relative to max|W| in f64, 1.4e-5
//! in f32; A and B within 3.8e-5 vs 1.4e-4 on a flat spectrum, the f32 LAPACK's own error being
//! what remains).
//!
//! **Signs.** A singular pair `(u_k, v_k)` is defined up to a common sign. LAPACK (MKL's `gesdd`,
//! what `torch.linalg.svd` runs on the CPU) and faer end on different signs with no rule one can
//! reproduce, so [`pissa`] fixes its own: in each component `k`, the entry of largest magnitude of
//! `B`'s column `k` (the first one on ties) is positive, and `A`'s row `k` carries the same sign.
//! Its `A` and `B` therefore equal PEFT's up to a sign per component, while `B·A`, the residual, the
//! layer's output and the training trajectory (the gradients flip with the factors) are PEFT's.
//! QR needs no such rule: faer's Householder reflections use LAPACK's convention (`dlarfg`:
//! `β = −sign(α)·‖x‖`), so [`olora`]'s `R` (whose diagonal is *not* made positive) and `Q` have
//! PEFT's signs as they come.
//!
//! **Loading.** PEFT stores no residual: `PeftModel.from_pretrained` on an adapter whose
//! `adapter_config.json` says `init_lora_weights: "pissa"` / `"olora"` runs the init again on the
//! base weight it is given (replacing it by the residual of *that* weight) and then overwrites A and
//! B with the file's. Loaded onto the original base that reproduces the training-time residual (B·A
//! of the truncated SVD / QR does not depend on the signs); `"pissa_niter_N"` draws a new random
//! matrix and gets a different residual. A loader mirroring PEFT replaces the base weight by
//! [`Decomposed::residual`] and discards `a` / `b`.

use faer::Mat;

/// The adapter factors an initialization computes and the base weight it leaves.
#[derive(Debug, Clone, PartialEq)]
pub struct Decomposed {
    /// `lora_A`, `[r, in]` row-major.
    pub a: Vec<f32>,
    /// `lora_B`, `[out, r]` row-major.
    pub b: Vec<f32>,
    /// The base weight after the init, `W − scaling · B·A`, `[out, in]` row-major.
    pub residual: Vec<f32>,
}

fn check(weight: &[f32], out: usize, inp: usize, r: usize) {
    assert_eq!(
        weight.len(),
        out * inp,
        "the weight is not [out={out}, in={inp}]"
    );
    assert!(
        (1..=out.min(inp)).contains(&r),
        "r = {r} must be in 1..=min(out, in) = {}",
        out.min(inp)
    );
}

fn to_f64(w: &[f32], rows: usize, cols: usize) -> Mat<f64> {
    Mat::from_fn(rows, cols, |i, j| f64::from(w[i * cols + j]))
}

/// `W − scaling · B·A` as PEFT computes it in float32: `(scaling · B) @ A`, the scalar product
/// rounded to f32, each dot product (length `r`) accumulated in f64 and rounded once, then the
/// f32 subtraction.
fn residual(
    w: &[f32],
    a: &[f32],
    b: &[f32],
    out: usize,
    inp: usize,
    r: usize,
    scaling: f64,
) -> Vec<f32> {
    let s = scaling as f32;
    let sb: Vec<f32> = b.iter().map(|x| s * x).collect();
    let mut res = Vec::with_capacity(out * inp);
    for o in 0..out {
        let row = &sb[o * r..(o + 1) * r];
        for i in 0..inp {
            let dot: f64 = row
                .iter()
                .enumerate()
                .map(|(k, x)| f64::from(*x) * f64::from(a[k * inp + i]))
                .sum();
            res.push(w[o * inp + i] - dot as f32);
        }
    }
    res
}

/// PEFT's PiSSA init (`init_lora_weights="pissa"`, or `"pissa_niter_N"` with `niter = Some(N)`):
/// with the thin SVD `W = U·diag(S)·Vᵀ` (PEFT's `V, S, Uh = torch.linalg.svd(W)`) and
/// `Sr = S[:r] / scaling` (in f32),
/// `A = diag(√Sr)·Vᵀ[:r]`, `B = U[:, :r]·diag(√Sr)`, `residual = W − scaling · B·A`.
///
/// `scaling` is the layer's `lora_alpha / r` (or `lora_alpha / √r` with rsLoRA; from
/// `rank_pattern` / `alpha_pattern` where they name the layer). Signs: see the module
/// documentation (the largest-magnitude entry of each column of `B` is positive).
///
/// `niter`: PEFT's `pissa_niter_N` runs torch's randomized `svd_lowrank(W, r, niter=N)` (a
/// Gaussian test matrix from torch's RNG, no oversampling), which cannot be reproduced; it
/// converges to the exact truncated SVD as `N` grows, and that is what this function computes for
/// any `niter` (the argument is accepted for the config's sake and does not change the result).
/// With N = 4 PEFT's own result is far from the exact one unless the spectrum decays fast: on the
/// fixtures its `B·A` is 4% (fast decay) to 80% (nn.Linear's flat init) away, relative to max|B·A|.
///
/// Panics unless `weight.len() == out · inp` and `1 ≤ r ≤ min(out, in)`, or when the SVD does not
/// converge (NaN or infinite entries).
pub fn pissa(
    weight: &[f32],
    out: usize,
    inp: usize,
    r: usize,
    scaling: f64,
    niter: Option<usize>,
) -> Decomposed {
    let _ = niter; // the exact truncated SVD, which svd_lowrank approximates
    check(weight, out, inp, r);
    let svd = to_f64(weight, out, inp)
        .thin_svd()
        .expect("the SVD of the weight did not converge (NaN or infinite entries?)");
    let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    // PEFT's float32 tensors: the factors as f32, then `Sr /= scaling` and `sqrt` in f32.
    let sq: Vec<f32> = (0..r)
        .map(|k| (s[k] as f32 / scaling as f32).sqrt())
        .collect();
    let u_col = |k: usize| -> Vec<f32> { (0..out).map(|o| u[(o, k)] as f32).collect() };
    let mut b_cols = Vec::with_capacity(r);
    let mut a = Vec::with_capacity(r * inp);
    for (k, q) in sq.iter().enumerate() {
        let mut col = u_col(k);
        let mut sign = 1f32;
        let (mut big, mut at) = (0f32, 0);
        for (o, x) in col.iter().enumerate() {
            if x.abs() > big {
                (big, at) = (x.abs(), o);
            }
        }
        if col[at] < 0.0 {
            sign = -1.0;
            col.iter_mut().for_each(|x| *x = -*x);
        }
        b_cols.push(col);
        a.extend((0..inp).map(|i| q * (sign * v[(i, k)] as f32)));
    }
    let mut b = Vec::with_capacity(out * r);
    for o in 0..out {
        b.extend(b_cols.iter().zip(&sq).map(|(col, q)| col[o] * q));
    }
    let residual = residual(weight, &a, &b, out, inp, r, scaling);
    Decomposed { a, b, residual }
}

/// PEFT's OLoRA init (`init_lora_weights="olora"`): with the reduced QR `W = Q·R`
/// (`torch.linalg.qr`, Householder, `R`'s diagonal signs as LAPACK leaves them),
/// `A = R[:r]`, `B = Q[:, :r]`, `residual = W − scaling · B·A`.
///
/// `scaling` as for [`pissa`]. Panics unless `weight.len() == out · inp` and
/// `1 ≤ r ≤ min(out, in)`.
pub fn olora(weight: &[f32], out: usize, inp: usize, r: usize, scaling: f64) -> Decomposed {
    check(weight, out, inp, r);
    let qr = to_f64(weight, out, inp).qr();
    let (q, rr) = (qr.compute_thin_Q(), qr.thin_R());
    let mut a = Vec::with_capacity(r * inp);
    for k in 0..r {
        a.extend((0..inp).map(|i| if i < k { 0.0 } else { rr[(k, i)] as f32 }));
    }
    let mut b = Vec::with_capacity(out * r);
    for o in 0..out {
        b.extend((0..r).map(|k| q[(o, k)] as f32));
    }
    let residual = residual(weight, &a, &b, out, inp, r, scaling);
    Decomposed { a, b, residual }
}

/// PEFT's `save_pretrained(dir, path_initial_model_for_weight_conversion=init_dir)`
/// (`LoraModel.subtract_mutated_init`): a PiSSA/OLoRA adapter trained from `(A0, B0)` to `(A, B)`
/// on the residual base equals, on the ORIGINAL base weight, the plain LoRA of rank `2r`
/// `A' = cat([A, A0], dim=0)` (`[2r, in]`) and `B' = cat([B, −B0], dim=1)` (`[out, 2r]`), since
/// `W_res + s·B·A = W + s·(B·A − B0·A0)` and `B'·A' = B·A − B0·A0`. Returns `(A', B')`, exact.
///
/// The config has to keep `scaling`: see [`to_plain_lora_config`] (`r` doubles, `lora_alpha`
/// doubles, or is multiplied by √2 with rsLoRA; `init_lora_weights` becomes `true`).
///
/// Panics unless `A`, `A0` are `[r, in]` and `B`, `B0` are `[out, r]`.
pub fn to_plain_lora(
    a: &[f32],
    b: &[f32],
    a0: &[f32],
    b0: &[f32],
    out: usize,
    inp: usize,
    r: usize,
) -> (Vec<f32>, Vec<f32>) {
    assert!(
        a.len() == r * inp && a0.len() == r * inp,
        "A and A0 must be [r={r}, in={inp}]"
    );
    assert!(
        b.len() == out * r && b0.len() == out * r,
        "B and B0 must be [out={out}, r={r}]"
    );
    ([a, a0].concat(), to_plain_b(b, b0, out, r))
}

/// [`to_plain_lora`]'s `B' = cat([B, −B0], dim=1)` alone, `[out, 2r]`.
pub fn to_plain_b(b: &[f32], b0: &[f32], out: usize, r: usize) -> Vec<f32> {
    let mut b_plain = Vec::with_capacity(out * 2 * r);
    for o in 0..out {
        b_plain.extend_from_slice(&b[o * r..(o + 1) * r]);
        b_plain.extend(b0[o * r..(o + 1) * r].iter().map(|x| -x));
    }
    b_plain
}

/// The rank and `lora_alpha` PEFT writes for the converted adapter of [`to_plain_lora`]:
/// `(2r, 2·lora_alpha)`, or `(2r, √2·lora_alpha)` with rsLoRA, so that `scaling` is unchanged.
pub fn to_plain_lora_rank_alpha(r: usize, lora_alpha: f64, use_rslora: bool) -> (usize, f64) {
    let alpha = if use_rslora {
        lora_alpha * 2f64.sqrt()
    } else {
        lora_alpha * 2.0
    };
    (2 * r, alpha)
}

/// PEFT's edit of `adapter_config.json` for the converted adapter of [`to_plain_lora`], in place:
/// `init_lora_weights = true`; `r *= 2`; `lora_alpha *= 2` (`*= √2` when `use_rslora`); every
/// value of `rank_pattern` and of `alpha_pattern` `*= 2` (an integer stays an integer, as in
/// Python). PEFT refuses the conversion (a `ValueError`) when `use_rslora` is combined with a
/// non-empty `rank_pattern` or `alpha_pattern`; so does this function, leaving `config` unchanged.
pub fn to_plain_lora_config(config: &mut serde_json::Value) -> Result<(), &'static str> {
    use serde_json::Value;
    fn times(v: &Value, f: f64) -> Value {
        match (v.as_i64(), f == 2.0) {
            (Some(i), true) => Value::from(i * 2),
            _ => Value::from(v.as_f64().unwrap_or(f64::NAN) * f),
        }
    }
    let nonempty = |k: &str| {
        config
            .get(k)
            .and_then(Value::as_object)
            .is_some_and(|m| !m.is_empty())
    };
    let rslora = config
        .get("use_rslora")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if rslora && (nonempty("rank_pattern") || nonempty("alpha_pattern")) {
        return Err("PEFT cannot convert an rsLoRA adapter with rank_pattern or alpha_pattern");
    }
    let c = config
        .as_object_mut()
        .ok_or("adapter_config.json is not an object")?;
    c.insert("init_lora_weights".into(), Value::Bool(true));
    let r = c.get("r").map_or(Value::from(8), |v| times(v, 2.0));
    c.insert("r".into(), r);
    let alpha = c.get("lora_alpha").map_or(Value::from(8), Clone::clone);
    c.insert(
        "lora_alpha".into(),
        times(&alpha, if rslora { 2f64.sqrt() } else { 2.0 }),
    );
    for key in ["rank_pattern", "alpha_pattern"] {
        if let Some(Value::Object(m)) = c.get_mut(key) {
            m.values_mut().for_each(|v| *v = times(v, 2.0));
        }
    }
    Ok(())
}
