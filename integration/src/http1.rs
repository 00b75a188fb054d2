//! The benchmarks' HTTP/1.1 client: one keep-alive connection per load thread,
//! each request written whole in one `write`, socket options set once per
//! connection. ureq (used before) writes a request's head and body in two
//! `write`s, so each request was two TCP segments and woke the server twice,
//! and it set the socket's timeouts two or three times around every request;
//! on two cores shared with the servers, a load generator's CPU is taken from
//! them in proportion to the rate it drives, so it held back the faster
//! system most (integration/BENCHMARKS.md, twenty-sixth session).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

/// Read and write timeout of a connection.
const TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Default)]
pub struct Http1 {
    conn: Option<(String, BufReader<TcpStream>)>,
    out: Vec<u8>,
    line: String,
    body: Vec<u8>,
}

impl Http1 {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends one request to `endpoint` (`host:port`) and reads the whole
    /// answer; its status (the body is in [`Self::body`]). A connection that
    /// failed is dropped, and the next request opens a new one.
    pub fn request(
        &mut self,
        endpoint: &str,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> std::io::Result<u16> {
        let answer = self.exchange(endpoint, method, path, content_type, body);
        if answer.is_err() {
            self.conn = None;
        }
        answer
    }

    /// The body of the last answer.
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    fn exchange(
        &mut self,
        endpoint: &str,
        method: &str,
        path: &str,
        content_type: &str,
        body: &[u8],
    ) -> std::io::Result<u16> {
        let bad =
            |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
        if self.conn.as_ref().is_none_or(|(e, _)| e != endpoint) {
            let stream = TcpStream::connect(endpoint)?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(TIMEOUT))?;
            stream.set_write_timeout(Some(TIMEOUT))?;
            self.conn = Some((endpoint.to_string(), BufReader::new(stream)));
        }
        let Some((_, conn)) = self.conn.as_mut() else {
            return Err(bad("no connection"));
        };
        self.out.clear();
        write!(
            self.out,
            "{method} {path} HTTP/1.1\r\nHost: {endpoint}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )?;
        self.out.extend_from_slice(body);
        conn.get_mut().write_all(&self.out)?;
        let line = &mut self.line;
        let read_line = |conn: &mut BufReader<TcpStream>, line: &mut String| {
            line.clear();
            match conn.read_line(line)? {
                0 => Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof)),
                _ => Ok(()),
            }
        };
        read_line(conn, line)?;
        let status: u16 = line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("status line"))?;
        let (mut length, mut chunked, mut close) = (None, false, false);
        loop {
            read_line(conn, line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let Some((name, value)) = header.split_once(':') else {
                return Err(bad("header line"));
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse::<u64>().map_err(|_| bad("content-length"))?);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            } else if name.eq_ignore_ascii_case("connection") {
                close = value.eq_ignore_ascii_case("close");
            }
        }
        let out = &mut self.body;
        out.clear();
        let take = |conn: &mut BufReader<TcpStream>, out: &mut Vec<u8>, n: u64| {
            if conn.by_ref().take(n).read_to_end(out)? as u64 != n {
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            Ok(())
        };
        if chunked {
            loop {
                read_line(conn, line)?;
                let size = line.trim_end().split(';').next().unwrap_or("");
                let size = u64::from_str_radix(size.trim(), 16).map_err(|_| bad("chunk size"))?;
                if size == 0 {
                    // Trailers, up to the empty line.
                    loop {
                        read_line(conn, line)?;
                        if line.trim_end().is_empty() {
                            break;
                        }
                    }
                    break;
                }
                take(conn, out, size)?;
                read_line(conn, line)?;
            }
        } else if let Some(n) = length {
            take(conn, out, n)?;
        } else {
            // Neither: the body ends with the connection.
            conn.read_to_end(out)?;
            close = true;
        }
        if close {
            self.conn = None;
        }
        Ok(status)
    }
}
