//! A minimal QMP (QEMU Machine Protocol) client: connect, negotiate
//! capabilities, run commands, wait for migrations. Blocking, because every
//! use is a short sequence of commands on a blocking thread.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::VmError;

/// One QMP connection.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

fn err(what: impl std::fmt::Display) -> VmError {
    VmError::Spawn(format!("QMP: {what}"))
}

impl Qmp {
    /// Connects (retrying until `timeout`) and leaves capability negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, VmError> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    return Err(err(format!("connect {}: {e}", path.display())))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(2)),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(err)?;
        let writer = stream.try_clone().map_err(err)?;
        let mut q = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let greeting = q.read()?;
        if greeting.get("QMP").is_none() {
            return Err(err(format!("unexpected greeting {greeting}")));
        }
        q.execute("qmp_capabilities", json!({}))?;
        Ok(q)
    }

    fn read(&mut self) -> Result<Value, VmError> {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).map_err(err)?;
        if n == 0 {
            return Err(err("connection closed"));
        }
        serde_json::from_str(&line).map_err(err)
    }

    /// Runs `command` and returns its `return` value; events are skipped.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, VmError> {
        let msg = json!({ "execute": command, "arguments": arguments });
        let mut bytes = serde_json::to_vec(&msg).map_err(err)?;
        bytes.push(b'\n');
        self.writer.write_all(&bytes).map_err(err)?;
        loop {
            let v = self.read()?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(err(format!("{command}: {}", e.get("desc").unwrap_or(e))));
            }
        }
    }

    /// Polls `query-migrate` until the migration completed (or failed).
    pub fn wait_migration(&mut self, timeout: Duration) -> Result<(), VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.execute("query-migrate", json!({}))?;
            match r.get("status").and_then(Value::as_str) {
                Some("completed") => return Ok(()),
                Some("failed") | Some("cancelled") => {
                    return Err(err(format!(
                        "migration {}",
                        r.get("error-desc").unwrap_or(&r)
                    )))
                }
                _ if Instant::now() >= deadline => return Err(err("migration timed out")),
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        }
    }
}
