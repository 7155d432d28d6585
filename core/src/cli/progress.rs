//! Progress of the long commands: on a terminal, an `indicatif` bar with rate and ETA, with each
//! step's report printed above it; elsewhere (logs, CI, pipes) one plain line per step.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// A counted loop's progress.
pub(crate) struct Progress {
    bar: Option<ProgressBar>,
    label: String,
    total: u64,
    /// Without a terminal: the last tenth of the way reported by [`Progress::update`].
    tenths_reported: std::cell::Cell<u64>,
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
        Self { bar, label: label.to_string(), total, tenths_reported: std::cell::Cell::new(position * 10 / total.max(1)) }
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

    /// Moves to `position` without a report of its own (a loop with many small units, such as
    /// bytes read): the bar moves; without a terminal a line is printed at each tenth of the way.
    pub(crate) fn update(&self, position: u64) {
        match &self.bar {
            Some(bar) => bar.set_position(position),
            None => {
                let tenths = position.min(self.total) * 10 / self.total.max(1);
                if tenths > self.tenths_reported.get() {
                    self.tenths_reported.set(tenths);
                    eprintln!("{} {position}/{} ({}%)", self.label, self.total, tenths * 10);
                }
            }
        }
    }

    /// Runs `print` (which writes to stdout) with the bar cleared, so the two do not mix.
    pub(crate) fn suspend<R>(&self, print: impl FnOnce() -> R) -> R {
        match &self.bar {
            Some(bar) => bar.suspend(print),
            None => print(),
        }
    }

    /// Removes the bar (the reports stay).
    pub(crate) fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
