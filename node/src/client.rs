//! Client verbs of the `kiln` command line, over a node's HTTP API.

use std::time::Duration;

use anyhow::{anyhow, Context};
use clap::Args;
use serde_json::Value;

/// Where the node's HTTP API is and how to authenticate.
#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// HTTP address of any node.
    #[arg(
        long,
        env = "KILN_HTTP",
        default_value = "127.0.0.1:8700",
        value_name = "ADDR"
    )]
    pub http: String,
    /// Bearer token, when the node was started with one.
    #[arg(long, env = "KILN_HTTP_TOKEN", value_name = "T")]
    pub http_token: Option<String>,
}

pub struct Api {
    base: String,
    token: Option<String>,
    agent: ureq::Agent,
}

impl Api {
    pub fn new(args: &ApiArgs) -> Self {
        let base = if args.http.starts_with("http://") || args.http.starts_with("https://") {
            args.http.trim_end_matches('/').to_string()
        } else {
            format!("http://{}", args.http.trim_end_matches('/'))
        };
        Api {
            base,
            token: args.http_token.clone(),
            agent: ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(10))
                .build(),
        }
    }

    fn call(&self, method: &str, path: &str) -> anyhow::Result<Value> {
        let url = format!("{}{}", self.base, path);
        self.send(method, path, &[], None)?
            .into_json::<Value>()
            .with_context(|| format!("{url}: answer is not JSON"))
    }

    pub fn get(&self, path: &str) -> anyhow::Result<Value> {
        self.call("GET", path)
    }

    pub fn delete(&self, path: &str) -> anyhow::Result<Value> {
        self.call("DELETE", path)
    }

    pub fn post(&self, path: &str) -> anyhow::Result<Value> {
        self.call("POST", path)
    }
}

fn ago(now_ms: u64, then: &Value) -> String {
    match then.as_u64() {
        None => "never".into(),
        Some(t) => {
            let d = now_ms.saturating_sub(t);
            if d < 1000 {
                format!("{d}ms ago")
            } else {
                format!("{:.1}s ago", d as f64 / 1000.0)
            }
        }
    }
}

/// The member table as `kiln status` prints it.
pub fn format_members(members: &Value, now_ms: u64) -> String {
    let me = members["self"].as_str().unwrap_or("");
    let rows: Vec<[String; 6]> = members["members"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or(&[])
        .iter()
        .map(|m| {
            let id = m["id"].as_str().unwrap_or("?").to_string();
            let mark = if id == me { "*" } else { " " };
            [
                format!("{mark}{id}"),
                m["name"].as_str().unwrap_or("").to_string(),
                m["addrs"][0].as_str().unwrap_or("").to_string(),
                {
                    let state = m["state"].as_str().unwrap_or("?");
                    // Alive without a connection from here: reached through
                    // others (or still being connected to). A suspect one is
                    // just being lost.
                    let unlinked = m["connected"] == Value::Bool(false) && state == "alive";
                    if unlinked {
                        format!("{state} (no direct link)")
                    } else {
                        state.to_string()
                    }
                },
                m["incarnation"].to_string(),
                if id == me {
                    "-".into()
                } else {
                    ago(now_ms, &m["last_seen_ms"])
                },
            ]
        })
        .collect();
    let header = [" ID", "NAME", "ADDRESS", "STATE", "INC", "LAST SEEN"].map(String::from);
    format_table(&header, &rows)
}

/// Left-aligned columns, two spaces apart.
fn format_table<const N: usize>(header: &[String; N], rows: &[[String; N]]) -> String {
    let mut widths = header.clone().map(|h| h.len());
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    for r in std::iter::once(header).chain(rows.iter()) {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

/// The stripes of `GET /v1/cluster/stripes` as `kiln status` prints them.
pub fn format_stripes(view: &Value) -> String {
    let mut out = format!(
        "control plane: leader {}  voters {}  this node: {}\n",
        view["leader"].as_str().unwrap_or("(none known)"),
        view["voters"].as_array().map(|v| v.len()).unwrap_or(0),
        view["placement"].as_str().unwrap_or("?"),
    );
    for w in view["warnings"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or(&[])
    {
        out.push_str(&format!("warning: {}\n", w.as_str().unwrap_or("?")));
    }
    let mut rows: Vec<[String; 6]> = Vec::new();
    for st in view["stripes"]
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or(&[])
    {
        for m in st["members"]
            .as_array()
            .map(|a| a.as_slice())
            .unwrap_or(&[])
        {
            rows.push([
                st["id"].to_string(),
                st["epoch"].to_string(),
                st["slots"].to_string(),
                m["id"].as_str().unwrap_or("?").to_string(),
                m["role"].as_str().unwrap_or("?").to_string(),
                match m["lag"].as_u64() {
                    Some(l) => l.to_string(),
                    None => "-".into(),
                },
            ]);
        }
    }
    let header = ["STRIPE", "EPOCH", "SLOTS", "MEMBER", "ROLE", "LAG"].map(String::from);
    out.push_str(&format_table(&header, &rows));
    out
}

pub fn status(args: &ApiArgs) -> anyhow::Result<()> {
    let api = Api::new(args);
    let node = api.get("/v1/node")?;
    let members = api.get("/v1/cluster/members")?;
    let list = members["members"].as_array().cloned().unwrap_or_default();
    let alive = list.iter().filter(|m| m["state"] == "alive").count();
    println!(
        "node {} ({})  cluster {}  members {} ({} alive)",
        node["name"].as_str().unwrap_or("?"),
        node["id"].as_str().unwrap_or("?"),
        node["cluster"].as_str().unwrap_or("(joining)"),
        list.len(),
        alive
    );
    if let Some(errors) = node["storage_errors"].as_object() {
        for (part, e) in errors {
            println!(
                "STORAGE FAILING ({part}): {}",
                e.as_str().unwrap_or_default()
            );
        }
    }
    print!(
        "{}",
        format_members(&members, kiln_actors::membership::unix_ms())
    );
    println!();
    print!("{}", format_stripes(&api.get("/v1/cluster/stripes")?));
    let artifacts = api.get("/v1/artifacts")?;
    if artifacts["artifacts"]
        .as_array()
        .is_some_and(|a| !a.is_empty())
    {
        println!();
        print!("{}", format_artifacts(&artifacts));
    }
    Ok(())
}

pub fn forget(args: &ApiArgs, id: &str, force: bool) -> anyhow::Result<()> {
    let api = Api::new(args);
    let force = if force { "?force=true" } else { "" };
    api.delete(&format!(
        "/v1/cluster/members/{}{force}",
        encode_segment(id)
    ))?;
    println!("forgot {id}");
    Ok(())
}

/// A name (`what`: map, key, artifact) as one URL path segment. `.` and `..`
/// cannot be sent: URL parsers resolve them away (`%2E` as well), and the
/// request would go to another path.
pub fn name_segment(what: &str, s: &str) -> anyhow::Result<String> {
    if s.is_empty() || s == "." || s == ".." {
        return Err(anyhow!(
            "{what} {s:?} cannot be addressed over HTTP: it cannot be empty, '.' or '..'"
        ));
    }
    Ok(encode_segment(s))
}

/// Percent-encodes one URL path segment (everything but unreserved characters).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `kiln kv ...`: the key/value API from the command line.
#[derive(Debug, clap::Subcommand)]
pub enum KvCommand {
    /// Print a key's value (linearizable unless --stale).
    Get {
        map: String,
        key: String,
        /// Any member of the stripe may answer, possibly behind the active.
        #[arg(long)]
        stale: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Write a key: the value from the argument, --file, or standard input.
    Put {
        map: String,
        key: String,
        value: Option<String>,
        #[arg(long, conflicts_with = "value")]
        file: Option<std::path::PathBuf>,
        /// Compare-and-set: only if the key's version is N.
        #[arg(long, value_name = "N")]
        if_version: Option<u64>,
        /// Create-only: only if the key does not exist.
        #[arg(long, conflicts_with = "if_version")]
        if_absent: bool,
        /// A retry with the same key is answered once, not applied twice.
        #[arg(long, value_name = "K")]
        idempotency_key: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Delete a key.
    Del {
        map: String,
        key: String,
        /// Delete only if the key's version is N.
        #[arg(long, value_name = "N")]
        if_version: Option<u64>,
        /// A retry with the same key is answered once, not applied twice.
        #[arg(long, value_name = "K")]
        idempotency_key: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List the keys of a map, across all stripes.
    Ls {
        map: String,
        #[arg(long, default_value = "")]
        prefix: String,
        /// Keys to print at most.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
        limit: u64,
        /// Start after this key (what an earlier listing stopped at).
        #[arg(long, value_name = "KEY")]
        after: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// A node's answer with an error status.
#[derive(Debug, thiserror::Error)]
#[error("{method} {url}: {code}: {msg}")]
struct StatusError {
    method: String,
    url: String,
    code: u16,
    msg: String,
}

/// Whether sending the same request again cannot help: the node refused the
/// request itself (bad input, not authorised), not its own state.
fn refused_for_good(e: &anyhow::Error) -> bool {
    e.downcast_ref::<StatusError>()
        .is_some_and(|s| (400..500).contains(&s.code) && s.code != 408 && s.code != 429)
}

impl Api {
    fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, String)],
        body: Option<&[u8]>,
    ) -> anyhow::Result<ureq::Response> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.agent.request(method, &url);
        if let Some(t) = &self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        for (k, v) in headers {
            req = req.set(k, v);
        }
        let res = match body {
            Some(b) => req.send_bytes(b),
            None => req.call(),
        };
        match res {
            Ok(resp) => Ok(resp),
            Err(ureq::Error::Status(code, resp)) => {
                let body: Value = resp.into_json().unwrap_or(Value::Null);
                let mut msg = body["error"].as_str().unwrap_or("no detail").to_string();
                // A failed condition: the version the key has now.
                if let Some(v) = body["version"].as_u64() {
                    msg.push_str(&format!(" (the key is at version {v})"));
                }
                Err(StatusError {
                    method: method.to_string(),
                    url,
                    code,
                    msg,
                }
                .into())
            }
            Err(e) => Err(anyhow!(
                "cannot reach kiln at {}: {e}; is the node running and is --http right?",
                self.base
            )),
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum BroadcastCommand {
    /// Publish one event with this node as its origin: a row change (--action),
    /// a flush of a datasource (--flush), or an application message (--topic).
    Publish {
        #[arg(long, required_unless_present = "topic")]
        server: Option<String>,
        #[arg(long, required_unless_present = "topic")]
        table: Option<String>,
        /// insert, update or delete.
        #[arg(long, conflicts_with_all = ["flush", "topic"], required_unless_present_any = ["flush", "topic"])]
        action: Option<String>,
        /// Primary key of a changed row (repeatable); a composite key as a,b.
        /// An integer without leading zeros is sent as a JSON number, anything
        /// else as a string.
        #[arg(long = "pk", value_name = "PK")]
        pks: Vec<String>,
        /// The whole datasource is stale.
        #[arg(long, conflicts_with = "topic")]
        flush: bool,
        /// Topic of an application message.
        #[arg(long, conflicts_with_all = ["server", "table"])]
        topic: Option<String>,
        /// Payload of the message, JSON (a plain word is taken as a string).
        #[arg(long, requires = "topic", default_value = "null")]
        payload: String,
        /// A retry with the same key to the same node gets the first answer
        /// (the same seqs) instead of publishing again.
        #[arg(long, value_name = "K")]
        idempotency_key: Option<String>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Follow the event stream, one JSON event per line; reconnects and resumes
    /// where it stopped if the node goes away.
    Tail {
        #[arg(long)]
        server: Option<String>,
        #[arg(long)]
        table: Option<String>,
        #[arg(long)]
        topic: Option<String>,
        /// Resume after this event id (what `--ids` printed before an earlier
        /// line), not at the live end.
        #[arg(long, value_name = "ID")]
        from: Option<String>,
        /// Print each event's id before it, separated by a tab, to resume from
        /// with `--from`.
        #[arg(long)]
        ids: bool,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// A primary-key value from the command line: a number if it is one, else text.
/// Only an integer written as its number prints it (`42`, `-7`): `007`, `+1`
/// and integers beyond 64 bits stay text, so no key changes on the way.
fn pk_value(s: &str) -> Value {
    s.parse::<i64>()
        .ok()
        .filter(|n| n.to_string() == s)
        .map_or_else(|| Value::String(s.to_string()), Value::from)
}

pub fn broadcast(cmd: BroadcastCommand) -> anyhow::Result<()> {
    match cmd {
        BroadcastCommand::Publish {
            server,
            table,
            action,
            pks,
            flush,
            topic,
            payload,
            idempotency_key,
            api,
        } => {
            let event = if let Some(topic) = topic {
                let payload = match serde_json::from_str::<Value>(&payload) {
                    Ok(v) => v,
                    // Meant as JSON but not: refused rather than sent as text.
                    Err(e) if payload.trim_start().starts_with(['{', '[', '"']) => {
                        return Err(anyhow!("--payload is not valid JSON: {e}"))
                    }
                    Err(_) => Value::String(payload.clone()),
                };
                serde_json::json!({"kind": "message", "topic": topic, "payload": payload})
            } else if flush {
                serde_json::json!({"kind": "flush", "server": server, "table": table})
            } else {
                let pks: Vec<Vec<Value>> = pks
                    .iter()
                    .map(|pk| pk.split(',').map(pk_value).collect())
                    .collect();
                if pks.is_empty() {
                    return Err(anyhow!("a change needs at least one --pk"));
                }
                serde_json::json!({"kind": "change", "server": server, "table": table,
                    "action": action, "pks": pks})
            };
            let api = Api::new(&api);
            let body = serde_json::to_vec(&event)?;
            let mut headers = vec![("Content-Type", "application/json".to_string())];
            if let Some(k) = idempotency_key {
                headers.push(("Idempotency-Key", k));
            }
            let resp: Value = api
                .send("POST", "/v1/broadcast", &headers, Some(&body))?
                .into_json()?;
            println!("{resp}");
            Ok(())
        }
        BroadcastCommand::Tail {
            server,
            table,
            topic,
            from,
            ids,
            api,
        } => tail(&api, server, table, topic, from, ids),
    }
}

fn tail(
    args: &ApiArgs,
    server: Option<String>,
    table: Option<String>,
    topic: Option<String>,
    mut last_id: Option<String>,
    print_ids: bool,
) -> anyhow::Result<()> {
    use std::io::{BufRead, Write};
    let mut query = Vec::new();
    for (k, v) in [("server", server), ("table", table), ("topic", topic)] {
        if let Some(v) = v {
            query.push(format!("{k}={}", encode_segment(&v)));
        }
    }
    let path = format!("/v1/broadcast/stream?{}", query.join("&"));
    // No read timeout: a quiet stream is not a dead one (the node sends keepalives).
    let api = Api {
        agent: ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(10))
            .build(),
        ..Api::new(args)
    };
    let mut failures = 0u32;
    loop {
        let headers: Vec<(&str, String)> = last_id
            .iter()
            .map(|id| ("Last-Event-ID", id.clone()))
            .collect();
        match api.send("GET", &path, &headers, None) {
            Ok(resp) => {
                failures = 0;
                let reader = std::io::BufReader::new(resp.into_reader());
                let (mut id, mut data) = (None, None);
                for line in reader.lines() {
                    let Ok(line) = line else { break };
                    if let Some(v) = line.strip_prefix("id: ") {
                        id = Some(v.to_string());
                    } else if let Some(d) = line.strip_prefix("data: ") {
                        data = Some(d.to_string());
                    } else if line.is_empty() {
                        // A message is whole at its blank line: printed and
                        // counted as seen together, so a connection broken in
                        // between neither repeats nor loses it.
                        if let Some(i) = id.take() {
                            last_id = Some(i);
                        }
                        let Some(d) = data.take() else { continue };
                        let mut out = std::io::stdout().lock();
                        let written = match (&last_id, print_ids) {
                            (Some(i), true) => writeln!(out, "{i}\t{d}"),
                            _ => writeln!(out, "{d}"),
                        };
                        if written.is_err() {
                            return Ok(());
                        }
                        let _ = out.flush();
                        if d.contains("\"kind\":\"lagged\"") {
                            eprintln!("kiln: fell behind the node's buffer; resuming");
                        }
                    }
                }
                eprintln!("kiln: stream ended; reconnecting");
            }
            Err(e) if refused_for_good(&e) => return Err(e),
            Err(e) => {
                failures += 1;
                if failures >= 30 {
                    return Err(e.context("giving up after 30 attempts"));
                }
                eprintln!("kiln: {e:#}; retrying");
            }
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum ArtifactCommand {
    /// Upload a file as a new version of an artifact; every node fetches it.
    Put {
        name: String,
        file: std::path::PathBuf,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Download a version (the newest by default) from the node's own copy.
    Get {
        name: String,
        #[arg(long)]
        version: Option<u64>,
        /// Write here instead of standard output.
        #[arg(long, short)]
        output: Option<std::path::PathBuf>,
        #[command(flatten)]
        api: ApiArgs,
    },
    /// List artifacts, their live versions and which nodes hold each.
    Ls(ApiArgs),
    /// Retire a version on every node.
    Rm {
        name: String,
        #[arg(long)]
        version: u64,
        #[command(flatten)]
        api: ApiArgs,
    },
}

/// Prints the artifact table of `GET /v1/artifacts`.
pub fn format_artifacts(view: &Value) -> String {
    let mut rows = Vec::new();
    for a in view["artifacts"].as_array().cloned().unwrap_or_default() {
        for v in a["versions"].as_array().cloned().unwrap_or_default() {
            let holders = v["holders"].as_array().map(|h| h.len()).unwrap_or(0);
            let size = v["size"].as_u64().unwrap_or(0);
            let here = match v["here"].as_str().unwrap_or("") {
                "fetching" => format!(
                    "fetching {}%",
                    v["fetched_bytes"].as_u64().unwrap_or(0) * 100 / size.max(1)
                ),
                other => other.to_string(),
            };
            rows.push([
                a["name"].as_str().unwrap_or("").to_string(),
                v["version"].to_string(),
                size.to_string(),
                v["sha256"]
                    .as_str()
                    .unwrap_or("")
                    .chars()
                    .take(16)
                    .collect(),
                holders.to_string(),
                here,
            ]);
        }
    }
    if rows.is_empty() {
        return "no artifacts\n".into();
    }
    format_table(
        &[
            "NAME".into(),
            "VERSION".into(),
            "SIZE".into(),
            "SHA256".into(),
            "HOLDERS".into(),
            "HERE".into(),
        ],
        &rows,
    )
}

/// Tries of an artifact upload answered 503 (the control plane busy electing).
const UPLOAD_TRIES: u32 = 3;

pub fn artifact(cmd: ArtifactCommand) -> anyhow::Result<()> {
    use sha2::Digest;
    use std::io::Read;
    match cmd {
        ArtifactCommand::Put { name, file, api } => {
            let open = || {
                std::fs::File::open(&file)
                    .with_context(|| format!("cannot open {}", file.display()))
            };
            let mut f = open()?;
            let size = f.metadata()?.len();
            let max = crate::artifact_api::MAX_ARTIFACT_BYTES;
            if size > max {
                return Err(anyhow!(
                    "{} is {size} bytes; an artifact is at most {max} bytes",
                    file.display()
                ));
            }
            let mut h = sha2::Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = f.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            use base64::Engine;
            let digest = base64::engine::general_purpose::STANDARD.encode(h.finalize());
            let api = Api::new(&api);
            let url = format!(
                "{}/v1/artifacts/{}",
                api.base,
                name_segment("artifact name", &name)?
            );
            // No overall timeout: a large upload takes as long as it takes.
            let agent = ureq::AgentBuilder::new()
                .timeout_connect(Duration::from_secs(10))
                .build();
            // The same key on every try: a retry after a 503 gets the version
            // an earlier try may have been given, not a second one.
            let key = format!("{:032x}", rand::random::<u128>());
            let mut tries = 0;
            loop {
                tries += 1;
                let mut req = agent
                    .put(&url)
                    .set("Content-Digest", &format!("sha-256=:{digest}:"))
                    .set("Content-Length", &size.to_string())
                    .set("Idempotency-Key", &key);
                if let Some(t) = &api.token {
                    req = req.set("Authorization", &format!("Bearer {t}"));
                }
                eprintln!("uploading {} ({size} bytes) as {name}", file.display());
                match req.send(open()?) {
                    Ok(resp) => {
                        let v: Value = resp.into_json()?;
                        println!("{v}");
                        return Ok(());
                    }
                    Err(ureq::Error::Status(code, resp)) => {
                        let body: Value = resp.into_json().unwrap_or(Value::Null);
                        let detail = body["error"].as_str().unwrap_or("no detail");
                        if code == 503 && tries < UPLOAD_TRIES {
                            eprintln!("PUT {url}: {code}: {detail}; trying again");
                            std::thread::sleep(Duration::from_secs(2));
                            continue;
                        }
                        return Err(anyhow!("PUT {url}: {code}: {detail}"));
                    }
                    Err(e) => return Err(anyhow!("cannot reach kiln at {}: {e}", api.base)),
                }
            }
        }
        ArtifactCommand::Get {
            name,
            version,
            output,
            api,
        } => {
            let api = Api {
                agent: ureq::AgentBuilder::new()
                    .timeout_connect(Duration::from_secs(10))
                    .build(),
                ..Api::new(&api)
            };
            let q = version.map(|v| format!("?version={v}")).unwrap_or_default();
            let resp = api.send(
                "GET",
                &format!("/v1/artifacts/{}{q}", name_segment("artifact name", &name)?),
                &[],
                None,
            )?;
            let etag = resp.header("ETag").map(|t| t.trim_matches('"').to_string());
            let mut reader = resp.into_reader();
            match output {
                Some(path) => {
                    // Written beside the target and moved there once complete
                    // and checked: a broken download leaves no partial file
                    // under the name asked for.
                    let mut partial = path.clone().into_os_string();
                    partial.push(".kiln-partial");
                    let partial = std::path::PathBuf::from(partial);
                    let mut f = std::fs::File::create(&partial)
                        .with_context(|| format!("cannot create {}", partial.display()))?;
                    let mut h = sha2::Sha256::new();
                    let mut buf = vec![0u8; 1 << 20];
                    let copied = (|| -> anyhow::Result<()> {
                        loop {
                            let n = reader.read(&mut buf).context("download broke off")?;
                            if n == 0 {
                                break;
                            }
                            h.update(&buf[..n]);
                            std::io::Write::write_all(&mut f, &buf[..n])
                                .with_context(|| format!("cannot write {}", partial.display()))?;
                        }
                        f.sync_all()
                            .with_context(|| format!("cannot write {}", partial.display()))?;
                        let got = hex::encode(h.finalize());
                        match &etag {
                            Some(want) if *want != got => Err(anyhow!(
                                "the download's SHA-256 is {got}, the node said {want}"
                            )),
                            _ => Ok(()),
                        }
                    })();
                    if let Err(e) = copied {
                        let _ = std::fs::remove_file(&partial);
                        return Err(e.context(format!("{} was not written", path.display())));
                    }
                    std::fs::rename(&partial, &path).with_context(|| {
                        format!("cannot move the download to {}", path.display())
                    })?;
                }
                None => {
                    std::io::copy(&mut reader, &mut std::io::stdout().lock())?;
                }
            }
            Ok(())
        }
        ArtifactCommand::Ls(api) => {
            let view = Api::new(&api).get("/v1/artifacts")?;
            print!("{}", format_artifacts(&view));
            Ok(())
        }
        ArtifactCommand::Rm { name, version, api } => {
            let v = Api::new(&api).delete(&format!(
                "/v1/artifacts/{}?version={version}",
                name_segment("artifact name", &name)?
            ))?;
            println!("{v}");
            Ok(())
        }
    }
}

pub fn kv(cmd: KvCommand) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let path = |map: &str, key: &str| -> anyhow::Result<String> {
        Ok(format!(
            "/v1/kv/{}/{}",
            name_segment("map", map)?,
            name_segment("key", key)?
        ))
    };
    match cmd {
        KvCommand::Get {
            map,
            key,
            stale,
            api,
        } => {
            let api = Api::new(&api);
            let q = if stale { "?stale=true" } else { "" };
            let resp = api.send("GET", &format!("{}{q}", path(&map, &key)?), &[], None)?;
            let mut value = Vec::new();
            resp.into_reader()
                .read_to_end(&mut value)
                .context("cannot read the value")?;
            std::io::stdout().write_all(&value)?;
        }
        KvCommand::Put {
            map,
            key,
            value,
            file,
            if_version,
            if_absent,
            idempotency_key,
            api,
        } => {
            let api = Api::new(&api);
            let body = match (value, file) {
                (Some(v), _) => v.into_bytes(),
                (None, Some(f)) => {
                    std::fs::read(&f).with_context(|| format!("cannot read {}", f.display()))?
                }
                (None, None) => {
                    let mut b = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut b)
                        .context("cannot read the value from standard input")?;
                    b
                }
            };
            let mut headers = Vec::new();
            if let Some(v) = if_version {
                headers.push(("If-Match", format!("\"{v}\"")));
            }
            if if_absent {
                headers.push(("If-None-Match", "*".to_string()));
            }
            if let Some(k) = idempotency_key {
                headers.push(("Idempotency-Key", k));
            }
            let resp = api.send("PUT", &path(&map, &key)?, &headers, Some(&body))?;
            let v: Value = resp.into_json().context("answer is not JSON")?;
            println!("version {}", v["version"]);
        }
        KvCommand::Del {
            map,
            key,
            if_version,
            idempotency_key,
            api,
        } => {
            let api = Api::new(&api);
            let mut headers: Vec<(&str, String)> = if_version
                .map(|v| vec![("If-Match", format!("\"{v}\""))])
                .unwrap_or_default();
            if let Some(k) = idempotency_key {
                headers.push(("Idempotency-Key", k));
            }
            let resp = api.send("DELETE", &path(&map, &key)?, &headers, None)?;
            let v: Value = resp.into_json().context("answer is not JSON")?;
            println!("deleted at version {}", v["version"]);
        }
        KvCommand::Ls {
            map,
            prefix,
            limit,
            after,
            api,
        } => {
            let api = Api::new(&api);
            let mut after = after;
            let mut printed = 0;
            loop {
                let mut q = format!(
                    "/v1/kv/{}?prefix={}&limit={}",
                    name_segment("map", &map)?,
                    encode_segment(&prefix),
                    limit.saturating_sub(printed).clamp(1, 10_000)
                );
                if let Some(a) = &after {
                    q.push_str(&format!("&after={}", encode_segment(a)));
                }
                let v = api.get(&q)?;
                for k in v["keys"].as_array().map(|a| a.as_slice()).unwrap_or(&[]) {
                    println!("{}", k.as_str().unwrap_or("?"));
                    printed += 1;
                }
                match v["next"].as_str() {
                    Some(n) if printed < limit => after = Some(n.to_string()),
                    Some(n) => {
                        eprintln!(
                            "kiln: stopped at --limit {limit}; more keys follow: \
                             --after {n:?} goes on from here"
                        );
                        break;
                    }
                    None => break,
                }
            }
        }
    }
    Ok(())
}

/// `kiln stripe handover`: move a stripe's active role to an in-sync standby.
pub fn handover(api: &ApiArgs, stripe: u32, to: Option<&str>) -> anyhow::Result<()> {
    let api = Api::new(api);
    let mut path = format!("/v1/cluster/stripes/{stripe}/handover");
    if let Some(t) = to {
        path.push_str(&format!("?to={}", encode_segment(t)));
    }
    let v = api.post(&path)?;
    match v["active"].as_str() {
        Some(a) => println!("stripe {stripe}: active is now {a}"),
        None => println!("stripe {stripe}: nothing to hand over"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primary_keys_keep_their_spelling() {
        assert_eq!(pk_value("42"), serde_json::json!(42));
        assert_eq!(pk_value("-7"), serde_json::json!(-7));
        for text in ["007", "+1", "-0", "12345678901234567890", "a1", ""] {
            assert_eq!(pk_value(text), serde_json::json!(text), "{text}");
        }
    }

    #[test]
    fn only_a_refusal_of_the_request_itself_is_final() {
        let status = |code| {
            anyhow::Error::from(StatusError {
                method: "GET".into(),
                url: "u".into(),
                code,
                msg: "m".into(),
            })
        };
        assert!(refused_for_good(&status(400)));
        assert!(refused_for_good(&status(401)));
        assert!(!refused_for_good(&status(429)));
        assert!(!refused_for_good(&status(503)));
        assert!(!refused_for_good(&anyhow::anyhow!("cannot reach kiln")));
    }

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(encode_segment("orders/42 x"), "orders%2F42%20x");
        assert_eq!(encode_segment("a-b_c.d~"), "a-b_c.d~");
        assert_eq!(encode_segment("é"), "%C3%A9");
        assert_eq!(name_segment("key", "a.b").unwrap(), "a.b");
        for bad in ["", ".", ".."] {
            assert!(name_segment("key", bad).is_err());
        }
    }

    #[test]
    fn a_live_member_without_a_direct_link_is_marked() {
        let members = serde_json::json!({
            "self": "a",
            "members": [
                {"id": "a", "name": "n1", "addrs": [], "state": "alive", "incarnation": 1, "connected": true},
                {"id": "b", "name": "n2", "addrs": [], "state": "alive", "incarnation": 1, "connected": false},
                {"id": "c", "name": "n3", "addrs": [], "state": "dead", "incarnation": 1, "connected": false},
                {"id": "d", "name": "n4", "addrs": [], "state": "alive", "incarnation": 1},
            ]
        });
        let table = format_members(&members, 0);
        let row = |id: &str| {
            table
                .lines()
                .find(|l| l.trim_start_matches(['*', ' ']).starts_with(id))
                .unwrap_or_default()
                .to_string()
        };
        assert!(row("b").contains("alive (no direct link)"), "{table}");
        assert!(!row("a").contains("no direct link"), "{table}");
        assert!(
            !row("c").contains("no direct link"),
            "a dead member is just dead"
        );
        assert!(
            !row("d").contains("no direct link"),
            "an older node says nothing"
        );
    }
}
