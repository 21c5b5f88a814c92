//! Fetching `input_images` URLs for the local engine, without letting a client use the gateway
//! to reach what only the gateway can reach (SSRF):
//!
//! * http and https only; the host is resolved once, every address checked, and the connection
//!   pinned to the checked addresses (a DNS answer that changes between check and connect cannot
//!   move it). Only globally reachable unicast addresses are fetched from, as the IANA
//!   special-purpose address registries define them (see [`refused_range`]): loopback, private,
//!   link-local (cloud metadata lives at 169.254.169.254), shared, reserved, documentation,
//!   IPv4-mapped, translated, 6to4, Teredo, discard-only and every other special block are
//!   refused, unless `fetch.allow_networks` lists the network.
//! * Redirects are followed by hand, each hop checked the same way, at most `max_redirects`.
//! * One deadline for all hops and the body; the body is read up to `max_bytes` and no further.
//! * The bytes must be a jpeg, png or webp whose header declares at most `max_pixels` pixels;
//!   `Content-Type` is not trusted.
//!
//! Every refusal is a 400 naming `input_images[i]` and the reason.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use async_trait::async_trait;
use ipnet::IpNet;
use kleingate_backend::{BackendError, InputFetcher};
use reqwest::Url;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FetchConfig {
    /// For all redirects and the body together.
    pub timeout_secs: f64,
    pub max_bytes: usize,
    pub max_redirects: usize,
    /// Largest declared `width * height` accepted (checked on the header, before decoding).
    pub max_pixels: u64,
    /// CIDR networks fetched from even though they are loopback/private/..., e.g. an internal
    /// image store: `["10.20.0.0/16"]`.
    pub allow_networks: Vec<String>,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            timeout_secs: 10.0,
            max_bytes: 16 * 1024 * 1024,
            max_redirects: 3,
            max_pixels: 4096 * 4096,
            allow_networks: Vec::new(),
        }
    }
}

impl FetchConfig {
    /// The sizes and networks; `timeout_secs` is checked with every other span of time in
    /// `Config::validate`.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_bytes == 0 || self.max_pixels == 0 {
            return Err("fetch.max_bytes and fetch.max_pixels must be at least 1".into());
        }
        self.networks().map(|_| ())
    }

    fn networks(&self) -> Result<Vec<IpNet>, String> {
        self.allow_networks
            .iter()
            .map(|n| {
                n.parse::<IpNet>()
                    .or_else(|_| n.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| format!("fetch.allow_networks: `{n}` is not a CIDR network"))
            })
            .collect()
    }
}

/// Why an address may not be fetched from, if it may not.
/// Blocks of the IANA special-purpose registries whose "Globally Reachable" column says True.
/// Every other registered block is refused; no False block lies inside one of these, so "in one
/// of these, or in no registered block" is the registry's answer for the most specific block.
/// A True block IANA adds later stays refused until it is listed here (the safe direction).
const GLOBALLY_REACHABLE: [&str; 14] = [
    "192.0.0.9/32",
    "192.0.0.10/32",
    "192.31.196.0/24",
    "192.52.193.0/24",
    "192.175.48.0/24",
    "64:ff9b::/96",
    "2001:1::1/128",
    "2001:1::2/128",
    "2001:1::3/128",
    "2001:3::/32",
    "2001:4:112::/48",
    "2001:20::/28",
    "2001:30::/28",
    "2620:4f:8000::/48",
];

fn globally_reachable_block(ip: IpAddr) -> bool {
    GLOBALLY_REACHABLE
        .iter()
        .any(|n| n.parse::<IpNet>().map(|n| n.contains(&ip)).unwrap_or(false))
}

/// Why `ip` is not fetched from, `None` when it is a globally reachable unicast address. An
/// allow rule: the address must be outside every block of the IANA IPv4 and IPv6
/// special-purpose address registries that is not globally reachable (the `iprfc` crate's
/// pinned copy of both registries), plus what the registries leave out:
/// * multicast (not in the special-purpose registries);
/// * IPv6 outside global unicast (2000::/3) and NAT64 (64:ff9b::/96): the deprecated
///   IPv4-compatible `::a.b.c.d`, site-local fec0::/10, and space IANA has not allocated;
/// * NAT64 64:ff9b::/96 is globally reachable, but it reaches the IPv4 address in its last 32
///   bits, which must be globally reachable too;
/// * Azure's platform endpoint 168.63.129.16, a public address that answers metadata-like
///   requests from inside any Azure VM.
pub fn refused_range(ip: IpAddr) -> Option<&'static str> {
    if let IpAddr::V6(a) = ip {
        let s = a.segments();
        if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4] {
            let [b0, b1] = s[6].to_be_bytes();
            let [b2, b3] = s[7].to_be_bytes();
            return refused_range(IpAddr::V4(Ipv4Addr::new(b0, b1, b2, b3)))
                .map(|_| "a NAT64 address of an address that is not globally reachable");
        }
        if s[0] & 0xe000 != 0x2000 {
            return Some(describe(ip, "not a global unicast IPv6 address"));
        }
    }
    if ip.is_multicast() {
        return Some("a multicast address");
    }
    if ip == IpAddr::V4(Ipv4Addr::new(168, 63, 129, 16)) {
        return Some("a cloud metadata address");
    }
    if iprfc::RFC6890.contains(&ip) && !globally_reachable_block(ip) {
        return Some(describe(
            ip,
            "a special-purpose address that is not globally reachable (IANA registry)",
        ));
    }
    None
}

/// A refused address's kind, in words a client understands; `otherwise` for the rest.
fn describe(ip: IpAddr, otherwise: &'static str) -> &'static str {
    match ip {
        _ if ip.is_loopback() => "a loopback address",
        _ if ip.is_unspecified() => "an unspecified address",
        _ if ip.is_multicast() => "a multicast address",
        IpAddr::V4(a) if a.is_private() => "a private address",
        IpAddr::V4(a) if a.is_link_local() => {
            "a link-local address (where cloud metadata services live)"
        }
        IpAddr::V6(a) if a.segments()[0] & 0xfe00 == 0xfc00 => "a unique-local (private) address",
        IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80 => "a link-local address",
        _ => otherwise,
    }
}

pub struct SafeFetcher {
    cfg: FetchConfig,
    allow: Vec<IpNet>,
}

/// A refusal for `input_images[index]`.
fn refuse(index: usize, why: impl std::fmt::Display) -> BackendError {
    BackendError::InvalidRequest {
        message: format!("input image {index} was not fetched: {why}"),
        field: Some(format!("input_images[{index}]")),
    }
}

impl SafeFetcher {
    pub fn new(cfg: FetchConfig) -> Result<SafeFetcher, String> {
        let allow = cfg.networks()?;
        Ok(SafeFetcher { cfg, allow })
    }

    fn allowed(&self, ip: IpAddr) -> Result<(), &'static str> {
        match refused_range(ip) {
            Some(why) if !self.allow.iter().any(|n| n.contains(&ip)) => Err(why),
            _ => Ok(()),
        }
    }

    /// Resolve `url`'s host once and keep the addresses that may be fetched from.
    async fn addresses(&self, url: &Url) -> Result<Vec<SocketAddr>, String> {
        let port = url
            .port_or_known_default()
            .ok_or_else(|| "the URL has no port".to_owned())?;
        let candidates: Vec<SocketAddr> = match url.host() {
            Some(url::Host::Ipv4(a)) => vec![SocketAddr::new(a.into(), port)],
            Some(url::Host::Ipv6(a)) => vec![SocketAddr::new(a.into(), port)],
            Some(url::Host::Domain(d)) => tokio::net::lookup_host((d, port))
                .await
                .map_err(|e| {
                    // The resolver's words (and what they say about internal DNS) stay here.
                    tracing::debug!(host = d, error = %e, "input image host does not resolve");
                    not_fetched_name(d)
                })?
                .collect(),
            None => return Err("the URL has no host".into()),
        };
        let mut first_refusal = None;
        let ok: Vec<SocketAddr> = candidates
            .into_iter()
            .filter(|a| match self.allowed(a.ip()) {
                Ok(()) => true,
                Err(why) => {
                    first_refusal.get_or_insert((a.ip(), why));
                    false
                }
            })
            .collect();
        match (ok.is_empty(), first_refusal) {
            (false, _) => Ok(ok),
            (true, Some((ip, why))) => {
                // The address and its kind stay in the log: a client must not be able to use
                // the gateway to learn which internal names exist or what they point to.
                tracing::debug!(host = url.host_str().unwrap_or(""), %ip, why, "input image fetch refused");
                match url.host() {
                    Some(url::Host::Domain(d)) => Err(not_fetched_name(d)),
                    // An address the client wrote itself: say what kind it is.
                    _ => Err(format!(
                        "{} is {why}, which this gateway does not fetch from",
                        url.host_str().unwrap_or("the host")
                    )),
                }
            }
            (true, None) => Err(match url.host() {
                Some(url::Host::Domain(d)) => not_fetched_name(d),
                _ => "the host resolves to no address".into(),
            }),
        }
    }

    async fn fetch_checked(&self, url: &str) -> Result<Vec<u8>, String> {
        let mut url = Url::parse(url).map_err(|e| format!("the URL is malformed: {e}"))?;
        for hop in 0..=self.cfg.max_redirects {
            if !matches!(url.scheme(), "http" | "https") {
                return Err(format!(
                    "only http and https are fetched, not `{}`",
                    url.scheme()
                ));
            }
            let addrs = self.addresses(&url).await?;
            // A client per hop: reqwest pins DNS answers only at build time, and each hop's host
            // must be pinned to the addresses just checked.
            let mut client = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .user_agent(concat!("kleingate/", env!("CARGO_PKG_VERSION")));
            if let Some(host) = url.domain() {
                client = client.resolve_to_addrs(host, &addrs);
            }
            let client = client.build().map_err(|e| e.to_string())?;
            let mut resp = client
                .get(url.clone())
                .send()
                .await
                .map_err(|e| format!("the request failed: {}", plain(&e)))?;
            let status = resp.status();
            if status.is_redirection() {
                let loc = resp
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .ok_or_else(|| format!("a {status} redirect without a Location"))?;
                url = url
                    .join(loc)
                    .map_err(|e| format!("the redirect target is malformed: {e}"))?;
                if hop == self.cfg.max_redirects {
                    return Err(format!("more than {} redirects", self.cfg.max_redirects));
                }
                continue;
            }
            if !status.is_success() {
                return Err(format!("the server answered {status}"));
            }
            let max = self.cfg.max_bytes;
            if resp.content_length().is_some_and(|n| n > max as u64) {
                return Err(format!("the image is over the limit of {max} bytes"));
            }
            let mut body = Vec::new();
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| format!("reading the body failed: {}", plain(&e)))?
            {
                if body.len() + chunk.len() > max {
                    return Err(format!("the image is over the limit of {max} bytes"));
                }
                body.extend_from_slice(&chunk);
            }
            kleingate_protocol::image_check::inspect(&body, self.cfg.max_pixels)
                .map_err(|e| e.0)?;
            return Ok(body);
        }
        Err(format!("more than {} redirects", self.cfg.max_redirects))
    }
}

/// One answer for a host name that does not resolve and one that resolves only to addresses
/// this gateway does not fetch from: telling them apart would answer DNS questions about the
/// internal network.
fn not_fetched_name(host: &str) -> String {
    format!("the host `{host}` does not resolve to an address this gateway fetches from")
}

/// What a client is told about a failed fetch: a fixed phrase. reqwest's own text can carry the
/// URL (with a token in it), the resolved address and the operating system's error, which say
/// more about the gateway's network than a client needs; it goes to the log.
fn plain(e: &reqwest::Error) -> &'static str {
    tracing::debug!(error = %e, "input image fetch failed");
    if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else if e.is_body() || e.is_decode() {
        "the body was cut off"
    } else {
        "the server did not answer properly"
    }
}

#[async_trait]
impl InputFetcher for SafeFetcher {
    async fn fetch(&self, index: usize, url: &str) -> Result<Vec<u8>, BackendError> {
        let limit = Duration::from_secs_f64(self.cfg.timeout_secs);
        match tokio::time::timeout(limit, self.fetch_checked(url)).await {
            Ok(Ok(bytes)) => Ok(bytes),
            Ok(Err(why)) => Err(refuse(index, why)),
            Err(_) => Err(refuse(
                index,
                format!("no complete answer within {} s", self.cfg.timeout_secs),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv6Addr;

    fn refused(s: &str) -> Option<&'static str> {
        refused_range(s.parse().expect("ip"))
    }

    #[test]
    fn internal_ranges_are_refused_public_ones_are_not() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.100.100.200",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "64:ff9b:1::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "::10.0.0.1",
            "168.63.129.16",
            // Not globally reachable by the registry, whatever address they carry.
            "::ffff:8.8.8.8",
            "::ffff:0:808:808",
            "2002:0808:0808::1",
            "100::1",
            "fec0::1",
            "ff0e::1",
            "64:ff9b::7f00:1",
        ] {
            assert!(refused(ip).is_some(), "{ip} must be refused");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700::1111",
            "64:ff9b::808:808",
            "192.0.0.9",
            "2001:4:112::1",
        ] {
            assert_eq!(refused(ip), None, "{ip} is public");
        }
        assert!(refused("169.254.169.254")
            .unwrap_or("")
            .contains("metadata"));
    }

    /// Every block of both IANA special-purpose registries (transcribed in
    /// tests/data/iana-special-purpose.csv): its first, middle and last address are fetched from
    /// exactly when the registry calls the most specific block containing them globally
    /// reachable (N/A counts as not).
    #[test]
    fn the_whole_iana_special_purpose_registries() {
        let text = include_str!("../tests/data/iana-special-purpose.csv");
        let rows: Vec<(IpNet, bool)> = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("block,"))
            .map(|l| {
                let cols: Vec<&str> = l.split(',').collect();
                let net: IpNet = cols[0].parse().expect("CIDR");
                (net, cols[cols.len() - 1] == "true")
            })
            .collect();
        assert_eq!(rows.len(), 51, "both registries, every row");
        let verdict = |ip: IpAddr| {
            rows.iter()
                .filter(|(n, _)| n.contains(&ip))
                .max_by_key(|(n, _)| n.prefix_len())
                .map(|(_, g)| *g)
        };
        let mut checked = 0;
        for (net, _) in &rows {
            let (lo, hi) = (net.network(), net.broadcast());
            let mid = match (lo, hi) {
                (IpAddr::V4(a), IpAddr::V4(b)) => {
                    IpAddr::V4(Ipv4Addr::from(u32::from(a) / 2 + u32::from(b) / 2))
                }
                (IpAddr::V6(a), IpAddr::V6(b)) => {
                    IpAddr::V6(Ipv6Addr::from(u128::from(a) / 2 + u128::from(b) / 2))
                }
                _ => unreachable!("one family per block"),
            };
            for ip in [lo, mid, hi] {
                let Some(global) = verdict(ip) else { continue };
                // NAT64 reaches the IPv4 address inside: judged by that one (tested above).
                if net.to_string() == "64:ff9b::/96" {
                    continue;
                }
                assert_eq!(
                    refused_range(ip).is_none(),
                    global,
                    "{ip} in {net}: registry says globally reachable = {global}"
                );
                checked += 1;
            }
        }
        assert!(checked >= 140, "{checked}");
    }

    #[test]
    fn allow_networks_open_only_what_they_name() {
        let f = SafeFetcher::new(FetchConfig {
            allow_networks: vec!["127.0.0.0/8".into(), "10.20.0.5".into()],
            ..Default::default()
        })
        .expect("valid");
        assert!(f.allowed("127.0.0.1".parse().expect("ip")).is_ok());
        assert!(f.allowed("10.20.0.5".parse().expect("ip")).is_ok());
        assert!(f.allowed("10.20.0.6".parse().expect("ip")).is_err());
        assert!(f.allowed("169.254.169.254".parse().expect("ip")).is_err());
        assert!(FetchConfig {
            allow_networks: vec!["nonsense".into()],
            ..Default::default()
        }
        .validate()
        .is_err());
    }

    #[tokio::test]
    async fn refusals_name_the_image_and_never_connect() {
        let f = SafeFetcher::new(FetchConfig::default()).expect("valid");
        for (url, why) in [
            ("http://169.254.169.254/latest/meta-data/", "metadata"),
            ("http://[::1]:9/", "loopback"),
            (
                "http://localhost:9/x.png",
                "does not resolve to an address this gateway fetches from",
            ),
            (
                "http://no-such-host.invalid/x.png",
                "does not resolve to an address this gateway fetches from",
            ),
            ("http://10.0.0.1/x.png", "private"),
            ("ftp://example.com/x.png", "only http and https"),
            ("http://0x7f.1/", "loopback"),
        ] {
            match f.fetch(2, url).await {
                Err(BackendError::InvalidRequest { message, field }) => {
                    assert_eq!(field.as_deref(), Some("input_images[2]"), "{url}");
                    assert!(message.contains(why), "{url}: {message}");
                }
                other => panic!("{url}: {other:?}"),
            }
        }
    }
}
