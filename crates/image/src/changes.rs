//! `docker import --change` / `docker commit --change`: Dockerfile instructions
//! applied to an image's container config.

use serde_json::{Map, Value};

use crate::error::{Error, Result};

fn err(msg: impl Into<String>) -> Error {
    Error::InvalidChange(msg.into())
}

/// Split shell-like words: whitespace separated, with "double" / 'single'
/// quotes and backslash escapes (as the Dockerfile parser does for ENV/LABEL).
fn words(s: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, '"') | (None, '\'') => {
                quote = Some(c);
                in_word = true;
            }
            (Some(q), c) if c == q => quote = None,
            (Some('\''), c) => cur.push(c),
            (_, '\\') => {
                in_word = true;
                match chars.next() {
                    Some(n) => cur.push(n),
                    None => cur.push('\\'),
                }
            }
            (_, c) => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if quote.is_some() {
        return Err(err(format!("unmatched quote in: {s}")));
    }
    if in_word {
        out.push(cur);
    }
    Ok(out)
}

/// `KEY=VALUE ...` or legacy `KEY VALUE...`.
fn pairs(instr: &str, args: &str) -> Result<Vec<(String, String)>> {
    let first = args.split_whitespace().next().unwrap_or("");
    if !first.contains('=') {
        let (k, v) = args
            .split_once(char::is_whitespace)
            .ok_or_else(|| err(format!("{instr} must have two arguments")))?;
        let v = words(v.trim())?.join(" ");
        return Ok(vec![(k.to_string(), v)]);
    }
    let mut out = Vec::new();
    for w in words(args)? {
        let (k, v) = w.split_once('=').ok_or_else(|| {
            err(format!(
                "Syntax error - can't find = in \"{w}\". Must be of the form: name=value"
            ))
        })?;
        if k.is_empty() {
            return Err(err(format!("{instr} names can not be blank")));
        }
        out.push((k.to_string(), v.to_string()));
    }
    Ok(out)
}

/// JSON array form (`["a","b"]`) if it parses as one, else None.
fn json_array(args: &str) -> Option<Vec<String>> {
    if !args.starts_with('[') {
        return None;
    }
    serde_json::from_str::<Vec<String>>(args).ok()
}

fn exec_form(args: &str) -> Vec<String> {
    json_array(args).unwrap_or_else(|| vec!["/bin/sh".into(), "-c".into(), args.to_string()])
}

/// A Go duration (`time.ParseDuration`) as Docker takes it in HEALTHCHECK
/// options and `until` filters (`30s`, `1m30s`, `500ms`, `1.5h`), in
/// nanoseconds; `None` when it is not one.
pub fn go_duration(text: &str) -> Option<i64> {
    let mut total = 0f64;
    let mut rest = text;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += n * scale;
    }
    Some(total as i64)
}

/// `HEALTHCHECK NONE` or `HEALTHCHECK [--interval=D] [--timeout=D]
/// [--start-period=D] [--start-interval=D] [--retries=N] CMD command`, as
/// the image config's `Healthcheck` object.
fn healthcheck(args: &str) -> Result<Value> {
    let mut hc = Map::new();
    let mut rest = args.trim();
    while let Some(opt) = rest.strip_prefix("--") {
        let (flag, after) = opt.split_once(char::is_whitespace).unwrap_or((opt, ""));
        let (name, value) = flag
            .split_once('=')
            .ok_or_else(|| err(format!("HEALTHCHECK option --{flag} needs a value")))?;
        let key = match name {
            "interval" => "Interval",
            "timeout" => "Timeout",
            "start-period" => "StartPeriod",
            "start-interval" => "StartInterval",
            "retries" => "Retries",
            _ => return Err(err(format!("Unknown flag: {name}"))),
        };
        let v = if key == "Retries" {
            value
                .parse::<i64>()
                .map_err(|_| err(format!("invalid --retries value: {value}")))?
        } else {
            go_duration(value).ok_or_else(|| err(format!("time: invalid duration \"{value}\"")))?
        };
        hc.insert(key.into(), Value::from(v));
        rest = after.trim_start();
    }
    let (kind, command) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let test = match kind.to_ascii_uppercase().as_str() {
        "NONE" if command.trim().is_empty() && hc.is_empty() => vec!["NONE".to_string()],
        "NONE" => return Err(err("HEALTHCHECK NONE takes no arguments")),
        "CMD" if !command.trim().is_empty() => match json_array(command.trim()) {
            Some(argv) => std::iter::once("CMD".to_string()).chain(argv).collect(),
            None => vec!["CMD-SHELL".to_string(), command.trim().to_string()],
        },
        "CMD" => return Err(err("Missing command after HEALTHCHECK CMD")),
        other => {
            return Err(err(format!(
                "Unknown type \"{other}\" in HEALTHCHECK (try CMD)"
            )))
        }
    };
    hc.insert("Test".into(), to_json(test));
    Ok(Value::Object(hc))
}

fn obj<'a>(cfg: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    let v = cfg
        .entry(key.to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    if !v.is_object() {
        *v = Value::Object(Map::new());
    }
    match v {
        Value::Object(m) => m,
        _ => unreachable!("just made an object"),
    }
}

fn to_json(v: Vec<String>) -> Value {
    Value::Array(v.into_iter().map(Value::String).collect())
}

/// Apply `changes` (Dockerfile instructions, one per string) to a container
/// config object (the `config` member of an image config, Docker field names).
/// Supported: CMD, ENTRYPOINT, ENV, WORKDIR, USER, EXPOSE, LABEL, VOLUME,
/// STOPSIGNAL, ONBUILD, HEALTHCHECK (dockerd's commit commands). Anything else is an [`Error::InvalidChange`].
pub fn apply_changes(cfg: &mut Map<String, Value>, changes: &[String]) -> Result<()> {
    for change in changes {
        let line = change.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (instr, args) = match line.split_once(char::is_whitespace) {
            Some((i, a)) => (i, a.trim()),
            None => (line, ""),
        };
        let upper = instr.to_ascii_uppercase();
        match upper.as_str() {
            "CMD" | "ENTRYPOINT" | "WORKDIR" | "USER" | "STOPSIGNAL" | "ENV" | "LABEL"
            | "EXPOSE" | "VOLUME" | "ONBUILD"
                if args.is_empty() =>
            {
                return Err(err(format!("{upper} requires at least one argument")));
            }
            _ => {}
        }
        match upper.as_str() {
            "CMD" => {
                cfg.insert("Cmd".into(), to_json(exec_form(args)));
            }
            "ENTRYPOINT" => {
                cfg.insert("Entrypoint".into(), to_json(exec_form(args)));
                // Docker resets CMD when ENTRYPOINT is set by a later instruction.
                cfg.insert("Cmd".into(), Value::Null);
            }
            "WORKDIR" => {
                let prev = cfg
                    .get("WorkingDir")
                    .and_then(Value::as_str)
                    .unwrap_or("/")
                    .to_string();
                let wd = if args.starts_with('/') {
                    args.to_string()
                } else {
                    format!("{}/{}", prev.trim_end_matches('/'), args)
                };
                cfg.insert("WorkingDir".into(), Value::String(wd));
            }
            "USER" => {
                cfg.insert("User".into(), Value::String(args.to_string()));
            }
            "STOPSIGNAL" => {
                cfg.insert("StopSignal".into(), Value::String(args.to_string()));
            }
            "ENV" => {
                let kvs = pairs("ENV", args)?;
                let mut env: Vec<String> = cfg
                    .get("Env")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|v| v.as_str().map(str::to_string))
                            .collect()
                    })
                    .unwrap_or_default();
                for (k, v) in kvs {
                    let prefix = format!("{k}=");
                    let item = format!("{k}={v}");
                    match env.iter_mut().find(|e| e.starts_with(&prefix)) {
                        Some(e) => *e = item,
                        None => env.push(item),
                    }
                }
                cfg.insert("Env".into(), to_json(env));
            }
            "LABEL" => {
                let kvs = pairs("LABEL", args)?;
                let labels = obj(cfg, "Labels");
                for (k, v) in kvs {
                    labels.insert(k, Value::String(v));
                }
            }
            "EXPOSE" => {
                let mut ports = Vec::new();
                for p in args.split_whitespace() {
                    let (num, proto) = p.split_once('/').unwrap_or((p, "tcp"));
                    let proto = proto.to_ascii_lowercase();
                    if !["tcp", "udp", "sctp"].contains(&proto.as_str()) {
                        return Err(err(format!("invalid proto: {proto}")));
                    }
                    let (lo, hi) = num.split_once('-').unwrap_or((num, num));
                    let parse = |s: &str| {
                        s.parse::<u16>()
                            .map_err(|_| err(format!("invalid containerPort: {num}")))
                    };
                    let (lo, hi) = (parse(lo)?, parse(hi)?);
                    if hi < lo {
                        return Err(err(format!(
                            "invalid range specified for container port: {num}"
                        )));
                    }
                    for port in lo..=hi {
                        ports.push(format!("{port}/{proto}"));
                    }
                }
                let exposed = obj(cfg, "ExposedPorts");
                for p in ports {
                    exposed.insert(p, Value::Object(Map::new()));
                }
            }
            "VOLUME" => {
                let vols = json_array(args)
                    .unwrap_or_else(|| args.split_whitespace().map(str::to_string).collect());
                let volumes = obj(cfg, "Volumes");
                for v in vols {
                    if v.trim().is_empty() {
                        return Err(err("VOLUME specified can not be an empty string"));
                    }
                    volumes.insert(v, Value::Object(Map::new()));
                }
            }
            "ONBUILD" => {
                let mut ob: Vec<Value> = cfg
                    .get("OnBuild")
                    .and_then(Value::as_array)
                    .cloned()
                    .unwrap_or_default();
                ob.push(Value::String(args.to_string()));
                cfg.insert("OnBuild".into(), Value::Array(ob));
            }
            "HEALTHCHECK" => {
                if args.is_empty() {
                    return Err(err("HEALTHCHECK requires at least one argument"));
                }
                cfg.insert("Healthcheck".into(), healthcheck(args)?);
            }
            "ADD" | "ARG" | "COPY" | "FROM" | "MAINTAINER" | "RUN" | "SHELL" => {
                return Err(err(format!("{upper} is not a valid change command")));
            }
            _ => {
                return Err(err(format!(
                    "dockerfile parse error on line 1: unknown instruction: {instr}"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(ch: &[&str]) -> Result<Value> {
        let mut m = Map::new();
        apply_changes(
            &mut m,
            &ch.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )?;
        Ok(Value::Object(m))
    }

    #[test]
    fn healthcheck_changes_as_the_dockerfile_writes_them() {
        let mut cfg = Map::new();
        apply_changes(
            &mut cfg,
            &[
                "HEALTHCHECK --interval=5s --timeout=1m30s --retries=2 CMD wget -q -O- localhost"
                    .into(),
            ],
        )
        .expect("apply");
        assert_eq!(
            cfg["Healthcheck"],
            serde_json::json!({
                "Test": ["CMD-SHELL", "wget -q -O- localhost"],
                "Interval": 5_000_000_000i64,
                "Timeout": 90_000_000_000i64,
                "Retries": 2
            })
        );
        apply_changes(&mut cfg, &[r#"HEALTHCHECK CMD ["true", "x"]"#.into()]).expect("apply");
        assert_eq!(
            cfg["Healthcheck"],
            serde_json::json!({"Test": ["CMD", "true", "x"]})
        );
        apply_changes(&mut cfg, &["HEALTHCHECK NONE".into()]).expect("apply");
        assert_eq!(cfg["Healthcheck"], serde_json::json!({"Test": ["NONE"]}));
        for bad in [
            "HEALTHCHECK --interval=soon CMD true",
            "HEALTHCHECK --bogus=1 CMD true",
            "HEALTHCHECK CMD",
            "HEALTHCHECK RUN true",
        ] {
            assert!(apply_changes(&mut cfg, &[bad.into()]).is_err(), "{bad}");
        }
        assert_eq!(go_duration("500ms"), Some(500_000_000));
        assert_eq!(go_duration("1.5h"), Some(5_400_000_000_000));
    }

    #[test]
    fn changes() -> Result<()> {
        let v = run(&[
            r#"CMD ["/bin/app", "-v"]"#,
            "ENV A=1 B=\"two words\"",
            "ENV C 3 4",
            "ENV A=x",
            "WORKDIR /srv",
            "WORKDIR data",
            "USER 1000:1000",
            "EXPOSE 80 53/udp 8000-8001",
            "LABEL a=b \"c d\"=e",
            "VOLUME /data /logs",
            "STOPSIGNAL SIGINT",
        ])?;
        assert_eq!(v["Cmd"], serde_json::json!(["/bin/app", "-v"]));
        assert_eq!(v["Env"], serde_json::json!(["A=x", "B=two words", "C=3 4"]));
        assert_eq!(v["WorkingDir"], "/srv/data");
        assert_eq!(v["User"], "1000:1000");
        assert!(v["ExposedPorts"]["80/tcp"].is_object());
        assert!(v["ExposedPorts"]["53/udp"].is_object());
        assert!(v["ExposedPorts"]["8001/tcp"].is_object());
        assert_eq!(v["Labels"]["c d"], "e");
        assert!(v["Volumes"]["/logs"].is_object());
        assert_eq!(v["StopSignal"], "SIGINT");
        let v = run(&["ENTRYPOINT echo hi"])?;
        assert_eq!(
            v["Entrypoint"],
            serde_json::json!(["/bin/sh", "-c", "echo hi"])
        );
        let e = run(&["FOO bar"]).err().map(|e| e.to_string());
        assert_eq!(
            e.as_deref(),
            Some("dockerfile parse error on line 1: unknown instruction: FOO")
        );
        let e = run(&["RUN x"]).err().map(|e| e.to_string());
        assert_eq!(e.as_deref(), Some("RUN is not a valid change command"));
        Ok(())
    }
}
