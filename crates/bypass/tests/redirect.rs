//! The bypass against the real kernel: programs attached to a cgroup v2 made for the test, the
//! test process moved into it, TCP connections over loopback in both families. Needs root
//! (CAP_BPF, CAP_NET_ADMIN, writing cgroups): CI runs as root; elsewhere each test says loudly
//! that it did not run, and in CI (`CI` set) a missing privilege fails it instead.
//!
//! The tests share one process, and a socket belongs to the cgroup its creator was in, so
//! they run one at a time (`SERIAL`), each in a cgroup of its own.

use std::io::{self, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use hypha_bypass::{Bypass, CapturedPod, Counters};
use hypha_testkit::{loopback_bytes, privileged, read_some, read_to_end, TestCgroup};

static SERIAL: Mutex<()> = Mutex::new(());

fn pattern(offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len)
        .map(|i| (i.wrapping_mul(31) ^ (i >> 9)) as u8)
        .collect()
}

/// Connects to a fresh listener on `addr`; returns (client, server).
fn pair(listen: &str, connect_ip: &str) -> (TcpStream, TcpStream) {
    let l = TcpListener::bind(listen).unwrap();
    let port = l.local_addr().unwrap().port();
    let c = TcpStream::connect(format!("{connect_ip}:{port}")).unwrap();
    let (s, _) = l.accept().unwrap();
    (c, s)
}

/// Sends `len` pattern bytes from `a` while `b` echoes them back; checks every byte.
fn echo(mut a: TcpStream, mut b: TcpStream, len: usize) {
    let echoer = thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = read_some(&mut b, &mut buf).unwrap();
            if n == 0 {
                b.shutdown(Shutdown::Write).unwrap();
                return;
            }
            b.write_all(&buf[..n]).unwrap();
        }
    });
    let data = pattern(0, len);
    let mut reader = a.try_clone().unwrap();
    let checker = thread::spawn(move || read_to_end(&mut reader).unwrap());
    for chunk in data.chunks(100_000) {
        a.write_all(chunk).unwrap();
    }
    a.shutdown(Shutdown::Write).unwrap();
    let got = checker.join().unwrap();
    echoer.join().unwrap();
    assert_eq!(got.len(), data.len(), "bytes echoed");
    assert!(got == data, "the echoed bytes differ from the sent ones");
}

fn delta(after: Counters, before: Counters) -> Counters {
    Counters {
        sockets_recorded: after.sockets_recorded - before.sockets_recorded,
        sockets_refused: after.sockets_refused - before.sockets_refused,
        messages_redirected: after.messages_redirected - before.messages_redirected,
        bytes_redirected: after.bytes_redirected - before.bytes_redirected,
        messages_passed: after.messages_passed - before.messages_passed,
        connects_outbound: after.connects_outbound - before.connects_outbound,
        connects_inbound: after.connects_inbound - before.connects_inbound,
        original_dst_answered: after.original_dst_answered - before.original_dst_answered,
        sockets: after.sockets,
        rewritten: after.rewritten,
    }
}

#[test]
fn redirects_ipv4_ipv6_and_dual_stack_and_skips_loopback() {
    if !privileged("redirects_ipv4_ipv6_and_dual_stack_and_skips_loopback") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cg = TestCgroup::enter("bypass-families");
    let bypass = Bypass::attach(cg.path()).unwrap();
    const LEN: usize = 8 << 20;
    for (listen, connect) in [
        ("127.0.0.1:0", "127.0.0.1"),
        ("[::1]:0", "[::1]"),
        // A dual-stack listener: its socket is IPv6 with IPv4-mapped addresses, the client's
        // IPv4; the map keys both as IPv4 so they find each other.
        ("[::]:0", "127.0.0.1"),
    ] {
        let before = bypass.counters().unwrap();
        let lo = loopback_bytes();
        let (c, s) = pair(listen, connect);
        echo(c, s, LEN);
        let lo = loopback_bytes() - lo;
        let d = delta(bypass.counters().unwrap(), before);
        assert_eq!(d.sockets_recorded, 2, "{listen}: both ends recorded: {d:?}");
        assert_eq!(d.sockets_refused, 0, "{listen}: {d:?}");
        assert!(
            d.bytes_redirected >= 2 * LEN as u64,
            "{listen}: both directions' bytes redirected: {d:?}"
        );
        assert_eq!(d.messages_passed, 0, "{listen}: {d:?}");
        // The handshake and FINs still cross loopback; 16 MiB of data must not have.
        assert!(
            lo < (LEN / 8) as u64,
            "{listen}: {lo} bytes crossed loopback for {} bytes of data",
            2 * LEN
        );
    }
    // Closed sockets leave the map.
    let deadline = Instant::now() + Duration::from_secs(5);
    while bypass.counters().unwrap().sockets != 0 {
        assert!(Instant::now() < deadline, "closed sockets stay in the map");
        thread::sleep(Duration::from_millis(20));
    }
    bypass.detach().unwrap();
}

#[test]
fn many_connections_half_close_and_reset() {
    if !privileged("many_connections_half_close_and_reset") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cg = TestCgroup::enter("bypass-many");
    let bypass = Bypass::attach(cg.path()).unwrap();
    let before = bypass.counters().unwrap();

    // 64 connections at once, each its own pattern through an echo.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let server = thread::spawn(move || {
        (0..64)
            .map(|_| {
                let (mut s, _) = l.accept().unwrap();
                thread::spawn(move || {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = read_some(&mut s, &mut buf).unwrap();
                        if n == 0 {
                            s.shutdown(Shutdown::Write).unwrap();
                            return;
                        }
                        s.write_all(&buf[..n]).unwrap();
                    }
                })
            })
            .collect::<Vec<_>>()
    });
    let clients: Vec<_> = (0..64)
        .map(|i| {
            thread::spawn(move || {
                let mut c = TcpStream::connect(addr).unwrap();
                let data = pattern(i * 7919, 256 * 1024);
                let mut r = c.try_clone().unwrap();
                let reader = thread::spawn(move || read_to_end(&mut r).unwrap());
                c.write_all(&data).unwrap();
                c.shutdown(Shutdown::Write).unwrap();
                assert!(
                    reader.join().unwrap() == data,
                    "connection {i}: bytes differ"
                );
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    for s in server.join().unwrap() {
        s.join().unwrap();
    }
    let d = delta(bypass.counters().unwrap(), before);
    assert_eq!(d.sockets_recorded, 128, "{d:?}");
    assert!(d.bytes_redirected >= 2 * 64 * 256 * 1024, "{d:?}");

    // Half-close: the client stops sending and still receives the whole answer.
    let (mut c, mut s) = pair("127.0.0.1:0", "127.0.0.1");
    c.write_all(b"question").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let q = read_to_end(&mut s).unwrap();
    assert_eq!(q, b"question");
    let answer = pattern(3, 1 << 20);
    s.write_all(&answer).unwrap();
    drop(s);
    let a = read_to_end(&mut c).unwrap();
    assert!(a == answer, "the answer after a half-close differs");

    // Reset: the peer of a connection closed with SO_LINGER 0 sees the reset (or the end of
    // the stream), never a hang, and the bypass keeps working for the next connection.
    let (c, mut s) = pair("[::1]:0", "[::1]");
    let mut c = c;
    c.write_all(b"before the reset").unwrap();
    socket2::SockRef::from(&c)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(c);
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    let mut got = Vec::new();
    let end = loop {
        match read_some(&mut s, &mut buf) {
            Ok(0) => break "eof",
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break "reset",
            Err(e) => panic!("reading after the peer's reset: {e}"),
        }
    };
    assert!(
        got.is_empty() || got == b"before the reset",
        "{end}: got {got:?}"
    );
    let (c, s) = pair("[::1]:0", "[::1]");
    echo(c, s, 1 << 20);
    bypass.detach().unwrap();
}

#[test]
fn detaching_mid_stream_loses_nothing_and_old_sockets_are_not_bypassed() {
    if !privileged("detaching_mid_stream_loses_nothing_and_old_sockets_are_not_bypassed") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cg = TestCgroup::enter("bypass-detach");
    // A connection from before the attach is never recorded, so never redirected.
    let (mut old_c, mut old_s) = pair("127.0.0.1:0", "127.0.0.1");
    let bypass = Bypass::attach(cg.path()).unwrap();
    let before = bypass.counters().unwrap();
    old_c.write_all(&pattern(0, 1 << 20)).unwrap();
    let mut got = vec![0u8; 1 << 20];
    let mut n = 0;
    while n < got.len() {
        n += read_some(&mut old_s, &mut got[n..]).unwrap();
    }
    assert!(got == pattern(0, 1 << 20));
    let d = delta(bypass.counters().unwrap(), before);
    assert_eq!(
        (d.sockets_recorded, d.bytes_redirected),
        (0, 0),
        "old socket: {d:?}"
    );

    // A stream that runs while the bypass is detached under it.
    const LEN: usize = 64 << 20;
    let (mut c, mut s) = pair("[::1]:0", "[::1]");
    let reader = thread::spawn(move || read_to_end(&mut s).unwrap());
    let writer = thread::spawn(move || {
        for (i, chunk) in pattern(0, LEN).chunks(64 * 1024).enumerate() {
            c.write_all(chunk).unwrap();
            if i % 64 == 0 {
                thread::sleep(Duration::from_millis(2));
            }
        }
        c.shutdown(Shutdown::Write).unwrap();
    });
    // Detach once some of the stream went through the redirect.
    let deadline = Instant::now() + Duration::from_secs(20);
    while bypass.counters().unwrap().bytes_redirected - before.bytes_redirected < (LEN / 8) as u64 {
        assert!(Instant::now() < deadline, "the stream is not redirected");
        thread::sleep(Duration::from_millis(1));
    }
    let at_detach = bypass.counters().unwrap().bytes_redirected - before.bytes_redirected;
    bypass.detach().unwrap();
    writer.join().unwrap();
    let got = reader.join().unwrap();
    assert!(at_detach < LEN as u64, "the stream ended before the detach");
    assert_eq!(got.len(), LEN, "bytes after a detach mid-stream");
    assert!(
        got == pattern(0, LEN),
        "bytes differ after a detach mid-stream"
    );

    // And connections made after the detach work on the normal path.
    let (c, s) = pair("127.0.0.1:0", "127.0.0.1");
    echo(c, s, 1 << 20);
    drop(cg);
}

/// Two pods, each with a loopback connection of the same four-tuple (127.0.0.1:P+1 →
/// 127.0.0.1:P) at the same time: both are redirected and each pod's bytes stay in that pod.
/// (Keyed by addresses and ports alone, the second pod's sockets replace the first's in the
/// map: the first pod loses the bypass, which the counters show, and while only one of the
/// second pod's ends has replaced its twin, the first pod's other end finds the second
/// pod's socket as its peer.)
#[test]
fn loopback_connections_in_two_pods_never_meet() {
    if !privileged("loopback_connections_in_two_pods_never_meet") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cg = TestCgroup::enter("bypass-netns");
    let bypass = Bypass::attach(cg.path()).unwrap();
    let index = 150 + u8::try_from(std::process::id() % 50).unwrap();
    let node = hypha_pod::Node::create(index).unwrap();
    let pods = [node.pod("a").unwrap(), node.pod("b").unwrap()];
    let go = std::env::temp_dir().join(format!("hypha-bypass-go-{}", std::process::id()));
    let _ = std::fs::remove_file(&go);
    const LEN: usize = 4 << 20;
    let before = bypass.counters().unwrap();
    let mut children: Vec<_> = pods
        .iter()
        .enumerate()
        .map(|(i, pod)| {
            let mut child = pod
                .command(env!("CARGO_BIN_EXE_hypha-bypass-probe"))
                .args(["echo-pair", "7000", &LEN.to_string(), &(i + 1).to_string()])
                .arg(&go)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
            let mut line = String::new();
            std::io::BufRead::read_line(&mut out, &mut line).unwrap();
            assert_eq!(line.trim(), "connected", "pod {}", pod.name);
            (child, out)
        })
        .collect();
    std::fs::write(&go, b"").unwrap();
    for (pod, (child, out)) in pods.iter().zip(&mut children) {
        let status = child.wait().unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(out, &mut rest).unwrap();
        assert!(
            status.success() && rest.trim() == "ok",
            "pod {}: {status} {rest}",
            pod.name
        );
    }
    let _ = std::fs::remove_file(&go);
    let d = delta(bypass.counters().unwrap(), before);
    assert_eq!(d.sockets_recorded, 4, "{d:?}");
    assert!(
        d.bytes_redirected >= 4 * LEN as u64,
        "both pods' loopback connections redirected, both ways: {d:?}"
    );
    drop(pods);
    drop(node);
    bypass.detach().unwrap();
}

/// A sidecar's connections to other registered pods are rewritten at connect to their inbound
/// port, and each accepting sidecar learns its own connection's original destination, in both
/// families, even when the kernel gives two connections the same local port (connections to
/// different destinations may share one, so the connecting end alone does not name a
/// connection). Once they close, or fail to connect, the programs hold nothing for them, so
/// no later connection can be answered with a stale destination.
#[test]
fn each_connection_keeps_its_own_original_destination_until_it_closes() {
    if !privileged("each_connection_keeps_its_own_original_destination_until_it_closes") {
        return;
    }
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cg = TestCgroup::enter("bypass-orig");
    let mut bypass = Bypass::attach(cg.path()).unwrap();
    let index = 150 + u8::try_from(std::process::id() % 50).unwrap();
    let node = hypha_pod::Node::create(index).unwrap();
    let client = node.pod("client").unwrap();
    let servers = [node.pod("web1").unwrap(), node.pod("web2").unwrap()];
    // Registered, with nothing listening on its inbound port: connections to it are refused.
    let idle = node.pod("idle").unwrap();
    for pod in [&client, &servers[0], &servers[1], &idle] {
        bypass
            .add_pod(&CapturedPod::new(format!("/run/netns/{}", pod.netns)))
            .unwrap();
    }
    let probe = env!("CARGO_BIN_EXE_hypha-bypass-probe");
    let go = std::env::temp_dir().join(format!("hypha-bypass-orig-go-{}", std::process::id()));
    let _ = std::fs::remove_file(&go);
    let read_line = |out: &mut std::io::BufReader<std::process::ChildStdout>| {
        let mut line = String::new();
        std::io::BufRead::read_line(out, &mut line).unwrap();
        line.trim().to_string()
    };
    // Killed on drop, so a failed assertion leaves no listener behind.
    struct Children(Vec<std::process::Child>);
    impl Drop for Children {
        fn drop(&mut self) {
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let mut children = Children(Vec::new());
    for pod in &servers {
        let mut child = pod
            .sidecar_command(probe)
            .args(["original-dst", "15006"])
            .arg(&go)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
        children.0.push(child);
        assert_eq!(read_line(&mut out), "listening", "pod {}", pod.name);
    }
    // The app ports the client's sidecar asks for; each connection goes to its pod's 15006.
    let dsts: Vec<std::net::SocketAddr> = vec![
        (servers[0].ipv4, 8080).into(),
        (servers[1].ipv4, 9090).into(),
        (servers[0].ipv6, 8081).into(),
        (servers[1].ipv6, 9091).into(),
        (idle.ipv4, 7070).into(),
    ];
    let before = bypass.counters().unwrap();
    let mut connect = client.sidecar_command(probe);
    connect
        .args(["connect-from", "41000"])
        .args(dsts.iter().map(ToString::to_string))
        .stdout(std::process::Stdio::piped());
    let mut child = connect.spawn().unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let connecting = children.0.len();
    children.0.push(child);
    assert_eq!(read_line(&mut out), "connected");
    // Every connection is made before any sidecar accepts and asks.
    std::fs::write(&go, b"").unwrap();
    for dst in &dsts[..4] {
        assert_eq!(
            read_line(&mut out),
            format!("{dst} {dst}"),
            "answers: {dsts:?}"
        );
    }
    assert_eq!(read_line(&mut out), format!("{} refused", dsts[4]));
    assert!(children.0[connecting].wait().unwrap().success());
    let _ = std::fs::remove_file(&go);
    let d = delta(bypass.counters().unwrap(), before);
    assert_eq!(d.connects_inbound, 5, "{d:?}");
    assert_eq!(d.original_dst_answered, 4, "{d:?}");
    // The client closed first; its ends reach CLOSE when the listeners' FINs come back.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = bypass.counters().unwrap();
        if c.rewritten == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "original destinations still kept after every connection closed: {c:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
    drop(children);
    drop((client, servers, idle));
    drop(node);
    bypass.detach().unwrap();
}
