//! Container networks with the real `docker` CLI: the default bridge,
//! user-defined networks, addresses, names, published ports, isolation,
//! trust levels, docker-compose, and a daemon restart.
//!
//! Containers talk to the host over loopback and their bridges, and to an
//! "outside host" that is a network namespace the test makes.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::{stderr, Daemon};

/// `GET path` over plain HTTP/1.0; the body, or `None` when the server
/// cannot be reached within two seconds.
fn http_get(addr: &str, path: &str) -> Option<String> {
    let addr: SocketAddr = addr.parse().expect("address");
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out.split_once("\r\n\r\n")?.1.to_string())
}

fn links() -> String {
    let out = Command::new("ip")
        .args(["-br", "link"])
        .output()
        .expect("ip");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn ip_of(d: &Daemon, container: &str, network: &str) -> String {
    d.ok(&[
        "inspect",
        "-f",
        &format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}"),
        container,
    ])
    .trim()
    .to_string()
}

/// An "outside host": a network namespace joined to the host by a veth
/// pair, serving `marker.txt` over HTTP on port 9000.
struct Outside {
    ns: String,
    host_if: String,
    pub addr: String,
    server: std::process::Child,
    _dir: tempfile::TempDir,
}

impl Outside {
    fn new() -> Self {
        let n = std::process::id() % 200 + 20;
        let ns = format!("vtout{n}");
        let host_if = format!("vto{n}a");
        let peer_if = format!("vto{n}b");
        let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        let _ = Command::new("ip").args(["link", "del", &host_if]).status();
        let run = |args: &[&str]| {
            let st = Command::new("ip").args(args).status().expect("ip");
            assert!(st.success(), "ip {args:?}");
        };
        run(&["netns", "add", &ns]);
        run(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if, "netns", &ns,
        ]);
        run(&["addr", "add", &format!("10.251.{n}.1/24"), "dev", &host_if]);
        run(&["link", "set", &host_if, "up"]);
        run(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("10.251.{n}.2/24"),
            "dev",
            &peer_if,
        ]);
        run(&["-n", &ns, "link", "set", &peer_if, "up"]);
        run(&["-n", &ns, "link", "set", "lo", "up"]);
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("marker.txt"), "outside-ok\n").expect("marker");
        let addr = format!("10.251.{n}.2");
        let server = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns,
                "python3",
                "-m",
                "http.server",
                "9000",
                "--bind",
                &addr,
            ])
            .current_dir(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("http server in the namespace");
        let o = Outside {
            ns,
            host_if,
            addr,
            server,
            _dir: dir,
        };
        assert!(
            common::eventually(10, || {
                Command::new("ip")
                    .args(["netns", "exec", &o.ns, "python3", "-c"])
                    .arg(format!(
                        "import urllib.request;urllib.request.urlopen('http://{}:9000/marker.txt',timeout=1)",
                        o.addr
                    ))
                    .stderr(std::process::Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
            }),
            "the outside server did not come up"
        );
        o
    }
}

impl Drop for Outside {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// Waits until `container`'s httpd listens on port 80 (`run -d` returns
/// once the process started, before it binds).
fn wait_listening(d: &Daemon, container: &str) {
    d.ok(&[
        "exec",
        container,
        "sh",
        "-c",
        "for i in $(seq 100); do netstat -ltn | grep -q ':80 ' && exit 0; sleep 0.1; done; exit 1",
    ]);
}

/// Whether `container` (running) fetches `url` within three seconds.
fn fetches(d: &Daemon, container: &str, url: &str, want: &str) -> bool {
    let out = d.docker(&[
        "exec",
        container,
        "sh",
        "-c",
        &format!("timeout 3 wget -qO- {url}"),
    ]);
    out.status.success() && String::from_utf8_lossy(&out.stdout).contains(want)
}

#[test]
fn user_networks_give_addresses_names_ports_and_isolation() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);

    let ls = d.ok(&["network", "ls", "--format", "{{.Name}} {{.Driver}}"]);
    for want in ["bridge bridge", "host host", "none null"] {
        assert!(ls.contains(want), "{ls}");
    }
    // A VM cannot share the host's network stack or another container's.
    let host = d.docker(&["run", "--rm", "--network", "host", "busybox", "true"]);
    assert!(!host.status.success());
    assert!(stderr(&host).contains("not supported"), "{}", stderr(&host));
    let shared = d.docker(&["create", "--network", "container:x", "busybox", "true"]);
    assert!(!shared.status.success());
    assert!(
        stderr(&shared).contains("not supported"),
        "{}",
        stderr(&shared)
    );

    let n1 = d.ok(&["network", "create", "n1"]).trim().to_string();
    d.ok(&[
        "network",
        "create",
        "--subnet",
        "10.201.0.0/24",
        "--gateway",
        "10.201.0.254",
        "--ip-range",
        "10.201.0.128/25",
        "--label",
        "team=a",
        "n2",
    ]);
    let dup = d.docker(&["network", "create", "n1"]);
    assert!(stderr(&dup).contains("already exists"), "{}", stderr(&dup));
    let overlap = d.docker(&["network", "create", "--subnet", "10.201.0.0/16", "n3"]);
    assert!(
        stderr(&overlap).contains("overlaps"),
        "{}",
        stderr(&overlap)
    );
    let bad_gw = d.docker(&[
        "network",
        "create",
        "--subnet",
        "10.202.0.0/24",
        "--gateway",
        "10.9.9.9",
        "n3",
    ]);
    assert!(!bad_gw.status.success());
    assert!(
        !d.ok(&["network", "ls"]).contains("n3"),
        "a refused network is not half-made"
    );
    let n2 = d.ok(&[
        "network",
        "inspect",
        "-f",
        "{{range .IPAM.Config}}{{.Subnet}} {{.Gateway}} {{.IPRange}}{{end}} {{.Labels.team}}",
        "n2",
    ]);
    assert_eq!(n2.trim(), "10.201.0.0/24 10.201.0.254 10.201.0.128/25 a");
    assert!(d
        .ok(&[
            "network",
            "ls",
            "--filter",
            "label=team=a",
            "--format",
            "{{.Name}}"
        ])
        .trim()
        .eq("n2"));

    // A web server on n1 with an alias and a port published on loopback.
    d.ok(&[
        "run",
        "-d",
        "--name",
        "web",
        "--network",
        "n1",
        "--network-alias",
        "site",
        "-p",
        "127.0.0.1::80",
        "busybox",
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/etc",
    ]);
    wait_listening(&d, "web");
    let web_id = d.ok(&["inspect", "-f", "{{.Id}}", "web"]);
    let short = &web_id.trim()[..12];
    let port = d.ok(&["port", "web", "80"]);
    let hostport = port.trim().to_string();
    assert!(hostport.starts_with("127.0.0.1:"), "{port}");
    assert_eq!(
        http_get(&hostport, "/hostname").map(|b| b.trim().to_string()),
        Some(short.to_string()),
        "published port"
    );
    let web_ip = ip_of(&d, "web", "n1");
    assert!(!web_ip.is_empty());
    assert_eq!(
        http_get(&format!("{web_ip}:80"), "/hostname").map(|b| b.trim().to_string()),
        Some(short.to_string()),
        "the host reaches a container's address"
    );
    let ps = d.ok(&["ps", "--format", "{{.Ports}}"]);
    assert!(ps.contains("->80/tcp"), "{ps}");

    // A second server on n2 with a fixed address.
    d.ok(&[
        "run",
        "-d",
        "--name",
        "peer2",
        "--network",
        "n2",
        "--ip",
        "10.201.0.200",
        "busybox",
        "httpd",
        "-f",
        "-p",
        "80",
        "-h",
        "/etc",
    ]);
    wait_listening(&d, "peer2");
    assert_eq!(ip_of(&d, "peer2", "n2"), "10.201.0.200");
    let peer2_id = d.ok(&["inspect", "-f", "{{.Id}}", "peer2"]);
    let bad_ip = d.docker(&["run", "--rm", "--ip", "10.201.0.5", "busybox", "true"]);
    assert!(
        stderr(&bad_ip).contains("user configured subnets"),
        "{}",
        stderr(&bad_ip)
    );

    // On n1, names resolve; n2 cannot be reached.
    let out = d.ok(&[
        "run", "--rm", "--network", "n1", "busybox", "sh", "-c",
        "cat /etc/resolv.conf; wget -qO- http://site/hostname; wget -qO- http://web/hostname; timeout 3 wget -qO- http://10.201.0.200/hostname; echo cross=$?",
    ]);
    assert_eq!(out.matches(short).count(), 2, "by alias and by name: {out}");
    assert!(out.contains("nameserver "), "{out}");
    assert!(!out.contains("cross=0"), "networks are isolated: {out}");

    // Connect a running container to n2: it gets an address from the
    // range, its alias resolves there, and it reaches n2's members.
    d.ok(&["network", "connect", "--alias", "w2", "n2", "web"]);
    let web_n2 = ip_of(&d, "web", "n2");
    let last: u8 = web_n2
        .rsplit('.')
        .next()
        .and_then(|x| x.parse().ok())
        .expect("ip");
    assert!(web_n2.starts_with("10.201.0.") && last >= 128, "{web_n2}");
    assert!(fetches(
        &d,
        "web",
        "http://10.201.0.200/hostname",
        &peer2_id.trim()[..12]
    ));
    let ns = d.ok(&["exec", "peer2", "nslookup", "w2"]);
    assert!(ns.contains(&web_n2), "{ns}");
    let members = d.ok(&[
        "network",
        "inspect",
        "-f",
        "{{range .Containers}}{{.Name}} {{end}}",
        "n2",
    ]);
    assert!(
        members.contains("web") && members.contains("peer2"),
        "{members}"
    );
    d.ok(&["network", "disconnect", "n2", "web"]);
    assert!(!fetches(&d, "web", "http://10.201.0.200/hostname", "peer2"));
    assert!(
        fetches(&d, "web", "http://site/hostname", short),
        "n1 still works"
    );

    // A network in use cannot go; a stopped container frees its port.
    let rm = d.docker(&["network", "rm", "n2"]);
    assert!(stderr(&rm).contains("active endpoints"), "{}", stderr(&rm));
    d.ok(&["stop", "-t", "1", "web"]);
    assert!(http_get(&hostport, "/hostname").is_none(), "port released");
    assert!(d.ok(&["port", "web"]).trim().is_empty());

    let bridges = [format!("vs-{}", &n1[..12])];
    assert!(links().contains(&bridges[0]), "{}", links());
    d.ok(&["rm", "-f", "web", "peer2"]);
    d.ok(&["network", "rm", "n1", "n2"]);
    assert!(
        !links().contains(&bridges[0]),
        "bridge left behind: {}",
        links()
    );
    let pruned = d.ok(&["network", "prune", "-f"]);
    assert!(pruned.trim().is_empty(), "{pruned}");
}

#[test]
fn ports_survive_a_daemon_restart_and_conflicts_fail_the_start() {
    let mut d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let spec = format!("127.0.0.1:{port}:80");
    d.ok(&[
        "run", "-d", "--name", "web", "-p", &spec, "--expose", "8080", "-P", "busybox", "httpd",
        "-f", "-p", "80", "-h", "/etc",
    ]);
    wait_listening(&d, "web");
    let all = d.ok(&["port", "web"]);
    assert!(
        all.contains(&format!("80/tcp -> 127.0.0.1:{port}")),
        "{all}"
    );
    assert!(
        all.contains("8080/tcp -> 0.0.0.0:"),
        "-P publishes exposed ports: {all}"
    );
    let addr = format!("127.0.0.1:{port}");
    assert!(http_get(&addr, "/hostname").is_some());
    // -P also publishes the ports the image exposes (EXPOSE), which the
    // container's config then lists.
    d.ok(&["create", "--name", "src", "busybox", "true"]);
    d.ok(&["commit", "--change", "EXPOSE 8081", "src", "exposing:1"]);
    d.ok(&[
        "run",
        "-d",
        "--name",
        "img-ports",
        "-P",
        "exposing:1",
        "httpd",
        "-f",
        "-p",
        "8081",
        "-h",
        "/etc",
    ]);
    let exposed = d.ok(&[
        "inspect",
        "-f",
        "{{json .Config.ExposedPorts}}",
        "img-ports",
    ]);
    assert!(exposed.contains("\"8081/tcp\""), "{exposed}");
    let published = d.ok(&["port", "img-ports", "8081"]);
    let host_port = published
        .lines()
        .find_map(|l| l.strip_prefix("0.0.0.0:"))
        .unwrap_or_else(|| panic!("8081 not published: {published}"))
        .trim()
        .to_string();
    assert!(
        common::eventually(30, || http_get(
            &format!("127.0.0.1:{host_port}"),
            "/hostname"
        )
        .is_some()),
        "the image's exposed port answers on {host_port}"
    );
    d.ok(&["rm", "-f", "img-ports", "src"]);
    // A user network and a container on it, for after the restart.
    d.ok(&["network", "create", "--label", "keep=1", "kept"]);
    d.ok(&[
        "run",
        "-d",
        "--name",
        "db",
        "--network",
        "kept",
        "busybox",
        "sleep",
        "100000",
    ]);
    let db_ip = ip_of(&d, "db", "kept");

    d.kill9();
    d.restart();
    assert!(
        common::eventually(10, || http_get(&addr, "/hostname").is_some()),
        "the published port is back after a daemon restart"
    );
    assert!(d.ok(&["port", "web", "80"]).contains(&addr));
    // The network, the container's address and its name in the network's
    // DNS are as they were.
    let nets = d.ok(&[
        "network",
        "ls",
        "--filter",
        "label=keep=1",
        "--format",
        "{{.Name}}",
    ]);
    assert_eq!(nets.trim(), "kept");
    assert_eq!(ip_of(&d, "db", "kept"), db_ip);
    let looked = d.ok(&[
        "run",
        "--rm",
        "--network",
        "kept",
        "busybox",
        "nslookup",
        "db",
    ]);
    assert!(looked.contains(&db_ip), "{looked}");
    d.ok(&["rm", "-f", "db"]);
    d.ok(&["network", "rm", "kept"]);

    let clash = d.docker(&[
        "run", "-d", "--name", "clash", "-p", &spec, "busybox", "sleep", "100",
    ]);
    assert!(!clash.status.success());
    assert!(
        stderr(&clash).contains("port is already allocated"),
        "{}",
        stderr(&clash)
    );
    let state = d.ok(&["inspect", "-f", "{{.State.Running}}", "clash"]);
    assert_eq!(state.trim(), "false");
    assert!(
        common::eventually(10, || http_get(&addr, "/hostname").is_some()),
        "the first container keeps its port: {}",
        d.log()
    );
    let none = d.docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "-p",
        "80",
        "busybox",
        "true",
    ]);
    assert!(
        stderr(&none).contains("conflicting options"),
        "{}",
        stderr(&none)
    );
    let out = d.ok(&[
        "run",
        "--rm",
        "--network",
        "none",
        "busybox",
        "ip",
        "-4",
        "addr",
    ]);
    assert!(!out.contains("eth"), "--network none: loopback only: {out}");
}

#[test]
fn trust_levels_and_internal_networks_are_enforced() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    let out = Outside::new();
    let outside = format!("http://{}:9000/marker.txt", out.addr);
    let trust = |name: &str, level: &str| {
        d.ok(&[
            "network",
            "create",
            "-o",
            &format!("com.vessel.network.trust={level}"),
            name,
        ]);
    };
    let server = |name: &str, net: &str, publish: bool| {
        let mut args = vec!["run", "-d", "--name", name, "--network", net];
        if publish {
            args.extend(["-p", "127.0.0.1::80"]);
        }
        args.extend(["busybox", "httpd", "-f", "-p", "80", "-h", "/etc"]);
        d.ok(&args);
        wait_listening(&d, name);
    };
    let bad = d.docker(&[
        "network",
        "create",
        "-o",
        "com.vessel.network.trust=wide",
        "x",
    ]);
    assert!(stderr(&bad).contains("closed, outbound, peers, published, open"));

    // Default (open): out through NAT, peers, host.
    d.ok(&["network", "create", "open"]);
    server("o1", "open", false);
    server("o2", "open", false);
    assert!(fetches(&d, "o1", &outside, "outside-ok"), "open: outbound");
    assert!(fetches(&d, "o1", "http://o2/hostname", ""), "open: peers");
    assert!(http_get(&format!("{}:80", ip_of(&d, "o2", "open")), "/hostname").is_some());

    // --internal: nothing leaves the network, peers still talk.
    d.ok(&["network", "create", "--internal", "inner"]);
    server("i1", "inner", false);
    server("i2", "inner", false);
    assert!(
        !fetches(&d, "i1", &outside, "outside-ok"),
        "internal: no way out"
    );
    assert!(
        fetches(&d, "i1", "http://i2/hostname", ""),
        "internal: peers"
    );

    // outbound: out yes; peers and the host cannot connect in.
    trust("outb", "outbound");
    server("ob1", "outb", false);
    server("ob2", "outb", false);
    assert!(fetches(&d, "ob1", &outside, "outside-ok"), "outbound: out");
    assert!(!fetches(
        &d,
        "ob1",
        &format!("http://{}/hostname", ip_of(&d, "ob2", "outb")),
        ""
    ));
    assert!(http_get(&format!("{}:80", ip_of(&d, "ob2", "outb")), "/hostname").is_none());

    // peers: only each other.
    trust("peer", "peers");
    server("p1", "peer", false);
    server("p2", "peer", false);
    assert!(
        fetches(&d, "p1", "http://p2/hostname", ""),
        "peers: each other"
    );
    assert!(
        !fetches(&d, "p1", &outside, "outside-ok"),
        "peers: no way out"
    );
    assert!(http_get(&format!("{}:80", ip_of(&d, "p2", "peer")), "/hostname").is_none());

    // published: only published ports, nothing out.
    trust("pub", "published");
    server("pb1", "pub", true);
    let hp = d.ok(&["port", "pb1", "80"]).trim().to_string();
    assert!(
        http_get(&hp, "/hostname").is_some(),
        "published: the published port"
    );
    assert!(http_get(&format!("{}:80", ip_of(&d, "pb1", "pub")), "/hostname").is_none());
    assert!(
        !fetches(&d, "pb1", &outside, "outside-ok"),
        "published: no way out"
    );

    // closed: nothing at all, but the network's DNS still answers.
    trust("shut", "closed");
    server("c1", "shut", true);
    server("c2", "shut", false);
    let hp = d.ok(&["port", "c1", "80"]).trim().to_string();
    assert!(
        http_get(&hp, "/hostname").is_none(),
        "closed: not even published ports"
    );
    assert!(!fetches(&d, "c1", &outside, "outside-ok"));
    assert!(!fetches(&d, "c1", "http://c2/hostname", ""));
    // busybox's nslookup sends its queries at once from one socket and does
    // not retry; under heavy load a query is sometimes lost (seen only on
    // this closed network, cause not found; suspected a conntrack clash),
    // so a few attempts are allowed.
    let c2_ip = ip_of(&d, "c2", "shut");
    let mut last = String::new();
    let found = common::eventually(15, || {
        last = String::from_utf8_lossy(
            &d.docker(&["exec", "c1", "nslookup", "-type=a", "c2"])
                .stdout,
        )
        .into_owned();
        last.contains(&c2_ip)
    });
    assert!(found, "{last}\n{}", d.log());
}

#[test]
fn compose_brings_up_two_services_that_find_each_other() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    let dir = d.dir.path().join("proj");
    std::fs::create_dir_all(&dir).expect("project dir");
    std::fs::write(
        dir.join("docker-compose.yml"),
        r#"version: "2.4"
services:
  web:
    image: busybox
    command: httpd -f -p 80 -h /etc
  client:
    image: busybox
    command: sh -c "for i in 1 2 3 4 5; do wget -qO- http://web/hostname && exit 0; sleep 1; done; exit 1"
    depends_on: [web]
"#,
    )
    .expect("compose file");
    let compose = |args: &[&str]| {
        Command::new("docker-compose")
            .args(["-p", "vproj"])
            .args(args)
            .current_dir(&dir)
            .env("DOCKER_HOST", d.host())
            .output()
            .expect("run docker-compose")
    };
    let up = compose(&["up", "-d"]);
    assert!(up.status.success(), "{}\n{}", stderr(&up), d.log());
    assert!(d.ok(&["network", "ls"]).contains("vproj_default"));
    let web = d.ok(&["inspect", "-f", "{{.Id}}", "vproj_web_1"]);
    let code = d.ok(&["wait", "vproj_client_1"]);
    assert_eq!(
        code.trim(),
        "0",
        "client: {}",
        d.ok(&["logs", "vproj_client_1"])
    );
    let logs = d.ok(&["logs", "vproj_client_1"]);
    assert!(logs.contains(&web.trim()[..12]), "{logs}");
    let down = compose(&["down"]);
    assert!(down.status.success(), "{}", stderr(&down));
    assert!(d.ok(&["ps", "-aq"]).trim().is_empty());
    assert!(!d.ok(&["network", "ls"]).contains("vproj_default"));
}

#[test]
fn run_flags_shape_the_guest_network() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    d.ok(&["network", "create", "--subnet", "10.211.0.0/24", "na"]);
    d.ok(&["network", "create", "nb"]);
    d.ok(&["network", "create", "--subnet", "10.213.0.0/24", "nc"]);
    d.ok(&["network", "create", "nd"]);
    d.ok(&[
        "run",
        "-d",
        "--name",
        "mm",
        "--network",
        "na",
        "--network",
        "nb",
        "--ip",
        "10.211.0.9",
        "--mac-address",
        "02:42:ac:11:00:99",
        "--dns",
        "10.9.9.9",
        "--dns-search",
        "example.test",
        "--dns-option",
        "ndots:2",
        "--add-host",
        "db.local:10.1.2.3",
        "--add-host",
        "gw.test:host-gateway",
        "busybox",
        "sleep",
        "1000",
    ]);
    let resolv = d.ok(&["exec", "mm", "cat", "/etc/resolv.conf"]);
    for want in [
        "nameserver 10.211.0.1",
        "search example.test",
        "options ndots:2",
    ] {
        assert!(resolv.contains(want), "{want}: {resolv}");
    }
    // As with Docker's embedded DNS, the `--dns` server is the network DNS
    // server's upstream for this container, not a second nameserver.
    assert!(!resolv.contains("10.9.9.9"), "{resolv}");
    let hosts = d.ok(&["exec", "mm", "cat", "/etc/hosts"]);
    assert!(hosts.contains("10.1.2.3\tdb.local"), "{hosts}");
    // host-gateway is the host's address on the default bridge, as with dockerd.
    let gw = d.ok(&[
        "network",
        "inspect",
        "-f",
        "{{(index .IPAM.Config 0).Gateway}}",
        "bridge",
    ]);
    assert!(
        hosts.contains(&format!("{}\tgw.test", gw.trim())),
        "{gw}: {hosts}"
    );
    assert!(hosts.contains("10.211.0.9\t"), "own address: {hosts}");
    let addrs = d.ok(&["exec", "mm", "ip", "-4", "-o", "addr"]);
    assert!(
        addrs.contains("eth0") && addrs.contains("10.211.0.9/24"),
        "{addrs}"
    );
    let nb_ip = ip_of(&d, "mm", "nb");
    assert!(
        addrs.contains(&format!("eth1    inet {nb_ip}/")) || addrs.contains(&nb_ip),
        "{addrs}"
    );
    let link = d.ok(&["exec", "mm", "ip", "link", "show", "eth0"]);
    assert!(link.contains("02:42:ac:11:00:99"), "{link}");
    let mac = d.ok(&[
        "inspect",
        "-f",
        "{{(index .NetworkSettings.Networks \"na\").MacAddress}}",
        "mm",
    ]);
    assert_eq!(mac.trim(), "02:42:ac:11:00:99");
    let route = d.ok(&["exec", "mm", "ip", "route"]);
    assert!(route.contains("default via 10.211.0.1 dev eth0"), "{route}");

    // A third network with a chosen address; a fourth does not fit.
    d.ok(&["network", "connect", "--ip", "10.213.0.50", "nc", "mm"]);
    let addrs = d.ok(&["exec", "mm", "ip", "-4", "-o", "addr"]);
    assert!(addrs.contains("10.213.0.50/24"), "{addrs}");
    let full = d.docker(&["network", "connect", "nd", "mm"]);
    assert!(!full.status.success());
    assert!(
        stderr(&full).contains("at most 3 networks"),
        "{}",
        stderr(&full)
    );
    let taken = d.docker(&[
        "run",
        "--rm",
        "--network",
        "na",
        "--ip",
        "10.211.0.9",
        "busybox",
        "true",
    ]);
    assert!(
        stderr(&taken).contains("already in use"),
        "{}",
        stderr(&taken)
    );

    // The default bridge's endpoint also shows at the top of
    // NetworkSettings, as scripts expect.
    d.ok(&["run", "-d", "--name", "bb", "busybox", "sleep", "1000"]);
    let ip = d.ok(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", "bb"]);
    assert_eq!(ip.trim(), ip_of(&d, "bb", "bridge"));
    assert!(!ip.trim().is_empty());
}

/// A DNS server on `addr` (UDP) that answers every A query with `answer`
/// and every other query with no records, for a bounded time.
fn fake_dns(addr: &str, answer: [u8; 4]) -> std::thread::JoinHandle<()> {
    let socket = std::net::UdpSocket::bind(addr).expect("bind the fake DNS server");
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    std::thread::spawn(move || {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        let mut buf = [0u8; 512];
        while std::time::Instant::now() < deadline {
            let Ok((len, from)) = socket.recv_from(&mut buf) else {
                continue;
            };
            if len < 17 {
                continue;
            }
            // The question: labels up to the root, then type and class.
            let mut end = 12;
            while end < len && buf[end] != 0 {
                end += usize::from(buf[end]) + 1;
            }
            let qend = end + 5;
            if qend > len {
                continue;
            }
            let is_a = buf[end + 1] == 0 && buf[end + 2] == 1;
            let mut out = Vec::new();
            out.extend_from_slice(&buf[..2]);
            out.extend_from_slice(&[0x81, 0x80, 0, 1, 0, u8::from(is_a), 0, 0, 0, 0]);
            out.extend_from_slice(&buf[12..qend]);
            if is_a {
                out.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
                out.extend_from_slice(&answer);
            }
            let _ = socket.send_to(&out, from);
        }
    })
}

#[test]
fn bridge_options_internal_routes_hosts_dns_upstreams_and_events() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    // Bad option values get the bridge driver's 400s, and nothing is made.
    for (opt, want) in [
        (
            "com.docker.network.bridge.enable_icc=maybe",
            "failed to parse com.docker.network.bridge.enable_icc value: maybe",
        ),
        (
            "com.docker.network.driver.mtu=big",
            "failed to parse com.docker.network.driver.mtu value: big",
        ),
        ("com.docker.network.driver.mtu=20", "invalid MTU number: 20"),
    ] {
        let out = d.docker(&["network", "create", "-o", opt, "badopt"]);
        assert!(!out.status.success(), "{opt}");
        assert!(stderr(&out).contains(want), "{}", stderr(&out));
    }
    let ls = d.ok(&["network", "ls", "--format", "{{.Name}}"]);
    assert!(!ls.contains("badopt"), "{ls}");

    // MTU and no inter-container traffic.
    d.ok(&[
        "network",
        "create",
        "--label",
        "keep=yes",
        "-o",
        "com.docker.network.driver.mtu=1400",
        "-o",
        "com.docker.network.bridge.enable_icc=false",
        "-o",
        "com.docker.network.bridge.enable_ip_masquerade=false",
        "quiet",
    ]);
    let t0 = common::unix_now().to_string();
    for name in ["q1", "q2"] {
        d.ok(&[
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "quiet",
            "busybox",
            "sleep",
            "1000",
        ]);
    }
    let link = d.ok(&["exec", "q1", "ip", "link", "show", "eth0"]);
    assert!(link.contains("mtu 1400"), "{link}");
    // ps filters by network and published port.
    d.ok(&[
        "run",
        "-d",
        "--name",
        "pub",
        "-p",
        "127.0.0.1::8080",
        "busybox",
        "sleep",
        "1000",
    ]);
    let on = d.ok(&["ps", "--filter", "network=quiet", "--format", "{{.Names}}"]);
    let mut on: Vec<&str> = on.lines().collect();
    on.sort_unstable();
    assert_eq!(on, ["q1", "q2"]);
    let published = d.ok(&[
        "ps",
        "--filter",
        "publish=8000-8100/tcp",
        "--format",
        "{{.Names}}",
    ]);
    assert_eq!(published.trim(), "pub");
    let out = d.docker(&["ps", "--filter", "health=bogus"]);
    assert!(
        stderr(&out).contains("Unrecognised filter value for health: bogus"),
        "{}",
        stderr(&out)
    );
    d.ok(&["rm", "-f", "pub"]);
    let gw = d.ok(&[
        "network",
        "inspect",
        "-f",
        "{{(index .IPAM.Config 0).Gateway}}",
        "quiet",
    ]);
    d.ok(&["exec", "q1", "ping", "-c", "1", "-W", "2", gw.trim()]);
    let peer = ip_of(&d, "q2", "quiet");
    let out = d.docker(&["exec", "q1", "ping", "-c", "2", "-W", "2", &peer]);
    assert!(
        !out.status.success(),
        "enable_icc=false: peers must not reach each other"
    );
    let subnet = d.ok(&[
        "network",
        "inspect",
        "-f",
        "{{(index .IPAM.Config 0).Subnet}}",
        "quiet",
    ]);
    let table = Command::new("nft")
        .args([
            "list",
            "table",
            "inet",
            &format!("vessel_{}", d.bridge_name()),
        ])
        .output()
        .expect("nft");
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        !table.contains(&format!("ip saddr {} ", subnet.trim())),
        "enable_ip_masquerade=false: no NAT for the network: {table}"
    );

    // The container's own address, not a loopback one, for its hostname.
    let own = d.ok(&["exec", "q1", "hostname", "-i"]);
    assert_eq!(own.trim(), ip_of(&d, "q1", "quiet"));

    // Legacy links: the linked container's address under the alias.
    let out = d.docker(&["run", "--rm", "--link", "nope:db", "busybox", "true"]);
    assert!(
        stderr(&out).contains("Could not get container for nope"),
        "{}",
        stderr(&out)
    );
    let hosts = d.ok(&[
        "run",
        "--rm",
        "--network",
        "quiet",
        "--link",
        "q1:database",
        "busybox",
        "cat",
        "/etc/hosts",
    ]);
    let q1_ip = ip_of(&d, "q1", "quiet");
    assert!(hosts.contains(&format!("{q1_ip}\tdatabase q1 ")), "{hosts}");

    // Start and stop show as network connect and disconnect events.
    d.ok(&["stop", "-t", "1", "q2"]);
    let t1 = (common::unix_now() + 1).to_string();
    let events = d.ok(&[
        "events",
        "--since",
        &t0,
        "--until",
        &t1,
        "--filter",
        "type=network",
        "--filter",
        "network=quiet",
        "--format",
        "{{.Action}} {{index .Actor.Attributes \"container\"}}",
    ]);
    let q2 = d.ok(&["inspect", "-f", "{{.Id}}", "q2"]);
    assert!(
        events.contains(&format!("connect {}", q2.trim())),
        "{events}"
    );
    assert!(
        events.contains(&format!("disconnect {}", q2.trim())),
        "{events}"
    );

    // An internal network gives no default route.
    d.ok(&["network", "create", "--internal", "inner"]);
    d.ok(&["network", "connect", "inner", "q2"]);
    d.ok(&["start", "q2"]);
    let route = d.ok(&["exec", "q2", "ip", "route"]);
    assert!(route.contains("default via"), "quiet still routes: {route}");
    d.ok(&[
        "run",
        "-d",
        "--name",
        "q3",
        "--network",
        "inner",
        "busybox",
        "sleep",
        "1000",
    ]);
    let route = d.ok(&["exec", "q3", "ip", "route"]);
    assert!(!route.contains("default"), "{route}");

    // --dns: the upstream of the container's queries on a user network; on
    // the default bridge, its nameserver.
    let upstream = fake_dns("127.0.0.77:53", [10, 77, 0, 7]);
    d.ok(&[
        "run",
        "-d",
        "--name",
        "q4",
        "--network",
        "quiet",
        "--dns",
        "127.0.0.77",
        "busybox",
        "sleep",
        "1000",
    ]);
    let looked = d.ok(&["exec", "q4", "nslookup", "anything.example.test"]);
    assert!(looked.contains("10.77.0.7"), "{looked}");
    let resolv = d.ok(&[
        "run",
        "--rm",
        "--dns",
        "10.9.9.9",
        "busybox",
        "cat",
        "/etc/resolv.conf",
    ]);
    assert_eq!(resolv.trim(), "nameserver 10.9.9.9", "{resolv}");

    // Prune by label! and until: nothing in use or labelled keep=yes goes.
    for c in ["q1", "q2", "q3", "q4"] {
        d.ok(&["rm", "-f", c]);
    }
    d.ok(&["network", "create", "young"]);
    let pruned = d.ok(&["network", "prune", "-f", "--filter", "until=1h"]);
    assert!(
        !pruned.contains("young") && !pruned.contains("inner"),
        "{pruned}"
    );
    let pruned = d.ok(&["network", "prune", "-f", "--filter", "label!=keep=yes"]);
    assert!(
        pruned.contains("young") && pruned.contains("inner"),
        "{pruned}"
    );
    assert!(!pruned.contains("quiet"), "{pruned}");
    let bad = d.docker(&["network", "prune", "-f", "--filter", "until=soon"]);
    assert!(!bad.status.success());
    d.ok(&["network", "rm", "quiet"]);
    drop(upstream);
}

#[test]
fn container_interfaces_have_no_ipv6_as_on_ipv4_only_docker_networks() {
    let d = Daemon::start();
    d.load_busybox(&["busybox:latest"]);
    d.ok(&["network", "create", "v4only"]);
    d.ok(&[
        "create",
        "--name",
        "two",
        "busybox",
        "sh",
        "-c",
        "for i in eth0 eth1; do cat /proc/sys/net/ipv6/conf/$i/disable_ipv6; done; ip -6 addr show",
    ]);
    d.ok(&["network", "connect", "v4only", "two"]);
    let out = d.ok(&["start", "-a", "two"]);
    // Both interfaces have IPv6 off and no link-local address; `lo`
    // keeps `::1`.
    assert!(out.starts_with("1\n1\n"), "{out}");
    assert!(!out.contains("fe80"), "{out}");
    assert!(out.contains("::1"), "{out}");
    d.ok(&["rm", "two"]);
}
