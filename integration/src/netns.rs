//! Network namespaces for partition tests: each node gets a namespace with a veth
//! pair onto a bridge in the root namespace (10.77.N.0/24, the test process at
//! .1). `cut` drops, inside a node's namespace, everything from and to the other
//! nodes (nftables) while the test process can still talk to it; `heal` removes
//! the rule. Needs root, `ip` (iproute2) and `nft` (nftables).

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .map_err(|e| format!("{}: {e} (install iproute2 and nftables)", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A bridge and one namespace per node; removed on drop.
pub struct Lab {
    bridge: String,
    subnet: u8,
    namespaces: Vec<String>,
}

impl Lab {
    /// Creates `n` namespaces on a new bridge. Fails with a clear message when the
    /// machine cannot (not root, no `ip` or `nft`).
    pub fn new(n: usize) -> Result<Lab, String> {
        let id = std::process::id() % 1000;
        let k = NEXT_LAB.fetch_add(1, Ordering::SeqCst);
        // A subnet no bridge holds yet (another run's, or one a killed run left).
        let taken = Command::new("ip")
            .args(["-o", "-4", "addr", "show"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let subnet = (0..100)
            .map(|i| (77 + (k + i) % 100) as u8)
            .find(|s| !taken.contains(&format!(" 10.{s}.0.1/")))
            .ok_or("no free 10.x.0.0/24 subnet for the test bridge")?;
        let bridge = format!("kb{id}x{k}");
        run(&["ip", "link", "add", &bridge, "type", "bridge"])?;
        let mut lab = Lab {
            bridge: bridge.clone(),
            subnet,
            namespaces: Vec::new(),
        };
        run(&[
            "ip",
            "addr",
            "add",
            &format!("10.{subnet}.0.1/24"),
            "dev",
            &bridge,
        ])?;
        run(&["ip", "link", "set", &bridge, "up"])?;
        for i in 0..n {
            let ns = format!("kn{id}x{k}n{i}");
            let (inner, outer) = (format!("ki{id}x{k}n{i}"), format!("ko{id}x{k}n{i}"));
            run(&["ip", "netns", "add", &ns])?;
            lab.namespaces.push(ns.clone());
            run(&[
                "ip", "link", "add", &inner, "type", "veth", "peer", "name", &outer,
            ])?;
            run(&["ip", "link", "set", &inner, "netns", &ns])?;
            run(&["ip", "link", "set", &outer, "master", &bridge])?;
            run(&["ip", "link", "set", &outer, "up"])?;
            let addr = format!("{}/24", lab.ip(i));
            run(&[
                "ip", "netns", "exec", &ns, "ip", "addr", "add", &addr, "dev", &inner,
            ])?;
            run(&[
                "ip", "netns", "exec", &ns, "ip", "link", "set", &inner, "up",
            ])?;
            run(&["ip", "netns", "exec", &ns, "ip", "link", "set", "lo", "up"])?;
        }
        Ok(lab)
    }

    /// Address of node `i`.
    pub fn ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet, 0, 10 + i as u8)
    }

    pub fn namespace(&self, i: usize) -> String {
        self.namespaces[i].clone()
    }

    /// Cuts node `i` off from every other node (the test process still reaches it).
    pub fn cut(&self, i: usize) -> Result<(), String> {
        let ns = &self.namespaces[i];
        let me = format!("10.{}.0.1", self.subnet);
        let nodes = format!("10.{}.0.0/24", self.subnet);
        let exec = |rule: &[&str]| {
            let mut args = vec!["ip", "netns", "exec", ns, "nft"];
            args.extend_from_slice(rule);
            run(&args)
        };
        exec(&["add", "table", "inet", "kilncut"])?;
        exec(&[
            "add",
            "chain",
            "inet",
            "kilncut",
            "in",
            "{ type filter hook input priority 0; policy accept; }",
        ])?;
        exec(&[
            "add",
            "chain",
            "inet",
            "kilncut",
            "out",
            "{ type filter hook output priority 0; policy accept; }",
        ])?;
        exec(&[
            "add", "rule", "inet", "kilncut", "in", "ip", "saddr", &nodes, "ip", "saddr", "!=",
            &me, "drop",
        ])?;
        exec(&[
            "add", "rule", "inet", "kilncut", "out", "ip", "daddr", &nodes, "ip", "daddr", "!=",
            &me, "drop",
        ])?;
        Ok(())
    }

    /// Cuts nodes `i` and `j` off from each other only, as if each were down for
    /// the other: each one's namespace answers every TCP packet from the other
    /// with a reset (connections fail at once, dials are refused). Both still
    /// reach every other node. `heal_between` removes it.
    pub fn cut_between(&self, i: usize, j: usize) -> Result<(), String> {
        for (me, other) in [(i, j), (j, i)] {
            let ns = &self.namespaces[me];
            let other = self.ip(other).to_string();
            let exec = |rule: &[&str]| {
                let mut args = vec!["ip", "netns", "exec", ns, "nft"];
                args.extend_from_slice(rule);
                run(&args)
            };
            exec(&["add", "table", "inet", "kilnpair"])?;
            exec(&[
                "add",
                "chain",
                "inet",
                "kilnpair",
                "in",
                "{ type filter hook input priority 0; policy accept; }",
            ])?;
            exec(&[
                // Not the other side's resets: those must get through.
                "add", "rule", "inet", "kilnpair", "in", "ip", "saddr", &other, "tcp", "flags", "&",
                "rst", "==", "0", "reject", "with", "tcp", "reset",
            ])?;
        }
        Ok(())
    }

    pub fn heal_between(&self, i: usize, j: usize) -> Result<(), String> {
        for me in [i, j] {
            run(&[
                "ip",
                "netns",
                "exec",
                &self.namespaces[me],
                "nft",
                "delete",
                "table",
                "inet",
                "kilnpair",
            ])?;
        }
        Ok(())
    }

    pub fn heal(&self, i: usize) -> Result<(), String> {
        run(&[
            "ip",
            "netns",
            "exec",
            &self.namespaces[i],
            "nft",
            "delete",
            "table",
            "inet",
            "kilncut",
        ])
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = run(&["ip", "netns", "del", ns]);
        }
        let _ = run(&["ip", "link", "del", &self.bridge]);
    }
}
