//! A mesh client trusts the mesh roots it is given and nothing else: not the system's CA store,
//! which BoringSSL's connector builder loads by default (`SSL_CERT_FILE`, `/etc/ssl/certs`).
//! Its own test binary, since it sets `SSL_CERT_FILE` for the whole process.

mod common;

use common::{echo_on, one_tenant_ca, own_identity};
use hypha_ca::Ca;
use hypha_identity::tls::{self, ClientCert, Peer};
use tokio::net::TcpStream;

#[tokio::test]
async fn a_client_trusts_only_the_mesh_roots() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = one_tenant_ca(&dir.path().join("mesh"));
    let other = one_tenant_ca(&dir.path().join("other"));
    // The other CA's root is a "system" root for this process.
    let system = dir.path().join("system-roots.pem");
    std::fs::write(&system, other.all_roots().unwrap().concat()).unwrap();
    std::env::set_var("SSL_CERT_FILE", &system);

    // A server with the expected SPIFFE ID, issued by the other CA.
    let server = own_identity(&other, "default", "reviews");
    let addr = echo_on(tls::server(&server, ClientCert::Optional).unwrap()).await;
    let connect = |roots: Vec<boring::x509::X509>| async move {
        let connector = tls::client(None, &roots).unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        tls::connect(&connector, tcp, &Peer::Any, tls::ALPN_HTTP11)
            .await
            .map(|s| tls::peer_id(s.ssl()))
    };
    let pem_roots = |c: &Ca| {
        boring::x509::X509::stack_from_pem(c.all_roots().unwrap().concat().as_bytes()).unwrap()
    };

    // Trusting the other CA explicitly, the server is who it says.
    let id = connect(pem_roots(&other)).await.unwrap();
    assert_eq!(
        id.as_deref(),
        Some("spiffe://cluster.local/ns/default/sa/reviews")
    );
    // Trusting the mesh's roots: refused, whatever the system trusts.
    match connect(pem_roots(&mesh)).await {
        Err(tls::TlsError::Handshake(m)) => assert!(m.contains("certificate"), "{m}"),
        other => panic!("expected a refused certificate, got {other:?}"),
    }
}
