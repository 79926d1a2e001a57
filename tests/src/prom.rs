//! Reading `/metrics` in tests: a plain HTTP/1.1 GET from inside a namespace (or from
//! here), and a parser of the Prometheus text format good enough to check values.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{bail, Context, Result};

/// One scrape: `name{labels}` -> value, labels sorted by key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scrape {
    pub samples: BTreeMap<(String, Vec<(String, String)>), f64>,
    /// Every `# TYPE` line's metric type, by name.
    pub types: BTreeMap<String, String>,
}

impl Scrape {
    /// Parses Prometheus text; a sample line that does not parse is an error.
    pub fn parse(text: &str) -> Result<Scrape> {
        let mut out = Scrape::default();
        for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').context("TYPE line without a type")?;
                out.types.insert(name.to_string(), kind.to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            let (series, value) =
                line.rsplit_once(' ').with_context(|| format!("bad line {line:?}"))?;
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().with_context(|| format!("bad value in {line:?}"))?,
            };
            let (name, labels) = match series.split_once('{') {
                None => (series.to_string(), vec![]),
                Some((name, rest)) => {
                    let body = rest
                        .strip_suffix('}')
                        .with_context(|| format!("bad labels in {line:?}"))?;
                    (name.to_string(), parse_labels(body).with_context(|| format!("in {line:?}"))?)
                }
            };
            out.samples.insert((name, labels), value);
        }
        Ok(out)
    }

    /// The value of `name` with exactly `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut l: Vec<(String, String)> =
            labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        l.sort();
        self.samples.get(&(name.to_string(), l)).copied()
    }

    /// Sum of every sample of `name` whose labels include all of `labels`.
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|((n, l), _)| {
                n == name && labels.iter().all(|(k, v)| l.iter().any(|(lk, lv)| lk == k && lv == v))
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// Whether any sample of `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.samples.keys().any(|(n, _)| n == name)
    }
}

fn parse_labels(body: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut rest = body;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").context("label without =\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, other)) => value.push(other),
                    None => bail!("dangling escape"),
                },
                '"' => {
                    end = Some(i);
                    break;
                }
                c => value.push(c),
            }
        }
        let end = end.context("unterminated label value")?;
        out.push((key.trim_start_matches(',').to_string(), value));
        rest = after[end + 1..].trim_start_matches(',');
    }
    out.sort();
    Ok(out)
}

/// `GET /metrics` from `addr`, from the current thread's namespace; the body of a 200.
pub fn get_metrics(addr: SocketAddr, timeout: Duration) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    s.read_to_string(&mut response).with_context(|| format!("reading from {addr}"))?;
    let (head, body) = response.split_once("\r\n\r\n").context("no end of headers")?;
    if !head.starts_with("HTTP/1.1 200 ") {
        bail!("{addr} answered {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_samples_labels_and_types() {
        let text = "# HELP a_total A.\n# TYPE a_total counter\na_total{x=\"1\",y=\"q\\\"uote\"} 3\nb 2.5\nc{le=\"+Inf\"} +Inf\n";
        let s = Scrape::parse(text).unwrap();
        assert_eq!(s.get("a_total", &[("y", "q\"uote"), ("x", "1")]), Some(3.0));
        assert_eq!(s.get("b", &[]), Some(2.5));
        assert_eq!(s.types["a_total"], "counter");
        assert_eq!(s.sum("a_total", &[("x", "1")]), 3.0);
        assert!(Scrape::parse("x{a=\"1} 2\n").is_err());
        assert!(Scrape::parse("x notanumber\n").is_err());
    }
}
