//! `docker import <URL>`: the daemon downloads the archive (plain, gzip or
//! zstd) from a small HTTP server the test runs on 127.0.0.1, and imports
//! it with `--change`, `-m` and a tag; a bad URL, a refused connection, an
//! error status, a bad tag or change and a download cut short get dockerd's
//! answers and leave nothing in the store.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use common::{stderr, stdout, Daemon};

/// How a route sends its body.
#[derive(Clone, Copy)]
enum Length {
    /// With `Content-Length`.
    Exact,
    /// Without: the body ends when the connection closes.
    UntilClose,
    /// `Content-Length` of the whole body, then half of it and a close.
    Cut,
}

#[derive(Clone)]
struct Route {
    status: &'static str,
    body: Vec<u8>,
    length: Length,
}

/// A plain HTTP/1.1 file server on a free 127.0.0.1 port, one thread per
/// connection, counting the requests per path.
struct FileServer {
    port: u16,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl FileServer {
    fn start(routes: HashMap<&'static str, Route>) -> FileServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1");
        let port = listener.local_addr().expect("local addr").port();
        let hits = Arc::new(Mutex::new(HashMap::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let routes = Arc::new(routes);
        let accept = {
            let (hits, stop) = (hits.clone(), stop.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let (routes, hits) = (routes.clone(), hits.clone());
                    std::thread::spawn(move || serve(conn, &routes, &hits));
                }
            })
        };
        FileServer {
            port,
            hits,
            stop,
            accept: Some(accept),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn hits(&self, path: &str) -> usize {
        self.hits
            .lock()
            .map(|h| h.get(path).copied().unwrap_or(0))
            .unwrap_or(0)
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    mut conn: TcpStream,
    routes: &HashMap<&'static str, Route>,
    hits: &Mutex<HashMap<String, usize>>,
) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match conn.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    let head = String::from_utf8_lossy(&head);
    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
    if let Ok(mut h) = hits.lock() {
        *h.entry(path.clone()).or_default() += 1;
    }
    let route = routes.get(path.as_str()).cloned().unwrap_or(Route {
        status: "404 Not Found",
        body: b"404 page not found\n".to_vec(),
        length: Length::Exact,
    });
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: application/octet-stream\r\n",
        route.status
    );
    let body: &[u8] = match route.length {
        Length::Exact => {
            out.push_str(&format!("Content-Length: {}\r\n", route.body.len()));
            &route.body
        }
        Length::UntilClose => &route.body,
        Length::Cut => {
            out.push_str(&format!("Content-Length: {}\r\n", route.body.len()));
            &route.body[..route.body.len() / 2]
        }
    };
    out.push_str("Connection: close\r\n\r\n");
    let _ = conn.write_all(out.as_bytes());
    let _ = conn.write_all(body);
    let _ = conn.flush();
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).expect("gzip");
    enc.finish().expect("gzip")
}

fn zstd(data: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
}

fn ok_route(body: Vec<u8>, length: Length) -> Route {
    Route {
        status: "200 OK",
        body,
        length,
    }
}

#[test]
fn import_from_a_url() {
    let rootfs = common::busybox_rootfs(&[("/etc/motd", "from the web\n")]);
    let server = FileServer::start(HashMap::from([
        ("/rootfs.tar", ok_route(rootfs.clone(), Length::Exact)),
        (
            "/rootfs.tar.gz",
            ok_route(gzip(&rootfs), Length::UntilClose),
        ),
        ("/rootfs.tar.zst", ok_route(zstd(&rootfs), Length::Exact)),
    ]));
    let d = Daemon::start_with(&["--warm-vms", "0"]);

    // Plain tar, with changes, a message and a tag.
    let url = server.url("/rootfs.tar");
    let out = d.ok(&[
        "import",
        "-c",
        r#"CMD ["cat", "/etc/motd"]"#,
        "--change",
        "ENV ORIGIN=web",
        "--change",
        "HEALTHCHECK --interval=2s --retries=4 CMD test -f /etc/motd",
        "-m",
        "fetched over http",
        &url,
        "web:plain",
    ]);
    assert!(out.contains(&format!("Downloading from {url}")), "{out}");
    let id = out.lines().last().unwrap_or("").trim().to_string();
    assert!(id.starts_with("sha256:"), "{out}");
    assert_eq!(server.hits("/rootfs.tar"), 1);
    let inspect = d.ok(&[
        "image",
        "inspect",
        "-f",
        "{{.Id}}|{{.Comment}}|{{json .Config.Cmd}}|{{json .Config.Env}}",
        "web:plain",
    ]);
    assert_eq!(
        inspect.trim(),
        format!(r#"{id}|fetched over http|["cat","/etc/motd"]|["ORIGIN=web"]"#)
    );
    assert_eq!(d.ok(&["run", "--rm", "web:plain"]), "from the web\n");
    let hc = d.ok(&[
        "image",
        "inspect",
        "-f",
        "{{json .Config.Healthcheck}}",
        "web:plain",
    ]);
    assert_eq!(
        hc.trim(),
        r#"{"Test":["CMD-SHELL","test -f /etc/motd"],"Interval":2000000000,"Retries":4}"#
    );

    // gzip without a Content-Length; the comment says where it came from.
    let gz = server.url("/rootfs.tar.gz");
    d.ok(&["import", &gz, "web:gz"]);
    let comment = d.ok(&["image", "inspect", "-f", "{{.Comment}}", "web:gz"]);
    assert_eq!(comment.trim(), format!("Imported from {gz}"));
    let history = d.ok(&[
        "history",
        "--no-trunc",
        "--format",
        "{{.Comment}}",
        "web:gz",
    ]);
    assert_eq!(history.trim(), format!("Imported from {gz}"));
    assert_eq!(
        d.ok(&["run", "--rm", "web:gz", "cat", "/etc/motd"]),
        "from the web\n"
    );

    // zstd; the same content is the same layer.
    d.ok(&["import", &server.url("/rootfs.tar.zst"), "web:zst"]);
    let diff = |r: &str| d.ok(&["image", "inspect", "-f", "{{json .RootFS.Layers}}", r]);
    assert_eq!(diff("web:zst"), diff("web:gz"));
    assert_eq!(diff("web:zst"), diff("web:plain"));

    // Docker's progress stream, seen through the API; a source without a
    // scheme is http://, as dockerd reads it.
    let (status, _, body) = d.http(
        "POST",
        &format!(
            "/images/create?fromSrc=127.0.0.1:{}/rootfs.tar&repo=raw&tag=1",
            server.port
        ),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let lines: Vec<serde_json::Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(
        lines[0],
        serde_json::json!({"status": format!("Downloading from {url}")})
    );
    let importing: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["status"] == "Importing")
        .collect();
    let last = importing.last().expect("Importing progress");
    assert_eq!(last["progressDetail"]["current"], rootfs.len());
    assert_eq!(last["progressDetail"]["total"], rootfs.len());
    assert!(
        last["progress"]
            .as_str()
            .is_some_and(|p| p.starts_with("[=")),
        "{last}"
    );
    assert!(
        lines
            .last()
            .and_then(|l| l["status"].as_str())
            .is_some_and(|s| s.starts_with("sha256:")),
        "{body}"
    );
    assert_eq!(
        d.ok(&["run", "--rm", "raw:1", "cat", "/etc/motd"]),
        "from the web\n"
    );
}

#[test]
fn import_url_errors_leave_nothing() {
    let rootfs = common::busybox_rootfs(&[]);
    let server = FileServer::start(HashMap::from([
        (
            "/missing.tar",
            Route {
                status: "404 Not Found",
                body: b"no such file\n".to_vec(),
                length: Length::Exact,
            },
        ),
        (
            "/private.tar",
            Route {
                status: "403 Forbidden",
                body: b"go away".to_vec(),
                length: Length::Exact,
            },
        ),
        (
            "/broken.tar",
            Route {
                status: "500 Internal Server Error",
                body: b"oops".to_vec(),
                length: Length::Exact,
            },
        ),
        ("/cut.tar", ok_route(gzip(&rootfs), Length::Cut)),
        ("/rootfs.tar", ok_route(rootfs.clone(), Length::Exact)),
    ]));
    let d = Daemon::start_with(&["--warm-vms", "0"]);

    // An error status: its code and the server's words, before any stream.
    let missing = server.url("/missing.tar");
    let out = d.docker(&["import", &missing, "nothing:1"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        stderr(&out).contains(&format!(
            "Error response from daemon: failed to GET {missing} with status 404 Not Found: no such file"
        )),
        "{}",
        stderr(&out)
    );
    for (path, code, text) in [
        ("/missing.tar", 404, "404 Not Found: no such file"),
        ("/private.tar", 403, "403 Forbidden: go away"),
        ("/broken.tar", 500, "500 Internal Server Error: oops"),
    ] {
        let (status, _, body) = d.http(
            "POST",
            &format!("/images/create?fromSrc={}", server.url(path)),
            None,
        );
        assert_eq!(status, code, "{path}: {body}");
        assert!(body.contains(text), "{path}: {body}");
    }

    // Nothing listening.
    let closed = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let refused = format!("http://127.0.0.1:{closed}/rootfs.tar");
    let out = d.docker(&["import", &refused]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&format!("Error response from daemon: Get \"{refused}\": ")),
        "{err}"
    );
    assert!(err.to_lowercase().contains("connection refused"), "{err}");

    // A URL that does not parse: 400.
    let out = d.docker(&["import", "http://[::1/rootfs.tar"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("Error response from daemon: parse \"http://[::1/rootfs.tar\": "),
        "{}",
        stderr(&out)
    );
    let (status, _, body) = d.http("POST", "/images/create?fromSrc=http://", None);
    assert_eq!(status, 400, "{body}");

    // A bad tag is refused before anything is fetched.
    let (status, _, body) = d.http(
        "POST",
        &format!(
            "/images/create?fromSrc={}&repo=Bad",
            server.url("/rootfs.tar")
        ),
        None,
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(server.hits("/rootfs.tar"), 0);

    // A bad change (the CLI checks them itself, so through the API): the
    // download had begun, so the error ends the stream.
    let (status, _, body) = d.http(
        "POST",
        &format!(
            "/images/create?fromSrc={}&changes=BOGUS%20x",
            server.url("/rootfs.tar")
        ),
        None,
    );
    assert_eq!(status, 200, "{body}");
    let last: serde_json::Value =
        serde_json::from_str(body.lines().last().unwrap_or("")).expect("JSON line");
    assert_eq!(
        last["error"], "dockerfile parse error on line 1: unknown instruction: BOGUS",
        "{body}"
    );

    // The server closes the connection half-way through the body.
    let out = d.docker(&["import", &server.url("/cut.tar"), "cut:1"]);
    assert!(!out.status.success(), "{}", stdout(&out));
    assert!(
        stdout(&out).contains("Downloading from"),
        "{}",
        stdout(&out)
    );
    assert!(!stderr(&out).trim().is_empty());

    assert_eq!(d.ok(&["images", "-a", "-q"]), "");
    let left = d.image_store_files();
    assert!(left.is_empty(), "store not empty: {left:?}");
}
