//! Egress proxy: the proxy URL, `delivery.no_proxy`, an endpoint's `proxy` column, and which way each
//! delivery goes. Pure: the client does the I/O.
//!
//! Deliveries leave through an HTTP proxy so that receivers see a few fixed source addresses they can
//! allow-list. `https://` endpoints are reached through a `CONNECT` tunnel (TLS runs end to end inside it, the
//! certificate verified against the endpoint's host name); `http://` endpoints get absolute-form requests.
//! walhook speaks plain HTTP to the proxy itself, which is what nearly every forward proxy offers.
//!
//! Through a proxy the endpoint's host name is resolved by the proxy, not by walhook, so the network guard
//! can only judge IP-literal hosts here ([`tunnel_target`]); the proxy must refuse private destinations for
//! the SSRF guarantee to hold (README, "Egress proxy"). Proxy URLs may carry a password: nothing here ever
//! prints one, and no error repeats the URL it could not parse.

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine;

use super::guard::{self, Blocked, Cidr, NetworkPolicy};

/// What a proxy URL looks like, for messages.
pub const PROXY_URL_HINT: &str =
    r#"expected a URL like "http://user:password@proxy.internal:3128""#;

/// The value of an endpoint's `proxy` column that sends its deliveries directly, without any proxy.
pub const DIRECT: &str = "direct";

/// A forward proxy: `http://[user[:password]@]host:port`. Equal URLs share pooled connections; `Debug` and
/// `Display` never show the credentials.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ProxyUrl {
    /// A lowercase name or IP address (an IPv6 address without brackets).
    host: String,
    port: u16,
    /// The complete `Proxy-Authorization` value (`Basic …`), when the URL has credentials.
    authorization: Option<String>,
}

/// Why a proxy URL was refused. The messages never quote the URL, which may hold a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyUrlError {
    #[error("it has no scheme; write it as http://host:port")]
    NoScheme,
    #[error(
        "its scheme is {0:?}; walhook reaches the proxy over plain http:// (deliveries to https:// \
         endpoints stay encrypted end to end through the proxy's CONNECT tunnel)"
    )]
    Scheme(String),
    #[error(
        "it has a path, query or fragment; a proxy URL is only http://[user:password@]host:port \
         (percent-encode a '/', '?', '#' or '@' in the user name or password)"
    )]
    Path,
    #[error("it names no host")]
    NoHost,
    #[error("its host {0:?} is not a host name or IP address")]
    Host(String),
    #[error("it names no port; add the proxy's port, like http://proxy.internal:3128")]
    NoPort,
    #[error("its port is not a number from 1 to 65535")]
    Port,
    #[error(
        "its user name or password has a character that must be percent-encoded (a space, a control \
         character, '@', or a '%' not followed by two hex digits)"
    )]
    Credentials,
    #[error(
        "its user name holds a ':' (percent-encoded as %3A); Basic authentication cannot carry it"
    )]
    ColonInUser,
}

impl ProxyUrl {
    pub fn parse(text: &str) -> Result<ProxyUrl, ProxyUrlError> {
        let (scheme, rest) = text.split_once("://").ok_or(ProxyUrlError::NoScheme)?;
        // a scheme has no ':' or '@'; without that test "user:pass@host" would be quoted as a scheme
        if scheme.is_empty()
            || !scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+')
        {
            return Err(ProxyUrlError::NoScheme);
        }
        if !scheme.eq_ignore_ascii_case("http") {
            return Err(ProxyUrlError::Scheme(scheme.to_ascii_lowercase()));
        }
        let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        if !(tail.is_empty() || tail == "/") {
            return Err(ProxyUrlError::Path);
        }
        let (userinfo, hostport) = match authority.rsplit_once('@') {
            Some((userinfo, hostport)) => (Some(userinfo), hostport),
            None => (None, authority),
        };
        let (host, port) = split_host_port(hostport)?;
        let authorization = userinfo.map(basic_authorization).transpose()?;
        Ok(ProxyUrl {
            host,
            port,
            authorization,
        })
    }

    /// The host to resolve and dial (an IPv6 address without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `host:port` (`[v6]:port`), the name of the proxy in messages.
    pub fn address(&self) -> String {
        match self.host.contains(':') {
            true => format!("[{}]:{}", self.host, self.port),
            false => format!("{}:{}", self.host, self.port),
        }
    }

    /// The `Proxy-Authorization` header value, if the URL has credentials. Secret.
    pub fn authorization(&self) -> Option<&str> {
        self.authorization.as_deref()
    }

    /// Whether both name the same proxy (credentials aside).
    pub fn same_address(&self, other: &ProxyUrl) -> bool {
        self.host == other.host && self.port == other.port
    }
}

/// `http://host:port`, with `***` standing for credentials.
impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.authorization {
            Some(_) => write!(f, "http://***@{}", self.address()),
            None => write!(f, "http://{}", self.address()),
        }
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProxyUrl({self})")
    }
}

fn split_host_port(hostport: &str) -> Result<(String, u16), ProxyUrlError> {
    let (host, port) = if let Some(bracketed) = hostport.strip_prefix('[') {
        let (v6, after) = bracketed.split_once(']').ok_or(ProxyUrlError::NoHost)?;
        let ip: std::net::Ipv6Addr = v6
            .parse()
            .map_err(|_| ProxyUrlError::Host(format!("[{v6}]")))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or(ProxyUrlError::Port)?),
        };
        (ip.to_string(), port)
    } else {
        let (host, port) = match hostport.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (hostport, None),
        };
        if host.is_empty() {
            return Err(ProxyUrlError::NoHost);
        }
        let name_like = host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
        if !name_like || host.starts_with(['.', '-']) || host.contains("..") {
            return Err(ProxyUrlError::Host(host.to_string()));
        }
        (host.to_ascii_lowercase(), port)
    };
    let port = port.ok_or(ProxyUrlError::NoPort)?;
    if port.is_empty() {
        return Err(ProxyUrlError::NoPort);
    }
    // u16's parser would accept "+80"
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ProxyUrlError::Port);
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok((host, p)),
        _ => Err(ProxyUrlError::Port),
    }
}

/// `Basic base64(user:password)` from percent-encoded userinfo (RFC 7617).
fn basic_authorization(userinfo: &str) -> Result<String, ProxyUrlError> {
    let bad = |b: &u8| b.is_ascii_control() || *b == b' ' || *b == b'@' || !b.is_ascii();
    if userinfo.as_bytes().iter().any(bad) || !percent_encoding_is_valid(userinfo) {
        return Err(ProxyUrlError::Credentials);
    }
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    let user: Vec<u8> = percent_encoding::percent_decode_str(user).collect();
    if user.contains(&b':') {
        return Err(ProxyUrlError::ColonInUser);
    }
    let mut pair = user;
    pair.push(b':');
    pair.extend(percent_encoding::percent_decode_str(password));
    Ok(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    ))
}

fn percent_encoding_is_valid(text: &str) -> bool {
    let bytes = text.as_bytes();
    bytes.iter().enumerate().all(|(i, b)| {
        *b != b'%'
            || bytes
                .get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    })
}

/// An endpoint's `proxy` column.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum EndpointProxy {
    /// NULL: `delivery.proxy`, unless `delivery.no_proxy` exempts the host.
    #[default]
    Default,
    /// `'direct'`: no proxy, whatever is configured.
    Direct,
    /// This proxy (`delivery.no_proxy` does not apply).
    Via(Arc<ProxyUrl>),
}

impl EndpointProxy {
    pub fn parse(column: Option<&str>) -> Result<EndpointProxy, ProxyUrlError> {
        match column {
            None => Ok(EndpointProxy::Default),
            Some(DIRECT) => Ok(EndpointProxy::Direct),
            Some(url) => ProxyUrl::parse(url).map(|p| EndpointProxy::Via(Arc::new(p))),
        }
    }
}

/// `delivery.no_proxy`: hosts reached directly although `delivery.proxy` is set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NoProxy {
    /// `*`: every host.
    all: bool,
    /// Lowercase names without leading or trailing dots; each matches itself and its subdomains.
    domains: Vec<String>,
    /// Networks matched by IP-literal hosts (names are not resolved for this).
    networks: Vec<Cidr>,
}

impl NoProxy {
    /// Entries: `*`, a domain (`example.com` or `.example.com`, matching it and its subdomains), an IP
    /// address or a network (`10.0.0.0/8`). The error names the entry and what is expected.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<NoProxy, String> {
        let mut no_proxy = NoProxy::default();
        for entry in entries {
            let entry = entry.as_ref().trim();
            if entry == "*" {
                no_proxy.all = true;
            } else if entry.contains('/') || entry.parse::<IpAddr>().is_ok() {
                let network = entry
                    .parse::<Cidr>()
                    .map_err(|e| format!("entry {entry:?}: {e}"))?;
                no_proxy.networks.push(network);
            } else {
                let domain = entry
                    .strip_prefix("*.")
                    .or_else(|| entry.strip_prefix('.'))
                    .unwrap_or(entry)
                    .trim_end_matches('.')
                    .to_ascii_lowercase();
                let valid = !domain.is_empty()
                    && domain
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
                    && !domain.contains("..");
                if !valid {
                    return Err(format!(
                        "entry {entry:?} is not a host name, domain, IP address or network; expected \
                         entries like \"internal.example.com\", \".example.com\", \"10.0.0.0/8\" or \"*\" \
                         (ports are not part of an entry)"
                    ));
                }
                no_proxy.domains.push(domain);
            }
        }
        Ok(no_proxy)
    }

    /// Whether `host` (as written in an endpoint URL) goes direct.
    pub fn matches(&self, host: &str) -> bool {
        if self.all {
            return true;
        }
        match guard::parse_host(host) {
            guard::Host::Ip(ip) => self.networks.iter().any(|n| n.contains(ip)),
            guard::Host::Name(name) => {
                let name = name.trim_end_matches('.').to_ascii_lowercase();
                self.domains.iter().any(|d| {
                    name == *d
                        || name
                            .strip_suffix(d.as_str())
                            .is_some_and(|rest| rest.ends_with('.'))
                })
            }
        }
    }
}

/// The proxy a delivery to `host` goes through, if any: the endpoint's own choice, or else `delivery.proxy`
/// unless `delivery.no_proxy` matches the host.
pub fn route(
    configured: Option<&Arc<ProxyUrl>>,
    no_proxy: &NoProxy,
    endpoint: &EndpointProxy,
    host: &str,
) -> Option<Arc<ProxyUrl>> {
    match endpoint {
        EndpointProxy::Direct => None,
        EndpointProxy::Via(proxy) => Some(proxy.clone()),
        EndpointProxy::Default if no_proxy.matches(host) => None,
        EndpointProxy::Default => configured.cloned(),
    }
}

/// What walhook asks the proxy to reach for an endpoint at `host:port` (the `CONNECT` target, and the
/// authority of an absolute-form request). An IP-literal host (in any spelling the guard recognises) must
/// pass the network policy, and is sent in its canonical form so the proxy connects to the address that was
/// vetted; a name is sent as it is, for the proxy to resolve.
pub fn tunnel_target(policy: &NetworkPolicy, host: &str, port: u16) -> Result<String, Blocked> {
    match guard::parse_host(host) {
        guard::Host::Ip(ip) => {
            policy.permits(ip)?;
            Ok(match ip {
                IpAddr::V4(v4) => format!("{v4}:{port}"),
                IpAddr::V6(v6) => format!("[{v6}]:{port}"),
            })
        }
        guard::Host::Name(name) => Ok(format!("{}:{port}", name.to_ascii_lowercase())),
    }
}

/// The status of a proxy's answer to `CONNECT`: `(code, reason phrase)` from its status line, if it is one.
pub fn connect_status(head: &[u8]) -> Option<(u16, String)> {
    let line = head.split(|b| *b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let rest = line
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| line.strip_prefix("HTTP/1.0 "))?;
    let (code, reason) = rest.split_once(' ').unwrap_or((rest, ""));
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // the phrase is the proxy's text: keep it short and printable in an attempt's error
    let reason: String = reason
        .chars()
        .filter(|c| !c.is_control())
        .take(100)
        .collect();
    Some((code.parse().ok()?, reason))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn basic(pair: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    }

    #[test]
    fn proxy_urls_parse_with_and_without_credentials() {
        let p = ProxyUrl::parse("http://proxy.internal:3128").unwrap();
        assert_eq!(
            (p.host(), p.port(), p.authorization()),
            ("proxy.internal", 3128, None)
        );
        assert_eq!(p.to_string(), "http://proxy.internal:3128");

        let p = ProxyUrl::parse("HTTP://User:pa%40ss%3Aword@Proxy.Internal:8080/").unwrap();
        assert_eq!(p.host(), "proxy.internal");
        assert_eq!(p.authorization(), Some(basic("User:pa@ss:word").as_str()));
        assert_eq!(p.to_string(), "http://***@proxy.internal:8080");
        assert_eq!(format!("{p:?}"), "ProxyUrl(http://***@proxy.internal:8080)");

        let p = ProxyUrl::parse("http://user@127.0.0.1:3128").unwrap();
        assert_eq!(p.authorization(), Some(basic("user:").as_str()));
        assert_eq!(p.address(), "127.0.0.1:3128");
        let p = ProxyUrl::parse("http://:secret@[::1]:3128").unwrap();
        assert_eq!((p.host(), p.address()), ("::1", "[::1]:3128".to_string()));
        assert_eq!(p.authorization(), Some(basic(":secret").as_str()));
        // raw sub-delimiters are allowed in a password
        let p = ProxyUrl::parse("http://u:a!$&'()*+,;=b@h:1").unwrap();
        assert_eq!(p.authorization(), Some(basic("u:a!$&'()*+,;=b").as_str()));
    }

    #[test]
    fn equal_urls_are_one_proxy_and_credentials_tell_them_apart() {
        let a = ProxyUrl::parse("http://u:one@proxy:3128").unwrap();
        let b = ProxyUrl::parse("http://u:two@PROXY:3128/").unwrap();
        assert_ne!(a, b);
        assert!(a.same_address(&b));
        assert_eq!(a, ProxyUrl::parse("http://u:one@proxy:3128/").unwrap());
        assert!(!a.same_address(&ProxyUrl::parse("http://proxy:3129").unwrap()));
    }

    #[test]
    fn malformed_proxy_urls_are_refused_without_repeating_the_password() {
        use ProxyUrlError::*;
        let secret = "hunter2";
        let cases = [
            ("proxy.internal:3128", NoScheme),
            (&format!("u:{secret}@proxy:3128") as &str, NoScheme),
            ("https://proxy:3128", Scheme("https".into())),
            ("socks5://proxy:1080", Scheme("socks5".into())),
            ("http://proxy", NoPort),
            ("http://proxy:", NoPort),
            ("http://[::1]", NoPort),
            ("http://proxy:0", Port),
            ("http://proxy:65536", Port),
            ("http://proxy:+80", Port),
            ("http://proxy:http", Port),
            ("http://[::1]x:80", Port),
            ("http://:3128", NoHost),
            ("http://u:p@:3128", NoHost),
            ("http://", NoHost),
            ("http://[::1:3128", NoHost),
            ("http://pro xy:3128", Host("pro xy".into())),
            ("http://.proxy:3128", Host(".proxy".into())),
            ("http://[nope]:3128", Host("[nope]".into())),
            ("http://proxy:3128/path", Path),
            ("http://proxy:3128?x=1", Path),
            ("http://proxy:3128#f", Path),
            (&format!("http://u:{secret}/x@proxy:3128") as &str, Path),
            (
                &format!("http://u:{secret} x@proxy:3128") as &str,
                Credentials,
            ),
            (
                &format!("http://u:{secret}%zz@proxy:3128") as &str,
                Credentials,
            ),
            (
                &format!("http://u:{secret}%4@proxy:3128") as &str,
                Credentials,
            ),
            (
                &format!("http://u:{secret}@x@proxy:3128") as &str,
                Credentials,
            ),
            ("http://a%3Ab:p@proxy:3128", ColonInUser),
        ];
        for (url, expected) in cases {
            let e = ProxyUrl::parse(url).unwrap_err();
            assert_eq!(e, expected, "{url}");
            assert!(!e.to_string().contains(secret), "{url}: {e}");
        }
    }

    #[test]
    fn endpoint_column_values() {
        assert_eq!(EndpointProxy::parse(None), Ok(EndpointProxy::Default));
        assert_eq!(
            EndpointProxy::parse(Some("direct")),
            Ok(EndpointProxy::Direct)
        );
        let via = EndpointProxy::parse(Some("http://p:1")).unwrap();
        assert_eq!(
            via,
            EndpointProxy::Via(Arc::new(ProxyUrl::parse("http://p:1").unwrap()))
        );
        assert!(EndpointProxy::parse(Some("DIRECT")).is_err());
        assert!(EndpointProxy::parse(Some("")).is_err());
    }

    #[test]
    fn no_proxy_matches_domains_subdomains_and_literal_addresses() {
        let np = NoProxy::parse(&[
            "internal.example.com",
            ".corp.example",
            "*.lab.example",
            "localhost.",
            "10.0.0.0/8",
            "192.0.2.7",
            "fd00::/8",
        ])
        .unwrap();
        for host in [
            "internal.example.com",
            "INTERNAL.example.com.",
            "a.b.internal.example.com",
            "corp.example",
            "x.corp.example",
            "lab.example",
            "y.lab.example",
            "localhost",
            "10.1.2.3",
            "10.0x10.1", // legacy spelling of 10.16.0.1
            "192.0.2.7",
            "[fd12::1]",
            "[::ffff:10.0.0.1]",
        ] {
            assert!(np.matches(host), "{host}");
        }
        for host in [
            "example.com",
            "notinternal.example.com",
            "internal.example.com.evil",
            "xcorp.example",
            "192.0.2.8",
            "11.0.0.1",
            "[fe80::1]",
            "127.0.0.1",
        ] {
            assert!(!np.matches(host), "{host}");
        }
        assert!(NoProxy::parse(&["*"]).unwrap().matches("anything.example"));
        assert!(!NoProxy::default().matches("localhost"));
    }

    #[test]
    fn bad_no_proxy_entries_are_named() {
        let e = NoProxy::parse(&["ok.example", "10.0.0.1/8"]).unwrap_err();
        assert!(e.starts_with("entry \"10.0.0.1/8\": "), "{e}");
        assert!(e.contains("did you mean 10.0.0.0/8?"), "{e}");
        for bad in ["host:8080", "", ".", "a b", "a..b", "http://x"] {
            let e = NoProxy::parse(&[bad]).unwrap_err();
            assert!(
                e.starts_with(&format!("entry {:?}", bad.trim())),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn routes_follow_the_endpoint_then_the_configuration() {
        let configured = Arc::new(ProxyUrl::parse("http://default:3128").unwrap());
        let own = Arc::new(ProxyUrl::parse("http://own:3128").unwrap());
        let np = NoProxy::parse(&["internal.example"]).unwrap();
        let via = |endpoint: &EndpointProxy, host: &str, configured: Option<&Arc<ProxyUrl>>| {
            route(configured, &np, endpoint, host).map(|p| p.host().to_string())
        };
        let default = EndpointProxy::Default;
        let own_route = EndpointProxy::Via(own.clone());
        assert_eq!(
            via(&default, "hooks.example", Some(&configured)).as_deref(),
            Some("default")
        );
        assert_eq!(via(&default, "a.internal.example", Some(&configured)), None);
        assert_eq!(via(&default, "hooks.example", None), None);
        assert_eq!(
            via(&EndpointProxy::Direct, "hooks.example", Some(&configured)),
            None
        );
        assert_eq!(
            via(&own_route, "hooks.example", Some(&configured)).as_deref(),
            Some("own")
        );
        // an endpoint's own proxy is its explicit choice: no_proxy does not apply to it
        assert_eq!(
            via(&own_route, "a.internal.example", None).as_deref(),
            Some("own")
        );
    }

    #[test]
    fn literal_endpoint_hosts_are_vetted_before_they_reach_the_proxy() {
        let policy = NetworkPolicy::default();
        for host in [
            "10.1.2.3",
            "[fd00::5]",
            "169.254.169.254",
            "127.0.0.1",
            "2130706433",
            "[::ffff:192.168.1.1]",
        ] {
            let blocked = tunnel_target(&policy, host, 443).unwrap_err();
            assert!(
                blocked.to_string().contains("delivery.allowed_networks"),
                "{host}: {blocked}"
            );
        }
        assert_eq!(
            tunnel_target(&policy, "8.8.8.8", 443).unwrap(),
            "8.8.8.8:443"
        );
        assert_eq!(
            tunnel_target(&policy, "[2606:4700::1111]", 80).unwrap(),
            "[2606:4700::1111]:80"
        );
        // names are the proxy's to resolve (and to refuse)
        assert_eq!(
            tunnel_target(&policy, "Hooks.Example", 443).unwrap(),
            "hooks.example:443"
        );
        assert_eq!(
            tunnel_target(&policy, "localhost", 443).unwrap(),
            "localhost:443"
        );
        // an allowed literal goes to the proxy in canonical form: the address that was vetted
        let loopback = NetworkPolicy {
            allow_private: false,
            allowed: vec!["127.0.0.0/8".parse().unwrap()],
        };
        assert_eq!(
            tunnel_target(&loopback, "0x7f.1", 8443).unwrap(),
            "127.0.0.1:8443"
        );
        assert!(tunnel_target(&loopback, "10.1.2.3", 443).is_err());
    }

    #[test]
    fn connect_answers_are_read_from_the_status_line() {
        assert_eq!(
            connect_status(b"HTTP/1.1 200 Connection established\r\n\r\n"),
            Some((200, "Connection established".into()))
        );
        assert_eq!(
            connect_status(b"HTTP/1.0 200\r\n\r\n"),
            Some((200, String::new()))
        );
        assert_eq!(
            connect_status(
                b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic\r\n\r\n"
            ),
            Some((407, "Proxy Authentication Required".into()))
        );
        assert_eq!(
            connect_status(b"HTTP/1.1 403 no\x07pe\r\n\r\n"),
            Some((403, "nope".into()))
        );
        for bad in [
            &b"SSH-2.0-OpenSSH\r\n"[..],
            b"HTTP/1.1 20 x\r\n",
            b"HTTP/2 200\r\n",
            b"",
            b"HTTP/1.1 abc\r\n",
        ] {
            assert_eq!(
                connect_status(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
