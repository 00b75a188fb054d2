//! `kiln demo`: real nodes on loopback, converged, listed, and stopped by Ctrl-C.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_integration::*;

fn free_base_port(n: u16) -> u16 {
    let mut p = 20_000 + (std::process::id() % 5_000) as u16 * 2;
    loop {
        let free = (0..n).all(|i| {
            TcpListener::bind(("127.0.0.1", p + i)).is_ok()
                && TcpListener::bind(("127.0.0.1", p + 1000 + i)).is_ok()
        });
        if free {
            return p;
        }
        p += n;
    }
}

#[test]
fn demo_starts_a_converged_cluster_and_ctrl_c_stops_it() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let base = free_base_port(3);
    let mut demo = Command::new(kiln_bin())
        .args([
            "demo",
            "--nodes",
            "3",
            "--base-port",
            &base.to_string(),
            "--dir",
        ])
        .arg(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = demo.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut out = Vec::new();
    let start = Instant::now();
    while !out.iter().any(|l: &String| l.contains("Press Ctrl-C")) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "demo never came up: {out:#?}"
        );
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            out.push(l);
        }
    }
    let text = out.join("\n");
    assert!(text.contains("3/3 nodes see all 3 members alive"), "{text}");
    for i in 0..3 {
        assert!(
            text.contains(&format!("http://127.0.0.1:{}", base + 1000 + i)),
            "{text}"
        );
        assert!(
            text.contains(&format!("/ip4/127.0.0.1/tcp/{}", base + i)),
            "{text}"
        );
    }
    let pids: Vec<i32> = out
        .iter()
        .filter_map(|l| l.split("(pid ").nth(1)?.split(')').next()?.parse().ok())
        .collect();
    assert_eq!(pids.len(), 3);
    unsafe {
        libc::kill(demo.id() as i32, libc::SIGINT);
    }
    let start = Instant::now();
    let status = loop {
        if let Some(s) = demo.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "demo did not stop"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success());
    for pid in pids {
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "node process {pid} outlived the demo");
    }
    let log = std::fs::read_to_string(dir.path().join("node2/kiln.log")).unwrap();
    assert!(log.contains("leaving the cluster"), "{log}");
}
