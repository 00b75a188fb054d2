//! `kiln`: run a cluster node, start a local demo cluster, or talk to a node.

mod artifact_api;
mod broadcast_api;
mod client;
mod config;
mod demo;
mod http;
mod kv_api;
mod run;

use clap::{Parser, Subcommand};

/// jemalloc rather than glibc's malloc: kiln allocates per message and per write,
/// and glibc's malloc was ~12 % of all CPU under load (integration/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "kiln", version, about = "kiln: a peer-to-peer cluster node")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node (until SIGTERM or Ctrl-C, when it leaves the cluster gracefully).
    Run(Box<config::RunArgs>),
    /// Start a local cluster of real nodes on loopback; Ctrl-C stops them all.
    Demo(demo::DemoArgs),
    /// Print a node's view of the cluster: members and their state, stripes and their roles.
    Status(client::ApiArgs),
    /// Read and write the replicated key/value store.
    Kv {
        #[command(subcommand)]
        command: client::KvCommand,
    },
    /// Publish databroadcast events and follow the stream.
    Broadcast {
        #[command(subcommand)]
        command: client::BroadcastCommand,
    },
    /// Publish artifacts (versioned files every node receives) and list them.
    Artifact {
        #[command(subcommand)]
        command: client::ArtifactCommand,
    },
    /// Stripe maintenance.
    Stripe {
        #[command(subcommand)]
        command: StripeCommand,
    },
    /// Manage the member table.
    Members {
        #[command(subcommand)]
        command: MembersCommand,
    },
}

#[derive(Subcommand)]
enum StripeCommand {
    /// Hand a stripe's active role to an in-sync standby without failing a request.
    Handover {
        #[arg(long)]
        stripe: u32,
        /// Peer id of the standby to hand over to (default: the most up to date).
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        api: client::ApiArgs,
    },
}

#[derive(Subcommand)]
enum MembersCommand {
    /// Forget a dead or left member now, everywhere, instead of after dead_member_ttl_s.
    Forget {
        /// Peer id of the member.
        id: String,
        /// Forget it even if it is the only member holding a stripe's data
        /// (that data is then gone from the cluster).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        api: client::ApiArgs,
    },
    /// The member table (same as `kiln status`).
    List(client::ApiArgs),
}

/// The log filter without `RUST_LOG`. openraft writes five warnings and errors
/// for every failed request to an unreachable follower (retried every 500 ms
/// until the follower is back or replaced); one error line is kept.
const DEFAULT_LOG_FILTER: &str = "info,libp2p_gossipsub=warn,openraft=warn,\
    openraft::replication=error,openraft::engine::handler::replication_handler=error";

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run(_) | Command::Demo(_)) {
        // A verb's output piped into `head` ends quietly when the reader goes,
        // as other command-line tools do, rather than panicking in `println!`.
        // SAFETY: setting a signal's disposition to its default, before any
        // thread is started.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Command::Run(args) => match config::Settings::resolve(*args) {
            Ok(settings) => {
                init_tracing();
                run::run(settings)
            }
            Err(e) => {
                eprintln!("kiln: {e}");
                std::process::exit(2);
            }
        },
        Command::Demo(args) => demo::demo(args),
        Command::Status(api) => client::status(&api),
        Command::Kv { command } => client::kv(command),
        Command::Broadcast { command } => client::broadcast(command),
        Command::Artifact { command } => client::artifact(command),
        Command::Stripe { command } => match command {
            StripeCommand::Handover { stripe, to, api } => {
                client::handover(&api, stripe, to.as_deref())
            }
        },
        Command::Members { command } => match command {
            MembersCommand::Forget { id, force, api } => client::forget(&api, &id, force),
            MembersCommand::List(api) => client::status(&api),
        },
    };
    if let Err(e) = result {
        eprintln!("kiln: {}", one_line(&e));
        std::process::exit(1);
    }
}

/// One line an operator can act on: the error and its causes joined by ": ",
/// no backtrace, and each cause once (a message that already quotes its
/// source, as `thiserror`'s `{source}` does, is not followed by it again).
fn one_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[derive(Debug, thiserror::Error)]
    #[error("{path}: storage error: {source}")]
    struct Quoting {
        path: &'static str,
        source: std::io::Error,
    }

    #[test]
    fn a_cause_the_message_already_quotes_is_not_repeated() {
        let io = std::io::Error::other("Read-only file system");
        let e = anyhow::Error::new(Quoting {
            path: "/d/node.redb",
            source: io,
        })
        .context("cannot open the node's store");
        assert_eq!(
            one_line(&e),
            "cannot open the node's store: /d/node.redb: storage error: Read-only file system"
        );
        let plain = anyhow::anyhow!("connection refused").context("cannot reach 127.0.0.1:8701");
        assert_eq!(
            one_line(&plain),
            "cannot reach 127.0.0.1:8701: connection refused"
        );
    }
}
