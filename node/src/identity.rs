//! The node's identity: an ed25519 key in the data directory, readable only by its owner.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use libp2p::identity::Keypair;
use tracing::info;

use crate::error::{NodeError, Result};

/// Loads the key at `path`, or creates one (mode 0600) if there is none.
/// Returns the key and whether it was created.
pub fn load_or_create(path: &Path) -> Result<(Keypair, bool)> {
    match std::fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(NodeError::KeyPermissions {
                    path: path.to_owned(),
                    mode,
                });
            }
            let bytes = std::fs::read(path)
                .map_err(|e| NodeError::io("cannot read identity key", path, e))?;
            let key = Keypair::from_protobuf_encoding(&bytes).map_err(|e| NodeError::BadKey {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
            Ok((key, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key.to_protobuf_encoding().map_err(|e| NodeError::BadKey {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
            // Write to a temporary file and rename, so a crash never leaves half a key.
            let tmp = path.with_extension("key.tmp");
            let _ = std::fs::remove_file(&tmp);
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| NodeError::io("cannot create identity key", &tmp, e))?;
            file.write_all(&bytes)
                .and_then(|()| file.sync_all())
                .map_err(|e| NodeError::io("cannot write identity key", &tmp, e))?;
            std::fs::rename(&tmp, path)
                .map_err(|e| NodeError::io("cannot create identity key", path, e))?;
            info!(path = %path.display(), peer_id = %key.public().to_peer_id(), "created a new node identity");
            Ok((key, true))
        }
        Err(e) => Err(NodeError::io("cannot read identity key", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_loaded_with_owner_only_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        let (a, created) = load_or_create(&path).unwrap();
        assert!(created);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (b, created) = load_or_create(&path).unwrap();
        assert!(!created);
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
    }

    #[test]
    fn loose_permissions_and_garbage_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity.key");
        load_or_create(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create(&path).unwrap_err();
        assert!(matches!(err, NodeError::KeyPermissions { mode: 0o644, .. }));
        assert!(err.to_string().contains("chmod 600"));
        std::fs::write(&path, b"not a key").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            load_or_create(&path),
            Err(NodeError::BadKey { .. })
        ));
    }
}
