//! The chains compiled into Switchyard.
//!
//! Each chain is a folder: `<name>/mod.rs` (plus more `.rs` files if it needs them),
//! `<name>/prompts/*.tera` and `<name>/chain.toml`. [`registry`] lists them all with the
//! `code_sha256` of their code as compiled, which the gateway compares with the code of the
//! chain folder (or logged version) it is asked to serve.
//!
//! To add a chain: create the folder (named as the chain's `NAME`), implement `Chain` +
//! `ChainDefinition` in its `mod.rs`, declare the module below and add it to [`registry`] with
//! `entry!(folder::Type)`. See `chains/README.md`.

pub mod router;
pub mod summarize_then_answer;
pub mod support_bot;

use std::path::{Path, PathBuf};

use switchyard_core::{ChainDefinition, ChainEntry, Registry};

include!(concat!(env!("OUT_DIR"), "/code_hashes.rs"));

/// The registry entry of chain `$chain` in module (folder) `$folder`: fails to compile unless
/// the chain's `NAME` is its folder's name (the folder whose code hash the gateway checks
/// logged versions against; a chain named after another chain's folder would be checked
/// against that folder's code).
macro_rules! entry {
    ($folder:ident :: $chain:ident) => {{
        const {
            assert!(
                same(
                    stringify!($folder).as_bytes(),
                    <$folder::$chain as ChainDefinition>::NAME.as_bytes()
                ),
                "a registered chain's NAME must be the name of its folder (module) in chains/"
            );
        }
        entry_of::<$folder::$chain>()
    }};
}

/// Every compiled chain.
pub fn registry() -> Registry {
    Registry::new(vec![
        entry!(support_bot::SupportBot),
        entry!(summarize_then_answer::SummarizeThenAnswer),
        entry!(router::Router),
    ])
}

fn entry_of<C: ChainDefinition>() -> ChainEntry {
    const {
        assert!(
            folder_of(C::NAME).is_some(),
            "a registered chain's module must be a folder of chains/ with a mod.rs (the folder \
             whose code hash the gateway checks logged versions against)"
        );
    }
    let hash = folder_of(C::NAME).map_or("", |index| CODE_SHA256[index].1);
    ChainEntry::of::<C>(hash)
}

/// The index of the chain folder called `name` in [`CODE_SHA256`] (a `const fn`, so that a
/// chain registered under another name than its folder's fails to compile).
const fn folder_of(name: &str) -> Option<usize> {
    let mut index = 0;
    while index < CODE_SHA256.len() {
        if same(CODE_SHA256[index].0.as_bytes(), name.as_bytes()) {
            return Some(index);
        }
        index += 1;
    }
    None
}

const fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

/// The folder of a chain in this source tree (for tests and examples).
pub fn chain_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_chain_has_a_folder_and_the_build_time_hash_matches_the_folder() {
        let registry = registry();
        // Every chain folder is registered (a chain's NAME is its folder's name: checked when
        // this crate compiles).
        let mut registered = registry.names();
        registered.sort_unstable();
        let folders: Vec<&str> = CODE_SHA256.iter().map(|(name, _)| *name).collect();
        assert_eq!(registered, folders);
        for entry in registry.entries() {
            let dir = chain_dir(entry.name);
            let at_run_time = switchyard_core::code_hash::code_sha256(&dir).unwrap();
            assert_eq!(entry.code_sha256, at_run_time, "{}", entry.name);
            assert_eq!(entry.code_sha256.len(), 64);
        }
    }

    #[test]
    fn every_chain_folder_loads_with_its_own_config() {
        let registry = registry();
        for entry in registry.entries() {
            let folder = switchyard_core::ChainFolder::load(&chain_dir(entry.name)).unwrap();
            assert_eq!(folder.chain, entry.name);
            let loaded = folder
                .instantiate(&registry, None, &Default::default())
                .unwrap_or_else(|problems| panic!("{}: {problems:?}", entry.name));
            assert!(loaded.code_matches);
        }
    }
}
