//! `--all`: whole-host restore. Every VM of the backup root (less `--exclude`, or
//! only `--only`) gets the same restore; one plan for the host (each VM planned,
//! collisions between VMs, one shared space check) is printed or executed with
//! bounded parallelism; a failed VM does not stop the others; one final table and
//! the most severe exit category.

use crate::ui::format::printable;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;

use engine::Cancel;
use serde_json::{json, Value};

use crate::cli::request::{AllRequest, RestoreKind, RestoreRequest, VmTarget};
use crate::cmd::restore::{restore_vm, VmRun};
use crate::error::{AppError, ExitStatus};
use crate::host::env::Env;
use crate::host::tree;
use crate::ui::format::iec_size;
use crate::ui::log::{self, RunLog};
use crate::ui::report::{Prefixed, Quiet, TracingReporter};

/// One VM of the host plan.
#[derive(Debug)]
struct Planned {
    req: RestoreRequest,
    /// Why it will not be restored, when planning refused it.
    refused: Option<String>,
    /// The category of a refusal that was an error (a corrupt stream is exit 6 under
    /// `--all` as alone); a check's refusal is exit 5.
    refused_status: Option<ExitStatus>,
    /// Bytes its disks write, and the files they become.
    bytes: u64,
    files: Vec<String>,
    /// The libvirt domain it defines, if any.
    domain: Option<String>,
}

/// Runs `--all`.
pub fn run(a: &AllRequest, env: &Env) -> Result<ExitStatus, AppError> {
    let cancel = Cancel::new();
    if let Err(e) = crate::signal::install(cancel.clone()) {
        tracing::warn!(target: "main", "Cannot install signal handling: {e}");
    }
    RunLog::open(
        &log::log_dir(env.log_dir.as_deref()),
        "all-vms",
        &crate::ui::header::restore_header_fields(&a.template),
    );
    tracing::info!(target: "main", "====== vmrestore v{} ======", env!("CARGO_PKG_VERSION"));
    let vms = select(a)?;
    tracing::info!(target: "restore_vm", "Whole-host restore: {} VM(s): {}", vms.len(), vms.join(", "));
    let mut plan: Vec<Planned> = vms.iter().map(|vm| plan_one(a, vm, &cancel)).collect();
    cross_checks(a, &mut plan);
    for p in &plan {
        let state = p.refused.as_deref().unwrap_or("ok");
        tracing::info!(target: "restore_vm", "Plan: {} — {} file(s), {} to write — {state}", p.req.vm.label, p.files.len(), iec_size(p.bytes));
    }
    let runs: Vec<(String, Result<VmRun, AppError>)> = if a.template.options.dry_run {
        plan.iter()
            .map(|p| (p.req.vm.label.clone(), refused_or_planned(p)))
            .collect()
    } else {
        execute(a, &plan, &cancel)
    };
    finish(a, &plan, &runs)
}

/// The VM directories of the root, `--only`/`--exclude` applied.
fn select(a: &AllRequest) -> Result<Vec<String>, AppError> {
    let all = tree::vm_dirs(&a.template.root.path);
    if let Some(missing) = a.only.iter().find(|v| !all.contains(v)) {
        return Err(AppError::Vm(format!(
            "--only {missing}: no such VM under {} (VMs: {})",
            a.template.root.path.display(),
            all.join(", ")
        )));
    }
    let vms: Vec<String> = all
        .into_iter()
        .filter(|v| a.only.is_empty() || a.only.contains(v))
        .filter(|v| !a.exclude.contains(v))
        .collect();
    if vms.is_empty() {
        return Err(AppError::Vm(format!(
            "No VM to restore under {}",
            a.template.root.path.display()
        )));
    }
    Ok(vms)
}

/// The restore request of one VM, made from the template.
fn request_for(a: &AllRequest, vm: &str) -> RestoreRequest {
    let mut r = a.template.clone();
    r.vm = VmTarget {
        label: vm.to_owned(),
        typed: vm.to_owned(),
        path_aware: false,
    };
    r.json = false;
    if let (RestoreKind::Clone { name, .. }, Some((pre, suf))) = (&mut r.kind, &a.clone_affixes) {
        *name = format!("{pre}{vm}{suf}");
    }
    r
}

/// Plans one VM as a dry run would (its checks run; nothing is written), quietly.
fn plan_one(a: &AllRequest, vm: &str, cancel: &Cancel) -> Planned {
    let req = request_for(a, vm);
    let mut dry = req.clone();
    dry.options.dry_run = true;
    let quiet = Quiet;
    let mut refused_status = None;
    let (refused, plan) = match restore_vm(&dry, cancel, &quiet, false) {
        Ok(VmRun { result: Ok(o), .. }) => {
            let p = o.plan.unwrap_or(Value::Null);
            let refusals: Vec<String> = p["refusals"]
                .as_array()
                .map(|r| {
                    r.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            ((!refusals.is_empty()).then(|| refusals.join("; ")), p)
        }
        Ok(VmRun { result: Err(e), .. }) | Err(e) => {
            refused_status = Some(e.exit_status());
            (Some(e.to_string()), Value::Null)
        }
    };
    let (bytes, files, domain) = writes(&plan);
    Planned {
        req,
        refused,
        refused_status,
        bytes,
        files,
        domain,
    }
}

/// The bytes and final files a VM plan writes, and the domain it defines.
fn writes(plan: &Value) -> (u64, Vec<String>, Option<String>) {
    let mut bytes = 0;
    let mut files = Vec::new();
    let mut domain = None;
    for action in plan["actions"].as_array().into_iter().flatten() {
        for d in action["disks"].as_array().into_iter().flatten() {
            bytes += d["data_bytes"].as_u64().unwrap_or(0);
            files.extend(d["path"].as_str().map(str::to_owned));
        }
        match action["action"].as_str() {
            Some("define") => domain = action["name"].as_str().map(str::to_owned),
            Some("install-nvram") => files.extend(action["dest"].as_str().map(str::to_owned)),
            _ => {}
        }
    }
    (bytes, files, domain)
}

/// Between VMs: two that would write one file or define one domain (two backups
/// whose configs carry the same `<name>`: the second would replace the first) are
/// both refused; and the disks of all VMs must fit the restore path's filesystem
/// together.
fn cross_checks(a: &AllRequest, plan: &mut [Planned]) {
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    let mut clash: BTreeMap<String, String> = BTreeMap::new();
    for p in plan.iter() {
        let things = p
            .files
            .iter()
            .map(|f| (f.clone(), format!("{f} is also written by")));
        let domain = p.domain.iter().map(|d| {
            (
                format!("domain\0{d}"),
                format!("the domain '{}' is also defined by", printable(d)),
            )
        });
        for (key, what) in things.chain(domain) {
            let me = &p.req.vm.label;
            if let Some(o) = owner.insert(key, me.clone()) {
                clash.insert(me.clone(), format!("{what} {o}"));
                clash.insert(o, format!("{what} {me}"));
            }
        }
    }
    for p in plan.iter_mut() {
        if let Some(c) = clash.remove(&p.req.vm.label) {
            p.refused.get_or_insert(c);
        }
    }
    let Some(dir) = a.template.kind.dir() else {
        return;
    };
    let need: u64 = plan
        .iter()
        .filter(|p| p.refused.is_none())
        .map(|p| p.bytes)
        .sum();
    if let Some((free, at)) = crate::restore::preflight::free_space(dir) {
        tracing::info!(target: "preflight_free_space", "Whole host: {} to write — {} free on {}", iec_size(need), iec_size(free), at.display());
        if need > free {
            let why = format!(
                "Insufficient space for the whole host: {} to write but only {} available on {}",
                iec_size(need),
                iec_size(free),
                at.display()
            );
            for p in plan.iter_mut() {
                p.refused.get_or_insert_with(|| why.clone());
            }
        }
    }
}

/// The error of a refused VM, in the category of what refused it (a check's
/// refusal: exit 5).
fn refusal(message: String, status: Option<ExitStatus>) -> AppError {
    AppError::Reported {
        message,
        status: status.unwrap_or(ExitStatus::Vm),
    }
}

fn refused_or_planned(p: &Planned) -> Result<VmRun, AppError> {
    match &p.refused {
        Some(r) => Err(refusal(r.clone(), p.refused_status)),
        None => Ok(VmRun {
            vm: p.req.vm.label.clone(),
            result: Ok(crate::restore::Outcome {
                summary: "planned".into(),
                ..Default::default()
            }),
            seconds: 0.0,
            source: std::path::PathBuf::new(),
        }),
    }
}

/// `--jobs`, else 1 on a rotating disk and 2 otherwise: two VMs at once keep an SSD
/// and two cores busy (scripts/bench-host.sh, 8 VMs of 2 disks, 4 GiB of data, 2
/// cores: 2.53 s with one job, 2.24 s with two, 2.18 s with four — at 58 and 74 MiB
/// peak RSS against 49: more jobs only compete for the disk's queue and memory).
fn jobs(a: &AllRequest) -> usize {
    a.jobs.unwrap_or_else(|| {
        let rotating = a
            .template
            .kind
            .dir()
            .and_then(crate::ui::format::rotational)
            .unwrap_or(false);
        if rotating {
            1
        } else {
            2
        }
    })
}

/// Restores the planned VMs, `jobs` at a time; a signal stops the queue (the VMs
/// being restored roll back as a single restore does).
fn execute(
    a: &AllRequest,
    plan: &[Planned],
    cancel: &Cancel,
) -> Vec<(String, Result<VmRun, AppError>)> {
    let queue: Mutex<VecDeque<&Planned>> = Mutex::new(plan.iter().collect());
    let done: Mutex<Vec<(String, Result<VmRun, AppError>)>> = Mutex::new(Vec::new());
    let jobs = jobs(a).min(plan.len());
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                let next = queue
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .pop_front();
                let Some(p) = next else { break };
                let r = run_one(p, jobs, cancel);
                done.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push((p.req.vm.label.clone(), r));
            });
        }
    });
    let mut v = done
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let order: Vec<&str> = plan.iter().map(|p| p.req.vm.label.as_str()).collect();
    v.sort_by_key(|(vm, _)| order.iter().position(|o| o == vm));
    v
}

fn run_one(p: &Planned, jobs: usize, cancel: &Cancel) -> Result<VmRun, AppError> {
    if let Some(r) = &p.refused {
        return Err(refusal(format!("not restored: {r}"), p.refused_status));
    }
    if let Some(sig) = cancel.signal().filter(|s| *s > 0) {
        return Err(AppError::Interrupted(sig));
    }
    let log = Prefixed {
        prefix: format!("[{}] ", p.req.vm.label),
        inner: &TracingReporter,
    };
    let mut req = p.req.clone();
    req.options.concurrent = u8::try_from(jobs).unwrap_or(u8::MAX);
    restore_vm(&req, cancel, &log, false)
}

/// The final table, the JSON document, the most severe exit category.
fn finish(
    a: &AllRequest,
    plan: &[Planned],
    runs: &[(String, Result<VmRun, AppError>)],
) -> Result<ExitStatus, AppError> {
    let rows: Vec<Row> = runs.iter().map(|(vm, r)| Row::of(vm, r, plan)).collect();
    let rule = "─".repeat(96);
    // with --json, stdout is the one JSON document; the table goes to the log
    let text = table(&rows, &rule);
    if a.template.json {
        for l in text.lines().filter(|l| !l.trim().is_empty()) {
            tracing::info!(target: "restore_vm", "{l}");
        }
    } else {
        crate::ui::write_stdout(&text);
    }
    let worst = rows
        .iter()
        .map(|r| r.exit)
        .max_by_key(|c| severity(*c))
        .unwrap_or(0);
    if a.template.json {
        let doc = json!({
            "schema": "vmrestore.restore-all/1",
            "dry_run": a.template.options.dry_run,
            "mode": a.template.kind.as_str(),
            "vms": rows.iter().map(Row::to_json).collect::<Vec<_>>(),
            "exit_code": worst,
            "ok": worst == 0,
        });
        crate::ui::write_stdout(&format!(
            "{}\n",
            serde_json::to_string_pretty(&doc).unwrap_or_default()
        ));
    }
    let failed = rows.iter().filter(|r| r.exit != 0).count();
    let what = match (&a.template.kind, a.template.options.dry_run) {
        (_, true) => "would be restored [DRY RUN — no changes made]",
        (RestoreKind::TestBoot { .. }, false) => "showed a sign of life in a test boot",
        _ => "restored",
    };
    tracing::info!(target: "restore_vm", "Whole-host run: {} of {} VM(s) {what}", rows.len() - failed, rows.len());
    tracing::info!(target: "main", "====== vmrestore completed ======");
    Ok(ExitStatus::from_code(worst))
}

/// A signal beats everything; among the rest, the larger category number.
fn severity(code: u8) -> u16 {
    if code > 128 {
        1000
    } else {
        u16::from(code)
    }
}

/// One line of the final table.
#[derive(Debug)]
struct Row {
    vm: String,
    point: String,
    disks: String,
    size: u64,
    seconds: f64,
    outcome: String,
    exit: u8,
    source: String,
}

impl Row {
    fn of(vm: &str, r: &Result<VmRun, AppError>, plan: &[Planned]) -> Self {
        let size = plan
            .iter()
            .find(|p| p.req.vm.label == vm)
            .map_or(0, |p| p.bytes);
        let (point, disks, seconds, outcome, exit) = match r {
            Ok(VmRun {
                result: Ok(o),
                seconds,
                ..
            }) => (
                o.checkpoint.to_string(),
                o.disks.join(","),
                *seconds,
                o.summary.clone(),
                // a salvage restore counts as its category (6), not as success
                o.exit_status().code(),
            ),
            Ok(VmRun {
                result: Err(e),
                seconds,
                ..
            }) => (
                "-".into(),
                String::new(),
                *seconds,
                e.to_string(),
                e.exit_status().code(),
            ),
            Err(e) => (
                "-".into(),
                String::new(),
                0.0,
                e.to_string(),
                e.exit_status().code(),
            ),
        };
        let source = match r {
            Ok(v) => v.source.display().to_string(),
            Err(_) => String::new(),
        };
        Self {
            vm: vm.to_owned(),
            point,
            disks,
            size,
            seconds,
            outcome,
            exit,
            source,
        }
    }

    fn to_json(&self) -> Value {
        json!({
            "vm": self.vm, "source": self.source, "checkpoint": self.point, "disks": self.disks, "bytes": self.size,
            "seconds": (self.seconds * 10.0).round() / 10.0, "outcome": self.outcome, "exit_code": self.exit,
        })
    }
}

fn table(rows: &[Row], rule: &str) -> String {
    let mut s = format!(
        "\n  {:<24} {:>5}  {:<14} {:>9} {:>7}  Outcome\n  {rule}\n",
        "VM", "Point", "Disks", "Size", "Time"
    );
    for r in rows {
        let outcome: String = printable(&r.outcome).chars().take(70).collect();
        s.push_str(&format!(
            "  {:<24} {:>5}  {:<14} {:>9} {:>6.1}s  {}{outcome}\n",
            printable(&r.vm),
            r.point,
            printable(&r.disks),
            iec_size(r.size),
            r.seconds,
            if r.exit == 0 { "✓ " } else { "✗ " }
        ));
    }
    s.push_str(&format!("  {rule}\n"));
    s
}
