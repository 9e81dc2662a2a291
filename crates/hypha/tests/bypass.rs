//! `hypha bypass` as an operator runs it (root; CI runs it): attached to a cgroup, its
//! `/metrics` counts the redirected bytes of a connection made in the cgroup; on SIGTERM it
//! exits cleanly and the programs are gone (a new connection's bytes cross loopback again).

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use hypha_testkit::{loopback_bytes, privileged, read_to_end, TestCgroup};

fn metric(port: u16, name: &str) -> Option<u64> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: bypass\r\n\r\n")
        .ok()?;
    let text = String::from_utf8(read_to_end(&mut s).unwrap()).ok()?;
    if !text.starts_with("HTTP/1.1 200") {
        return None;
    }
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
}

/// 1 MiB from a client to a server on loopback; the loopback bytes it took.
fn transfer() -> u64 {
    let lo = loopback_bytes();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (mut s, _) = l.accept().unwrap();
    let data: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let reader = thread::spawn(move || read_to_end(&mut s).unwrap());
    c.write_all(&data).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    assert!(reader.join().unwrap() == data, "bytes differ");
    loopback_bytes() - lo
}

#[test]
fn hypha_bypass_counts_redirects_and_detaches_on_sigterm() {
    if !privileged("hypha_bypass_counts_redirects_and_detaches_on_sigterm") {
        return;
    }
    let cg = TestCgroup::enter("cli-bypass");
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_hypha"))
        .args(["bypass", "--cgroup"])
        .arg(cg.path())
        .args(["--metrics", &format!("127.0.0.1:{port}")])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let before = loop {
        if let Some(v) = metric(port, "hypha_bypass_bytes_redirected_total") {
            break v;
        }
        assert!(child.try_wait().unwrap().is_none(), "hypha bypass exited");
        assert!(Instant::now() < deadline, "no /metrics from hypha bypass");
        thread::sleep(Duration::from_millis(50));
    };
    let lo = transfer();
    let after = metric(port, "hypha_bypass_bytes_redirected_total").unwrap();
    assert!(
        after - before >= 1 << 20,
        "redirected {} bytes of a 1 MiB transfer",
        after - before
    );
    assert!(lo < 1 << 18, "{lo} loopback bytes for 1 MiB redirected");
    assert!(metric(port, "hypha_bypass_sockets_recorded_total").unwrap() >= 2);

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "hypha bypass ignores SIGTERM");
        thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "hypha bypass exited with {status}");
    // Detached: the same transfer crosses loopback now.
    let lo = transfer();
    assert!(lo >= 1 << 20, "only {lo} loopback bytes after the detach");
    drop(cg);
}
