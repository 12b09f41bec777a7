//! Waiting for a sign of life, and what it found.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::restore::plan::{InstantBoot, TestBootSpec};
use crate::restore::Context;

/// The console says the firmware found nothing to boot: no need to wait longer.
const FIRMWARE_FAILURES: [&str; 5] = [
    "No bootable device",
    "Boot failed",
    "No bootable option",
    "not a bootable disk",
    "Boot Failed",
];

/// Without `--test-boot-expect` and without a guest agent, these console lines mean
/// an operating system came up (a login prompt, systemd, our test guest).
const DEFAULT_LIFE: &str = r"(?i)(login:|GUEST-OK|Reached target|Welcome to)";

/// How a test boot ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Every sign asked for was seen.
    Alive,
    /// The firmware said there is nothing to boot.
    Firmware,
    /// The time ran out.
    Silent,
    /// The guest stopped (powered off, crashed) before a sign of life.
    Stopped,
    /// Interrupted by a signal.
    Interrupted,
}

/// What a test boot found.
#[derive(Debug, Clone)]
pub struct TestResult {
    /// How it ended.
    pub verdict: Verdict,
    /// Seconds from start to the sign of life (or to the end).
    pub seconds: f64,
    /// Which signs were seen.
    pub signs: Vec<String>,
    /// The last lines of the serial console.
    pub console_tail: Vec<String>,
    /// The firmware's words, when that is what ended it.
    pub firmware_said: Option<String>,
    /// Where the screenshot was saved, or why there is none.
    pub screenshot: Result<PathBuf, String>,
    /// The PNG bytes (kept for the report page).
    pub png: Option<Vec<u8>>,
}

/// Boots were started: waits for the signs `spec` asks for.
pub fn watch(ctx: &Context<'_>, ib: &InstantBoot, spec: &TestBootSpec) -> TestResult {
    let started = Instant::now();
    let agent = has_agent_channel(ctx, &ib.name);
    let expect = spec
        .expect
        .as_deref()
        .or(if agent { None } else { Some(DEFAULT_LIFE) });
    let re = expect.and_then(|e| regex::Regex::new(e).ok());
    ctx.log.info(
        "restore_vm",
        &format!(
            "Waiting up to {} s for a sign of life of '{}': {}",
            spec.timeout.as_secs(),
            ib.name,
            [
                expect.map(|e| format!("console /{e}/")),
                agent.then(|| "guest agent ping".to_owned())
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" and ")
        ),
    );
    let (verdict, signs, firmware_said) = wait(ctx, ib, spec, re.as_ref(), agent, started);
    let console = std::fs::read(&spec.console_log).unwrap_or_default();
    let (screenshot, png) = match take_screenshot(ctx, &ib.name) {
        Ok(png) => (Ok(super::evidence(spec, &ib.name, "png")), Some(png)),
        Err(e) => (Err(e), None),
    };
    TestResult {
        verdict,
        seconds: started.elapsed().as_secs_f64(),
        signs,
        console_tail: tail(&console, 20),
        firmware_said,
        screenshot,
        png,
    }
}

fn wait(
    ctx: &Context<'_>,
    ib: &InstantBoot,
    spec: &TestBootSpec,
    re: Option<&regex::Regex>,
    agent: bool,
    started: Instant,
) -> (Verdict, Vec<String>, Option<String>) {
    let mut signs = Vec::new();
    loop {
        if ctx.cancel.is_cancelled() {
            return (Verdict::Interrupted, signs, None);
        }
        let console =
            String::from_utf8_lossy(&std::fs::read(&spec.console_log).unwrap_or_default())
                .into_owned();
        if let Some(f) = FIRMWARE_FAILURES.iter().find(|f| console.contains(*f)) {
            return (Verdict::Firmware, signs, Some((*f).to_owned()));
        }
        if let Some(m) = re.and_then(|r| r.find(&console)) {
            if !signs.iter().any(|s: &String| s.starts_with("console")) {
                signs.push(format!("console: {:?}", m.as_str()));
            }
        }
        if agent && !signs.iter().any(|s| s == "guest agent") && ctx.hv.guest_ping(&ib.name).is_ok()
        {
            signs.push("guest agent".to_owned());
        }
        let wanted = usize::from(re.is_some()) + usize::from(agent);
        if signs.len() >= wanted {
            return (Verdict::Alive, signs, None);
        }
        match ctx.hv.lookup(&ib.name) {
            Ok(Some(i)) if i.state.is_active() => {}
            _ => return (Verdict::Stopped, signs, None),
        }
        if started.elapsed() >= spec.timeout {
            return (Verdict::Silent, signs, None);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The domain has a QEMU guest agent channel (`org.qemu.guest_agent.0`).
fn has_agent_channel(ctx: &Context<'_>, name: &str) -> bool {
    ctx.hv
        .xml(name, false)
        .is_ok_and(|x| x.contains("org.qemu.guest_agent.0"))
}

/// The last `n` lines of the console, control characters dropped.
fn tail(console: &[u8], n: usize) -> Vec<String> {
    let text = String::from_utf8_lossy(console);
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.chars().filter(|c| !c.is_control()).collect::<String>())
        .filter(|l| !l.trim().is_empty())
        .collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// A PNG of the first screen (QEMU answers with a PPM image).
fn take_screenshot(ctx: &Context<'_>, name: &str) -> Result<Vec<u8>, String> {
    let (mime, data) = ctx.hv.screenshot(name).map_err(|e| e.to_string())?;
    match mime.as_str() {
        "image/png" => Ok(data),
        _ => super::screenshot::ppm_to_png(&data).map_err(|e| format!("{mime}: {e}")),
    }
}

impl TestResult {
    /// The summary line.
    pub fn summary(&self, vm: &str, name: &str) -> String {
        match self.verdict {
            Verdict::Alive => format!(
                "Test boot passed: {vm} — '{name}' showed a sign of life after {:.0} s ({})",
                self.seconds,
                self.signs.join(", ")
            ),
            _ => format!("Test boot FAILED: {vm} — {}", self.reason(name)),
        }
    }

    fn reason(&self, name: &str) -> String {
        match self.verdict {
            Verdict::Alive => String::new(),
            Verdict::Firmware => format!(
                "'{name}' is stuck in its firmware ({:?} on the console): the restore point's disks hold nothing it can boot",
                self.firmware_said.as_deref().unwrap_or_default()
            ),
            Verdict::Silent if self.console_tail.is_empty() => format!(
                "no sign of life from '{name}' in {:.0} s, and its serial console stayed silent: stuck in the firmware or boot loader? (see the screenshot)",
                self.seconds
            ),
            Verdict::Silent => format!("no sign of life from '{name}' in {:.0} s (see the console tail and the screenshot)", self.seconds),
            Verdict::Stopped => format!("'{name}' stopped after {:.0} s without a sign of life", self.seconds),
            Verdict::Interrupted => "interrupted before a sign of life".to_owned(),
        }
    }

    /// The failure the command exits with, when it did not pass.
    pub fn failure(&self, name: &str) -> Option<String> {
        (self.verdict != Verdict::Alive).then(|| format!("Test boot failed: {}", self.reason(name)))
    }

    /// The `test_boot` object of the JSON document.
    pub fn to_json(&self) -> Value {
        json!({
            "outcome": match self.verdict {
                Verdict::Alive => "alive",
                Verdict::Firmware => "firmware",
                Verdict::Silent => "no-sign-of-life",
                Verdict::Stopped => "stopped",
                Verdict::Interrupted => "interrupted",
            },
            "seconds": (self.seconds * 10.0).round() / 10.0,
            "signs": self.signs,
            "firmware_said": self.firmware_said,
            "screenshot": self.screenshot.as_ref().ok(),
            "screenshot_error": self.screenshot.as_ref().err(),
            "console_tail": self.console_tail,
        })
    }
}

/// Where a console log would be copied (for the report and the log dir).
pub fn console_copy(spec: &TestBootSpec, name: &str) -> PathBuf {
    super::evidence(spec, name, "console.log")
}
