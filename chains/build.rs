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
            warn_of_code_outside(&path, &name)?;
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

/// A chain's code hash covers its folder only: a `crate::` path into the rest of the crate
/// (a shared module, another chain) or a file pulled in from outside the folder (`#[path]`,
/// `include!` with `..`) is code a logged version does not hold, which may change without its
/// hash changing. Said at build time, since nothing else would say it. (A `super::` out of the
/// chain's module is not caught: telling it from one out of an inline `mod tests` needs a parser.)
fn warn_of_code_outside(dir: &Path, chain: &str) -> Result<(), Box<dyn std::error::Error>> {
    for file in code_hash::rs_files(dir)? {
        let text = std::fs::read_to_string(dir.join(&file))?;
        for (n, line) in text.lines().enumerate() {
            let via_crate = line.match_indices("crate::").any(|(at, _)| {
                let rest = &line[at + "crate::".len()..];
                let own = rest
                    .strip_prefix(chain)
                    .is_some_and(|r| r.starts_with("::"));
                // `switchyard_core::…` and the like are other crates, not this one.
                let other_crate = line[..at].ends_with(|c: char| c == '_' || c.is_alphanumeric());
                !(own || other_crate || rest.starts_with("chain_dir("))
            });
            let pulls_a_file = ["#[path", "include!(", "include_str!(", "include_bytes!("]
                .iter()
                .any(|form| line.contains(form));
            let via_file = pulls_a_file && (line.contains("\"..") || line.contains("../"));
            if via_crate || via_file {
                println!(
                    "cargo:warning=chains/{chain}/{file}:{}: uses code outside the chain's folder, \
                     which its code_sha256 does not cover (a logged version would not hold it)",
                    n + 1
                );
            }
        }
    }
    Ok(())
}
