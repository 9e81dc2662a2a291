//! `hypha-bypass-probe`: small TCP programs for the bypass's tests and `bench/bypass`, run
//! inside pods (`ip netns exec`), where a test process cannot go itself.
//!
//! - `echo-pair PORT BYTES SEED GO_FILE`: a loopback connection between fixed ports
//!   (127.0.0.1:PORT ← 127.0.0.1:PORT+1), reported on stdout as `connected`; once GO_FILE
//!   exists, BYTES of a pattern seeded by SEED go through an echo and back, checked. Prints
//!   `ok` or fails. Two pods running it at once have the same four-tuple in two namespaces.
//! - `serve ADDR`: echoes every connection, a thread each.
//! - `ping ADDR CONNS SECONDS SIZE`: CONNS connections, each sending SIZE bytes and waiting
//!   for them back, in a loop for SECONDS; prints one JSON line with the round trips and
//!   their p50/p90/p99 in microseconds.
//! - `original-dst PORT GO_FILE`: listens on PORT of every address (IPv4, and IPv6 apart),
//!   prints `listening`, and once GO_FILE exists accepts: each connection is sent its
//!   `SO_ORIGINAL_DST` (`IP6T_SO_ORIGINAL_DST`) as a line (`error ...` when there is none),
//!   then held until the peer closes. A sidecar's capture listener, reduced to its question.
//! - `connect-from PORT DST...`: one connection to each DST, all from local port PORT (address
//!   reuse: the kernel lets connections to different destinations share it); prints
//!   `connected`, then for each DST a line `DST LINE` with the line it reads back (`DST
//!   refused` for a connection that failed), and closes them all.

use std::io::{self, Write};

use hypha_bypass::read_some;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::ExitCode;
use std::thread;
use std::time::{Duration, Instant};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["echo-pair", port, bytes, seed, go] => echo_pair(
            port.parse().expect("PORT"),
            bytes.parse().expect("BYTES"),
            seed.parse().expect("SEED"),
            Path::new(go),
        ),
        ["serve", addr] => serve(addr.parse().expect("ADDR")),
        ["ping", addr, conns, secs, size] => ping(
            addr.parse().expect("ADDR"),
            conns.parse().expect("CONNS"),
            secs.parse().expect("SECONDS"),
            size.parse().expect("SIZE"),
        ),
        ["original-dst", port, go] => original_dst(port.parse().expect("PORT"), Path::new(go)),
        ["connect-from", port, dsts @ ..] => connect_from(
            port.parse().expect("PORT"),
            &dsts
                .iter()
                .map(|d| d.parse().expect("DST"))
                .collect::<Vec<SocketAddr>>(),
        ),
        _ => {
            eprintln!("usage: hypha-bypass-probe echo-pair PORT BYTES SEED GO_FILE | serve ADDR | ping ADDR CONNS SECONDS SIZE | original-dst PORT GO_FILE | connect-from PORT DST...");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hypha-bypass-probe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| {
            ((i as u64)
                .wrapping_mul(0x9e37_79b9)
                .wrapping_add(seed.wrapping_mul(0x85eb_ca6b))
                >> 11) as u8
        })
        .collect()
}

fn read_exact(s: &mut TcpStream, mut buf: &mut [u8]) -> io::Result<()> {
    while !buf.is_empty() {
        let n = read_some(s, buf)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        buf = &mut buf[n..];
    }
    Ok(())
}

fn echo(mut s: TcpStream) -> io::Result<()> {
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = read_some(&mut s, &mut buf)?;
        if n == 0 {
            return s.shutdown(std::net::Shutdown::Write);
        }
        s.write_all(&buf[..n])?;
    }
}

/// Waits for `go` to exist (30 s at most).
fn wait_for(go: &Path) -> io::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !go.exists() {
        if Instant::now() > deadline {
            return Err(io::Error::other("no go signal"));
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn echo_pair(port: u16, bytes: usize, seed: u64, go: &Path) -> io::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    let client = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    client.set_reuse_address(true)?;
    client.bind(&SocketAddr::from(([127, 0, 0, 1], port + 1)).into())?;
    client.connect(&SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    let mut client: TcpStream = client.into();
    let (server, _) = listener.accept()?;
    println!("connected");
    io::stdout().flush()?;
    wait_for(go)?;
    let echoer = thread::spawn(move || echo(server));
    let data = pattern(seed, bytes);
    let mut reader = client.try_clone()?;
    let check = thread::spawn(move || {
        let mut got = vec![0u8; bytes];
        read_exact(&mut reader, &mut got).map(|()| got)
    });
    client.write_all(&data)?;
    let got = check
        .join()
        .map_err(|_| io::Error::other("reader panicked"))??;
    client.shutdown(std::net::Shutdown::Write)?;
    echoer
        .join()
        .map_err(|_| io::Error::other("echo panicked"))??;
    if got != data {
        let first = got.iter().zip(&data).position(|(a, b)| a != b).unwrap_or(0);
        return Err(io::Error::other(format!(
            "echoed bytes differ from byte {first}"
        )));
    }
    println!("ok");
    Ok(())
}

fn serve(addr: SocketAddr) -> io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    for stream in listener.incoming() {
        let stream = stream?;
        thread::spawn(move || echo(stream));
    }
    Ok(())
}

fn original_dst(port: u16, go: &Path) -> io::Result<()> {
    let listeners = [
        SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)),
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)),
    ]
    .map(|addr| -> io::Result<TcpListener> {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::STREAM,
            None,
        )?;
        if addr.is_ipv6() {
            s.set_only_v6(true)?;
        }
        s.bind(&addr.into())?;
        s.listen(64)?;
        Ok(s.into())
    });
    let listeners = listeners.into_iter().collect::<io::Result<Vec<_>>>()?;
    println!("listening");
    io::stdout().flush()?;
    // Connections wait in the accept queue until then: a test can make several before any
    // is asked about.
    wait_for(go)?;
    let accepting: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            thread::spawn(move || -> io::Result<()> {
                for stream in l.incoming() {
                    let mut stream = stream?;
                    thread::spawn(move || -> io::Result<()> {
                        let sock = socket2::SockRef::from(&stream);
                        let asked = if stream.local_addr()?.is_ipv4() {
                            sock.original_dst_v4()
                        } else {
                            sock.original_dst_v6()
                        };
                        let line = match asked.map(|a| a.as_socket()) {
                            Ok(Some(a)) => format!("{a}\n"),
                            Ok(None) => "error not an IP address\n".to_string(),
                            Err(e) => format!("error {e}\n"),
                        };
                        stream.write_all(line.as_bytes())?;
                        let mut buf = [0u8; 64];
                        while read_some(&mut stream, &mut buf)? > 0 {}
                        Ok(())
                    });
                }
                Ok(())
            })
        })
        .collect();
    for a in accepting {
        a.join()
            .map_err(|_| io::Error::other("accept loop panicked"))??;
    }
    Ok(())
}

fn connect_from(port: u16, dsts: &[SocketAddr]) -> io::Result<()> {
    let mut conns = Vec::new();
    for dst in dsts {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(*dst),
            socket2::Type::STREAM,
            None,
        )?;
        s.set_reuse_address(true)?;
        let local = if dst.is_ipv4() {
            SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port))
        } else {
            s.set_only_v6(true)?;
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port))
        };
        s.bind(&local.into())?;
        conns.push(match s.connect(&(*dst).into()) {
            Ok(()) => Some(TcpStream::from(s)),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => None,
            Err(e) => return Err(io::Error::other(format!("{dst}: {e}"))),
        });
    }
    println!("connected");
    io::stdout().flush()?;
    for (dst, conn) in dsts.iter().zip(&mut conns) {
        let Some(conn) = conn else {
            println!("{dst} refused");
            continue;
        };
        let mut line = Vec::new();
        let mut byte = [0u8; 1];
        while !line.ends_with(b"\n") {
            if read_some(conn, &mut byte)? == 0 {
                return Err(io::Error::other(format!("{dst}: closed before a line")));
            }
            line.push(byte[0]);
        }
        print!("{dst} {}", String::from_utf8_lossy(&line));
    }
    io::stdout().flush()?;
    Ok(())
}

fn ping(addr: SocketAddr, conns: usize, secs: f64, size: usize) -> io::Result<()> {
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let workers: Vec<_> = (0..conns)
        .map(|_| {
            thread::spawn(move || -> io::Result<Vec<u32>> {
                let mut s = TcpStream::connect(addr)?;
                s.set_nodelay(true)?;
                let msg = vec![0x5au8; size];
                let mut back = vec![0u8; size];
                let mut rtts = Vec::new();
                while Instant::now() < until {
                    let t = Instant::now();
                    s.write_all(&msg)?;
                    read_exact(&mut s, &mut back)?;
                    rtts.push(u32::try_from(t.elapsed().as_nanos() / 1000).unwrap_or(u32::MAX));
                }
                Ok(rtts)
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(
            w.join()
                .map_err(|_| io::Error::other("worker panicked"))??,
        );
    }
    all.sort_unstable();
    let q = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    println!(
        "{{\"round_trips\": {}, \"per_s\": {:.0}, \"p50_us\": {}, \"p90_us\": {}, \"p99_us\": {}}}",
        all.len(),
        all.len() as f64 / secs,
        q(0.5),
        q(0.9),
        q(0.99)
    );
    Ok(())
}
