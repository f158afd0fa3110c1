//! `loss.svg`: train (and eval) loss against the step, as a self-contained SVG (no font or image
//! library needed to write it; any browser shows it).

use std::fmt::Write as _;
use std::path::Path;

/// Writes a line chart of `train` (step, loss) and `eval` points to `path`.
pub fn write_loss_svg(
    path: &Path,
    train: &[(usize, f64)],
    eval: &[(usize, f64)],
) -> std::io::Result<()> {
    let (w, h, m) = (720.0, 400.0, 56.0);
    let all: Vec<&(usize, f64)> = train
        .iter()
        .chain(eval)
        .filter(|p| p.1.is_finite())
        .collect();
    if all.is_empty() {
        return Ok(());
    }
    let x_max = all.iter().map(|p| p.0).max().unwrap_or(1).max(1) as f64;
    let y_min = all.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let y_max = all.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let span = (y_max - y_min).max(1e-9);
    let (y0, y1) = (y_min - 0.05 * span, y_max + 0.05 * span);
    let px = |x: usize| m + (x as f64 / x_max) * (w - 1.5 * m);
    let py = |y: f64| h - m - (y - y0) / (y1 - y0) * (h - 1.5 * m);
    let mut s = String::new();
    let _ = write!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/>"##
    );
    let _ = write!(
        s,
        r##"<line x1="{m}" y1="{}" x2="{}" y2="{}" stroke="black"/>"##,
        h - m,
        w - m / 2.0,
        h - m
    );
    let _ = write!(
        s,
        r##"<line x1="{m}" y1="{}" x2="{m}" y2="{}" stroke="black"/>"##,
        m / 2.0,
        h - m
    );
    for i in 0..=4 {
        let y = y0 + (y1 - y0) * i as f64 / 4.0;
        let _ = write!(
            s,
            r##"<text x="{}" y="{}" text-anchor="end">{y:.3}</text>"##,
            m - 4.0,
            py(y) + 4.0
        );
        let x = (x_max * i as f64 / 4.0).round() as usize;
        let _ = write!(
            s,
            r##"<text x="{}" y="{}" text-anchor="middle">{x}</text>"##,
            px(x),
            h - m + 16.0
        );
    }
    let _ = write!(
        s,
        r##"<text x="{}" y="{}" text-anchor="middle">step</text>"##,
        w / 2.0,
        h - 12.0
    );
    let line = |pts: &[(usize, f64)]| {
        pts.iter()
            .map(|p| format!("{:.1},{:.1}", px(p.0), py(p.1)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    if !train.is_empty() {
        let _ = write!(
            s,
            r##"<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{}"/>"##,
            line(train)
        );
        let _ = write!(
            s,
            r##"<text x="{}" y="20" fill="#1f77b4">train loss</text>"##,
            w - 200.0
        );
    }
    if !eval.is_empty() {
        let _ = write!(
            s,
            r##"<polyline fill="none" stroke="#d62728" stroke-width="2" points="{}"/>"##,
            line(eval)
        );
        for p in eval {
            let _ = write!(
                s,
                r##"<circle cx="{:.1}" cy="{:.1}" r="3" fill="#d62728"/>"##,
                px(p.0),
                py(p.1)
            );
        }
        let _ = write!(
            s,
            r##"<text x="{}" y="20" fill="#d62728">eval loss</text>"##,
            w - 110.0
        );
    }
    s.push_str("</svg>\n");
    std::fs::write(path, s)
}
