//! Progress of the long commands: on a terminal, an `indicatif` bar with rate and ETA, with each
//! step's report printed above it; elsewhere (logs, CI, pipes) one plain line per step.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// A counted loop's progress.
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    total: u64,
}

impl Progress {
    /// Progress over `total` units named `label` (e.g. "step"), starting at `position`.
    pub(crate) fn new(label: &str, position: u64, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total).with_position(position);
            let template = format!("{{bar:30.cyan/blue}} {label} {{pos}}/{{len}} {{per_sec}} ETA {{eta}} {{msg}}");
            if let Ok(style) = ProgressStyle::with_template(&template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar
        });
        Self { bar, label: label.to_string(), total }
    }

    /// Marks `position` reached, with `report` (a full line of what it did).
    pub(crate) fn reached(&self, position: u64, report: &str) {
        let line = format!("{} {position}/{}: {report}", self.label, self.total);
        match &self.bar {
            Some(bar) => {
                bar.println(line);
                bar.set_position(position);
            }
            None => eprintln!("{line}"),
        }
    }

    /// Removes the bar (the reports stay).
    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
