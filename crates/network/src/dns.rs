//! The containers' DNS server.
//!
//! The daemon runs one [`DnsServer`] per container network, listening on the
//! network's gateway address, port 53. As Docker's embedded DNS does, it lets
//! containers on a user-defined network resolve each other by container name,
//! alias and compose service name: those names live in a [`NameTable`] that
//! the daemon rewrites as containers come and go. Every other query is
//! forwarded, unchanged, to the host's resolvers (see
//! [`upstreams_from_resolv_conf`]).
//!
//! Answers the server gives itself:
//! - `A` for a known name: its addresses, TTL [`TTL`], authoritative;
//! - any other type for a known name (`AAAA` above all): `NOERROR` with no
//!   answer, so that resolvers take the `A` answer instead of failing over to
//!   another nameserver;
//! - `PTR` for `d.c.b.a.in-addr.arpa` of a known address: its name.
//!
//! Forwarded queries go to the upstreams in order, over UDP when the client
//! asked over UDP and over TCP when it asked over TCP, each given
//! [`UPSTREAM_TIMEOUT`]; the first answer is relayed. With no upstream, or
//! none answering, the client gets `SERVFAIL`. Malformed UDP packets are
//! dropped; a malformed message on a TCP connection closes it.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Mutex;
use tokio::task::{JoinHandle, JoinSet};

/// Time to live of the answers the server gives from its [`NameTable`], in seconds (Docker's value).
pub const TTL: u32 = 600;

/// How long the server waits for one upstream before trying the next.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// A TCP connection on which the client sends nothing for this long is closed.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// UDP queries answered at the same time; more are dropped (their clients retry).
const MAX_UDP_IN_FLIGHT: usize = 512;

/// TCP connections served at the same time; more are closed as soon as accepted.
const MAX_TCP_CONNECTIONS: usize = 128;

/// Queries answered at the same time on one TCP connection; the connection is read no further until one ends.
const MAX_TCP_IN_FLIGHT: usize = 16;

/// Largest UDP answer to a client that did not announce a larger one with EDNS (RFC 1035).
const CLASSIC_UDP_PAYLOAD: u16 = 512;

/// Largest UDP payload the server announces and accepts to send with EDNS.
const EDNS_UDP_PAYLOAD: u16 = 1232;

/// Size of a DNS message header.
const HEADER_LEN: usize = 12;

/// Names a DNS server answers, shared with the daemon, which updates it as containers come and go.
#[derive(Default)]
pub struct NameTable {
    table: RwLock<Table>,
}

/// The contents of a [`NameTable`]: both directions, rebuilt together on each replace.
#[derive(Default)]
struct Table {
    forward: HashMap<String, Vec<Ipv4Addr>>,
    reverse: HashMap<Ipv4Addr, String>,
    /// Clients with upstreams of their own (a container's `--dns`), which
    /// their forwarded queries go to instead of the server's.
    clients: HashMap<Ipv4Addr, Vec<SocketAddr>>,
}

impl NameTable {
    /// Replaces all entries: each name (case-insensitive, without trailing dot) → IPv4 addresses.
    ///
    /// Names that differ only by case or a trailing dot are merged; empty names and names without
    /// addresses are left out (queries for them are forwarded upstream).
    pub fn replace(&self, entries: HashMap<String, Vec<Ipv4Addr>>) {
        let mut forward: BTreeMap<String, Vec<Ipv4Addr>> = BTreeMap::new();
        for (name, addrs) in entries {
            let name = normalize(&name);
            if name.is_empty() || addrs.is_empty() {
                continue;
            }
            let known = forward.entry(name).or_default();
            for addr in addrs {
                if !known.contains(&addr) {
                    known.push(addr);
                }
            }
        }
        // The reverse map takes, for each address, the first name in alphabetical order: the
        // answer to a PTR query does not depend on the order the daemon listed the names in.
        let mut reverse = HashMap::new();
        for (name, addrs) in &forward {
            for addr in addrs {
                reverse.entry(*addr).or_insert_with(|| name.clone());
            }
        }
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        table.forward = forward.into_iter().collect();
        table.reverse = reverse;
    }

    /// Replaces the clients that have upstreams of their own: queries from
    /// each address that the table cannot answer go to its upstreams, in
    /// order, instead of the server's.
    pub fn replace_client_upstreams(&self, clients: HashMap<Ipv4Addr, Vec<SocketAddr>>) {
        let clients = clients.into_iter().filter(|(_, u)| !u.is_empty()).collect();
        self.table
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clients = clients;
    }

    /// The upstreams of `client`, when it has its own.
    pub fn client_upstreams(&self, client: IpAddr) -> Option<Vec<SocketAddr>> {
        let IpAddr::V4(ip) = client else {
            return None;
        };
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        table.clients.get(&ip).cloned()
    }

    /// The addresses of `name` (accepts a trailing dot, case-insensitive).
    pub fn lookup(&self, name: &str) -> Vec<Ipv4Addr> {
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        table
            .forward
            .get(&normalize(name))
            .cloned()
            .unwrap_or_default()
    }

    /// The name to answer a PTR query for `ip` with (the first name that maps to it, in a stable order).
    ///
    /// The order is alphabetical, over the names as stored (lowercase, without trailing dot).
    pub fn reverse(&self, ip: Ipv4Addr) -> Option<String> {
        let table = self.table.read().unwrap_or_else(PoisonError::into_inner);
        table.reverse.get(&ip).cloned()
    }
}

/// A name as the table keys it: lowercase, without one trailing dot.
fn normalize(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// The address a reverse-lookup name `d.c.b.a.in-addr.arpa` stands for.
fn reverse_lookup_addr(name: &str) -> Option<Ipv4Addr> {
    let name = normalize(name);
    let rest = name.strip_suffix(".in-addr.arpa")?;
    let labels: Vec<&str> = rest.split('.').collect();
    let [d, c, b, a] = labels.as_slice() else {
        return None;
    };
    let octet = |label: &str| -> Option<u8> {
        if label.is_empty() || !label.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        label.parse().ok()
    };
    Some(Ipv4Addr::new(octet(a)?, octet(b)?, octet(c)?, octet(d)?))
}

/// Nameservers of a resolv.conf text (`nameserver` lines, IPv4 and IPv6, port 53), in order.
///
/// Lines that are not `nameserver` lines, comments, and addresses that do not parse are
/// skipped. An IPv6 address may carry a zone (`fe80::1%eth0` or `fe80::1%2`); a zone naming an
/// interface that does not exist drops the line.
pub fn upstreams_from_resolv_conf(text: &str) -> Vec<SocketAddr> {
    let mut upstreams = Vec::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(addr) = words.next() else {
            continue;
        };
        if let Some(upstream) = parse_nameserver(addr) {
            if !upstreams.contains(&upstream) {
                upstreams.push(upstream);
            }
        }
    }
    upstreams
}

/// The socket address of one `nameserver` value.
fn parse_nameserver(value: &str) -> Option<SocketAddr> {
    if let Ok(ip) = value.parse::<IpAddr>() {
        return Some(SocketAddr::new(ip, 53));
    }
    let (ip, zone) = value.split_once('%')?;
    let ip: Ipv6Addr = ip.parse().ok()?;
    let scope = match zone.parse::<u32>() {
        Ok(index) => index,
        Err(_) => interface_index(zone)?,
    };
    Some(SocketAddr::V6(SocketAddrV6::new(ip, 53, 0, scope)))
}

/// The index of the network interface called `name`, if there is one.
fn interface_index(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call, which only reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// What the serving tasks share: the names and where to forward the rest.
struct Resolver {
    names: Arc<NameTable>,
    upstreams: Vec<SocketAddr>,
}

/// The transport a query came over, which is also the one it is forwarded over.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Transport {
    Udp,
    Tcp,
}

impl Resolver {
    /// The bytes to send back for `request` (whose wire form is `raw`), or `None` to send nothing.
    async fn respond(
        &self,
        request: &Message,
        raw: &[u8],
        transport: Transport,
        client: IpAddr,
    ) -> Option<Vec<u8>> {
        if request.message_type() != MessageType::Query {
            // Never answer an answer: that is how two servers loop.
            return None;
        }
        let response = if request.op_code() != OpCode::Query {
            response_to(request, ResponseCode::NotImp)
        } else if request.queries().len() != 1 {
            response_to(request, ResponseCode::FormErr)
        } else if let Some(local) = self.answer_locally(request) {
            local
        } else {
            match self.forward(raw, request.id(), transport, client).await {
                Some(reply) => return Some(reply),
                None => response_to(request, ResponseCode::ServFail),
            }
        };
        encode(request, &response, transport)
    }

    /// The answer from the name table, or `None` when the query is about a name it does not hold.
    fn answer_locally(&self, request: &Message) -> Option<Message> {
        let query = request.queries().first()?;
        let qname = query.name();
        let text = qname.to_ascii();
        if query.query_type() == RecordType::PTR {
            if let Some(ip) = reverse_lookup_addr(&text) {
                let target = self.names.reverse(ip)?;
                let target = match Name::from_ascii(format!("{target}.")) {
                    Ok(target) => target,
                    Err(err) => {
                        tracing::debug!(name = %target, %err, "container name is not a DNS name");
                        return None;
                    }
                };
                let mut response = response_to(request, ResponseCode::NoError);
                response.set_authoritative(true);
                response.add_answer(Record::from_rdata(
                    qname.clone(),
                    TTL,
                    RData::PTR(PTR(target)),
                ));
                return Some(response);
            }
        }
        let addrs = self.names.lookup(&text);
        if addrs.is_empty() {
            return None;
        }
        let mut response = response_to(request, ResponseCode::NoError);
        response.set_authoritative(true);
        let wants_a = matches!(query.query_type(), RecordType::A | RecordType::ANY);
        if wants_a && query.query_class() == DNSClass::IN {
            for addr in addrs {
                response.add_answer(Record::from_rdata(qname.clone(), TTL, RData::A(A(addr))));
            }
        }
        Some(response)
    }

    /// The first upstream answer to `raw`, tried in order, carrying the client's query `id`.
    async fn forward(
        &self,
        raw: &[u8],
        id: u16,
        transport: Transport,
        client: IpAddr,
    ) -> Option<Vec<u8>> {
        let own = self.names.client_upstreams(client);
        for upstream in own.as_ref().unwrap_or(&self.upstreams) {
            let attempt = async {
                match transport {
                    Transport::Udp => forward_udp(raw, id, *upstream).await,
                    Transport::Tcp => forward_tcp(raw, id, *upstream).await,
                }
            };
            match tokio::time::timeout(UPSTREAM_TIMEOUT, attempt).await {
                Ok(Ok(mut reply)) => {
                    reply[..2].copy_from_slice(&id.to_be_bytes());
                    return Some(reply);
                }
                Ok(Err(err)) => {
                    tracing::debug!(%upstream, ?transport, %err, "upstream DNS server failed")
                }
                Err(_) => tracing::debug!(%upstream, ?transport, "upstream DNS server timed out"),
            }
        }
        None
    }
}

/// Sends `query` to `upstream` over UDP, from a fresh port, and waits for the answer to it.
async fn forward_udp(query: &[u8], id: u16, upstream: SocketAddr) -> io::Result<Vec<u8>> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    loop {
        let len = socket.recv(&mut buf).await?;
        if is_answer_to(&buf[..len], id) {
            buf.truncate(len);
            return Ok(buf);
        }
    }
}

/// Sends `query` to `upstream` over a new TCP connection and reads the answer.
async fn forward_tcp(query: &[u8], id: u16, upstream: SocketAddr) -> io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect(upstream).await?;
    stream.write_all(&frame(query)?).await?;
    let len = stream.read_u16().await?;
    let mut reply = vec![0u8; usize::from(len)];
    stream.read_exact(&mut reply).await?;
    if !is_answer_to(&reply, id) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "upstream sent something else than the answer to the query",
        ));
    }
    Ok(reply)
}

/// Whether `packet` is a DNS response with query id `id`.
fn is_answer_to(packet: &[u8], id: u16) -> bool {
    packet.len() >= HEADER_LEN && packet[..2] == id.to_be_bytes() && packet[2] & 0x80 != 0
}

/// `message` prefixed with its length, as DNS over TCP sends it.
fn frame(message: &[u8]) -> io::Result<Vec<u8>> {
    let len = u16::try_from(message.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "DNS message over 65535 bytes"))?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    Ok(framed)
}

/// An empty response to `request` with `code`: same id and question, recursion available.
fn response_to(request: &Message, code: ResponseCode) -> Message {
    let mut response = Message::new();
    response
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true)
        .set_checking_disabled(request.checking_disabled())
        .set_response_code(code);
    response.add_queries(request.queries().iter().cloned());
    if request.extensions().is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_UDP_PAYLOAD);
        response.set_edns(edns);
    }
    response
}

/// The wire form of `response`, truncated (TC set, no records) when it does not fit the
/// client's UDP payload size.
fn encode(request: &Message, response: &Message, transport: Transport) -> Option<Vec<u8>> {
    let limit = match (transport, request.extensions()) {
        (Transport::Tcp, _) => usize::from(u16::MAX),
        (Transport::Udp, None) => usize::from(CLASSIC_UDP_PAYLOAD),
        (Transport::Udp, Some(edns)) => usize::from(
            edns.max_payload()
                .clamp(CLASSIC_UDP_PAYLOAD, EDNS_UDP_PAYLOAD),
        ),
    };
    let encoded = match response.to_vec() {
        Ok(encoded) if encoded.len() <= limit => return Some(encoded),
        Ok(_) => response.truncate().to_vec(),
        Err(err) => {
            tracing::warn!(%err, "cannot encode DNS response");
            return None;
        }
    };
    match encoded {
        Ok(encoded) => Some(encoded),
        Err(err) => {
            tracing::warn!(%err, "cannot encode truncated DNS response");
            None
        }
    }
}

/// A DNS server for one container network, serving UDP and TCP on one address.
///
/// Dropping it stops serving: its tasks, and the queries they are answering, are cancelled,
/// which closes its sockets and frees its port as soon as the runtime runs them (at once on a
/// multi-threaded runtime, at the dropping task's next await on a current-thread one).
pub struct DnsServer {
    local_addr: SocketAddr,
    udp: JoinHandle<()>,
    tcp: JoinHandle<()>,
}

impl DnsServer {
    /// Binds UDP and TCP on `listen` (errors come back here, e.g. address in use), then serves in tokio tasks.
    ///
    /// With port 0, UDP and TCP get the same free port. Queries for names `names` does not hold
    /// are forwarded to `upstreams` in order; an upstream that is this server's own address is
    /// left out, as forwarding to itself would loop.
    pub async fn start(
        listen: SocketAddr,
        names: Arc<NameTable>,
        upstreams: Vec<SocketAddr>,
    ) -> io::Result<DnsServer> {
        let (udp, tcp) = bind_udp_and_tcp(listen)?;
        let local_addr = udp.local_addr()?;
        let upstreams = upstreams
            .into_iter()
            .filter(|upstream| !is_own_address(*upstream, local_addr))
            .collect();
        let resolver = Arc::new(Resolver { names, upstreams });
        let udp = tokio::spawn(serve_udp(Arc::new(udp), resolver.clone()));
        let tcp = tokio::spawn(serve_tcp(tcp, resolver));
        tracing::debug!(%local_addr, "DNS server started");
        Ok(DnsServer {
            local_addr,
            udp,
            tcp,
        })
    }

    /// The address the server listens on (UDP and TCP).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.udp.abort();
        self.tcp.abort();
    }
}

/// Whether `upstream` is the server listening on `local` itself.
fn is_own_address(upstream: SocketAddr, local: SocketAddr) -> bool {
    upstream.port() == local.port()
        && (upstream.ip() == local.ip()
            || (local.ip().is_unspecified() && upstream.ip().is_loopback()))
}

/// A UDP socket and a TCP listener on the same address; with port 0, on the same free port.
fn bind_udp_and_tcp(listen: SocketAddr) -> io::Result<(UdpSocket, TcpListener)> {
    // With port 0 the port UDP got may be taken for TCP: take another one a few times.
    let attempts = if listen.port() == 0 { 16 } else { 1 };
    let mut attempt = 0;
    loop {
        attempt += 1;
        let udp = std::net::UdpSocket::bind(listen)
            .map_err(|err| with_context(err, format!("binding DNS UDP socket on {listen}")))?;
        let addr = udp.local_addr()?;
        udp.set_nonblocking(true)?;
        match tcp_listener(addr) {
            Ok(tcp) => return Ok((UdpSocket::from_std(udp)?, tcp)),
            Err(err) if err.kind() == io::ErrorKind::AddrInUse && attempt < attempts => continue,
            Err(err) => {
                return Err(with_context(
                    err,
                    format!("binding DNS TCP socket on {addr}"),
                ))
            }
        }
    }
}

/// A TCP listener on `addr`, with SO_REUSEADDR so that a restarted daemon can bind again at once.
fn tcp_listener(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket.into())
}

/// `err` with what was being done when it happened, keeping its kind.
fn with_context(err: io::Error, context: String) -> io::Error {
    io::Error::new(err.kind(), format!("{context}: {err}"))
}

/// Answers the queries that come to `socket`, each in its own task.
async fn serve_udp(socket: Arc<UdpSocket>, resolver: Arc<Resolver>) {
    let mut queries = JoinSet::new();
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    loop {
        let (len, client) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(err) => {
                tracing::debug!(%err, "DNS UDP receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        while queries.try_join_next().is_some() {}
        if queries.len() >= MAX_UDP_IN_FLIGHT {
            tracing::debug!(%client, "too many DNS queries in flight, dropping one");
            continue;
        }
        let raw = buf[..len].to_vec();
        let request = match Message::from_vec(&raw) {
            Ok(request) => request,
            Err(err) => {
                tracing::debug!(%client, %err, "dropping malformed DNS packet");
                continue;
            }
        };
        let socket = socket.clone();
        let resolver = resolver.clone();
        queries.spawn(async move {
            if let Some(reply) = resolver
                .respond(&request, &raw, Transport::Udp, client.ip())
                .await
            {
                if let Err(err) = socket.send_to(&reply, client).await {
                    tracing::debug!(%client, %err, "cannot send DNS answer");
                }
            }
        });
    }
}

/// Accepts DNS-over-TCP connections on `listener`, each served in its own task.
async fn serve_tcp(listener: TcpListener, resolver: Arc<Resolver>) {
    let mut connections = JoinSet::new();
    loop {
        let (stream, client) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::debug!(%err, "DNS TCP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        if connections.len() >= MAX_TCP_CONNECTIONS {
            tracing::debug!(%client, "too many DNS TCP connections, closing a new one");
            continue;
        }
        connections.spawn(serve_tcp_connection(stream, resolver.clone()));
    }
}

/// Answers the queries of one TCP connection, several at a time, until the client closes it,
/// stays idle too long or sends something that is not a DNS query.
async fn serve_tcp_connection(stream: TcpStream, resolver: Arc<Resolver>) {
    let client = stream.peer_addr().ok();
    let client_ip = client.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.ip());
    let (mut reader, writer) = stream.into_split();
    let writer = Arc::new(Mutex::new(writer));
    let mut queries = JoinSet::new();
    loop {
        let raw = match tokio::time::timeout(TCP_IDLE_TIMEOUT, read_frame(&mut reader)).await {
            Ok(Ok(Some(raw))) => raw,
            Ok(Ok(None)) | Err(_) => break,
            Ok(Err(err)) => {
                tracing::debug!(?client, %err, "closing DNS TCP connection");
                return;
            }
        };
        let request = match Message::from_vec(&raw) {
            Ok(request) => request,
            Err(err) => {
                tracing::debug!(?client, %err, "malformed DNS message, closing the connection");
                return;
            }
        };
        while queries.try_join_next().is_some() {}
        if queries.len() >= MAX_TCP_IN_FLIGHT {
            queries.join_next().await;
        }
        let resolver = resolver.clone();
        let writer = writer.clone();
        queries.spawn(async move {
            let Some(reply) = resolver
                .respond(&request, &raw, Transport::Tcp, client_ip)
                .await
            else {
                return;
            };
            let written = match frame(&reply) {
                Ok(framed) => writer.lock().await.write_all(&framed).await,
                Err(err) => Err(err),
            };
            if let Err(err) = written {
                tracing::debug!(?client, %err, "cannot send DNS answer");
            }
        });
    }
    // The client is done sending: answer what it already asked, then close.
    while queries.join_next().await.is_some() {}
    let _ = writer.lock().await.shutdown().await;
}

/// One length-prefixed message from a DNS-over-TCP stream; `None` when the client closed it
/// between messages.
async fn read_frame(reader: &mut OwnedReadHalf) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    let first = reader.read(&mut len[..1]).await?;
    if first == 0 {
        return Ok(None);
    }
    reader.read_exact(&mut len[1..]).await?;
    let len = usize::from(u16::from_be_bytes(len));
    if len < HEADER_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("DNS message of {len} bytes is shorter than a header"),
        ));
    }
    let mut message = vec![0u8; len];
    reader.read_exact(&mut message).await?;
    Ok(Some(message))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reverse_lookup_names_parse_to_addresses() {
        assert_eq!(
            reverse_lookup_addr("4.3.2.10.in-addr.arpa."),
            Some(Ipv4Addr::new(10, 2, 3, 4))
        );
        assert_eq!(
            reverse_lookup_addr("4.3.2.10.IN-ADDR.ARPA"),
            Some(Ipv4Addr::new(10, 2, 3, 4))
        );
        assert_eq!(reverse_lookup_addr("3.2.10.in-addr.arpa."), None);
        assert_eq!(reverse_lookup_addr("256.3.2.10.in-addr.arpa."), None);
        assert_eq!(reverse_lookup_addr("+4.3.2.10.in-addr.arpa."), None);
        assert_eq!(reverse_lookup_addr("web.example."), None);
    }

    #[test]
    fn table_merges_names_that_differ_by_case_and_dot() {
        let table = NameTable::default();
        let a = Ipv4Addr::new(10, 0, 0, 2);
        let b = Ipv4Addr::new(10, 0, 0, 3);
        table.replace(HashMap::from([
            ("Web".to_string(), vec![a]),
            ("web.".to_string(), vec![b, a]),
            ("".to_string(), vec![a]),
            ("empty".to_string(), vec![]),
        ]));
        let mut addrs = table.lookup("WEB.");
        addrs.sort();
        assert_eq!(addrs, vec![a, b]);
        assert!(table.lookup("empty").is_empty());
        assert!(table.lookup(".").is_empty());
    }

    #[test]
    fn reverse_takes_the_first_name_alphabetically() {
        let table = NameTable::default();
        let ip = Ipv4Addr::new(10, 0, 0, 2);
        table.replace(HashMap::from([
            ("web".to_string(), vec![ip]),
            ("proj-web-1".to_string(), vec![ip]),
            ("alias".to_string(), vec![Ipv4Addr::new(10, 0, 0, 9)]),
        ]));
        assert_eq!(table.reverse(ip).as_deref(), Some("proj-web-1"));
        assert_eq!(table.reverse(Ipv4Addr::new(10, 0, 0, 7)), None);
    }

    #[test]
    fn answers_are_recognised_by_id_and_flag() {
        let mut packet = [0u8; HEADER_LEN];
        packet[..2].copy_from_slice(&0x1234u16.to_be_bytes());
        assert!(!is_answer_to(&packet, 0x1234), "a query is not an answer");
        packet[2] = 0x80;
        assert!(is_answer_to(&packet, 0x1234));
        assert!(!is_answer_to(&packet, 0x4321));
        assert!(!is_answer_to(&packet[..4], 0x1234));
    }

    #[test]
    fn own_address_is_not_an_upstream() {
        let local: SocketAddr = "0.0.0.0:53".parse().expect("address");
        assert!(is_own_address(
            "127.0.0.1:53".parse().expect("address"),
            local
        ));
        assert!(!is_own_address(
            "127.0.0.53:53".parse().expect("address"),
            "10.0.0.1:53".parse().expect("address")
        ));
        assert!(!is_own_address(
            "127.0.0.1:5353".parse().expect("address"),
            local
        ));
    }
}
