//! Where the control plane is and how testbusctl proves who it is.
//!
//! The address: `--server`/`TESTBUS_SERVER`, else the config file's, else
//! the local control plane's socket in its default data dir if there is
//! one (admin to whoever may open it), else `https://127.0.0.1:7780`.
//! The credentials: the config file, `$TESTBUS_CONFIG` or else
//! `~/.config/testbus/config.yaml` (written by `testbus-control-plane user
//! create`): the CA to check the server by, and a client certificate.
use crate::error::{CliError, CliResult, PERMISSION, USAGE};
use std::path::PathBuf;
use testbus_client::{Client, Tls};
use testbus_pki::ClientFile;

/// The address used when nothing names one.
const FALLBACK: &str = "https://127.0.0.1:7780";

fn config_path() -> (PathBuf, bool) {
    match std::env::var_os("TESTBUS_CONFIG") {
        Some(p) if !p.is_empty() => (PathBuf::from(p), true),
        _ => {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| ".".into());
            (home.join(".config/testbus/config.yaml"), false)
        }
    }
}

/// The config file, if there is one; an error if `$TESTBUS_CONFIG` names
/// one that cannot be read.
fn config() -> CliResult<Option<(PathBuf, ClientFile)>> {
    let (path, named) = config_path();
    if !named && !path.exists() {
        return Ok(None);
    }
    match ClientFile::load(&path) {
        Ok(f) => Ok(Some((path, f))),
        Err(e) => Err(CliError { code: USAGE, message: format!("TESTBUS_CONFIG: {e}") }),
    }
}

/// The socket of a control plane running here with its default data dir.
fn local_socket() -> Option<String> {
    let root = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false);
    let dir = match std::env::var_os("TESTBUS_DATA_DIR") {
        Some(d) => PathBuf::from(d),
        None if root => PathBuf::from("/var/lib/testbus"),
        None => std::env::var_os("HOME").map(PathBuf::from)?.join(".local/share/testbus"),
    };
    let sock = dir.join("api.sock");
    sock.exists().then(|| format!("unix:{}", sock.display()))
}

/// The address: the flag's, else the config file's, else the local
/// control plane's socket, else the fallback.
fn address(flag: Option<&str>, file: Option<&ClientFile>) -> String {
    match (flag, file) {
        (Some(s), _) => s.to_string(),
        (None, Some(f)) if !f.server.is_empty() => f.server.clone(),
        _ => local_socket().unwrap_or_else(|| FALLBACK.into()),
    }
}

/// The server address as it will be used (for messages).
pub fn server(flag: Option<&str>) -> String {
    address(flag, config().ok().flatten().as_ref().map(|(_, f)| f))
}

fn tls_of(path: &std::path::Path, f: &ClientFile) -> CliResult<Option<Tls>> {
    if f.certificate_authority.is_empty() {
        return Ok(None);
    }
    if !f.client_certificate.is_empty() {
        check_certificate(path, &f.client_certificate, std::time::SystemTime::now())?;
    }
    let identity = (!f.client_certificate.is_empty()).then_some((f.client_certificate.as_str(), f.client_key.as_str()));
    let cfg = testbus_pki::client_config(&f.certificate_authority, identity)
        .map_err(|e| CliError { code: USAGE, message: format!("{}: {e}", path.display()) })?;
    Ok(Some(Tls::new(cfg)))
}

/// The config's own certificate, checked before it is used: one that has
/// expired, is not valid yet, or is not a user's (the CA's own, say) is
/// said here, with what to do, rather than as the TLS error the server's
/// refusal becomes.
fn check_certificate(path: &std::path::Path, pem: &str, now: std::time::SystemTime) -> CliResult<()> {
    let remake = "make a new one with `testbus-control-plane user create NAME --role ROLE --out FILE` \
                  where the control plane runs";
    let refused = |message: String| CliError { code: PERMISSION, message };
    let id = testbus_pki::identity_of_pem(pem).map_err(|e| {
        refused(format!("{}: client-certificate is not a testbus user's ({e}); {remake}", path.display()))
    })?;
    if id.not_after <= now {
        return Err(refused(format!(
            "your certificate ({}, user {}) expired at {}; {remake}",
            path.display(),
            id.name,
            testbus_proto::time::format(id.not_after)
        )));
    }
    if id.not_before > now {
        return Err(refused(format!(
            "your certificate ({}) is not valid until {} (is this machine's clock right?)",
            path.display(),
            testbus_proto::time::format(id.not_before)
        )));
    }
    Ok(())
}

/// Connects as the config says.
pub async fn connect(flag: Option<&str>) -> CliResult<Client> {
    let file = config()?;
    let server = address(flag, file.as_ref().map(|(_, f)| f));
    let tls = match &file {
        Some((path, f)) => tls_of(path, f)?,
        None => None,
    };
    let https = server.split(",").any(|s| s.trim().starts_with("https://") || s.trim().starts_with("unix+tls:"));
    if https && tls.is_none() {
        let (path, _) = config_path();
        return Err(CliError {
            code: PERMISSION,
            message: format!(
                "no credentials for {server}: run `testbus-control-plane user create NAME --role admin --out {}` \
                 where the control plane runs, or set TESTBUS_CONFIG",
                path.display()
            ),
        });
    }
    Ok(Client::connect_with(&server, tls).await?)
}
