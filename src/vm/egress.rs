//! The network of a machine that builds an untrusted spec: the mirrors and repositories the
//! spec names, and nothing else.
//!
//! qemu's user network is started with `restrict=on`: the guest reaches no address outside,
//! not the host's loopback through 10.0.2.2, not the cloud metadata address, not the build
//! host's own network. One door is left: [`PROXY_ADDR`] in the guest's network, forwarded
//! (`guestfwd`, one process per connection) to `debimg vm-proxy` on this host, an HTTP proxy
//! that serves one connection and only for the spec's endpoints ([`endpoints`]): a plain
//! request (`GET http://HOST/...`) or a `CONNECT HOST:443` for https. The guest's build sends
//! every download through it (`build --through-proxy`); names are resolved here.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::spec::Spec;

/// Where the proxy answers in the guest's network.
pub const PROXY_ADDR: &str = "10.0.2.100:3128";

/// The largest request head the proxy reads.
const MAX_HEAD: usize = 16 * 1024;

/// One endpoint a build may reach: a host name or address (lowercase) and a port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// The endpoint of an `http://` or `https://` URL; `None` for any other.
pub fn endpoint_of(url: &str) -> Option<Endpoint> {
    let (scheme, rest) = url.split_once("://")?;
    let default = match scheme.to_ascii_lowercase().as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit('@').next()?;
    parse_host_port(host_port, default)
}

/// `HOST`, `HOST:PORT`, `[V6]` or `[V6]:PORT`.
fn parse_host_port(s: &str, default: u16) -> Option<Endpoint> {
    let (host, port) = if let Some(v6) = s.strip_prefix('[') {
        let (host, rest) = v6.split_once(']')?;
        let port = match rest.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if rest.is_empty() => default,
            None => return None,
        };
        (host, port)
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().ok()?),
            None => (s, default),
        }
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    (!host.is_empty()).then_some(Endpoint { host, port })
}

/// Every endpoint the build of `spec` downloads from: its mirror and repositories, the host's
/// apt sources when it asks for `host`. (Its own proxies are not among them: the machine's
/// downloads go through this host's proxy, which reaches the mirrors itself.)
pub fn endpoints(spec: &Spec) -> Result<Vec<Endpoint>> {
    let mut urls: Vec<String> = Vec::new();
    let wants_host =
        spec.mirror == "host" || spec.repos.iter().any(|r| r.uri.as_deref() == Some("host"));
    if wants_host {
        let sources = crate::debian::mirror::read_host_sources(std::path::Path::new("/"))
            .context("reading the host's apt sources")?;
        urls.extend(sources.into_iter().map(|s| s.uri));
    }
    if spec.mirror != "host" {
        urls.push(spec.mirror.clone());
    }
    urls.extend(
        spec.repos
            .iter()
            .filter_map(|r| r.uri.clone())
            .filter(|u| u != "host"),
    );
    let mut out: Vec<Endpoint> = urls.iter().filter_map(|u| endpoint_of(u)).collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// The qemu `-nic` of a machine restricted to `allowed` through `debimg vm-proxy` (`exe`).
pub fn nic(exe: &std::path::Path, allowed: &[Endpoint]) -> Result<String> {
    let exe = exe
        .to_str()
        .context("the debimg binary's path is not UTF-8")?;
    // libslirp splits the command at spaces; qemu's option parser takes `,,` for a comma.
    if exe.contains([' ', ',']) {
        bail!(
            "the debimg binary's path {exe:?} has a space or a comma, which qemu's guestfwd cannot pass"
        );
    }
    let mut cmd = format!("{exe} vm-proxy");
    for e in allowed {
        if e.to_string().contains([' ', ',']) {
            bail!("`{e}` cannot be passed to the machine's proxy");
        }
        cmd.push_str(&format!(" --allow {e}"));
    }
    Ok(format!(
        "user,model=virtio-net-pci,restrict=on,guestfwd=tcp:{PROXY_ADDR}-cmd:{cmd}"
    ))
}

/// What the proxy makes of a request head: where to connect, and whether it is a tunnel.
#[derive(Debug, PartialEq, Eq)]
enum Target {
    Tunnel(Endpoint),
    Forward(Endpoint),
}

/// The target of a request whose head is `head` (the request line first).
fn target(head: &str) -> Option<Target> {
    let line = head.lines().next()?;
    let mut parts = line.split(' ');
    let method = parts.next()?;
    let target = parts.next()?;
    if method == "CONNECT" {
        parse_host_port(target, 443).map(Target::Tunnel)
    } else if target.starts_with("http://") {
        endpoint_of(target).map(Target::Forward)
    } else {
        None
    }
}

/// `debimg vm-proxy`: serves the one connection on standard input and output, to the
/// endpoints in `allowed` (`HOST:PORT`) only.
pub fn serve_one(allowed: &[String]) -> Result<()> {
    use std::os::fd::FromRawFd;
    let allowed: Vec<Endpoint> = allowed
        .iter()
        .map(|a| parse_host_port(a, 80).with_context(|| format!("`{a}` is no HOST:PORT")))
        .collect::<Result<_>>()?;
    // SAFETY: descriptors 0 and 1 are this process's, and nothing else here uses them.
    let (input, output) = unsafe { (std::fs::File::from_raw_fd(0), std::fs::File::from_raw_fd(1)) };
    serve(input, output, &allowed)
}

/// Serves one connection (`input`, `output`) to the endpoints in `allowed`: any other is
/// answered `403` and the connection closed.
fn serve(
    input: impl Read + Send + 'static,
    mut output: impl Write,
    allowed: &[Endpoint],
) -> Result<()> {
    let mut input = BufReader::new(input);
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let n = input
            .by_ref()
            .take((MAX_HEAD - head.len()) as u64)
            .read_until(b'\n', &mut head)?;
        if n == 0 || head.len() >= MAX_HEAD {
            return Ok(());
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let mut refuse = |why: &str| -> Result<()> {
        let body = format!("debimg: {why}\n");
        write!(
            output,
            "HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        )?;
        Ok(())
    };
    let (endpoint, tunnel) = match target(&text) {
        Some(Target::Tunnel(e)) => (e, true),
        Some(Target::Forward(e)) => (e, false),
        None => return refuse("this proxy takes `GET http://...` and `CONNECT host:port` only"),
    };
    if !allowed.contains(&endpoint) {
        return refuse(&format!(
            "{endpoint} is not a mirror or repository of this build's spec"
        ));
    }
    let addrs: Vec<_> = (endpoint.host.as_str(), endpoint.port)
        .to_socket_addrs()
        .with_context(|| format!("resolving {endpoint}"))?
        .collect();
    let upstream = addrs
        .iter()
        .find_map(|a| TcpStream::connect_timeout(a, Duration::from_secs(30)).ok())
        .with_context(|| format!("connecting to {endpoint}"))?;
    let mut up_write = upstream.try_clone()?;
    if tunnel {
        output.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")?;
    } else {
        // Servers take a request in absolute form, as a proxy sends it on.
        up_write.write_all(&head)?;
    }
    let to_upstream = std::thread::spawn(move || {
        let _ = std::io::copy(&mut input, &mut up_write);
        let _ = up_write.shutdown(Shutdown::Write);
    });
    let mut up_read = upstream;
    let _ = std::io::copy(&mut up_read, &mut output);
    output.flush()?;
    // The guest may still be sending; its connection ends with this process.
    if to_upstream.is_finished() {
        let _ = to_upstream.join();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_their_endpoints() {
        let e = |h: &str, p| {
            Some(Endpoint {
                host: h.into(),
                port: p,
            })
        };
        assert_eq!(
            endpoint_of("http://Deb.Example.org/debian"),
            e("deb.example.org", 80)
        );
        assert_eq!(
            endpoint_of("https://u:p@deb.example.org:8443/x"),
            e("deb.example.org", 8443)
        );
        assert_eq!(endpoint_of("http://[2001:db8::1]/d"), e("2001:db8::1", 80));
        assert_eq!(endpoint_of("http://[2001:db8::1]:81"), e("2001:db8::1", 81));
        assert_eq!(endpoint_of("file:///srv/repo"), None);
        assert_eq!(endpoint_of("ftp://x/y"), None);
    }

    #[test]
    fn requests_name_their_targets() {
        let e = |h: &str, p| Endpoint {
            host: h.into(),
            port: p,
        };
        assert_eq!(
            target(
                "GET http://deb.example.org/debian/dists/bookworm/InRelease HTTP/1.1\r\nHost: deb.example.org\r\n\r\n"
            ),
            Some(Target::Forward(e("deb.example.org", 80)))
        );
        assert_eq!(
            target("CONNECT deb.example.org:443 HTTP/1.1\r\n\r\n"),
            Some(Target::Tunnel(e("deb.example.org", 443)))
        );
        assert_eq!(target("GET /relative HTTP/1.1\r\n\r\n"), None);
        assert_eq!(target("GET https://x/ HTTP/1.1\r\n\r\n"), None);
    }

    #[test]
    fn the_nic_is_restricted_to_the_proxy() {
        let line = nic(
            std::path::Path::new("/usr/bin/debimg"),
            &[Endpoint {
                host: "deb.example.org".into(),
                port: 80,
            }],
        )
        .unwrap();
        assert!(line.contains("restrict=on"), "{line}");
        assert!(
            line.ends_with("guestfwd=tcp:10.0.2.100:3128-cmd:/usr/bin/debimg vm-proxy --allow deb.example.org:80"),
            "{line}"
        );
        assert!(nic(std::path::Path::new("/a b/debimg"), &[]).is_err());
    }

    #[test]
    fn the_proxy_forwards_to_allowed_endpoints_only() {
        use std::os::unix::net::UnixStream;
        // An origin on loopback that answers one request.
        let origin = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = origin.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let (mut c, _) = origin.accept().unwrap();
            let mut buf = [0u8; 4096];
            let n = c.read(&mut buf).unwrap();
            let req = String::from_utf8_lossy(&buf[..n]).into_owned();
            c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                .unwrap();
            req
        });
        let allowed = [Endpoint {
            host: "127.0.0.1".into(),
            port,
        }];
        let run = |request: String| {
            let (mut client, proxy) = UnixStream::pair().unwrap();
            let input = proxy.try_clone().unwrap();
            let allowed = allowed.clone();
            let t = std::thread::spawn(move || serve(input, proxy, &allowed));
            client.write_all(request.as_bytes()).unwrap();
            client.shutdown(Shutdown::Write).unwrap();
            let mut answer = String::new();
            client.read_to_string(&mut answer).unwrap();
            t.join().unwrap().unwrap();
            answer
        };
        let refused =
            run("GET http://169.254.169.254/latest/meta-data HTTP/1.1\r\nHost: x\r\n\r\n".into());
        assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
        let refused = run(format!("CONNECT 127.0.0.1:{} HTTP/1.1\r\n\r\n", port + 1));
        assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
        let answer = run(format!(
            "GET http://127.0.0.1:{port}/debian/x HTTP/1.1\r\nHost: x\r\n\r\n"
        ));
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"),
            "{answer}"
        );
        assert!(server.join().unwrap().starts_with("GET http://127.0.0.1:"));
    }
}
