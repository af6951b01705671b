//! Published ports.
//!
//! `docker run -p 8080:80` makes host port 8080 forward to port 80 of the
//! container's address. As docker-proxy does, the daemon runs one userland
//! [`PortProxy`] per published port and protocol:
//! - TCP: every accepted connection gets its own connection to the target,
//!   and bytes are copied both ways; when one side stops sending, the other
//!   side's write half is shut down (half-close), and the pair ends when both
//!   directions have. A connection whose target cannot be reached is closed.
//! - UDP: each client address is a flow with its own socket connected to the
//!   target; the target's replies go back to that client from the listening
//!   socket. A flow with no datagram either way for [`UDP_FLOW_IDLE_TIMEOUT`]
//!   is dropped.
//!
//! Sockets towards the target can carry a firewall mark (`SO_MARK`), so the
//! daemon's firewall can tell proxied traffic apart.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;

/// A UDP flow with no datagram in either direction for this long is dropped.
pub const UDP_FLOW_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// UDP flows carried at the same time by one proxy; datagrams that would open more are dropped.
const MAX_UDP_FLOWS: usize = 1024;

/// Pending connections the TCP listener queues before they are accepted.
const TCP_BACKLOG: i32 = 1024;

/// The largest UDP payload there is.
const MAX_DATAGRAM: usize = 65535;

/// A transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// TCP: connections.
    Tcp,
    /// UDP: datagrams.
    Udp,
}

impl Proto {
    /// The protocol's name as Docker writes it in port specs (`80/tcp`): `tcp` or `udp`.
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A protocol name that is neither `tcp` nor `udp`.
#[derive(Debug, thiserror::Error)]
#[error("unknown protocol {0:?}: expected tcp or udp")]
pub struct UnknownProto(pub String);

impl FromStr for Proto {
    type Err = UnknownProto;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            _ => Err(UnknownProto(s.to_string())),
        }
    }
}

/// A userland proxy for one published port: forwards what comes to its listening address to a
/// container's address.
///
/// Dropping it stops listening and closes the connections and flows it carries: its tasks are
/// cancelled, which the runtime carries out at once on a multi-threaded runtime, or at the
/// dropping task's next await on a current-thread one.
pub struct PortProxy {
    proto: Proto,
    local_addr: SocketAddr,
    target: SocketAddr,
    task: JoinHandle<()>,
}

impl PortProxy {
    /// Binds `listen` now (port 0 picks a free port; errors such as AddrInUse come back here) and forwards every TCP
    /// connection / UDP flow to `target`. Outgoing sockets to the target carry firewall mark `mark` (SO_MARK) when
    /// it is Some, so the daemon's firewall can tell proxied traffic apart.
    ///
    /// Setting a mark needs CAP_NET_ADMIN: without it, the error comes back here too.
    pub async fn start(
        proto: Proto,
        listen: SocketAddr,
        target: SocketAddr,
        mark: Option<u32>,
    ) -> io::Result<PortProxy> {
        Self::start_with_idle_timeout(proto, listen, target, mark, UDP_FLOW_IDLE_TIMEOUT).await
    }

    /// [`PortProxy::start`] with UDP flows dropped after `idle` instead of [`UDP_FLOW_IDLE_TIMEOUT`].
    async fn start_with_idle_timeout(
        proto: Proto,
        listen: SocketAddr,
        target: SocketAddr,
        mark: Option<u32>,
        idle: Duration,
    ) -> io::Result<PortProxy> {
        // Make one outgoing socket now, so that a mark the daemon may not set fails the start
        // rather than every connection after it.
        drop(outgoing_socket(proto, target, mark)?);
        let (local_addr, task) = match proto {
            Proto::Tcp => {
                let listener = tcp_listener(listen).map_err(|err| {
                    with_context(err, format!("listening on {listen}/tcp for {target}"))
                })?;
                let local_addr = listener.local_addr()?;
                (local_addr, tokio::spawn(serve_tcp(listener, target, mark)))
            }
            Proto::Udp => {
                let socket = udp_listener(listen).map_err(|err| {
                    with_context(err, format!("listening on {listen}/udp for {target}"))
                })?;
                let local_addr = socket.local_addr()?;
                (
                    local_addr,
                    tokio::spawn(serve_udp(Arc::new(socket), target, mark, idle)),
                )
            }
        };
        tracing::debug!(%proto, %local_addr, %target, "port proxy started");
        Ok(PortProxy {
            proto,
            local_addr,
            target,
            task,
        })
    }

    /// The address the proxy listens on (with the port picked when it was asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The protocol the proxy forwards.
    pub fn proto(&self) -> Proto {
        self.proto
    }

    /// The address the proxy forwards to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }
}

impl Drop for PortProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `err` with what was being done when it happened, keeping its kind.
fn with_context(err: io::Error, context: String) -> io::Error {
    io::Error::new(err.kind(), format!("{context}: {err}"))
}

/// A non-blocking socket of `proto` towards `target`, not yet connected, carrying firewall mark
/// `mark` when it is Some.
fn outgoing_socket(proto: Proto, target: SocketAddr, mark: Option<u32>) -> io::Result<Socket> {
    let (kind, protocol) = match proto {
        Proto::Tcp => (Type::STREAM, Protocol::TCP),
        Proto::Udp => (Type::DGRAM, Protocol::UDP),
    };
    let socket = Socket::new(Domain::for_address(target), kind, Some(protocol))?;
    if let Some(mark) = mark {
        socket
            .set_mark(mark)
            .map_err(|err| with_context(err, format!("setting firewall mark {mark:#x}")))?;
    }
    socket.set_nonblocking(true)?;
    Ok(socket)
}

/// A TCP listener on `addr` with SO_REUSEADDR, as docker-proxy sets it, so that a port freed a
/// moment ago (connections in TIME_WAIT) can be published again at once.
fn tcp_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(TCP_BACKLOG)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

/// A UDP socket bound on `addr`.
fn udp_listener(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// A TCP connection to `target`, from a socket carrying `mark`.
async fn connect_tcp(target: SocketAddr, mark: Option<u32>) -> io::Result<TcpStream> {
    let socket = outgoing_socket(Proto::Tcp, target, mark)?;
    TcpSocket::from_std_stream(socket.into())
        .connect(target)
        .await
}

/// Accepts connections on `listener` and relays each to its own connection to `target`.
async fn serve_tcp(listener: TcpListener, target: SocketAddr, mark: Option<u32>) {
    let mut connections = JoinSet::new();
    loop {
        let (mut client, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors, mostly: wait for connections to end.
                tracing::warn!(%target, %err, "port proxy cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        connections.spawn(async move {
            let mut upstream = match connect_tcp(target, mark).await {
                Ok(upstream) => upstream,
                Err(err) => {
                    // Dropping the client's connection closes it: the client sees the failure.
                    tracing::debug!(%peer, %target, %err, "cannot connect to the published port's target");
                    return;
                }
            };
            // Copies both ways; when one side reaches its end, the other side's write half is
            // shut down, and the copy goes on the other way until it ends too.
            if let Err(err) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                tracing::debug!(%peer, %target, %err, "proxied connection ended with an error");
            }
        });
    }
}

/// One UDP flow: a client address and the socket that carries its datagrams to the target.
struct Flow {
    upstream: Arc<UdpSocket>,
    last_active: Instant,
}

/// The flows of one UDP proxy, by client address.
type Flows = Arc<Mutex<HashMap<SocketAddr, Flow>>>;

/// Locks `flows`; a panic elsewhere while holding it leaves a map that is still usable.
fn lock(flows: &Flows) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Flow>> {
    flows.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A UDP socket connected to `target`, from a socket carrying `mark`.
fn connect_udp(target: SocketAddr, mark: Option<u32>) -> io::Result<UdpSocket> {
    let socket = outgoing_socket(Proto::Udp, target, mark)?;
    socket.connect(&target.into())?;
    UdpSocket::from_std(socket.into())
}

/// Receives datagrams on `listener` and sends each on its client's flow to `target`, opening
/// the flow when the client is new.
async fn serve_udp(
    listener: Arc<UdpSocket>,
    target: SocketAddr,
    mark: Option<u32>,
    idle: Duration,
) {
    let flows: Flows = Arc::default();
    let mut relays = JoinSet::new();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (len, client) = match listener.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(err) => {
                tracing::debug!(%target, %err, "port proxy UDP receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        while relays.try_join_next().is_some() {}
        let known = {
            let mut flows = lock(&flows);
            let count = flows.len();
            match flows.get_mut(&client) {
                Some(flow) => {
                    flow.last_active = Instant::now();
                    Some(flow.upstream.clone())
                }
                None if count >= MAX_UDP_FLOWS => {
                    tracing::debug!(%client, %target, "too many UDP flows, dropping a datagram");
                    continue;
                }
                None => None,
            }
        };
        let upstream = match known {
            Some(upstream) => upstream,
            None => {
                let upstream = match connect_udp(target, mark) {
                    Ok(upstream) => Arc::new(upstream),
                    Err(err) => {
                        tracing::warn!(%client, %target, %err, "cannot open a UDP flow");
                        continue;
                    }
                };
                lock(&flows).insert(
                    client,
                    Flow {
                        upstream: upstream.clone(),
                        last_active: Instant::now(),
                    },
                );
                relays.spawn(relay_replies(
                    listener.clone(),
                    upstream.clone(),
                    client,
                    flows.clone(),
                    idle,
                ));
                upstream
            }
        };
        if let Err(err) = upstream.send(&buf[..len]).await {
            tracing::debug!(%client, %target, %err, "cannot send a datagram to the target");
        }
    }
}

/// Sends the target's replies on `upstream` back to `client` from `listener`, until the flow
/// has been idle for `idle`; then forgets the flow.
async fn relay_replies(
    listener: Arc<UdpSocket>,
    upstream: Arc<UdpSocket>,
    client: SocketAddr,
    flows: Flows,
    idle: Duration,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let last_active = match lock(&flows).get(&client) {
            Some(flow) if Arc::ptr_eq(&flow.upstream, &upstream) => flow.last_active,
            _ => return,
        };
        let deadline = last_active + idle;
        match tokio::time::timeout_at(deadline, upstream.recv(&mut buf)).await {
            Ok(Ok(len)) => {
                if let Some(flow) = lock(&flows).get_mut(&client) {
                    flow.last_active = Instant::now();
                }
                if let Err(err) = listener.send_to(&buf[..len], client).await {
                    tracing::debug!(%client, %err, "cannot send a reply to the client");
                }
            }
            // The target's port is closed (an ICMP error came back): the flow stays, as the
            // target may come up and the client may send again.
            Ok(Err(err)) if err.kind() == io::ErrorKind::ConnectionRefused => {}
            Ok(Err(err)) => {
                tracing::debug!(%client, %err, "UDP flow ends on a receive error");
                forget(&flows, client, &upstream);
                return;
            }
            Err(_) => {
                // The client may have sent in the meantime, which moved the deadline.
                let mut flows = lock(&flows);
                let expired = flows
                    .get(&client)
                    .is_none_or(|flow| flow.last_active + idle <= Instant::now());
                if expired {
                    if flows
                        .get(&client)
                        .is_some_and(|flow| Arc::ptr_eq(&flow.upstream, &upstream))
                    {
                        flows.remove(&client);
                    }
                    tracing::debug!(%client, "UDP flow idle, dropped");
                    return;
                }
            }
        }
    }
}

/// Removes the flow of `client` if it is still the one carried by `upstream`.
fn forget(flows: &Flows, client: SocketAddr, upstream: &Arc<UdpSocket>) {
    let mut flows = lock(flows);
    if flows
        .get(&client)
        .is_some_and(|flow| Arc::ptr_eq(&flow.upstream, upstream))
    {
        flows.remove(&client);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outgoing_sockets_carry_the_firewall_mark() {
        let target: SocketAddr = "127.0.0.1:9".parse().expect("address");
        for proto in [Proto::Tcp, Proto::Udp] {
            let marked = outgoing_socket(proto, target, Some(0x5e55)).expect("marked socket");
            // socket2's mark() reads SO_MARK back with getsockopt.
            assert_eq!(marked.mark().expect("read SO_MARK"), 0x5e55, "{proto}");
            let plain = outgoing_socket(proto, target, None).expect("socket");
            assert_eq!(plain.mark().expect("read SO_MARK"), 0, "{proto}");
        }
    }

    /// A UDP server that answers each datagram with the address it came from.
    async fn source_reporter() -> (SocketAddr, JoinHandle<()>) {
        let socket = UdpSocket::bind("127.0.0.1:0").await.expect("bind target");
        let addr = socket.local_addr().expect("target address");
        let task = tokio::spawn(async move {
            let mut buf = vec![0u8; MAX_DATAGRAM];
            while let Ok((_, from)) = socket.recv_from(&mut buf).await {
                let _ = socket.send_to(from.to_string().as_bytes(), from).await;
            }
        });
        (addr, task)
    }

    /// Sends a datagram from `client` through `proxy` and returns the flow's source address
    /// the target saw.
    async fn flow_source(client: &UdpSocket, proxy: SocketAddr) -> String {
        client.send_to(b"ping", proxy).await.expect("send");
        let mut buf = vec![0u8; MAX_DATAGRAM];
        let (len, from) = tokio::time::timeout(Duration::from_secs(2), client.recv_from(&mut buf))
            .await
            .expect("a reply in time")
            .expect("receive");
        assert_eq!(from, proxy, "replies come from the proxy's address");
        String::from_utf8(buf[..len].to_vec()).expect("text")
    }

    #[tokio::test]
    async fn idle_udp_flows_are_dropped() {
        let (target, target_task) = source_reporter().await;
        let idle = Duration::from_millis(600);
        let listen: SocketAddr = "127.0.0.1:0".parse().expect("address");
        let proxy = PortProxy::start_with_idle_timeout(Proto::Udp, listen, target, None, idle)
            .await
            .expect("start proxy");
        let client = UdpSocket::bind("127.0.0.1:0").await.expect("client");

        let first = flow_source(&client, proxy.local_addr()).await;
        // Datagrams closer together than the timeout keep the flow, past its length in all.
        for _ in 0..8 {
            tokio::time::sleep(idle / 6).await;
            assert_eq!(flow_source(&client, proxy.local_addr()).await, first);
        }
        // After the timeout, the flow is gone: the next datagram opens a new one.
        tokio::time::sleep(idle * 2).await;
        let second = flow_source(&client, proxy.local_addr()).await;
        assert_ne!(second, first, "a new flow has its own socket");
        target_task.abort();
    }

    #[test]
    fn protocols_read_and_write_as_docker_writes_them() {
        assert_eq!("tcp".parse::<Proto>().expect("tcp"), Proto::Tcp);
        assert_eq!("UDP".parse::<Proto>().expect("udp"), Proto::Udp);
        assert!("sctp".parse::<Proto>().is_err());
        assert_eq!(Proto::Udp.to_string(), "udp");
        assert_eq!(serde_json::to_string(&Proto::Tcp).expect("json"), "\"tcp\"");
        assert_eq!(
            serde_json::from_str::<Proto>("\"udp\"").expect("json"),
            Proto::Udp
        );
    }
}
