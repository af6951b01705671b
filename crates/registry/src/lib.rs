//! `vessel-registry`: the OCI distribution / Docker Registry v2 client of Vessel.
//!
//! This crate owns talking to registries: resolving references to registry
//! endpoints (Docker Hub mirrors, insecure registries, per-registry CAs from a
//! certs.d directory), authentication (basic, bearer tokens with a cache,
//! Docker's `X-Registry-Auth` credentials, `POST /auth` checks), fetching
//! manifests, indexes, configs and layers with digest verification while
//! streaming, platform selection, and pushing (blob existence checks,
//! cross-repository mounts, chunked uploads, schema 2 manifests). Progress is
//! reported as typed [`Progress`] events that map one to one onto Docker's
//! JSON progress messages ([`Progress::to_docker_json`]). It also fetches
//! the archives of `docker import <URL>` ([`open_archive`]): the same HTTP
//! stack, errors and progress, though no registry is involved.
//!
//! It must not do: serve HTTP (the API crate turns [`Progress`] and [`Error`]
//! into Engine API responses), hold container state, or know the image store's
//! layout: everything it stores or reads goes through the public
//! `vessel-image` API ([`ImageStore::stage_layer`], [`ImageStore::commit_pulled`],
//! [`ImageStore::open_layer`], [`ImageStore::record_blob`], ...).
//!
//! Entry points: [`pull`], [`push`], [`check_auth`] (one-shot), or a
//! long-lived [`Registry`] that keeps its HTTP clients (connection pools)
//! between calls. Bearer tokens are cached process-wide per (registry, scope,
//! credentials) for their lifetime either way. All futures are `Send`.

mod auth;
mod client;
mod config;
mod error;
mod login;
mod manifest;
mod progress;
mod pull;
mod push;
mod remote;

use std::sync::Arc;

use vessel_image::ImageStore;

pub use auth::Credentials;
pub use config::{RegistryConfig, DOCKER_HUB_DOMAIN, DOCKER_HUB_REGISTRY};
pub use error::{Error, Result};
pub use login::{registry_domain, AuthOutcome};
pub use manifest::Platform;
pub use progress::{human_size, Progress};
pub use pull::{PullOutcome, PullStatus, MAX_ATTEMPTS, MAX_CONCURRENT_DOWNLOADS};
pub use push::{PushOutcome, CHUNK_SIZE, MAX_CONCURRENT_UPLOADS};
pub use remote::{archive_url, open_archive, ArchiveStream, Download};

/// A registry client with its configuration and cached HTTP clients.
pub struct Registry {
    http: client::Http,
}

impl Registry {
    pub fn new(config: RegistryConfig) -> Registry {
        Registry {
            http: client::Http::new(config),
        }
    }

    pub fn config(&self) -> &RegistryConfig {
        &self.http.config
    }

    /// Pull `reference` (`busybox`, `localhost:5000/a:1`, `name@sha256:...`)
    /// into `store`. See [`pull`].
    pub async fn pull(
        &self,
        store: Arc<ImageStore>,
        reference: &str,
        platform: Option<Platform>,
        creds: &Credentials,
        progress: impl Fn(Progress) + Send + Sync,
    ) -> Result<PullOutcome> {
        pull::pull(&self.http, store, reference, platform, creds, &progress).await
    }

    /// Push the local image tagged `reference` (tag defaults to `latest`). See [`push`].
    pub async fn push(
        &self,
        store: Arc<ImageStore>,
        reference: &str,
        creds: &Credentials,
        progress: impl Fn(Progress) + Send + Sync,
    ) -> Result<PushOutcome> {
        push::push(&self.http, store, reference, creds, &progress).await
    }

    /// Check credentials against a registry. See [`check_auth`].
    pub async fn check_auth(
        &self,
        server_address: &str,
        creds: &Credentials,
    ) -> Result<AuthOutcome> {
        login::check_auth(&self.http, server_address, creds).await
    }
}

/// Pull an image into the store.
///
/// `reference` is a tag (default `latest`) or digest reference; docker.io
/// names go through `config.mirrors` in order, then Docker Hub. From a
/// manifest list / OCI index the `platform` (default linux/amd64) is picked.
/// Layers already in the store (by diff id) are not fetched; the others are
/// downloaded (3 at a time), verified, decompressed into the store's staging
/// area, and committed together with the config, the tag and the repo digest
/// only when everything verified. `creds` may be empty (anonymous).
pub async fn pull(
    config: &RegistryConfig,
    store: Arc<ImageStore>,
    reference: &str,
    platform: Option<Platform>,
    creds: &Credentials,
    progress: impl Fn(Progress) + Send + Sync,
) -> Result<PullOutcome> {
    Registry::new(config.clone())
        .pull(store, reference, platform, creds, progress)
        .await
}

/// Push a local image (`reference` names the local tag and the target
/// repository) as a Docker schema 2 manifest with gzip layers; returns the
/// manifest digest and size and records the repo digest on the image.
pub async fn push(
    config: &RegistryConfig,
    store: Arc<ImageStore>,
    reference: &str,
    creds: &Credentials,
    progress: impl Fn(Progress) + Send + Sync,
) -> Result<PushOutcome> {
    Registry::new(config.clone())
        .push(store, reference, creds, progress)
        .await
}

/// `POST /auth`: `GET /v2/` on the registry of `server_address` with the
/// credentials (basic, or a bearer token fetched with them). Ok means
/// `Login Succeeded`; bad credentials give [`Error::Unauthorized`].
pub async fn check_auth(
    config: &RegistryConfig,
    server_address: &str,
    creds: &Credentials,
) -> Result<AuthOutcome> {
    Registry::new(config.clone())
        .check_auth(server_address, creds)
        .await
}

#[cfg(test)]
mod send_check {
    use super::*;

    fn is_send<T: Send>(_: &T) {}

    #[allow(dead_code)]
    fn futures_are_send(store: Arc<ImageStore>, c: &RegistryConfig, creds: &Credentials) {
        is_send(&pull(c, store.clone(), "x", None, creds, |_| {}));
        is_send(&push(c, store, "x", creds, |_| {}));
        is_send(&check_auth(c, "x", creds));
    }
}
