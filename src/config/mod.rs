//! The node's configuration: one documented struct, loaded with the `config` crate from a TOML file
//! layered with `DICOMCHAIN__SECTION__KEY` environment variables, then validated.
//!
//! [`sections`] holds one struct per section with its defaults, [`check`] what serde cannot
//! check (ranges, addresses, AE titles) and the masked rendering of `check-config`.
//!
//! Unknown keys are refused (serde `deny_unknown_fields`), so a typo stops startup with the key's
//! name instead of silently falling back to a default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub node: NodeConfig,
    #[serde(default)]
    pub ledger: LedgerConfig,
    #[serde(default)]
    pub store: StoreConfig,
    /// Known application entities, by a local name: C-MOVE destinations, later access control.
    #[serde(default)]
    pub peers: BTreeMap<String, PeerConfig>,
    /// `[[forward]]`: store-and-forward rules; every stored instance that matches a rule is
    /// queued for its destination.
    #[serde(default)]
    pub forward: Vec<ForwardRule>,
    #[serde(default)]
    pub forwarding: ForwardingConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    #[serde(default)]
    pub security: SecurityConfig,
}

mod check;
mod error;
mod sections;
#[cfg(test)]
mod tests;

use error::invalid;
pub use error::ConfigError;
pub use sections::*;

impl Config {
    /// The key files, each with what it is.
    pub fn key_files(&self) -> Vec<(&Path, &'static str)> {
        let mut keys: Vec<(&Path, &'static str)> = vec![
            (&self.security.master_key_file, "object master key"),
            (&self.ledger.signing_key_file, "checkpoint signing key"),
            (&self.admin.token_file, "admin API token"),
        ];
        if !self.node.tls.key.as_os_str().is_empty() {
            keys.push((&self.node.tls.key, "TLS private key"));
        }
        if let Some(p) = &self.store.s3.secret_key_file {
            keys.push((p, "S3 secret key"));
        }
        keys
    }

    /// The directories that hold patient data: the ledger, the object store (fs backend), the
    /// event spool.
    pub fn state_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = vec![self.ledger.path.clone(), self.ledger.event_spool.clone()];
        if matches!(self.store.backend, StoreBackend::Fs) {
            dirs.push(self.store.fs.root.clone());
        }
        dirs
    }

    /// The access rules of `[peers.*]` and `node.allow_unknown_peers` (addresses were checked
    /// by `validate`).
    pub fn acl(&self) -> crate::acl::Acl {
        let acl = crate::acl::Acl::new(
            self.peers.values().map(|p| {
                (
                    p.ae_title.clone(),
                    p.permissions
                        .clone()
                        .unwrap_or_else(|| crate::acl::Permission::ALL.to_vec())
                        .into_iter()
                        .collect(),
                    p.allowed_addresses
                        .iter()
                        .filter_map(|a| crate::acl::Network::parse(a).ok())
                        .collect(),
                )
            }),
            self.node.allow_unknown_peers,
        );
        self.peers.values().fold(acl, |acl, p| {
            acl.with_tls(&p.ae_title, p.tls_required, &p.tls_names)
        })
    }
}

/// Is this a valid AE title (PS3.5 §6.2: 1–16 characters of the default repertoire, no backslash or
/// control characters, not all spaces)?
pub fn valid_ae_title(ae: &str) -> bool {
    let trimmed = ae.trim();
    !trimmed.is_empty()
        && ae.len() <= 16
        && ae.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'\\')
}

impl Config {
    /// Loads `path` (which must exist), layers `DICOMCHAIN__*` environment variables over it and
    /// validates the result.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(
            path,
            config::Environment::with_prefix("DICOMCHAIN")
                .separator("__")
                .prefix_separator("__"),
        )
    }

    fn load_with_env(path: &Path, env: config::Environment) -> Result<Config, ConfigError> {
        let load_err = |source| ConfigError::Load {
            path: path.to_path_buf(),
            source,
        };
        if !path.exists() {
            return Err(ConfigError::Invalid {
                key: "--config".into(),
                reason: format!("{} does not exist", path.display()),
            });
        }
        let raw = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(env.try_parsing(true))
            .build()
            .map_err(load_err)?;
        let cfg: Config = raw.try_deserialize().map_err(load_err)?;
        cfg.validate()?;
        Ok(cfg)
    }
}
