//! Compiles `proto/` in pure Rust (protox: no system `protoc`) and generates the
//! prost messages and tonic clients/servers, plus the encoded descriptor set that
//! server reflection serves.

use std::{env, error::Error, fs, path::PathBuf};

use prost::Message;

const PROTOS: &[&str] = &[
    "inmail/plans/v1/plans.proto",
    "inmail/billing/v1/billing.proto",
    "inmail/messaging/v1/messaging.proto",
    "inmail/testclock/v1/test_clock.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    let proto_root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../proto");
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| proto_root.join(p)).collect();
    let descriptors = protox::compile(&files, [&proto_root])?;

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("inmail_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    // `prost::Name` on every message: request fingerprints include the full
    // proto name, so two RPCs with look-alike requests never share one.
    let mut config = tonic_prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure().compile_fds_with_config(descriptors, config)?;

    println!("cargo:rerun-if-changed={}", proto_root.display());
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    Ok(())
}
