//! `walhook demo`, as the README's first command runs it: the real binary, start to finish. Its summary is
//! what the README shows, line for line, so the README's sample cannot drift from what the demo prints; and
//! the lines that prove the two tenants isolated are checked by name, since they are the demo's point.

use std::process::Command;

/// The README's sample summary: the fenced block that starts with the summary's heading.
fn readme_summary() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find("```\nsummary (read back with SQL):\n")
        .expect("the README shows the demo's summary");
    let block = &readme[start + 4..];
    let end = block.find("```").expect("the block is closed");
    block[..end].lines().map(str::to_string).collect()
}

#[test]
fn the_demo_runs_and_proves_two_tenants_isolated() {
    let out = Command::new(env!("CARGO_BIN_EXE_walhook"))
        .arg("demo")
        .env_remove("RUST_LOG")
        .output()
        .expect("run walhook demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the demo failed:\n{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    let summary = readme_summary();
    assert!(summary.len() > 10, "{summary:?}");
    for line in &summary {
        assert!(
            lines.contains(&line.as_str()),
            "the README's line {line:?} is not in the demo's output:\n{stdout}"
        );
    }
    for line in [
        "    acme   /acme    got 5 of its 5 events, 0 of globex's, 0 without a tenant",
        "    globex /globex  got 3 of its 3 events, 0 of acme's, 0 without a tenant",
        "    /orders, /all   (no tenant) got 0 of the tenants' events",
        "    walhook.deliveries: 5 for acme, 3 for globex, 0 to an endpoint of another tenant",
        "    acme   as walhook_tenant (row-level security) sees 1 endpoint, 5 events, 5 deliveries, 0 rows not its own",
        "    globex as walhook_tenant (row-level security) sees 1 endpoint, 3 events, 3 deliveries, 0 rows not its own",
        "    isolated: neither tenant saw the other's events",
    ] {
        assert!(lines.contains(&line), "missing {line:?} in:\n{stdout}");
    }
    assert!(!stdout.contains("bug!"), "{stdout}");
    // the throwaway cluster is plaintext by design: the demo says so instead of warning about it
    assert!(!stderr.contains("without TLS"), "{stderr}");
}

/// The README's portal command: `cargo run --release -- demo --portal`, its arguments after `--`.
fn readme_portal_args() -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let line = readme
        .lines()
        .find(|l| l.starts_with("cargo run --release -- demo --portal"))
        .expect("the README shows the portal's demo command");
    let command = line.split('#').next().unwrap();
    command
        .split_whitespace()
        .skip_while(|w| *w != "--")
        .skip(1)
        .map(str::to_string)
        .collect()
}

/// `GET target` on its own connection, as a plain HTTP/1.1 client: (status, head, body).
fn get(url: &str, cookie: Option<&str>) -> (u16, String, String) {
    use std::io::{Read, Write};
    let rest = url.strip_prefix("http://").expect("an http URL");
    let (host, target) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    assert!(host.starts_with("127.0.0.1:"), "loopback only: {url}");
    let mut stream = std::net::TcpStream::connect(host).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(60)))
        .unwrap();
    let cookie = cookie.map_or(String::new(), |c| format!("cookie: {c}\r\n"));
    write!(
        stream,
        "GET {target} HTTP/1.1\r\nhost: {host}\r\n{cookie}connection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").expect("a response");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, head.to_string(), body.to_string())
}

#[test]
fn the_demo_serves_the_portal_until_ctrl_c() {
    use std::io::BufRead;
    use std::process::Stdio;
    use std::sync::mpsc;
    use std::time::Duration;

    let deadline = Duration::from_secs(180);
    // its own TMPDIR: the throwaway cluster's directory goes there, and must be gone at the end
    let tmp = std::env::temp_dir().join(format!("walhook-demo-portal-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_walhook"))
        .args(readme_portal_args())
        .env_remove("RUST_LOG")
        .env("TMPDIR", &tmp)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run walhook demo --portal");
    let (lines, read) = mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let stderr = child.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut std::io::BufReader::new(stderr), &mut text);
        text
    });
    let mut seen = Vec::new();
    let mut link = None;
    while link.is_none() || !seen.iter().any(|l: &String| l.starts_with("press Ctrl-C")) {
        let line = read.recv_timeout(deadline).unwrap_or_else(|e| {
            let _ = child.kill();
            panic!(
                "no portal link ({e}); the demo printed:\n{}",
                seen.join("\n")
            )
        });
        if line.starts_with("  acme's customer") {
            link = line.split_whitespace().last().map(str::to_string);
        }
        seen.push(line);
    }
    let link = link.unwrap();
    assert!(link.contains("/login?token="), "{link}");
    let operator = seen
        .iter()
        .find(|l| l.starts_with("  an operator"))
        .and_then(|l| l.split_whitespace().last())
        .unwrap_or_else(|| panic!("no operator link in {seen:?}"))
        .to_string();

    // the link: a session cookie and the way to the endpoints, which are acme's only
    let (status, head, _) = get(&link, None);
    assert_eq!(status, 303, "{head}");
    let cookie = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie:")
                .then(|| l[11..].trim())
        })
        .expect("a session cookie")
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert!(cookie.starts_with("walhook_portal="), "{cookie}");
    let root = &link[..link.find("/login").unwrap()];
    let (status, _, page) = get(&format!("{root}/"), Some(&cookie));
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("/acme</a>"),
        "acme's endpoint listed:\n{page}"
    );
    assert!(!page.contains("globex"), "nothing of globex:\n{page}");
    // the link works once
    assert_eq!(get(&link, None).0, 401);
    // the operator's link opens a session too
    let (status, head, _) = get(&operator, None);
    assert_eq!(status, 303, "{head}");

    // Ctrl-C: it stops, exits 0 and removes its cluster
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGINT);
    }
    let (done, exited) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(child.wait());
    });
    let status = exited
        .recv_timeout(deadline)
        .expect("the demo stops after Ctrl-C")
        .unwrap();
    // the rest of its output, up to the end of the pipe
    let mut rest = Vec::new();
    while let Ok(line) = read.recv_timeout(deadline) {
        rest.push(line);
    }
    let stderr = errors.join().unwrap();
    assert!(status.success(), "{status}: {stderr}\n{}", rest.join("\n"));
    assert!(rest.iter().any(|l| l.starts_with("stopping:")), "{rest:?}");
    let left: Vec<_> = std::fs::read_dir(&tmp)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind in TMPDIR: {left:?}");
    std::fs::remove_dir_all(&tmp).unwrap();
}
