//! Progress events of pull and push, and their mapping to Docker's JSON
//! progress stream (`jsonmessage.JSONMessage`).
//!
//! | event | Docker JSON message |
//! |---|---|
//! | `PullingFrom{id,repository}` | `{"status":"Pulling from <repository>","id":"<tag or digest>"}` |
//! | `PullingFsLayer{id}` | `{"status":"Pulling fs layer","progressDetail":{},"id":id}` |
//! | `Waiting{id}` | `{"status":"Waiting","progressDetail":{},"id":id}` |
//! | `Downloading{id,current,total}` | `{"status":"Downloading","progressDetail":{"current":c,"total":t},"progress":"[==>  ] 1.2MB/3.4MB","id":id}` |
//! | `Retrying{id,seconds}` | `{"status":"Retrying in N seconds","progressDetail":{},"id":id}` |
//! | `VerifyingChecksum{id}` | `{"status":"Verifying Checksum","progressDetail":{},"id":id}` |
//! | `DownloadComplete{id}` | `{"status":"Download complete","progressDetail":{},"id":id}` |
//! | `Extracting{id,current,total}` | `{"status":"Extracting","progressDetail":{"current":c,"total":t},"progress":...,"id":id}` |
//! | `PullComplete{id}` | `{"status":"Pull complete","progressDetail":{},"id":id}` |
//! | `AlreadyExists{id}` | `{"status":"Already exists","progressDetail":{},"id":id}` |
//! | `Digest{digest}` | `{"status":"Digest: sha256:..."}` |
//! | `DownloadedNewerImage{reference}` | `{"status":"Status: Downloaded newer image for busybox:latest"}` |
//! | `ImageUpToDate{reference}` | `{"status":"Status: Image is up to date for busybox:latest"}` |
//! | `PushRefersTo{repository}` | `{"status":"The push refers to repository [localhost:5000/a]"}` |
//! | `Preparing{id}` | `{"status":"Preparing","progressDetail":{},"id":id}` |
//! | `Pushing{id,current,total}` | `{"status":"Pushing","progressDetail":{"current":c,"total":t},"progress":...,"id":id}` |
//! | `Pushed{id}` | `{"status":"Pushed","progressDetail":{},"id":id}` |
//! | `LayerAlreadyExists{id}` | `{"status":"Layer already exists","progressDetail":{},"id":id}` |
//! | `MountedFrom{id,from}` | `{"status":"Mounted from <from>","progressDetail":{},"id":id}` |
//! | `PushDigest{tag,digest,size}` | `{"status":"<tag>: digest: sha256:... size: N"}` then `{"progressDetail":{},"aux":{"Tag":tag,"Digest":digest,"Size":N}}` |
//! | `DownloadingFrom{url}` | `{"status":"Downloading from <url>"}` |
//! | `Importing{current,total}` | `{"status":"Importing","progressDetail":{"current":c,"total":t},"progress":"[==>  ] 1.2MB/3.4MB"}` |
//!
//! [`Progress::to_docker_json`] produces exactly these. Pull layer ids are the
//! first 12 hex digits of the compressed blob digest; push layer ids those of
//! the diff id (as Docker shows them). The last two are `docker import
//! <URL>`'s, which have no id. Errors are not events: the API layer
//! turns the returned error into `{"errorDetail":{"message":m},"error":m}`.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// One progress event. Serialises as `{"type":"downloading","id":...,...}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Progress {
    // ---- pull ----
    /// `<id>: Pulling from <repository>`; `id` is the tag or digest pulled,
    /// `repository` the path in the registry (`library/busybox`).
    PullingFrom {
        id: String,
        repository: String,
    },
    PullingFsLayer {
        id: String,
    },
    /// Queued behind the concurrent transfers (pull and push).
    Waiting {
        id: String,
    },
    /// Compressed bytes received; `total` is the blob size from the manifest.
    Downloading {
        id: String,
        current: u64,
        total: u64,
    },
    /// A download broke and is retried after `seconds`.
    Retrying {
        id: String,
        seconds: u64,
    },
    VerifyingChecksum {
        id: String,
    },
    DownloadComplete {
        id: String,
    },
    /// Compressed bytes decompressed into the store so far.
    Extracting {
        id: String,
        current: u64,
        total: Option<u64>,
    },
    PullComplete {
        id: String,
    },
    /// The layer (by diff id) is already in the store: not fetched.
    AlreadyExists {
        id: String,
    },
    /// `Digest: sha256:...` (the manifest or index digest the reference resolved to).
    Digest {
        digest: String,
    },
    /// `Status: Downloaded newer image for <reference>`
    DownloadedNewerImage {
        reference: String,
    },
    /// `Status: Image is up to date for <reference>`
    ImageUpToDate {
        reference: String,
    },
    // ---- push ----
    /// `The push refers to repository [<repository>]` (fully qualified name).
    PushRefersTo {
        repository: String,
    },
    Preparing {
        id: String,
    },
    /// Uncompressed bytes of the layer read and sent so far (as Docker counts).
    Pushing {
        id: String,
        current: u64,
        total: u64,
    },
    Pushed {
        id: String,
    },
    LayerAlreadyExists {
        id: String,
    },
    /// Cross-repository mount; `from` is the source repository path (`library/busybox`).
    MountedFrom {
        id: String,
        from: String,
    },
    /// `<tag>: digest: sha256:... size: N`
    PushDigest {
        tag: String,
        digest: String,
        size: u64,
    },
    // ---- import from a URL ----
    /// The archive's server answered; its body is being read.
    DownloadingFrom {
        url: String,
    },
    /// Bytes of the archive read so far; `total` is its `Content-Length`.
    Importing {
        current: u64,
        total: Option<u64>,
    },
}

/// Docker's `units.HumanSize`: decimal units, 4 significant digits.
pub fn human_size(n: u64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < UNITS.len() {
        v /= 1000.0;
        i += 1;
    }
    let int_digits = if v < 1.0 {
        1
    } else {
        v.log10().floor() as usize + 1
    };
    let decimals = 4usize.saturating_sub(int_digits);
    let mut s = format!("{v:.decimals$}");
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    format!("{s}{}", UNITS[i])
}

/// Docker's progress bar text: `[=====>     ]  1.2MB/3.4MB`.
fn bar(current: u64, total: Option<u64>) -> String {
    match total {
        Some(t) if t > 0 => {
            let width = 50u64;
            let filled = (current.min(t) * width / t) as usize;
            let spaces = (width as usize).saturating_sub(filled + 1);
            let arrow = if filled < width as usize { ">" } else { "" };
            format!(
                "[{}{arrow}{}] {:>8}/{}",
                "=".repeat(filled),
                " ".repeat(spaces),
                human_size(current),
                human_size(t)
            )
        }
        _ => format!("{:>8}", human_size(current)),
    }
}

fn simple(status: &str, id: &str) -> Value {
    json!({"status": status, "progressDetail": {}, "id": id})
}

fn with_progress(status: &str, id: &str, current: u64, total: Option<u64>) -> Value {
    let mut detail = json!({"current": current});
    if let (Some(t), Some(o)) = (total, detail.as_object_mut()) {
        o.insert("total".into(), json!(t));
    }
    json!({"status": status, "progressDetail": detail, "progress": bar(current, total), "id": id})
}

impl Progress {
    /// The Docker JSON progress message(s) for this event (one, or two for
    /// `PushDigest`, whose second is the `aux` message `docker push` reads).
    pub fn to_docker_json(&self) -> Vec<Value> {
        use Progress as P;
        let one = |v: Value| vec![v];
        match self {
            P::PullingFrom { id, repository } => {
                one(json!({"status": format!("Pulling from {repository}"), "id": id}))
            }
            P::PullingFsLayer { id } => one(simple("Pulling fs layer", id)),
            P::Waiting { id } => one(simple("Waiting", id)),
            P::Downloading { id, current, total } => {
                one(with_progress("Downloading", id, *current, Some(*total)))
            }
            P::Retrying { id, seconds } => one(simple(
                &format!(
                    "Retrying in {seconds} second{}",
                    if *seconds == 1 { "" } else { "s" }
                ),
                id,
            )),
            P::VerifyingChecksum { id } => one(simple("Verifying Checksum", id)),
            P::DownloadComplete { id } => one(simple("Download complete", id)),
            P::Extracting { id, current, total } => {
                one(with_progress("Extracting", id, *current, *total))
            }
            P::PullComplete { id } => one(simple("Pull complete", id)),
            P::AlreadyExists { id } => one(simple("Already exists", id)),
            P::Digest { digest } => one(json!({"status": format!("Digest: {digest}")})),
            P::DownloadedNewerImage { reference } => {
                one(json!({"status": format!("Status: Downloaded newer image for {reference}")}))
            }
            P::ImageUpToDate { reference } => {
                one(json!({"status": format!("Status: Image is up to date for {reference}")}))
            }
            P::PushRefersTo { repository } => {
                one(json!({"status": format!("The push refers to repository [{repository}]")}))
            }
            P::Preparing { id } => one(simple("Preparing", id)),
            P::Pushing { id, current, total } => {
                one(with_progress("Pushing", id, *current, Some(*total)))
            }
            P::Pushed { id } => one(simple("Pushed", id)),
            P::LayerAlreadyExists { id } => one(simple("Layer already exists", id)),
            P::MountedFrom { id, from } => one(simple(&format!("Mounted from {from}"), id)),
            P::PushDigest { tag, digest, size } => vec![
                json!({"status": format!("{tag}: digest: {digest} size: {size}")}),
                json!({"progressDetail": {}, "aux": {"Tag": tag, "Digest": digest, "Size": size}}),
            ],
            P::DownloadingFrom { url } => one(json!({"status": format!("Downloading from {url}")})),
            P::Importing { current, total } => {
                let mut v = with_progress("Importing", "", *current, *total);
                if let Some(o) = v.as_object_mut() {
                    o.remove("id");
                }
                one(v)
            }
        }
    }
}

/// First 12 hex digits of a digest (Docker's short layer id).
pub(crate) fn short_id(digest: &str) -> String {
    let h = digest.split_once(':').map_or(digest, |(_, h)| h);
    h.chars().take(12).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_json() {
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(999), "999B");
        assert_eq!(human_size(1234), "1.234kB");
        assert_eq!(human_size(3_355_443), "3.355MB");
        assert_eq!(human_size(10_000_000), "10MB");
        let p = Progress::Downloading {
            id: "abc".into(),
            current: 500,
            total: 1000,
        };
        let j = &p.to_docker_json()[0];
        assert_eq!(j["status"], "Downloading");
        assert_eq!(j["progressDetail"]["current"], 500);
        assert_eq!(j["progressDetail"]["total"], 1000);
        assert!(j["progress"]
            .as_str()
            .expect("bar")
            .starts_with("[=========================>"));
        let s = serde_json::to_value(&p).expect("ser");
        assert_eq!(s["type"], "downloading");
        let back: Progress = serde_json::from_value(s).expect("de");
        assert_eq!(back, p);
        let d = Progress::PushDigest {
            tag: "latest".into(),
            digest: "sha256:x".into(),
            size: 527,
        }
        .to_docker_json();
        assert_eq!(d[0]["status"], "latest: digest: sha256:x size: 527");
        assert_eq!(d[1]["aux"]["Size"], 527);
        assert_eq!(
            Progress::PullingFrom {
                id: "latest".into(),
                repository: "library/busybox".into()
            }
            .to_docker_json()[0],
            json!({"status": "Pulling from library/busybox", "id": "latest"})
        );
        assert_eq!(short_id("sha256:0123456789abcdef"), "0123456789ab");
        let i = &Progress::Importing {
            current: 5,
            total: Some(10),
        }
        .to_docker_json()[0];
        assert_eq!(i["status"], "Importing");
        assert_eq!(i["progressDetail"], json!({"current": 5, "total": 10}));
        assert!(i.get("id").is_none(), "{i}");
        assert_eq!(
            Progress::DownloadingFrom {
                url: "http://127.0.0.1:8000/rootfs.tar".into()
            }
            .to_docker_json()[0],
            json!({"status": "Downloading from http://127.0.0.1:8000/rootfs.tar"})
        );
    }
}
