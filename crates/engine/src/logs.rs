//! Container logs in Docker's json-file format, kept on the host.
//!
//! One line per log entry: `{"log":"text\n","stream":"stdout","time":"…"}`,
//! with `"attrs":{…}` before `time` when the container's log options ask
//! for extra attributes (`labels`, `labels-regex`, `env`, `env-regex`,
//! `tag`), as dockerd's json-file driver writes them. Output is split at
//! newlines; a partial line is held until its newline arrives or the
//! process ends.

use std::collections::{BTreeMap, HashMap};
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
    /// Extra attributes (`--log-opt labels=…`, `env=…`, …); `docker logs
    /// --details` shows them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attrs: Option<BTreeMap<String, String>>,
    /// RFC 3339 with nanoseconds.
    pub time: String,
}

/// The json-file driver's options (`--log-opt max-size=10m --log-opt max-file=3`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotation {
    /// Rotate when the file reaches this size; `None`: never.
    pub max_size: Option<u64>,
    /// Files kept, the current one included (at least 1).
    pub max_file: u32,
}

impl Default for Rotation {
    fn default() -> Self {
        Self {
            max_size: None,
            max_file: 1,
        }
    }
}

/// Parses Docker's size notation (`512`, `10k`, `20m`, `1g`).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim().to_ascii_lowercase();
    let s = s.strip_suffix('b').unwrap_or(&s);
    let (num, mult) = match s.chars().last()? {
        'k' => (&s[..s.len() - 1], 1u64 << 10),
        'm' => (&s[..s.len() - 1], 1 << 20),
        'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: f64 = num.parse().ok()?;
    (n > 0.0).then_some((n * mult as f64) as u64)
}

/// The log files of a container, oldest first (`path.N` … `path.1`, `path`).
pub fn files(path: &Path, rotation: Rotation) -> Vec<std::path::PathBuf> {
    let mut out: Vec<std::path::PathBuf> = (1..rotation.max_file)
        .rev()
        .map(|i| rotated(path, i))
        .filter(|p| p.exists())
        .collect();
    out.push(path.to_path_buf());
    out
}

fn rotated(path: &Path, i: u32) -> std::path::PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{i}"));
    name.into()
}

/// Appends entries to a container's log file, rotating it by size.
#[derive(Debug)]
pub struct LogWriter {
    path: std::path::PathBuf,
    file: std::fs::File,
    size: u64,
    rotation: Rotation,
    attrs: Option<BTreeMap<String, String>>,
    partial: [Vec<u8>; 2],
}

impl LogWriter {
    /// Opens the log at `path` for appending; every entry carries `attrs`
    /// (none when empty).
    pub fn open(
        path: &Path,
        rotation: Rotation,
        attrs: BTreeMap<String, String>,
    ) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            path: path.to_path_buf(),
            file,
            size,
            rotation,
            attrs: (!attrs.is_empty()).then_some(attrs),
            partial: [vec![], vec![]],
        })
    }

    fn append(&mut self, out: &[u8]) -> std::io::Result<()> {
        if let Some(max) = self.rotation.max_size {
            if self.size > 0 && self.size + out.len() as u64 > max {
                if self.rotation.max_file > 1 {
                    for i in (1..self.rotation.max_file - 1).rev() {
                        let from = rotated(&self.path, i);
                        if from.exists() {
                            std::fs::rename(&from, rotated(&self.path, i + 1))?;
                        }
                    }
                    std::fs::rename(&self.path, rotated(&self.path, 1))?;
                } else {
                    std::fs::remove_file(&self.path)?;
                }
                self.file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?;
                self.size = 0;
            }
        }
        self.file.write_all(out)?;
        self.size += out.len() as u64;
        Ok(())
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
            push_line(&mut out, stderr, &buf[start..end], &self.attrs);
            start = end;
        }
        // Very long lines are cut as Docker does (16 KiB).
        while buf.len() - start >= 16 * 1024 {
            push_line(
                &mut out,
                stderr,
                &buf[start..start + 16 * 1024],
                &self.attrs,
            );
            start += 16 * 1024;
        }
        self.partial[idx] = buf[start..].to_vec();
        if !out.is_empty() {
            self.append(&out)?;
        }
        Ok(())
    }

    /// Writes held partial lines (at process exit).
    pub fn flush_partial(&mut self) -> std::io::Result<()> {
        let mut out = Vec::new();
        for idx in 0..2 {
            let part = std::mem::take(&mut self.partial[idx]);
            if !part.is_empty() {
                push_line(&mut out, idx == 1, &part, &self.attrs);
            }
        }
        if !out.is_empty() {
            self.append(&out)?;
        }
        self.file.sync_data()
    }
}

fn push_line(
    out: &mut Vec<u8>,
    stderr: bool,
    line: &[u8],
    attrs: &Option<BTreeMap<String, String>>,
) {
    let entry = LogEntry {
        log: String::from_utf8_lossy(line).into_owned(),
        stream: if stderr { "stderr" } else { "stdout" }.into(),
        attrs: attrs.clone(),
        time: crate::now_rfc3339(),
    };
    if let Ok(mut bytes) = serde_json::to_vec(&entry) {
        bytes.push(b'\n');
        out.extend(bytes);
    }
}

/// What a container is, for the `tag` log option's template.
#[derive(Debug, Clone, Default)]
pub struct TagInfo {
    /// Full container id.
    pub id: String,
    /// Name without the leading slash.
    pub name: String,
    /// Image id (`sha256:…`).
    pub image_id: String,
    /// The image as the user named it.
    pub image_name: String,
    /// The container's hostname.
    pub hostname: String,
    /// Executable and arguments, space-separated.
    pub command: String,
}

/// Expands a `tag` template (`{{.Name}}/{{.ID}}`). Only the plain fields of
/// dockerd's logger info are understood (`ID`, `FullID`, `Name`,
/// `ImageID`, `ImageFullID`, `ImageName`, `DaemonName`, `Hostname`,
/// `Command`); anything else in braces is refused.
pub fn expand_tag(template: &str, info: &TagInfo) -> Result<String, String> {
    let short = |id: &str| {
        let hex = id.strip_prefix("sha256:").unwrap_or(id);
        hex[..hex.len().min(12)].to_string()
    };
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let close = after
            .find("}}")
            .ok_or_else(|| format!("unclosed action in log tag template \"{template}\""))?;
        let field = after[..close].trim();
        out.push_str(&match field {
            ".ID" => short(&info.id),
            ".FullID" => info.id.clone(),
            ".Name" => info.name.clone(),
            ".ImageID" => short(&info.image_id),
            ".ImageFullID" => info.image_id.clone(),
            ".ImageName" => info.image_name.clone(),
            ".DaemonName" => "vessel".to_string(),
            ".Hostname" => info.hostname.clone(),
            ".Command" => info.command.clone(),
            other => {
                return Err(format!(
                    "log tag template \"{template}\": {{{{{other}}}}} is not supported (fields: .ID, .FullID, .Name, .ImageID, .ImageFullID, .ImageName, .DaemonName, .Hostname, .Command)"
                ))
            }
        });
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// The extra attributes dockerd's json-file driver records with each
/// entry: the labels named in `labels` (comma-separated) or matching
/// `labels-regex`, the environment variables named in `env` or matching
/// `env-regex`, and `tag` when that option is set.
pub fn extra_attributes(
    opts: &HashMap<String, String>,
    labels: &HashMap<String, String>,
    env: &[String],
    tag: &TagInfo,
) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    let regex = |key: &str| -> Result<Option<regex::Regex>, String> {
        match opts.get(key).filter(|v| !v.is_empty()) {
            None => Ok(None),
            Some(re) => regex::Regex::new(re)
                .map(Some)
                .map_err(|e| format!("invalid {key} '{re}': {e}")),
        }
    };
    if let Some(names) = opts.get("labels").filter(|v| !v.is_empty()) {
        for n in names.split(',') {
            if let Some(v) = labels.get(n) {
                out.insert(n.to_string(), v.clone());
            }
        }
    }
    if let Some(re) = regex("labels-regex")? {
        for (k, v) in labels.iter().filter(|(k, _)| re.is_match(k)) {
            out.insert(k.clone(), v.clone());
        }
    }
    let vars: HashMap<&str, &str> = env.iter().filter_map(|e| e.split_once('=')).collect();
    if let Some(names) = opts.get("env").filter(|v| !v.is_empty()) {
        for n in names.split(',') {
            if let Some(v) = vars.get(n) {
                out.insert(n.to_string(), v.to_string());
            }
        }
    }
    if let Some(re) = regex("env-regex")? {
        for (k, v) in vars.iter().filter(|(k, _)| re.is_match(k)) {
            out.insert(k.to_string(), v.to_string());
        }
    }
    if let Some(t) = opts.get("tag").filter(|v| !v.is_empty()) {
        out.insert("tag".into(), expand_tag(t, tag)?);
    }
    Ok(out)
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
        let mut w = LogWriter::open(&path, Rotation::default(), BTreeMap::new()).expect("open");
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

    #[test]
    fn rotation_keeps_max_file_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c-json.log");
        let rot = Rotation {
            max_size: Some(200),
            max_file: 3,
        };
        let mut w = LogWriter::open(&path, rot, BTreeMap::new()).expect("open");
        for i in 0..40 {
            w.write(false, format!("line {i}\n").as_bytes())
                .expect("write");
        }
        let fs = files(&path, rot);
        assert_eq!(fs.len(), 3, "{fs:?}");
        let mut all = vec![];
        for f in &fs {
            all.extend(read_from(f, 0).expect("read").0);
            assert!(std::fs::metadata(f).expect("meta").len() <= 200);
        }
        // The newest lines are kept, in order, the oldest dropped.
        assert_eq!(all.last().map(|e| e.log.as_str()), Some("line 39\n"));
        let nums: Vec<u32> = all
            .iter()
            .filter_map(|e| e.log.trim().strip_prefix("line ")?.parse().ok())
            .collect();
        assert!(nums.windows(2).all(|w| w[1] == w[0] + 1));
        assert!(nums[0] > 0);
        assert_eq!(parse_size("10m"), Some(10 << 20));
        assert_eq!(parse_size("1k"), Some(1024));
        assert_eq!(parse_size("x"), None);
    }
}

#[cfg(test)]
mod attr_tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn extra_attributes_are_picked_as_dockerd_picks_them() {
        let labels = map(&[("team", "web"), ("tier", "front"), ("other", "x")]);
        let env = vec![
            "PATH=/bin".to_string(),
            "REGION=eu".to_string(),
            "RACK=7".to_string(),
        ];
        let tag = TagInfo {
            id: "0123456789abcdef0123".into(),
            name: "web1".into(),
            image_id: "sha256:fedcba9876543210aa".into(),
            image_name: "busybox".into(),
            ..Default::default()
        };
        let opts = map(&[
            ("labels", "team,missing"),
            ("labels-regex", "^ti"),
            ("env", "REGION"),
            ("env-regex", "^RA"),
            ("tag", "{{.Name}}/{{ .ID }}/{{.ImageID}}"),
        ]);
        let got = extra_attributes(&opts, &labels, &env, &tag).expect("attrs");
        let want: BTreeMap<String, String> = [
            ("team", "web"),
            ("tier", "front"),
            ("REGION", "eu"),
            ("RACK", "7"),
            ("tag", "web1/0123456789ab/fedcba987654"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(got, want);
        assert!(extra_attributes(&HashMap::new(), &labels, &env, &tag)
            .expect("none")
            .is_empty());
        assert!(extra_attributes(&map(&[("env-regex", "(")]), &labels, &env, &tag).is_err());
        assert!(expand_tag("{{.Labels}}", &tag).is_err());
        assert!(expand_tag("{{.Name", &tag).is_err());
        assert_eq!(expand_tag("plain", &tag).as_deref(), Ok("plain"));
    }

    #[test]
    fn attributes_are_written_before_the_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c-json.log");
        let attrs: BTreeMap<String, String> = [("a".to_string(), "1".to_string())].into();
        let mut w = LogWriter::open(&path, Rotation::default(), attrs.clone()).expect("open");
        w.write(false, b"hi\n").expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(
            text.starts_with(r#"{"log":"hi\n","stream":"stdout","attrs":{"a":"1"},"time":""#),
            "{text}"
        );
        let (entries, _) = read_from(&path, 0).expect("entries");
        assert_eq!(entries[0].attrs.as_ref(), Some(&attrs));
    }
}
