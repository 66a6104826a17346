//! `compare --report DIR`: the records as JSON, a Markdown summary, SVG charts drawn with
//! `plotters`, and one `index.html` that shows them. Every number drawn comes from the
//! records of the same run (the JSON next to the charts).
//!
//! Charts:
//! - `speedup.svg`: trapped ÷ PV time per operation for every PV/trapped pair (above 1: PV is
//!   faster), with the line at 1;
//! - `exits.svg`: exits per operation, PV and trapped, per workload (log scale);
//! - `cpu.svg`: the vCPU thread's CPU as a share of wall time, PV and trapped, per workload;
//! - `bytes.svg`: bytes written by a snapshot and sent by a migration, PV and trapped;
//! - `density-cpu.svg`, `density-rss.svg`, `density-response.svg` and `density-latency.svg`:
//!   host CPU of the vCPUs (cores), the process's resident set (MiB), response latency p50 and
//!   p99 and wake-up latency p99 against the number of VMs (log axis), one line per way of
//!   idling;
//! - `workload-<name>.svg`, one per workload with PV and trapped runs (not `density` nor the
//!   floors): time per operation, exits per operation, vCPU CPU and guest RAM backed at the end,
//!   one panel each that the records have, one bar per run (PV blue, trapped red, a `native`
//!   baseline grey).
//!
//! A chart without data in this run (its workloads did not run) is left out. `index.html`
//! opens with the consolidation headline ([`super::density::headline`]) when the run has
//! `density` fleets.

use std::path::Path;

use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;

use super::record::Record;
use super::report::{ratios, render_json, render_table};

/// Why a report could not be written.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A chart could not be drawn.
    #[error("cannot draw {chart}: {why}")]
    Chart {
        /// The chart's file name.
        chart: String,
        /// Why.
        why: String,
    },
}

const PV: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const TRAPPED: RGBColor = RGBColor(0xd6, 0x27, 0x28);
const SPIN: RGBColor = RGBColor(0x7f, 0x7f, 0x7f);
const SIZE: (u32, u32) = (900, 480);

fn chart_error(chart: &str) -> impl Fn(String) -> SiteError + '_ {
    move |why| SiteError::Chart {
        chart: chart.into(),
        why,
    }
}

/// Writes the report for `records` into `dir` (created). Returns the files written.
pub fn write_report(dir: &Path, records: &[Record]) -> Result<Vec<String>, SiteError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| SiteError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut files = Vec::new();
    let mut write = |name: &str, text: String| -> Result<(), SiteError> {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(io(&path))?;
        files.push(name.to_string());
        Ok(())
    };
    let json = render_json(records).map_err(|e| SiteError::Io {
        path: "records.json".into(),
        source: std::io::Error::other(e),
    })?;
    write("records.json", json)?;
    let table = render_table(records);
    write("summary.md", summary_markdown(&table))?;

    let mut charts = Vec::new();
    for (name, title, svg) in [
        (
            "speedup.svg",
            "Trapped ÷ PV time per operation",
            speedup(records),
        ),
        ("exits.svg", "Exits per operation", exits(records)),
        ("cpu.svg", "vCPU thread CPU, % of wall time", cpu(records)),
        ("bytes.svg", "Snapshot and migration bytes", bytes(records)),
        (
            "density-cpu.svg",
            "Host CPU of N services' vCPUs",
            density(records, Density::Cpu),
        ),
        (
            "density-rss.svg",
            "Host resident memory of N services",
            density(records, Density::Rss),
        ),
        (
            "density-response.svg",
            "Response latency of N services (p99 solid, p50 dashed)",
            density(records, Density::Response),
        ),
        (
            "density-latency.svg",
            "Wake-up latency p99 of N services",
            density(records, Density::Wake),
        ),
    ] {
        if let Some(svg) = svg.map_err(chart_error(name))? {
            write(name, svg)?;
            charts.push((name.to_string(), title.to_string()));
        }
    }
    for (workload, runs) in per_workload(records) {
        let name = format!("workload-{workload}.svg");
        if let Some(svg) = workload_chart(&runs).map_err(chart_error(&name))? {
            write(&name, svg)?;
            charts.push((name, format!("{workload}: PV against trapped, per run")));
        }
    }
    let headline = super::density::headline(records);
    write(
        "index.html",
        index_html(&table, headline.as_deref(), &charts),
    )?;
    Ok(files)
}

fn summary_markdown(table: &str) -> String {
    format!(
        "# pvkit: PV against trapped\n\nFrom one `host-vmm compare` run; the numbers are in \
         `records.json`, the charts in `index.html`.\n\n```text\n{table}```\n"
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn index_html(table: &str, headline: Option<&str>, charts: &[(String, String)]) -> String {
    let headline = match headline {
        Some(h) => format!(
            "<p class=\"headline\"><strong>Consolidation:</strong> {}</p>\n",
            escape(h)
        ),
        None => String::new(),
    };
    let mut figures = String::new();
    for (file, title) in charts {
        figures += &format!(
            "<figure><img src=\"{file}\" alt=\"{title}\"><figcaption>{title}</figcaption></figure>\n"
        );
    }
    format!(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n\
         <title>pvkit: PV against trapped</title>\n<style>body{{font-family:sans-serif;\
         max-width:1000px;margin:2em auto}}figure{{margin:1.5em 0}}img{{max-width:100%}}\
         pre{{font-size:11px;overflow-x:auto}}.headline{{font-size:1.15em;background:#eef4fa;\
         padding:.8em}}</style></head><body>\n\
         <h1>pvkit: PV against trapped</h1>\n{headline}<p>From one <code>host-vmm compare</code> run: \
         <a href=\"records.json\">records.json</a>, <a href=\"summary.md\">summary.md</a>.</p>\n\
         {figures}<h2>Table</h2>\n<pre>{}</pre>\n</body></html>\n",
        escape(table)
    )
}

type Svg = Result<Option<String>, String>;

/// A named, coloured series: bar values, or (x, y) points.
type Series<'a, T> = (&'a str, RGBColor, Vec<T>);

/// An SVG drawing area.
type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

/// Draws `f` on an SVG of [`SIZE`] and returns its text.
fn draw(f: impl FnOnce(&Area<'_>) -> Result<(), String>) -> Svg {
    draw_sized(SIZE, f)
}

/// Draws `f` on an SVG of `size` and returns its text.
fn draw_sized(size: (u32, u32), f: impl FnOnce(&Area<'_>) -> Result<(), String>) -> Svg {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| e.to_string())?;
        f(&root)?;
        root.present().map_err(|e| e.to_string())?;
    }
    Ok(Some(out))
}

/// Horizontal bars: one group per label, one bar per series, on a linear or log axis.
fn bars(
    labels: &[String],
    series: &[Series<'_, f64>],
    x_desc: &str,
    log: bool,
    mark_one: bool,
) -> Svg {
    if labels.is_empty() {
        return Ok(None);
    }
    draw(|root| bar_panel(root, labels, series, x_desc, log, mark_one))
}

/// [`bars`] on a part of a drawing.
fn bar_panel(
    root: &Area<'_>,
    labels: &[String],
    series: &[Series<'_, f64>],
    x_desc: &str,
    log: bool,
    mark_one: bool,
) -> Result<(), String> {
    let max = series
        .iter()
        .flat_map(|s| s.2.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1e-9);
    let layout = BarLayout {
        labels,
        series,
        x_desc,
        mark_one,
    };
    if log {
        // Bars start at half the smallest value (a log axis has no 0); zeros are not drawn.
        let lo = series
            .iter()
            .flat_map(|s| s.2.iter().copied())
            .filter(|&v| v > 0.0)
            .fold(f64::INFINITY, f64::min)
            .min(1.0)
            / 2.0;
        layout.draw(root, (lo..max * 2.0).log_scale(), lo)
    } else {
        layout.draw(root, 0.0..max * 1.1, 0.0)
    }
}

/// What a bar chart shows, whatever its x axis.
struct BarLayout<'a> {
    labels: &'a [String],
    series: &'a [Series<'a, f64>],
    x_desc: &'a str,
    /// Draw the line at x = 1.
    mark_one: bool,
}

impl BarLayout<'_> {
    /// Draws the bars from `base` on the x axis `x`.
    fn draw<X>(&self, root: &Area<'_>, x: X, base: f64) -> Result<(), String>
    where
        X: AsRangedCoord<Value = f64>,
        X::CoordDescType: ValueFormatter<f64>,
    {
        let e = |e: plotters::drawing::DrawingAreaErrorKind<_>| e.to_string();
        let per = self.series.len();
        let rows = self.labels.len() * (per + 1);
        let label_at = |y: &i32| -> String {
            let y = *y as usize;
            if y % (per + 1) == per / 2 {
                self.labels.get(y / (per + 1)).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        };
        let mut chart = ChartBuilder::on(root)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(170)
            .build_cartesian_2d(x, 0..rows as i32)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc(self.x_desc)
            .y_labels(rows)
            .y_label_formatter(&label_at)
            .disable_y_mesh()
            .draw()
            .map_err(e)?;
        for (k, (_, color, values)) in self.series.iter().enumerate() {
            chart
                .draw_series(values.iter().enumerate().filter(|(_, v)| **v > base).map(
                    |(i, &v)| {
                        let y = (i * (per + 1) + k) as i32;
                        Rectangle::new([(base, y), (v, y + 1)], color.filled())
                    },
                ))
                .map_err(e)?;
        }
        if self.mark_one {
            chart
                .draw_series(LineSeries::new(
                    [(1.0, 0), (1.0, rows as i32)],
                    BLACK.stroke_width(1),
                ))
                .map_err(e)?;
        }
        legend(&mut chart, self.series)
    }
}

fn legend<'a, 'b: 'a, X: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<
        'a,
        SVGBackend<'b>,
        Cartesian2d<X, plotters::coord::types::RangedCoordi32>,
    >,
    series: &[Series<'_, f64>],
) -> Result<(), String> {
    if series.len() < 2 {
        return Ok(());
    }
    for (name, color, _) in series {
        let color = *color;
        chart
            .draw_series(std::iter::empty::<Rectangle<(f64, i32)>>())
            .map_err(|e| e.to_string())?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| e.to_string())
}

/// The record's group label: workload plus `blk` pattern.
fn group(r: &Record) -> String {
    match &r.pattern {
        Some(p) => format!("{} {p}", r.workload),
        None => r.workload.clone(),
    }
}

fn speedup(records: &[Record]) -> Svg {
    let pairs: Vec<_> = ratios(records)
        .into_iter()
        .filter(|p| !matches!(p.trapped.workload.as_str(), "snapshot" | "migrate"))
        .collect();
    let labels: Vec<String> = pairs
        .iter()
        .map(|p| {
            let mode = match p.pv.batch {
                Some(b) => format!("{} b={b}", p.pv.mode),
                None => p.pv.mode.clone(),
            };
            format!("{} {mode}", group(p.trapped))
        })
        .collect();
    let values = pairs.iter().map(|p| p.ratio).collect();
    bars(
        &labels,
        &[("trapped ÷ PV", PV, values)],
        "trapped time per op ÷ PV time per op (log scale; right of the line: PV is faster)",
        true,
        true,
    )
}

/// For each workload (and pattern) with a `pv` and a `trapped` record: the two.
fn pv_trapped(records: &[Record]) -> Vec<(String, &Record, &Record)> {
    let mut out = Vec::new();
    for tr in records.iter().filter(|r| r.mode == "trapped") {
        if let Some(pv) = records
            .iter()
            .find(|r| r.workload == tr.workload && r.pattern == tr.pattern && r.mode == "pv")
        {
            out.push((group(tr), pv, tr));
        }
    }
    out
}

fn exits(records: &[Record]) -> Svg {
    let pairs: Vec<_> = pv_trapped(records)
        .into_iter()
        .filter(|(_, pv, tr)| pv.exits_per_op > 0.0 || tr.exits_per_op > 0.0)
        .collect();
    let labels: Vec<String> = pairs.iter().map(|p| p.0.clone()).collect();
    bars(
        &labels,
        &[
            ("PV", PV, pairs.iter().map(|p| p.1.exits_per_op).collect()),
            (
                "trapped",
                TRAPPED,
                pairs.iter().map(|p| p.2.exits_per_op).collect(),
            ),
        ],
        "exits per operation (log scale; none drawn for 0)",
        true,
        false,
    )
}

fn cpu(records: &[Record]) -> Svg {
    let pairs: Vec<_> = pv_trapped(records)
        .into_iter()
        .filter(|(_, pv, tr)| pv.host_cpu_ns > 0 && tr.host_cpu_ns > 0 && pv.wall_ns > 0)
        .filter(|(g, _, _)| !g.starts_with("density"))
        .collect();
    let pct = |r: &Record| 100.0 * r.host_cpu_ns as f64 / r.wall_ns.max(1) as f64;
    let labels: Vec<String> = pairs.iter().map(|p| p.0.clone()).collect();
    bars(
        &labels,
        &[
            ("PV", PV, pairs.iter().map(|p| pct(p.1)).collect()),
            ("trapped", TRAPPED, pairs.iter().map(|p| pct(p.2)).collect()),
        ],
        "vCPU thread CPU, % of the measured window",
        false,
        false,
    )
}

fn bytes(records: &[Record]) -> Svg {
    let mut labels = Vec::new();
    let (mut pv, mut tr) = (Vec::new(), Vec::new());
    for (workload, key) in [("snapshot", "bytes_written"), ("migrate", "bytes_sent")] {
        let get = |mode: &str| {
            records
                .iter()
                .find(|r| r.workload == workload && r.mode == mode)
                .and_then(|r| r.extra.get(key))
                .map(|&b| b as f64 / (1 << 20) as f64)
        };
        if let (Some(p), Some(t)) = (get("pv"), get("trapped")) {
            labels.push(format!("{workload} ({})", key.replace('_', " ")));
            pv.push(p);
            tr.push(t);
        }
    }
    bars(
        &labels,
        &[("PV", PV, pv), ("trapped", TRAPPED, tr)],
        "MiB (a guest that freed 75 % of what it allocated)",
        false,
        false,
    )
}

/// What a density chart plots against the number of VMs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Density {
    /// The vCPUs' host CPU, in cores (with the one-core line).
    Cpu,
    /// The process's resident set (median sample), MiB.
    Rss,
    /// Response latency p99 (solid) and p50 (dashed), µs.
    Response,
    /// Wake-up latency p99, µs.
    Wake,
}

impl Density {
    /// The plotted keys of a record's `extra`, with their line style (solid?) and the scale
    /// from the stored unit.
    fn keys(self) -> &'static [(&'static str, bool)] {
        match self {
            Density::Cpu => &[("window_millicores", true)],
            Density::Rss => &[("rss_median_bytes", true)],
            Density::Response => &[("response_ns_p99", true), ("response_ns_p50", false)],
            Density::Wake => &[("latency_ns_p99", true)],
        }
    }

    fn scale(self) -> f64 {
        match self {
            Density::Cpu => 1e-3,
            Density::Rss => 1.0 / (1u64 << 20) as f64,
            Density::Response | Density::Wake => 1e-3,
        }
    }

    fn y_desc(self) -> &'static str {
        match self {
            Density::Cpu => "host CPU of the vCPUs (cores)",
            Density::Rss => "host resident memory (MiB, median sample)",
            Density::Response => "response latency, deadline to request done (µs, log)",
            Density::Wake => "wake-up latency p99 (µs, log)",
        }
    }
}

/// One plotted line: its name, colour, solid or dashed, and points.
type Line = (String, RGBColor, bool, Vec<(f64, f64)>);

fn density(records: &[Record], what: Density) -> Svg {
    let rows: Vec<&Record> = records.iter().filter(|r| r.workload == "density").collect();
    let mut lines: Vec<Line> = Vec::new();
    for (mode, color) in [("pv", PV), ("hlt", TRAPPED), ("spin", SPIN)] {
        for &(key, solid) in what.keys() {
            let pts: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.mode.starts_with(&format!("{mode} ")))
                .filter_map(|r| {
                    let n = *r.extra.get("vms")? as f64;
                    Some((n, *r.extra.get(key)? as f64 * what.scale()))
                })
                .collect();
            if pts.is_empty() {
                continue;
            }
            let name = match what {
                Density::Response => format!("{mode} {}", &key[key.len() - 3..]),
                _ => mode.to_string(),
            };
            lines.push((name, color, solid, pts));
        }
    }
    if lines.is_empty() {
        return Ok(None);
    }
    let max_n = lines
        .iter()
        .flat_map(|l| l.3.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let ys = || lines.iter().flat_map(|l| l.3.iter().map(|p| p.1));
    // The CPU chart always shows the one-core line.
    let floor = if what == Density::Cpu { 1.0 } else { 1e-3 };
    let max_y = ys().fold(floor, f64::max);
    let x = (0.8..max_n * 1.25).log_scale();
    draw(|root| match what {
        Density::Cpu | Density::Rss => {
            density_lines(root, x, 0.0..max_y * 1.1, what, &lines, max_n)
        }
        Density::Response | Density::Wake => {
            let lo = ys().filter(|&y| y > 0.0).fold(max_y, f64::min) / 2.0;
            density_lines(root, x, (lo..max_y * 2.0).log_scale(), what, &lines, max_n)
        }
    })
}

/// Draws density `lines` on the axes `x` (VMs) and `y`.
fn density_lines<X, Y>(
    root: &Area<'_>,
    x: X,
    y: Y,
    what: Density,
    lines: &[Line],
    max_n: f64,
) -> Result<(), String>
where
    X: AsRangedCoord<Value = f64>,
    X::CoordDescType: ValueFormatter<f64>,
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let e = |e: plotters::drawing::DrawingAreaErrorKind<_>| e.to_string();
    let mut chart = ChartBuilder::on(root)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(60)
        .build_cartesian_2d(x, y)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("VMs (log scale)")
        .y_desc(what.y_desc())
        .draw()
        .map_err(e)?;
    if what == Density::Cpu {
        chart
            .draw_series(LineSeries::new(
                [(0.8, 1.0), (max_n * 1.25, 1.0)],
                BLACK.stroke_width(1),
            ))
            .map_err(e)?
            .label("one core")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 14, y)], BLACK.stroke_width(1)));
    }
    for (name, color, solid, pts) in lines {
        let color = *color;
        let width = if *solid { 2 } else { 1 };
        let drawn = if *solid {
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(e)?
        } else {
            chart
                .draw_series(DashedLineSeries::new(
                    pts.iter().copied(),
                    6,
                    4,
                    color.stroke_width(1),
                ))
                .map_err(e)?
        };
        drawn.label(name.as_str()).legend(move |(x, y)| {
            PathElement::new([(x, y), (x + 14, y)], color.stroke_width(width))
        });
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(e)?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(e)?;
    Ok(())
}

/// Whether a run is on the PV side of its workload's comparison.
fn is_pv(r: &Record) -> bool {
    r.mode == "pv" || r.mode.starts_with("pv-") || r.mode.starts_with("pv ")
}

/// The side of a run in its workload's chart: PV, trapped (every other pvkit mode), or a
/// baseline without pvkit (mode `native`, drawn grey).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Pv,
    Trapped,
    Native,
}

fn side(r: &Record) -> Side {
    if is_pv(r) {
        Side::Pv
    } else if r.mode == "native" {
        Side::Native
    } else {
        Side::Trapped
    }
}

/// The workloads to chart one by one, each with its runs: those with a PV and a trapped-side
/// run (any other mode but the host's own and the QEMU peers), not `density` (its own
/// curves) nor the exit-loop floors.
fn per_workload(records: &[Record]) -> Vec<(String, Vec<&Record>)> {
    let mut out: Vec<(String, Vec<&Record>)> = Vec::new();
    for r in records {
        if matches!(
            r.workload.as_str(),
            "density" | super::floor::FLOOR_WORKLOAD
        ) || r.mode == "host"
            || r.mode.starts_with(super::peer::PEER_MODE)
        {
            continue;
        }
        match out.iter_mut().find(|(w, _)| *w == r.workload) {
            Some((_, runs)) => runs.push(r),
            None => out.push((r.workload.clone(), vec![r])),
        }
    }
    out.retain(|(_, runs)| {
        runs.iter().any(|r| side(r) == Side::Pv) && runs.iter().any(|r| side(r) == Side::Trapped)
    });
    out
}

/// A run's bar label: its mode with the batch size or the `blk` pattern.
fn run_label(r: &Record) -> String {
    match (r.batch, &r.pattern) {
        (Some(b), _) => format!("{} b={b}", r.mode),
        (None, Some(p)) => format!("{} {p}", r.mode),
        (None, None) => r.mode.clone(),
    }
}

/// The panels of one workload's chart: time per operation, exits per operation, vCPU CPU and
/// guest RAM backed at the end, each if some run has it.
fn workload_chart(runs: &[&Record]) -> Svg {
    type Metric = (&'static str, bool, fn(&Record) -> f64);
    let metrics: [Metric; 4] = [
        ("time per operation, µs (log scale)", true, |r| {
            r.ns_per_op / 1000.0
        }),
        (
            "exits per operation (log scale; none drawn for 0)",
            true,
            |r| r.exits_per_op,
        ),
        ("vCPU thread CPU, % of the measured window", false, |r| {
            100.0 * r.host_cpu_ns as f64 / r.wall_ns.max(1) as f64
        }),
        (
            "guest RAM backed by host memory at the end, MiB",
            false,
            |r| r.resident_bytes.last().copied().unwrap_or(0) as f64 / (1u64 << 20) as f64,
        ),
    ];
    let panels: Vec<&Metric> = metrics
        .iter()
        .filter(|(_, _, f)| runs.iter().any(|r| f(r) > 0.0))
        .collect();
    if panels.is_empty() {
        return Ok(None);
    }
    let labels: Vec<String> = runs.iter().map(|r| run_label(r)).collect();
    // One panel under the other, each the full width (the labels need room).
    let rows = panels.len();
    let height = (100 + 36 * labels.len() as u32).clamp(200, 600);
    draw_sized((SIZE.0, height * rows as u32), |root| {
        let areas = root.split_evenly((rows, 1));
        for (area, (desc, log, f)) in areas.iter().zip(panels) {
            let side = |s: Side| -> Vec<f64> {
                runs.iter()
                    .map(|r| if side(r) == s { f(r) } else { 0.0 })
                    .collect()
            };
            let series: Vec<Series<'_, f64>> = [
                ("PV", PV, side(Side::Pv)),
                ("trapped", TRAPPED, side(Side::Trapped)),
                ("native", SPIN, side(Side::Native)),
            ]
            .into_iter()
            .filter(|(name, _, v)| *name != "native" || v.iter().any(|&x| x > 0.0))
            .collect();
            bar_panel(area, &labels, &series, desc, *log, false)?;
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::density::tests::fleet;
    use crate::compare::record::tests::rec;

    /// Records of every kind the charts draw, with made-up numbers.
    fn records() -> Vec<Record> {
        let mut out = Vec::new();
        for (w, m) in [
            ("null", "pv"),
            ("null", "trapped"),
            ("idle", "spin"),
            ("idle", "hlt"),
            ("idle", "pv"),
            ("zero", "pv"),
            ("zero", "trapped"),
            ("pagetable", "pv"),
            ("pagetable", "trapped"),
            ("pagetable", "native"),
        ] {
            let mut r = rec(w, m, 1000, 2_000_000, 9);
            r.exits_per_op = if m == "pv" { 0.5 } else { 1.0 };
            r.host_cpu_ns = 1_000_000;
            r.resident_bytes = vec![6 << 20, if m == "pv" { 6 << 20 } else { 262 << 20 }];
            out.push(r);
        }
        for (m, bytes) in [("pv", 28u64 << 20), ("trapped", 110 << 20)] {
            let mut r = rec("snapshot", m, 1, 100_000_000, 5);
            r.extra.insert("bytes_written".into(), bytes);
            out.push(r);
        }
        for (strategy, n, mc, mib) in [
            ("pv", 1, 24, 18),
            ("hlt", 1, 102, 82),
            ("spin", 1, 1000, 82),
            ("pv", 16, 248, 83),
            ("hlt", 16, 1284, 901),
        ] {
            out.push(fleet(strategy, n, mc, mib));
        }
        out
    }

    #[test]
    fn the_report_writes_every_chart() {
        let dir = std::env::temp_dir().join(format!("pvkit-site-test-{}", std::process::id()));
        let files = write_report(&dir, &records()).unwrap();
        for f in [
            "records.json",
            "summary.md",
            "speedup.svg",
            "exits.svg",
            "cpu.svg",
            "bytes.svg",
            "density-cpu.svg",
            "density-rss.svg",
            "density-response.svg",
            "density-latency.svg",
            "workload-null.svg",
            "workload-idle.svg",
            "workload-zero.svg",
            "workload-pagetable.svg",
            "workload-snapshot.svg",
            "index.html",
        ] {
            assert!(files.iter().any(|x| x == f), "{f} not in {files:?}");
            let text = std::fs::read_to_string(dir.join(f)).unwrap();
            assert!(!text.is_empty(), "{f} is empty");
            if f.ends_with(".svg") {
                assert!(text.contains("<svg"), "{f}");
                let html = std::fs::read_to_string(dir.join("index.html")).unwrap();
                assert!(html.contains(&format!("src=\"{f}\"")), "{f} not shown");
            }
        }
        // The headline comes first and says what the JSON says.
        let html = std::fs::read_to_string(dir.join("index.html")).unwrap();
        let headline = crate::compare::density::headline(&records()).unwrap();
        let at = html
            .find(&escape(&headline))
            .expect("headline in index.html");
        assert!(at < html.find("<figure>").unwrap());
        assert!(
            headline.contains("0.248 cores, 0.19 of trapped's 1.284"),
            "{headline}"
        );
        // Density is drawn as curves, not as a workload chart.
        assert!(!files.iter().any(|f| f == "workload-density.svg"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn charts_without_data_are_left_out() {
        let dir = std::env::temp_dir().join(format!("pvkit-site-empty-{}", std::process::id()));
        let files = write_report(&dir, &[]).unwrap();
        assert_eq!(files, ["records.json", "summary.md", "index.html"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
