//! Helpers shared by the identity crate's test binaries.

use std::sync::Arc;
use std::time::Duration;

use boring::ssl::SslAcceptor;
use hypha_ca::{FileSigner, TenantCa};
use hypha_identity::tls;
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
        max_validity: Duration::from_secs(3600),
    }
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
