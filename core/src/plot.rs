//! Charts of training metrics (`hicra plot`, `hicra analyze`, `hicra compare`), drawn with
//! `plotters` as a PNG and an SVG each.
//!
//! A chart is a set of named series over steps, each optionally with an interval band (for a
//! mean over seeds). Axes carry ticks and a label, several series get a legend, and text is
//! drawn with the DejaVu Sans font compiled into the binary, so a chart looks the same on a
//! machine without fonts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

/// Metrics drawn by default, when present in the file.
pub const DEFAULT_SERIES: &[&str] = &[
    "reward_mean", "accuracy", "pass_at_k", "eval_pass1", "eval_pass_k", "response_length", "entropy_planning", "entropy_execution", "conditional_entropy",
    "semantic_entropy", "planning_share", "clip_fraction", "kl", "grad_norm", "loss", "step_seconds", "tokens_per_s",
];

const SIZE: (u32, u32) = (800, 480);
/// Line colours in order (matplotlib's "tab10"): distinct, and readable on white.
const COLOURS: [RGBColor; 8] = [
    RGBColor(31, 119, 180), RGBColor(255, 127, 14), RGBColor(44, 160, 44), RGBColor(214, 39, 40),
    RGBColor(148, 103, 189), RGBColor(140, 86, 75), RGBColor(227, 119, 194), RGBColor(127, 127, 127),
];
/// The family name the shipped font is registered under.
const FONT: &str = "sans-serif";
/// DejaVu Sans (Bitstream Vera licence, `core/assets/fonts/LICENSE-DejaVu.txt`).
static FONT_BYTES: &[u8] = include_bytes!("../assets/fonts/DejaVuSans.ttf");

/// Why charts could not be drawn.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// Reading the metrics or writing a chart failed.
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
    /// Drawing or encoding failed.
    #[error("{}: drawing failed: {message}", path.display())]
    Draw {
        /// The file.
        path: PathBuf,
        /// The library's explanation.
        message: String,
    },
}

/// One line of a chart.
#[derive(Clone, Debug, Default)]
pub struct Series {
    /// The legend's name.
    pub name: String,
    /// (x, y) points in x order.
    pub points: Vec<(f64, f64)>,
    /// An interval around the line: (x, low, high), drawn as a translucent band.
    pub band: Vec<(f64, f64, f64)>,
}

impl Series {
    /// A line without a band.
    pub fn line(name: &str, points: Vec<(f64, f64)>) -> Self {
        Self { name: name.to_string(), points, band: Vec::new() }
    }
}

/// A chart: a title, axis labels and its series.
#[derive(Clone, Debug)]
pub struct Chart {
    /// Drawn above the plot.
    pub title: String,
    /// The x axis' label.
    pub x_label: String,
    /// The y axis' label.
    pub y_label: String,
    /// The lines.
    pub series: Vec<Series>,
}

impl Chart {
    /// A chart over training steps.
    pub fn over_steps(title: &str, y_label: &str, series: Vec<Series>) -> Self {
        Self { title: title.to_string(), x_label: "step".into(), y_label: y_label.to_string(), series }
    }

    /// Writes `<stem>.png` and `<stem>.svg`; returns both paths.
    pub fn write(&self, stem: &Path) -> Result<Vec<PathBuf>, PlotError> {
        register_font();
        let png = stem.with_extension("png");
        let svg = stem.with_extension("svg");
        let draw_err = |path: &Path| {
            let path = path.to_path_buf();
            move |message: String| PlotError::Draw { path, message }
        };
        let mut pixels = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
        self.draw(BitMapBackend::with_buffer(&mut pixels, SIZE).into_drawing_area()).map_err(draw_err(&png))?;
        write_file(&png, &encode_png(&pixels).map_err(draw_err(&png))?)?;
        let mut text = String::new();
        self.draw(SVGBackend::with_string(&mut text, SIZE).into_drawing_area()).map_err(draw_err(&svg))?;
        write_file(&svg, text.as_bytes())?;
        Ok(vec![png, svg])
    }

    fn draw<B: DrawingBackend>(&self, root: DrawingArea<B, Shift>) -> Result<(), String> {
        let text = |e: DrawingAreaErrorKind<B::ErrorType>| e.to_string();
        root.fill(&WHITE).map_err(text)?;
        let (x_range, y_range) = self.ranges();
        let mut chart = ChartBuilder::on(&root)
            .caption(&self.title, (FONT, 22))
            .margin(16)
            .x_label_area_size(48)
            .y_label_area_size(72)
            .build_cartesian_2d(x_range, y_range)
            .map_err(text)?;
        chart
            .configure_mesh()
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .x_labels(10)
            .y_labels(8)
            .x_label_formatter(&|x| tick(*x))
            .y_label_formatter(&|y| tick(*y))
            .label_style((FONT, 14))
            .axis_desc_style((FONT, 16))
            .light_line_style(TRANSPARENT)
            .bold_line_style(RGBColor(225, 225, 225))
            .draw()
            .map_err(text)?;
        for (i, series) in self.series.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            if series.band.len() >= 2 {
                let upper = series.band.iter().map(|&(x, _, high)| (x, high));
                let lower = series.band.iter().rev().map(|&(x, low, _)| (x, low));
                chart.draw_series(std::iter::once(Polygon::new(upper.chain(lower).collect::<Vec<_>>(), colour.mix(0.18).filled()))).map_err(text)?;
            }
            let line = colour.stroke_width(2);
            chart
                .draw_series(LineSeries::new(series.points.iter().copied(), line))
                .map_err(text)?
                .label(&series.name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], line));
            chart.draw_series(series.points.iter().map(|&p| Circle::new(p, 3, colour.filled()))).map_err(text)?;
        }
        if self.has_legend() {
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .label_font((FONT, 14))
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(160, 160, 160))
                .draw()
                .map_err(text)?;
        }
        root.present().map_err(text)
    }

    fn has_legend(&self) -> bool {
        self.series.len() > 1 || self.series.iter().any(|s| !s.band.is_empty())
    }

    /// The data's extent, bands included, with some room around it, and room above it for the
    /// legend (which sits in the upper left corner) so that it never covers a point.
    fn ranges(&self) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
        let xs = self.series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
        let ys = self.series.iter().flat_map(|s| s.points.iter().map(|p| p.1).chain(s.band.iter().flat_map(|b| [b.1, b.2])));
        let extent = |values: &mut dyn Iterator<Item = f64>| values.filter(|v| v.is_finite()).fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
        let padded = |(lo, hi): (f64, f64)| {
            if lo > hi {
                return 0.0..1.0;
            }
            let room = if hi - lo < 1e-12 { 0.5_f64.max(hi.abs() * 0.05) } else { (hi - lo) * 0.06 };
            lo - room..hi + room
        };
        let y = padded(extent(&mut { ys }));
        // Share of the plot's height the legend takes: about 22 px a row plus its frame, of
        // about 360 px.
        let legend_share = if self.has_legend() { (self.series.len() as f64 * 22.0 + 20.0) / 360.0 } else { 0.0 };
        let headroom = (y.end - y.start) * legend_share / (1.0 - legend_share).max(0.2);
        (padded(extent(&mut { xs })), y.start..y.end + headroom)
    }
}

/// Tick text: short decimals, scientific notation for very large or small magnitudes.
fn tick(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 || v.fract().abs() < 1e-9 {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn register_font() {
    static REGISTER: Once = Once::new();
    REGISTER.call_once(|| {
        // The bytes are the font compiled in above; a failure would be a broken build.
        if plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_err() {
            tracing::error!("the shipped chart font could not be read; chart text will be missing");
        }
    });
}

fn encode_png(pixels: &[u8]) -> Result<Vec<u8>, String> {
    let mut bytes = Vec::new();
    let mut encoder = png::Encoder::new(&mut bytes, SIZE.0, SIZE.1);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| e.to_string())?;
    writer.write_image_data(pixels).map_err(|e| e.to_string())?;
    writer.finish().map_err(|e| e.to_string())?;
    Ok(bytes)
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<(), PlotError> {
    crate::files::write_atomically(path, bytes).map_err(|source| PlotError::Io { path: path.to_path_buf(), source })
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

/// Draws one chart (PNG and SVG) per requested metric present in `metrics`; returns the
/// files written.
pub fn plot_file(metrics: &Path, out_dir: &Path, names: &[&str]) -> Result<Vec<PathBuf>, PlotError> {
    let series = read_series(metrics)?;
    std::fs::create_dir_all(out_dir).map_err(|source| PlotError::Io { path: out_dir.to_path_buf(), source })?;
    let mut written = Vec::new();
    for name in names {
        let Some(points) = series.get(*name).filter(|p| !p.is_empty()) else { continue };
        let chart = Chart::over_steps(name, name, vec![Series::line(name, points.clone())]);
        written.extend(chart.write(&out_dir.join(name))?);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hicra-plot-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    #[test]
    fn draws_a_png_and_an_svg_per_present_metric() {
        let dir = temp_dir("metrics");
        let metrics = dir.join("metrics.jsonl");
        let lines: Vec<String> = (1..=5).map(|s| format!("{{\"step\": {s}, \"reward_mean\": {}, \"loss\": null}}", s as f64 / 10.0)).collect();
        std::fs::write(&metrics, lines.join("\n")).expect("write");
        let written = plot_file(&metrics, &dir, &["reward_mean", "loss", "kl"]).expect("plot");
        assert_eq!(written, vec![dir.join("reward_mean.png"), dir.join("reward_mean.svg")]);
        let png = std::fs::read(&written[0]).expect("png");
        assert_eq!(&png[1..4], b"PNG");
        let svg = std::fs::read_to_string(&written[1]).expect("svg");
        // Axis label and ticks are text in the SVG.
        assert!(svg.contains("\nstep\n") && svg.contains("\n0.3\n"), "{svg}");
        std::fs::write(&metrics, "{\"step\": 1}\nnot json\n").expect("write");
        let err = plot_file(&metrics, &dir, DEFAULT_SERIES).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains(":2:"), "{err}");
    }

    #[test]
    fn text_is_drawn_with_the_shipped_font() {
        // A chart with a title and ticks has dark text pixels outside the plot's lines; without
        // a usable font the bitmap would hold only lines and the fill.
        let dir = temp_dir("font");
        let band = vec![(0.0, 0.1, 0.3), (1.0, 0.2, 0.4)];
        let chart = Chart::over_steps("TITLE", "pass@1", vec![Series { name: "a".into(), points: vec![(0.0, 0.2), (1.0, 0.3)], band }]);
        chart.write(&dir.join("c")).expect("chart");
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(dir.join("c.png")).expect("open")));
        let mut reader = decoder.read_info().expect("info");
        let mut pixels = vec![0; reader.output_buffer_size().unwrap_or(0)];
        reader.next_frame(&mut pixels).expect("frame");
        // The caption's band (top 40 rows) holds anti-aliased glyph pixels: grey levels.
        let caption = &pixels[..(SIZE.0 * 40 * 3) as usize];
        let greys = caption.chunks(3).filter(|p| p[0] == p[1] && p[1] == p[2] && p[0] > 30 && p[0] < 220).count();
        assert!(greys > 20, "{greys} anti-aliased pixels in the caption");
    }

    #[test]
    fn ticks_are_short() {
        assert_eq!(tick(0.25), "0.25");
        assert_eq!(tick(3.0), "3");
        assert_eq!(tick(1234.6), "1235");
        assert_eq!(tick(2.5e-5), "2.5e-5");
    }
}
