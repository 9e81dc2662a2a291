//! Helpers shared by the identity crate's test binaries.

use std::sync::Arc;
use std::time::Duration;

use boring::ssl::SslAcceptor;
use hypha_ca::{Ca, Caller, FileSigner, TenantCa};
use hypha_identity::{issue_local, tls, Identity};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

pub const TD: &str = "cluster.local";

/// A tenant `name` for namespace `ns` (`*`: every other), its signer in `dir/<name>`.
pub fn tenant(name: &str, ns: &str, dir: &std::path::Path) -> TenantCa {
    let signer = FileSigner::open_or_create(&dir.join(name), TD, name).unwrap();
    TenantCa {
        name: name.into(),
        namespaces: vec![ns.into()],
        trust_tenants: vec![],
        signer: Arc::new(signer),
        also_trusted: Vec::new(),
        max_validity: Duration::from_secs(3600),
    }
}

/// A CA with one tenant for every namespace, its signer under `dir`.
pub fn one_tenant_ca(dir: &std::path::Path) -> Ca {
    Ca::new(TD, vec![tenant("default", "*", dir)]).unwrap()
}

/// A 600 s identity for `ns/sa` from `ca`, trusting all of `ca`'s roots.
pub fn own_identity(ca: &Ca, ns: &str, sa: &str) -> Identity {
    issue_local(
        ca,
        &Caller::new(ns, sa),
        Duration::from_secs(600),
        &ca.all_roots().unwrap(),
    )
    .unwrap()
}

/// Serves TLS with `acceptor` on loopback; each accepted connection writes the client's SPIFFE
/// ID back (empty without a client certificate). Returns the address.
pub async fn echo_on(acceptor: SslAcceptor) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut s) = tls::accept(&acceptor, tcp).await {
                    let peer = tls::peer_id(s.ssl()).unwrap_or_default();
                    let _ = s.write_all(peer.as_bytes()).await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    addr
}
