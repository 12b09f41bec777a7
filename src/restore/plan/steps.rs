//! The data of each plan step: what an action acts on, known before anything runs.

use std::path::PathBuf;

use engine::nbd::server::{Listen, TlsConfig};
use engine::DiskPlan;
use serde_json::{json, Value};

use crate::domain::rewrite::Rewrite;
use crate::host::nvram::NvramPick;
use crate::host::tpm::TpmMaterial;
use crate::restore::outputs::PredictedOutput;

/// One disk replaced in place. Its chain is planned when it is written, one disk
/// after the other, so a damaged chain of the second disk leaves the first restored
/// (spec acceptance 111).
#[derive(Debug)]
pub struct InPlace {
    /// The disk, to be written to `path`.
    pub output: PredictedOutput,
    /// True for a block device (written in place; the rollback is an image file).
    pub device: bool,
    /// The checkpoint to restore.
    pub checkpoint: u32,
    /// The VM's disk path.
    pub path: PathBuf,
    /// Where the old content is kept (`None`: `--no-pre-restore`).
    pub rollback: Option<PathBuf>,
}

/// One disk written into an NBD export.
#[derive(Debug)]
pub struct NbdWrite {
    /// The disk.
    pub disk: String,
    /// The export.
    pub uri: String,
    /// The engine plan.
    pub plan: DiskPlan,
}

/// An NVRAM copy to install.
#[derive(Debug, Clone)]
pub struct NvramInstall {
    /// The copy in the backup.
    pub pick: NvramPick,
    /// Where it goes.
    pub dest: PathBuf,
    /// The restore point's checkpoint (an earlier copy is said to be used).
    pub point: u32,
    /// Keep what is at `dest` aside first (clone).
    pub save_existing: bool,
    /// A failure fails the restore (clone); otherwise a WARN (DR).
    pub required: bool,
}

/// The domain to define.
#[derive(Debug, Clone)]
pub struct Definition {
    /// Its name.
    pub name: String,
    /// The backup's domain XML it comes from.
    pub source: PathBuf,
    /// The rewritten domain XML.
    pub xml: String,
    /// Which identity it has.
    pub identity: Identity,
    /// Removed when the define fails (the clone's fresh NVRAM copy).
    pub undo: Option<PathBuf>,
}

/// The identity of a defined domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    /// DR: the backup's UUID and MACs.
    Original {
        /// `<uuid>` of the backup, if any.
        uuid: Option<String>,
        /// The interface MACs.
        macs: Vec<String>,
    },
    /// Clone: libvirt picks a new UUID and MACs.
    New,
}

/// The TPM state to put in place.
#[derive(Debug, Clone)]
pub struct TpmRestore {
    /// The domain it belongs to (log lines).
    pub vm_label: String,
    /// The backup's data directory.
    pub data_dir: PathBuf,
    /// What the backup has.
    pub material: TpmMaterial,
    /// Under which UUID.
    pub uuid: TpmUuid,
    /// The swtpm state root.
    pub root: PathBuf,
}

/// Which UUID the TPM state is stored under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TpmUuid {
    /// DR: the backup's TPM metadata, else the defined domain's UUID (`planned`: the
    /// backup XML's UUID, which the define re-injects).
    Original {
        /// The UUID expected at plan time.
        planned: Option<String>,
    },
    /// Clone: the UUID libvirt gives the new domain.
    New,
}

impl TpmUuid {
    /// The UUID as known at plan time.
    pub fn planned_label(&self) -> String {
        match self {
            Self::Original { planned: Some(u) } => u.clone(),
            Self::Original { planned: None } | Self::New => "<new UUID>".into(),
        }
    }
}

/// An instant boot, planned: the overlays, their exports, the clone's definition.
#[derive(Debug)]
pub struct InstantBoot {
    /// The transient clone's name.
    pub name: String,
    /// `--pull`: make it permanent.
    pub pull: bool,
    /// Where the overlays go.
    pub dir: PathBuf,
    /// The overlays (one per disk).
    pub overlays: Vec<PredictedOutput>,
    /// The engine plans served for them.
    pub plans: Vec<DiskPlan>,
    /// The clone's UUID (chosen here so the TPM state can be placed first).
    pub uuid: String,
    /// The backup's domain XML.
    pub source: PathBuf,
    /// The rewrite of the domain XML, without the disks (their URIs are known once
    /// the server listens).
    pub rewrite: Rewrite,
    /// The NVRAM copy for the clone.
    pub nvram: Option<NvramInstall>,
    /// The TPM state.
    pub tpm: Option<TpmRestore>,
    /// `--test-boot`: wait for a sign of life, then tear everything down.
    pub test: Option<TestBootSpec>,
}

/// What a test boot waits for and where its evidence goes.
#[derive(Debug, Clone)]
pub struct TestBootSpec {
    /// How long to wait for a sign of life.
    pub timeout: std::time::Duration,
    /// `--test-boot-expect`: a regular expression on the serial console.
    pub expect: Option<String>,
    /// Where the serial console is logged (inside the overlay directory).
    pub console_log: PathBuf,
    /// Where the screenshot, console log and result go (`--report`, else the log dir).
    pub evidence_dir: PathBuf,
    /// `--report`: also (re)build `index.html` there.
    pub report: bool,
    /// The overlay directory was made for this test boot (removed at the end).
    pub temp_dir: bool,
}

impl InstantBoot {
    /// Dry-run lines.
    pub fn lines(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .overlays
            .iter()
            .map(|o| {
                format!(
                    "Would serve {} over NBD on 127.0.0.1 and create overlay {}",
                    o.disk,
                    o.final_path.display()
                )
            })
            .collect();
        if let Some(n) = &self.nvram {
            v.push(format!(
                "Would copy NVRAM: {} → {}",
                n.pick.source.display(),
                n.dest.display()
            ));
        }
        v.push(format!(
            "Would start transient VM '{}' with new UUID and MACs",
            self.name
        ));
        if let Some(t) = &self.test {
            v.push(format!(
                "Would wait up to {} s for a sign of life ({}), save a screenshot and the console log to {}, then stop '{}' and remove its overlays",
                t.timeout.as_secs(),
                t.expect.as_deref().map_or_else(|| "console or guest agent".to_owned(), |e| format!("console /{e}/")),
                t.evidence_dir.display(),
                self.name
            ));
        }
        if self.pull {
            v.push(format!(
                "Would block-pull every disk of '{}' and define it persistently",
                self.name
            ));
        }
        v
    }

    /// JSON form.
    pub fn to_json(&self) -> Value {
        json!({
            "name": self.name, "pull": self.pull, "uuid": self.uuid,
            "overlays": self.overlays.iter().map(|o| json!({"disk": o.disk, "path": o.final_path})).collect::<Vec<_>>(),
            "nvram": self.nvram.as_ref().map(|n| &n.dest),
        })
    }
}

/// What will be served.
#[derive(Debug)]
pub struct ServePlan {
    /// Where to listen.
    pub listen: Listen,
    /// The disks, in export order.
    pub disks: Vec<String>,
    /// Their engine plans.
    pub plans: Vec<DiskPlan>,
    /// The checkpoint served.
    pub checkpoint: u32,
    /// TLS (certificate and key loaded and checked); `None`: plain NBD.
    pub tls: Option<TlsConfig>,
}

impl ServePlan {
    /// Dry-run lines.
    pub fn lines(&self) -> Vec<String> {
        let tls = match &self.tls {
            Some(t) => format!(" with TLS ({})", t.cert_path().display()),
            None => String::new(),
        };
        vec![format!(
            "Would serve {} read-only over NBD{tls} on {}",
            self.disks.join(", "),
            listen_label(&self.listen)
        )]
    }

    /// JSON form.
    pub fn to_json(&self) -> Value {
        json!({
            "listen": listen_label(&self.listen),
            "disks": self.disks,
            "tls": self.tls.is_some(),
        })
    }
}

/// A listen address as text (`127.0.0.1:10809`, a socket path).
pub fn listen_label(l: &Listen) -> String {
    match l {
        Listen::Unix(p) => p.display().to_string(),
        Listen::Tcp(a) => a.to_string(),
    }
}
