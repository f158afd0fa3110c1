//! Comparing float slices against references. Each function has one formula, named in its
//! documentation; the asserting ones panic naming the first element that fails (index, got, want),
//! how many fail, and the worst error.

/// Largest `|v|` (0 for an empty slice; NaN entries are passed over).
pub fn max_abs(v: &[f32]) -> f32 {
    v.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// Largest `|got − want|` (NaN differences are passed over). The lengths must be equal.
pub fn max_abs_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "lengths differ");
    got.iter()
        .zip(want)
        .fold(0f32, |m, (g, w)| m.max((g - w).abs()))
}

/// Largest `|got − want|` relative to the largest `|want|` (floored at 1e-12, so an all-zero
/// reference gives the absolute error times 1e12 rather than a division by zero).
pub fn max_rel_err(got: &[f32], want: &[f32]) -> f32 {
    let scale = max_abs(want).max(1e-12);
    got.iter()
        .zip(want)
        .fold(0f32, |s, (g, w)| s.max((w - g).abs()))
        / scale
}

/// Asserts `|got − want| ≤ tol` at every element (a NaN or infinite difference fails) and returns
/// the largest `|got − want|`.
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: f32) -> f32 {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut max = 0f32;
    let mut first_bad = None;
    let mut bad = 0usize;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (g - w).abs();
        if !d.is_finite() || d > tol {
            first_bad.get_or_insert((i, *g, *w));
            bad += 1;
        }
        if d > max || d.is_nan() {
            max = d;
        }
    }
    if let Some((i, g, w)) = first_bad {
        panic!(
            "{what}: max abs error {max:e} > {tol:e} at {bad} of {} elements; first at flat \
             index {i}: got {g}, want {w}",
            got.len()
        );
    }
    max
}

/// [`assert_close`] with the tolerance relative to the reference's scale: asserts
/// `|got − want| ≤ rel_tol · max|want|` at every element and returns the largest `|got − want|`
/// divided by `max|want|`.
pub fn assert_close_scaled(what: &str, got: &[f32], want: &[f32], rel_tol: f32) -> f32 {
    let scale = max_abs(want);
    assert_close(
        &format!("{what} (tolerance {rel_tol:e} × max |want| {scale:e})"),
        got,
        want,
        rel_tol * scale,
    ) / scale
}

/// Asserts, at every element, `|got − want| / max(|want|, floor) ≤ tol` (each element relative to
/// its own reference value, with `floor` keeping near-zero references from demanding exactness;
/// NaN fails), over the common length, and returns the largest such ratio.
pub fn assert_close_elementwise(
    what: &str,
    got: &[f32],
    want: &[f32],
    tol: f32,
    floor: f32,
) -> f32 {
    let mut worst = 0f32;
    let mut first_bad = None;
    let mut bad = 0usize;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = (w - g).abs() / w.abs().max(floor);
        let within = d <= tol; // false for NaN
        if !within {
            first_bad.get_or_insert((i, *g, *w, d));
            bad += 1;
        }
        worst = worst.max(d);
    }
    if let Some((i, g, w, d)) = first_bad {
        panic!(
            "{what}: {bad} elements beyond {tol:e} relative (floor {floor:e}), worst {worst:e}; \
             first at flat index {i}: got {g}, want {w} ({d:e})"
        );
    }
    worst
}

/// Asserts, at every element, `|got − want| ≤ |want| · rel` (so a zero reference demands an exact
/// zero; NaN fails), over the common length.
pub fn assert_within_relative(what: &str, got: &[f32], want: &[f32], rel: f32) {
    let mut first_bad = None;
    let mut bad = 0usize;
    let mut worst = 0f32;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let within = (g - w).abs() <= w.abs() * rel; // false for NaN
        if !within {
            first_bad.get_or_insert((i, *g, *w));
            bad += 1;
            worst = worst.max((g - w).abs() / w.abs());
        }
    }
    if let Some((i, g, w)) = first_bad {
        panic!(
            "{what}: {bad} elements beyond {rel:e} relative, worst {worst:e}; first at flat \
             index {i}: got {g}, want {w}"
        );
    }
}
