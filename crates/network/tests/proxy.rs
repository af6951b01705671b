//! Published ports as a client on the host sees them: connections and datagrams through a
//! [`PortProxy`] to a server standing for the container.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;
use vessel_network::proxy::{PortProxy, Proto};

/// What the echo server writes once its client has stopped sending.
const TRAILER: &[u8] = b"[end of input seen]";

fn localhost() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, 0))
}

/// Aborts a server task when the test ends.
struct Server {
    addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP server that echoes what it reads and, when its client shuts its write half, sends
/// [`TRAILER`] and closes.
async fn tcp_echo() -> Server {
    let listener = TcpListener::bind(localhost()).await.expect("bind echo");
    let addr = listener.local_addr().expect("echo address");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) => break,
                        Ok(len) => {
                            if stream.write_all(&buf[..len]).await.is_err() {
                                return;
                            }
                        }
                        Err(_) => return,
                    }
                }
                let _ = stream.write_all(TRAILER).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    Server { addr, task }
}

/// A UDP server that answers each datagram with `<source address>|<datagram>`.
async fn udp_echo() -> Server {
    let socket = UdpSocket::bind(localhost()).await.expect("bind echo");
    let addr = socket.local_addr().expect("echo address");
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 65535];
        while let Ok((len, from)) = socket.recv_from(&mut buf).await {
            let mut reply = format!("{from}|").into_bytes();
            reply.extend_from_slice(&buf[..len]);
            let _ = socket.send_to(&reply, from).await;
        }
    });
    Server { addr, task }
}

/// Reads until the peer closes, within a few seconds.
async fn read_all(stream: &mut TcpStream) -> Vec<u8> {
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut received))
        .await
        .expect("the connection ends in time")
        .expect("read");
    received
}

/// Whether the peer closes `stream` (end of stream or reset) within a few seconds.
async fn is_closed(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) | Err(_) => false,
    }
}

/// Retries `attempt` for up to two seconds: a dropped proxy's tasks are cancelled right after
/// the drop, by the runtime.
async fn eventually<T, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if let Some(done) = attempt().await {
            return done;
        }
        assert!(Instant::now() < deadline, "{what} did not happen in time");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn tcp_clients_each_get_their_own_echo() {
    let echo = tcp_echo().await;
    let proxy = PortProxy::start(Proto::Tcp, localhost(), echo.addr, None)
        .await
        .expect("start proxy");
    let addr = proxy.local_addr();
    assert_ne!(addr.port(), 0, "port 0 picked a free port");
    assert_ne!(addr, echo.addr);

    let clients: Vec<_> = (0u8..8)
        .map(|n| {
            tokio::spawn(async move {
                // Big enough to take many reads and writes, different for each client.
                let payload: Vec<u8> = (0..200_000u32)
                    .map(|i| (i as u8).wrapping_mul(n + 1))
                    .collect();
                let mut stream = TcpStream::connect(addr)
                    .await
                    .expect("connect to the proxy");
                let (mut reader, mut writer) = stream.split();
                let send = async {
                    writer.write_all(&payload).await.expect("send");
                    writer.shutdown().await.expect("shut write");
                };
                let mut received = Vec::new();
                let receive = reader.read_to_end(&mut received);
                let ((), read) = tokio::join!(send, receive);
                read.expect("receive");
                let mut expected = payload.clone();
                expected.extend_from_slice(TRAILER);
                assert!(received == expected, "client {n} got someone else's bytes");
            })
        })
        .collect();
    for client in clients {
        tokio::time::timeout(Duration::from_secs(20), client)
            .await
            .expect("clients finish in time")
            .expect("client succeeded");
    }
}

#[tokio::test]
async fn tcp_half_close_reaches_the_target_and_the_answer_still_comes_back() {
    let echo = tcp_echo().await;
    let proxy = PortProxy::start(Proto::Tcp, localhost(), echo.addr, None)
        .await
        .expect("start proxy");
    let mut stream = TcpStream::connect(proxy.local_addr())
        .await
        .expect("connect");
    stream.write_all(b"hello").await.expect("send");
    stream.shutdown().await.expect("shut write");
    // The target only sends the trailer once it has seen the end of input; the client, which
    // has stopped writing, still reads all of it.
    let received = read_all(&mut stream).await;
    assert_eq!(received, [&b"hello"[..], TRAILER].concat());
}

#[tokio::test]
async fn tcp_through_a_marked_proxy() {
    let echo = tcp_echo().await;
    let proxy = PortProxy::start(Proto::Tcp, localhost(), echo.addr, Some(0x2a))
        .await
        .expect("start proxy with a firewall mark (needs CAP_NET_ADMIN)");
    let mut stream = TcpStream::connect(proxy.local_addr())
        .await
        .expect("connect");
    stream.write_all(b"marked").await.expect("send");
    stream.shutdown().await.expect("shut write");
    assert_eq!(
        read_all(&mut stream).await,
        [&b"marked"[..], TRAILER].concat()
    );
}

#[tokio::test]
async fn tcp_target_down_closes_the_client() {
    // A port that was free a moment ago and has no listener now.
    let gone = TcpListener::bind(localhost()).await.expect("bind");
    let target = gone.local_addr().expect("address");
    drop(gone);
    let proxy = PortProxy::start(Proto::Tcp, localhost(), target, None)
        .await
        .expect("start proxy");
    let mut stream = TcpStream::connect(proxy.local_addr())
        .await
        .expect("the proxy accepts");
    assert!(
        is_closed(&mut stream).await,
        "the client is told, by a close"
    );
}

#[tokio::test]
async fn tcp_second_proxy_on_the_same_address_is_refused() {
    let echo = tcp_echo().await;
    let proxy = PortProxy::start(Proto::Tcp, localhost(), echo.addr, None)
        .await
        .expect("start proxy");
    let err = match PortProxy::start(Proto::Tcp, proxy.local_addr(), echo.addr, None).await {
        Ok(_) => panic!("a second proxy took the same port"),
        Err(err) => err,
    };
    assert_eq!(err.kind(), ErrorKind::AddrInUse, "{err}");
}

#[tokio::test]
async fn tcp_dropping_the_proxy_closes_its_connections_and_frees_the_port() {
    let echo = tcp_echo().await;
    let proxy = PortProxy::start(Proto::Tcp, localhost(), echo.addr, None)
        .await
        .expect("start proxy");
    let addr = proxy.local_addr();
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(b"ping").await.expect("send");
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .expect("echo");
    assert_eq!(&buf, b"ping");

    drop(proxy);
    assert!(
        is_closed(&mut stream).await,
        "the live connection is closed"
    );
    eventually("new connections refused", || async {
        TcpStream::connect(addr).await.is_err().then_some(())
    })
    .await;
    let _taken = eventually("binding the freed port", || async {
        TcpListener::bind(addr).await.ok()
    })
    .await;
}

async fn udp_ask(client: &UdpSocket, proxy: SocketAddr, message: &str) -> String {
    client
        .send_to(message.as_bytes(), proxy)
        .await
        .expect("send");
    let mut buf = vec![0u8; 65535];
    let (len, from) = tokio::time::timeout(Duration::from_secs(2), client.recv_from(&mut buf))
        .await
        .expect("a reply in time")
        .expect("receive");
    assert_eq!(from, proxy, "the reply comes from the proxy's address");
    String::from_utf8(buf[..len].to_vec()).expect("text reply")
}

#[tokio::test]
async fn udp_clients_each_get_their_own_replies() {
    let echo = udp_echo().await;
    let proxy = PortProxy::start(Proto::Udp, localhost(), echo.addr, None)
        .await
        .expect("start proxy");
    let addr = proxy.local_addr();
    assert_ne!(addr.port(), 0);
    let alice = UdpSocket::bind(localhost()).await.expect("client");
    let bob = UdpSocket::bind(localhost()).await.expect("client");

    let mut alice_sources = Vec::new();
    let mut bob_sources = Vec::new();
    for round in 0..5 {
        // Both send before either reads: replies must not cross.
        let message_a = format!("alice {round}");
        let message_b = format!("bob {round}");
        alice
            .send_to(message_a.as_bytes(), addr)
            .await
            .expect("send");
        let reply_b = udp_ask(&bob, addr, &message_b).await;
        let mut buf = vec![0u8; 65535];
        let (len, from) = tokio::time::timeout(Duration::from_secs(2), alice.recv_from(&mut buf))
            .await
            .expect("a reply in time")
            .expect("receive");
        assert_eq!(from, addr);
        let reply_a = String::from_utf8(buf[..len].to_vec()).expect("text");

        let (source_a, body_a) = reply_a.split_once('|').expect("echo format");
        let (source_b, body_b) = reply_b.split_once('|').expect("echo format");
        assert_eq!(body_a, message_a);
        assert_eq!(body_b, message_b);
        alice_sources.push(source_a.to_string());
        bob_sources.push(source_b.to_string());
    }
    // Each client is one flow: one socket towards the target, the same for all its datagrams.
    alice_sources.dedup();
    bob_sources.dedup();
    assert_eq!(alice_sources.len(), 1);
    assert_eq!(bob_sources.len(), 1);
    assert_ne!(alice_sources, bob_sources);
}

#[tokio::test]
async fn udp_second_proxy_refused_and_drop_frees_the_port() {
    let echo = udp_echo().await;
    let proxy = PortProxy::start(Proto::Udp, localhost(), echo.addr, Some(0x2a))
        .await
        .expect("start proxy");
    let addr = proxy.local_addr();
    let client = UdpSocket::bind(localhost()).await.expect("client");
    assert!(udp_ask(&client, addr, "hi").await.ends_with("|hi"));

    let err = match PortProxy::start(Proto::Udp, addr, echo.addr, None).await {
        Ok(_) => panic!("a second proxy took the same port"),
        Err(err) => err,
    };
    assert_eq!(err.kind(), ErrorKind::AddrInUse, "{err}");

    drop(proxy);
    let _taken = eventually("binding the freed port", || async {
        UdpSocket::bind(addr).await.ok()
    })
    .await;
}
