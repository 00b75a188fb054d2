//! The `kiln` command line as a user meets it. (Its presence also makes
//! `cargo test --workspace` build the `kiln` binary the process tests run.)

use std::process::Command;

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

#[test]
fn bad_setting_is_one_clear_line_and_exit_2() {
    let out = kiln()
        .args(["run", "--seed", "no-port-here"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("setting seed"), "{err}");
}

#[test]
fn environment_is_read_and_flag_beats_it() {
    let out = kiln()
        .args(["run"])
        .env("KILN_SUSPECT_TIMEOUT_MS", "5000")
        .env("KILN_DEAD_TIMEOUT_MS", "100")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("setting dead_timeout_ms"));
    // The flag wins over the environment, so the same bad environment is overridden.
    let out = kiln()
        .args(["run", "--dead-timeout-ms", "0"])
        .env("KILN_DEAD_TIMEOUT_MS", "100")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be greater than 0"));
}

#[test]
fn config_file_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("kiln.toml");
    std::fs::write(&f, "listen = 7\n").unwrap();
    let out = kiln().args(["run", "--config"]).arg(&f).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kiln.toml"), "{err}");
}

#[test]
fn status_of_a_missing_node_says_what_to_check() {
    let out = kiln()
        .args(["status", "--http", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is the node running"));
}
