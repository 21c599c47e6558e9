//! Redis Sentinel: `redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE`.
//!
//! The primary is discovered from the Sentinels and followed: a watcher asks
//! them every second which server is the primary of the service (checking
//! its `ROLE`), and when the answer changes (Sentinel promoted a replica),
//! the broker switches its command connection and its relay to the new
//! primary, re-subscribing every room. While no primary can be found, the
//! node is not ready. `rediss+sentinel://` connects to the primary over TLS
//! (the Sentinels themselves are reached in plain TCP).

use std::sync::Arc;
use std::time::Duration;

use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{ConnectionAddr, TlsMode};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{redact_url, Inner, COMMAND_TIMEOUT};

/// A parsed Sentinel URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SentinelUrl {
    /// The Sentinels, `(host, port)`.
    pub sentinels: Vec<(String, u16)>,
    /// The monitored service (master) name.
    pub service: String,
    /// TLS to the primary.
    pub tls: bool,
    /// `user:password@` for the primary, if any.
    pub username: Option<String>,
    pub password: Option<String>,
}

/// Parse a Sentinel URL; `None` when `url` is not one, `Some(Err)` when it
/// is one but malformed.
pub(crate) fn parse(url: &str) -> Option<Result<SentinelUrl, String>> {
    let (tls, rest) = if let Some(r) = url.strip_prefix("redis+sentinel://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("rediss+sentinel://") {
        (true, r)
    } else {
        return None;
    };
    Some(parse_rest(tls, rest))
}

fn parse_rest(tls: bool, rest: &str) -> Result<SentinelUrl, String> {
    let usage = "expected redis+sentinel://HOST:PORT[,HOST:PORT...]/SERVICE";
    let (authority, service) = rest.split_once('/').ok_or(usage)?;
    let service = service.trim_end_matches('/');
    if service.is_empty() || service.contains('/') {
        return Err(format!("missing service name: {usage}"));
    }
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (username, password) = match userinfo.map(|u| u.split_once(':')) {
        None => (None, None),
        Some(Some((u, p))) => ((!u.is_empty()).then(|| u.to_owned()), Some(p.to_owned())),
        Some(None) => (None, userinfo.map(str::to_owned)),
    };
    let mut sentinels = Vec::new();
    for hp in hosts.split(',').map(str::trim).filter(|h| !h.is_empty()) {
        let (host, port) = hp
            .rsplit_once(':')
            .ok_or_else(|| format!("sentinel '{hp}' needs a port: {usage}"))?;
        let port = port
            .parse()
            .map_err(|_| format!("sentinel '{hp}': bad port: {usage}"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        sentinels.push((host.to_owned(), port));
    }
    if sentinels.is_empty() {
        return Err(format!("no sentinel given: {usage}"));
    }
    Ok(SentinelUrl {
        sentinels,
        service: service.to_owned(),
        tls,
        username,
        password,
    })
}

/// A Sentinel client for the URL's primary.
pub(crate) fn client(url: &SentinelUrl, ca: Option<&[u8]>) -> redis::RedisResult<SentinelClient> {
    let addrs = url
        .sentinels
        .iter()
        .map(|(h, p)| ConnectionAddr::Tcp(h.clone(), *p));
    let mut b = SentinelClientBuilder::new(addrs, &url.service, SentinelServerType::Master)?;
    if url.tls {
        b = b.set_client_to_redis_tls_mode(TlsMode::Secure);
        if let Some(ca) = ca {
            b = b.set_client_to_redis_certificates(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(ca.to_vec()),
            });
        }
    }
    if let Some(u) = &url.username {
        b = b.set_client_to_redis_username(u);
    }
    if let Some(p) = &url.password {
        b = b.set_client_to_redis_password(p);
    }
    b.build()
}

/// How often the Sentinels are asked for the primary.
const POLL: Duration = Duration::from_secs(1);

/// Follow the primary until `stop`: ask the Sentinels every [`POLL`] and
/// switch the broker over when it changes.
pub(super) async fn follow(
    inner: Arc<Inner>,
    mut sentinel: SentinelClient,
    stop: CancellationToken,
) {
    let mut current: Option<String> = None;
    let mut warned = false;
    loop {
        let found = tokio::time::timeout(COMMAND_TIMEOUT * 2, sentinel.async_get_client()).await;
        match found {
            Ok(Ok(client)) => {
                warned = false;
                let addr = client.get_connection_info().addr().to_string();
                if current.as_deref() != Some(addr.as_str()) {
                    match inner.switch_primary(client) {
                        Ok(()) => {
                            if current.is_some() {
                                inner.metrics.broker_reconnects.inc();
                            }
                            info!(primary = %addr, "redis primary found through sentinel");
                            current = Some(addr);
                        }
                        Err(e) => {
                            warn!(error = %redact_url(&e.to_string()), "cannot use the redis primary")
                        }
                    }
                }
            }
            Ok(Err(e)) if !warned => {
                warned = true;
                warn!(error = %redact_url(&e.to_string()), "no redis primary from the sentinels; not ready until one is found");
            }
            _ => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sentinel_urls_parse() {
        let u = parse("redis+sentinel://a:26379,b:26380/mymaster")
            .unwrap()
            .unwrap();
        assert_eq!(u.sentinels, [("a".into(), 26379), ("b".into(), 26380)]);
        assert_eq!(u.service, "mymaster");
        assert!(!u.tls);
        let u = parse("rediss+sentinel://:pw@[::1]:1/svc").unwrap().unwrap();
        assert!(u.tls);
        assert_eq!(u.password.as_deref(), Some("pw"));
        assert_eq!(u.sentinels, [("::1".into(), 1)]);
        assert!(parse("redis://h:1/").is_none());
        for bad in [
            "redis+sentinel://a:1",
            "redis+sentinel://a:1/",
            "redis+sentinel://a/svc",
            "redis+sentinel://a:x/svc",
            "redis+sentinel:///svc",
        ] {
            assert!(parse(bad).unwrap().is_err(), "{bad}");
        }
    }
}
