//! Push and pull against Debian's `docker-registry` (distribution 2.8) on
//! loopback: plain HTTP, htpasswd basic auth, TLS with a test CA, and as a
//! Docker Hub mirror.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use vessel_registry::{
    check_auth, pull, push, Credentials, Error, Progress, PullStatus, RegistryConfig,
};

fn has<F: Fn(&Progress) -> bool>(ev: &[Progress], f: F) -> bool {
    ev.iter().any(f)
}

/// Push a 3-layer image (one layer > 8 MiB), pull it into an empty store,
/// pull by digest, pull again (up to date), push again (layers exist), and
/// push to a second repository (cross-repository mount).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_pull_plain_http() {
    let reg = RegistryProc::start(RegistryOpts::default());
    let cfg = RegistryConfig::default();
    let none = Credentials::default();
    let (_d1, src) = store();
    let layers = sample_layers(1, true);
    let repo = format!("{}/a", reg.host());
    let id = load_image(&src, &layers, &[&format!("{repo}:v1")], "sh");

    let ev = Events::default();
    let out = push(&cfg, src.clone(), &format!("{repo}:v1"), &none, ev.sink())
        .await
        .unwrap_or_else(|e| panic!("push: {e}\n{}", reg.log()));
    let events = ev.take();
    assert_eq!(out.tag, "v1");
    assert!(out.digest.starts_with("sha256:"));
    assert!(has(
        &events,
        |p| matches!(p, Progress::PushRefersTo { repository } if *repository == repo)
    ));
    assert_eq!(
        events
            .iter()
            .filter(|p| matches!(p, Progress::Pushed { .. }))
            .count(),
        3
    );
    assert!(has(
        &events,
        |p| matches!(p, Progress::Pushing { current, total, .. } if current == total && *total > 8 << 20)
    ));
    assert!(
        matches!(events.last(), Some(Progress::PushDigest { tag, digest, size }) if tag == "v1" && *digest == out.digest && *size == out.size)
    );
    let img = src.resolve(&id).unwrap();
    assert_eq!(img.repo_digests, vec![format!("{repo}@{}", out.digest)]);

    // Pull into an empty store.
    let (_d2, dst) = store();
    let ev = Events::default();
    let p = pull(
        &cfg,
        dst.clone(),
        &format!("{repo}:v1"),
        None,
        &none,
        ev.sink(),
    )
    .await
    .unwrap_or_else(|e| panic!("pull: {e}\n{}", reg.log()));
    let events = ev.take();
    assert_eq!(p.image_id, id);
    assert_eq!(p.digest, out.digest);
    assert_eq!(p.status, PullStatus::Downloaded);
    assert_eq!(p.reference, format!("{repo}:v1"));
    let pulled = dst.resolve(&format!("{repo}:v1")).unwrap();
    assert_eq!(pulled.id, img.id);
    assert_eq!(pulled.layers, img.layers);
    assert_eq!(pulled.raw_config, img.raw_config);
    assert_eq!(pulled.repo_digests, vec![format!("{repo}@{}", out.digest)]);
    assert_eq!(pulled.size, img.size);
    for l in &img.layers {
        assert!(dst.has_layer(l));
        assert_eq!(dst.blob_records(l).len(), 1);
        assert_eq!(dst.blob_records(l)[0].repository, repo);
    }
    assert!(dst.boot_disk(&pulled.id).unwrap().is_file());
    assert!(
        matches!(&events[0], Progress::PullingFrom { id, repository } if id == "v1" && repository == "a")
    );
    for s in [
        "PullingFsLayer",
        "Downloading",
        "VerifyingChecksum",
        "DownloadComplete",
        "Extracting",
        "PullComplete",
    ] {
        assert!(
            events.iter().any(|e| format!("{e:?}").starts_with(s)),
            "no {s} event: {events:?}"
        );
    }
    assert!(has(
        &events,
        |e| matches!(e, Progress::Digest { digest } if *digest == out.digest)
    ));
    assert!(
        matches!(events.last(), Some(Progress::DownloadedNewerImage { reference }) if *reference == format!("{repo}:v1"))
    );
    // rmi by repo digest works.
    let (_d, probe) = store();
    pull(
        &cfg,
        probe.clone(),
        &format!("{repo}:v1"),
        None,
        &none,
        |_| {},
    )
    .await
    .unwrap();
    let items = probe
        .remove(&format!("{repo}@{}", out.digest), false, &|_| Vec::new())
        .unwrap();
    assert_eq!(
        items,
        vec![vessel_image::DeleteItem::Untagged(format!(
            "{repo}@{}",
            out.digest
        ))]
    );

    // Pull again: up to date, nothing fetched.
    let ev = Events::default();
    let p2 = pull(
        &cfg,
        dst.clone(),
        &format!("{repo}:v1"),
        None,
        &none,
        ev.sink(),
    )
    .await
    .unwrap();
    let events = ev.take();
    assert_eq!(p2.status, PullStatus::UpToDate);
    assert!(
        !has(&events, |e| matches!(
            e,
            Progress::Downloading { .. } | Progress::PullingFsLayer { .. }
        )),
        "{events:?}"
    );
    assert!(matches!(
        events.last(),
        Some(Progress::ImageUpToDate { .. })
    ));

    // Pull by digest into a third store: no tag, the repo digest.
    let (_d3, third) = store();
    let by_digest = format!("{repo}@{}", out.digest);
    let p3 = pull(&cfg, third.clone(), &by_digest, None, &none, |_| {})
        .await
        .unwrap();
    assert_eq!(p3.image_id, id);
    assert_eq!(p3.reference, by_digest);
    let i3 = third.resolve(&by_digest).unwrap();
    assert!(i3.repo_tags.is_empty());
    assert_eq!(i3.repo_digests, vec![by_digest.clone()]);

    // A layer already present is not fetched ("Already exists").
    let (_d4, partial) = store();
    load_image(&partial, &layers[..1], &["base:1"], "sh");
    let ev = Events::default();
    pull(
        &cfg,
        partial.clone(),
        &format!("{repo}:v1"),
        None,
        &none,
        ev.sink(),
    )
    .await
    .unwrap();
    let events = ev.take();
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Progress::AlreadyExists { .. }))
            .count(),
        1
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Progress::PullComplete { .. }))
            .count(),
        2
    );

    // Push again from the pulled store: every layer exists, same manifest.
    let ev = Events::default();
    let again = push(&cfg, dst.clone(), &format!("{repo}:v1"), &none, ev.sink())
        .await
        .unwrap();
    let events = ev.take();
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Progress::LayerAlreadyExists { .. }))
            .count(),
        3,
        "{events:?}"
    );
    assert!(!has(&events, |e| matches!(e, Progress::Pushing { .. })));
    assert_eq!(again.digest, out.digest);

    // A store that never pushed compresses the layers again: the gzip
    // output is deterministic, so blobs and manifest are the same.
    let (_d5, fresh) = store();
    load_image(&fresh, &layers, &[&format!("{}/c:v1", reg.host())], "sh");
    let pc = push(
        &cfg,
        fresh.clone(),
        &format!("{}/c:v1", reg.host()),
        &none,
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(pc.digest, out.digest);

    // Push the same image to repository b: mounted from a.
    src.tag(&id, &format!("{}/b:v1", reg.host())).unwrap();
    let ev = Events::default();
    let pb = push(
        &cfg,
        src.clone(),
        &format!("{}/b:v1", reg.host()),
        &none,
        ev.sink(),
    )
    .await
    .unwrap();
    let events = ev.take();
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Progress::MountedFrom { from, .. } if from == "a"))
            .count(),
        3,
        "{events:?}"
    );
    assert_eq!(pb.digest, out.digest);
    let digests = src.resolve(&id).unwrap().repo_digests;
    assert!(
        digests.contains(&format!("{}/b@{}", reg.host(), out.digest)),
        "{digests:?}"
    );

    // Docker's not-found messages.
    let e = pull(
        &cfg,
        dst.clone(),
        &format!("{repo}:nope"),
        None,
        &none,
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::NotFound(_)));
    assert_eq!(
        e.to_string(),
        format!("manifest for {repo}:nope not found: manifest unknown: manifest unknown")
    );
    let e = pull(
        &cfg,
        dst.clone(),
        &format!("{}/nothing:1", reg.host()),
        None,
        &none,
        |_| {},
    )
    .await
    .unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e}");
    let e = push(
        &cfg,
        dst.clone(),
        &format!("{}/nothing:1", reg.host()),
        &none,
        |_| {},
    )
    .await
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "An image does not exist locally with the tag: {}/nothing",
            reg.host()
        )
    );
    // No auth on this registry: any login succeeds.
    let ok = check_auth(&cfg, &format!("http://{}", reg.host()), &none)
        .await
        .unwrap();
    assert_eq!(ok.status, "Login Succeeded");
}

/// htpasswd basic auth: login, push and pull need the credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth() {
    let reg = RegistryProc::start(RegistryOpts {
        basic: Some(("alice".into(), "s3cret".into())),
        tls: None,
    });
    let cfg = RegistryConfig::default();
    let good = Credentials {
        username: "alice".into(),
        password: "s3cret".into(),
        ..Default::default()
    };
    let bad = Credentials {
        username: "alice".into(),
        password: "wrong".into(),
        ..Default::default()
    };
    let none = Credentials::default();
    assert_eq!(
        check_auth(&cfg, &reg.host(), &good).await.unwrap().status,
        "Login Succeeded"
    );
    let e = check_auth(&cfg, &reg.host(), &bad).await.unwrap_err();
    assert!(matches!(e, Error::Unauthorized(_)), "{e}");
    assert_eq!(
        e.to_string(),
        format!(
            "login attempt to http://{}/v2/ failed with status: 401 Unauthorized",
            reg.host()
        )
    );
    // The header form the API receives.
    let hdr = Credentials::from_x_registry_auth(&good.to_x_registry_auth()).unwrap();

    let (_d1, src) = store();
    let name = format!("{}/private/img:1", reg.host());
    load_image(&src, &sample_layers(7, false), &[&name], "sh");
    let e = push(&cfg, src.clone(), &name, &none, |_| {})
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unauthorized(_)), "{e}");
    let e = push(&cfg, src.clone(), &name, &bad, |_| {})
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unauthorized(_)), "{e}");
    let out = push(&cfg, src.clone(), &name, &hdr, |_| {}).await.unwrap();

    let (_d2, dst) = store();
    let e = pull(&cfg, dst.clone(), &name, None, &none, |_| {})
        .await
        .unwrap_err();
    assert!(matches!(e, Error::NotFound(_)), "{e}");
    assert!(e.to_string().starts_with(&format!("pull access denied for {}/private/img, repository does not exist or may require 'docker login'", reg.host())), "{e}");
    let e = pull(&cfg, dst.clone(), &name, None, &bad, |_| {})
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unauthorized(_)), "{e}");
    assert!(dst.list().is_empty());
    let p = pull(&cfg, dst.clone(), &name, None, &good, |_| {})
        .await
        .unwrap();
    assert_eq!(p.digest, out.digest);
    assert_eq!(dst.list().len(), 1);
}

fn test_ca() -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.distinguished_name
        .push(DnType::CommonName, "vessel test CA");
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, "127.0.0.1");
    let cert = p.signed_by(&key, &ca_cert, &ca_key).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

/// TLS with a test CA trusted through certs_dir.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_certs_dir() {
    let (ca, cert, key) = test_ca();
    let reg = RegistryProc::start(RegistryOpts {
        basic: None,
        tls: Some((cert, key)),
    });
    let certs = tempfile::tempdir().unwrap();
    std::fs::create_dir(certs.path().join(reg.host())).unwrap();
    write_file(&certs.path().join(reg.host()).join("ca.crt"), ca.as_bytes());
    let strict = RegistryConfig {
        insecure_loopback: false,
        certs_dir: Some(certs.path().to_path_buf()),
        ..Default::default()
    };
    let none = Credentials::default();
    let (_d1, src) = store();
    let name = format!("{}/tls:1", reg.host());
    let id = load_image(&src, &sample_layers(3, false), &[&name], "sh");
    push(&strict, src.clone(), &name, &none, |_| {})
        .await
        .unwrap();
    let (_d2, dst) = store();
    let p = pull(&strict, dst.clone(), &name, None, &none, |_| {})
        .await
        .unwrap();
    assert_eq!(p.image_id, id);

    // Without the CA, verification fails.
    let untrusted = RegistryConfig {
        insecure_loopback: false,
        ..Default::default()
    };
    let (_d3, other) = store();
    let e = pull(&untrusted, other.clone(), &name, None, &none, |_| {})
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Transport { .. }), "{e}");
    assert!(
        e.to_string()
            .contains(&format!("Get \"https://{}/v2/\"", reg.host())),
        "{e}"
    );
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    assert!(other.list().is_empty());
    // Loopback is insecure by default (as in dockerd): HTTPS without verification works.
    let p = pull(
        &RegistryConfig::default(),
        other.clone(),
        &name,
        None,
        &none,
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(p.image_id, id);
}

/// docker.io names go through the mirrors: busybox:latest comes from the
/// local registry's library/busybox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_hub_mirror() {
    let reg = RegistryProc::start(RegistryOpts::default());
    let none = Credentials::default();
    let (_d1, src) = store();
    let local = format!("{}/library/busybox:latest", reg.host());
    let id = load_image(&src, &sample_layers(11, false), &[&local], "sh");
    let out = push(
        &RegistryConfig::default(),
        src.clone(),
        &local,
        &none,
        |_| {},
    )
    .await
    .unwrap();

    let cfg = RegistryConfig {
        mirrors: vec![format!("http://{}", reg.host())],
        ..Default::default()
    };
    let (_d2, dst) = store();
    let ev = Events::default();
    let p = pull(&cfg, dst.clone(), "busybox", None, &none, ev.sink())
        .await
        .unwrap();
    assert_eq!(p.image_id, id);
    assert_eq!(p.reference, "busybox:latest");
    assert_eq!(p.digest, out.digest);
    let img = dst.resolve("busybox:latest").unwrap();
    assert_eq!(img.repo_tags, vec!["busybox:latest"]);
    assert_eq!(img.repo_digests, vec![format!("busybox@{}", out.digest)]);
    let events = ev.take();
    assert!(
        matches!(&events[0], Progress::PullingFrom { repository, .. } if repository == "library/busybox")
    );
    assert!(
        matches!(events.last(), Some(Progress::DownloadedNewerImage { reference }) if reference == "busybox:latest")
    );
    assert_eq!(
        dst.blob_records(&img.layers[0])[0].repository,
        "docker.io/library/busybox"
    );
}
