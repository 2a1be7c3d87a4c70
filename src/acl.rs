//! Who may do what: the calling AE titles the node knows (`[peers.NAME]`), the operations each
//! may ask for, and the addresses each may connect from. An association from an AE title the
//! node does not know is rejected (A-ASSOCIATE-RJ, calling AE title not recognized) unless
//! `node.allow_unknown_peers`, as is one from an address its peer entry does not allow; an
//! operation the calling AE may not ask for is refused with 0124 (Refused: Not Authorized).
//! Pure logic, unit-tested here; `dimse::service` enforces it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde::Deserialize;

/// An operation a peer may be allowed.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Permission {
    /// C-ECHO.
    Echo,
    /// C-STORE to this node.
    Store,
    /// C-FIND.
    Find,
    /// C-MOVE as requester, and receiving instances as a C-MOVE destination.
    Move,
    /// C-GET.
    Get,
}

impl Permission {
    pub const ALL: [Permission; 5] = [
        Permission::Echo,
        Permission::Store,
        Permission::Find,
        Permission::Move,
        Permission::Get,
    ];

    pub fn from_name(name: &str) -> Option<Permission> {
        Permission::ALL
            .into_iter()
            .find(|p| p.name() == name.trim())
    }

    /// Parses "store,find" (the `detail` of a grant or revoke entry).
    pub fn parse_list(list: &str) -> Option<Vec<Permission>> {
        list.split(',').map(Permission::from_name).collect()
    }

    /// "store,find".
    pub fn list(perms: &[Permission]) -> String {
        perms.iter().map(|p| p.name()).collect::<Vec<_>>().join(",")
    }

    pub fn name(self) -> &'static str {
        match self {
            Permission::Echo => "echo",
            Permission::Store => "store",
            Permission::Find => "find",
            Permission::Move => "move",
            Permission::Get => "get",
        }
    }
}

/// An allowed source: one address, or a network in CIDR notation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    addr: IpAddr,
    prefix: u8,
}

impl Network {
    /// Parses `10.1.2.3`, `10.1.0.0/16`, `::1` or `fd00::/8`.
    pub fn parse(s: &str) -> Result<Network, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address or CIDR network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0-{max}"))?,
        };
        // An IPv4-mapped network (::ffff:a.b.c.d/104) is the IPv4 network it maps, since client
        // addresses are compared as IPv4.
        if let IpAddr::V6(v6) = addr {
            if let Some(v4) = v6.to_ipv4_mapped().filter(|_| prefix >= 96) {
                return Ok(Network {
                    addr: IpAddr::V4(v4),
                    prefix: prefix - 96,
                });
            }
        }
        Ok(Network { addr, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// What one known AE title may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rights {
    pub permissions: BTreeSet<Permission>,
    /// Empty: any address.
    pub addresses: Vec<Network>,
    /// Only over DICOM TLS.
    pub tls_required: bool,
    /// Client certificate names (subject CN or DNS SAN) that may use the title; empty = any.
    pub tls_names: Vec<String>,
}

/// How an association's connection came: plain, or TLS with the names of the client
/// certificate the handshake verified (its subject CN and DNS SANs; empty without one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport<'a> {
    Plain,
    Tls { certificate_names: &'a [String] },
}

impl<'a> Transport<'a> {
    /// `None`: plain; `Some(names)`: TLS with these certificate names.
    pub fn of(tls: Option<&'a [String]>) -> Transport<'a> {
        match tls {
            None => Transport::Plain,
            Some(certificate_names) => Transport::Tls { certificate_names },
        }
    }
}

/// Why an association is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("calling AE title {0:?} is not a known peer (node.allow_unknown_peers = false)")]
    UnknownAe(String),
    #[error("calling AE title {ae:?} may not connect from {from}")]
    Address { ae: String, from: IpAddr },
    #[error("calling AE title {0:?} is restricted to addresses and the peer address is unknown")]
    UnknownAddress(String),
    #[error("calling AE title {0:?} may associate only over DICOM TLS")]
    TlsRequired(String),
    #[error("calling AE title {ae:?} is bound to client certificates named {allowed:?}; this one is named {presented:?}")]
    Certificate {
        ae: String,
        allowed: Vec<String>,
        presented: Vec<String>,
    },
}

/// One grant or revocation recorded on the ledger.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Change {
    /// Sequence number of its ledger entry.
    pub seq: u64,
    pub grant: bool,
    pub permissions: Vec<Permission>,
}

/// The access rules, by calling AE title (compared without padding, case-sensitively as
/// PS3.8 compares AE titles): the configuration's baseline, then every grant and revocation on
/// the ledger in order.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    peers: BTreeMap<String, Rights>,
    allow_unknown: bool,
    changes: BTreeMap<String, Vec<Change>>,
}

impl Acl {
    /// Rules from the configuration's peers: (AE title, permissions, allowed addresses).
    pub fn new(
        peers: impl IntoIterator<Item = (String, BTreeSet<Permission>, Vec<Network>)>,
        allow_unknown: bool,
    ) -> Acl {
        // One AE title in several peer entries (several hosts) gets what any of them allows,
        // from any address when one of them does not restrict it.
        let mut map: BTreeMap<String, (Rights, bool)> = BTreeMap::new();
        for (ae, permissions, addresses) in peers {
            let (r, anywhere) = map.entry(ae.trim().to_string()).or_insert((
                Rights {
                    permissions: BTreeSet::new(),
                    addresses: Vec::new(),
                    tls_required: false,
                    tls_names: Vec::new(),
                },
                false,
            ));
            r.permissions.extend(permissions);
            if addresses.is_empty() {
                *anywhere = true;
            }
            r.addresses.extend(addresses);
        }
        let map = map
            .into_iter()
            .map(|(ae, (mut r, anywhere))| {
                if anywhere {
                    r.addresses.clear();
                }
                (ae, r)
            })
            .collect();
        Acl {
            peers: map,
            allow_unknown,
            changes: BTreeMap::new(),
        }
    }

    /// Binds a configured AE title to DICOM TLS (`required`) and, when `names` is not empty, to
    /// client certificates with one of those names (which implies TLS). Over several peer
    /// entries of one title the strictest wins: TLS if any entry asks for it, and the names of
    /// all of them.
    pub fn with_tls(mut self, ae: &str, required: bool, names: &[String]) -> Acl {
        if let Some(r) = self.peers.get_mut(ae.trim()) {
            r.tls_required |= required || !names.is_empty();
            for n in names {
                if !r.tls_names.contains(n) {
                    r.tls_names.push(n.trim().to_string());
                }
            }
        }
        self
    }

    /// Whether `ae` is a configured peer or was made known by a grant or revocation.
    pub fn is_known(&self, ae: &str) -> bool {
        self.peers.contains_key(ae.trim())
    }

    /// Applies a grant or revocation. An AE title the configuration does not know becomes
    /// known, from any address, starting from what unknown AEs may do.
    pub fn apply(&mut self, ae: &str, change: Change) {
        let ae = ae.trim().to_string();
        let start = if self.allow_unknown {
            Permission::ALL.into_iter().collect()
        } else {
            BTreeSet::new()
        };
        let r = self.peers.entry(ae.clone()).or_insert(Rights {
            permissions: start,
            addresses: Vec::new(),
            tls_required: false,
            tls_names: Vec::new(),
        });
        if change.grant {
            r.permissions.extend(change.permissions.iter().copied());
        } else {
            for p in &change.permissions {
                r.permissions.remove(p);
            }
        }
        self.changes.entry(ae).or_default().push(change);
    }

    /// Every known AE title: its effective rights and the ledger changes that made them.
    pub fn entries(&self) -> Vec<(String, Rights, Vec<Change>)> {
        self.peers
            .iter()
            .map(|(ae, r)| {
                (
                    ae.clone(),
                    r.clone(),
                    self.changes.get(ae).cloned().unwrap_or_default(),
                )
            })
            .collect()
    }

    pub fn allow_unknown(&self) -> bool {
        self.allow_unknown
    }

    /// Whether an association from `ae` at `from`, over `transport`, may be accepted.
    pub fn association(
        &self,
        ae: &str,
        from: Option<IpAddr>,
        transport: Transport<'_>,
    ) -> Result<(), Refusal> {
        let ae = ae.trim();
        let r = match self.peers.get(ae) {
            None if self.allow_unknown => return Ok(()),
            None => return Err(Refusal::UnknownAe(ae.to_string())),
            Some(r) => r,
        };
        match transport {
            Transport::Plain if r.tls_required => return Err(Refusal::TlsRequired(ae.to_string())),
            Transport::Tls { certificate_names }
                if !r.tls_names.is_empty()
                    && !certificate_names.iter().any(|n| r.tls_names.contains(n)) =>
            {
                return Err(Refusal::Certificate {
                    ae: ae.to_string(),
                    allowed: r.tls_names.clone(),
                    presented: certificate_names.to_vec(),
                })
            }
            _ => {}
        }
        match r {
            r if r.addresses.is_empty() => Ok(()),
            // An AE restricted to addresses is refused when the address is unknown.
            r => match from {
                Some(ip) if r.addresses.iter().any(|n| n.contains(ip)) => Ok(()),
                Some(ip) => Err(Refusal::Address {
                    ae: ae.to_string(),
                    from: ip,
                }),
                None => Err(Refusal::UnknownAddress(ae.to_string())),
            },
        }
    }

    /// Whether `ae` may ask for (or, for [`Permission::Move`], receive) this operation. Unknown
    /// AE titles may do everything only when unknown peers are allowed.
    pub fn allows(&self, ae: &str, what: Permission) -> bool {
        match self.peers.get(ae.trim()) {
            Some(r) => r.permissions.contains(&what),
            None => self.allow_unknown,
        }
    }
}

/// The rules the running node enforces, changed by grants and revocations while it runs:
/// every check reads the current state, so a change applies to the next operation and to the
/// next sub-operation of a C-MOVE or C-GET in progress.
#[derive(Debug, Default)]
pub struct LiveAcl {
    inner: std::sync::RwLock<Acl>,
}

impl LiveAcl {
    pub fn new(acl: Acl) -> LiveAcl {
        LiveAcl {
            inner: std::sync::RwLock::new(acl),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Acl> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    pub fn association(
        &self,
        ae: &str,
        from: Option<IpAddr>,
        transport: Transport<'_>,
    ) -> Result<(), Refusal> {
        self.read().association(ae, from, transport)
    }

    pub fn is_known(&self, ae: &str) -> bool {
        self.read().is_known(ae)
    }

    pub fn allows(&self, ae: &str, what: Permission) -> bool {
        self.read().allows(ae, what)
    }

    pub fn apply(&self, ae: &str, change: Change) {
        self.inner
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .apply(ae, change)
    }

    pub fn snapshot(&self) -> Acl {
        self.read().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn perms(p: &[Permission]) -> BTreeSet<Permission> {
        p.iter().copied().collect()
    }

    #[test]
    fn networks_match_addresses_and_prefixes() {
        let n = Network::parse("10.1.0.0/16").unwrap();
        assert!(n.contains("10.1.200.3".parse().unwrap()));
        assert!(!n.contains("10.2.0.1".parse().unwrap()));
        assert!(
            n.contains("::ffff:10.1.0.9".parse().unwrap()),
            "IPv4-mapped IPv6"
        );
        let one = Network::parse("127.0.0.1").unwrap();
        assert!(one.contains("127.0.0.1".parse().unwrap()));
        assert!(!one.contains("127.0.0.2".parse().unwrap()));
        assert!(Network::parse("0.0.0.0/0")
            .unwrap()
            .contains("8.8.8.8".parse().unwrap()));
        let v6 = Network::parse("fd00::/8").unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        for bad in ["10.0.0.0/33", "x", "::/129", "10.0.0.0/"] {
            assert!(Network::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_titles_addresses_and_permissions() {
        let acl = Acl::new(
            [
                (
                    "CT1".to_string(),
                    perms(&[Permission::Echo, Permission::Store]),
                    vec![],
                ),
                (
                    "VIEWER".to_string(),
                    perms(&[Permission::Find, Permission::Move]),
                    vec![Network::parse("10.0.0.0/8").unwrap()],
                ),
            ],
            false,
        );
        let lo = Some("127.0.0.1".parse().unwrap());
        assert_eq!(acl.association("CT1 ", lo, Transport::Plain), Ok(()));
        assert!(matches!(
            acl.association("STRANGER", lo, Transport::Plain),
            Err(Refusal::UnknownAe(_))
        ));
        assert!(matches!(
            acl.association("VIEWER", lo, Transport::Plain),
            Err(Refusal::Address { .. })
        ));
        assert_eq!(
            acl.association(
                "VIEWER",
                Some("10.9.9.9".parse().unwrap()),
                Transport::Plain
            ),
            Ok(())
        );
        assert!(acl.allows("CT1", Permission::Store));
        assert!(!acl.allows("CT1", Permission::Find));
        assert!(acl.allows("VIEWER", Permission::Move));
        assert!(!acl.allows("STRANGER", Permission::Echo));
        let open = Acl::new(
            [("CT1".to_string(), perms(&[Permission::Echo]), vec![])],
            true,
        );
        assert_eq!(open.association("STRANGER", lo, Transport::Plain), Ok(()));
        assert!(open.allows("STRANGER", Permission::Get));
        assert!(
            !open.allows("CT1", Permission::Store),
            "a known AE keeps its own limits"
        );
    }

    #[test]
    fn tls_bindings_refuse_plain_and_foreign_certificates() {
        let acl = Acl::new(
            [
                ("STOREONLY".to_string(), perms(&[Permission::Store]), vec![]),
                ("ADMIN".to_string(), perms(&Permission::ALL), vec![]),
                ("LEGACY".to_string(), perms(&[Permission::Echo]), vec![]),
            ],
            false,
        )
        .with_tls("STOREONLY", false, &["storeonly.example".to_string()])
        .with_tls("ADMIN", true, &[])
        .with_tls("LEGACY", false, &[]);
        let lo = Some("127.0.0.1".parse().unwrap());
        let admin_cert = ["ADMIN".to_string()];
        let store_cert = ["modality".to_string(), "storeonly.example".to_string()];
        assert_eq!(
            acl.association("STOREONLY", lo, Transport::Plain),
            Err(Refusal::TlsRequired("STOREONLY".into())),
            "names imply TLS"
        );
        assert!(matches!(
            acl.association(
                "STOREONLY",
                lo,
                Transport::Tls {
                    certificate_names: &admin_cert
                }
            ),
            Err(Refusal::Certificate { .. })
        ));
        assert!(matches!(
            acl.association(
                "STOREONLY",
                lo,
                Transport::Tls {
                    certificate_names: &[]
                }
            ),
            Err(Refusal::Certificate { .. })
        ));
        assert_eq!(
            acl.association(
                "STOREONLY",
                lo,
                Transport::Tls {
                    certificate_names: &store_cert
                }
            ),
            Ok(()),
            "a SAN matches"
        );
        assert!(matches!(
            acl.association("ADMIN", lo, Transport::Plain),
            Err(Refusal::TlsRequired(_))
        ));
        assert_eq!(
            acl.association(
                "ADMIN",
                lo,
                Transport::Tls {
                    certificate_names: &store_cert
                }
            ),
            Ok(()),
            "TLS required, any certificate"
        );
        assert_eq!(acl.association("LEGACY", lo, Transport::Plain), Ok(()));
    }

    #[test]
    fn grants_and_revocations_apply_in_order() {
        let mut acl = Acl::new(
            [("CT1".to_string(), perms(&[Permission::Echo]), vec![])],
            false,
        );
        let change = |seq, grant, p: &[Permission]| Change {
            seq,
            grant,
            permissions: p.to_vec(),
        };
        acl.apply("CT1", change(7, true, &[Permission::Store]));
        assert!(acl.allows("CT1", Permission::Store));
        acl.apply(
            "CT1",
            change(9, false, &[Permission::Store, Permission::Echo]),
        );
        assert!(!acl.allows("CT1", Permission::Store) && !acl.allows("CT1", Permission::Echo));
        // A new AE title becomes known through a grant, from any address.
        acl.apply("NEW", change(11, true, &[Permission::Find]));
        assert_eq!(
            acl.association("NEW", Some("10.0.0.1".parse().unwrap()), Transport::Plain),
            Ok(())
        );
        assert!(acl.allows("NEW", Permission::Find) && !acl.allows("NEW", Permission::Get));
        let entries = acl.entries();
        let ct1 = entries.iter().find(|e| e.0 == "CT1").unwrap();
        assert_eq!(ct1.2.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![7, 9]);
        assert_eq!(
            Permission::parse_list("store,find"),
            Some(vec![Permission::Store, Permission::Find])
        );
        assert_eq!(Permission::parse_list("store,nope"), None);
        // With unknown peers allowed, a revocation limits an AE that was unknown.
        let mut open = Acl::new([], true);
        open.apply("X", change(1, false, &[Permission::Store]));
        assert!(!open.allows("X", Permission::Store) && open.allows("X", Permission::Find));
    }
}
