//! Which addresses `http` steps may call.
//!
//! A workflow author (or a template fed by run input) chooses the URL, so a step could reach
//! the cloud metadata service or link-local devices next to the function. Those are denied
//! by default; loopback and private ranges stay allowed because local services are what
//! `aob dev` and tests call. The check is made on the addresses a name *resolves to* (a
//! name can be pointed at 169.254.169.254 at any time), on every redirect target, and on
//! literal IP URLs, which never reach the resolver.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;

use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Variable listing CIDRs and host names allowed even when denied.
pub const ALLOW_VAR: &str = "AOB_HTTP_ALLOW";
/// Variable listing extra CIDRs and host names to deny.
pub const DENY_VAR: &str = "AOB_HTTP_DENY";

/// An address block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    const fn v4(a: [u8; 4], prefix: u8) -> Cidr {
        Cidr {
            addr: IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])),
            prefix,
        }
    }

    const fn v6(segments: [u16; 8], prefix: u8) -> Cidr {
        let [a, b, c, d, e, f, g, h] = segments;
        Cidr {
            addr: IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h)),
            prefix,
        }
    }

    /// Parses `10.0.0.0/8`, `fe80::/10`, or a bare address (a block of one).
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .trim_matches(|c| c == '[' || c == ']')
            .parse()
            .map_err(|_| format!("`{text}` is not an IP address or CIDR block"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("`{text}`: the prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }

    /// True when `ip` is inside the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
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

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Blocks denied by default, most specific first so the reason names the best match.
const DEFAULT_DENY: &[(Cidr, &str)] = &[
    (Cidr::v4([169, 254, 169, 254], 32), "cloud metadata"),
    (Cidr::v4([100, 100, 100, 200], 32), "cloud metadata"),
    (
        Cidr::v6([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254], 128),
        "cloud metadata",
    ),
    (Cidr::v4([169, 254, 0, 0], 16), "link-local"),
    (Cidr::v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10), "link-local"),
    // Connecting to 0.0.0.0 reaches the local host on Linux.
    (Cidr::v4([0, 0, 0, 0], 8), "unspecified"),
    (Cidr::v6([0, 0, 0, 0, 0, 0, 0, 0], 128), "unspecified"),
];

/// The IPv4 address an IPv6 address stands for (IPv4-mapped `::ffff:a.b.c.d`, or NAT64
/// `64:ff9b::a.b.c.d`), so `::ffff:169.254.169.254` is judged as 169.254.169.254.
fn embedded_v4(ip: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = ip else { return None };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    let s = v6.segments();
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        let [.., a, b, c, d] = v6.octets();
        return Some(Ipv4Addr::new(a, b, c, d));
    }
    None
}

/// Why an address is denied by default, if it is.
pub fn default_denial(ip: IpAddr) -> Option<&'static str> {
    let v4 = embedded_v4(ip).map(IpAddr::V4);
    DEFAULT_DENY
        .iter()
        .find(|(net, _)| net.contains(ip) || v4.is_some_and(|v| net.contains(v)))
        .map(|(_, why)| *why)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    Net(Cidr),
    Host(String),
}

impl Rule {
    fn parse(text: &str) -> Result<Rule, String> {
        let t = text.trim();
        if t.contains('/') || t.parse::<IpAddr>().is_ok() || t.starts_with('[') {
            return Cidr::parse(t).map(Rule::Net);
        }
        let valid = !t.is_empty()
            && t.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.' || c == '_');
        if !valid {
            return Err(format!("`{t}` is neither a CIDR block nor a host name"));
        }
        Ok(Rule::Host(t.trim_end_matches('.').to_ascii_lowercase()))
    }

    fn matches(&self, host: &str, ip: Option<IpAddr>) -> bool {
        match self {
            Rule::Host(h) => host_eq(h, host),
            Rule::Net(net) => ip.is_some_and(|ip| {
                net.contains(ip) || embedded_v4(ip).is_some_and(|v| net.contains(IpAddr::V4(v)))
            }),
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rule::Net(n) => n.fmt(f),
            Rule::Host(h) => f.write_str(h),
        }
    }
}

fn host_eq(rule: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.');
    rule.eq_ignore_ascii_case(host)
}

/// The addresses `http` steps may call: the default denials, plus `AOB_HTTP_DENY`, minus
/// `AOB_HTTP_ALLOW` (an allowed host or block wins over every denial).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    allow: Vec<Rule>,
    deny: Vec<Rule>,
}

/// A call the policy refuses. Its message names the host, the address, why, and how to
/// allow it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.message())]
pub struct Denied {
    /// Host as written in the URL.
    pub host: String,
    /// The refused address (absent when the host name itself is denied).
    pub addr: Option<IpAddr>,
    /// Why: `cloud metadata`, `link-local`, `unspecified`, or the `AOB_HTTP_DENY` entry.
    pub reason: String,
}

impl Denied {
    fn message(&self) -> String {
        let what = match self.addr {
            Some(a) if a.to_string() == self.host.trim_matches(|c| c == '[' || c == ']') => {
                format!("address {a}")
            }
            Some(a) => format!("host `{}` (address {a})", self.host),
            None => format!("host `{}`", self.host),
        };
        format!(
            "{what} is denied to http steps ({}); to allow it, add `{}` to {ALLOW_VAR}",
            self.reason,
            self.addr.map_or(self.host.clone(), |a| a.to_string())
        )
    }
}

impl Policy {
    /// From `AOB_HTTP_ALLOW` and `AOB_HTTP_DENY`.
    pub fn from_env() -> Result<Policy, String> {
        let var = |name| std::env::var(name).unwrap_or_default();
        Policy::parse(&var(ALLOW_VAR), &var(DENY_VAR))
    }

    /// From the two comma-separated lists of CIDR blocks, addresses and host names.
    pub fn parse(allow: &str, deny: &str) -> Result<Policy, String> {
        let list = |text: &str, var: &str| {
            text.split(',')
                .filter(|t| !t.trim().is_empty())
                .map(|t| Rule::parse(t).map_err(|e| format!("{var}: {e}")))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(Policy {
            allow: list(allow, ALLOW_VAR)?,
            deny: list(deny, DENY_VAR)?,
        })
    }

    fn allowed(&self, host: &str, ip: Option<IpAddr>) -> bool {
        self.allow.iter().any(|r| r.matches(host, ip))
    }

    /// Checks one address `host` resolved to (or is).
    pub fn check_addr(&self, host: &str, ip: IpAddr) -> Result<(), Denied> {
        if self.allowed(host, Some(ip)) {
            return Ok(());
        }
        let reason = match self.deny.iter().find(|r| r.matches(host, Some(ip))) {
            Some(rule) => format!("{DENY_VAR} has `{rule}`"),
            None => match default_denial(ip) {
                Some(why) => format!("{why} address"),
                None => return Ok(()),
            },
        };
        Err(Denied {
            host: host.to_string(),
            addr: Some(ip),
            reason,
        })
    }

    /// Checks a URL before it is requested: a literal address directly, a name against
    /// the host rules (its addresses are checked when it is resolved).
    pub fn check_url(&self, url: &Url) -> Result<(), Denied> {
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.check_addr(&ip.to_string(), IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check_addr(&ip.to_string(), IpAddr::V6(ip)),
            Some(url::Host::Domain(name)) => {
                if self.allowed(name, None) {
                    return Ok(());
                }
                match self.deny.iter().find(|r| r.matches(name, None)) {
                    Some(rule) => Err(Denied {
                        host: name.to_string(),
                        addr: None,
                        reason: format!("{DENY_VAR} has `{rule}`"),
                    }),
                    None => Ok(()),
                }
            }
            None => Ok(()),
        }
    }

    /// The allowed addresses among those `host` resolved to; when none is, the denial of
    /// the first.
    pub fn filter(&self, host: &str, addrs: Vec<IpAddr>) -> Result<Vec<IpAddr>, Denied> {
        let mut first_denial = None;
        let mut kept = Vec::with_capacity(addrs.len());
        for ip in addrs {
            match self.check_addr(host, ip) {
                Ok(()) => kept.push(ip),
                Err(d) => {
                    first_denial.get_or_insert(d);
                }
            }
        }
        match (kept.is_empty(), first_denial) {
            (true, Some(d)) => Err(d),
            _ => Ok(kept),
        }
    }
}

/// Turns a host name into addresses. The system resolver in production; a name table in
/// tests, since no real resolver can be told to answer with a link-local address.
pub trait Lookup: Send + Sync + 'static {
    /// The addresses of `host`.
    fn lookup(
        &self,
        host: &str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send>>;
}

/// The operating system's resolver (`getaddrinfo`, through tokio).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemLookup;

impl Lookup for SystemLookup {
    fn lookup(
        &self,
        host: &str,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Vec<IpAddr>>> + Send>> {
        let host = host.to_string();
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host.as_str(), 0)).await?;
            Ok(addrs.map(|a| a.ip()).collect())
        })
    }
}

/// The resolver given to the HTTP client: resolves, then drops denied addresses, so the
/// connection can only go where the policy allows, whatever the name says today.
pub(crate) struct GuardedResolver {
    pub(crate) policy: Arc<Policy>,
    pub(crate) lookup: Arc<dyn Lookup>,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        let lookup = self.lookup.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let found = lookup.lookup(&host).await?;
            let kept = policy.filter(&host, found)?;
            let addrs: Addrs = Box::new(kept.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

/// Follows up to 10 redirects, each checked like the first URL (a redirect to a literal
/// address never reaches the resolver).
pub(crate) fn redirect_policy(policy: Arc<Policy>) -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(move |attempt| match policy.check_url(attempt.url()) {
        Ok(()) => reqwest::redirect::Policy::default().redirect(attempt),
        Err(denied) => attempt.error(denied),
    })
}

/// The denial somewhere in an error's chain of sources, if it is one.
pub fn find_denial<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a Denied> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(d) = err.downcast_ref::<Denied>() {
            return Some(d);
        }
        cur = err.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn metadata_link_local_and_unspecified_are_denied_by_default() {
        for (addr, why) in [
            ("169.254.169.254", "cloud metadata"),
            ("100.100.100.200", "cloud metadata"),
            ("fd00:ec2::254", "cloud metadata"),
            ("169.254.0.1", "link-local"),
            ("169.254.255.255", "link-local"),
            ("fe80::1", "link-local"),
            ("febf::1", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("::", "unspecified"),
            ("::ffff:169.254.169.254", "cloud metadata"),
            ("64:ff9b::a9fe:a9fe", "cloud metadata"),
            ("::ffff:169.254.3.4", "link-local"),
        ] {
            assert_eq!(default_denial(ip(addr)), Some(why), "{addr}");
        }
    }

    #[test]
    fn loopback_private_and_public_addresses_are_allowed_by_default() {
        for addr in [
            "127.0.0.1",
            "::1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "100.100.100.201",
            "169.253.255.255",
            "169.255.0.0",
            "fd00:ec2::253",
            "fec0::1",
            "93.184.216.34",
            "2606:2800:220:1::1",
            "::ffff:127.0.0.1",
        ] {
            assert_eq!(default_denial(ip(addr)), None, "{addr}");
        }
    }

    #[test]
    fn cidr_blocks_parse_and_contain() {
        let net = Cidr::parse("10.0.0.0/8").unwrap();
        assert!(net.contains(ip("10.255.0.1")));
        assert!(!net.contains(ip("11.0.0.1")));
        assert!(!net.contains(ip("::ffff:10.0.0.1")), "families do not mix");
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("::/0").unwrap().contains(ip("fe80::1")));
        assert!(Cidr::parse("fd00::/8").unwrap().contains(ip("fd12::1")));
        assert!(Cidr::parse("[::1]").unwrap().contains(ip("::1")));
        assert_eq!(Cidr::parse("1.2.3.4").unwrap().to_string(), "1.2.3.4/32");
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("10.0.0/8").is_err());
    }

    #[test]
    fn allow_wins_and_deny_adds() {
        let p = Policy::parse(
            "169.254.169.254, metadata.internal",
            "10.0.0.0/8,evil.example",
        )
        .unwrap();
        assert!(
            p.check_addr("169.254.169.254", ip("169.254.169.254"))
                .is_ok()
        );
        assert!(p.check_addr("metadata.internal", ip("169.254.1.1")).is_ok());
        assert!(p.check_addr("x", ip("169.254.1.1")).is_err());
        let d = p.check_addr("db.local", ip("10.2.3.4")).unwrap_err();
        assert_eq!(d.reason, "AOB_HTTP_DENY has `10.0.0.0/8`");
        let d = p
            .check_url(&Url::parse("http://Evil.Example./x").unwrap())
            .unwrap_err();
        assert_eq!(d.addr, None);
        assert!(
            p.check_url(&Url::parse("http://ok.example/").unwrap())
                .is_ok()
        );
        assert!(
            Policy::parse("10.0.0.0/99", "")
                .unwrap_err()
                .contains(ALLOW_VAR)
        );
        assert!(
            Policy::parse("", "bad host!")
                .unwrap_err()
                .contains(DENY_VAR)
        );
        assert_eq!(Policy::parse(" , ", "").unwrap(), Policy::default());
    }

    #[test]
    fn literal_urls_are_checked_before_any_request() {
        let p = Policy::default();
        let d = p
            .check_url(&Url::parse("http://169.254.169.254/latest/meta-data").unwrap())
            .unwrap_err();
        assert_eq!(
            d.to_string(),
            "address 169.254.169.254 is denied to http steps (cloud metadata address); to allow it, add `169.254.169.254` to AOB_HTTP_ALLOW"
        );
        assert!(
            p.check_url(&Url::parse("http://[fe80::1]/").unwrap())
                .is_err()
        );
        assert!(
            p.check_url(&Url::parse("http://0.0.0.0:8080/").unwrap())
                .is_err()
        );
        assert!(
            p.check_url(&Url::parse("http://127.0.0.1:8080/").unwrap())
                .is_ok()
        );
    }

    #[test]
    fn resolved_addresses_are_filtered() {
        let p = Policy::default();
        let kept = p
            .filter("mixed.example", vec![ip("169.254.169.254"), ip("10.0.0.5")])
            .unwrap();
        assert_eq!(kept, vec![ip("10.0.0.5")]);
        let d = p
            .filter("rebound.example", vec![ip("169.254.10.10")])
            .unwrap_err();
        assert_eq!(
            d.to_string(),
            "host `rebound.example` (address 169.254.10.10) is denied to http steps (link-local address); to allow it, add `169.254.10.10` to AOB_HTTP_ALLOW"
        );
    }
}
