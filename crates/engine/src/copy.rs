//! `docker cp`: the archive API (`HEAD`/`GET`/`PUT /containers/{id}/archive`).
//!
//! The container's files live on disks its VM mounts, so the agent does the
//! work (see the agent's `copy` module): the engine sends `CopyStat`,
//! `CopyOut` or `CopyIn` with an id from the exec id space and follows the
//! answers, which the container's monitor routes here. A container that is
//! not running gets a VM for the copy alone: a clone (or cold boot) with the
//! container's own disks, asked to `Prepare` its root filesystem, and shut
//! down (its disks synced) when the copy is done.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tracing::warn;
use vessel_protocol::{GuestMsg, HostMsg, PathStat};
use vessel_vm::channel::{AgentReader, AgentWriter, Incoming};

use crate::{blocking, internal, Engine, EngineError, Handle};

/// What the agent says about one copy.
#[derive(Debug)]
pub(crate) enum CopyEvent {
    Stat(PathStat),
    Data(Vec<u8>),
    Changes(Vec<(u8, String)>),
    Done {
        error: Option<String>,
        not_found: bool,
        not_dir: bool,
    },
}

/// The archive of a container path: its stat, then the tar's bytes.
pub struct ArchiveStream {
    /// The path's stat (the `X-Docker-Container-Path-Stat` header).
    pub stat: PathStat,
    /// The tar, in chunks; an `Err` ends it early.
    pub data: mpsc::Receiver<Result<Bytes, String>>,
}

/// Sends a copy's messages to the VM and keeps what it needs alive: a
/// temporary VM is shut down when the copy's last event was read.
struct Session {
    id: u32,
    writer: AgentWriter,
    events: mpsc::UnboundedReceiver<CopyEvent>,
    /// The temporary VM's pump, when the container was not running.
    temp: Option<tokio::task::JoinHandle<()>>,
}

impl Engine {
    /// Routes a copy answer from a container's agent; `false` when no copy
    /// of that id is known.
    pub(crate) fn copy_event(&self, copy_id: u32, ev: CopyEvent) -> bool {
        let copies = self.inner.copies.lock().unwrap_or_else(|p| p.into_inner());
        match copies.get(&copy_id) {
            Some(tx) => {
                let _ = tx.send(ev);
                true
            }
            None => false,
        }
    }

    /// Routes the agent's copy answers (`CopyStat`, `Changes`, `CopyDone`)
    /// to their copy; `Some(msg)` for any other message.
    pub(crate) fn copy_message(&self, msg: GuestMsg) -> Option<GuestMsg> {
        let (copy_id, ev) = match msg {
            GuestMsg::CopyStat { copy_id, stat } => (copy_id, CopyEvent::Stat(stat)),
            GuestMsg::Changes { copy_id, changes } => (copy_id, CopyEvent::Changes(changes)),
            GuestMsg::CopyDone {
                copy_id,
                error,
                not_found,
                not_dir,
            } => (
                copy_id,
                CopyEvent::Done {
                    error,
                    not_found,
                    not_dir,
                },
            ),
            other => return Some(other),
        };
        self.copy_event(copy_id, ev);
        None
    }

    /// Opens a copy session on the container's running VM, or on a VM
    /// started for it.
    async fn copy_session(&self, name_or_id: &str) -> Result<Session, EngineError> {
        let h = self.lookup(name_or_id)?;
        let id = self.inner.next_exec.fetch_add(1, Ordering::SeqCst) + 1;
        let (tx, events) = mpsc::unbounded_channel();
        self.inner
            .copies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, tx);
        let running = h.live.lock().await.writer.clone();
        let session = match running {
            Some(writer) => Ok(Session {
                id,
                writer,
                events,
                temp: None,
            }),
            None => self.temp_vm(&h).await.map(|(writer, pump)| Session {
                id,
                writer,
                events,
                temp: Some(pump),
            }),
        };
        if session.is_err() {
            self.forget_copy(id);
        }
        session
    }

    fn forget_copy(&self, id: u32) {
        self.inner
            .copies
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
    }

    /// Starts a VM with the container's disks for a copy and mounts its
    /// root filesystem. The returned task reads the agent's answers until
    /// `Shutdown` ends the VM.
    async fn temp_vm(
        &self,
        h: &Arc<Handle>,
    ) -> Result<(AgentWriter, tokio::task::JoinHandle<()>), EngineError> {
        let op = h.op.clone().lock_owned().await;
        let rec = h.rec();
        if rec.running() {
            return Err(EngineError::Conflict(format!(
                "container {} started while preparing the copy; try again",
                rec.id
            )));
        }
        let images = self.inner.images.clone();
        let image_id = rec.image_id.clone();
        let image_disk = crate::blocking(move || images.boot_disk(&image_id)).await??;
        let name = format!("cp-{}", &rec.id[..12]);
        let run_dir = self
            .inner
            .cfg
            .data_root
            .join("vm")
            .join(format!("cp-{}", &rec.id[..12]));
        let spec = self.vm_spec(
            name.clone(),
            run_dir.clone(),
            image_disk,
            self.container_dir(&rec.id).join("upper.qcow2"),
            &rec.vm,
        );
        let (pid, _, mut reader, writer, _) = self.launch(&spec).await?;
        let fail = |msg: String| {
            vessel_vm::kill_vm(pid, &name);
            crate::volumes::remove_run_dir(&run_dir);
            EngineError::Internal(msg)
        };
        crate::pool::prepare_root(&mut reader, &writer)
            .await
            .map_err(fail)?;
        // The disk may now differ from what `create` made.
        let rec = h.update(|r| r.fresh_upper = false);
        let _ = self.persist(&rec);
        let engine = self.clone();
        let pump = tokio::spawn(async move {
            let _op = op;
            engine.pump_copy(&mut reader).await;
            // The VM powers off after Shutdown (sent when the copy ends).
            let reaped =
                tokio::time::timeout(Duration::from_secs(10), vessel_vm::wait_exit(pid)).await;
            if reaped.is_err() {
                warn!(vm = %name, "copy VM did not power off; killed");
                vessel_vm::kill_vm(pid, &name);
                vessel_vm::wait_exit(pid).await;
            }
            crate::volumes::remove_run_dir(&run_dir);
        });
        Ok((writer, pump))
    }

    /// Reads a temporary VM's answers until it goes away.
    async fn pump_copy(&self, reader: &mut AgentReader) {
        loop {
            match reader.next().await {
                Ok(Some(Incoming::ExecStdout { exec_id, data })) => {
                    self.copy_event(exec_id, CopyEvent::Data(data));
                }
                Ok(Some(Incoming::Msg(msg))) => {
                    self.copy_message(msg);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => return,
            }
        }
    }

    /// Ends a session: forgets its id and shuts a temporary VM down.
    async fn close_session(&self, s: &mut Session) {
        self.forget_copy(s.id);
        if let Some(pump) = s.temp.take() {
            let _ = s.writer.send(&HostMsg::Shutdown).await;
            let _ = pump.await;
        }
    }

    /// `HEAD /containers/{id}/archive`.
    pub async fn archive_stat(
        &self,
        name_or_id: &str,
        path: &str,
    ) -> Result<PathStat, EngineError> {
        let cid = self.lookup(name_or_id)?.id.clone();
        let mut s = self.copy_session(name_or_id).await?;
        let sent = s
            .writer
            .send(&HostMsg::CopyStat {
                copy_id: s.id,
                path: path.to_string(),
            })
            .await;
        let result = match sent {
            Err(e) => Err(EngineError::Internal(e.to_string())),
            Ok(()) => match s.events.recv().await {
                Some(CopyEvent::Stat(stat)) => Ok(stat),
                Some(CopyEvent::Done {
                    error, not_found, ..
                }) => Err(copy_error(&cid, path, error, not_found, false)),
                _ => Err(EngineError::Internal("the container's VM stopped".into())),
            },
        };
        self.close_session(&mut s).await;
        result
    }

    /// `GET /containers/{id}/archive`.
    pub async fn archive_get(
        &self,
        name_or_id: &str,
        path: &str,
    ) -> Result<ArchiveStream, EngineError> {
        self.archive_out(name_or_id, path, false, false).await
    }

    /// `GET /containers/{id}/export`: the container's whole filesystem.
    pub async fn export(&self, name_or_id: &str) -> Result<ArchiveStream, EngineError> {
        self.archive_out(name_or_id, "/", true, false).await
    }

    /// `docker commit`: the container's changes as an image layer tar.
    pub async fn layer(&self, name_or_id: &str) -> Result<ArchiveStream, EngineError> {
        self.archive_out(name_or_id, "/", false, true).await
    }

    /// `GET /containers/{id}/changes` (`docker diff`): (kind, path), kind 0
    /// modified, 1 added, 2 deleted.
    pub async fn changes(&self, name_or_id: &str) -> Result<Vec<(u8, String)>, EngineError> {
        let mut s = self.copy_session(name_or_id).await?;
        let sent = s.writer.send(&HostMsg::Diff { copy_id: s.id }).await;
        let result = match sent {
            Err(e) => Err(EngineError::Internal(e.to_string())),
            Ok(()) => match s.events.recv().await {
                Some(CopyEvent::Changes(c)) => Ok(c),
                Some(CopyEvent::Done { error, .. }) => Err(EngineError::Internal(
                    error.unwrap_or_else(|| "diff failed".into()),
                )),
                _ => Err(EngineError::Internal("the container's VM stopped".into())),
            },
        };
        self.close_session(&mut s).await;
        result
    }

    async fn archive_out(
        &self,
        name_or_id: &str,
        path: &str,
        export: bool,
        layer: bool,
    ) -> Result<ArchiveStream, EngineError> {
        let cid = self.lookup(name_or_id)?.id.clone();
        let mut s = self.copy_session(name_or_id).await?;
        if let Err(e) = s
            .writer
            .send(&HostMsg::CopyOut {
                copy_id: s.id,
                path: path.to_string(),
                export,
                layer,
            })
            .await
        {
            self.close_session(&mut s).await;
            return Err(EngineError::Internal(e.to_string()));
        }
        let stat = match s.events.recv().await {
            Some(CopyEvent::Stat(stat)) => stat,
            Some(CopyEvent::Done {
                error, not_found, ..
            }) => {
                self.close_session(&mut s).await;
                return Err(copy_error(&cid, path, error, not_found, false));
            }
            _ => {
                self.close_session(&mut s).await;
                return Err(EngineError::Internal("the container's VM stopped".into()));
            }
        };
        let (tx, data) = mpsc::channel(16);
        let engine = self.clone();
        tokio::spawn(async move {
            loop {
                match s.events.recv().await {
                    Some(CopyEvent::Data(d)) => {
                        if tx.send(Ok(Bytes::from(d))).await.is_err() {
                            break;
                        }
                    }
                    Some(CopyEvent::Done { error: None, .. }) => break,
                    Some(CopyEvent::Done { error: Some(e), .. }) => {
                        let _ = tx.send(Err(e)).await;
                        break;
                    }
                    Some(CopyEvent::Stat(_)) | Some(CopyEvent::Changes(_)) => {}
                    None => {
                        let _ = tx.send(Err("the container's VM stopped".into())).await;
                        break;
                    }
                }
            }
            engine.close_session(&mut s).await;
        });
        Ok(ArchiveStream { stat, data })
    }

    /// `PUT /containers/{id}/archive`: extracts a tar into directory `path`.
    /// `keep_owners`: `copyUIDGID` (`docker cp -a`).
    pub async fn archive_put<S>(
        &self,
        name_or_id: &str,
        path: &str,
        keep_owners: bool,
        body: S,
    ) -> Result<(), EngineError>
    where
        S: Stream<Item = Result<Bytes, String>> + Send + Unpin,
    {
        let cid = self.lookup(name_or_id)?.id.clone();
        let mut s = self.copy_session(name_or_id).await?;
        let result = self.put_into(&mut s, &cid, path, keep_owners, body).await;
        self.close_session(&mut s).await;
        result
    }

    async fn put_into<S>(
        &self,
        s: &mut Session,
        cid: &str,
        path: &str,
        keep_owners: bool,
        mut body: S,
    ) -> Result<(), EngineError>
    where
        S: Stream<Item = Result<Bytes, String>> + Send + Unpin,
    {
        let io = |e: vessel_vm::VmError| EngineError::Internal(e.to_string());
        s.writer
            .send(&HostMsg::CopyIn {
                copy_id: s.id,
                path: path.to_string(),
                keep_owners,
            })
            .await
            .map_err(io)?;
        let mut body_error = None;
        loop {
            tokio::select! {
                // The agent may refuse at once (no such directory).
                ev = s.events.recv() => return done(cid, path, ev),
                chunk = body.next() => match chunk {
                    Some(Ok(bytes)) => {
                        for part in bytes.chunks(64 * 1024) {
                            s.writer.send_exec_stdin(s.id, part).await.map_err(io)?;
                        }
                    }
                    Some(Err(e)) => {
                        body_error = Some(e);
                        break;
                    }
                    None => break,
                },
            }
        }
        s.writer
            .send(&HostMsg::ExecCloseStdin { exec_id: s.id })
            .await
            .map_err(io)?;
        let result = done(cid, path, s.events.recv().await);
        match body_error {
            Some(e) => Err(EngineError::InvalidParameter(format!(
                "reading the archive: {e}"
            ))),
            None => result,
        }
    }
}

fn done(cid: &str, path: &str, ev: Option<CopyEvent>) -> Result<(), EngineError> {
    match ev {
        Some(CopyEvent::Done { error: None, .. }) => Ok(()),
        Some(CopyEvent::Done {
            error,
            not_found,
            not_dir,
        }) => Err(copy_error(cid, path, error, not_found, not_dir)),
        _ => Err(EngineError::Internal("the container's VM stopped".into())),
    }
}

/// Docker's answers: 404 for a missing path, 400 for a destination that
/// is not a directory.
fn copy_error(
    cid: &str,
    path: &str,
    error: Option<String>,
    not_found: bool,
    not_dir: bool,
) -> EngineError {
    if not_found {
        EngineError::NotFound(format!("Could not find the file {path} in container {cid}"))
    } else if not_dir {
        EngineError::InvalidParameter("extraction point is not a directory".into())
    } else {
        EngineError::Internal(error.unwrap_or_else(|| "copy failed".into()))
    }
}

/// What `docker commit` asks for.
#[derive(Debug, Default, Clone)]
pub struct CommitOptions {
    /// `repo[:tag]` to tag the new image with.
    pub reference: Option<String>,
    /// `-m`.
    pub comment: String,
    /// `-a`.
    pub author: String,
    /// `-c`: Dockerfile instructions applied to the config.
    pub changes: Vec<String>,
    /// Config fields the request sets (the body), over the container's.
    pub config: Option<serde_json::Value>,
}

impl Engine {
    /// `POST /commit`: a new image from the container's image and its
    /// changes. A running container keeps running (its VM is not paused:
    /// the agent inside it writes the layer).
    pub async fn commit(
        &self,
        name_or_id: &str,
        opts: CommitOptions,
    ) -> Result<String, EngineError> {
        let rec = self.lookup(name_or_id)?.rec();
        let mut layer = self.layer(name_or_id).await?;
        let tmp = self.inner.cfg.data_root.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(|e| internal("create tmp", e))?;
        let path = tmp.join(format!("commit-{}.tar", &rec.id[..12]));
        let mut file = tokio::fs::File::create(&path)
            .await
            .map_err(|e| internal(&format!("create {}", path.display()), e))?;
        let written = async {
            use tokio::io::AsyncWriteExt;
            while let Some(chunk) = layer.data.recv().await {
                let chunk = chunk.map_err(EngineError::Internal)?;
                file.write_all(&chunk)
                    .await
                    .map_err(|e| internal("write layer", e))?;
            }
            file.flush().await.map_err(|e| internal("write layer", e))
        }
        .await;
        drop(file);
        if let Err(e) = written {
            let _ = std::fs::remove_file(&path);
            return Err(e);
        }
        let mut config =
            serde_json::to_value(&rec.config).map_err(|e| internal("container config", e))?;
        if let (Some(serde_json::Value::Object(over)), Some(base)) =
            (opts.config.clone(), config.as_object_mut())
        {
            for (k, v) in over {
                if !v.is_null() {
                    base.insert(k, v);
                }
            }
        }
        let images = self.inner.images.clone();
        let (image_id, cid, p) = (rec.image_id.clone(), rec.id.clone(), path.clone());
        let made = blocking(move || {
            let f = std::fs::File::open(&p).map_err(|source| vessel_image::Error::Io {
                context: format!("open {}", p.display()),
                source,
            })?;
            images.commit_container(
                &image_id,
                f,
                opts.reference.as_deref(),
                config,
                &opts.changes,
                &opts.comment,
                &opts.author,
                &cid,
            )
        })
        .await;
        let _ = std::fs::remove_file(&path);
        let id = made??;
        self.container_event(&rec, "commit", &[]);
        Ok(id)
    }
}
