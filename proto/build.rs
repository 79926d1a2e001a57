//! Generates the gRPC types from proto/overlay.proto with protox (pure Rust), so no
//! system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/overlay.proto");
    let fds = protox::compile(["proto/overlay.proto"], ["proto"])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
