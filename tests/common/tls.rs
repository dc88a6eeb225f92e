//! Certificates for the TLS tests, made with `openssl`: a test CA, a server certificate
//! it signed for `127.0.0.1` and `localhost`, and, on request, a client certificate.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The files [`make_certificates`] wrote, all PEM, P-256 keys.
pub struct Certificates {
    /// The CA's certificate (`ca.crt`).
    pub ca: PathBuf,
    /// The server's certificate (`server.crt`), for `IP:127.0.0.1` and `DNS:localhost`.
    pub server_cert: PathBuf,
    /// The server's private key (`server.key`).
    pub server_key: PathBuf,
    /// The client's certificate (`client.crt`), if one was asked for.
    pub client_cert: Option<PathBuf>,
    /// The client's private key (`client.key`), if a client certificate was asked for.
    pub client_key: Option<PathBuf>,
}

fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (ci/services.sh installs it)");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Writes into `dir` a CA, a server certificate it signed for `127.0.0.1` and `localhost`
/// and, with `client` (a common name such as `fjord-client`), a client certificate it
/// signed for that name.
pub fn make_certificates(dir: &Path, client: Option<&str>) -> Certificates {
    std::fs::write(
        dir.join("openssl.cnf"),
        "[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = fjord test CA\n\
         [ca]\nbasicConstraints = critical, CA:TRUE\nkeyUsage = critical, keyCertSign, cRLSign\n\
         subjectKeyIdentifier = hash\n\
         [server]\nsubjectAltName = IP:127.0.0.1, DNS:localhost\n\
         basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\n\
         extendedKeyUsage = serverAuth\nauthorityKeyIdentifier = keyid\n\
         [client]\nbasicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\n\
         extendedKeyUsage = clientAuth\nauthorityKeyIdentifier = keyid\n",
    )
    .expect("write openssl.cnf");
    let key = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let config = ["-config", "openssl.cnf"];
    openssl(
        dir,
        &[
            &["req", "-x509", "-new"][..],
            &config,
            &["-extensions", "ca"],
            &key,
            &["-keyout", "ca.key", "-out", "ca.crt", "-days", "2"],
        ]
        .concat(),
    );
    // A key and a certificate for `subject`, signed by the CA with the extensions of
    // the config's section `name`, in `{name}.key` and `{name}.crt`.
    let issue = |name: &str, subject: &str| {
        let (key_file, csr, crt) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.crt"),
        );
        openssl(
            dir,
            &[
                &["req", "-new"][..],
                &config,
                &["-subj", subject],
                &key,
                &["-keyout", &key_file, "-out", &csr],
            ]
            .concat(),
        );
        openssl(
            dir,
            &[
                &["x509", "-req", "-in", &csr][..],
                &["-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial"],
                &["-days", "2", "-extfile", "openssl.cnf", "-extensions", name],
                &["-out", &crt],
            ]
            .concat(),
        );
        (dir.join(crt), dir.join(key_file))
    };
    let (server_cert, server_key) = issue("server", "/CN=localhost");
    let (client_cert, client_key) = client
        .map(|common_name| issue("client", &format!("/CN={common_name}")))
        .unzip();
    Certificates {
        ca: dir.join("ca.crt"),
        server_cert,
        server_key,
        client_cert,
        client_key,
    }
}
