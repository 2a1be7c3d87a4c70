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
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
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

/// What one known AE title may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rights {
    pub permissions: BTreeSet<Permission>,
    /// Empty: any address.
    pub addresses: Vec<Network>,
}

/// Why an association is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("calling AE title {0:?} is not a known peer (node.allow_unknown_peers = false)")]
    UnknownAe(String),
    #[error("calling AE title {ae:?} may not connect from {from}")]
    Address { ae: String, from: IpAddr },
}

/// The access rules, by calling AE title (compared without padding, case-sensitively as
/// PS3.8 compares AE titles).
#[derive(Debug, Clone, Default)]
pub struct Acl {
    peers: BTreeMap<String, Rights>,
    allow_unknown: bool,
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
        }
    }

    /// Whether an association from `ae` at `from` may be accepted.
    pub fn association(&self, ae: &str, from: Option<IpAddr>) -> Result<(), Refusal> {
        let ae = ae.trim();
        match self.peers.get(ae) {
            None if self.allow_unknown => Ok(()),
            None => Err(Refusal::UnknownAe(ae.to_string())),
            Some(r) => match from {
                Some(ip)
                    if !r.addresses.is_empty() && !r.addresses.iter().any(|n| n.contains(ip)) =>
                {
                    Err(Refusal::Address {
                        ae: ae.to_string(),
                        from: ip,
                    })
                }
                _ => Ok(()),
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
        assert_eq!(acl.association("CT1 ", lo), Ok(()));
        assert!(matches!(
            acl.association("STRANGER", lo),
            Err(Refusal::UnknownAe(_))
        ));
        assert!(matches!(
            acl.association("VIEWER", lo),
            Err(Refusal::Address { .. })
        ));
        assert_eq!(
            acl.association("VIEWER", Some("10.9.9.9".parse().unwrap())),
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
        assert_eq!(open.association("STRANGER", lo), Ok(()));
        assert!(open.allows("STRANGER", Permission::Get));
        assert!(
            !open.allows("CT1", Permission::Store),
            "a known AE keeps its own limits"
        );
    }
}
