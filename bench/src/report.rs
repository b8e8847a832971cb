//! The results table: each figure beside its baseline, the ratio, and the target verdict.

use std::fmt::Write;

pub(crate) enum Target {
    /// ratio = figure / baseline must be at least this.
    RatioAtLeast(f64),
    /// ratio must be at most this.
    RatioAtMost(f64),
    /// the figure itself must be at most this.
    AtMost(f64),
    /// the figure itself must be at least this.
    AtLeast(f64),
}

pub(crate) struct Row {
    pub(crate) section: &'static str,
    pub(crate) name: String,
    pub(crate) value: f64,
    pub(crate) unit: &'static str,
    pub(crate) baseline: Option<(String, f64)>,
    pub(crate) target: Option<Target>,
}

impl Row {
    pub(crate) fn ratio(&self) -> Option<f64> {
        self.baseline
            .as_ref()
            .map(|(_, b)| if *b == 0.0 { 0.0 } else { self.value / b })
    }

    pub(crate) fn met(&self) -> Option<bool> {
        let t = self.target.as_ref()?;
        Some(match (t, self.ratio()) {
            (Target::RatioAtLeast(x), Some(r)) => r >= *x,
            (Target::RatioAtMost(x), Some(r)) => r <= *x,
            (Target::AtMost(x), _) => self.value <= *x,
            (Target::AtLeast(x), _) => self.value >= *x,
            _ => false,
        })
    }
}

fn num(v: f64) -> String {
    if v >= 1000.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

pub(crate) fn render(rows: &[Row]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "| section | figure | value | baseline | ratio | target | met |"
    );
    let _ = writeln!(out, "|---|---|---:|---|---:|---|---|");
    for r in rows {
        let baseline = r.baseline.as_ref().map_or_else(
            || "-".to_owned(),
            |(n, b)| format!("{n}: {} {}", num(*b), r.unit),
        );
        let ratio = r
            .ratio()
            .map_or_else(|| "-".to_owned(), |x| format!("{x:.2}×"));
        let target = match &r.target {
            None => "-".to_owned(),
            Some(Target::RatioAtLeast(x)) => format!("≥ {x:.2}×"),
            Some(Target::RatioAtMost(x)) => format!("≤ {x:.2}×"),
            Some(Target::AtMost(x)) => format!("≤ {} {}", num(*x), r.unit),
            Some(Target::AtLeast(x)) => format!("≥ {} {}", num(*x), r.unit),
        };
        let met = match r.met() {
            None => "",
            Some(true) => "met",
            Some(false) => "NOT met",
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} {} | {baseline} | {ratio} | {target} | {met} |",
            r.section,
            r.name,
            num(r.value),
            r.unit
        );
    }
    out
}
