//! Compiles the .proto files with protox (pure Rust: no protoc needed on a
//! fresh machine) and generates prost types and tonic services. Messages get
//! serde derives so that manifests map to them directly (camelCase names,
//! unknown fields rejected, absent fields defaulted).
use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["testbus/v1/resources.proto", "testbus/v1/api.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed=proto/{f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("testbus_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .btree_map(".")
        // Output moves through agent, server and CLI in large chunks:
        // shared, not copied, at each hop.
        .bytes(".testbus.v1.OutputChunk.data")
        .message_attribute(
            ".testbus.v1",
            "#[derive(serde::Serialize, serde::Deserialize)] \
             #[serde(rename_all = \"camelCase\", deny_unknown_fields, default)]",
        )
        .compile_fds(fds)?;
    Ok(())
}
