//! Configuration of `kiln run`. Every setting has one name in three spellings: TOML
//! key `snake_case` in `--config FILE`, flag `--kebab-case`, environment
//! `KILN_UPPER_SNAKE` (lists comma-separated). Precedence: flag > environment >
//! file > default. This file is the reference: each field says what it does and
//! its default; the README's table is checked against it by a test.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use clap::Args;
use kiln_actors::control::{state::MAX_STRIPES, ControlPlaneConfig};
use kiln_actors::membership::MembershipConfig;
use kiln_net::addr::{parse_peer_addr, parse_seed_addr, PeerAddr};
use kiln_net::Multiaddr;
use serde::Deserialize;

/// Flags (and their environment variables) of `kiln run`. All optional here, so
/// that the config file can fill what neither flag nor environment gave.
#[derive(Debug, Clone, Default, Args)]
pub struct RunArgs {
    /// TOML file with any of the settings below (keys in snake_case).
    #[arg(long, env = "KILN_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Directory of this node's database. Default: ./kiln-data
    #[arg(long, env = "KILN_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address(es) to listen on for peers: host:port or /ip4/A/tcp/P. Default: 0.0.0.0:7700
    #[arg(long, env = "KILN_LISTEN", value_name = "ADDR", value_delimiter = ',')]
    pub listen: Vec<String>,
    /// Address(es) other nodes should dial, for 0.0.0.0 listeners or NAT. Default: the listen addresses
    #[arg(
        long,
        env = "KILN_ADVERTISE",
        value_name = "ADDR",
        value_delimiter = ','
    )]
    pub advertise: Vec<String>,
    /// Address of the HTTP API. Default: 127.0.0.1:8700
    #[arg(long, env = "KILN_HTTP", value_name = "ADDR")]
    pub http: Option<String>,
    /// When set, every API call but /metrics needs `Authorization: Bearer T`.
    #[arg(long, env = "KILN_HTTP_TOKEN", value_name = "T")]
    pub http_token: Option<String>,
    /// Peer(s) to join through: host:port or multiaddr, with or without /p2p/<id>.
    #[arg(long, env = "KILN_SEED", value_name = "ADDR", value_delimiter = ',')]
    pub seed: Vec<String>,
    /// Shared secret of the cluster; nodes with another secret cannot connect.
    #[arg(long, env = "KILN_CLUSTER_SECRET", value_name = "S")]
    pub cluster_secret: Option<String>,
    /// File holding the cluster secret (trailing newline ignored).
    #[arg(long, env = "KILN_CLUSTER_SECRET_FILE", value_name = "F")]
    pub cluster_secret_file: Option<PathBuf>,
    /// Human-readable node name. Default: kiln-<end of peer id>
    #[arg(long, env = "KILN_NAME", value_name = "NAME")]
    pub name: Option<String>,
    /// Milliseconds between a node's membership announcements. Default: 3000
    #[arg(long, env = "KILN_ANNOUNCE_INTERVAL_MS", value_name = "MS")]
    pub announce_interval_ms: Option<u64>,
    /// Milliseconds between pings on every peer connection. Default: 2000
    #[arg(long, env = "KILN_PROBE_INTERVAL_MS", value_name = "MS")]
    pub probe_interval_ms: Option<u64>,
    /// Silence after which a member is suspect. Default: 3000
    #[arg(long, env = "KILN_SUSPECT_TIMEOUT_MS", value_name = "MS")]
    pub suspect_timeout_ms: Option<u64>,
    /// Silence after which a member is dead even if its connection looks open. Default: 6000
    #[arg(long, env = "KILN_DEAD_TIMEOUT_MS", value_name = "MS")]
    pub dead_timeout_ms: Option<u64>,
    /// Seconds after which dead and left members are forgotten. Default: 86400
    #[arg(long, env = "KILN_DEAD_MEMBER_TTL_S", value_name = "S")]
    pub dead_member_ttl_s: Option<u64>,
    /// Stripes of a cluster this node creates (fixed for the cluster's life; a joining node warns that it ignores a different count). Default: 1
    #[arg(long, env = "KILN_STRIPES", value_name = "N")]
    pub stripes: Option<u32>,
    /// Stripe this node asks to join. Default: the stripe with the fewest members
    #[arg(long, env = "KILN_STRIPE", value_name = "K")]
    pub stripe: Option<u32>,
    /// Run as a witness: a control-plane voter that holds no stripe data. Default: false
    #[arg(long, env = "KILN_WITNESS", value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub witness: Option<bool>,
    /// Seconds a control-plane voter may be dead before a live node replaces it. Default: 30
    #[arg(long, env = "KILN_VOTER_REPLACE_AFTER_S", value_name = "S")]
    pub voter_replace_after_s: Option<u64>,
    /// Silence of a stripe's active after which its standbys ask for an election. Default: 500
    #[arg(long, env = "KILN_ELECTION_TIMEOUT_MS", value_name = "MS")]
    pub election_timeout_ms: Option<u64>,
    /// "permanent" (fsync stripe data before acknowledging) or "temporary". Default: permanent
    #[arg(long, env = "KILN_PERSISTENCE", value_name = "MODE")]
    pub persistence: Option<String>,
    /// How long a key/value request waits for a stripe's active before answering 503. Default: 5000
    #[arg(long, env = "KILN_REQUEST_TIMEOUT_MS", value_name = "MS")]
    pub request_timeout_ms: Option<u64>,
    /// Largest value a PUT accepts. Default: 1048576
    #[arg(long, env = "KILN_MAX_VALUE_BYTES", value_name = "BYTES")]
    pub max_value_bytes: Option<usize>,
    /// Seconds a write's result is remembered for retries (Idempotency-Key), across failover. Default: 120
    #[arg(long, env = "KILN_RECONNECT_WINDOW_S", value_name = "S")]
    pub reconnect_window_s: Option<u64>,
    /// Events the broadcast log keeps at most (all origins). Default: 1000000
    #[arg(long, env = "KILN_BROADCAST_RETENTION_EVENTS", value_name = "N")]
    pub broadcast_retention_events: Option<u64>,
    /// Bytes of events the broadcast log keeps at most. Default: 1073741824
    #[arg(long, env = "KILN_BROADCAST_RETENTION_BYTES", value_name = "BYTES")]
    pub broadcast_retention_bytes: Option<u64>,
    /// Seconds the broadcast log keeps an event at most. Default: 86400
    #[arg(long, env = "KILN_BROADCAST_RETENTION_S", value_name = "S")]
    pub broadcast_retention_s: Option<u64>,
    /// Largest event POST /v1/broadcast accepts, as JSON. Default: 65536
    #[arg(long, env = "KILN_MAX_EVENT_BYTES", value_name = "BYTES")]
    pub max_event_bytes: Option<usize>,
    /// Bytes of live events a slow event-stream subscriber may fall behind before it is sent `lagged` and closed (it resumes with Last-Event-ID). Default: 67108864
    #[arg(long, env = "KILN_SUBSCRIBER_BUFFER_BYTES", value_name = "BYTES")]
    pub subscriber_buffer_bytes: Option<u64>,
    /// Stripe log entries kept for members that fall behind; further behind, they get a snapshot. Default: 20000
    #[arg(long, env = "KILN_LOG_RETAIN_ENTRIES", value_name = "N")]
    pub log_retain_entries: Option<u64>,
    /// Versions of each artifact kept; older ones are retired everywhere. Default: 3
    #[arg(long, env = "KILN_ARTIFACT_KEEP_VERSIONS", value_name = "N")]
    pub artifact_keep_versions: Option<u32>,
}

/// The same settings as read from the TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub listen: Option<Vec<String>>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub advertise: Option<Vec<String>>,
    pub http: Option<String>,
    pub http_token: Option<String>,
    #[serde(default, deserialize_with = "one_or_many")]
    pub seed: Option<Vec<String>>,
    pub cluster_secret: Option<String>,
    pub cluster_secret_file: Option<PathBuf>,
    pub name: Option<String>,
    pub announce_interval_ms: Option<u64>,
    pub probe_interval_ms: Option<u64>,
    pub suspect_timeout_ms: Option<u64>,
    pub dead_timeout_ms: Option<u64>,
    pub dead_member_ttl_s: Option<u64>,
    pub stripes: Option<u32>,
    pub stripe: Option<u32>,
    pub witness: Option<bool>,
    pub voter_replace_after_s: Option<u64>,
    pub election_timeout_ms: Option<u64>,
    pub persistence: Option<String>,
    pub request_timeout_ms: Option<u64>,
    pub max_value_bytes: Option<usize>,
    pub reconnect_window_s: Option<u64>,
    pub broadcast_retention_events: Option<u64>,
    pub broadcast_retention_bytes: Option<u64>,
    pub broadcast_retention_s: Option<u64>,
    pub max_event_bytes: Option<usize>,
    pub subscriber_buffer_bytes: Option<u64>,
    pub artifact_keep_versions: Option<u32>,
    pub log_retain_entries: Option<u64>,
}

/// Every setting key, in its TOML spelling (for the README check).
#[cfg(test)]
pub const KEYS: &[&str] = &[
    "config",
    "data_dir",
    "listen",
    "advertise",
    "http",
    "http_token",
    "seed",
    "cluster_secret",
    "cluster_secret_file",
    "name",
    "announce_interval_ms",
    "probe_interval_ms",
    "suspect_timeout_ms",
    "dead_timeout_ms",
    "dead_member_ttl_s",
    "stripes",
    "stripe",
    "witness",
    "voter_replace_after_s",
    "election_timeout_ms",
    "persistence",
    "request_timeout_ms",
    "max_value_bytes",
    "reconnect_window_s",
    "broadcast_retention_events",
    "broadcast_retention_bytes",
    "broadcast_retention_s",
    "max_event_bytes",
    "subscriber_buffer_bytes",
    "artifact_keep_versions",
    "log_retain_entries",
];

/// Resolved, validated settings of a node.
#[derive(Debug, Clone)]
pub struct Settings {
    pub data_dir: PathBuf,
    pub listen: Vec<Multiaddr>,
    pub advertise: Vec<Multiaddr>,
    pub http: SocketAddr,
    pub http_token: Option<String>,
    pub seeds: Vec<PeerAddr>,
    pub cluster_secret: Option<Vec<u8>>,
    pub name: Option<String>,
    pub probe_interval_ms: u64,
    pub membership: MembershipConfig,
    pub control: ControlPlaneConfig,
    pub election_timeout_ms: u64,
    /// `persistence = "permanent"`: stripe writes are fsynced before acknowledged.
    pub permanent: bool,
    pub request_timeout_ms: u64,
    pub max_value_bytes: usize,
    pub reconnect_window_s: u64,
    pub broadcast_retention: kiln_persistence::Retention,
    pub max_event_bytes: usize,
    pub subscriber_buffer_bytes: u64,
    pub artifact_keep_versions: u32,
    pub log_retain_entries: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {error}")]
    Read { path: PathBuf, error: String },
    #[error("config file {path}: {error}")]
    Parse { path: PathBuf, error: String },
    #[error("setting {key}: {error}")]
    Invalid { key: &'static str, error: String },
}

fn non_empty(v: Vec<String>) -> Vec<String> {
    v.into_iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

fn pick_list(cli: Vec<String>, file: Option<Vec<String>>) -> Vec<String> {
    let cli = non_empty(cli);
    if !cli.is_empty() {
        cli
    } else {
        non_empty(file.unwrap_or_default())
    }
}

fn load_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
        path: path.to_path_buf(),
        error: e.to_string(),
    })?;
    toml::from_str(&text).map_err(|e| {
        // Where it is, with the line itself: the message alone names no key.
        let at = e.span().map(|span| {
            let line = text[..span.start.min(text.len())].matches('\n').count();
            (
                line + 1,
                text.lines().nth(line).unwrap_or("").trim().to_string(),
            )
        });
        ConfigError::Parse {
            path: path.to_path_buf(),
            error: match at {
                Some((n, line)) => format!("line {n} (`{line}`): {}", e.message()),
                None => e.message().to_string(),
            },
        }
    })
}

/// A list setting also given as one string (`listen = "host:port"`).
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    let value = OneOrMany::deserialize(d)
        .map_err(|_| serde::de::Error::custom("expected a string or a list of strings"))?;
    Ok(Some(match value {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    }))
}

fn positive(key: &'static str, v: u64) -> Result<u64, ConfigError> {
    if v == 0 {
        Err(ConfigError::Invalid {
            key,
            error: "must be greater than 0".into(),
        })
    } else {
        Ok(v)
    }
}

impl Settings {
    pub fn resolve(cli: RunArgs) -> Result<Settings, ConfigError> {
        let file = match &cli.config {
            Some(p) => load_file(p)?,
            None => FileConfig::default(),
        };
        let addr_list =
            |key: &'static str, raw: Vec<String>| -> Result<Vec<PeerAddr>, ConfigError> {
                raw.iter()
                    .map(|s| {
                        let parsed = if key == "seed" {
                            parse_seed_addr(s)
                        } else {
                            parse_peer_addr(s)
                        };
                        parsed.map_err(|e| ConfigError::Invalid {
                            key,
                            error: e.to_string(),
                        })
                    })
                    .collect()
            };
        let mut listen_raw = pick_list(cli.listen, file.listen);
        if listen_raw.is_empty() {
            listen_raw.push("0.0.0.0:7700".into());
        }
        let listen = addr_list("listen", listen_raw)?
            .into_iter()
            .map(|a| a.addr)
            .collect();
        let advertise = addr_list("advertise", pick_list(cli.advertise, file.advertise))?
            .into_iter()
            .map(|a| a.addr)
            .collect();
        let seeds = addr_list("seed", pick_list(cli.seed, file.seed))?;
        let http_raw = cli
            .http
            .or(file.http)
            .unwrap_or_else(|| "127.0.0.1:8700".into());
        let http = resolve_socket(&http_raw)
            .map_err(|error| ConfigError::Invalid { key: "http", error })?;
        // The secret and the secret file are one setting: the first layer (flag or
        // environment, then file) that gives either of them decides.
        let (secret, secret_file) =
            if cli.cluster_secret.is_some() || cli.cluster_secret_file.is_some() {
                (cli.cluster_secret, cli.cluster_secret_file)
            } else {
                (file.cluster_secret, file.cluster_secret_file)
            };
        let cluster_secret = match (secret, secret_file) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::Invalid {
                    key: "cluster_secret",
                    error: "give either cluster_secret or cluster_secret_file, not both".into(),
                })
            }
            (Some(s), None) => Some(s.into_bytes()),
            (None, Some(f)) => {
                let text = std::fs::read(&f).map_err(|e| ConfigError::Invalid {
                    key: "cluster_secret_file",
                    error: format!("cannot read {}: {e}", f.display()),
                })?;
                let trimmed = text.strip_suffix(b"\n").unwrap_or(&text);
                let trimmed = trimmed.strip_suffix(b"\r").unwrap_or(trimmed);
                Some(trimmed.to_vec())
            }
            (None, None) => None,
        };
        if cluster_secret.as_ref().is_some_and(|s| s.is_empty()) {
            return Err(ConfigError::Invalid {
                key: "cluster_secret",
                error: "is empty".into(),
            });
        }
        let d = MembershipConfig::default();
        let announce_interval_ms = positive(
            "announce_interval_ms",
            cli.announce_interval_ms
                .or(file.announce_interval_ms)
                .unwrap_or(d.announce_interval_ms),
        )?;
        let suspect_timeout_ms = positive(
            "suspect_timeout_ms",
            cli.suspect_timeout_ms
                .or(file.suspect_timeout_ms)
                .unwrap_or(d.suspect_timeout_ms),
        )?;
        let dead_timeout_ms = positive(
            "dead_timeout_ms",
            cli.dead_timeout_ms
                .or(file.dead_timeout_ms)
                .unwrap_or(d.dead_timeout_ms),
        )?;
        if dead_timeout_ms < suspect_timeout_ms {
            return Err(ConfigError::Invalid {
                key: "dead_timeout_ms",
                error: format!("({dead_timeout_ms}) must not be below suspect_timeout_ms ({suspect_timeout_ms})"),
            });
        }
        let probe_interval_ms = positive(
            "probe_interval_ms",
            cli.probe_interval_ms
                .or(file.probe_interval_ms)
                .unwrap_or(2000),
        )?;
        if probe_interval_ms >= suspect_timeout_ms {
            return Err(ConfigError::Invalid {
                key: "probe_interval_ms",
                error: format!(
                    "({probe_interval_ms}) must be below suspect_timeout_ms ({suspect_timeout_ms}), or every member looks suspect between two pings"
                ),
            });
        }
        let dead_member_ttl_s = cli
            .dead_member_ttl_s
            .or(file.dead_member_ttl_s)
            .unwrap_or(d.dead_member_ttl_ms / 1000);
        let stripes = cli.stripes.or(file.stripes);
        if let Some(n) = stripes.filter(|&n| n == 0 || n > MAX_STRIPES) {
            return Err(ConfigError::Invalid {
                key: "stripes",
                error: format!("must be between 1 and {MAX_STRIPES}, not {n}"),
            });
        }
        let witness = cli.witness.or(file.witness).unwrap_or(false);
        let stripe = cli.stripe.or(file.stripe);
        if witness && stripe.is_some() {
            return Err(ConfigError::Invalid {
                key: "stripe",
                error: "a witness holds no stripe data; give either witness or stripe".into(),
            });
        }
        let voter_replace_after_s = cli
            .voter_replace_after_s
            .or(file.voter_replace_after_s)
            .unwrap_or(30);
        let election_timeout_ms = positive(
            "election_timeout_ms",
            cli.election_timeout_ms
                .or(file.election_timeout_ms)
                .unwrap_or(500),
        )?;
        let permanent = match cli
            .persistence
            .or(file.persistence)
            .as_deref()
            .unwrap_or("permanent")
        {
            "permanent" => true,
            "temporary" => false,
            other => {
                return Err(ConfigError::Invalid {
                    key: "persistence",
                    error: format!("must be \"permanent\" or \"temporary\", not {other:?}"),
                })
            }
        };
        let request_timeout_ms = positive(
            "request_timeout_ms",
            cli.request_timeout_ms
                .or(file.request_timeout_ms)
                .unwrap_or(5000),
        )?;
        let max_value_bytes = cli
            .max_value_bytes
            .or(file.max_value_bytes)
            .unwrap_or(1024 * 1024);
        if max_value_bytes == 0 || max_value_bytes > 3 * 1024 * 1024 {
            return Err(ConfigError::Invalid {
                key: "max_value_bytes",
                error: "must be between 1 and 3145728 (values travel in one 4 MiB frame)".into(),
            });
        }
        let reconnect_window_s = positive(
            "reconnect_window_s",
            cli.reconnect_window_s
                .or(file.reconnect_window_s)
                .unwrap_or(120),
        )?;
        let broadcast_retention = kiln_persistence::Retention {
            max_events: positive(
                "broadcast_retention_events",
                cli.broadcast_retention_events
                    .or(file.broadcast_retention_events)
                    .unwrap_or(1_000_000),
            )?,
            max_bytes: positive(
                "broadcast_retention_bytes",
                cli.broadcast_retention_bytes
                    .or(file.broadcast_retention_bytes)
                    .unwrap_or(1 << 30),
            )?,
            max_age_ms: positive(
                "broadcast_retention_s",
                cli.broadcast_retention_s
                    .or(file.broadcast_retention_s)
                    .unwrap_or(86_400),
            )?
            .saturating_mul(1000),
        };
        let max_event_bytes = cli
            .max_event_bytes
            .or(file.max_event_bytes)
            .unwrap_or(64 * 1024);
        // An event's binary (CBOR) form can be up to 2.25 times its JSON (a
        // number like 0.1 takes 9 bytes): at most 100 KiB of JSON keeps one
        // event within a gossip message.
        if max_event_bytes == 0 || max_event_bytes > 100 * 1024 {
            return Err(ConfigError::Invalid {
                key: "max_event_bytes",
                error: "must be between 1 and 102400 (an event, up to 2.25 times larger in its binary form, must fit a 256 KiB gossip message)"
                    .into(),
            });
        }
        let subscriber_buffer_bytes = positive(
            "subscriber_buffer_bytes",
            cli.subscriber_buffer_bytes
                .or(file.subscriber_buffer_bytes)
                .unwrap_or(64 << 20),
        )?;
        let artifact_keep_versions = positive(
            "artifact_keep_versions",
            cli.artifact_keep_versions
                .or(file.artifact_keep_versions)
                .unwrap_or(3) as u64,
        )?
        .min(u32::MAX as u64) as u32;
        let log_retain_entries = positive(
            "log_retain_entries",
            cli.log_retain_entries
                .or(file.log_retain_entries)
                .unwrap_or(20_000),
        )?;
        Ok(Settings {
            log_retain_entries,
            artifact_keep_versions,
            broadcast_retention,
            max_event_bytes,
            subscriber_buffer_bytes,
            reconnect_window_s,
            election_timeout_ms,
            permanent,
            request_timeout_ms,
            max_value_bytes,
            control: ControlPlaneConfig {
                stripes,
                stripe,
                witness,
                voter_replace_after: std::time::Duration::from_secs(voter_replace_after_s),
            },
            data_dir: cli
                .data_dir
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("./kiln-data")),
            listen,
            advertise,
            http,
            http_token: cli.http_token.or(file.http_token).filter(|t| !t.is_empty()),
            seeds,
            cluster_secret,
            name: cli.name.or(file.name).filter(|n| !n.is_empty()),
            probe_interval_ms,
            membership: MembershipConfig {
                announce_interval_ms,
                suspect_timeout_ms,
                dead_timeout_ms,
                dead_member_ttl_ms: dead_member_ttl_s.saturating_mul(1000),
                ..d
            },
        })
    }
}

/// `host:port` to a socket address (resolving a host name).
pub fn resolve_socket(s: &str) -> Result<SocketAddr, String> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    s.to_socket_addrs()
        .map_err(|e| format!("{s:?} is not host:port ({e})"))?
        .next()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_serve_one_node_on_one_machine() {
        let s = Settings::resolve(RunArgs::default()).unwrap();
        assert_eq!(s.data_dir, PathBuf::from("./kiln-data"));
        assert_eq!(s.listen[0].to_string(), "/ip4/0.0.0.0/tcp/7700");
        assert_eq!(s.http.to_string(), "127.0.0.1:8700");
        assert!(s.seeds.is_empty() && s.cluster_secret.is_none());
    }

    #[test]
    fn flag_beats_file_and_file_beats_default() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("kiln.toml");
        std::fs::write(
            &f,
            "name = \"from-file\"\nhttp = \"127.0.0.1:9000\"\nseed = [\"127.0.0.1:7701\"]\nsuspect_timeout_ms = 2500\n",
        )
        .unwrap();
        let s = Settings::resolve(RunArgs {
            config: Some(f),
            name: Some("from-flag".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.name.as_deref(), Some("from-flag"));
        assert_eq!(s.http.to_string(), "127.0.0.1:9000");
        assert_eq!(s.seeds.len(), 1);
        assert_eq!(s.membership.suspect_timeout_ms, 2500);
    }

    #[test]
    fn bad_values_say_which_key() {
        let e = Settings::resolve(RunArgs {
            seed: vec!["not an address".into()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().starts_with("setting seed:"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("kiln.toml");
        std::fs::write(&f, "no_such_key = 1\n").unwrap();
        let e = Settings::resolve(RunArgs {
            config: Some(f),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("no_such_key"), "{e}");
        // A wrong type names its line; one address may stand for a list.
        let f = dir.path().join("kiln2.toml");
        std::fs::write(&f, "name = \"n\"\nlisten = 5\n").unwrap();
        let e = Settings::resolve(RunArgs {
            config: Some(f.clone()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.to_string().contains("line 2 (`listen = 5`)"), "{e}");
        std::fs::write(
            &f,
            "listen = \"127.0.0.1:7709\"\nseed = \"127.0.0.1:7701\"\n",
        )
        .unwrap();
        let s = Settings::resolve(RunArgs {
            config: Some(f),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.listen[0].to_string(), "/ip4/127.0.0.1/tcp/7709");
        assert_eq!(s.seeds.len(), 1);
    }

    #[test]
    fn a_secret_flag_beats_a_secret_file_in_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("kiln.toml");
        std::fs::write(&f, "cluster_secret_file = \"/nonexistent\"\n").unwrap();
        let s = Settings::resolve(RunArgs {
            config: Some(f),
            cluster_secret: Some("flag".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.cluster_secret.as_deref(), Some(&b"flag"[..]));
    }

    #[test]
    fn secret_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("secret");
        std::fs::write(&f, "s3cret\n").unwrap();
        let s = Settings::resolve(RunArgs {
            cluster_secret_file: Some(f),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(s.cluster_secret.as_deref(), Some(&b"s3cret"[..]));
    }

    #[test]
    fn readme_documents_every_setting() {
        let readme = include_str!("../../README.md");
        for key in KEYS {
            let env = format!("KILN_{}", key.to_uppercase());
            let flag = format!("--{}", key.replace('_', "-"));
            for spelling in [key.to_string(), env, flag] {
                assert!(
                    readme.contains(&format!("`{spelling}`")),
                    "README lacks `{spelling}`"
                );
            }
        }
    }
}
