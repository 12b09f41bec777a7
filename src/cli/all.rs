//! `--all` on the command line: the restore every VM gets (a template request) and
//! which VMs (`--only`, `--exclude`), how many at once (`--jobs`).

use crate::cli::request::{
    AllRequest, Facts, RestoreOptions, RestorePoint, RestoreRequest, VmTarget, DEFAULT_URI,
};
use crate::cli::rules::{check_serve_tls, check_test_boot, restore_kind};
use crate::cli::Args;
use crate::error::AppError;
use crate::host::config::BackupRoot;

/// `--all`: the template restore and the VM selection.
pub(crate) fn all_request(
    args: Args,
    root: BackupRoot,
    point: RestorePoint,
    facts: &Facts,
) -> Result<AllRequest, AppError> {
    let usage = |m: &str| Err(AppError::Usage(m.to_owned()));
    if args.disk.is_some()
        || args.serve.is_some()
        || args.instant_boot
        || args.nbd_target.is_some()
        || args.name.is_some()
    {
        return usage("--all restores whole VMs: --disk, --serve, --instant-boot, --nbd-target and --name cannot be used with it (clones: --name-prefix/--name-suffix)");
    }
    check_serve_tls(&args)?;
    if args.restore_path.is_none() && !args.test_boot {
        return usage("--all requires --restore-path (unless --test-boot)");
    }
    check_test_boot(&args, &None)?;
    let jobs = jobs(&args)?;
    let clone_affixes = (args.name_prefix.is_some() || args.name_suffix.is_some()).then(|| {
        (
            args.name_prefix.clone().unwrap_or_default(),
            args.name_suffix.clone().unwrap_or_default(),
        )
    });
    let (only, exclude) = (
        vm_list(&args.only, "--only")?,
        vm_list(&args.exclude, "--exclude")?,
    );
    let mut a = args;
    // the template is a restore of a placeholder VM; each VM's is made from it
    a.vm = Some("all".into());
    a.name = clone_affixes.as_ref().map(|_| "all".to_owned());
    let kind = restore_kind(&a, None, Vec::new())?;
    Ok(AllRequest {
        template: RestoreRequest {
            root,
            vm: VmTarget {
                label: "all".into(),
                typed: "--all".into(),
                path_aware: false,
            },
            kind,
            period: a.period,
            point,
            options: RestoreOptions {
                force: a.force,
                dry_run: a.dry_run,
                skip_tpm: a.skip_tpm,
                skip_config: a.skip_config,
                no_pre_restore: a.no_pre_restore,
                include_incomplete: a.include_incomplete,
                concurrent: 1,
            },
            uri: a
                .connect
                .or_else(|| facts.default_uri.clone())
                .unwrap_or_else(|| DEFAULT_URI.into()),
            json: a.json,
            invocation: a.invocation,
        },
        only,
        exclude,
        jobs,
        clone_affixes,
    })
}

/// A comma-separated VM list, each a safe name.
fn vm_list(v: &Option<String>, flag: &str) -> Result<Vec<String>, AppError> {
    let items: Vec<String> = v
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    for i in &items {
        crate::host::names::check_flag(flag, i)?;
    }
    Ok(items)
}

/// `--jobs`: 1..=64.
fn jobs(args: &Args) -> Result<Option<usize>, AppError> {
    args.jobs
        .as_ref()
        .map(|j| {
            j.parse::<usize>()
                .ok()
                .filter(|n| (1..=64).contains(n))
                .ok_or_else(|| AppError::Usage(format!("--jobs {j}: a whole number from 1 to 64")))
        })
        .transpose()
}
