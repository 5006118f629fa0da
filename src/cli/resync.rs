//! `hamirror resync`: follows a module's resync on this node until its data is in sync, with
//! a progress bar on a terminal, plain lines otherwise, or the replication's JSON.

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::Value;

use super::status::resync_progress;
use super::units::{bytes, duration_ms, rate};
use super::{bad_answer, module_path, Ctx, Failure};
use crate::daemon::control::ModuleView;
use crate::module::{State, WaitReason};
use crate::replication::status::{DataRole, ReplicationView, ResyncSummary, ResyncView};

/// How often the module is read.
const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// Least time between two progress lines when stderr is not a terminal.
const PLAIN_INTERVAL: Duration = Duration::from_secs(2);
/// The rates are computed over the samples of this much of the resync's time.
const RATE_WINDOW_MS: u64 = 10_000;

pub(super) fn resync(ctx: &Ctx, module: &str, full: bool, json: bool) -> Result<i32, Failure> {
    let started = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    if full {
        ctx.call("POST", &format!("{}/second", module_path(module)), Some(&serde_json::json!({ "full": true })))?;
        // The module publishes its new state just after it answers: read it after that.
        std::thread::sleep(POLL_INTERVAL);
    }
    let display = if json {
        Display::Json(None)
    } else if std::io::stderr().is_terminal() {
        Display::Bar(Bar::new(module))
    } else {
        Display::Plain { printed: None, waiting: None }
    };
    let mut follow =
        Follow { module, full, started, display, worked: false, last: None, warned: None, rates: Rates::default() };
    loop {
        let response = ctx.call("GET", &module_path(module), None)?;
        let raw: Value = response.json().map_err(|e| bad_answer(&e))?;
        let view: ModuleView = serde_json::from_value(raw.clone()).map_err(|e| bad_answer(&e))?;
        if let Some(line) = follow.observe(&view, &raw["replication"])? {
            follow.display.clear();
            if !json {
                println!("{line}");
            }
            return Ok(0);
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// What `resync` knows of the resync it follows.
struct Follow<'a> {
    module: &'a str,
    /// `--full`: the end needs evidence that the requested resync ran (`worked`).
    full: bool,
    /// When the command started, in seconds since the Unix epoch.
    started: u64,
    display: Display,
    /// Something was seen to do since the command started: a resync, out-of-date data, a
    /// resync that ended, or the module on its way to the role.
    worked: bool,
    /// The last running resync seen.
    last: Option<ResyncView>,
    /// The failed resync already warned about.
    warned: Option<ResyncSummary>,
    rates: Rates,
}

impl Follow<'_> {
    /// Takes one reading of the module: `Some(line)` when its data is in sync.
    fn observe(&mut self, view: &ModuleView, raw: &Value) -> Result<Option<String>, Failure> {
        let module = self.module;
        let Some(s) = &view.status else {
            let error = view.error.as_deref().unwrap_or("unknown");
            return Err(Failure::new(format!("module {module} is not running because of its configuration: {error}")));
        };
        let Some(r) = &view.replication else {
            return Err(Failure::new(format!("module {module} replicates no directory")));
        };
        if let Display::Json(printed) = &mut self.display {
            if printed.as_ref() != Some(raw) {
                println!("{raw}");
                *printed = Some(raw.clone());
            }
        }
        if let Some(last) = r.last_resync.as_ref().filter(|l| l.ended_at >= self.started) {
            self.worked = true;
            if !last.ok && self.warned.as_ref() != Some(last) {
                let error = last.error.as_deref().unwrap_or("no reason was given");
                self.display.warn(&format!("hamirror: {module}: resync failed: {error}; it is retried automatically"));
                self.warned = Some(last.clone());
            }
        }
        if let Some(running) = &r.resync {
            self.worked = true;
            self.rates.sample(running);
            self.display.progress(module, running, &self.rates);
            self.last = Some(running.clone());
            return Ok(None);
        }
        let on_the_way = s.transition.is_some() || (s.state == State::Second && !s.in_sync);
        self.worked |= on_the_way || !matches!(s.state, State::Second | State::Prim);
        let in_sync = match s.state {
            State::Second => s.in_sync,
            State::Prim => true,
            _ => false,
        };
        if in_sync && s.transition.is_none() && (self.worked || !self.full) {
            return Ok(Some(self.done_line(r)));
        }
        let waits_for_a_role =
            matches!(s.wait_reason, Some(WaitReason::Deciding | WaitReason::SecondRequested | WaitReason::PeerPrimary));
        if s.transition.is_none() && (s.state == State::Stop || (s.state == State::Wait && !waits_for_a_role)) {
            return Err(Failure::new(format!(
                "{module} is {} on this node: nothing to follow (start it, or run this on a node where it runs)",
                s.state
            )));
        }
        let state = match s.transition {
            Some(t) => format!("{} ({})", s.state, t.as_str()),
            None => s.state.to_string(),
        };
        let mut waiting = format!("{module}: {state}, waiting for a resync to start");
        if let (DataRole::Source, false, Some(why)) = (r.role, r.connected, &r.absent_reason) {
            waiting.push_str(&format!(" (not connected: {why})"));
        }
        self.display.waiting(waiting);
        Ok(None)
    }

    /// `MODULE: in sync (resync sent X in T)`, from how the resync ended or, when that is
    /// not known yet, from its last reading.
    fn done_line(&self, r: &ReplicationView) -> String {
        let module = self.module;
        let ended = r.last_resync.as_ref().filter(|l| l.ok && l.ended_at >= self.started);
        match (ended, &self.last) {
            (Some(l), _) => {
                format!("{module}: in sync (resync sent {} in {})", bytes(l.bytes_sent), duration_ms(l.elapsed_ms))
            }
            (None, Some(v)) => {
                format!("{module}: in sync (resync sent {} in {})", bytes(v.bytes_sent), duration_ms(v.elapsed_ms))
            }
            (None, None) => format!("{module}: in sync (no resync was running)"),
        }
    }
}

/// Where the progress goes.
enum Display {
    /// `--json`: the replication's JSON, each time it changes.
    Json(Option<Value>),
    /// stderr is a terminal.
    Bar(Bar),
    /// stderr is a file or a pipe: one line at most every [`PLAIN_INTERVAL`].
    Plain { printed: Option<Instant>, waiting: Option<String> },
}

impl Display {
    fn progress(&mut self, module: &str, r: &ResyncView, rates: &Rates) {
        match self {
            Display::Json(_) => {}
            Display::Bar(bar) => bar.progress(r, rates),
            Display::Plain { printed, waiting } => {
                *waiting = None;
                if printed.is_none_or(|at| at.elapsed() >= PLAIN_INTERVAL) {
                    eprintln!("{module}: resyncing {}{}", resync_progress(r), details(r, rates));
                    *printed = Some(Instant::now());
                }
            }
        }
    }

    /// No resync runs yet: says why the command still waits.
    fn waiting(&mut self, text: String) {
        match self {
            Display::Json(_) => {}
            Display::Bar(bar) => bar.waiting(text),
            Display::Plain { waiting, .. } => {
                if waiting.as_ref() != Some(&text) {
                    eprintln!("{text}");
                    *waiting = Some(text);
                }
            }
        }
    }

    fn warn(&mut self, line: &str) {
        match self {
            Display::Bar(bar) => bar.bar.suspend(|| eprintln!("{line}")),
            _ => eprintln!("{line}"),
        }
    }

    fn clear(&mut self) {
        if let Display::Bar(bar) = self {
            bar.bar.finish_and_clear();
        }
    }
}

/// `, 12 MiB/s, ETA 2 min 5 s, files 10/200`: what the sentence of [`resync_progress`] lacks.
fn details(r: &ResyncView, rates: &Rates) -> String {
    let mut out = String::new();
    if let Some((sent, examined)) = rates.per_second() {
        out.push_str(&format!(", {}", rate(sent)));
        if examined > 0 {
            let left = r.bytes_total.saturating_sub(r.bytes_done);
            let eta_ms = u128::from(left) * 1000 / u128::from(examined);
            out.push_str(&format!(", ETA {}", duration_ms(u64::try_from(eta_ms).unwrap_or(u64::MAX))));
        }
    }
    out.push_str(&format!(", files {}/{}", r.files_done, r.files_total));
    out
}

/// The progress bar (or, while no resync runs, a spinner) on stderr; cleared when dropped, so that an error is written on a clean
/// line.
struct Bar {
    bar: ProgressBar,
    /// The spinner (waiting) is shown rather than the bar.
    spinning: bool,
}

impl Bar {
    fn new(module: &str) -> Bar {
        // Hidden until styled: the default style would be drawn first.
        let bar = ProgressBar::hidden();
        bar.set_prefix(module.to_string());
        let mut b = Bar { bar, spinning: false };
        b.waiting(format!("{module}: reading its state"));
        b.bar.set_draw_target(ProgressDrawTarget::stderr());
        // Turns the spinner, and draws what the last update set when draws come too close
        // together to be all shown.
        b.bar.enable_steady_tick(Duration::from_millis(120));
        b
    }

    fn progress(&mut self, r: &ResyncView, rates: &Rates) {
        if self.spinning {
            let style = ProgressStyle::with_template("{prefix} [{bar:20}] {percent:>3}% {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar());
            self.bar.set_style(style.progress_chars("=> "));
            self.spinning = false;
        }
        self.bar.set_message(format!(
            "{}/{}{}, pass {}, {}",
            bytes(r.bytes_done),
            bytes(r.bytes_total),
            details(r, rates),
            r.pass,
            if r.full { "full" } else { "changes" }
        ));
        self.bar.set_length(r.bytes_total);
        self.bar.set_position(r.bytes_done.min(r.bytes_total));
    }

    fn waiting(&mut self, text: String) {
        if !self.spinning {
            let style =
                ProgressStyle::with_template("{spinner} {msg}").unwrap_or_else(|_| ProgressStyle::default_spinner());
            self.bar.set_style(style);
            self.spinning = true;
        }
        self.bar.set_message(text);
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// Samples of the running resync on the daemon's clock (`elapsed_ms`), for its rates.
#[derive(Default)]
struct Rates {
    /// `(elapsed_ms, bytes_done, bytes_sent)`, oldest first.
    samples: VecDeque<(u64, u64, u64)>,
}

impl Rates {
    fn sample(&mut self, r: &ResyncView) {
        let now = (r.elapsed_ms, r.bytes_done, r.bytes_sent);
        match self.samples.back() {
            // Nothing new.
            Some(&(t, ..)) if t == now.0 => return,
            // Another resync or pass: start over.
            Some(&(t, done, sent)) if now.0 < t || now.1 < done || now.2 < sent => self.samples.clear(),
            Some(_) => {}
            // The first pass of a resync started from nothing.
            None if r.pass <= 1 => self.samples.push_back((0, 0, 0)),
            None => {}
        }
        self.samples.push_back(now);
        while self.samples.len() > 2
            && self.samples.back().map(|b| b.0) > self.samples.get(1).map(|s| s.0 + RATE_WINDOW_MS)
        {
            self.samples.pop_front();
        }
    }

    /// Bytes sent and bytes examined per second over the window.
    fn per_second(&self) -> Option<(u64, u64)> {
        let (&(t0, done0, sent0), &(t1, done1, sent1)) = (self.samples.front()?, self.samples.back()?);
        if t1 <= t0 {
            return None;
        }
        let per_second = |from: u64, to: u64| {
            u64::try_from(u128::from(to.saturating_sub(from)) * 1000 / u128::from(t1 - t0)).unwrap_or(u64::MAX)
        };
        Some((per_second(sent0, sent1), per_second(done0, done1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(elapsed_ms: u64, done: u64, sent: u64, pass: u32) -> ResyncView {
        ResyncView {
            full: true,
            bytes_done: done,
            bytes_total: 100 << 20,
            files_done: 1,
            files_total: 3,
            bytes_sent: sent,
            elapsed_ms,
            pass,
        }
    }

    // Rates come from successive samples, start from zero on a first pass, and start over
    // when a new pass counts from zero again.
    #[test]
    fn rates_follow_the_samples() {
        let mut rates = Rates::default();
        rates.sample(&at(2000, 20 << 20, 10 << 20, 1));
        assert_eq!(rates.per_second(), Some((5 << 20, 10 << 20)));
        rates.sample(&at(3000, 40 << 20, 12 << 20, 1));
        assert_eq!(rates.per_second(), Some(((12 << 20) / 3, (40 << 20) / 3)));
        let line = details(&at(3000, 40 << 20, 12 << 20, 1), &rates);
        assert_eq!(line, ", 4 MiB/s, ETA 4.5 s, files 1/3");
        rates.sample(&at(30_000, 50 << 20, 13 << 20, 1));
        assert_eq!(rates.samples.len(), 2, "old samples leave the window");
        rates.sample(&at(31_000, 1 << 20, 13 << 20, 2));
        assert_eq!(rates.per_second(), None);
        rates.sample(&at(32_000, 3 << 20, 14 << 20, 2));
        assert_eq!(rates.per_second(), Some((1 << 20, 2 << 20)));
        let mut later = Rates::default();
        later.sample(&at(5000, 1, 1, 3));
        assert_eq!(later.per_second(), None, "no origin for a later pass");
    }
}
