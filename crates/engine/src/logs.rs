//! Container logs in Docker's json-file format, kept on the host.
//!
//! One line per log entry: `{"log":"text\n","stream":"stdout","time":"…"}`.
//! Output is split at newlines; a partial line is held until its newline
//! arrives or the process ends.

use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// One line of the log file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogEntry {
    /// The text, with its trailing newline when it had one.
    pub log: String,
    /// `stdout` or `stderr`.
    pub stream: String,
    /// RFC 3339 with nanoseconds.
    pub time: String,
}

/// Appends entries to a container's log file.
#[derive(Debug)]
pub struct LogWriter {
    file: std::fs::File,
    partial: [Vec<u8>; 2],
}

impl LogWriter {
    /// Opens the log at `path` for appending.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Self {
            file,
            partial: [vec![], vec![]],
        })
    }

    /// Records output of one stream (`stderr == false` for stdout).
    pub fn write(&mut self, stderr: bool, data: &[u8]) -> std::io::Result<()> {
        let idx = usize::from(stderr);
        let mut buf = std::mem::take(&mut self.partial[idx]);
        buf.extend_from_slice(data);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(pos) = buf[start..].iter().position(|b| *b == b'\n') {
            let end = start + pos + 1;
            push_line(&mut out, stderr, &buf[start..end]);
            start = end;
        }
        // Very long lines are cut as Docker does (16 KiB).
        while buf.len() - start >= 16 * 1024 {
            push_line(&mut out, stderr, &buf[start..start + 16 * 1024]);
            start += 16 * 1024;
        }
        self.partial[idx] = buf[start..].to_vec();
        if !out.is_empty() {
            self.file.write_all(&out)?;
        }
        Ok(())
    }

    /// Writes held partial lines (at process exit).
    pub fn flush_partial(&mut self) -> std::io::Result<()> {
        let mut out = Vec::new();
        for idx in 0..2 {
            let part = std::mem::take(&mut self.partial[idx]);
            if !part.is_empty() {
                push_line(&mut out, idx == 1, &part);
            }
        }
        if !out.is_empty() {
            self.file.write_all(&out)?;
        }
        self.file.sync_data()
    }
}

fn push_line(out: &mut Vec<u8>, stderr: bool, line: &[u8]) {
    let entry = LogEntry {
        log: String::from_utf8_lossy(line).into_owned(),
        stream: if stderr { "stderr" } else { "stdout" }.into(),
        time: crate::now_rfc3339(),
    };
    if let Ok(mut bytes) = serde_json::to_vec(&entry) {
        bytes.push(b'\n');
        out.extend(bytes);
    }
}

/// Reads whole entries from `offset`; returns them and the new offset.
/// A trailing line without its newline (being written) is left for later.
pub fn read_from(path: &Path, offset: u64) -> std::io::Result<(Vec<LogEntry>, u64)> {
    let mut file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((vec![], offset)),
        Err(e) => return Err(e),
    };
    file.seek(SeekFrom::Start(offset))?;
    let mut reader = BufReader::new(file);
    let mut entries = vec![];
    let mut pos = offset;
    let mut line = String::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 || !line.ends_with('\n') {
            break;
        }
        pos += n as u64;
        if let Ok(e) = serde_json::from_str::<LogEntry>(&line) {
            entries.push(e);
        }
    }
    Ok((entries, pos))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_and_partials_held() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c-json.log");
        let mut w = LogWriter::open(&path).expect("open");
        w.write(false, b"one\ntw").expect("write");
        w.write(true, b"err\n").expect("write");
        let (entries, off) = read_from(&path, 0).expect("read");
        assert_eq!(entries.len(), 2);
        assert_eq!(
            (entries[0].log.as_str(), entries[0].stream.as_str()),
            ("one\n", "stdout")
        );
        assert_eq!(
            (entries[1].log.as_str(), entries[1].stream.as_str()),
            ("err\n", "stderr")
        );
        w.write(false, b"o\nthree").expect("write");
        w.flush_partial().expect("flush");
        let (more, _) = read_from(&path, off).expect("read");
        let texts: Vec<_> = more.iter().map(|e| e.log.as_str()).collect();
        assert_eq!(texts, vec!["two\n", "three"]);
    }
}
