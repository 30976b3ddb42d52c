//! `sbgen bench --plot FILE.svg`: the results of a bench run (or of the JSON file `bench --json`
//! wrote, `--from-json`) as an SVG line plot, with the baselines of `baselines.py` (the GPU bundle's) beside
//! them (`--baselines`).
//!
//! - dense and packed (varlen) documents: TFLOP/s against the sequence length N (log2 axis; for a
//!   packed batch N is its longest sequence), one line per pass, early-exit setting, mode and the
//!   shape fields that vary (head_dim, heads); when every row has the same N and head_dim varies,
//!   against head_dim instead;
//! - decode documents (`bench --decode`): GB/s of the K/V cache read against the cached length N,
//!   one line per cache, early-exit setting and batch/heads/head_dim, with the peak bandwidth the
//!   rows were measured against as a dotted line.
//!
//! Each family (what was timed: `sbgen fwd`, `flash_fwd`) has a colour and each shape (the fields
//! that vary) a marker; baselines are dashed with hollow markers, sbgen solid with filled ones. The
//! y axis turns
//! logarithmic when the values span more than [`LOG_Y_SPAN`] (early exit's effective TFLOP/s are
//! ten times the rest); `--early-exit off` leaves those rows out instead.
//!
//! The documents are read as untyped JSON: files written by older versions (no `kv_heads`, no
//! `mode`) plot too, and a field that is not what it should be is an error naming it, never a
//! panic. Text is emitted as SVG `<text>` (the viewer's sans-serif font): no font library.

use plotters::backend::SVGBackend;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::coord::Shift;
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};

/// Width and height of the plot, in pixels; the legend panel is added on the right, as wide as
/// its longest name needs (the picture grows taller for a long legend).
const PLOT_SIZE: (u32, u32) = (800, 600);
/// Height of one legend entry, in pixels.
const LEGEND_ROW: u32 = 24;
/// The legend's reference-line entry: a dotted black line.
const REFERENCE_STYLE: ShapeStyle = ShapeStyle { color: RGBAColor(0, 0, 0, 0.6), filled: false, stroke_width: 1 };
/// Above this ratio of the largest to the smallest value the y axis is logarithmic.
pub const LOG_Y_SPAN: f64 = 20.0;

/// Why a plot could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The bench document is not one `sbgen bench --json` writes (or a field has the wrong type).
    #[error("not an `sbgen bench --json` document: {0}")]
    Bench(String),
    /// The baselines document is not one `baselines.py` writes.
    #[error("not a baselines document (a list of rows from baselines.py): {0}")]
    Baselines(String),
    /// The documents parse, but nothing is left to draw.
    #[error("nothing to plot: {0}")]
    Empty(String),
    /// plotters failed to draw.
    #[error("cannot draw the plot: {0}")]
    Draw(String),
}

impl PlotError {
    /// Whether the user can fix this (a wrong or empty input document): the CLI exits 2 for those.
    pub fn is_users_to_fix(&self) -> bool {
        !matches!(self, PlotError::Draw(_))
    }
}

/// A figure, ready to draw: axes and series in data units.
#[derive(Clone, Debug, PartialEq)]
pub struct Figure {
    pub title: String,
    pub x: XAxis,
    pub y_label: String,
    pub series: Vec<Series>,
    /// A horizontal reference line (name, y), e.g. the peak bandwidth.
    pub reference: Option<(String, f64)>,
}

/// What the x axis shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XAxis {
    /// The sequence length N, log2 scale (`packed`: the longest sequence of a packed batch).
    SeqLen { packed: bool },
    /// The cached length of a decode, log2 scale.
    Context,
    /// head_dim, linear.
    HeadDim,
}

impl XAxis {
    fn label(self) -> &'static str {
        match self {
            XAxis::SeqLen { packed: false } => "sequence length N (log2 scale)",
            XAxis::SeqLen { packed: true } => "sequence length N (a packed batch: its longest sequence; log2 scale)",
            XAxis::Context => "cached tokens per sequence N (log2 scale)",
            XAxis::HeadDim => "head_dim",
        }
    }

    fn log2(self) -> bool {
        !matches!(self, XAxis::HeadDim)
    }
}

/// One line: its points (x, y) in data units, sorted by x.
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    pub name: String,
    /// A baseline (dashed, hollow markers) rather than sbgen's own (solid, filled markers).
    pub baseline: bool,
    pub points: Vec<(f64, f64)>,
    /// The colour: one per family (`sbgen fwd`, `flash_fwd`, ...), in order.
    pub color: usize,
    /// The marker: one per shape (the varying fields, `D=64`), in order.
    pub marker: usize,
}

/// The figure of a bench document and, optionally, a baselines document. `early_exits` keeps only
/// sbgen's rows of these settings (`None` = off); empty keeps all.
pub fn figure(bench: &Value, baselines: Option<&Value>, early_exits: &[Option<u32>]) -> Result<Figure, PlotError> {
    let doc = bench.as_object().ok_or_else(|| {
        let hint = if bench.is_array() { " (a list: a baselines file goes with `--baselines`)" } else { "" };
        PlotError::Bench(format!("expected an object with `results`{hint}"))
    })?;
    let results =
        doc.get("results").and_then(Value::as_array).ok_or_else(|| PlotError::Bench("no `results` list".into()))?;
    let kind = match results.first() {
        None => return Err(PlotError::Empty("the document's `results` list is empty".into())),
        Some(r) if r.get("problem").is_some() => Kind::Decode,
        Some(r) if r.get("shape").is_some() => Kind::Dense,
        Some(_) => {
            return Err(PlotError::Bench(
                "its results have neither `shape` (dense or packed rows) nor `problem` (decode rows)".into(),
            ))
        }
    };
    let mut rows = Vec::new();
    for (i, r) in results.iter().enumerate() {
        let row = match kind {
            Kind::Dense => dense_row(r),
            Kind::Decode => decode_row(r),
        }
        .map_err(|why| PlotError::Bench(format!("results[{i}]: {why}")))?;
        if let Some(row) = row.filter(|row| early_exits.is_empty() || early_exits.contains(&row.early_exit)) {
            rows.push(row);
        }
    }
    if rows.is_empty() {
        let why = if early_exits.is_empty() { "" } else { " of the `--early-exit` settings asked for" };
        return Err(PlotError::Empty(format!("no result{why} has a measured value (every row failed?)")));
    }
    if let Some(b) = baselines {
        let found = baseline_rows(b, kind)?;
        if found.is_empty() {
            let what = match kind {
                Kind::Dense => "`tflops` value in a dense (`shape`) or packed (`varlen`) row",
                Kind::Decode => "`gbps` value in a decode (`decode`) row",
            };
            return Err(PlotError::Empty(format!("the baselines have no {what}")));
        }
        rows.extend(found);
    }
    Ok(build(doc, kind, rows))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Dense,
    Decode,
}

/// One measured value, sbgen's or a baseline's, with the fields a series is told apart by.
#[derive(Clone, Debug)]
struct Row {
    /// `sbgen fwd`, `sbgen decode paged/16`, or the baseline's key (`flash_fwd`).
    what: String,
    baseline: bool,
    early_exit: Option<u32>,
    /// `packed`, `separate`, `padded` (not `dense`); the decode's L2 flush when not `read`.
    mode: Option<String>,
    batch: usize,
    heads: usize,
    kv_heads: usize,
    seq: usize,
    head_dim: usize,
    y: f64,
}

fn field<'a>(r: &'a Value, name: &str) -> Result<&'a Value, String> {
    r.get(name).ok_or_else(|| format!("no `{name}`"))
}

fn usize_of(v: &Value, name: &str) -> Result<usize, String> {
    v.as_u64().map(|n| n as usize).ok_or_else(|| format!("`{name}` is not a non-negative integer: {v}"))
}

/// `[a, b, ...]` of non-negative integers.
fn usizes(v: &Value, name: &str) -> Result<Vec<usize>, String> {
    v.as_array().ok_or_else(|| format!("`{name}` is not a list: {v}"))?.iter().map(|x| usize_of(x, name)).collect()
}

/// A positive, finite number, or `None` (null, absent, zero: not measured).
fn measured(v: Option<&Value>, name: &str) -> Result<Option<f64>, String> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(x) => {
            let y = x.as_f64().ok_or_else(|| format!("`{name}` is not a number: {x}"))?;
            Ok((y.is_finite() && y > 0.0).then_some(y))
        }
    }
}

fn early_exit_of(r: &Value) -> Result<Option<u32>, String> {
    match r.get("early_exit_bits") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .and_then(|b| u32::try_from(b).ok())
            .map(Some)
            .ok_or_else(|| format!("`early_exit_bits` is not a number of bits: {v}")),
    }
}

fn has_error(r: &Value) -> bool {
    r.get("error").is_some_and(|e| !e.is_null())
}

/// A row of `bench --json` (dense or packed); `None` when it has no time (an error).
fn dense_row(r: &Value) -> Result<Option<Row>, String> {
    let shape = usizes(field(r, "shape")?, "shape")?;
    let [batch, heads, seq, head_dim] = shape[..] else {
        return Err(format!("`shape` has {} entries, not the 4 of [B, H, N, D]", shape.len()));
    };
    let pass = field(r, "pass")?.as_str().ok_or("`pass` is not a string")?;
    let kv_heads = match r.get("kv_heads") {
        None | Some(Value::Null) => heads,
        Some(v) => usize_of(v, "kv_heads")?,
    };
    let mode = match r.get("mode") {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_str().ok_or("`mode` is not a string")? {
            "dense" => None,
            m => Some(m.to_string()),
        },
    };
    let early_exit = early_exit_of(r)?;
    let Some(y) = measured(r.get("tflops"), "tflops")? else { return Ok(None) };
    if has_error(r) {
        return Ok(None);
    }
    Ok(Some(Row {
        what: format!("sbgen {pass}"),
        baseline: false,
        early_exit,
        mode,
        batch,
        heads,
        kv_heads,
        seq,
        head_dim,
        y,
    }))
}

/// A row of `bench --decode --json`; `None` when it has no time.
fn decode_row(r: &Value) -> Result<Option<Row>, String> {
    let p = field(r, "problem")?;
    let get = |name: &str| field(p, name).and_then(|v| usize_of(v, name)).map_err(|e| format!("problem: {e}"));
    let cache = field(r, "cache")?.as_str().ok_or("`cache` is not a string")?;
    let mode = match r.get("flush").and_then(Value::as_str) {
        Some("read") | None => None,
        Some(f) => Some(format!("{f} flush")),
    };
    let early_exit = early_exit_of(r)?;
    let Some(y) = measured(r.get("gbps"), "gbps")? else { return Ok(None) };
    if has_error(r) {
        return Ok(None);
    }
    Ok(Some(Row {
        what: format!("sbgen decode {cache}"),
        baseline: false,
        early_exit,
        mode,
        batch: get("batch")?,
        heads: get("heads")?,
        kv_heads: get("kv_heads")?,
        seq: get("seq")?,
        head_dim: get("head_dim")?,
        y,
    }))
}

/// The rows of a baselines document of `kind`: every key whose value is an object with a positive
/// `tflops` (dense) or `gbps` (decode); rows of the other kind and failed entries (an `error`, a
/// null) are skipped.
fn baseline_rows(doc: &Value, kind: Kind) -> Result<Vec<Row>, PlotError> {
    let list = doc.as_array().ok_or_else(|| {
        let hint = if doc.get("results").is_some() { " (this is a bench document)" } else { "" };
        PlotError::Baselines(format!("expected a list{hint}"))
    })?;
    let mut rows = Vec::new();
    for (i, r) in list.iter().enumerate() {
        let bad = |why: String| PlotError::Baselines(format!("[{i}]: {why}"));
        let Some(obj) = r.as_object() else { return Err(bad(format!("not an object: {r}"))) };
        // (batch, heads, kv_heads, seq, head_dim) of the row, when it is of this kind.
        let dims = match kind {
            Kind::Dense => {
                if let Some(shape) = obj.get("shape") {
                    let s = usizes(shape, "shape").map_err(bad)?;
                    match s[..] {
                        [b, h, n, d] => Some((b, h, h, n, d)),
                        [b, h, n, d, kv] => Some((b, h, kv, n, d)),
                        _ => {
                            return Err(bad(format!(
                                "`shape` has {} entries: [B, H, N, D] or [B, H, N, D, H_kv]",
                                s.len()
                            )))
                        }
                    }
                } else if let Some(lens) = obj.get("varlen") {
                    let lens = usizes(lens, "varlen").map_err(bad)?;
                    let h = obj.get("heads").map(|v| usize_of(v, "heads")).transpose().map_err(bad)?.unwrap_or(0);
                    let kv =
                        obj.get("kv_heads").map(|v| usize_of(v, "kv_heads")).transpose().map_err(bad)?.unwrap_or(h);
                    let d = obj.get("head_dim").map(|v| usize_of(v, "head_dim")).transpose().map_err(bad)?.unwrap_or(0);
                    Some((lens.len(), h, kv, lens.iter().copied().max().unwrap_or(0), d))
                } else {
                    None
                }
            }
            Kind::Decode => match obj.get("decode") {
                Some(v) => {
                    let s = usizes(v, "decode").map_err(bad)?;
                    match s[..] {
                        [b, h, kv, n, d] => Some((b, h, kv, n, d)),
                        _ => {
                            return Err(bad(format!(
                                "`decode` has {} entries, not the 5 of [B, H, H_kv, N, D]",
                                s.len()
                            )))
                        }
                    }
                }
                None => None,
            },
        };
        let Some((batch, heads, kv_heads, seq, head_dim)) = dims else { continue };
        let metric = match kind {
            Kind::Dense => "tflops",
            Kind::Decode => "gbps",
        };
        for (key, value) in obj {
            let Some(entry) = value.as_object() else { continue };
            if has_error(value) {
                continue;
            }
            let Some(y) = measured(entry.get(metric), metric).map_err(|e| bad(format!("`{key}`: {e}")))? else {
                continue;
            };
            rows.push(Row {
                what: key.clone(),
                baseline: true,
                early_exit: None,
                mode: None,
                batch,
                heads,
                kv_heads,
                seq,
                head_dim,
                y,
            });
        }
    }
    Ok(rows)
}

/// The distinct values of `f` over `rows`.
fn distinct<T: Ord>(rows: &[Row], f: impl Fn(&Row) -> T) -> BTreeSet<T> {
    rows.iter().map(f).collect()
}

/// `H=16` or `H=32:8` (query heads : K/V heads).
fn heads_label(heads: usize, kv_heads: usize) -> String {
    if heads == kv_heads || heads == 0 {
        format!("H={heads}")
    } else {
        format!("H={heads}:{kv_heads}")
    }
}

/// Groups the rows into series and names the figure: fields that vary go into the series' names,
/// fields every row shares into the title.
fn build(doc: &Map<String, Value>, kind: Kind, rows: Vec<Row>) -> Figure {
    let x = match kind {
        Kind::Decode => XAxis::Context,
        Kind::Dense if distinct(&rows, |r| r.seq).len() == 1 && distinct(&rows, |r| r.head_dim).len() > 1 => {
            XAxis::HeadDim
        }
        Kind::Dense => XAxis::SeqLen { packed: rows.iter().any(|r| r.mode.is_some()) },
    };
    let vary_d = x != XAxis::HeadDim && distinct(&rows, |r| r.head_dim).len() > 1;
    let vary_h = distinct(&rows, |r| (r.heads, r.kv_heads)).len() > 1;
    // A dense benchmark keeps B*N fixed, so the batch is not a series of its own; a decode's is.
    let vary_b = kind == Kind::Decode && distinct(&rows, |r| r.batch).len() > 1;
    // A series is a family (what was timed: colour) and a shape (the varying fields: marker).
    let mut families: Vec<(bool, String)> = Vec::new();
    let mut shapes: Vec<String> = Vec::new();
    let mut groups: BTreeMap<(bool, usize, usize), Vec<(f64, f64)>> = BTreeMap::new();
    for r in &rows {
        let mut family = r.what.clone();
        if let Some(bits) = r.early_exit {
            family.push_str(&format!(" ee{bits}"));
        }
        if let Some(mode) = &r.mode {
            family.push_str(&format!(" {mode}"));
        }
        let mut shape = Vec::new();
        if vary_b {
            shape.push(format!("B={}", r.batch));
        }
        if vary_h {
            shape.push(heads_label(r.heads, r.kv_heads));
        }
        if vary_d {
            shape.push(format!("D={}", r.head_dim));
        }
        let shape = shape.join(" ");
        let family = (r.baseline, family);
        let f = families.iter().position(|x| *x == family).unwrap_or_else(|| {
            families.push(family);
            families.len() - 1
        });
        let v = shapes.iter().position(|x| *x == shape).unwrap_or_else(|| {
            shapes.push(shape);
            shapes.len() - 1
        });
        let px = (if x == XAxis::HeadDim { r.head_dim } else { r.seq }) as f64;
        groups.entry((r.baseline, f, v)).or_default().push((px, r.y));
    }
    // sbgen's series first, then the baselines; each family's shapes together. Colours go to the
    // families in that order.
    let mut colors: Vec<usize> = Vec::new();
    let series = groups
        .into_iter()
        .map(|((baseline, f, v), mut points)| {
            points.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)));
            let color = colors.iter().position(|&c| c == f).unwrap_or_else(|| {
                colors.push(f);
                colors.len() - 1
            });
            let name = [families[f].1.as_str(), shapes[v].as_str()].join(" ").trim_end().to_string();
            Series { name, baseline, points, color, marker: v }
        })
        .collect();

    let text = |name: &str| doc.get(name).and_then(Value::as_str);
    let mut parts: Vec<String> = Vec::new();
    if let Some(dtype) = text("dtype") {
        parts.push(dtype.to_string());
    }
    if let Some(mask) = text("mask") {
        parts.push(format!("mask {mask}"));
    }
    match kind {
        Kind::Dense => {
            if let Some(layout) = text("layout") {
                parts.push(format!("layout {layout}"));
            }
            if doc.get("deterministic").and_then(Value::as_bool) == Some(true) {
                parts.push("deterministic backward".into());
            }
        }
        Kind::Decode => {
            let flushes: BTreeSet<&str> = rows.iter().filter_map(|r| r.mode.as_deref()).collect();
            if flushes.is_empty() {
                parts.push("L2 flush: read".into());
            }
        }
    }
    if !vary_b && kind == Kind::Decode {
        parts.push(format!("B={}", rows[0].batch));
    }
    if !vary_h {
        parts.push(heads_label(rows[0].heads, rows[0].kv_heads));
    }
    if !vary_d && x != XAxis::HeadDim {
        parts.push(format!("D={}", rows[0].head_dim));
    }
    if x == XAxis::HeadDim {
        parts.push(format!("N={}", rows[0].seq));
    }
    let what = match kind {
        Kind::Dense => "sbgen bench",
        Kind::Decode => "sbgen bench --decode",
    };
    let gpu = text("gpu").unwrap_or("unknown GPU");
    let title = format!("{what} on {gpu}: {}", parts.join(", "));
    let (y_label, reference) = match kind {
        Kind::Dense => ("TFLOP/s (docs/performance.md#counting)".to_string(), None),
        Kind::Decode => ("GB/s of the K/V cache read".to_string(), decode_peak(doc)),
    };
    Figure { title, x, y_label, series, reference }
}

/// The peak bandwidth the decode rows were measured against (`gbps / peak_fraction`, the same in
/// every row that has both), as a reference line.
fn decode_peak(doc: &Map<String, Value>) -> Option<(String, f64)> {
    let results = doc.get("results")?.as_array()?;
    let peaks: Vec<f64> = results
        .iter()
        .filter_map(|r| Some(r.get("gbps")?.as_f64()? / r.get("peak_fraction")?.as_f64()?))
        .filter(|p| p.is_finite() && *p > 0.0)
        .collect();
    let first = *peaks.first()?;
    peaks.iter().all(|p| (p / first - 1.0).abs() < 1e-3).then(|| (format!("peak {first:.0} GB/s"), first))
}

/// Tick values for a linear axis from 0 to `max`: steps of 1, 2 or 5 times a power of ten, 4 to 10
/// of them.
fn linear_ticks(max: f64) -> Vec<f64> {
    let raw = max / 6.0;
    let magnitude = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0].iter().map(|m| m * magnitude).find(|s| max / s <= 8.0).unwrap_or(10.0 * magnitude);
    (0..).map(|i| i as f64 * step).take_while(|&v| v <= max * 1.0001).collect()
}

/// Tick values (in data units) for a log10 axis over [lo, hi]: 1, 2 and 5 times powers of ten.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut out = Vec::new();
    let mut p = 10f64.powf(lo.log10().floor());
    while p <= hi {
        for m in [1.0, 2.0, 5.0] {
            let v = m * p;
            if v >= lo && v <= hi {
                out.push(v);
            }
        }
        p *= 10.0;
    }
    out
}

/// `16384`, `4.5`, `0.25`: a value as a tick label.
fn number(v: f64) -> String {
    if (v - v.round()).abs() < 1e-6 * v.abs().max(1.0) {
        format!("{}", v.round() as i64)
    } else if v.abs() >= 10.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}").trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Colours of the series, in order (Tableau 10).
const COLORS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// A linear axis over `range` with grid lines and labels at `ticks` only (plotters'
/// `with_key_points` cannot take a label formatter in 0.3.7).
#[derive(Clone)]
struct Axis {
    range: std::ops::Range<f64>,
    ticks: Vec<f64>,
}

impl Ranged for Axis {
    type ValueType = f64;
    type FormatOption = DefaultFormatting;

    fn map(&self, v: &f64, limit: (i32, i32)) -> i32 {
        let span = self.range.end - self.range.start;
        let t = if span > 0.0 { (v - self.range.start) / span } else { 0.5 };
        limit.0 + (t * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> std::ops::Range<f64> {
        self.range.clone()
    }
}

fn draw_error<E: std::error::Error + Send + Sync>(e: DrawingAreaErrorKind<E>) -> PlotError {
    PlotError::Draw(e.to_string())
}

/// The figure as an SVG document.
pub fn render_svg(fig: &Figure) -> Result<String, PlotError> {
    let points: Vec<(f64, f64)> = fig.series.iter().flat_map(|s| s.points.iter().copied()).collect();
    if points.is_empty() {
        return Err(PlotError::Empty("no series has a point".into()));
    }
    // Axes in transformed units (log2 of N, log10 of a log-scale y), so both axes are plain f64
    // ranges with the tick values placed by hand.
    let log2 = fig.x.log2();
    let tx = |x: f64| if log2 { x.log2() } else { x };
    let xs: BTreeSet<u64> = points.iter().map(|p| p.0.to_bits()).collect();
    let xs: Vec<f64> = xs.into_iter().map(f64::from_bits).collect();
    let (x_min, x_max) = points.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| (lo.min(tx(p.0)), hi.max(tx(p.0))));
    let pad = if x_max > x_min {
        (x_max - x_min) * 0.06
    } else if log2 {
        1.0
    } else {
        16.0
    };
    let x_range = (x_min - pad)..(x_max + pad);
    let x_ticks: Vec<f64> = if xs.len() <= 12 {
        xs.iter().map(|&x| tx(x)).collect()
    } else if log2 {
        (x_min.ceil() as i64..=x_max.floor() as i64).map(|e| e as f64).collect()
    } else {
        linear_ticks(x_max).into_iter().filter(|v| x_range.contains(v)).collect()
    };

    let mut ys: Vec<f64> = points.iter().map(|p| p.1).collect();
    if let Some((_, r)) = &fig.reference {
        ys.push(*r);
    }
    let (y_min, y_max) = ys.iter().fold((f64::MAX, f64::MIN), |(lo, hi), &y| (lo.min(y), hi.max(y)));
    let log_y = y_max / y_min > LOG_Y_SPAN;
    let ty = |y: f64| if log_y { y.log10() } else { y };
    let (y_range, y_ticks) = if log_y {
        let (lo, hi) = (y_min / 1.4, y_max * 1.4);
        (lo.log10()..hi.log10(), log_ticks(lo, hi).into_iter().map(f64::log10).collect::<Vec<_>>())
    } else {
        let hi = y_max * 1.1;
        (0.0..hi, linear_ticks(hi))
    };
    let y_label = if log_y { format!("{} (log scale)", fig.y_label) } else { fig.y_label.clone() };

    let entries: Vec<&str> = fig
        .series
        .iter()
        .map(|s| s.name.as_str())
        .chain(fig.reference.as_ref().map(|(name, _)| name.as_str()))
        .collect();
    let mut svg = String::new();
    {
        // ~9 px a character at the legend's font size, and room for the line sample.
        let longest = entries.iter().map(|name| name.chars().count()).max().unwrap_or(0) as u32;
        let legend_width = (80 + 9 * longest).clamp(200, 640);
        let height = PLOT_SIZE.1.max(80 + LEGEND_ROW * entries.len() as u32);
        let root = SVGBackend::with_string(&mut svg, (PLOT_SIZE.0 + legend_width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(draw_error)?;
        let titled = root.titled(&fig.title, ("sans-serif", 24)).map_err(draw_error)?;
        let (plot_area, legend_area) = titled.split_horizontally(PLOT_SIZE.0);
        // Taller than the plot for a long legend: the plot keeps its height, at the top.
        let extra = height - PLOT_SIZE.1;
        let plot_area =
            if extra > 0 { plot_area.split_vertically(plot_area.dim_in_pixel().1 - extra).0 } else { plot_area };
        let mut chart = ChartBuilder::on(&plot_area)
            .margin(14)
            .x_label_area_size(50)
            .y_label_area_size(86)
            .build_cartesian_2d(
                Axis { range: x_range.clone(), ticks: x_ticks },
                Axis { range: y_range, ticks: y_ticks },
            )
            .map_err(draw_error)?;
        chart
            .configure_mesh()
            .x_desc(fig.x.label())
            .y_desc(y_label)
            .axis_desc_style(("sans-serif", 19))
            .label_style(("sans-serif", 17))
            .bold_line_style(BLACK.mix(0.12))
            .x_label_formatter(&|v| number(if log2 { v.exp2() } else { *v }))
            .y_label_formatter(&|v| number(if log_y { 10f64.powf(*v) } else { *v }))
            .draw()
            .map_err(draw_error)?;
        if let Some((_, y)) = &fig.reference {
            let (a, b) = (x_range.start, x_range.end);
            chart
                .draw_series(DashedLineSeries::new([(a, ty(*y)), (b, ty(*y))], 2, 4, REFERENCE_STYLE))
                .map_err(draw_error)?;
        }
        // Baselines first, so sbgen's lines are drawn on top of them.
        for s in fig.series.iter().rev() {
            let color = COLORS[s.color % COLORS.len()];
            let pts: Vec<(f64, f64)> = s.points.iter().map(|&(x, y)| (tx(x), ty(y))).collect();
            let style = ShapeStyle { color: color.to_rgba(), filled: false, stroke_width: 2 };
            if s.baseline {
                chart.draw_series(DashedLineSeries::new(pts.clone(), 7, 5, style)).map_err(draw_error)?;
            } else {
                chart.draw_series(LineSeries::new(pts.clone(), style)).map_err(draw_error)?;
            }
            for p in &pts {
                marker(&root, chart.backend_coord(p), s)?;
            }
        }
        legend(
            &root,
            legend_area.get_base_pixel(),
            &fig.series,
            fig.reference.as_ref().map(|(name, _)| name.as_str()),
        )?;
        root.present().map_err(draw_error)?;
    }
    Ok(svg)
}

/// The marker of series `s` at the pixel `(x, y)` of `area` (the whole picture): its shape
/// by `s.marker` (circle, square, triangle, diamond), filled for sbgen, hollow for a baseline.
fn marker(area: &DrawingArea<SVGBackend<'_>, Shift>, (x, y): (i32, i32), s: &Series) -> Result<(), PlotError> {
    let color = COLORS[s.color % COLORS.len()];
    let r = 5;
    let outline = match s.marker % 4 {
        0 => None,
        1 => Some(vec![(x - r, y - r), (x + r, y - r), (x + r, y + r), (x - r, y + r)]),
        2 => Some(vec![(x, y - r - 1), (x + r + 1, y + r), (x - r - 1, y + r)]),
        _ => Some(vec![(x, y - r - 1), (x + r + 1, y), (x, y + r + 1), (x - r - 1, y)]),
    };
    let fill = if s.baseline { WHITE.filled() } else { color.filled() };
    let stroke = ShapeStyle { color: color.to_rgba(), filled: false, stroke_width: 2 };
    match outline {
        None => {
            area.draw(&Circle::new((x, y), r, fill)).map_err(draw_error)?;
            area.draw(&Circle::new((x, y), r, stroke)).map_err(draw_error)?;
        }
        Some(mut points) => {
            area.draw(&Polygon::new(points.clone(), fill)).map_err(draw_error)?;
            points.push(points[0]);
            area.draw(&PathElement::new(points, stroke)).map_err(draw_error)?;
        }
    }
    Ok(())
}

/// The legend at `origin` of `area` (the whole picture), one entry per series (a sample of its
/// line and marker, then its name), and last the reference line's.
fn legend(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    origin: (i32, i32),
    series: &[Series],
    reference: Option<&str>,
) -> Result<(), PlotError> {
    let row = LEGEND_ROW as i32;
    let (left, top) = (origin.0 + 10, origin.1 + 30);
    let font = ("sans-serif", 18).into_font();
    if let Some(name) = reference {
        let y = top + series.len() as i32 * row;
        area.draw(&DashedPathElement::new([(left, y), (left + 44, y)], 2, 4, REFERENCE_STYLE)).map_err(draw_error)?;
        area.draw(&Text::new(name.to_string(), (left + 54, y - 8), font.clone())).map_err(draw_error)?;
    }
    for (i, s) in series.iter().enumerate() {
        let y = top + i as i32 * row;
        let style = ShapeStyle { color: COLORS[s.color % COLORS.len()].to_rgba(), filled: false, stroke_width: 2 };
        let (a, b) = ((left, y), (left + 44, y));
        if s.baseline {
            area.draw(&DashedPathElement::new([a, b], 7, 5, style)).map_err(draw_error)?;
        } else {
            area.draw(&PathElement::new([a, b], style)).map_err(draw_error)?;
        }
        marker(area, (left + 22, y), s)?;
        area.draw(&Text::new(s.name.clone(), (left + 54, y - 8), font.clone())).map_err(draw_error)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn bench_doc() -> Value {
        let row = |n: usize, d: usize, pass: &str, ee: Option<u32>, tflops: Option<f64>, error: Option<&str>| {
            json!({"shape": [16384 / n, 16, n, d], "kv_heads": 16, "mode": "dense", "pass": pass,
                   "early_exit_bits": ee, "tflops": tflops, "error": error, "seq_lens": null})
        };
        json!({
            "gpu": "NVIDIA H200", "dtype": "bf16", "mask": "strict", "layout": "bhnd", "deterministic": false,
            "results": [
                row(2048, 128, "fwd", None, Some(224.0), None),
                row(2048, 128, "fwd+bwd", None, Some(138.0), None),
                row(4096, 128, "fwd", None, Some(237.0), None),
                row(4096, 128, "fwd+bwd", None, Some(146.0), None),
                row(8192, 128, "fwd", None, Some(249.0), None),
                row(8192, 128, "fwd+bwd", None, None, Some("check failed")),
                row(8192, 128, "fwd", Some(24), Some(4478.0), None),
                row(4096, 64, "fwd", None, Some(183.0), None),
            ]
        })
    }

    fn baselines_doc() -> Value {
        json!([
            {"shape": [8, 16, 2048, 128], "gpu": "NVIDIA H200",
             "flash_fwd": {"ms": 0.48, "tflops": 284.0}, "cudnn_fwdbwd": {"ms": 1.2, "tflops": 409.0},
             "fla_sb_fwd": {"error": "out of memory"}, "fla_sb_fwdbwd": null},
            {"shape": [2, 32, 8192, 128, 8], "gpu": "NVIDIA H200", "flash_fwd": {"ms": 3.3, "tflops": 335.0}},
            {"varlen": [100, 200], "heads": 16, "head_dim": 128, "flash_fwd_per_sequence": {"tflops": 250.0}},
            {"decode": [8, 32, 8, 8192, 128], "sdpa_flash_decode": {"gbps": 3225.0}},
            {"shape": [4, 16, 4096, 128], "error": "flash-attn not installed"}
        ])
    }

    fn names(fig: &Figure) -> Vec<&str> {
        fig.series.iter().map(|s| s.name.as_str()).collect()
    }

    #[test]
    fn dense_rows_make_one_series_per_pass_early_exit_and_varying_shape_field() {
        let fig = figure(&bench_doc(), None, &[]).unwrap();
        assert_eq!(fig.x, XAxis::SeqLen { packed: false });
        // Grouped by family (colour), then shape (marker).
        assert_eq!(names(&fig), ["sbgen fwd D=128", "sbgen fwd D=64", "sbgen fwd+bwd D=128", "sbgen fwd ee24 D=128"]);
        let style: Vec<(usize, usize)> = fig.series.iter().map(|s| (s.color, s.marker)).collect();
        assert_eq!(style, [(0, 0), (0, 1), (1, 0), (2, 0)]);
        assert_eq!(fig.series[0].points, vec![(2048.0, 224.0), (4096.0, 237.0), (8192.0, 249.0)]);
        // The failed row is left out, not drawn as zero.
        assert_eq!(fig.series[2].points, vec![(2048.0, 138.0), (4096.0, 146.0)]);
        assert_eq!(fig.title, "sbgen bench on NVIDIA H200: bf16, mask strict, layout bhnd, H=16");
        assert_eq!(fig.reference, None);
        let off = figure(&bench_doc(), None, &[None]).unwrap();
        assert!(!names(&off).iter().any(|n| n.contains("ee24")), "{:?}", names(&off));
    }

    #[test]
    fn baselines_of_the_documents_kind_are_added_and_failed_entries_skipped() {
        let fig = figure(&bench_doc(), Some(&baselines_doc()), &[Some(24)]).unwrap();
        let got = names(&fig);
        assert_eq!(got[0], "sbgen fwd ee24 H=16");
        assert!(got.contains(&"flash_fwd H=16") && got.contains(&"flash_fwd H=32:8"), "{got:?}");
        assert!(got.contains(&"cudnn_fwdbwd H=16") && got.contains(&"flash_fwd_per_sequence H=16"), "{got:?}");
        assert!(!got.iter().any(|n| n.contains("fla_sb") || n.contains("decode")), "{got:?}");
        assert!(fig.series.iter().skip(1).all(|s| s.baseline));
        let per_sequence = fig.series.iter().find(|s| s.name.starts_with("flash_fwd_per")).unwrap();
        assert_eq!(per_sequence.points, vec![(200.0, 250.0)], "a packed batch is placed at its longest sequence");
    }

    #[test]
    fn one_sequence_length_and_several_head_dims_plot_against_head_dim() {
        let doc = json!({"gpu": "G", "results": [
            {"shape": [2, 16, 8192, 64], "pass": "fwd", "tflops": 180.0},
            {"shape": [2, 16, 8192, 128], "pass": "fwd", "tflops": 249.0},
        ]});
        let fig = figure(&doc, None, &[]).unwrap();
        assert_eq!(fig.x, XAxis::HeadDim);
        assert_eq!(names(&fig), ["sbgen fwd"]);
        assert_eq!(fig.series[0].points, vec![(64.0, 180.0), (128.0, 249.0)]);
        assert!(fig.title.ends_with("H=16, N=8192"), "{}", fig.title);
    }

    #[test]
    fn decode_documents_plot_bandwidth_with_the_peak_line() {
        let row = |b: usize, n: usize, cache: &str, ee: Option<u32>, gbps: f64| {
            json!({"cache": cache, "early_exit_bits": ee, "error": null, "flush": "read", "gbps": gbps,
                   "peak_fraction": gbps / 4800.0,
                   "problem": {"batch": b, "heads": 32, "kv_heads": 8, "seq": n, "head_dim": 128}})
        };
        let doc = json!({"gpu": "NVIDIA H200", "dtype": "bf16", "mask": "strict", "results": [
            row(8, 8192, "bhnd", None, 3866.0), row(8, 32768, "bhnd", None, 4100.0),
            row(8, 8192, "paged/16", None, 3889.0), row(32, 8192, "bhnd", None, 4000.0),
        ]});
        let fig = figure(&doc, Some(&baselines_doc()), &[]).unwrap();
        assert_eq!(fig.x, XAxis::Context);
        assert_eq!(
            names(&fig),
            ["sbgen decode bhnd B=8", "sbgen decode bhnd B=32", "sbgen decode paged/16 B=8", "sdpa_flash_decode B=8"]
        );
        assert_eq!(fig.reference, Some(("peak 4800 GB/s".to_string(), 4800.0)));
        assert!(fig.title.contains("H=32:8") && fig.title.contains("D=128"), "{}", fig.title);
        let svg = render_svg(&fig).unwrap();
        assert!(svg.contains("peak 4800 GB/s") && svg.contains("GB/s of the K/V cache read"));
        assert!(fig.series.iter().all(|s| s.points.iter().all(|p| p.1 > 0.0)));
    }

    #[test]
    fn the_svg_names_every_series_and_the_axes() {
        let fig = figure(&bench_doc(), Some(&baselines_doc()), &[None]).unwrap();
        let svg = render_svg(&fig).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"), "{}", &svg[..200.min(svg.len())]);
        assert_eq!(svg.matches("<text").count(), svg.matches("</text>").count());
        // The contents of the <text> elements.
        let texts: Vec<&str> = svg
            .split("<text")
            .skip(1)
            .filter_map(|t| t.split_once('>').and_then(|(_, rest)| rest.split_once("</text>")).map(|(t, _)| t.trim()))
            .collect();
        for s in &fig.series {
            assert!(texts.contains(&s.name.as_str()), "{} missing from {texts:?}", s.name);
        }
        for text in ["2048", "8192", "sequence length N (log2 scale)", "TFLOP/s (docs/performance.md#counting)"] {
            assert!(texts.contains(&text), "{text} missing from {texts:?}");
        }
        assert!(texts.iter().any(|t| t.starts_with("sbgen bench on NVIDIA H200: bf16")), "{texts:?}");
        // Values spanning more than LOG_Y_SPAN get a log axis.
        let all = render_svg(&figure(&bench_doc(), None, &[]).unwrap()).unwrap();
        assert!(all.contains("(log scale)") && !svg.contains("(log scale)"));
    }

    #[test]
    fn documents_of_the_wrong_shape_are_errors_that_say_what_is_wrong() {
        let err = |bench: Value, baselines: Option<Value>| figure(&bench, baselines.as_ref(), &[]).unwrap_err();
        let e = err(baselines_doc(), None);
        assert!(e.to_string().contains("`--baselines`") && e.is_users_to_fix(), "{e}");
        assert!(err(json!({"gpu": "G"}), None).to_string().contains("no `results`"));
        assert!(matches!(err(json!({"results": []}), None), PlotError::Empty(_)));
        let e = err(json!({"results": [{"shape": [1, 2, 3], "pass": "fwd", "tflops": 1.0}]}), None);
        assert!(e.to_string().contains("results[0]") && e.to_string().contains("[B, H, N, D]"), "{e}");
        let e = err(json!({"results": [{"shape": [1, 2, 3, 4], "pass": "fwd", "tflops": "fast"}]}), None);
        assert!(e.to_string().contains("`tflops` is not a number"), "{e}");
        let e = err(json!({"results": [{"shape": [1, 2, 3, 4], "pass": "fwd", "tflops": null, "error": "x"}]}), None);
        assert!(matches!(e, PlotError::Empty(_)), "{e}");
        let e = err(bench_doc(), Some(bench_doc()));
        assert!(e.to_string().contains("this is a bench document"), "{e}");
        let e = err(bench_doc(), Some(json!([{"decode": [1, 2, 3, 4, 5], "x": {"gbps": 1.0}}])));
        assert!(e.to_string().contains("the baselines have no `tflops`"), "{e}");
        let e = err(bench_doc(), Some(json!([{"shape": [1, 2]}])));
        assert!(e.to_string().contains("[0]") && e.to_string().contains("`shape` has 2 entries"), "{e}");
    }

    #[test]
    fn ticks_are_round_numbers() {
        assert_eq!(linear_ticks(300.0), vec![0.0, 50.0, 100.0, 150.0, 200.0, 250.0, 300.0]);
        assert_eq!(linear_ticks(9.0), vec![0.0, 2.0, 4.0, 6.0, 8.0]);
        assert_eq!(log_ticks(60.0, 1200.0), vec![100.0, 200.0, 500.0, 1000.0]);
        assert_eq!(
            (number(16384.0), number(4.5), number(0.25), number(123.4)),
            ("16384".into(), "4.5".into(), "0.25".into(), "123".into())
        );
    }
}
