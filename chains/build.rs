//! Computes each chain folder's `code_sha256` at compile time, with the same function the
//! loader uses at run time (included from `switchyard-core`), so the registry knows the hash of
//! the code compiled into this binary.

#[allow(dead_code)]
#[path = "../crates/core/src/code_hash.rs"]
mod code_hash;

use std::fmt::Write as _;
use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    println!("cargo:rerun-if-changed={}", root.display());
    let mut chains = Vec::new();
    for entry in std::fs::read_dir(root)? {
        let path = entry?.path();
        if path.join("mod.rs").is_file() {
            println!("cargo:rerun-if-changed={}", path.display());
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            chains.push((name, code_hash::code_sha256(&path)?));
        }
    }
    chains.sort();
    let mut out = String::from(
        "/// `code_sha256` of each chain folder, computed by build.rs.\nconst CODE_SHA256: &[(&str, &str)] = &[\n",
    );
    for (name, hash) in &chains {
        writeln!(out, "    ({name:?}, {hash:?}),")?;
    }
    out.push_str("];\n");
    let out_dir = std::env::var("OUT_DIR")?;
    std::fs::write(Path::new(&out_dir).join("code_hashes.rs"), out)?;
    Ok(())
}
