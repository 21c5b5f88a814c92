//! Fetching `input_images` URLs for the local engine, without letting a client use the gateway
//! to reach what only the gateway can reach (SSRF):
//!
//! * http and https only; the host is resolved once, every address checked, and the connection
//!   pinned to the checked addresses (a DNS answer that changes between check and connect cannot
//!   move it). Loopback, private, link-local (cloud metadata lives at 169.254.169.254), shared,
//!   multicast, reserved and documentation ranges are refused, IPv6 forms of them too (mapped,
//!   NAT64, unique-local), unless `fetch.allow_networks` lists the network.
//! * Redirects are followed by hand, each hop checked the same way, at most `max_redirects`.
//! * One deadline for all hops and the body; the body is read up to `max_bytes` and no further.
//! * The bytes must be a jpeg, png or webp whose header declares at most `max_pixels` pixels;
//!   `Content-Type` is not trusted.
//!
//! Every refusal is a 400 naming `input_images[i]` and the reason.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
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
pub fn refused_range(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(a) => refused_v4(a),
        IpAddr::V6(a) => refused_v6(a),
    }
}

fn refused_v4(a: Ipv4Addr) -> Option<&'static str> {
    let o = a.octets();
    Some(match o {
        _ if a.is_loopback() => "a loopback address",
        _ if a.is_private() => "a private address",
        _ if a.is_link_local() => "a link-local address (where cloud metadata services live)",
        [0, ..] => "an unspecified address",
        _ if a.is_broadcast() || a.is_multicast() => "a broadcast or multicast address",
        [100, b, ..] if (64..128).contains(&b) => "a shared (carrier-grade NAT) address",
        [192, 0, 0, _] => "an IETF protocol address",
        [198, 18 | 19, ..] => "a benchmarking address",
        [192, 0, 2, _] | [198, 51, 100, _] | [203, 0, 113, _] => "a documentation address",
        [240..=255, ..] => "a reserved address",
        // Azure's platform endpoint answers metadata-like requests from any VM.
        [168, 63, 129, 16] => "a cloud metadata address",
        _ => return None,
    })
}

fn refused_v6(a: Ipv6Addr) -> Option<&'static str> {
    if let Some(v4) = a.to_ipv4_mapped() {
        return refused_v4(v4);
    }
    let s = a.segments();
    // NAT64 (64:ff9b::/96, and the local-use 64:ff9b:1::/48) and the deprecated IPv4-compatible
    // form carry an IPv4 address in their last 32 bits, 6to4 (2002::/16) in bits 16-48.
    let v4 = |hi: u16, lo: u16| {
        let [a, b] = hi.to_be_bytes();
        let [c, d] = lo.to_be_bytes();
        Ipv4Addr::new(a, b, c, d)
    };
    if (s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0; 4]) || (s[..6] == [0; 6] && s[6] != 0) {
        return refused_v4(v4(s[6], s[7]));
    }
    // Local-use NAT64 prefixes may be shorter than /96 and put the IPv4 address elsewhere: all of
    // 64:ff9b:1::/48 is refused.
    if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
        return Some("a local NAT64 address");
    }
    if s[0] == 0x2002 {
        return refused_v4(v4(s[1], s[2]));
    }
    // Teredo (2001::/32) hides its IPv4 address (obfuscated); nothing to fetch there.
    if s[0] == 0x2001 && s[1] == 0 {
        return Some("a Teredo tunnel address");
    }
    Some(match s[0] {
        _ if a.is_loopback() => "a loopback address",
        _ if a.is_unspecified() => "an unspecified address",
        x if x & 0xfe00 == 0xfc00 => "a unique-local (private) address",
        x if x & 0xffc0 == 0xfe80 => "a link-local address",
        x if x & 0xffc0 == 0xfec0 => "a site-local address",
        x if x & 0xff00 == 0xff00 => "a multicast address",
        0x2001 if s[1] == 0x0db8 => "a documentation address",
        _ => return None,
    })
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
                .map_err(|e| format!("the host `{d}` does not resolve: {e}"))?
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
                // The address itself stays in the log: a client must not be able to use the
                // gateway to look up internal names.
                tracing::debug!(host = url.host_str().unwrap_or(""), %ip, why, "input image fetch refused");
                Err(format!(
                    "{} is {why}, which this gateway does not fetch from",
                    url.host_str().unwrap_or("the host")
                ))
            }
            (true, None) => Err("the host resolves to no address".into()),
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
                .map_err(|e| format!("the request failed: {}", without_url(&e)))?;
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
                .map_err(|e| format!("reading the body failed: {}", without_url(&e)))?
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

/// reqwest's errors repeat the URL; the client knows it, and it may carry a token.
fn without_url(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    if let Some(u) = e.url() {
        text = text.replace(&format!(" for url ({u})"), "");
    }
    if e.is_timeout() {
        "timed out".into()
    } else {
        text
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
        ] {
            assert!(refused(ip).is_some(), "{ip} must be refused");
        }
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "2002:0808:0808::1",
        ] {
            assert_eq!(refused(ip), None, "{ip} is public");
        }
        assert!(refused("169.254.169.254")
            .unwrap_or("")
            .contains("metadata"));
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
            ("http://localhost:9/x.png", "loopback"),
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
