//! PNG plots of a search: the best value against trials, and the surrogate's picture of
//! the landscape (mean and ±2σ band over lambda in 1-D, a heatmap of the mean in 2-D).
//! The font is embedded (DejaVu Sans Mono, see `assets/`), so plots draw the same on a
//! cluster node without fonts installed.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::bo::gp::Surrogate;
use crate::bo::SearchSpace;

static FONT: &[u8] = include_bytes!("../../assets/DejaVuSansMono.ttf");
static REGISTER: Once = Once::new();

fn font() {
    REGISTER.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

fn e<E: std::fmt::Display>(err: E) -> anyhow::Error {
    anyhow!("{err}")
}

/// The optimiser's surrogate and what it was fitted on (cube points, values).
pub struct SurrogateView<'a> {
    pub gp: &'a Surrogate,
    pub space: &'a SearchSpace,
    pub observed: Vec<(Vec<f64>, f64)>,
}

/// Draws every plot that applies: the best of `perplexities` (the completed trials' in
/// trial order) so far against the horizontal `references` (label, perplexity), and the
/// surrogate over lambda (1-D) or a heatmap of its mean (3-way simplex). Returns (title,
/// file name) pairs for the report.
pub fn draw_all(
    run_dir: &Path,
    perplexities: &[f64],
    references: &[(String, f64)],
    surrogate: Option<&SurrogateView>,
) -> Result<Vec<(String, String)>> {
    font();
    let mut out = Vec::new();
    if perplexities.is_empty() {
        return Ok(out);
    }
    best_so_far(&run_dir.join("best_so_far.png"), perplexities, references)?;
    out.push(("best perplexity so far".into(), "best_so_far.png".into()));
    if let Some(view) = surrogate {
        let ok = &view.observed;
        match view.space {
            SearchSpace::Lambda { lo, hi } => {
                surrogate_1d(&run_dir.join("surrogate.png"), view.gp, *lo, *hi, ok)?;
                out.push(("surrogate over lambda".into(), "surrogate.png".into()));
            }
            SearchSpace::Simplex { lower } if lower.len() == 3 => {
                heatmap(&run_dir.join("surrogate.png"), view.gp, view.space, ok)?;
                out.push((
                    "surrogate mean over the weights".into(),
                    "surrogate.png".into(),
                ));
            }
            _ => {}
        }
    }
    Ok(out)
}

fn best_so_far(path: &Path, perplexities: &[f64], refs: &[(String, f64)]) -> Result<()> {
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let mut best = f64::INFINITY;
    let curve: Vec<(f64, f64)> = perplexities
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            best = best.min(p);
            ((i + 1) as f64, best)
        })
        .collect();
    let all: Vec<f64> = perplexities
        .iter()
        .copied()
        .chain(refs.iter().map(|r| r.1))
        .collect();
    let (lo, hi) = all
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let pad = ((hi - lo) * 0.08).max(1e-6);
    let mut chart = ChartBuilder::on(&root)
        .caption("held-out perplexity (objective)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(
            0.5f64..(perplexities.len() as f64 + 0.5),
            (lo - pad)..(hi + pad),
        )
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("evaluations")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_desc("perplexity")
        .draw()
        .map_err(e)?;
    let colors = [
        RGBColor(120, 120, 120),
        RGBColor(200, 120, 40),
        RGBColor(40, 150, 80),
    ];
    for (k, (label, v)) in refs.iter().enumerate() {
        let c = colors[k % colors.len()];
        chart
            .draw_series(LineSeries::new(
                [(0.5, *v), (perplexities.len() as f64 + 0.5, *v)],
                c.stroke_width(1),
            ))
            .map_err(e)?
            .label(label.clone())
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], c));
    }
    chart
        .draw_series(
            perplexities
                .iter()
                .enumerate()
                .map(|(i, &p)| Circle::new(((i + 1) as f64, p), 3, RED.filled())),
        )
        .map_err(e)?
        .label("trial")
        .legend(|(x, y)| Circle::new((x + 8, y), 3, RED.filled()));
    chart
        .draw_series(LineSeries::new(curve, BLUE.stroke_width(2)))
        .map_err(e)?
        .label("best so far")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLUE.stroke_width(2)));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

fn surrogate_1d(
    path: &Path,
    gp: &Surrogate,
    lo: f64,
    hi: f64,
    ok: &[(Vec<f64>, f64)],
) -> Result<()> {
    let grid: Vec<Vec<f64>> = (0..=200).map(|i| vec![i as f64 / 200.0]).collect();
    let (m, sd) = gp.predict_objective(&grid);
    let lam = |u: f64| lo + (hi - lo) * u;
    let ymin = m
        .iter()
        .zip(&sd)
        .map(|(m, s)| m - 2.0 * s)
        .chain(ok.iter().map(|o| o.1))
        .fold(f64::INFINITY, f64::min);
    let ymax = m
        .iter()
        .zip(&sd)
        .map(|(m, s)| m + 2.0 * s)
        .chain(ok.iter().map(|o| o.1))
        .fold(f64::NEG_INFINITY, f64::max);
    let pad = ((ymax - ymin) * 0.05).max(1e-9);
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "surrogate over lambda (mean, ±2σ) and observations",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(lo..hi, (ymin - pad)..(ymax + pad))
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("lambda (weight of the later checkpoint)")
        .y_desc("mean held-out NLL")
        .draw()
        .map_err(e)?;
    let mut band: Vec<(f64, f64)> = grid
        .iter()
        .zip(m.iter().zip(&sd))
        .map(|(u, (m, s))| (lam(u[0]), m + 2.0 * s))
        .collect();
    band.extend(
        grid.iter()
            .zip(m.iter().zip(&sd))
            .rev()
            .map(|(u, (m, s))| (lam(u[0]), m - 2.0 * s)),
    );
    chart
        .draw_series(std::iter::once(Polygon::new(band, BLUE.mix(0.15))))
        .map_err(e)?;
    chart
        .draw_series(LineSeries::new(
            grid.iter().zip(&m).map(|(u, m)| (lam(u[0]), *m)),
            BLUE.stroke_width(2),
        ))
        .map_err(e)?;
    chart
        .draw_series(
            ok.iter()
                .map(|o| Circle::new((lam(o.0[0]), o.1), 4, RED.filled())),
        )
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}

/// Simple blue→yellow ramp (low = dark blue = good).
fn ramp(t: f64) -> RGBColor {
    let t = t.clamp(0.0, 1.0);
    let lerp = |a: f64, b: f64| (a + (b - a) * t) as u8;
    RGBColor(lerp(30.0, 250.0), lerp(40.0, 220.0), lerp(120.0, 40.0))
}

fn heatmap(path: &Path, gp: &Surrogate, space: &SearchSpace, ok: &[(Vec<f64>, f64)]) -> Result<()> {
    // Axes: weights of the second and third checkpoint; the first gets the rest.
    let n = 60;
    let mut cells = Vec::new();
    let mut pts = Vec::new();
    for i in 0..n {
        for j in 0..n - i {
            let (x, y) = ((i as f64 + 0.5) / n as f64, (j as f64 + 0.5) / n as f64);
            if x + y <= 1.0 {
                let w = [1.0 - x - y, x, y];
                let u = space.cube(&w);
                if u.iter().all(|c| c.is_finite()) {
                    // Inside the space (lower bounds respected)?
                    let back = space.weights(&u);
                    if back.iter().zip(&w).all(|(a, b)| (a - b).abs() < 1e-6) {
                        cells.push((x, y));
                        pts.push(u);
                    }
                }
            }
        }
    }
    let (m, _) = gp.predict_objective(&pts);
    let (lo, hi) = m
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let root = BitMapBackend::new(path, (640, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!("surrogate mean NLL ({lo:.4} dark .. {hi:.4} light)"),
            ("sans-serif", 18),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..1f64, 0f64..1f64)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("weight of checkpoint 2")
        .y_desc("weight of checkpoint 3")
        .draw()
        .map_err(e)?;
    let h = 0.5 / n as f64;
    chart
        .draw_series(cells.iter().zip(&m).map(|(&(x, y), v)| {
            Rectangle::new(
                [(x - h, y - h), (x + h, y + h)],
                ramp((v - lo) / (hi - lo).max(1e-12)).filled(),
            )
        }))
        .map_err(e)?;
    chart
        .draw_series(ok.iter().map(|o| {
            let w = space.weights(&o.0);
            Circle::new((w[1], w[2]), 4, RED.filled())
        }))
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}
