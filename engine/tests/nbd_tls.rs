//! The NBD server with TLS (FORCEDTLS): raw protocol conversations before and after
//! `STARTTLS` with a rustls client, and `qemu-img` (GnuTLS) reading exports over TLS
//! on TCP and on a Unix socket. Certificates come from a throwaway CA made by rcgen.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use engine::nbd::proto::*;
use engine::nbd::{Listen, ServeHandle, ServeOptions, Server, TlsConfig};
use engine::{Cancel, DiskPlan};
use nbdfmt::writer::{write_stream, StreamOptions, WriteFrame};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, ServerName};

const MIB: u64 = 1 << 20;

/// A CA (`ca-cert.pem`, what qemu's `tls-creds-x509` reads) and a server
/// certificate it signed for 127.0.0.1 and localhost, in `dir`.
struct Pki {
    dir: PathBuf,
    ca: CertificateDer<'static>,
}

impl Pki {
    fn new(dir: &Path) -> Self {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "vmrestore test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key"))
            .expect("ca");
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &ca).expect("server cert");
        std::fs::create_dir_all(dir).expect("pki dir");
        std::fs::write(dir.join("ca-cert.pem"), ca.pem()).expect("ca pem");
        std::fs::write(dir.join("server-cert.pem"), cert.pem()).expect("cert pem");
        std::fs::write(dir.join("server-key.pem"), key.serialize_pem()).expect("key pem");
        Self {
            dir: dir.to_path_buf(),
            ca: ca.der().clone(),
        }
    }

    fn server_config(&self) -> TlsConfig {
        TlsConfig::from_pem_files(
            &self.dir.join("server-cert.pem"),
            &self.dir.join("server-key.pem"),
        )
        .expect("tls config")
    }

    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).expect("root");
        #[allow(deprecated)] // the ring provider: see engine's server/tls.rs
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("versions")
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

/// A 4 MiB disk: data, a zero frame, more data over it in an incremental.
fn gen_chain(dir: &Path) -> (Vec<PathBuf>, Vec<u8>) {
    let size = 4 * MIB;
    let mut model = vec![0u8; size as usize];
    let data = |seed: u8, len: u64| -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    };
    let chain = [
        vec![
            WriteFrame::Data(0, data(1, 2 * MIB)),
            WriteFrame::Zero(2 * MIB, MIB),
        ],
        vec![WriteFrame::Data(MIB + 4096, data(7, 8192))],
    ];
    let mut paths = Vec::new();
    for (n, frames) in chain.iter().enumerate() {
        let (o, name) = if n == 0 {
            (
                StreamOptions::full("vda", size, 0),
                "vda.full.data".to_owned(),
            )
        } else {
            (
                StreamOptions::inc("vda", n as u32, size, 0).compressed(2),
                format!("vda.inc.virtnbdbackup.{n}.data"),
            )
        };
        let p = dir.join(name);
        std::fs::write(&p, write_stream(&o, frames)).expect("chain file");
        paths.push(p);
        for f in frames {
            match f {
                WriteFrame::Data(s, d) => {
                    model[*s as usize..*s as usize + d.len()].copy_from_slice(d)
                }
                WriteFrame::Zero(s, l) => model[*s as usize..(*s + *l) as usize].fill(0),
            }
        }
    }
    (paths, model)
}

fn serve_tls(dir: &Path, pki: &Pki, listen: Listen) -> (ServeHandle, Vec<u8>) {
    let (paths, model) = gen_chain(dir);
    let plan = DiskPlan::from_paths("vda", &paths, None).expect("plan");
    let opts = ServeOptions {
        tls: Some(pki.server_config()),
        ..ServeOptions::default()
    };
    let h = Server::bind(vec![plan], &[listen], opts)
        .expect("bind")
        .spawn(Cancel::new())
        .expect("spawn");
    (h, model)
}

// ---- a raw client, over the plain socket or TLS -------------------------------

struct Raw<S: Read + Write>(S);

fn connect(sock: &Path) -> Raw<UnixStream> {
    let mut s = UnixStream::connect(sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut b = [0u8; 18];
    s.read_exact(&mut b).expect("greeting");
    assert_eq!(&b[..16], b"NBDMAGICIHAVEOPT");
    assert_eq!(be16(&b[16..]), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .expect("flags");
    Raw(s)
}

fn option(opt: u32, data: &[u8]) -> Vec<u8> {
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&opt.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

impl<S: Read + Write> Raw<S> {
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.0.read_exact(&mut v).expect("bytes");
        v
    }

    /// Sends an option; returns every reply up to the final one.
    fn opt(&mut self, opt: u32, data: &[u8]) -> Vec<(u32, Vec<u8>)> {
        self.0.write_all(&option(opt, data)).expect("send option");
        self.0.flush().expect("flush");
        let mut out = Vec::new();
        loop {
            let h = self.bytes(20);
            assert_eq!(be64(&h[..8]), OPT_REPLY_MAGIC);
            assert_eq!(be32(&h[8..12]), opt);
            let kind = be32(&h[12..16]);
            let d = self.bytes(be32(&h[16..20]) as usize);
            out.push((kind, d));
            if kind == REP_ACK || kind & REP_FLAG_ERROR != 0 {
                return out;
            }
        }
    }

    /// A simple-reply read of `len` bytes at `offset`.
    fn read_at(&mut self, handle: u64, offset: u64, len: u32) -> Vec<u8> {
        let r = Request {
            flags: 0,
            kind: CMD_READ,
            handle,
            offset,
            length: len,
        };
        self.0.write_all(&r.encode()).expect("request");
        self.0.flush().expect("flush");
        let h = self.bytes(16);
        assert_eq!(be32(&h[..4]), SIMPLE_REPLY_MAGIC);
        assert_eq!(be32(&h[4..8]), 0, "read error");
        assert_eq!(be64(&h[8..16]), handle);
        self.bytes(len as usize)
    }

    /// True when the server closed the connection (EOF or reset).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

type TlsRaw = Raw<rustls::StreamOwned<rustls::ClientConnection, UnixStream>>;

/// `STARTTLS` on a plain connection, then the TLS handshake (server name checked).
fn start_tls(mut c: Raw<UnixStream>, pki: &Pki) -> TlsRaw {
    let r = c.opt(OPT_STARTTLS, &[]);
    assert_eq!(r, vec![(REP_ACK, Vec::new())]);
    let name = ServerName::try_from("localhost").expect("name");
    let conn = rustls::ClientConnection::new(pki.client_config(), name).expect("client");
    let mut s = rustls::StreamOwned::new(conn, c.0);
    while s.conn.is_handshaking() {
        s.conn
            .complete_io(&mut s.sock)
            .expect("TLS handshake with the server");
    }
    Raw(s)
}

#[test]
fn starttls_then_an_export_is_read_over_tls() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(&tmp.path().join("pki"));
    let sock = tmp.path().join("tls.sock");
    let (h, model) = serve_tls(tmp.path(), &pki, Listen::Unix(sock.clone()));
    assert_eq!(
        h.uris(),
        [format!("nbds+unix:///vda?socket={}", sock.display())]
    );

    // FORCEDTLS: everything but STARTTLS and ABORT is refused in plaintext.
    let mut c = connect(&sock);
    for (opt, data) in [
        (OPT_LIST, Vec::new()),
        (OPT_INFO, go_data("vda")),
        (OPT_GO, go_data("vda")),
        (OPT_STRUCTURED_REPLY, Vec::new()),
        (99, b"junk".to_vec()),
    ] {
        let r = c.opt(opt, &data);
        assert_eq!(r.len(), 1, "{}", option_name(opt));
        assert_eq!(r[0].0, REP_ERR_TLS_REQD, "{}", option_name(opt));
    }
    assert_eq!(c.opt(OPT_STARTTLS, b"x")[0].0, REP_ERR_INVALID, "no data");

    // Over TLS: a fresh round of haggling, no second STARTTLS, then transmission.
    let mut t = start_tls(c, &pki);
    assert_eq!(t.opt(OPT_STARTTLS, &[])[0].0, REP_ERR_INVALID);
    let r = t.opt(OPT_LIST, &[]);
    assert_eq!(r.len(), 2);
    assert_eq!(&r[0].1[4..], b"vda");
    let r = t.opt(OPT_GO, &go_data("vda"));
    assert_eq!(r.last().map(|x| x.0), Some(REP_ACK));
    let export = r
        .iter()
        .find(|x| x.0 == REP_INFO && be16(&x.1[..2]) == INFO_EXPORT)
        .expect("export info");
    assert_eq!(be64(&export.1[2..10]), 4 * MIB);
    for (n, (off, len)) in [
        (0, 4096u32),
        (MIB, 3 * 4096),
        (2 * MIB - 512, 4096),
        (0, 4 << 20),
    ]
    .into_iter()
    .enumerate()
    {
        let got = t.read_at(n as u64, off, len);
        assert!(
            got == model[off as usize..off as usize + len as usize],
            "read {off}+{len}"
        );
    }
    let disc = Request {
        flags: 0,
        kind: CMD_DISC,
        handle: 99,
        offset: 0,
        length: 0,
    };
    t.0.write_all(&disc.encode()).expect("disc");
    t.0.flush().expect("flush");
    let mut rest = Vec::new();
    // the server closes with a TLS close_notify: a clean end of stream
    t.0.read_to_end(&mut rest).expect("clean TLS close");
    assert!(rest.is_empty());
    let stats = h.stop().expect("stop");
    assert_eq!(stats.connections, 1);
}

#[test]
fn export_name_before_starttls_closes_the_connection() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(&tmp.path().join("pki"));
    let sock = tmp.path().join("tls.sock");
    let (h, _) = serve_tls(tmp.path(), &pki, Listen::Unix(sock.clone()));
    let mut c = connect(&sock);
    c.0.write_all(&option(OPT_EXPORT_NAME, b"vda"))
        .expect("export name");
    assert!(
        c.closed(),
        "EXPORT_NAME has no error reply: hard disconnect"
    );

    // Bytes sent behind STARTTLS, before its ACK, would reach the server in
    // plaintext ahead of TLS: the connection is dropped instead.
    let mut c = connect(&sock);
    let mut m = option(OPT_STARTTLS, &[]);
    m.extend_from_slice(&option(OPT_GO, &go_data("vda")));
    c.0.write_all(&m).expect("pipelined");
    let ack = c.bytes(20);
    assert_eq!(be32(&ack[12..16]), REP_ACK);
    assert!(c.closed(), "plaintext after STARTTLS is refused");

    // ABORT works before TLS.
    let mut c = connect(&sock);
    assert_eq!(c.opt(OPT_ABORT, &[])[0].0, REP_ACK);
    h.stop().expect("stop");
}

#[test]
fn without_tls_starttls_is_unsupported_and_options_work() {
    let tmp = tempfile::tempdir().expect("tmp");
    let sock = tmp.path().join("plain.sock");
    let (paths, _) = gen_chain(tmp.path());
    let plan = DiskPlan::from_paths("vda", &paths, None).expect("plan");
    let h = Server::bind(
        vec![plan],
        &[Listen::Unix(sock.clone())],
        ServeOptions::default(),
    )
    .expect("bind")
    .spawn(Cancel::new())
    .expect("spawn");
    assert!(h.uris()[0].starts_with("nbd+unix:///vda?socket="));
    let mut c = connect(&sock);
    assert_eq!(c.opt(OPT_STARTTLS, &[])[0].0, REP_ERR_UNSUP);
    assert_eq!(c.opt(OPT_LIST, &[]).last().map(|x| x.0), Some(REP_ACK));
    h.stop().expect("stop");
}

#[test]
fn a_certificate_that_does_not_verify_fails_the_handshake() {
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(&tmp.path().join("pki"));
    let other = Pki::new(&tmp.path().join("other"));
    let sock = tmp.path().join("tls.sock");
    let (h, _) = serve_tls(tmp.path(), &pki, Listen::Unix(sock.clone()));
    let mut c = connect(&sock);
    assert_eq!(c.opt(OPT_STARTTLS, &[])[0].0, REP_ACK);
    let name = ServerName::try_from("localhost").expect("name");
    let conn = rustls::ClientConnection::new(other.client_config(), name).expect("client");
    let mut s = rustls::StreamOwned::new(conn, c.0);
    let mut failed = false;
    while s.conn.is_handshaking() {
        if let Err(e) = s.conn.complete_io(&mut s.sock) {
            assert!(e.to_string().contains("certificate"), "{e}");
            failed = true;
            break;
        }
    }
    assert!(failed, "a server certificate from another CA is rejected");
    h.stop().expect("stop");
}

// ---- qemu-img (GnuTLS) over TLS ------------------------------------------------

/// qemu-img is the interoperability reference; without it the test says so and passes.
fn have_qemu_img() -> bool {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!(
            "\n!!!!! SKIPPED: `qemu-img` is not installed (apt-get install -y qemu-utils) !!!!!\n"
        );
    }
    ok
}

/// `qemu-img convert` of an NBD export over TLS (`server` are the `driver=nbd`
/// address options) into a raw file; returns its bytes.
fn qemu_img_read(pki: &Pki, server: &str, out: &Path) -> Vec<u8> {
    let creds = format!(
        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
        pki.dir.display()
    );
    let image = format!("driver=nbd,{server},export=vda,tls-creds=tls0");
    let o = Command::new("timeout")
        .args([
            "60",
            "qemu-img",
            "convert",
            "--object",
            &creds,
            "--image-opts",
            &image,
        ])
        .args(["-O", "raw"])
        .arg(out)
        .output()
        .expect("qemu-img");
    assert!(
        o.status.success(),
        "qemu-img convert {image} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::read(out).expect("converted")
}

#[test]
fn qemu_img_reads_exports_over_tls_on_tcp_and_unix() {
    if !have_qemu_img() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tmp");
    let pki = Pki::new(&tmp.path().join("pki"));
    let tcp_dir = tmp.path().join("tcp");
    std::fs::create_dir_all(&tcp_dir).expect("dir");
    let (h, model) = serve_tls(&tcp_dir, &pki, Listen::tcp("127.0.0.1:0").expect("addr"));
    let port = h.tcp_addrs()[0].port();
    assert_eq!(h.uris(), [format!("nbds://127.0.0.1:{port}/vda")]);
    let got = qemu_img_read(
        &pki,
        &format!("server.type=inet,server.host=127.0.0.1,server.port={port}"),
        &tmp.path().join("tcp.raw"),
    );
    assert!(got == model, "TCP+TLS read differs");
    h.stop().expect("stop");

    let sock = tmp.path().join("tls.sock");
    let (h, model) = serve_tls(tmp.path(), &pki, Listen::Unix(sock.clone()));
    // A Unix socket has no host name: qemu needs one to check the certificate.
    let got = qemu_img_read(
        &pki,
        &format!(
            "server.type=unix,server.path={},tls-hostname=localhost",
            sock.display()
        ),
        &tmp.path().join("unix.raw"),
    );
    assert!(got == model, "Unix+TLS read differs");
    let stats = h.stop().expect("stop");
    assert!(stats.requests > 0 && stats.errors == 0, "{stats:?}");

    // Without the CA qemu cannot start: plaintext is refused, not served.
    let plain_sock = tmp.path().join("tls2.sock");
    let (h, _) = serve_tls(&tcp_dir, &pki, Listen::Unix(plain_sock.clone()));
    let o = Command::new("timeout")
        .args(["60", "qemu-img", "info", "--image-opts"])
        .arg(format!(
            "driver=nbd,server.type=unix,server.path={},export=vda",
            plain_sock.display()
        ))
        .output()
        .expect("qemu-img");
    assert!(!o.status.success(), "a plaintext client is refused");
    h.stop().expect("stop");
}
