//! Compiles Istio's CA proto with a vendored protoc, so no system protoc is needed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let include = protoc_bin_vendored::include_path()?;
    // prost-build finds protoc through PROTOC; a build script is one process of its own.
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto");
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .extern_path(".google.protobuf.Struct", "::prost_types::Struct")
        .compile_protos(
            &[PathBuf::from("proto/istio/v1/auth/ca.proto")],
            &[PathBuf::from("proto"), include],
        )?;
    Ok(())
}
