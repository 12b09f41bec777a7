//! What was typed ([`Args`]) → what is needed ([`Request`]), with the validation
//! order of spec §1.3 steps 4–8. No I/O: the backup root (step 3) and the
//! restore-path containment (step 6) are computed by the caller and passed in as
//! data, so the first failure still wins in the spec's order.

use crate::cli::request::{
    parse_nbd_targets, DiskSelection, Facts, InspectRequest, ListRequest, NbdTargetSpec,
    PointsRequest, Request, RestoreOptions, RestorePoint, RestoreRequest, VmTarget, DEFAULT_URI,
};
use crate::cli::rules::{check_serve_tls, check_test_boot, restore_kind};
use crate::cli::{Args, Mode};
use crate::error::AppError;
use crate::host::config::BackupRoot;

/// Steps 4–8 of spec §1.3, in order: the mode and the restore point.
fn checked_steps(args: &Args, facts: &Facts) -> Result<(Mode, RestorePoint), AppError> {
    // 4
    if args.disk.is_some() && args.name.is_some() {
        return Err(AppError::Usage(
            "--disk and --name cannot be combined (disk restore replaces disk files, it does not create a VM)".into(),
        ));
    }
    // 5
    let point = args
        .restore_point
        .as_deref()
        .map(RestorePoint::parse)
        .transpose()?
        .unwrap_or(RestorePoint::Latest);
    // 6
    if let (Some(inside), Some(p)) = (&facts.restore_path_inside, &args.restore_path) {
        return Err(AppError::Usage(format!(
            "Restore path is inside backup root {}: {p} — choose a destination outside the backup storage",
            inside.display()
        )));
    }
    // 7
    let Some(mode) = args.mode else {
        return Err(AppError::Usage("No mode specified (try --help)".into()));
    };
    // 8
    if mode == Mode::Restore
        && args.restore_path.is_none()
        && args.disk.is_none()
        && args.serve.is_none()
        && args.nbd_target.is_none()
        && !args.test_boot
    {
        return Err(AppError::Usage("--restore-path is required for restore (unless --disk is used for in-place replacement)".into()));
    }
    Ok((mode, point))
}

/// Steps 4–8 of spec §1.3 (plus the mode-specific pure checks), first failure wins.
pub fn build(args: Args, root: BackupRoot, facts: &Facts) -> Result<Request, AppError> {
    let (mode, point) = checked_steps(&args, facts)?;
    let vm = args.vm.clone().map(|label| VmTarget {
        label,
        typed: args.vm_value.clone().unwrap_or_default(),
        path_aware: args.path_aware,
    });
    let need_vm = |msg: &str| vm.clone().ok_or_else(|| AppError::Usage(msg.to_owned()));
    check_names(&args)?;
    Ok(match mode {
        Mode::All => Request::All(crate::cli::all::all_request(args, root, point, facts)?),
        Mode::List => Request::List(ListRequest {
            root,
            json: args.json,
        }),
        Mode::ListRestorePoints => Request::Points(PointsRequest {
            root,
            vm: need_vm("VM name required for --list-restore-points")?,
            period: args.period,
            json: args.json,
        }),
        Mode::Verify | Mode::Dump => {
            let r = InspectRequest {
                root,
                vm: need_vm("VM name required")?,
                period: args.period,
                json: args.json,
                invocation: args.invocation,
            };
            if mode == Mode::Verify {
                Request::Verify(r)
            } else {
                Request::Dump(r)
            }
        }
        Mode::Restore => {
            let disks = args.disk.as_deref().map(DiskSelection::parse).transpose()?;
            let nbd_targets = args
                .nbd_target
                .as_deref()
                .map(parse_nbd_targets)
                .transpose()?
                .unwrap_or_default();
            check_new_modes(&args, &disks, &nbd_targets)?;
            let vm = need_vm("--vm requires a VM name or path")?;
            let kind = restore_kind(&args, disks, nbd_targets)?;
            Request::Restore(RestoreRequest {
                root,
                vm,
                kind,
                period: args.period,
                point,
                options: RestoreOptions {
                    force: args.force,
                    dry_run: args.dry_run,
                    skip_tpm: args.skip_tpm,
                    skip_config: args.skip_config,
                    no_pre_restore: args.no_pre_restore,
                    include_incomplete: args.include_incomplete,
                    concurrent: 1,
                },
                uri: args
                    .connect
                    .or_else(|| facts.default_uri.clone())
                    .unwrap_or_else(|| DEFAULT_URI.into()),
                json: args.json,
                invocation: args.invocation,
            })
        }
    })
}

/// Every typed value that becomes a path component is one safe component (exit 7
/// naming the flag): `--vm`'s name, `--name`, `--period`, `--disk` and the disks of
/// `--nbd-target`.
fn check_names(args: &Args) -> Result<(), AppError> {
    use crate::host::names::check_flag;
    if let Some(label) = &args.vm {
        check_flag(
            if args.path_aware {
                "--vm (last path component)"
            } else {
                "--vm"
            },
            label,
        )?;
    }
    if let Some(n) = &args.name {
        check_flag("--name", n)?;
    }
    if let Some(p) = &args.period {
        check_flag("--period", p)?;
    }
    if let Some(DiskSelection::List(disks)) =
        args.disk.as_deref().map(DiskSelection::parse).transpose()?
    {
        for d in &disks {
            check_flag("--disk", d)?;
        }
    }
    for t in args
        .nbd_target
        .as_deref()
        .map(parse_nbd_targets)
        .transpose()?
        .unwrap_or_default()
    {
        if let Some(d) = &t.disk {
            check_flag("--nbd-target", d)?;
        }
    }
    Ok(())
}

/// The combinations of `--serve`, `--instant-boot`, `--pull` and `--nbd-target`
/// that mean nothing, refused before anything is read.
fn check_new_modes(
    args: &Args,
    disks: &Option<DiskSelection>,
    nbd: &[NbdTargetSpec],
) -> Result<(), AppError> {
    let usage = |m: &str| Err(AppError::Usage(m.to_owned()));
    let exclusive = [
        args.serve.is_some(),
        args.instant_boot,
        args.nbd_target.is_some(),
        args.test_boot,
    ];
    if exclusive.iter().filter(|x| **x).count() > 1 {
        return usage("--serve, --instant-boot, --test-boot and --nbd-target cannot be combined");
    }
    check_test_boot(args, disks)?;
    if args.pull && !args.instant_boot {
        return usage("--pull requires --instant-boot");
    }
    if args.serve_public && args.serve.is_none() {
        return usage("--serve-public requires --serve");
    }
    check_serve_tls(args)?;
    if args.instant_boot {
        if disks.is_some() {
            return usage("--instant-boot boots every disk of the restore point; --disk cannot be used with it");
        }
        if args.skip_config {
            return usage("--instant-boot defines a VM; --skip-config cannot be used with it");
        }
    }
    if !nbd.is_empty() {
        if args.restore_path.is_some() {
            return usage(
                "--nbd-target writes into NBD exports; --restore-path cannot be used with it",
            );
        }
        match disks {
            Some(DiskSelection::All) => {
                return usage("--nbd-target: name each disk (vda=nbd://...) instead of --disk all")
            }
            Some(DiskSelection::List(l)) if l.len() > 1 || nbd.iter().any(|t| t.disk.is_some()) => {
                return usage("--nbd-target with --disk: give one disk and one bare URI")
            }
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::request::RestoreKind;
    use crate::cli::{parse, Parsed};
    use crate::host::config::RootSource;
    use std::path::PathBuf;

    fn root() -> BackupRoot {
        BackupRoot {
            path: "/b".into(),
            source: RootSource::Cli,
        }
    }

    fn req(a: &[&str], facts: &Facts) -> Result<Request, AppError> {
        match parse(&a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()) {
            Ok(Parsed::Run(args)) => build(*args, root(), facts),
            other => panic!("{other:?}"),
        }
    }

    fn usage(a: &[&str]) -> String {
        match req(a, &Facts::default()) {
            Err(AppError::Usage(m)) => m,
            other => panic!("{a:?}: {other:?}"),
        }
    }

    #[test]
    fn validation_order() {
        // statement 9 beats everything after it
        assert!(usage(&[
            "--vm",
            "v",
            "--disk",
            "vda",
            "--name",
            "c",
            "--restore-point",
            "x"
        ])
        .starts_with("--disk and --name"));
        // statement 10
        for bad in ["foo", "-1", "3abc", "+3", " 3"] {
            assert_eq!(
                usage(&["--list", "--restore-point", bad]),
                format!("Invalid restore point: {bad} (use latest, full, or number)")
            );
        }
        // step 6 before step 7
        let f = Facts {
            restore_path_inside: Some("/b".into()),
            default_uri: None,
        };
        match req(&["--restore-path", "/b/r"], &f) {
            Err(AppError::Usage(m)) => assert_eq!(m, "Restore path is inside backup root /b: /b/r — choose a destination outside the backup storage"),
            other => panic!("{other:?}"),
        }
        // statements 11-13
        assert_eq!(
            usage(&["--backup-path", "/b"]),
            "No mode specified (try --help)"
        );
        assert_eq!(usage(&["--vm", "v"]), "--restore-path is required for restore (unless --disk is used for in-place replacement)");
        assert_eq!(
            usage(&["--list-restore-points"]),
            "VM name required for --list-restore-points"
        );
        assert_eq!(
            usage(&["--list-restore-points", "--period", "2026-W10"]),
            "VM name required for --list-restore-points"
        );
        assert_eq!(
            usage(&["--vm", "v", "--disk", ","]),
            "No disk names specified"
        );
    }

    #[test]
    fn restore_modes() {
        let mode = |a: &[&str]| match req(a, &Facts::default()) {
            Ok(Request::Restore(r)) => r.kind.as_str(),
            other => panic!("{other:?}"),
        };
        assert_eq!(mode(&["--vm", "v", "--restore-path", "/r"]), "dr");
        assert_eq!(
            mode(&["--vm", "v", "--restore-path", "/r", "--name", "c"]),
            "clone"
        );
        assert_eq!(
            mode(&[
                "--vm",
                "v",
                "--restore-path",
                "/r",
                "--name",
                "c",
                "--skip-config"
            ]),
            "data-only"
        );
        assert_eq!(mode(&["--vm", "v", "--disk", "vda"]), "disk");
        assert_eq!(
            mode(&[
                "--vm",
                "v",
                "--disk",
                "vda",
                "--restore-path",
                "/r",
                "--skip-config"
            ]),
            "extract"
        );
        match req(
            &[
                "--vm",
                "/x/v",
                "--disk",
                " vda , ,vdb,vda ",
                "--restore-point",
                "full",
            ],
            &Facts::default(),
        ) {
            Ok(Request::Restore(r)) => {
                assert_eq!(
                    r.kind.disks(),
                    Some(&DiskSelection::List(vec!["vda".into(), "vdb".into()]))
                );
                assert_eq!(
                    (r.point, r.vm.label.as_str(), r.vm.path_aware),
                    (RestorePoint::Full, "v", true)
                );
                assert_eq!(r.uri, DEFAULT_URI);
            }
            other => panic!("{other:?}"),
        }
        let f = Facts {
            restore_path_inside: None,
            default_uri: Some("test:///default".into()),
        };
        match req(&["--vm", "v", "--disk", "all"], &f) {
            Ok(Request::Restore(r)) => assert_eq!(
                (r.kind.disks(), r.uri.as_str()),
                (Some(&DiskSelection::All), "test:///default")
            ),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            RestorePoint::parse("007").ok(),
            Some(RestorePoint::Number(7))
        );
        assert_eq!(
            RestorePoint::parse("99999999999999999999999").ok(),
            Some(RestorePoint::Number(u64::MAX))
        );
    }

    #[test]
    fn serve_tls_flags() {
        let serve = ["--vm", "v", "--serve", "/run/s.sock"];
        let with = |extra: &[&'static str]| -> Vec<&'static str> {
            serve.iter().chain(extra).copied().collect()
        };
        match req(
            &with(&["--serve-tls-cert", "c.pem", "--serve-tls-key", "k.pem"]),
            &Facts::default(),
        ) {
            Ok(Request::Restore(r)) => match r.kind {
                RestoreKind::Serve { tls: Some(t), .. } => {
                    assert_eq!(t.cert, PathBuf::from("c.pem"));
                    assert_eq!(t.key, PathBuf::from("k.pem"));
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        match req(&serve, &Facts::default()) {
            Ok(Request::Restore(r)) => {
                assert!(matches!(r.kind, RestoreKind::Serve { tls: None, .. }))
            }
            other => panic!("{other:?}"),
        }
        assert!(usage(&with(&["--serve-tls-cert", "c.pem"])).contains("requires --serve-tls-key"));
        assert!(usage(&with(&["--serve-tls-key", "k.pem"])).contains("requires --serve-tls-cert"));
        let m = usage(&[
            "--vm",
            "v",
            "--skip-config",
            "--restore-path",
            "/r",
            "--serve-tls-cert",
            "c.pem",
            "--serve-tls-key",
            "k.pem",
        ]);
        assert!(m.contains("require --serve"), "{m}");
    }
}
