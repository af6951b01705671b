//! Pulls from a small in-process fake registry (axum, loopback) that can
//! misbehave: corrupt blobs, inconsistent configs, manifest lists, zstd and
//! plain layers, a bearer token server, connections dropped mid-blob.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::Response;
use common::*;
use vessel_image::ImageStore;
use vessel_registry::{
    check_auth, pull, Credentials, Error, Platform, Progress, PullStatus, RegistryConfig,
    MAX_ATTEMPTS, MAX_CONCURRENT_DOWNLOADS,
};

const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

#[derive(Default)]
struct Fake {
    port: Mutex<u16>,
    /// "<repo>/<reference>" → (content type, body)
    manifests: Mutex<HashMap<String, (String, Vec<u8>)>>,
    /// digest → content served (may not match the digest)
    blobs: Mutex<HashMap<String, Vec<u8>>>,
    /// digest → how many more responses to cut in the middle
    drops: Mutex<HashMap<String, usize>>,
    /// (user, password, token, use "access_token")
    bearer: Option<(String, String, String, bool)>,
    token_requests: AtomicUsize,
    scopes: Mutex<Vec<String>>,
    /// "GET /v2/...  range=..." lines
    log: Mutex<Vec<String>>,
    /// Hold each blob answer back a while, counting those under way.
    slow_blobs: bool,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
}

fn err(status: StatusCode, code: &str, msg: &str) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(
            serde_json::json!({"errors": [{"code": code, "message": msg}]}).to_string(),
        ))
        .unwrap()
}

async fn handle(
    State(f): State<Arc<Fake>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let path = uri.path().to_string();
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    f.log
        .lock()
        .unwrap()
        .push(format!("{method} {path} range={range}"));
    let port = *f.port.lock().unwrap();
    if let Some((user, pass, token, access)) = &f.bearer {
        if path == "/token" {
            f.token_requests.fetch_add(1, Ordering::SeqCst);
            for (k, v) in url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
                if k == "scope" {
                    f.scopes.lock().unwrap().push(v.into_owned());
                }
            }
            use base64::Engine as _;
            let want = format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
            );
            if headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                != Some(&want)
            {
                return Response::builder()
                    .status(StatusCode::UNAUTHORIZED)
                    .body(Body::from(
                        r#"{"details":"incorrect username or password"}"#,
                    ))
                    .unwrap();
            }
            let field = if *access { "access_token" } else { "token" };
            return Response::builder()
                .header(header::CONTENT_TYPE, "application/json")
                .body(Body::from(
                    serde_json::json!({field: token, "expires_in": 300}).to_string(),
                ))
                .unwrap();
        }
        let ok = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            == Some(&format!("Bearer {token}"));
        if !ok {
            let mut r = err(
                StatusCode::UNAUTHORIZED,
                "UNAUTHORIZED",
                "authentication required",
            );
            let scope = path
                .strip_prefix("/v2/")
                .and_then(|p| {
                    p.split_once("/manifests/")
                        .or_else(|| p.split_once("/blobs/"))
                })
                .map(|(repo, _)| format!(",scope=\"repository:{repo}:pull\""))
                .unwrap_or_default();
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                format!("Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"fake\"{scope}")
                    .parse()
                    .unwrap(),
            );
            return r;
        }
    }
    if path == "/v2/" {
        return Response::new(Body::from("{}"));
    }
    let Some(rest) = path.strip_prefix("/v2/") else {
        return err(StatusCode::NOT_FOUND, "NOT_FOUND", "not found");
    };
    if let Some((repo, reference)) = rest.split_once("/manifests/") {
        let m = f
            .manifests
            .lock()
            .unwrap()
            .get(&format!("{repo}/{reference}"))
            .cloned();
        return match m {
            Some((ct, body)) => Response::builder()
                .header(header::CONTENT_TYPE, ct)
                .header("Docker-Content-Digest", format!("sha256:{}", sha(&body)))
                .body(Body::from(body))
                .unwrap(),
            None => err(
                StatusCode::NOT_FOUND,
                "MANIFEST_UNKNOWN",
                "manifest unknown",
            ),
        };
    }
    if let Some((_, digest)) = rest.split_once("/blobs/") {
        if f.slow_blobs {
            let now = f.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            f.max_in_flight.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            f.in_flight.fetch_sub(1, Ordering::SeqCst);
        }
        let Some(data) = f.blobs.lock().unwrap().get(digest).cloned() else {
            return err(
                StatusCode::NOT_FOUND,
                "BLOB_UNKNOWN",
                "blob unknown to registry",
            );
        };
        let start: usize = range
            .strip_prefix("bytes=")
            .and_then(|r| r.strip_suffix('-'))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let part = data[start.min(data.len())..].to_vec();
        let drop_now = {
            let mut d = f.drops.lock().unwrap();
            match d.get_mut(digest) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    true
                }
                _ => false,
            }
        };
        let mut b = Response::builder().header(header::CONTENT_LENGTH, part.len());
        if start > 0 {
            b = b.status(StatusCode::PARTIAL_CONTENT).header(
                header::CONTENT_RANGE,
                format!("bytes {start}-{}/{}", data.len() - 1, data.len()),
            );
        }
        let body = if drop_now {
            use futures::StreamExt;
            let half = Bytes::from(part[..part.len() / 2].to_vec());
            // Let the first half reach the client, then break the connection.
            let first = futures::stream::iter(vec![Ok::<Bytes, std::io::Error>(half)]);
            let broken = futures::stream::once(async {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                Err(std::io::Error::other("connection dropped by the test"))
            });
            Body::from_stream(first.chain(broken))
        } else {
            Body::from(part)
        };
        return b.body(body).unwrap();
    }
    err(StatusCode::NOT_FOUND, "NOT_FOUND", "not found")
}

/// A running fake registry; the server task stops on drop.
struct Server {
    fake: Arc<Fake>,
    task: tokio::task::JoinHandle<()>,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Server {
    async fn start(fake: Fake) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        *fake.port.lock().unwrap() = port;
        let fake = Arc::new(fake);
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(fake.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Server { fake, task, port }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn blob(&self, data: &[u8]) -> String {
        let d = format!("sha256:{}", sha(data));
        self.fake
            .blobs
            .lock()
            .unwrap()
            .insert(d.clone(), data.to_vec());
        d
    }

    /// Store a manifest under `repo/reference` and `repo/<digest>`; returns the digest.
    fn manifest(&self, repo: &str, reference: &str, ct: &str, body: Vec<u8>) -> String {
        let d = format!("sha256:{}", sha(&body));
        let mut m = self.fake.manifests.lock().unwrap();
        m.insert(
            format!("{repo}/{reference}"),
            (ct.to_string(), body.clone()),
        );
        m.insert(format!("{repo}/{d}"), (ct.to_string(), body));
        d
    }

    /// Serve an image: `layers` are (media type, blob); returns (manifest digest, body, config digest).
    fn image(
        &self,
        repo: &str,
        tag: &str,
        mt: &str,
        config: &[u8],
        layers: &[(&str, Vec<u8>)],
    ) -> (String, Vec<u8>, String) {
        let cd = self.blob(config);
        let ldesc: Vec<serde_json::Value> = layers
            .iter()
            .map(|(t, b)| serde_json::json!({"mediaType": t, "size": b.len(), "digest": self.blob(b)}))
            .collect();
        let config_mt = if mt == OCI_MANIFEST {
            "application/vnd.oci.image.config.v1+json"
        } else {
            "application/vnd.docker.container.image.v1+json"
        };
        let body = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2, "mediaType": mt,
            "config": {"mediaType": config_mt, "size": config.len(), "digest": cd},
            "layers": ldesc,
        }))
        .unwrap();
        let d = self.manifest(repo, tag, mt, body.clone());
        (d, body, cd)
    }

    fn log(&self) -> Vec<String> {
        self.fake.log.lock().unwrap().clone()
    }
}

fn gz(d: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(d).unwrap();
    e.finish().unwrap()
}

fn zstd(d: &[u8]) -> Vec<u8> {
    ruzstd::encoding::compress_to_vec(d, ruzstd::encoding::CompressionLevel::Fastest)
}

fn assert_store_empty(root: &std::path::Path, store: &ImageStore) {
    assert!(store.list().is_empty());
    for d in ["blobs", "layers", "disks", "images", "tmp"] {
        assert_eq!(count_files(&root.join(d)), 0, "{d} is not empty");
    }
}

fn none() -> Credentials {
    Credentials::default()
}

/// (a) a blob that does not match its digest: the pull fails, nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_blob_stores_nothing() {
    let srv = Server::start(Fake::default()).await;
    let layers = sample_layers(21, false);
    let cfg_bytes = config_for(&layers, "amd64", "sh");
    let blobs: Vec<(&str, Vec<u8>)> = layers.iter().map(|l| (GZIP, gz(l))).collect();
    srv.image("bad", "1", DOCKER_MANIFEST, &cfg_bytes, &blobs);
    // Corrupt the second layer: same length, one byte changed.
    let d = format!("sha256:{}", sha(&blobs[1].1));
    {
        let mut b = srv.fake.blobs.lock().unwrap();
        let data = b.get_mut(&d).unwrap();
        let n = data.len() / 2;
        data[n] ^= 0xff;
    }
    let (dir, store) = common::store();
    let e = pull(
        &RegistryConfig::default(),
        store.clone(),
        &format!("{}/bad:1", srv.host()),
        None,
        &none(),
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::DigestMismatch {
                kind: "filesystem layer",
                ..
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        format!("filesystem layer verification failed for digest {d}")
    );
    assert_store_empty(dir.path(), &store);

    // A corrupt config.
    let cd = format!("sha256:{}", sha(&cfg_bytes));
    srv.fake
        .blobs
        .lock()
        .unwrap()
        .insert(cd.clone(), cfg_bytes.iter().map(|b| b ^ 1).collect());
    let e = pull(
        &RegistryConfig::default(),
        store.clone(),
        &format!("{}/bad:1", srv.host()),
        None,
        &none(),
        |_| {},
    )
    .await
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("image config verification failed for digest {cd}")
    );
    assert_store_empty(dir.path(), &store);
}

/// (a') a manifest that is not the one its digest names (a registry that
/// answers a pull by digest with other content): nothing is fetched further,
/// nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_that_does_not_match_its_digest_stores_nothing() {
    let srv = Server::start(Fake::default()).await;
    let layers = sample_layers(41, false);
    let cfg_bytes = config_for(&layers, "amd64", "sh");
    let blobs: Vec<(&str, Vec<u8>)> = layers.iter().map(|l| (GZIP, gz(l))).collect();
    let (_, body, _) = srv.image("swap", "1", DOCKER_MANIFEST, &cfg_bytes, &blobs);
    // The digest asked for names other content than what is served.
    let asked = format!("sha256:{}", sha(b"some other manifest"));
    srv.fake
        .manifests
        .lock()
        .unwrap()
        .insert(format!("swap/{asked}"), (DOCKER_MANIFEST.to_string(), body));
    let (dir, store) = common::store();
    let e = pull(
        &RegistryConfig::default(),
        store.clone(),
        &format!("{}/swap@{asked}", srv.host()),
        None,
        &none(),
        |_| {},
    )
    .await
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!("manifest verification failed for digest {asked}")
    );
    let fetched_blobs = srv.log().iter().filter(|l| l.contains("/blobs/")).count();
    assert_eq!(fetched_blobs, 0, "{:?}", srv.log());
    assert_store_empty(dir.path(), &store);
}

/// Layers come down several at a time, never more than the limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn layers_download_concurrently_within_the_limit() {
    let srv = Server::start(Fake {
        slow_blobs: true,
        ..Fake::default()
    })
    .await;
    let mut layers = sample_layers(51, false);
    layers.extend(sample_layers(52, false));
    let cfg_bytes = config_for(&layers, "amd64", "sh");
    let blobs: Vec<(&str, Vec<u8>)> = layers.iter().map(|l| (GZIP, gz(l))).collect();
    assert!(
        blobs.len() > MAX_CONCURRENT_DOWNLOADS,
        "{} layers",
        blobs.len()
    );
    srv.image("many", "1", DOCKER_MANIFEST, &cfg_bytes, &blobs);
    let (_dir, store) = common::store();
    pull(
        &RegistryConfig::default(),
        store.clone(),
        &format!("{}/many:1", srv.host()),
        None,
        &none(),
        |_| {},
    )
    .await
    .expect("pull");
    let max = srv.fake.max_in_flight.load(Ordering::SeqCst);
    assert!(
        (2..=MAX_CONCURRENT_DOWNLOADS).contains(&max),
        "{max} blobs at once"
    );
}

/// (b) config diff ids that do not match the layers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_id_mismatch_stores_nothing() {
    let srv = Server::start(Fake::default()).await;
    let layers = sample_layers(31, false);
    let other = sample_layers(32, false);
    // Same count, other content.
    let lying = config_for(&other, "amd64", "sh");
    let blobs: Vec<(&str, Vec<u8>)> = layers.iter().map(|l| (GZIP, gz(l))).collect();
    srv.image("lie", "1", DOCKER_MANIFEST, &lying, &blobs);
    // Wrong count.
    let short = config_for(&layers[..2], "amd64", "sh");
    srv.image("short", "1", DOCKER_MANIFEST, &short, &blobs);

    let (dir, store) = common::store();
    let cfg = RegistryConfig::default();
    let e = pull(
        &cfg,
        store.clone(),
        &format!("{}/lie:1", srv.host()),
        None,
        &none(),
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::InvalidManifest(_)), "{e}");
    assert!(
        e.to_string()
            .starts_with("layers from manifest don't match image configuration"),
        "{e}"
    );
    assert_store_empty(dir.path(), &store);

    srv.fake.log.lock().unwrap().clear();
    let e = pull(
        &cfg,
        store.clone(),
        &format!("{}/short:1", srv.host()),
        None,
        &none(),
        |_| {},
    )
    .await
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "layers from manifest don't match image configuration"
    );
    // Detected before any layer was fetched.
    let fetched_layers = srv
        .log()
        .iter()
        .filter(|l| blobs.iter().any(|(_, b)| l.contains(&sha(b))))
        .count();
    assert_eq!(fetched_layers, 0, "{:?}", srv.log());
    assert_store_empty(dir.path(), &store);
}

/// (c) a manifest list: amd64 by default, arm64 on request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_list_platforms() {
    let srv = Server::start(Fake::default()).await;
    let amd = vec![tar_of(&[("arch", b"amd64")])];
    let arm = vec![tar_of(&[("arch", b"arm64")])];
    let amd_cfg = config_for(&amd, "amd64", "sh");
    let arm_cfg = config_for(&arm, "arm64", "sh");
    let (amd_d, amd_m, amd_id) = srv.image(
        "multi",
        "amd64-only",
        DOCKER_MANIFEST,
        &amd_cfg,
        &[(GZIP, gz(&amd[0]))],
    );
    let (arm_d, arm_m, arm_id) = srv.image(
        "multi",
        "arm64-only",
        DOCKER_MANIFEST,
        &arm_cfg,
        &[(GZIP, gz(&arm[0]))],
    );
    let list = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": DOCKER_LIST,
        "manifests": [
            {"mediaType": DOCKER_MANIFEST, "size": arm_m.len(), "digest": arm_d, "platform": {"architecture": "arm64", "os": "linux", "variant": "v8"}},
            {"mediaType": DOCKER_MANIFEST, "size": amd_m.len(), "digest": amd_d, "platform": {"architecture": "amd64", "os": "linux"}},
        ],
    }))
    .unwrap();
    let list_d = srv.manifest("multi", "latest", DOCKER_LIST, list);
    let cfg = RegistryConfig::default();
    let name = format!("{}/multi", srv.host());

    let (_d1, s1) = common::store();
    let p = pull(&cfg, s1.clone(), &name, None, &none(), |_| {})
        .await
        .unwrap();
    assert_eq!(p.image_id, amd_id);
    assert_eq!(p.digest, list_d, "the repo digest is the list's");
    assert_eq!(
        s1.resolve(&name).unwrap().repo_digests,
        vec![format!("{name}@{list_d}")]
    );

    let (_d2, s2) = common::store();
    let p = pull(
        &cfg,
        s2.clone(),
        &name,
        Some(Platform::parse("linux/arm64").unwrap()),
        &none(),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(p.image_id, arm_id);
    assert_eq!(s2.resolve(&name).unwrap().config.architecture, "arm64");

    let (_d3, s3) = common::store();
    let e = pull(
        &cfg,
        s3.clone(),
        &name,
        Some(Platform::parse("linux/s390x").unwrap()),
        &none(),
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::NoMatchingPlatform(_)));
    assert_eq!(
        e.to_string(),
        "no matching manifest for linux/s390x in the manifest list entries"
    );
    // A single-platform image for another platform than asked.
    let e = pull(
        &cfg,
        s3.clone(),
        &format!("{name}:arm64-only"),
        Some(Platform::default()),
        &none(),
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string().contains(
            "does not match the specified platform: wanted linux/amd64, actual: linux/arm64"
        ),
        "{e}"
    );
    assert!(s3.list().is_empty());
}

/// (d) zstd, uncompressed and gzip layers in one OCI image; foreign layers refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zstd_and_plain_layers() {
    let srv = Server::start(Fake::default()).await;
    let layers = sample_layers(41, false);
    let cfg_bytes = config_for(&layers, "amd64", "sh");
    let blobs = vec![
        (
            "application/vnd.oci.image.layer.v1.tar+zstd",
            zstd(&layers[0]),
        ),
        ("application/vnd.oci.image.layer.v1.tar", layers[1].clone()),
        (
            "application/vnd.oci.image.layer.v1.tar+gzip",
            gz(&layers[2]),
        ),
    ];
    let (_, _, id) = srv.image("mixed", "1", OCI_MANIFEST, &cfg_bytes, &blobs);
    // The same behind an OCI index.
    let m = srv
        .fake
        .manifests
        .lock()
        .unwrap()
        .get("mixed/1")
        .cloned()
        .unwrap()
        .1;
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_MANIFEST, "size": m.len(), "digest": format!("sha256:{}", sha(&m)), "platform": {"architecture": "amd64", "os": "linux"}}],
    }))
    .unwrap();
    srv.manifest("mixed", "idx", OCI_INDEX, index);

    let cfg = RegistryConfig::default();
    let (_d, store) = common::store();
    let p = pull(
        &cfg,
        store.clone(),
        &format!("{}/mixed:1", srv.host()),
        None,
        &none(),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(p.image_id, id);
    let img = store.resolve(&id).unwrap();
    for (l, raw) in img.layers.iter().zip(&layers) {
        let (mut f, size) = store.open_layer(l).unwrap();
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut f, &mut got).unwrap();
        assert_eq!(size as usize, raw.len());
        assert_eq!(&got, raw);
    }
    assert!(store.boot_disk(&id).unwrap().is_file());
    let (_d2, s2) = common::store();
    let p = pull(
        &cfg,
        s2.clone(),
        &format!("{}/mixed:idx", srv.host()),
        None,
        &none(),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(p.image_id, id);

    // Foreign layers are refused before anything is fetched.
    let foreign = vec![(
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        gz(&layers[0]),
    )];
    let one = config_for(&layers[..1], "amd64", "sh");
    srv.image("foreign", "1", DOCKER_MANIFEST, &one, &foreign);
    let (_d3, s3) = common::store();
    let e = pull(
        &cfg,
        s3.clone(),
        &format!("{}/foreign:1", srv.host()),
        None,
        &none(),
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::UnsupportedMediaType(_)), "{e}");
    assert!(
        e.to_string()
            .contains("foreign (non-distributable) layers are not supported"),
        "{e}"
    );
    assert!(s3.list().is_empty());
}

/// (e) bearer token challenge: token fetched with basic credentials, cached,
/// `access_token` accepted; bad credentials are Unauthorized.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_flow() {
    for access in [false, true] {
        let srv = Server::start(Fake {
            bearer: Some(("bob".into(), "pw".into(), format!("tok-{access}"), access)),
            ..Default::default()
        })
        .await;
        let layers = sample_layers(51, false);
        let cfg_bytes = config_for(&layers, "amd64", "sh");
        let blobs: Vec<(&str, Vec<u8>)> = layers.iter().map(|l| (GZIP, gz(l))).collect();
        let (_, _, id) = srv.image("team/app", "1", DOCKER_MANIFEST, &cfg_bytes, &blobs);
        let cfg = RegistryConfig::default();
        let good = Credentials {
            username: "bob".into(),
            password: "pw".into(),
            ..Default::default()
        };
        let bad = Credentials {
            username: "bob".into(),
            password: "nope".into(),
            ..Default::default()
        };
        let name = format!("{}/team/app:1", srv.host());

        let (_d1, s1) = common::store();
        let e = pull(&cfg, s1.clone(), &name, None, &bad, |_| {})
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Unauthorized(_)), "{e}");
        assert_eq!(
            e.to_string(),
            "unauthorized: incorrect username or password"
        );
        assert!(s1.list().is_empty());

        let before = srv.fake.token_requests.load(Ordering::SeqCst);
        let p = pull(&cfg, s1.clone(), &name, None, &good, |_| {})
            .await
            .unwrap();
        assert_eq!(p.image_id, id);
        assert_eq!(srv.fake.token_requests.load(Ordering::SeqCst), before + 1);
        assert!(srv
            .fake
            .scopes
            .lock()
            .unwrap()
            .contains(&"repository:team/app:pull".to_string()));
        // A second pull reuses the cached token.
        let (_d2, s2) = common::store();
        pull(&cfg, s2.clone(), &name, None, &good, |_| {})
            .await
            .unwrap();
        assert_eq!(srv.fake.token_requests.load(Ordering::SeqCst), before + 1);

        assert_eq!(
            check_auth(&cfg, &srv.host(), &good).await.unwrap().status,
            "Login Succeeded"
        );
        let e = check_auth(&cfg, &srv.host(), &bad).await.unwrap_err();
        assert!(matches!(e, Error::Unauthorized(_)), "{e}");
    }
}

/// (f) a connection dropped mid-blob: resumed with a Range request; when it
/// keeps failing the pull fails cleanly and a later pull succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connection() {
    let srv = Server::start(Fake::default()).await;
    let layers = sample_layers(61, false);
    let cfg_bytes = config_for(&layers, "amd64", "sh");
    let blobs: Vec<(&str, Vec<u8>)> = layers.iter().map(|l| (GZIP, gz(l))).collect();
    let (_, _, id) = srv.image("flaky", "1", DOCKER_MANIFEST, &cfg_bytes, &blobs);
    let big = format!("sha256:{}", sha(&blobs[1].1));
    let cfg = RegistryConfig::default();
    let name = format!("{}/flaky:1", srv.host());

    // Always broken: the pull fails, nothing stored.
    srv.fake
        .drops
        .lock()
        .unwrap()
        .insert(big.clone(), MAX_ATTEMPTS as usize);
    let (dir, store) = common::store();
    let ev = Events::default();
    let e = pull(&cfg, store.clone(), &name, None, &none(), ev.sink())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Transport { .. }), "{e}");
    assert_store_empty(dir.path(), &store);
    assert!(ev
        .take()
        .iter()
        .any(|p| matches!(p, Progress::Retrying { .. })));
    let resumed = srv
        .log()
        .iter()
        .filter(|l| l.contains(&big) && l.contains("range=bytes="))
        .count();
    assert!(resumed >= 1, "{:?}", srv.log());

    // Then the server recovers: a new pull succeeds.
    let p = pull(&cfg, store.clone(), &name, None, &none(), |_| {})
        .await
        .unwrap();
    assert_eq!(p.image_id, id);
    assert_eq!(p.status, PullStatus::Downloaded);

    // Broken once: resumed within the same pull.
    srv.fake.drops.lock().unwrap().insert(big.clone(), 1);
    srv.fake.log.lock().unwrap().clear();
    let (_d2, s2) = common::store();
    let p = pull(&cfg, s2.clone(), &name, None, &none(), |_| {})
        .await
        .unwrap();
    assert_eq!(p.image_id, id);
    let ranged: Vec<String> = srv
        .log()
        .into_iter()
        .filter(|l| l.contains(&big) && l.contains("range=bytes="))
        .collect();
    assert_eq!(ranged.len(), 1, "{:?}", srv.log());
    assert!(!ranged[0].ends_with("range=bytes=0-"), "{ranged:?}");
}
