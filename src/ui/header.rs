//! The log header block of a run (spec §7.3): the invocation as typed and the
//! request's fields.

use crate::cli::request::{DiskSelection, RestoreRequest};

/// `vmrestore <args>` as typed, shell-quoted where needed (log header).
pub fn invocation(args: &[String]) -> String {
    let quoted: Vec<String> = args
        .iter()
        .map(|a| {
            if !a.is_empty()
                && a.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_./=:,@%+".contains(&c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect();
    format!("vmrestore {}", quoted.join(" "))
        .trim_end()
        .to_owned()
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

/// The log header block of a restore run (spec §7.3), for the restore flow.
pub fn restore_header_fields(r: &RestoreRequest) -> Vec<(&'static str, String)> {
    let o = &r.options;
    vec![
        ("Invocation", invocation(&r.invocation)),
        ("Mode", "restore".into()),
        ("VM", r.vm.label.clone()),
        ("Period", r.period.clone().unwrap_or_else(|| "auto".into())),
        ("Restore Point", r.point.label()),
        (
            "Restore Path",
            r.kind
                .dir()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "unset".into()),
        ),
        (
            "Clone Name",
            r.kind
                .typed_name()
                .map_or_else(|| "none (disaster recovery)".into(), str::to_owned),
        ),
        ("Backup Path", r.root.path.display().to_string()),
        (
            "Disk Filter",
            match r.kind.disks() {
                None | Some(DiskSelection::All) => "all".into(),
                Some(DiskSelection::List(d)) => d.join(","),
            },
        ),
        ("No Pre-Restore", yes_no(o.no_pre_restore)),
        ("Skip Config", yes_no(o.skip_config)),
        ("Skip TPM", yes_no(o.skip_tpm)),
        ("Force", yes_no(o.force)),
        ("Dry Run", yes_no(o.dry_run)),
        ("Include Incomplete", yes_no(o.include_incomplete)),
    ]
}

#[cfg(test)]
mod tests {
    use super::invocation;

    #[test]
    fn invocation_quoting() {
        let a: Vec<String> = [
            "--vm",
            "my vm",
            "--list-restore-points",
            "",
            "--disk",
            "vda,vdb",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        assert_eq!(
            invocation(&a),
            "vmrestore --vm 'my vm' --list-restore-points '' --disk vda,vdb"
        );
        assert_eq!(invocation(&[]), "vmrestore");
    }
}
