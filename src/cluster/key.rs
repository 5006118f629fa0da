//! The cluster key: 32 random bytes shared by both nodes, stored as 64 hex characters in
//! `cluster.key` (mode 0600). It authenticates heartbeats, replication and the peer API.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;

/// Length of the key in bytes.
pub const KEY_BYTES: usize = 32;
/// Length of the key file's text: 64 hex characters (a trailing newline is allowed).
const KEY_HEX_CHARS: usize = 2 * KEY_BYTES;
/// Longest key file read: anything longer is malformed, and a huge file is never read whole.
const KEY_FILE_BYTES_MAX: u64 = 256;

/// The cluster key. `Debug` never prints it, so it cannot leak into logs.
#[derive(Clone)]
pub struct ClusterKey([u8; KEY_BYTES]);

impl ClusterKey {
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> ClusterKey {
        ClusterKey(bytes)
    }

    /// A fresh key from the operating system's random generator.
    pub fn generate() -> ClusterKey {
        let mut bytes = [0u8; KEY_BYTES];
        rand::rngs::OsRng.fill_bytes(&mut bytes);
        ClusterKey(bytes)
    }

    pub(crate) fn as_bytes(&self) -> &[u8; KEY_BYTES] {
        &self.0
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(<redacted>)")
    }
}

/// Why the cluster key could not be created or loaded: one sentence each.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{} already exists: refusing to overwrite the cluster key (remove it first if you really want a new one, then copy the new file to the other node)", .path.display())]
    Exists { path: PathBuf },
    #[error("cannot create the cluster key {}: {source}", .path.display())]
    Create { path: PathBuf, source: io::Error },
    #[error("the cluster key {} does not exist; run `hamirror cluster genkey` on one node and copy the file to the other", .path.display())]
    Missing { path: PathBuf },
    #[error("cannot read the cluster key {}: {source}", .path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("the cluster key {} is not 64 hexadecimal characters; create a new one with `hamirror cluster genkey` and copy it to both nodes", .path.display())]
    Malformed { path: PathBuf },
    #[error("the cluster key {} is {access} by other users (mode {mode:04o}); run chmod 600 {}", .path.display(), .path.display())]
    TooOpen { path: PathBuf, access: &'static str, mode: u32 },
}

/// Write a new random key to `path` (64 hex characters and a newline, mode 0600).
/// An existing file is never overwritten: both nodes must keep the same key.
pub fn genkey(path: &Path) -> Result<(), KeyError> {
    let key = ClusterKey::generate();
    let mut text = hex::encode(key.as_bytes());
    text.push('\n');
    let mut file = match OpenOptions::new().write(true).create_new(true).mode(0o600).open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(KeyError::Exists { path: path.to_path_buf() })
        }
        Err(source) => return Err(KeyError::Create { path: path.to_path_buf(), source }),
    };
    file.write_all(text.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|source| KeyError::Create { path: path.to_path_buf(), source })
}

/// Read the key at `path`, refusing a file that other users can read or write.
pub fn load_key(path: &Path) -> Result<ClusterKey, KeyError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(KeyError::Missing { path: path.to_path_buf() }),
        Err(source) => return Err(KeyError::Read { path: path.to_path_buf(), source }),
    };
    // The mode is taken from the open file, so it is the mode of what is read.
    let meta = file.metadata().map_err(|source| KeyError::Read { path: path.to_path_buf(), source })?;
    if !meta.is_file() {
        return Err(KeyError::Read {
            path: path.to_path_buf(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "it is not a regular file"),
        });
    }
    let mode = meta.mode() & 0o7777;
    let access = if mode & 0o044 != 0 {
        Some("readable")
    } else if mode & 0o022 != 0 {
        Some("writable")
    } else {
        None
    };
    if let Some(access) = access {
        return Err(KeyError::TooOpen { path: path.to_path_buf(), access, mode });
    }
    let mut text = String::new();
    file.take(KEY_FILE_BYTES_MAX).read_to_string(&mut text).map_err(|source| match source.kind() {
        io::ErrorKind::InvalidData => KeyError::Malformed { path: path.to_path_buf() },
        _ => KeyError::Read { path: path.to_path_buf(), source },
    })?;
    let hex_text = text.trim_end_matches(['\n', '\r']);
    let mut bytes = [0u8; KEY_BYTES];
    if hex_text.len() != KEY_HEX_CHARS || hex::decode_to_slice(hex_text, &mut bytes).is_err() {
        return Err(KeyError::Malformed { path: path.to_path_buf() });
    }
    Ok(ClusterKey(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    // A generated key is private to root, loads back, and is never overwritten.
    #[test]
    fn genkey_writes_a_private_key_that_loads_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        genkey(&path).unwrap();
        let meta = fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let text = fs::read_to_string(&path).unwrap();
        assert_eq!(text.len(), 65);
        assert!(text.ends_with('\n'));
        let key = load_key(&path).unwrap();
        assert_eq!(hex::encode(key.as_bytes()), text.trim_end());
        let err = genkey(&path).unwrap_err();
        assert!(matches!(err, KeyError::Exists { .. }), "{err}");
        assert_eq!(fs::read_to_string(&path).unwrap(), text, "the existing key must be kept");
    }

    // Debug output of a key never contains the key.
    #[test]
    fn debug_does_not_print_the_key() {
        let key = ClusterKey::from_bytes([0xab; KEY_BYTES]);
        let shown = format!("{key:?}");
        assert!(!shown.to_lowercase().contains("ab"), "{shown}");
    }

    // A missing, malformed or world-readable key file gives one clear sentence each.
    #[test]
    fn load_key_rejects_missing_malformed_and_open_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.key");
        let err = load_key(&path).unwrap_err();
        assert!(matches!(err, KeyError::Missing { .. }));
        assert!(err.to_string().contains("hamirror cluster genkey"), "{err}");

        let write = |text: &[u8], mode: u32| {
            fs::write(&path, text).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        };
        for bad in [&b"abcd\n"[..], &[b'g'; 64][..], &[b'a'; 66][..], &[0xff; 64][..], b""] {
            write(bad, 0o600);
            let err = load_key(&path).unwrap_err();
            assert!(matches!(err, KeyError::Malformed { .. }), "{err}");
        }

        write(&[b'a'; 64], 0o644);
        let err = load_key(&path).unwrap_err();
        let sentence = err.to_string();
        assert!(sentence.contains("is readable by other users (mode 0644); run chmod 600"), "{sentence}");
        write(&[b'a'; 64], 0o620);
        let err = load_key(&path).unwrap_err();
        assert!(err.to_string().contains("writable"), "{err}");

        let err = load_key(dir.path()).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");

        write(&[b'a'; 64], 0o600);
        assert_eq!(load_key(&path).unwrap().as_bytes(), &[0xaa; KEY_BYTES]);
        write(b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\r\n", 0o400);
        assert_eq!(load_key(&path).unwrap().as_bytes(), &[0xaa; KEY_BYTES]);
    }
}
