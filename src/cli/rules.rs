//! Flag rules shared by single-VM and `--all` requests: which restore the flags ask
//! for, and the combinations of test-boot and TLS flags that mean nothing.

use std::path::PathBuf;

use crate::cli::request::{DiskSelection, NbdTargetSpec, RestoreKind, ServeTls};
use crate::cli::Args;
use crate::error::AppError;

/// Which restore the flags ask for (spec §4.0), carrying each mode's own data.
pub(crate) fn restore_kind(
    args: &Args,
    disks: Option<DiskSelection>,
    targets: Vec<NbdTargetSpec>,
) -> Result<RestoreKind, AppError> {
    let dir = args.restore_path.as_ref().map(PathBuf::from);
    let need_dir = || {
        dir.clone().ok_or_else(|| {
            AppError::Usage("--restore-path is required for restore (unless --disk is used for in-place replacement)".into())
        })
    };
    Ok(match (disks, &dir) {
        (disks, _) if args.serve.is_some() => RestoreKind::Serve {
            listen: args.serve.clone().unwrap_or_default(),
            disks,
            public: args.serve_public,
            tls: serve_tls(args),
        },
        (_, _) if args.test_boot => RestoreKind::TestBoot {
            dir: dir.clone(),
            timeout: test_boot_timeout(args)?,
            expect: args.test_boot_expect.clone(),
            report: args.report.as_ref().map(PathBuf::from),
        },
        (_, _) if args.instant_boot => RestoreKind::InstantBoot {
            dir: need_dir()?,
            name: args.name.clone(),
            pull: args.pull,
        },
        (disks, _) if !targets.is_empty() => RestoreKind::Nbd { targets, disks },
        (Some(disks), None) => RestoreKind::DiskInPlace { disks },
        (Some(disks), Some(dir)) => RestoreKind::DiskExtract {
            dir: dir.clone(),
            disks,
        },
        (None, _) if args.skip_config => RestoreKind::DataOnly {
            dir: need_dir()?,
            ignored_name: args.name.clone(),
        },
        (None, _) => match &args.name {
            Some(name) => RestoreKind::Clone {
                dir: need_dir()?,
                name: name.clone(),
            },
            None => RestoreKind::Dr { dir: need_dir()? },
        },
    })
}

/// `--test-boot` boots every disk under a name of its own; its options need it.
pub(crate) fn check_test_boot(args: &Args, disks: &Option<DiskSelection>) -> Result<(), AppError> {
    let usage = |m: &str| Err(AppError::Usage(m.to_owned()));
    let needs = args.test_boot_timeout.is_some()
        || args.test_boot_expect.is_some()
        || args.report.is_some();
    if needs && !args.test_boot {
        return usage("--test-boot-timeout, --test-boot-expect and --report require --test-boot");
    }
    if !args.test_boot {
        return Ok(());
    }
    if disks.is_some() || args.skip_config || args.pull || args.name.is_some() {
        return usage("--test-boot boots every disk of the restore point as <vm>-testboot-<time>; --disk, --skip-config, --pull and --name cannot be used with it");
    }
    if let Some(re) = &args.test_boot_expect {
        if let Err(e) = regex::Regex::new(re) {
            return Err(AppError::Usage(format!(
                "--test-boot-expect: not a regular expression: {e}"
            )));
        }
    }
    Ok(())
}

/// `--test-boot-timeout` (default 120 s): a whole number of seconds, 1..=86400.
fn test_boot_timeout(args: &Args) -> Result<u64, AppError> {
    let Some(v) = &args.test_boot_timeout else {
        return Ok(120);
    };
    v.parse::<u64>()
        .ok()
        .filter(|s| (1..=86_400).contains(s))
        .ok_or_else(|| {
            AppError::Usage(format!(
                "--test-boot-timeout {v}: a whole number of seconds from 1 to 86400"
            ))
        })
}

fn serve_tls(args: &Args) -> Option<ServeTls> {
    match (&args.serve_tls_cert, &args.serve_tls_key) {
        (Some(cert), Some(key)) => Some(ServeTls {
            cert: PathBuf::from(cert),
            key: PathBuf::from(key),
        }),
        _ => None,
    }
}

/// TLS flags only with `--serve`, and only as a pair: a certificate without its key
/// (or the reverse) cannot serve, and silently serving in plaintext would be worse.
pub(crate) fn check_serve_tls(args: &Args) -> Result<(), AppError> {
    let usage = |m: &str| Err(AppError::Usage(m.to_owned()));
    let (cert, key) = (args.serve_tls_cert.is_some(), args.serve_tls_key.is_some());
    if (cert || key) && args.serve.is_none() {
        return usage("--serve-tls-cert and --serve-tls-key require --serve");
    }
    match (cert, key) {
        (true, false) => {
            usage("--serve-tls-cert requires --serve-tls-key (the certificate's private key)")
        }
        (false, true) => {
            usage("--serve-tls-key requires --serve-tls-cert (the certificate of that key)")
        }
        _ => Ok(()),
    }
}
