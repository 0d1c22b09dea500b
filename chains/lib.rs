//! The chains compiled into Switchyard.
//!
//! Each chain is a folder: `<name>/mod.rs` (plus more `.rs` files if it needs them),
//! `<name>/prompts/*.tera` and `<name>/chain.toml`. [`registry`] lists them all with the
//! `code_sha256` of their code as compiled, which the gateway compares with the code of the
//! chain folder (or logged version) it is asked to serve.
//!
//! To add a chain: create the folder, implement `Chain` + `ChainDefinition` in its `mod.rs`,
//! declare the module below and add it to [`registry`]. See `docs/chains.md`.

pub mod router;
pub mod summarize_then_answer;
pub mod support_bot;

use std::path::{Path, PathBuf};

use switchyard_core::{ChainDefinition, ChainEntry, Registry};

include!(concat!(env!("OUT_DIR"), "/code_hashes.rs"));

/// Every compiled chain.
pub fn registry() -> Registry {
    Registry::new(vec![
        entry::<support_bot::SupportBot>(),
        entry::<summarize_then_answer::SummarizeThenAnswer>(),
        entry::<router::Router>(),
    ])
}

fn entry<C: ChainDefinition>() -> ChainEntry {
    let hash = CODE_SHA256
        .iter()
        .find(|(name, _)| *name == C::NAME)
        .map_or("", |(_, hash)| *hash);
    ChainEntry::of::<C>(hash)
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
        assert_eq!(
            registry.names(),
            ["support_bot", "summarize_then_answer", "router"]
        );
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
