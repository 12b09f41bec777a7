//! The evidence of a test boot: the screenshot (as PNG), the console log, one JSON
//! result per boot, and with `--report` one self-contained `index.html` over every
//! result in the directory (a weekly cron run adds to it).

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Value};

use super::watch::{console_copy, TestResult};
use crate::host::files;
use crate::restore::plan::{InstantBoot, TestBootSpec};
use crate::restore::Context;

/// Writes the screenshot, the console log and the result, and the report page.
pub fn keep(
    ctx: &Context<'_>,
    vm: &str,
    ib: &InstantBoot,
    spec: &TestBootSpec,
    r: &TestResult,
) -> std::io::Result<()> {
    std::fs::create_dir_all(&spec.evidence_dir)?;
    if let (Ok(path), Some(png)) = (&r.screenshot, &r.png) {
        files::write(path, png, false)?;
        ctx.log
            .info("restore_vm", &format!("Screenshot: {}", path.display()));
    } else if let Err(why) = &r.screenshot {
        ctx.log.warn("restore_vm", &format!("No screenshot: {why}"));
    }
    let console = console_copy(spec, &ib.name);
    if files::copy(&spec.console_log, &console).is_ok() {
        ctx.log.info(
            "restore_vm",
            &format!("Serial console log: {}", console.display()),
        );
    }
    let mut doc = r.to_json();
    doc["vm"] = json!(vm);
    doc["clone"] = json!(ib.name);
    doc["time"] = json!(chrono::Local::now().format("%Y-%m-%d %H:%M:%S").to_string());
    doc["summary"] = json!(r.summary(vm, &ib.name));
    let result = super::evidence(spec, &ib.name, "json");
    let text = serde_json::to_string_pretty(&doc).unwrap_or_default();
    files::write(&result, text.as_bytes(), false)?;
    if spec.report {
        let page = spec.evidence_dir.join("index.html");
        files::write(&page, html(&spec.evidence_dir).as_bytes(), false)?;
        ctx.log
            .info("restore_vm", &format!("Report: {}", page.display()));
    }
    Ok(())
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Standard base64 (for the screenshots inlined in the page).
fn base64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for k in 0..4 {
            if k <= c.len() {
                out.push(char::from(T[((n >> (18 - 6 * k)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// One page over every `*.json` result in `dir`, newest first.
fn html(dir: &Path) -> String {
    let mut results: Vec<Value> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .filter_map(|e| std::fs::read(e.path()).ok())
                .filter_map(|b| serde_json::from_slice(&b).ok())
                .filter(|v: &Value| v.get("clone").is_some())
                .collect()
        })
        .unwrap_or_default();
    results.sort_by(|a, b| b["time"].as_str().cmp(&a["time"].as_str()));
    let passed = results.iter().filter(|r| r["outcome"] == "alive").count();
    let mut s = format!(
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>vmrestore test boots</title>\n<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #999;padding:.4em;vertical-align:top}}.alive{{background:#cfc}}.failed{{background:#fcc}}pre{{font-size:80%;max-width:60em;overflow:auto}}img{{max-width:480px}}</style></head><body>\n<h1>Test boots</h1>\n<p>{passed} of {} test boots showed a sign of life.</p>\n<table>\n<tr><th>VM</th><th>Time</th><th>Outcome</th><th>Seconds</th><th>Console (tail)</th><th>Screenshot</th></tr>\n",
        results.len()
    );
    for r in &results {
        row(&mut s, dir, r);
    }
    s.push_str("</table>\n</body></html>\n");
    s
}

fn row(s: &mut String, dir: &Path, r: &Value) {
    let alive = r["outcome"] == "alive";
    let tail: Vec<&str> = r["console_tail"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let shot = r["screenshot"]
        .as_str()
        .and_then(|p| std::fs::read(dir.join(Path::new(p).file_name().unwrap_or_default())).ok())
        .map_or_else(
            || esc(r["screenshot_error"].as_str().unwrap_or("none")),
            |png| {
                format!(
                    "<img alt=\"screenshot\" src=\"data:image/png;base64,{}\">",
                    base64(&png)
                )
            },
        );
    let _ = writeln!(
        s,
        "<tr class=\"{}\" data-vm=\"{}\" data-outcome=\"{}\"><td>{}<br><small>{}</small></td><td>{}</td><td>{}</td><td>{}</td><td><pre>{}</pre></td><td>{shot}</td></tr>",
        if alive { "alive" } else { "failed" },
        esc(r["vm"].as_str().unwrap_or_default()),
        esc(r["outcome"].as_str().unwrap_or_default()),
        esc(r["vm"].as_str().unwrap_or_default()),
        esc(r["clone"].as_str().unwrap_or_default()),
        esc(r["time"].as_str().unwrap_or_default()),
        esc(r["summary"].as_str().unwrap_or_default()),
        r["seconds"],
        esc(&tail.join("\n")),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }
}
