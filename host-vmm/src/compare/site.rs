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
//! - `density-cpu.svg` and `density-latency.svg`: host CPU (cores) and wake-up latency p99
//!   against the number of VMs, one line per way of idling.
//!
//! A chart without data in this run (its workloads did not run) is left out.

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
            "Host CPU of N idle VMs",
            density(records, false),
        ),
        (
            "density-latency.svg",
            "Wake-up latency p99 of N idle VMs",
            density(records, true),
        ),
    ] {
        if let Some(svg) = svg.map_err(chart_error(name))? {
            write(name, svg)?;
            charts.push((name, title));
        }
    }
    write("index.html", index_html(&table, &charts))?;
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

fn index_html(table: &str, charts: &[(&str, &str)]) -> String {
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
         pre{{font-size:11px;overflow-x:auto}}</style></head><body>\n\
         <h1>pvkit: PV against trapped</h1>\n<p>From one <code>host-vmm compare</code> run: \
         <a href=\"records.json\">records.json</a>, <a href=\"summary.md\">summary.md</a>.</p>\n\
         {figures}<h2>Table</h2>\n<pre>{}</pre>\n</body></html>\n",
        escape(table)
    )
}

type Svg = Result<Option<String>, String>;

/// A named, coloured series: bar values, or (x, y) points.
type Series<'a, T> = (&'a str, RGBColor, Vec<T>);

/// Draws `f` on an SVG of [`SIZE`] and returns its text.
fn draw(
    f: impl FnOnce(&DrawingArea<SVGBackend<'_>, plotters::coord::Shift>) -> Result<(), String>,
) -> Svg {
    let mut out = String::new();
    {
        let root = SVGBackend::with_string(&mut out, SIZE).into_drawing_area();
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
    draw(|root| {
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
    })
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
    fn draw<X>(
        &self,
        root: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
        x: X,
        base: f64,
    ) -> Result<(), String>
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

fn density(records: &[Record], latency: bool) -> Svg {
    let rows: Vec<&Record> = records.iter().filter(|r| r.workload == "density").collect();
    if rows.is_empty() {
        return Ok(None);
    }
    let point = |r: &Record| {
        let n = r.extra.get("vms").copied().unwrap_or(0) as f64;
        let y = if latency {
            r.extra.get("latency_ns_p99").copied().unwrap_or(0) as f64 / 1000.0
        } else {
            r.extra.get("window_millicores").copied().unwrap_or(0) as f64 / 1000.0
        };
        (n, y)
    };
    let lines: Vec<Series<'_, (f64, f64)>> = [("pv", PV), ("hlt", TRAPPED), ("spin", SPIN)]
        .into_iter()
        .map(|(mode, color)| {
            let pts: Vec<(f64, f64)> = rows
                .iter()
                .filter(|r| r.mode.starts_with(&format!("{mode} ")))
                .map(|r| point(r))
                .collect();
            (mode, color, pts)
        })
        .filter(|(_, _, pts)| !pts.is_empty())
        .collect();
    let max_n = lines
        .iter()
        .flat_map(|l| l.2.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    // The CPU chart always shows the one-core line.
    let floor = if latency { 1e-3 } else { 1.0 };
    let max_y = lines
        .iter()
        .flat_map(|l| l.2.iter().map(|p| p.1))
        .fold(floor, f64::max);
    draw(|root| {
        let e = |e: plotters::drawing::DrawingAreaErrorKind<_>| e.to_string();
        let mut chart = ChartBuilder::on(root)
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(60)
            .build_cartesian_2d(0.0..max_n * 1.05, 0.0..max_y * 1.1)
            .map_err(e)?;
        chart
            .configure_mesh()
            .x_desc("VMs")
            .y_desc(if latency {
                "wake-up latency p99 (µs)"
            } else {
                "host CPU of the vCPUs (cores)"
            })
            .draw()
            .map_err(e)?;
        if !latency {
            chart
                .draw_series(LineSeries::new(
                    [(0.0, 1.0), (max_n * 1.05, 1.0)],
                    BLACK.stroke_width(1),
                ))
                .map_err(e)?
                .label("one core")
                .legend(|(x, y)| PathElement::new([(x, y), (x + 14, y)], BLACK.stroke_width(1)));
        }
        for (mode, color, pts) in &lines {
            let color = *color;
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(e)?
                .label(*mode)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 14, y)], color.stroke_width(2))
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
    })
}
