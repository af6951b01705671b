//! The containers' DNS server as a client in a container sees it: real queries over UDP and TCP.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use vessel_network::dns::{upstreams_from_resolv_conf, DnsServer, NameTable};

const WEB: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 2);
const WEB_2: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 3);
const DB: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 4);
/// What the fake upstream answers over UDP, and over TCP.
const UPSTREAM_UDP_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 55);
const UPSTREAM_TCP_ANSWER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 66);

fn table() -> Arc<NameTable> {
    let names = Arc::new(NameTable::default());
    names.replace(HashMap::from([
        ("web".to_string(), vec![WEB, WEB_2]),
        ("proj-web-1".to_string(), vec![WEB]),
        ("db".to_string(), vec![DB]),
    ]));
    names
}

fn localhost() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

fn query(id: u16, name: &str, kind: RecordType) -> Vec<u8> {
    let mut message = Message::new();
    message
        .set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(
            Name::from_ascii(name).expect("query name"),
            kind,
        ));
    message.to_vec().expect("encode query")
}

async fn ask_udp(server: SocketAddr, packet: &[u8]) -> Message {
    let socket = UdpSocket::bind(localhost()).await.expect("client socket");
    socket.send_to(packet, server).await.expect("send query");
    let mut buf = vec![0u8; 65535];
    let (len, from) = tokio::time::timeout(Duration::from_secs(8), socket.recv_from(&mut buf))
        .await
        .expect("an answer in time")
        .expect("receive answer");
    assert_eq!(from, server, "the answer comes from the server's address");
    Message::from_vec(&buf[..len]).expect("answer parses")
}

async fn send_frame(stream: &mut TcpStream, packet: &[u8]) {
    let len = u16::try_from(packet.len()).expect("small message");
    let mut framed = len.to_be_bytes().to_vec();
    framed.extend_from_slice(packet);
    stream.write_all(&framed).await.expect("send query");
}

async fn read_frame(stream: &mut TcpStream) -> Message {
    let read = async {
        let len = stream.read_u16().await.expect("answer length");
        let mut buf = vec![0u8; usize::from(len)];
        stream.read_exact(&mut buf).await.expect("answer");
        buf
    };
    let buf = tokio::time::timeout(Duration::from_secs(8), read)
        .await
        .expect("an answer in time");
    Message::from_vec(&buf).expect("answer parses")
}

async fn ask_tcp(server: SocketAddr, packet: &[u8]) -> Message {
    let mut stream = TcpStream::connect(server).await.expect("connect over TCP");
    send_frame(&mut stream, packet).await;
    read_frame(&mut stream).await
}

fn a_answers(message: &Message) -> Vec<Ipv4Addr> {
    message
        .answers()
        .iter()
        .filter_map(|record| match record.data() {
            RData::A(A(ip)) => Some(*ip),
            _ => None,
        })
        .collect()
}

/// A DNS server standing for the host's resolver: answers every A query with a fixed address
/// (one over UDP, another over TCP), and keeps the queries it got.
struct FakeUpstream {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Vec<u8>>>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn upstream_answer(raw: &[u8], ip: Ipv4Addr) -> Vec<u8> {
    let request = Message::from_vec(raw).expect("upstream gets a valid query");
    let mut response = Message::new();
    response
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true);
    for query in request.queries() {
        response.add_query(query.clone());
        response.add_answer(Record::from_rdata(
            query.name().clone(),
            30,
            RData::A(A(ip)),
        ));
    }
    response.to_vec().expect("encode upstream answer")
}

/// A UDP socket and a TCP listener on the same free port of 127.0.0.1.
async fn udp_and_tcp_on_one_port() -> (UdpSocket, TcpListener) {
    for _ in 0..16 {
        let udp = UdpSocket::bind(localhost()).await.expect("bind UDP");
        let addr = udp.local_addr().expect("UDP address");
        // The free UDP port may be taken for TCP (by another test's connection): try another.
        if let Ok(tcp) = TcpListener::bind(addr).await {
            return (udp, tcp);
        }
    }
    panic!("no port free for both UDP and TCP");
}

async fn fake_upstream() -> FakeUpstream {
    let (udp, tcp) = udp_and_tcp_on_one_port().await;
    let addr = udp.local_addr().expect("upstream address");
    let received = Arc::new(Mutex::new(Vec::new()));
    let seen = received.clone();
    let udp_task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        loop {
            let (len, from) = udp.recv_from(&mut buf).await.expect("upstream receive");
            seen.lock().expect("lock").push(buf[..len].to_vec());
            let answer = upstream_answer(&buf[..len], UPSTREAM_UDP_ANSWER);
            udp.send_to(&answer, from).await.expect("upstream send");
        }
    });
    let seen = received.clone();
    let tcp_task = tokio::spawn(async move {
        loop {
            let (mut stream, _) = tcp.accept().await.expect("upstream accept");
            let len = stream.read_u16().await.expect("upstream length");
            let mut buf = vec![0u8; usize::from(len)];
            stream.read_exact(&mut buf).await.expect("upstream query");
            seen.lock().expect("lock").push(buf.clone());
            let answer = upstream_answer(&buf, UPSTREAM_TCP_ANSWER);
            let mut framed = u16::try_from(answer.len())
                .expect("small")
                .to_be_bytes()
                .to_vec();
            framed.extend_from_slice(&answer);
            stream.write_all(&framed).await.expect("upstream answer");
        }
    });
    FakeUpstream {
        addr,
        received,
        tasks: vec![udp_task, tcp_task],
    }
}

/// An upstream that takes queries, over UDP and TCP, and never answers them.
struct SilentUpstream {
    udp: UdpSocket,
    tcp: TcpListener,
}

impl SilentUpstream {
    fn addr(&self) -> SocketAddr {
        self.udp.local_addr().expect("silent upstream address")
    }
}

async fn silent_upstream() -> SilentUpstream {
    // The kernel completes TCP handshakes for the listener; nothing ever reads from them.
    let (udp, tcp) = udp_and_tcp_on_one_port().await;
    SilentUpstream { udp, tcp }
}

#[tokio::test]
async fn known_names_resolve_over_udp_and_tcp_whatever_the_case() {
    let server = DnsServer::start(localhost(), table(), vec![])
        .await
        .expect("start DNS server");
    let addr = server.local_addr();
    assert_ne!(addr.port(), 0);

    for name in ["web.", "WeB.", "web"] {
        let answer = ask_udp(addr, &query(0x1111, name, RecordType::A)).await;
        assert_eq!(answer.id(), 0x1111);
        assert_eq!(answer.message_type(), MessageType::Response);
        assert_eq!(answer.response_code(), ResponseCode::NoError, "{name}");
        assert!(answer.authoritative());
        assert!(answer.recursion_desired());
        assert!(answer.recursion_available());
        assert_eq!(a_answers(&answer), vec![WEB, WEB_2], "{name}");
        assert!(answer.answers().iter().all(|record| record.ttl() == 600));
        assert_eq!(
            answer.answers()[0].name().to_ascii().to_ascii_lowercase(),
            "web."
        );
        assert_eq!(answer.queries().len(), 1, "the question is echoed");
    }

    let answer = ask_tcp(addr, &query(0x2222, "DB.", RecordType::A)).await;
    assert_eq!(answer.id(), 0x2222);
    assert_eq!(answer.response_code(), ResponseCode::NoError);
    assert_eq!(a_answers(&answer), vec![DB]);
}

#[tokio::test]
async fn other_types_for_known_names_are_empty_successes() {
    let server = DnsServer::start(localhost(), table(), vec![])
        .await
        .expect("start DNS server");
    for kind in [RecordType::AAAA, RecordType::MX, RecordType::TXT] {
        let answer = ask_udp(server.local_addr(), &query(7, "web.", kind)).await;
        assert_eq!(answer.response_code(), ResponseCode::NoError, "{kind}");
        assert!(answer.answers().is_empty(), "{kind}");
    }
    let answer = ask_tcp(server.local_addr(), &query(8, "db.", RecordType::AAAA)).await;
    assert_eq!(answer.response_code(), ResponseCode::NoError);
    assert!(answer.answers().is_empty());
}

#[tokio::test]
async fn ptr_queries_name_known_addresses() {
    let server = DnsServer::start(localhost(), table(), vec![])
        .await
        .expect("start DNS server");
    let answer = ask_udp(
        server.local_addr(),
        &query(9, "4.0.30.172.in-addr.arpa.", RecordType::PTR),
    )
    .await;
    assert_eq!(answer.response_code(), ResponseCode::NoError);
    let names: Vec<String> = answer
        .answers()
        .iter()
        .filter_map(|record| match record.data() {
            RData::PTR(ptr) => Some(ptr.0.to_ascii()),
            _ => None,
        })
        .collect();
    assert_eq!(names, vec!["db.".to_string()]);

    // 172.30.0.2 is both "proj-web-1" and "web": the answer is always the same one.
    let answer = ask_tcp(
        server.local_addr(),
        &query(10, "2.0.30.172.in-addr.arpa.", RecordType::PTR),
    )
    .await;
    match answer.answers().first().map(|record| record.data()) {
        Some(RData::PTR(ptr)) => assert_eq!(ptr.0.to_ascii(), "proj-web-1."),
        other => panic!("expected a PTR answer, got {other:?}"),
    }
}

#[tokio::test]
async fn unknown_names_are_forwarded_unchanged_over_the_clients_transport() {
    let upstream = fake_upstream().await;
    let server = DnsServer::start(localhost(), table(), vec![upstream.addr])
        .await
        .expect("start DNS server");

    let sent = query(0xbeef, "example.org.", RecordType::A);
    let answer = ask_udp(server.local_addr(), &sent).await;
    assert_eq!(answer.id(), 0xbeef);
    assert_eq!(answer.response_code(), ResponseCode::NoError);
    assert_eq!(a_answers(&answer), vec![UPSTREAM_UDP_ANSWER]);
    assert_eq!(
        *upstream.received.lock().expect("lock"),
        vec![sent],
        "the upstream got the client's query as it was"
    );

    let answer = ask_tcp(
        server.local_addr(),
        &query(0xcafe, "example.org.", RecordType::A),
    )
    .await;
    assert_eq!(answer.id(), 0xcafe);
    assert_eq!(a_answers(&answer), vec![UPSTREAM_TCP_ANSWER]);

    // A PTR for an address the table does not hold is not the server's to answer either.
    let answer = ask_udp(
        server.local_addr(),
        &query(0xd00d, "1.2.0.192.in-addr.arpa.", RecordType::PTR),
    )
    .await;
    assert_eq!(answer.id(), 0xd00d);
    assert_eq!(upstream.received.lock().expect("lock").len(), 3);
}

#[tokio::test]
async fn a_client_with_its_own_upstreams_is_forwarded_there() {
    let shared = fake_upstream().await;
    let own = fake_upstream().await;
    let names = table();
    // Clients on loopback: 127.0.0.1 has upstreams of its own (a
    // container's `--dns`), other clients use the server's.
    names.replace_client_upstreams(HashMap::from([(Ipv4Addr::LOCALHOST, vec![own.addr])]));
    let server = DnsServer::start(localhost(), names.clone(), vec![shared.addr])
        .await
        .expect("start DNS server");
    let sent = query(0x0a0a, "example.org.", RecordType::A);
    let answer = ask_udp(server.local_addr(), &sent).await;
    assert_eq!(a_answers(&answer), vec![UPSTREAM_UDP_ANSWER]);
    assert_eq!(*own.received.lock().expect("lock"), vec![sent]);
    assert!(shared.received.lock().expect("lock").is_empty());
    // Its names are still the table's.
    let answer = ask_udp(server.local_addr(), &query(0x0b0b, "db.", RecordType::A)).await;
    assert_eq!(a_answers(&answer), vec![DB]);
    assert_eq!(own.received.lock().expect("lock").len(), 1);

    // Without upstreams of its own, the client's queries go to the server's.
    names.replace_client_upstreams(HashMap::new());
    let sent = query(0x0c0c, "example.org.", RecordType::A);
    let answer = ask_tcp(server.local_addr(), &sent).await;
    assert_eq!(a_answers(&answer), vec![UPSTREAM_TCP_ANSWER]);
    assert_eq!(*shared.received.lock().expect("lock"), vec![sent]);
}

#[tokio::test]
async fn a_silent_upstream_is_skipped_for_the_next_one() {
    let silent = silent_upstream().await;
    let upstream = fake_upstream().await;
    let server = DnsServer::start(localhost(), table(), vec![silent.addr(), upstream.addr])
        .await
        .expect("start DNS server");
    let answer = ask_udp(
        server.local_addr(),
        &query(0x0102, "example.net.", RecordType::A),
    )
    .await;
    assert_eq!(answer.id(), 0x0102);
    assert_eq!(a_answers(&answer), vec![UPSTREAM_UDP_ANSWER]);
}

#[tokio::test]
async fn no_answer_upstream_means_servfail_in_a_few_seconds() {
    let silent = silent_upstream().await;
    let server = DnsServer::start(localhost(), table(), vec![silent.addr()])
        .await
        .expect("start DNS server");
    let started = Instant::now();
    let answer = ask_udp(
        server.local_addr(),
        &query(0x0a0b, "example.com.", RecordType::A),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(answer.id(), 0x0a0b);
    assert_eq!(answer.response_code(), ResponseCode::ServFail);
    assert!(answer.answers().is_empty());

    // Without any upstream the failure is immediate.
    let lonely = DnsServer::start(localhost(), table(), vec![])
        .await
        .expect("start DNS server");
    let started = Instant::now();
    let answer = ask_tcp(
        lonely.local_addr(),
        &query(0x0c0d, "example.com.", RecordType::A),
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(answer.id(), 0x0c0d);
    assert_eq!(answer.response_code(), ResponseCode::ServFail);
}

#[tokio::test]
async fn a_slow_upstream_does_not_hold_up_local_answers() {
    let silent = silent_upstream().await;
    let server = DnsServer::start(localhost(), table(), vec![silent.addr()])
        .await
        .expect("start DNS server");
    let addr = server.local_addr();

    // One UDP socket asks for an unknown name, then a known one: the known one comes back first.
    let socket = UdpSocket::bind(localhost()).await.expect("client socket");
    socket
        .send_to(&query(1, "slow.example.", RecordType::A), addr)
        .await
        .expect("send");
    socket
        .send_to(&query(2, "web.", RecordType::A), addr)
        .await
        .expect("send");
    let mut buf = vec![0u8; 65535];
    let (len, _) = tokio::time::timeout(Duration::from_millis(1500), socket.recv_from(&mut buf))
        .await
        .expect("the local answer does not wait for the upstream")
        .expect("receive");
    let first = Message::from_vec(&buf[..len]).expect("parse");
    assert_eq!(first.id(), 2);
    assert_eq!(a_answers(&first), vec![WEB, WEB_2]);

    // Same on one TCP connection carrying both queries.
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    send_frame(&mut stream, &query(3, "slow.example.", RecordType::A)).await;
    send_frame(&mut stream, &query(4, "db.", RecordType::A)).await;
    let first = tokio::time::timeout(Duration::from_millis(1500), read_frame(&mut stream))
        .await
        .expect("the local answer does not wait for the upstream");
    assert_eq!(first.id(), 4);
    let second = read_frame(&mut stream).await;
    assert_eq!(second.id(), 3);
    assert_eq!(second.response_code(), ResponseCode::ServFail);
}

#[tokio::test]
async fn replacing_the_table_changes_the_answers() {
    let names = table();
    let upstream = fake_upstream().await;
    let server = DnsServer::start(localhost(), names.clone(), vec![upstream.addr])
        .await
        .expect("start DNS server");
    let addr = server.local_addr();
    assert_eq!(
        a_answers(&ask_udp(addr, &query(1, "web.", RecordType::A)).await),
        vec![WEB, WEB_2]
    );

    let moved = Ipv4Addr::new(172, 30, 0, 9);
    names.replace(HashMap::from([("cache".to_string(), vec![moved])]));
    assert_eq!(
        a_answers(&ask_udp(addr, &query(2, "cache.", RecordType::A)).await),
        vec![moved]
    );
    // "web" is gone: its query now goes to the upstream.
    assert_eq!(
        a_answers(&ask_udp(addr, &query(3, "web.", RecordType::A)).await),
        vec![UPSTREAM_UDP_ANSWER]
    );
    let answer = ask_udp(addr, &query(4, "9.0.30.172.in-addr.arpa.", RecordType::PTR)).await;
    assert!(matches!(
        answer.answers().first().map(|record| record.data()),
        Some(RData::PTR(ptr)) if ptr.0.to_ascii() == "cache."
    ));
}

#[tokio::test]
async fn garbage_is_ignored_and_the_server_goes_on() {
    let server = DnsServer::start(localhost(), table(), vec![])
        .await
        .expect("start DNS server");
    let addr = server.local_addr();

    let socket = UdpSocket::bind(localhost()).await.expect("client socket");
    for garbage in [
        &b""[..],
        b"\x12",
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff",
        &[0xff; 300],
    ] {
        socket.send_to(garbage, addr).await.expect("send garbage");
    }
    // A response sent to the server is not answered either.
    let mut response = Message::from_vec(&query(5, "web.", RecordType::A)).expect("parse");
    response.set_message_type(MessageType::Response);
    socket
        .send_to(&response.to_vec().expect("encode"), addr)
        .await
        .expect("send response");
    socket
        .send_to(&query(6, "web.", RecordType::A), addr)
        .await
        .expect("send query");
    let mut buf = vec![0u8; 65535];
    let (len, _) = tokio::time::timeout(Duration::from_secs(2), socket.recv_from(&mut buf))
        .await
        .expect("an answer")
        .expect("receive");
    let answer = Message::from_vec(&buf[..len]).expect("parse");
    assert_eq!(answer.id(), 6, "only the real query gets an answer");
    assert_eq!(a_answers(&answer), vec![WEB, WEB_2]);

    // Over TCP, garbage closes the connection; new connections are still served.
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    send_frame(&mut stream, &[0xff; 40]).await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut rest))
        .await
        .expect("the server closes the connection");
    assert!(read.is_err() || rest.is_empty(), "no answer to garbage");
    let answer = ask_tcp(addr, &query(7, "db.", RecordType::A)).await;
    assert_eq!(a_answers(&answer), vec![DB]);
}

#[tokio::test]
async fn answers_too_big_for_udp_are_truncated() {
    let names = Arc::new(NameTable::default());
    let many: Vec<Ipv4Addr> = (1..=100).map(|i| Ipv4Addr::new(10, 9, 0, i)).collect();
    names.replace(HashMap::from([("replicas".to_string(), many.clone())]));
    let server = DnsServer::start(localhost(), names, vec![])
        .await
        .expect("start DNS server");
    let answer = ask_udp(server.local_addr(), &query(1, "replicas.", RecordType::A)).await;
    assert!(answer.truncated(), "100 addresses do not fit 512 bytes");
    assert!(answer.answers().is_empty());

    // With EDNS the client can take more than 512 bytes; 100 records still need TCP.
    let mut edns_query = Message::from_vec(&query(2, "replicas.", RecordType::A)).expect("parse");
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    edns_query.set_edns(edns);
    let answer = ask_udp(server.local_addr(), &edns_query.to_vec().expect("encode")).await;
    assert!(answer.truncated());
    assert!(
        answer.extensions().is_some(),
        "an EDNS query gets an EDNS answer"
    );

    let answer = ask_tcp(server.local_addr(), &query(3, "replicas.", RecordType::A)).await;
    assert!(!answer.truncated());
    assert_eq!(a_answers(&answer), many);
}

/// Binds UDP and TCP on `addr`, retrying for a short while: the server's tasks are cancelled by
/// the runtime right after the drop.
async fn bind_again(addr: SocketAddr) -> (UdpSocket, TcpListener) {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let udp = UdpSocket::bind(addr).await;
        let tcp = TcpListener::bind(addr).await;
        match (udp, tcp) {
            (Ok(udp), Ok(tcp)) => return (udp, tcp),
            (udp, tcp) if Instant::now() > deadline => {
                panic!("port still taken: udp {:?}, tcp {:?}", udp.err(), tcp.err())
            }
            _ => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

#[tokio::test]
async fn dropping_the_server_frees_its_port() {
    let server = DnsServer::start(localhost(), table(), vec![])
        .await
        .expect("start DNS server");
    let addr = server.local_addr();
    assert_eq!(
        a_answers(&ask_udp(addr, &query(1, "web.", RecordType::A)).await),
        vec![WEB, WEB_2]
    );

    let err = match DnsServer::start(addr, table(), vec![]).await {
        Ok(_) => panic!("a second server bound the same address"),
        Err(err) => err,
    };
    assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);

    drop(server);
    let _taken = bind_again(addr).await;
}

#[tokio::test]
async fn dropping_the_server_while_a_query_is_forwarded_frees_the_port() {
    let silent = silent_upstream().await;
    let server = DnsServer::start(localhost(), table(), vec![silent.addr()])
        .await
        .expect("start DNS server");
    let addr = server.local_addr();
    let socket = UdpSocket::bind(localhost()).await.expect("client socket");
    socket
        .send_to(&query(1, "pending.example.", RecordType::A), addr)
        .await
        .expect("send");
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    send_frame(&mut stream, &query(2, "pending.example.", RecordType::A)).await;
    // Wait until both queries are being forwarded.
    let mut buf = [0u8; 512];
    let n = silent
        .udp
        .recv(&mut buf)
        .await
        .expect("the UDP query reaches the upstream");
    assert!(n > 0);
    let (_forwarded, _) = silent
        .tcp
        .accept()
        .await
        .expect("the TCP query reaches the upstream");

    drop(server);
    let _taken = bind_again(addr).await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut rest))
        .await
        .expect("the open TCP connection is closed");
    assert!(read.is_err() || rest.is_empty());
}

#[test]
fn resolv_conf_nameservers_in_order() {
    let text = "\
# generated
search example.com
nameserver 10.0.0.2
nameserver   2001:db8::1  # comment
;nameserver 10.0.0.9
options edns0
nameserver 127.0.0.53
nameserver fe80::1%1
nameserver not-an-address
nameserver
nameserver 10.0.0.2
";
    let expected: Vec<SocketAddr> = vec![
        "10.0.0.2:53".parse().expect("address"),
        "[2001:db8::1]:53".parse().expect("address"),
        "127.0.0.53:53".parse().expect("address"),
        "[fe80::1%1]:53".parse().expect("address"),
    ];
    assert_eq!(upstreams_from_resolv_conf(text), expected);
    assert!(upstreams_from_resolv_conf("").is_empty());
    assert_eq!(
        upstreams_from_resolv_conf("nameserver fe80::1%lo\n"),
        vec!["[fe80::1%1]:53".parse::<SocketAddr>().expect("address")],
        "an interface zone is turned into its index"
    );
}
