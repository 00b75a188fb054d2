//! `kiln demo`: a local cluster of real `kiln run` processes on loopback.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::client::{format_members, Api, ApiArgs};

#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Number of nodes to start.
    #[arg(long, default_value_t = 6)]
    pub nodes: u16,
    /// Directory for the nodes' data directories and logs.
    #[arg(long, default_value = "./kiln-demo")]
    pub dir: PathBuf,
    /// First peer port; node i listens on base+i (HTTP on base+1000+i).
    #[arg(long, default_value_t = 7701)]
    pub base_port: u16,
    /// Cluster secret of the demo cluster.
    #[arg(long, default_value = "kiln-demo-secret")]
    pub cluster_secret: String,
    /// Stripes of the demo cluster (6 nodes make 2 stripes of 3).
    #[arg(long, default_value_t = 2)]
    pub stripes: u32,
}

struct DemoNode {
    child: Child,
    http: String,
}

fn stop_all(nodes: &mut [DemoNode]) {
    for n in nodes.iter() {
        // SIGTERM: each node announces its leave before it exits.
        unsafe {
            libc::kill(n.child.id() as libc::pid_t, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in nodes.iter_mut() {
        while Instant::now() < deadline {
            if let Ok(Some(_)) = n.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if let Ok(None) = n.child.try_wait() {
            let _ = n.child.kill();
            let _ = n.child.wait();
        }
    }
}

/// Installs SIGINT/SIGTERM handling at once (before any node starts, so that a
/// Ctrl-C at any moment stops the nodes too) and returns the flag it raises.
fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    use tokio::signal::unix::{signal, SignalKind};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime for signal handling")?;
    let (mut term, mut int) = rt.block_on(async {
        anyhow::Ok((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
        ))
    })?;
    let flag = Arc::new(AtomicBool::new(false));
    let raised = flag.clone();
    std::thread::spawn(move || {
        rt.block_on(async {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        });
        raised.store(true, Ordering::SeqCst);
    });
    Ok(flag)
}

pub fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let stop = stop_flag()?;
    if args.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    if args.base_port.checked_add(1000 + args.nodes).is_none() {
        bail!(
            "--base-port {} leaves no room for {} nodes",
            args.base_port,
            args.nodes
        );
    }
    let exe = std::env::current_exe().context("cannot find the kiln binary to start nodes")?;
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let seed = format!("127.0.0.1:{}", args.base_port);
    let mut nodes: Vec<DemoNode> = Vec::new();
    for i in 0..args.nodes {
        let dir = args.dir.join(format!("node{}", i + 1));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let log = std::fs::File::create(dir.join("kiln.log"))
            .with_context(|| format!("cannot create {}", dir.join("kiln.log").display()))?;
        let http = format!("127.0.0.1:{}", args.base_port + 1000 + i);
        let mut cmd = Command::new(&exe);
        cmd.arg("run")
            .arg("--data-dir")
            .arg(&dir)
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", args.base_port + i))
            .arg("--http")
            .arg(&http)
            .arg("--name")
            .arg(format!("node{}", i + 1))
            .arg("--cluster-secret")
            .arg(&args.cluster_secret)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if i > 0 {
            cmd.arg("--seed").arg(&seed);
        } else {
            cmd.arg("--stripes").arg(args.stripes.to_string());
        }
        // Clear settings that would apply to every node alike.
        for var in [
            "KILN_CONFIG",
            "KILN_DATA_DIR",
            "KILN_LISTEN",
            "KILN_HTTP",
            "KILN_SEED",
            "KILN_NAME",
        ] {
            cmd.env_remove(var);
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                stop_all(&mut nodes);
                bail!("cannot start {}: {e}", exe.display());
            }
        };
        println!(
            "started node{} (pid {}) http://{http}  log {}",
            i + 1,
            child.id(),
            dir.join("kiln.log").display()
        );
        nodes.push(DemoNode { child, http });
    }
    let result = wait_converged(&mut nodes, args.nodes as usize, &stop);
    if let Err(e) = result {
        stop_all(&mut nodes);
        return Err(e);
    }
    let api = Api::new(&ApiArgs {
        http: nodes[0].http.clone(),
        http_token: None,
    });
    if let Ok(members) = api.get("/v1/cluster/members") {
        print!(
            "{}",
            format_members(&members, kiln_actors::membership::unix_ms())
        );
    }
    println!(
        "\nkiln demo: {} nodes up. Try: kiln status --http {}",
        args.nodes, nodes[0].http
    );
    println!("Press Ctrl-C to stop the cluster.");
    let mut exited = vec![false; nodes.len()];
    while !stop.load(Ordering::SeqCst) {
        for (i, node) in nodes.iter_mut().enumerate() {
            if exited[i] {
                continue;
            }
            if let Ok(Some(status)) = node.child.try_wait() {
                exited[i] = true;
                println!("node{} exited ({status}); see its kiln.log", i + 1);
            }
        }
        if exited.iter().all(|e| *e) {
            bail!("every node of the demo exited; see their kiln.log files");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("stopping: every node leaves gracefully");
    stop_all(&mut nodes);
    Ok(())
}

fn wait_converged(nodes: &mut [DemoNode], n: usize, stop: &AtomicBool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last_report = 0;
    loop {
        if stop.load(Ordering::SeqCst) {
            bail!("interrupted before the cluster formed");
        }
        for (i, node) in nodes.iter_mut().enumerate() {
            if let Ok(Some(status)) = node.child.try_wait() {
                bail!(
                    "node{} exited ({status}) before the cluster formed; see its kiln.log",
                    i + 1
                );
            }
        }
        let converged = nodes
            .iter()
            .filter(|node| {
                let api = Api::new(&ApiArgs {
                    http: node.http.clone(),
                    http_token: None,
                });
                api.get("/v1/cluster/members")
                    .ok()
                    .and_then(|m| m["members"].as_array().cloned())
                    .map(|a| a.iter().filter(|m| m["state"] == "alive").count() >= n)
                    .unwrap_or(false)
            })
            .count();
        if converged != last_report {
            println!("{converged}/{n} nodes see all {n} members alive");
            last_report = converged;
        }
        if converged == n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the demo cluster did not converge within 120 s ({converged}/{n} nodes see everyone); see the kiln.log files");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}
