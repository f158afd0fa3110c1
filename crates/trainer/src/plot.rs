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
    }
    // Steps at a round spacing (1, 2 or 5 times a power of ten), about four of them.
    let every = tick_spacing(x_max as usize, 4);
    for x in (0..=x_max as usize).step_by(every) {
        let _ = write!(
            s,
            r##"<text class="x-tick" x="{}" y="{}" text-anchor="middle">{x}</text>"##,
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
    let _ = write!(
        s,
        r##"<text x="14" y="{}" text-anchor="middle" transform="rotate(-90 14 {})">loss</text>"##,
        (h - m / 2.0) / 2.0,
        (h - m / 2.0) / 2.0
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

/// The spacing of about `ticks` round ticks over `0..=max`: 1, 2 or 5 times a power of ten.
fn tick_spacing(max: usize, ticks: usize) -> usize {
    let raw = (max as f64 / ticks as f64).max(1.0);
    let pow = 10f64.powf(raw.log10().floor());
    let unit = [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .find(|u| u * pow >= raw)
        .unwrap_or(10.0);
    (unit * pow) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The x ticks of `svg`, in order.
    fn x_ticks(svg: &str) -> Vec<usize> {
        svg.split(r#"class="x-tick""#)
            .skip(1)
            .map(|t| {
                t[t.find('>').unwrap() + 1..t.find('<').unwrap()]
                    .parse()
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn round_step_ticks_and_a_loss_label() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.svg");
        for (steps, want) in [
            (6usize, vec![0, 2, 4, 6]),
            (200, vec![0, 50, 100, 150, 200]),
            (699, vec![0, 200, 400, 600]),
            (3, vec![0, 1, 2, 3]),
        ] {
            let train: Vec<(usize, f64)> = (1..=steps).map(|s| (s, 5.0 / s as f64)).collect();
            write_loss_svg(&path, &train, &[]).unwrap();
            let svg = std::fs::read_to_string(&path).unwrap();
            assert_eq!(x_ticks(&svg), want, "{steps} steps");
            assert!(svg.contains(">loss</text>"), "y-axis label");
        }
    }
}
