//! Line charts of training metrics as PNG files (`hicra plot`).
//!
//! Deliberately small: a raster canvas, Bresenham lines, an 8x8 bitmap font for titles and axis
//! labels, and the `png` encoder. One chart per metric, steps on the x axis.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Metrics drawn by default, when present in the file.
pub const DEFAULT_SERIES: &[&str] = &[
    "reward_mean", "accuracy", "pass_at_k", "eval_pass1", "eval_pass_k", "response_length", "entropy_planning", "entropy_execution", "conditional_entropy",
    "semantic_entropy", "planning_share", "clip_fraction", "kl", "grad_norm", "loss", "step_seconds", "tokens_per_s",
];

const WIDTH: usize = 640;
const HEIGHT: usize = 360;
const MARGIN_LEFT: usize = 80;
const MARGIN_RIGHT: usize = 20;
const MARGIN_TOP: usize = 30;
const MARGIN_BOTTOM: usize = 40;

/// Why charts could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Reading the metrics or writing a PNG failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A line of the metrics file is not JSON.
    #[error("{}:{line}: not a JSON object: {message}", path.display())]
    BadLine {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The parser's explanation.
        message: String,
    },
    /// PNG encoding failed.
    #[error("{}: PNG encoding failed: {message}", path.display())]
    Encode {
        /// The file.
        path: PathBuf,
        /// The encoder's explanation.
        message: String,
    },
}

/// Reads `metrics.jsonl` into series: metric name -> (step, value) for finite numbers.
pub fn read_series(path: &Path) -> Result<BTreeMap<String, Vec<(f64, f64)>>, PlotError> {
    let text = std::fs::read_to_string(path).map_err(|source| PlotError::Io { path: path.to_path_buf(), source })?;
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let value: serde_json::Value = serde_json::from_str(line).map_err(|e| PlotError::BadLine { path: path.to_path_buf(), line: i + 1, message: e.to_string() })?;
        let Some(object) = value.as_object() else {
            return Err(PlotError::BadLine { path: path.to_path_buf(), line: i + 1, message: "not an object".into() });
        };
        // `run_step` counts loop steps (`step` counts optimizer updates, which skip
        // equal-reward batches); older files have only `step`.
        let step = object.get("run_step").or_else(|| object.get("step")).and_then(|s| s.as_f64()).unwrap_or(i as f64);
        for (key, v) in object {
            if let Some(x) = v.as_f64().filter(|x| x.is_finite()) {
                series.entry(key.clone()).or_default().push((step, x));
            }
        }
    }
    Ok(series)
}

/// Draws one PNG per requested metric present in `metrics`; returns the files written.
pub fn plot_file(metrics: &Path, out_dir: &Path, names: &[&str]) -> Result<Vec<PathBuf>, PlotError> {
    let series = read_series(metrics)?;
    std::fs::create_dir_all(out_dir).map_err(|source| PlotError::Io { path: out_dir.to_path_buf(), source })?;
    let mut written = Vec::new();
    for name in names {
        let Some(points) = series.get(*name).filter(|p| !p.is_empty()) else { continue };
        let path = out_dir.join(format!("{name}.png"));
        write_png(&path, &chart(name, &[(*name, points.clone())]))?;
        written.push(path);
    }
    Ok(written)
}

/// An RGB canvas.
struct Canvas {
    pixels: Vec<u8>,
}

impl Canvas {
    fn new() -> Self {
        Self { pixels: vec![255; WIDTH * HEIGHT * 3] }
    }

    fn set(&mut self, x: i64, y: i64, rgb: [u8; 3]) {
        if (0..WIDTH as i64).contains(&x) && (0..HEIGHT as i64).contains(&y) {
            let at = (y as usize * WIDTH + x as usize) * 3;
            self.pixels[at..at + 3].copy_from_slice(&rgb);
        }
    }

    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), rgb: [u8; 3]) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            self.set(x, y, rgb);
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    fn text(&mut self, x: i64, y: i64, text: &str) {
        for (i, c) in text.chars().enumerate() {
            let glyph = font8x8::legacy::BASIC_LEGACY.get(c as usize).copied().unwrap_or([0; 8]);
            for (row, bits) in glyph.iter().enumerate() {
                for col in 0..8 {
                    if bits & (1 << col) != 0 {
                        self.set(x + (i * 8 + col) as i64, y + row as i64, [0, 0, 0]);
                    }
                }
            }
        }
    }
}

fn label(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e4 || v.abs() < 1e-2) { format!("{v:.2e}") } else { format!("{v:.3}") }
}

/// Line colours, one per series.
const COLOURS: [[u8; 3]; 4] = [[31, 119, 180], [214, 39, 40], [44, 160, 44], [148, 103, 189]];

/// A line chart of one or more named series, with a legend when there are several.
fn chart(title: &str, series: &[(&str, Vec<(f64, f64)>)]) -> Canvas {
    let mut canvas = Canvas::new();
    let all = || series.iter().flat_map(|(_, points)| points.iter());
    let (x_min, x_max) = all().fold((f64::MAX, f64::MIN), |(lo, hi), p| (lo.min(p.0), hi.max(p.0)));
    let (mut y_min, mut y_max) = all().fold((f64::MAX, f64::MIN), |(lo, hi), p| (lo.min(p.1), hi.max(p.1)));
    if y_max - y_min < 1e-12 {
        y_min -= 0.5;
        y_max += 0.5;
    }
    let plot_w = (WIDTH - MARGIN_LEFT - MARGIN_RIGHT) as f64;
    let plot_h = (HEIGHT - MARGIN_TOP - MARGIN_BOTTOM) as f64;
    let to_px = |(x, y): (f64, f64)| -> (i64, i64) {
        let fx = if x_max > x_min { (x - x_min) / (x_max - x_min) } else { 0.5 };
        let fy = (y - y_min) / (y_max - y_min);
        ((MARGIN_LEFT as f64 + fx * plot_w) as i64, (MARGIN_TOP as f64 + (1.0 - fy) * plot_h) as i64)
    };
    let (left, right, top, bottom) = (MARGIN_LEFT as i64, (WIDTH - MARGIN_RIGHT) as i64, MARGIN_TOP as i64, (HEIGHT - MARGIN_BOTTOM) as i64);
    for gy in 0..=4 {
        let y = top + (bottom - top) * gy / 4;
        canvas.line((left, y), (right, y), [225, 225, 225]);
        canvas.text(4, y - 4, &label(y_max - (y_max - y_min) * gy as f64 / 4.0));
    }
    canvas.line((left, top), (left, bottom), [0, 0, 0]);
    canvas.line((left, bottom), (right, bottom), [0, 0, 0]);
    canvas.text(left, 10, title);
    canvas.text(left, bottom + 12, &format!("step {x_min:.0}"));
    let end = format!("step {x_max:.0}");
    canvas.text(right - 8 * end.len() as i64, bottom + 12, &end);
    for (i, (name, points)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        for pair in points.windows(2) {
            canvas.line(to_px(pair[0]), to_px(pair[1]), colour);
        }
        for &p in points {
            let (x, y) = to_px(p);
            for (dx, dy) in [(0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)] {
                canvas.set(x + dx, y + dy, colour);
            }
        }
        if series.len() > 1 {
            // Legend at the top right: a short line in the series' colour, then its name.
            let longest = series.iter().map(|(n, _)| n.chars().count()).max().unwrap_or(0) as i64;
            let (x, y) = (right - 8 * longest - 24, top + 6 + 12 * i as i64);
            canvas.line((x, y + 3), (x + 16, y + 3), colour);
            canvas.text(x + 22, y, name);
        }
    }
    canvas
}

/// Draws `series` (name, (step, value) points) as one PNG chart at `path`.
pub fn write_chart(path: &Path, title: &str, series: &[(&str, Vec<(f64, f64)>)]) -> Result<(), PlotError> {
    write_png(path, &chart(title, series))
}

fn write_png(path: &Path, canvas: &Canvas) -> Result<(), PlotError> {
    let encode_err = |e: png::EncodingError| PlotError::Encode { path: path.to_path_buf(), message: e.to_string() };
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, WIDTH as u32, HEIGHT as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(encode_err)?;
    writer.write_image_data(&canvas.pixels).map_err(encode_err)?;
    writer.finish().map_err(encode_err)?;
    crate::files::write_atomically(path, &bytes).map_err(|source| PlotError::Io { path: path.to_path_buf(), source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_one_png_per_present_metric() {
        let dir = std::env::temp_dir().join(format!("hicra-plot-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let metrics = dir.join("metrics.jsonl");
        let lines: Vec<String> = (1..=5).map(|s| format!("{{\"step\": {s}, \"reward_mean\": {}, \"loss\": null}}", s as f64 / 10.0)).collect();
        std::fs::write(&metrics, lines.join("\n")).expect("write");
        let written = plot_file(&metrics, &dir, &["reward_mean", "loss", "kl"]).expect("plot");
        assert_eq!(written, vec![dir.join("reward_mean.png")]);
        let bytes = std::fs::read(&written[0]).expect("png");
        assert_eq!(&bytes[1..4], b"PNG");
        std::fs::write(&metrics, "{\"step\": 1}\nnot json\n").expect("write");
        let err = plot_file(&metrics, &dir, DEFAULT_SERIES).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(":2:"), "{err}");
    }
}
