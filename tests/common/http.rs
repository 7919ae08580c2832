//! A raw HTTP/1.0 client for the server tests and the load benchmark: one request per
//! connection, so every body ends with the connection (never chunked).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `ditflow serve` process on a free loopback port, killed when dropped.
pub struct Server {
    pub child: Child,
    pub addr: String,
}

impl Server {
    /// Starts `ditflow serve` with its store in `data`, graphs' paths relative to `base`, and
    /// `args`; waits for the address it prints.
    pub fn start(data: &Path, base: &Path, args: &[std::ffi::OsString], stderr: Stdio) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ditflow"))
            .args(["serve", "--addr", "127.0.0.1:0", "--data"])
            .arg(data)
            .arg("--base")
            .arg(base)
            .args(args)
            .env("DITFLOW_PLUGIN_PATH", super::common::plugin_dir())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("start ditflow serve");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped"))
            .read_line(&mut line)
            .expect("the server's first line");
        let addr = line
            .trim()
            .strip_prefix("listening on http://")
            .unwrap_or_else(|| panic!("first line: {line:?}"))
            .to_string();
        Server { child, addr }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The file `name` that `ditflow run GRAPH --set ...` writes, for comparison with a job's.
pub fn run_locally(graph: &str, sets: &[&str], name: &str) -> Vec<u8> {
    let out = super::common::temp_dir(&format!("serve-local-{name}"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ditflow"));
    cmd.args(["run", graph, "--out"]).arg(&out);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let o = cmd
        .current_dir(super::common::repo())
        .env("DITFLOW_PLUGIN_PATH", super::common::plugin_dir())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::read(out.join(name)).unwrap()
}

/// A response: status, headers (lowercased names) and body.
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.0 request (so the body ends with the connection, never chunked).
pub fn request(addr: &str, method: &str, path: &str, token: Option<&str>, body: &[u8]) -> Resp {
    request_typed(addr, method, path, token, "application/json", body)
}

/// [`request`] with the body's content type.
pub fn request_typed(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: &str,
    body: &[u8],
) -> Resp {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if !body.is_empty() {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // The server may answer (413) before reading all of a large body.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(&raw)));
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Resp {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }
}
