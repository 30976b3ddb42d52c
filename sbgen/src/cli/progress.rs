//! Progress of the long commands (`tune`, `check`) on stderr, behind one interface:
//!
//! - [`Bar`]: when stderr is a terminal, an `indicatif` bar at the bottom, with the count, the time
//!   spent and an estimate of the time left; log lines and the command's stdout are printed above
//!   it (the bar is cleared while they are written), and it is removed at the end;
//! - [`Lines`]: otherwise (a CI log, a pipe, a file), one plain line per tenth of the work,
//!   `progress: 48/480 variants compiled (10%), 12.3 s`, and the last count once more at the end if
//!   it was not printed yet.
//!
//! stdout is left as it was: the progress is on stderr only.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The progress of a known number of items. `Sync`: workers count what they finish.
pub trait Progress: Send + Sync {
    /// `n` more items are done.
    fn inc(&self, n: u64);
    /// `done` items are done in all (a position behind the current one is ignored).
    fn set_position(&self, done: u64);
    /// A line for stderr, printed so that it does not tear the bar.
    fn println(&self, line: &str);
    /// Runs `f` (writing to stdout) with the bar out of the way.
    fn suspend(&self, f: &mut dyn FnMut());
    /// The work is over: the bar goes away; the lines say where the count ended.
    fn finish(&self);
}

/// The progress of `total` items named `unit` ("variants compiled"): a bar when stderr is a
/// terminal, lines otherwise.
pub fn start(total: u64, unit: &'static str) -> Box<dyn Progress> {
    if std::io::stderr().is_terminal() {
        Box::new(Bar::new(total, unit))
    } else {
        Box::new(Lines::new(total, unit, Box::new(std::io::stderr())))
    }
}

/// Writes `line` to `out` (stdout) with the bar out of the way, and flushes it.
pub fn write_line(progress: &dyn Progress, out: &mut dyn Write, line: &str) -> std::io::Result<()> {
    let mut result = Ok(());
    progress.suspend(&mut || result = writeln!(out, "{line}").and_then(|_| out.flush()));
    result
}

/// A terminal's progress bar.
pub struct Bar(ProgressBar);

impl Bar {
    pub fn new(total: u64, unit: &'static str) -> Self {
        let style = ProgressStyle::with_template(
            "{elapsed:>4} [{bar:40.cyan/blue}] {pos}/{len} {prefix} ({percent}%, {eta} left)",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr()).with_style(style);
        bar.set_prefix(unit);
        // The elapsed time moves while one long item (a compilation, a GPU check) runs.
        bar.enable_steady_tick(Duration::from_millis(250));
        Bar(bar)
    }
}

impl Progress for Bar {
    fn inc(&self, n: u64) {
        self.0.inc(n);
    }

    fn set_position(&self, done: u64) {
        if done > self.0.position() {
            self.0.set_position(done);
        }
    }

    fn println(&self, line: &str) {
        self.0.suspend(|| eprintln!("{line}"));
    }

    fn suspend(&self, f: &mut dyn FnMut()) {
        self.0.suspend(f);
    }

    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl Drop for Bar {
    /// An error ends the command early: its message must not be printed into the bar.
    fn drop(&mut self) {
        if !self.0.is_finished() {
            self.0.finish_and_clear();
        }
    }
}

/// Plain progress lines, for stderr that is not a terminal.
pub struct Lines {
    total: u64,
    unit: &'static str,
    start: Instant,
    state: Mutex<LinesState>,
}

struct LinesState {
    done: u64,
    /// The count of the last line printed.
    shown: Option<u64>,
    out: Box<dyn Write + Send>,
}

impl Lines {
    pub fn new(total: u64, unit: &'static str, out: Box<dyn Write + Send>) -> Self {
        Lines { total, unit, start: Instant::now(), state: Mutex::new(LinesState { done: 0, shown: None, out }) }
    }

    /// `progress: 12/48 variants compiled (25%), 3.1 s`.
    fn line(&self, done: u64) -> String {
        let percent = (done.min(self.total) * 100).checked_div(self.total).unwrap_or(100);
        format!(
            "progress: {done}/{} {} ({percent}%), {:.1} s",
            self.total,
            self.unit,
            self.start.elapsed().as_secs_f64()
        )
    }

    /// Moves the count to `to(count)`; prints a line when it enters a new tenth of the total.
    fn advance(&self, to: impl FnOnce(u64) -> u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let done = to(s.done);
        if done <= s.done {
            return;
        }
        let tenth = |n: u64| (n.min(self.total) * 10).checked_div(self.total).unwrap_or(10);
        let crossed = tenth(done) > tenth(s.done);
        s.done = done;
        if crossed {
            let line = self.line(done);
            // A closed stderr must not end the run.
            let _ = writeln!(s.out, "{line}");
            s.shown = Some(done);
        }
    }
}

impl Progress for Lines {
    fn inc(&self, n: u64) {
        self.advance(|done| done.saturating_add(n));
    }

    fn set_position(&self, done: u64) {
        self.advance(|_| done);
    }

    fn println(&self, line: &str) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let _ = writeln!(s.out, "{line}");
    }

    fn suspend(&self, f: &mut dyn FnMut()) {
        f();
    }

    fn finish(&self) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if s.shown != Some(s.done) && s.done > 0 {
            let line = self.line(s.done);
            let _ = writeln!(s.out, "{line}");
            s.shown = Some(s.done);
        }
        let _ = s.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A writer whose bytes the test reads back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Shared {
        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap().lines().map(str::to_string).collect()
        }
    }

    /// The counts and percentages of the lines, without their times.
    fn counts(lines: &[String]) -> Vec<String> {
        lines.iter().map(|l| l.rsplit_once(", ").map_or(l.as_str(), |(head, _)| head).to_string()).collect()
    }

    #[test]
    fn lines_print_once_per_tenth_and_the_end() {
        let out = Shared::default();
        let p = Lines::new(25, "variants compiled", Box::new(out.clone()));
        for _ in 0..25 {
            p.inc(1);
        }
        p.finish();
        let lines = out.lines();
        assert_eq!(lines.len(), 10, "{lines:?}");
        assert_eq!(counts(&lines)[0], "progress: 3/25 variants compiled (12%)");
        assert_eq!(counts(&lines)[9], "progress: 25/25 variants compiled (100%)");
        assert!(lines[9].ends_with(" s"), "{}", lines[9]);
    }

    #[test]
    fn lines_show_where_an_unfinished_run_stopped_and_pass_log_lines_through() {
        let out = Shared::default();
        let p = Lines::new(1000, "kernel runs", Box::new(out.clone()));
        p.set_position(150);
        p.println("[ 1/20] fwd ok");
        p.set_position(120); // behind: ignored
        p.inc(7);
        p.finish();
        p.finish();
        let lines = out.lines();
        assert_eq!(
            counts(&lines),
            ["progress: 150/1000 kernel runs (15%)", "[ 1/20] fwd ok", "progress: 157/1000 kernel runs (15%)"]
        );
    }

    #[test]
    fn nothing_to_do_prints_nothing_and_suspend_runs_its_closure() {
        let out = Shared::default();
        let p = Lines::new(0, "variants", Box::new(out.clone()));
        p.finish();
        assert!(out.lines().is_empty());
        let mut stdout = Vec::new();
        write_line(&p, &mut stdout, "ok variant").unwrap();
        assert_eq!(stdout, b"ok variant\n");
    }
}
