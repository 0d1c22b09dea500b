//! The `code_sha256` of a chain folder: what ties a logged chain to the code compiled into a
//! binary. This file has no dependencies but `std` and `sha2`, because the `chains` crate's build
//! script includes it (`#[path]`) to hash the same way at compile time.
//!
//! The hash is SHA-256 over the folder's `.rs` files (any depth), sorted by their relative path
//! with `/` separators; for each file it takes the path, a NUL byte, the length of the contents as
//! 8 little-endian bytes, then the contents. Only code counts: prompts and `chain.toml` may change
//! per logged version without a rebuild.

use std::io;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Hex SHA-256 over the `.rs` files below `dir`.
pub fn code_sha256(dir: &Path) -> io::Result<String> {
    files_sha256(dir, &rs_files(dir)?)
}

/// Hex SHA-256 over the given files (relative to `dir`), hashed as described above. With every
/// file of a logged version it is the version's `content_sha256`.
pub fn files_sha256(dir: &Path, files: &[String]) -> io::Result<String> {
    let mut sorted: Vec<&String> = files.iter().collect();
    sorted.sort();
    let mut hasher = Sha256::new();
    for relative in sorted {
        let contents = std::fs::read(dir.join(relative))?;
        hasher.update(relative.as_bytes());
        hasher.update([0u8]);
        hasher.update((contents.len() as u64).to_le_bytes());
        hasher.update(&contents);
    }
    Ok(hex(&hasher.finalize()))
}

/// The `.rs` files below `dir`, as sorted relative paths with `/` separators.
pub fn rs_files(dir: &Path) -> io::Result<Vec<String>> {
    let mut files = Vec::new();
    collect_files(
        dir,
        dir,
        &|path| path.extension().is_some_and(|e| e == "rs"),
        &mut files,
    )?;
    files.sort();
    Ok(files)
}

/// Every file below `dir`, as sorted relative paths with `/` separators.
pub fn all_files(dir: &Path) -> io::Result<Vec<String>> {
    let mut files = Vec::new();
    collect_files(dir, dir, &|_| true, &mut files)?;
    files.sort();
    Ok(files)
}

fn collect_files(
    root: &Path,
    dir: &Path,
    keep: &dyn Fn(&Path) -> bool,
    files: &mut Vec<String>,
) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path: PathBuf = entry.path();
        let file_type = entry.file_type()?;
        if file_type.is_dir() {
            collect_files(root, &path, keep, files)?;
        } else if file_type.is_file() && keep(&path) {
            let relative = path.strip_prefix(root).map_err(io::Error::other)?;
            let parts: Vec<String> = relative
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            files.push(parts.join("/"));
        }
    }
    Ok(())
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        out.push(char::from(DIGITS[usize::from(byte >> 4)]));
        out.push(char::from(DIGITS[usize::from(byte & 0x0f)]));
    }
    out
}
