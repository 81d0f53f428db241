//! SSRF guard: classifies IP addresses and decides whether deliveries may go to them.
//!
//! Endpoint URLs are written by users of the database, so without a guard anyone who can insert an endpoint
//! could make the daemon POST to its own loopback, the cloud metadata service or the private network.
//! The check is on *addresses*, after name resolution (the caller resolves, then asks [`NetworkPolicy::permits`]
//! for each address it would connect to), because checking host names is defeated by DNS that answers
//! `127.0.0.1`. Pure: no I/O here, so every range can be tested exhaustively.
//!
//! IPv6 forms that carry an IPv4 address (mapped, compatible, 6to4, NAT64) are judged by that IPv4 address,
//! since that is where the packets end up. Teredo (`2001::/32`) is *not* decoded: it lies inside the IETF
//! protocol assignments block `2001::/23`, which is refused as reserved as a whole, apart from the
//! benchmarking range `2001:2::/48` that gets its own class. For the local-use NAT64 prefix `64:ff9b:1::/48`
//! the IPv4 address is read from the last 32 bits (the `/96` layout that DNS64 deployments use); networks
//! that embed it at another offset inside that prefix are not understood.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// What kind of network an address belongs to. Everything but `Public` is refused by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressClass {
    Public,
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// RFC 1918 and the deprecated IPv6 site-local `fec0::/10`.
    Private,
    /// `169.254.0.0/16` (home of the `169.254.169.254` cloud metadata service), `fe80::/10`.
    LinkLocal,
    /// Carrier-grade NAT, `100.64.0.0/10`.
    Cgnat,
    /// `fc00::/7`.
    UniqueLocal,
    Multicast,
    /// `0.0.0.0`, `::` (connecting there reaches the local host on Linux).
    Unspecified,
    Documentation,
    Benchmarking,
    /// `255.255.255.255`.
    Broadcast,
    /// Any other range that is not globally reachable unicast.
    Reserved,
}

impl AddressClass {
    /// (what the address is, what deliveries are refused to), for messages.
    fn phrases(self) -> (&'static str, &'static str) {
        match self {
            AddressClass::Public => ("is public", "public addresses"),
            AddressClass::Loopback => ("is a loopback address", "loopback addresses"),
            AddressClass::Private => ("is in a private network", "private networks"),
            AddressClass::LinkLocal => (
                "is link-local",
                "link-local addresses (where cloud metadata services live)",
            ),
            AddressClass::Cgnat => (
                "is in the carrier-grade NAT range",
                "carrier-grade NAT addresses",
            ),
            AddressClass::UniqueLocal => ("is in a unique-local network", "unique-local networks"),
            AddressClass::Multicast => ("is a multicast address", "multicast addresses"),
            AddressClass::Unspecified => ("is the unspecified address", "the unspecified address"),
            AddressClass::Documentation => ("is in a documentation range", "documentation ranges"),
            AddressClass::Benchmarking => ("is in a benchmarking range", "benchmarking ranges"),
            AddressClass::Broadcast => ("is the broadcast address", "the broadcast address"),
            AddressClass::Reserved => ("is in a reserved range", "reserved ranges"),
        }
    }
}

/// The class of `ip`; see the module documentation for IPv6 forms that embed IPv4.
pub fn classify(ip: IpAddr) -> AddressClass {
    reservation(ip).map_or(AddressClass::Public, |r| r.class)
}

/// Why an address is not public: its class, the range that matched, and the IPv4 address it was judged by
/// when it came embedded in IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Reservation {
    class: AddressClass,
    range: Cidr,
    embedded: Option<Ipv4Addr>,
}

fn reservation(ip: IpAddr) -> Option<Reservation> {
    match ip {
        IpAddr::V4(v4) => v4_reservation(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => v4_reservation(v4).map(|r| Reservation {
                embedded: Some(v4),
                ..r
            }),
            None => v6_reservation(v6),
        },
    }
}

/// Special IPv4 ranges, most specific first (the first match wins).
const V4_RANGES: &[(u32, u8, AddressClass)] = &[
    (0x0000_0000, 32, AddressClass::Unspecified),
    (0x0000_0000, 8, AddressClass::Reserved), // "this network"
    (0x0A00_0000, 8, AddressClass::Private),
    (0x6440_0000, 10, AddressClass::Cgnat),
    (0x7F00_0000, 8, AddressClass::Loopback),
    (0xA9FE_0000, 16, AddressClass::LinkLocal),
    (0xAC10_0000, 12, AddressClass::Private),
    (0xC000_0000, 24, AddressClass::Reserved), // IETF protocol assignments
    (0xC000_0200, 24, AddressClass::Documentation),
    (0xC058_6300, 24, AddressClass::Reserved), // deprecated 6to4 relay anycast
    (0xC0A8_0000, 16, AddressClass::Private),
    (0xC612_0000, 15, AddressClass::Benchmarking),
    (0xC633_6400, 24, AddressClass::Documentation),
    (0xCB00_7100, 24, AddressClass::Documentation),
    (0xE000_0000, 4, AddressClass::Multicast),
    (0xFFFF_FFFF, 32, AddressClass::Broadcast),
    (0xF000_0000, 4, AddressClass::Reserved), // future use
];

fn v4_reservation(ip: Ipv4Addr) -> Option<Reservation> {
    let bits = u32::from(ip);
    V4_RANGES
        .iter()
        .find(|&&(net, prefix, _)| bits & v4_mask(prefix) == net)
        .map(|&(net, prefix, class)| Reservation {
            class,
            range: Cidr {
                addr: IpAddr::V4(net.into()),
                prefix,
            },
            embedded: None,
        })
}

/// Special IPv6 ranges (other than those embedding IPv4), most specific first.
const V6_RANGES: &[(u128, u8, AddressClass)] = &[
    (0, 128, AddressClass::Unspecified),
    (1, 128, AddressClass::Loopback),
    (0x0100_0000_0000_0000 << 64, 64, AddressClass::Reserved), // discard-only
    (0x2001_0002 << 96, 48, AddressClass::Benchmarking),
    (0x2001 << 112, 23, AddressClass::Reserved), // IETF protocol assignments, incl. Teredo 2001::/32
    (0x2001_0db8 << 96, 32, AddressClass::Documentation),
    (0x3fff << 112, 20, AddressClass::Documentation),
    (0x5f00 << 112, 16, AddressClass::Reserved), // SRv6 SIDs
    (0xfc00 << 112, 7, AddressClass::UniqueLocal),
    (0xfe80 << 112, 10, AddressClass::LinkLocal),
    (0xfec0 << 112, 10, AddressClass::Private), // deprecated site-local
    (0xff00 << 112, 8, AddressClass::Multicast),
];

fn v6_reservation(ip: Ipv6Addr) -> Option<Reservation> {
    let bits = u128::from(ip);
    let special = V6_RANGES
        .iter()
        .find(|&&(net, prefix, _)| bits & v6_mask(prefix) == net);
    let (net, prefix, class) = match special {
        Some(&found) => found,
        // Only 2000::/3 is allocated for global unicast; name the unallocated /3 the address falls in.
        None if bits >> 125 != 0b001 => (bits & v6_mask(3), 3, AddressClass::Reserved),
        None => return None,
    };
    Some(Reservation {
        class,
        range: Cidr {
            addr: IpAddr::V6(net.into()),
            prefix,
        },
        embedded: None,
    })
}

/// The IPv4 address an IPv6 address carries, for the forms that deliver packets to it.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from(ip);
    let low32 = Ipv4Addr::from(bits as u32);
    if bits >> 32 == 0xffff {
        return Some(low32); // mapped ::ffff:a.b.c.d
    }
    if bits >> 32 == 0 && bits > 1 {
        return Some(low32); // compatible ::a.b.c.d (deprecated); :: and ::1 are themselves
    }
    if bits >> 32 == 0x0064_ff9b << 64 || bits >> 80 == 0x0064_ff9b_0001 {
        return Some(low32); // NAT64 64:ff9b::/96 and local-use 64:ff9b:1::/48 in its /96 layout
    }
    if bits >> 112 == 0x2002 {
        return Some(Ipv4Addr::from((bits >> 80) as u32)); // 6to4 2002:aabb:ccdd::/48
    }
    None
}

fn v4_mask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn v6_mask(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

/// An IP network such as `10.0.0.0/8` or `2001:db8::/32`. Host bits are always zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Whether `ip` is in the network. IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) match IPv4 networks and
    /// IPv4 addresses match `::ffff:0:0/96`-style networks, since both name the same host.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                u32::from(ip) & v4_mask(self.prefix) == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                u128::from(ip) & v6_mask(self.prefix) == u128::from(net)
            }
            (IpAddr::V4(_), IpAddr::V6(ip)) => ip
                .to_ipv4_mapped()
                .is_some_and(|v4| self.contains(v4.into())),
            (IpAddr::V6(_), IpAddr::V4(ip)) => self.contains(ip.to_ipv6_mapped().into()),
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Why a network could not be parsed; the messages are for `delivery.allowed_networks` entries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not an IP network; expected an address with an optional prefix length, like 10.0.0.0/8 or fd00::/8")]
    Address(String),
    #[error("{input:?} has an invalid prefix length; expected a number from 0 to {max}")]
    Prefix { input: String, max: u8 },
    #[error("{input:?} has bits set after the prefix length; did you mean {suggestion}?")]
    HostBits { input: String, suggestion: Cidr },
}

impl FromStr for Cidr {
    type Err = CidrError;

    /// `addr/prefix`, or a bare address for a single host (`/32`, `/128`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| CidrError::Address(s.to_string()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            // u8's parser would accept "+8"; insist on plain digits.
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => match p.parse() {
                Ok(p) if p <= max => p,
                _ => {
                    return Err(CidrError::Prefix {
                        input: s.to_string(),
                        max,
                    })
                }
            },
            Some(_) => {
                return Err(CidrError::Prefix {
                    input: s.to_string(),
                    max,
                })
            }
        };
        let network = match addr {
            IpAddr::V4(a) => IpAddr::V4((u32::from(a) & v4_mask(prefix)).into()),
            IpAddr::V6(a) => IpAddr::V6((u128::from(a) & v6_mask(prefix)).into()),
        };
        let cidr = Cidr {
            addr: network,
            prefix,
        };
        // A typo such as 10.0.0.1/8 would otherwise silently allow far more than meant.
        if network != addr {
            return Err(CidrError::HostBits {
                input: s.to_string(),
                suggestion: cidr,
            });
        }
        Ok(cidr)
    }
}

/// Which addresses deliveries may go to (`delivery.allow_private_networks`, `delivery.allowed_networks`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkPolicy {
    /// Permit every address, reserved or not.
    pub allow_private: bool,
    /// Networks permitted even when reserved (for example an internal receiver's subnet).
    pub allowed: Vec<Cidr>,
}

impl NetworkPolicy {
    /// Whether a delivery may connect to `ip`. The caller checks every address a host name resolves to.
    pub fn permits(&self, ip: IpAddr) -> Result<(), Blocked> {
        if self.allow_private {
            return Ok(());
        }
        let Some(r) = reservation(ip) else {
            return Ok(());
        };
        // An embedded IPv4 address is where packets go, so an allowed IPv4 network covers it too.
        let listed =
            |c: &Cidr| c.contains(ip) || r.embedded.is_some_and(|v4| c.contains(v4.into()));
        if self.allowed.iter().any(listed) {
            return Ok(());
        }
        Err(Blocked {
            ip,
            class: r.class,
            range: r.range,
            embedded: r.embedded,
        })
    }
}

/// A refused address, with enough detail for a message that tells the operator how to permit it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blocked {
    pub ip: IpAddr,
    pub class: AddressClass,
    /// The reserved range that matched (of the embedded IPv4 address, if any).
    pub range: Cidr,
    /// The IPv4 address the verdict is about when `ip` is an IPv6 form that embeds one.
    pub embedded: Option<Ipv4Addr>,
}

impl fmt::Display for Blocked {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (what, refused) = self.class.phrases();
        match self.embedded {
            Some(v4) => write!(
                f,
                "address {} embeds IPv4 address {v4}, which {what} ({})",
                self.ip, self.range
            )?,
            None => write!(f, "address {} {what} ({})", self.ip, self.range)?,
        }
        write!(
            f,
            "; deliveries to {refused} are refused unless delivery.allow_private_networks = true \
             or the range is listed in delivery.allowed_networks"
        )
    }
}

impl std::error::Error for Blocked {}

/// A URL host: an IP literal to check directly, or a name for the caller to resolve.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Host<'a> {
    Ip(IpAddr),
    Name(&'a str),
}

/// Recognises IP literals in URL host form: `127.0.0.1`, `[::1]`, `[fe80::1%25eth0]`, `fe80::1%eth0` (the
/// zone is dropped; the address alone is classified). Also the legacy IPv4 spellings that `inet_aton` and
/// browsers accept (`127.1`, `0x7f.0.0.1`, `017700000001`, `2130706433`), so that they are refused by their
/// real address rather than passed on as names. Anything else is a [`Host::Name`].
pub fn parse_host(host: &str) -> Host<'_> {
    let inner = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    if let Some(inner) = inner {
        return match v6_without_zone(inner) {
            Some(ip) => Host::Ip(IpAddr::V6(ip)),
            None => Host::Name(host),
        };
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Host::Ip(ip);
    }
    if let Some(ip) = v6_without_zone(host) {
        return Host::Ip(IpAddr::V6(ip));
    }
    match legacy_v4(host) {
        Some(v4) => Host::Ip(IpAddr::V4(v4)),
        None => Host::Name(host),
    }
}

/// An IPv6 literal with an optional zone (`%eth0`, or `%25eth0` as URLs percent-encode it).
fn v6_without_zone(s: &str) -> Option<Ipv6Addr> {
    let (addr, zone) = match s.split_once('%') {
        Some((addr, zone)) => (addr, Some(zone)),
        None => (s, None),
    };
    if zone.is_some_and(str::is_empty) {
        return None;
    }
    addr.parse().ok()
}

/// The numbers-and-dots forms of `inet_aton`: one to four parts, each decimal, octal (leading `0`) or hex
/// (`0x`), the last filling the remaining bytes. One trailing dot is allowed, as in URLs.
fn legacy_v4(host: &str) -> Option<Ipv4Addr> {
    let host = host.strip_suffix('.').unwrap_or(host);
    let parts: Vec<&str> = host.split('.').collect();
    if parts.len() > 4 {
        return None;
    }
    let mut numbers = Vec::with_capacity(parts.len());
    for part in &parts {
        numbers.push(legacy_number(part)?);
    }
    let (last, leading) = numbers.split_last()?;
    if leading.iter().any(|&n| n > 0xff) {
        return None;
    }
    let last_bits = 8 * (4 - leading.len() as u32);
    if u64::from(*last) >= 1u64 << last_bits {
        return None;
    }
    let high = leading
        .iter()
        .enumerate()
        .fold(0u32, |acc, (i, &n)| acc | n << (24 - 8 * i as u32));
    Some(Ipv4Addr::from(high | last))
}

fn legacy_number(part: &str) -> Option<u32> {
    let (digits, radix) =
        if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
            (hex, 16)
        } else if part.len() > 1 && part.starts_with('0') {
            (&part[1..], 8)
        } else {
            (part, 10)
        };
    // "0x" alone is 0 to inet_aton; an empty part otherwise is not a number.
    if digits.is_empty() {
        return (radix == 16).then_some(0);
    }
    if !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u32::from_str_radix(digits, radix).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn assert_class(addr: &str, class: AddressClass) {
        assert_eq!(classify(ip(addr)), class, "{addr}");
    }

    /// For each range: its first and last addresses, and the neighbours just outside it, which are public.
    #[test]
    fn v4_ranges_and_their_boundaries() {
        use AddressClass::*;
        let cases: &[(&str, &str, AddressClass, &str, &str)] = &[
            (
                "10.0.0.0",
                "10.255.255.255",
                Private,
                "9.255.255.255",
                "11.0.0.0",
            ),
            (
                "172.16.0.0",
                "172.31.255.255",
                Private,
                "172.15.255.255",
                "172.32.0.0",
            ),
            (
                "192.168.0.0",
                "192.168.255.255",
                Private,
                "192.167.255.255",
                "192.169.0.0",
            ),
            (
                "127.0.0.0",
                "127.255.255.255",
                Loopback,
                "126.255.255.255",
                "128.0.0.0",
            ),
            (
                "169.254.0.0",
                "169.254.255.255",
                LinkLocal,
                "169.253.255.255",
                "169.255.0.0",
            ),
            (
                "100.64.0.0",
                "100.127.255.255",
                Cgnat,
                "100.63.255.255",
                "100.128.0.0",
            ),
            (
                "192.0.2.0",
                "192.0.2.255",
                Documentation,
                "192.0.1.255",
                "192.0.3.0",
            ),
            (
                "198.51.100.0",
                "198.51.100.255",
                Documentation,
                "198.51.99.255",
                "198.51.101.0",
            ),
            (
                "203.0.113.0",
                "203.0.113.255",
                Documentation,
                "203.0.112.255",
                "203.0.114.0",
            ),
            (
                "198.18.0.0",
                "198.19.255.255",
                Benchmarking,
                "198.17.255.255",
                "198.20.0.0",
            ),
            (
                "192.0.0.0",
                "192.0.0.255",
                Reserved,
                "191.255.255.255",
                "192.0.1.0",
            ),
            (
                "192.88.99.0",
                "192.88.99.255",
                Reserved,
                "192.88.98.255",
                "192.88.100.0",
            ),
            ("0.0.0.1", "0.255.255.255", Reserved, "0.0.0.0", "1.0.0.0"),
        ];
        for &(first, last, class, below, above) in cases {
            assert_class(first, class);
            assert_class(last, class);
            if below != "0.0.0.0" {
                assert_class(below, Public);
            }
            assert_class(above, Public);
        }
        assert_class("0.0.0.0", Unspecified);
        assert_class("169.254.169.254", LinkLocal);
        assert_class("224.0.0.0", Multicast);
        assert_class("239.255.255.255", Multicast);
        assert_class("223.255.255.255", Public);
        assert_class("240.0.0.0", Reserved);
        assert_class("255.255.255.254", Reserved);
        assert_class("255.255.255.255", Broadcast);
        for public in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.215.14",
            "192.0.1.1",
            "223.1.2.3",
        ] {
            assert_class(public, Public);
        }
    }

    #[test]
    fn v6_ranges_and_their_boundaries() {
        use AddressClass::*;
        assert_class("::", Unspecified);
        assert_class("::1", Loopback);
        assert_class("100::", Reserved);
        assert_class("100::ffff:ffff:ffff:ffff", Reserved);
        assert_class("100:0:0:1::", Reserved); // outside 100::/64, but outside 2000::/3 too
        assert_class("fc00::", UniqueLocal);
        assert_class("fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", UniqueLocal);
        assert_class("fd00:ec2::254", UniqueLocal); // an AWS metadata address
        assert_class("fe80::", LinkLocal);
        assert_class("febf:ffff::1", LinkLocal);
        assert_class("fec0::1", Private);
        assert_class("ff00::", Multicast);
        assert_class("ff02::1", Multicast);
        assert_class("2001:db8::", Documentation);
        assert_class("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", Documentation);
        assert_class("2001:db7:ffff::1", Public);
        assert_class("2001:db9::", Public);
        assert_class("3fff::1", Documentation);
        assert_class("3fff:fff::1", Documentation);
        assert_class("3fff:1000::", Public);
        assert_class("2001:2::", Benchmarking);
        assert_class("2001:2:0:ffff::1", Benchmarking);
        assert_class("2001:2:1::", Reserved); // rest of 2001::/23
        assert_class("2001::1", Reserved); // Teredo
        assert_class("2001:1ff:ffff::1", Reserved);
        assert_class("2001:200::1", Public); // first address after 2001::/23
        assert_class("5f00::1", Reserved);
        assert_class("2000::", Public);
        assert_class("3fff:fff:ffff:ffff:ffff:ffff:ffff:ffff", Documentation);
        assert_class("3fff:ffff::", Public);
        assert_class("3ffe::1", Public);
        assert_class("2606:4700:4700::1111", Public);
        assert_class("1fff:ffff::1", Reserved);
        assert_class("4000::1", Reserved);
        assert_class("e000::1", Reserved);
    }

    #[test]
    fn v6_forms_embedding_v4_are_judged_by_the_v4_address() {
        use AddressClass::*;
        let cases = [
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:10.1.2.3", Private),
            ("::ffff:169.254.169.254", LinkLocal),
            ("::ffff:8.8.8.8", Public),
            ("::ffff:0.0.0.0", Unspecified),
            ("::127.0.0.1", Loopback),
            ("::10.0.0.1", Private),
            ("::8.8.8.8", Public),
            ("::0.0.0.2", Reserved),
            ("64:ff9b::127.0.0.1", Loopback),
            ("64:ff9b::192.168.1.1", Private),
            ("64:ff9b::8.8.8.8", Public),
            ("64:ff9b:1::10.0.0.1", Private),
            ("64:ff9b:1:ffff:ffff:ffff:a9fe:a9fe", LinkLocal),
            ("64:ff9b:1::8.8.8.8", Public),
            ("2002:7f00:0001::", Loopback),
            ("2002:a9fe:a9fe::1", LinkLocal),
            ("2002:c0a8:0101:1::1", Private),
            ("2002:0808:0808::1", Public),
            ("2002:e000:0001::", Multicast),
        ];
        for (addr, class) in cases {
            assert_class(addr, class);
        }
        // Just outside the embedding prefixes: ordinary IPv6 rules apply.
        assert_class("::1:0:0:0", Reserved); // not ::/96, not 2000::/3
        assert_class("64:ff9b:0:0:0:1:7f00:1", Reserved); // outside 64:ff9b::/96
        assert_class("64:ff9b:2::7f00:1", Reserved);
        assert_class("2003::7f00:1", Public);
        assert_class("2001:0:7f00:1::", Reserved); // Teredo is refused, not decoded
    }

    #[test]
    fn cidr_parsing_and_display() {
        assert_eq!(cidr("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(cidr("10.1.2.3").to_string(), "10.1.2.3/32");
        assert_eq!(cidr("::1").to_string(), "::1/128");
        assert_eq!(cidr("::1/128").to_string(), "::1/128");
        assert_eq!(cidr("fd00::/8").to_string(), "fd00::/8");
        assert_eq!(cidr("0.0.0.0/0").to_string(), "0.0.0.0/0");
        assert_eq!(cidr("::/0").to_string(), "::/0");
        let errors = [
            "",
            "10.0.0.0/",
            "10.0.0.0/33",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
            "10.0.0.0/8/8",
            "10.0.0.0/ 8",
            "::/129",
            "10.0.0/8",
            "example.com/8",
            "[::1]/128",
            "fe80::1%eth0/64",
            "10.0.0.0/256",
        ];
        for bad in errors {
            assert!(bad.parse::<Cidr>().is_err(), "{bad:?} parsed");
        }
        assert_eq!(
            "10.0.0.1/8".parse::<Cidr>(),
            Err(CidrError::HostBits {
                input: "10.0.0.1/8".into(),
                suggestion: cidr("10.0.0.0/8")
            })
        );
        assert_eq!(
            "10.0.0.1/8".parse::<Cidr>().unwrap_err().to_string(),
            "\"10.0.0.1/8\" has bits set after the prefix length; did you mean 10.0.0.0/8?"
        );
        assert!(matches!(
            "fd00::1/8".parse::<Cidr>(),
            Err(CidrError::HostBits { .. })
        ));
        assert_eq!(
            "10.0.0.0/33".parse::<Cidr>().unwrap_err().to_string(),
            "\"10.0.0.0/33\" has an invalid prefix length; expected a number from 0 to 32"
        );
    }

    #[test]
    fn cidr_contains() {
        let net = cidr("10.1.0.0/16");
        assert!(net.contains(ip("10.1.0.0")));
        assert!(net.contains(ip("10.1.255.255")));
        assert!(!net.contains(ip("10.0.255.255")));
        assert!(!net.contains(ip("10.2.0.0")));
        assert!(net.contains(ip("::ffff:10.1.2.3")));
        assert!(!net.contains(ip("::ffff:10.2.2.3")));
        assert!(!net.contains(ip("::10.1.2.3"))); // compatible form is not the same host
        assert!(cidr("0.0.0.0/0").contains(ip("255.255.255.255")));
        assert!(!cidr("0.0.0.0/0").contains(ip("::1")));
        assert!(cidr("::/0").contains(ip("::1")));
        assert!(cidr("fd00::/8").contains(ip("fd12::1")));
        assert!(!cidr("fd00::/8").contains(ip("fc12::1")));
        assert!(cidr("::ffff:0:0/96").contains(ip("10.0.0.1")));
        assert!(cidr("::ffff:10.0.0.0/104").contains(ip("10.9.9.9")));
        assert!(!cidr("::ffff:10.0.0.0/104").contains(ip("11.0.0.0")));
        assert!(cidr("127.0.0.1").contains(ip("127.0.0.1")));
        assert!(!cidr("127.0.0.1").contains(ip("127.0.0.2")));
    }

    #[test]
    fn default_policy_refuses_every_reserved_class_and_permits_public() {
        let policy = NetworkPolicy::default();
        for addr in [
            "8.8.8.8",
            "2606:4700:4700::1111",
            "::ffff:1.1.1.1",
            "2002:0808:0808::1",
        ] {
            assert_eq!(policy.permits(ip(addr)), Ok(()), "{addr}");
        }
        for addr in [
            "127.0.0.1",
            "10.0.0.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "192.0.2.1",
            "198.18.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "2001:db8::1",
            "2001:2::1",
            "100::1",
            "::ffff:127.0.0.1",
            "64:ff9b::10.0.0.1",
            "2002:0a00:0001::",
        ] {
            assert!(policy.permits(ip(addr)).is_err(), "{addr}");
        }
    }

    #[test]
    fn allow_private_permits_everything() {
        let policy = NetworkPolicy {
            allow_private: true,
            allowed: vec![],
        };
        for addr in [
            "127.0.0.1",
            "10.0.0.1",
            "169.254.169.254",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "::ffff:10.0.0.1",
        ] {
            assert_eq!(policy.permits(ip(addr)), Ok(()), "{addr}");
        }
    }

    #[test]
    fn allowed_networks_permit_matching_reserved_addresses_only() {
        let policy = NetworkPolicy {
            allow_private: false,
            allowed: vec![cidr("10.1.0.0/16"), cidr("fd00:1::/32")],
        };
        assert_eq!(policy.permits(ip("10.1.2.3")), Ok(()));
        assert_eq!(policy.permits(ip("::ffff:10.1.2.3")), Ok(()));
        assert_eq!(policy.permits(ip("64:ff9b::10.1.2.3")), Ok(()));
        assert_eq!(policy.permits(ip("fd00:1::5")), Ok(()));
        assert!(policy.permits(ip("10.2.0.1")).is_err());
        assert!(policy.permits(ip("fd00:2::5")).is_err());
        assert!(policy.permits(ip("127.0.0.1")).is_err());
        assert_eq!(policy.permits(ip("8.8.8.8")), Ok(()));
        let loopback = NetworkPolicy {
            allow_private: false,
            allowed: vec![cidr("127.0.0.1")],
        };
        assert_eq!(loopback.permits(ip("127.0.0.1")), Ok(()));
        assert!(loopback.permits(ip("127.0.0.2")).is_err());
        assert!(loopback.permits(ip("::1")).is_err());
    }

    #[test]
    fn blocked_messages_say_what_and_how_to_permit() {
        let policy = NetworkPolicy::default();
        let message = |addr: &str| policy.permits(ip(addr)).unwrap_err().to_string();
        assert_eq!(
            message("10.0.0.1"),
            "address 10.0.0.1 is in a private network (10.0.0.0/8); deliveries to private networks are refused \
             unless delivery.allow_private_networks = true or the range is listed in delivery.allowed_networks"
        );
        assert_eq!(
            message("::ffff:127.0.0.1"),
            "address ::ffff:127.0.0.1 embeds IPv4 address 127.0.0.1, which is a loopback address (127.0.0.0/8); \
             deliveries to loopback addresses are refused unless delivery.allow_private_networks = true or the \
             range is listed in delivery.allowed_networks"
        );
        assert!(message("169.254.169.254").contains("(169.254.0.0/16); deliveries to link-local addresses (where cloud metadata services live)"));
        assert!(message("fe80::1").starts_with("address fe80::1 is link-local (fe80::/10)"));
        assert!(message("4000::1").starts_with("address 4000::1 is in a reserved range (4000::/3)"));
        assert!(
            message("2001::1").starts_with("address 2001::1 is in a reserved range (2001::/23)")
        );
        let blocked = policy.permits(ip("2002:c0a8:0101::1")).unwrap_err();
        assert_eq!(blocked.class, AddressClass::Private);
        assert_eq!(blocked.range, cidr("192.168.0.0/16"));
        assert_eq!(blocked.embedded, Some(Ipv4Addr::new(192, 168, 1, 1)));
    }

    #[test]
    fn parse_host_recognises_literals_and_zones() {
        let cases = [
            ("127.0.0.1", "127.0.0.1"),
            ("[::1]", "::1"),
            ("::1", "::1"),
            ("[fe80::1%25eth0]", "fe80::1"),
            ("[fe80::1%eth0]", "fe80::1"),
            ("fe80::1%eth0", "fe80::1"),
            ("fe80::1%25eth0", "fe80::1"),
            ("[::ffff:10.0.0.1]", "::ffff:10.0.0.1"),
            // Legacy spellings that resolvers turn into loopback or private addresses.
            ("127.1", "127.0.0.1"),
            ("127.0.1", "127.0.0.1"),
            ("0x7f.0.0.1", "127.0.0.1"),
            ("0X7F.1", "127.0.0.1"),
            ("0177.0.0.1", "127.0.0.1"),
            ("017700000001", "127.0.0.1"),
            ("2130706433", "127.0.0.1"),
            ("0x7f000001", "127.0.0.1"),
            ("10.0x10.1", "10.16.0.1"),
            ("0", "0.0.0.0"),
            ("0x", "0.0.0.0"),
            ("127.0.0.1.", "127.0.0.1"),
            ("169.254.43518", "169.254.169.254"),
            ("4294967295", "255.255.255.255"),
        ];
        for (host, expected) in cases {
            let parsed = parse_host(host);
            assert_eq!(parsed, Host::Ip(ip(expected)), "{host}");
        }
        assert_eq!(classify(ip("fe80::1")), AddressClass::LinkLocal);
        let names = [
            "example.com",
            "localhost",
            "[example.com]",
            "[::1",
            "::1]",
            "[fe80::1%]",
            "[127.0.0.1]",
            "1.2.3.4.5",
            "4294967296",
            "256.0.0.1",
            "1.2.3.256",
            "1.2.65536",
            "08.0.0.1",
            "0x1g.0.0.1",
            "1..2",
            "",
            ".",
            "1.2.3.4..",
            "+1.2.3.4",
            "example%2ecom",
        ];
        for host in names {
            assert_eq!(parse_host(host), Host::Name(host), "{host}");
        }
    }
}
