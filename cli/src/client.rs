//! A minimal HTTP/1.0 client for `ditflow submit` and `ditflow jobs`: plain `http://` to a
//! `ditflow serve` (on the loopback or a private network; put TLS in front with a proxy and
//! reach it through that). HTTP/1.0 keeps every response body plain until the connection
//! closes, which is also how the job's server-sent events arrive, one line at a time.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// A server address from `http://HOST:PORT[/]`.
pub fn host_of(url: &str) -> Result<String, String> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        format!(
            "--server {url}: expected http://HOST:PORT (https is not spoken here; use a TLS proxy)"
        )
    })?;
    let host = rest.trim_end_matches('/');
    if host.is_empty() || host.contains('/') {
        return Err(format!("--server {url}: expected http://HOST:PORT"));
    }
    Ok(if host.contains(':') {
        host.to_string()
    } else {
        format!("{host}:80")
    })
}

/// An open response: its status, and the body still to read.
pub struct Response {
    pub status: u16,
    pub body: BufReader<TcpStream>,
}

impl Response {
    pub fn text(mut self) -> Result<String, String> {
        let mut s = String::new();
        self.body
            .read_to_string(&mut s)
            .map_err(|e| format!("reading the response: {e}"))?;
        Ok(s)
    }

    pub fn bytes(mut self) -> Result<Vec<u8>, String> {
        let mut v = Vec::new();
        self.body
            .read_to_end(&mut v)
            .map_err(|e| format!("reading the response: {e}"))?;
        Ok(v)
    }

    /// The JSON body; a non-2xx status is an error with the server's message.
    pub fn json(self) -> Result<serde_json::Value, String> {
        let status = self.status;
        let text = self.text()?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("the server answered {status} with no JSON ({e}): {text}"))?;
        if (200..300).contains(&status) {
            Ok(v)
        } else {
            let mut msg = format!(
                "the server answered {status}: {}",
                v["error"].as_str().unwrap_or(&text)
            );
            for e in v["errors"].as_array().into_iter().flatten() {
                msg.push_str(&format!(
                    "\n  {}:{}:{}: {}",
                    e["file"].as_str().unwrap_or("graph"),
                    e["line"],
                    e["col"],
                    e["message"].as_str().unwrap_or("")
                ));
            }
            Err(msg)
        }
    }
}

/// Sends one request to `host` and returns the response with its headers read.
pub fn request(
    host: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&[u8]>,
) -> Result<Response, String> {
    let mut s =
        TcpStream::connect(host).map_err(|e| format!("cannot reach the server at {host}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(3600)))
        .map_err(|e| e.to_string())?;
    let body = body.unwrap_or_default();
    let mut head = format!(
        "{method} {path} HTTP/1.0\r\nHost: {host}\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if !body.is_empty() {
        head.push_str("Content-Type: application/json\r\n");
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())
        .and_then(|_| s.write_all(body))
        .map_err(|e| format!("sending to {host}: {e}"))?;
    let mut r = BufReader::new(s);
    let mut status_line = String::new();
    r.read_line(&mut status_line)
        .map_err(|e| format!("reading from {host}: {e}"))?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("{host} did not answer in HTTP: {status_line:?}"))?;
    loop {
        let mut line = String::new();
        let n = r
            .read_line(&mut line)
            .map_err(|e| format!("reading from {host}: {e}"))?;
        if n == 0 || line == "\r\n" || line == "\n" {
            break;
        }
    }
    Ok(Response { status, body: r })
}

/// Calls `on_event` with each server-sent event's data (a JSON line) until the stream ends.
pub fn follow_events(
    resp: Response,
    mut on_event: impl FnMut(serde_json::Value),
) -> Result<(), String> {
    if resp.status != 200 {
        return resp.json().map(|_| ());
    }
    for line in resp.body.lines() {
        let line = line.map_err(|e| format!("reading the events: {e}"))?;
        if let Some(data) = line.strip_prefix("data: ") {
            if let Ok(v) = serde_json::from_str(data) {
                on_event(v);
            }
        }
    }
    Ok(())
}
