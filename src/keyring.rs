//! The keyring: the long-lived key-encryption keys that protect every object's data key.
//!
//! A keyring file holds one or more 256-bit keys, each with a random 64-bit id. The newest key
//! (the last in the file) wraps the data keys of new objects; every key in the file can unwrap.
//! That is what lets keys rotate without rewriting a single object. Key material never leaves
//! this module in printable form: `Debug` is redacted and the bytes are zeroed on drop.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Key, Nonce};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::durable;

/// The id of a key-encryption key, stored in every object header it wrapped a data key for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub u64);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

impl std::str::FromStr for KeyId {
    type Err = KeyIdError;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        // The text is never echoed: a mistyped keyring may hold key material where an id goes.
        if text.len() != 16 || !text.bytes().all(|byte| byte.is_ascii_hexdigit()) {
            return Err(KeyIdError);
        }
        u64::from_str_radix(text, 16)
            .map(KeyId)
            .map_err(|_| KeyIdError)
    }
}

/// A key id that is not 16 hex digits. It carries no text: see `KeyId::from_str`.
#[derive(Debug, thiserror::Error)]
#[error("a key id is 16 hex digits")]
pub struct KeyIdError;

/// 256 bits of key material, zeroed when dropped and never printed.
#[derive(Clone)]
pub struct SecretKey(Zeroizing<[u8; 32]>);

impl SecretKey {
    pub fn random() -> Self {
        let mut bytes = Zeroizing::new([0u8; 32]);
        getrandom::fill(bytes.as_mut()).expect("the operating system's random source failed");
        SecretKey(bytes)
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        SecretKey(Zeroizing::new(bytes))
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(&Key::<Aes256Gcm>::from(*self.0))
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

/// One key-encryption key.
#[derive(Debug, Clone)]
pub struct KeyringKey {
    pub id: KeyId,
    pub created: String,
    secret: SecretKey,
}

impl KeyringKey {
    /// A short public fingerprint of the key, recorded in the repository identity so that the
    /// wrong keyring is refused before anything is read or written. It reveals nothing of the key.
    pub fn check_value(&self) -> String {
        let hash = blake3::keyed_hash(self.secret.bytes(), b"pitr key check value v1");
        hex::encode(&hash.as_bytes()[..8])
    }

    /// Key material for deriving other keys (chunk ids); never stored or printed.
    pub fn check_value_material(&self) -> [u8; 32] {
        *blake3::keyed_hash(self.secret.bytes(), b"pitr derived key material v1").as_bytes()
    }

    /// Encrypts a data key; `context` (the object header) is authenticated alongside it.
    pub fn wrap(&self, data_key: &SecretKey, context: &[u8]) -> ([u8; 12], [u8; 48]) {
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).expect("the operating system's random source failed");
        let mut buffer = data_key.bytes().to_vec();
        self.secret
            .cipher()
            .encrypt_in_place(&Nonce::from(nonce), context, &mut buffer)
            .expect("AES-GCM encryption of 32 bytes cannot fail");
        let wrapped: [u8; 48] = buffer.try_into().expect("32 bytes plus a 16-byte tag");
        (nonce, wrapped)
    }

    /// Decrypts a data key, or `None` if the wrapped key or its context was altered.
    pub fn unwrap(
        &self,
        nonce: &[u8; 12],
        wrapped: &[u8; 48],
        context: &[u8],
    ) -> Option<SecretKey> {
        let mut buffer = Zeroizing::new(wrapped.to_vec());
        self.secret
            .cipher()
            .decrypt_in_place(&Nonce::from(*nonce), context, &mut *buffer)
            .ok()?;
        Some(SecretKey::from_bytes(buffer[..32].try_into().ok()?))
    }
}

/// The keys of one keyring file, oldest first.
#[derive(Debug, Clone)]
pub struct Keyring {
    pub path: PathBuf,
    keys: Vec<KeyringKey>,
}

#[derive(Serialize, Deserialize)]
struct KeyringFile {
    keys: Vec<KeyringFileEntry>,
}

#[derive(Serialize, Deserialize)]
struct KeyringFileEntry {
    id: String,
    created: String,
    key: String,
}

const KEYRING_PREAMBLE: &str = "# pitr keyring. Keep it secret and keep a copy: without it the repository cannot be read.\n# The last key encrypts new objects; every key listed decrypts.\n";

impl Keyring {
    /// Loads a keyring file, refusing one that other users could read or change. Errors name
    /// a key by its position and, once it parsed, its id: never by text that might be key
    /// material (an id and a key swapped by hand would otherwise echo the key).
    pub fn load(path: &Path) -> Result<Self, KeyringError> {
        let read_error = |error| KeyringError::Read {
            path: path.display().to_string(),
            error,
        };
        // Checked on the open file and read from it: a check of the path followed by a read
        // of the path could be answered by two different files.
        let mut file = std::fs::File::open(path).map_err(read_error)?;
        check_permissions(path, &file.metadata().map_err(read_error)?)?;
        let mut text = Zeroizing::new(String::new());
        std::io::Read::read_to_string(&mut file, &mut text).map_err(read_error)?;
        let malformed = |problem: String| KeyringError::Malformed {
            path: path.display().to_string(),
            problem,
        };
        let file: KeyringFile = toml::from_str(&text).map_err(|error| {
            let line = error
                .span()
                .map(|span| text[..span.start].matches('\n').count() + 1);
            malformed(match line {
                Some(line) => format!("it is not valid TOML (line {line})"),
                None => "it is not valid TOML".to_string(),
            })
        })?;
        let mut keys = Vec::new();
        for (index, entry) in file.keys.iter().enumerate() {
            let position = index + 1;
            let id = entry
                .id
                .parse::<KeyId>()
                .map_err(|_| malformed(format!("the id of key {position} is not 16 hex digits")))?;
            // Id 0 means "no key" in object headers, and an id given twice would make which
            // key unwraps an object depend on the order of the file.
            if id.0 == 0 {
                return Err(malformed(format!(
                    "key {position} has id 0000000000000000, which object headers reserve for \"not encrypted\""
                )));
            }
            if keys.iter().any(|key: &KeyringKey| key.id == id) {
                return Err(malformed(format!(
                    "key {position} repeats the id {id} of an earlier key"
                )));
            }
            let mut bytes = Zeroizing::new([0u8; 32]);
            hex::decode_to_slice(&entry.key, bytes.as_mut())
                .map_err(|_| malformed(format!("key {position} (id {id}) is not 64 hex digits")))?;
            keys.push(KeyringKey {
                id,
                created: entry.created.clone(),
                secret: SecretKey(bytes),
            });
        }
        if keys.is_empty() {
            return Err(malformed("it holds no keys".to_string()));
        }
        Ok(Keyring {
            path: path.to_path_buf(),
            keys,
        })
    }

    /// Writes a new keyring holding one fresh key. Refuses to touch an existing file, because
    /// overwriting a keyring would make every object it protects unreadable.
    pub fn generate(path: &Path) -> Result<Self, KeyringError> {
        let key = KeyringKey {
            id: random_key_id(),
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            secret: SecretKey::random(),
        };
        let keyring = Keyring {
            path: path.to_path_buf(),
            keys: vec![key],
        };
        keyring.write_new_file()?;
        Ok(keyring)
    }

    fn write_new_file(&self) -> Result<(), KeyringError> {
        let entries = self
            .keys
            .iter()
            .map(|key| KeyringFileEntry {
                id: key.id.to_string(),
                created: key.created.clone(),
                key: hex::encode(key.secret.bytes()),
            })
            .collect();
        let body = Zeroizing::new(
            toml::to_string(&KeyringFile { keys: entries }).expect("a keyring always serializes"),
        );
        let write_error = |error| KeyringError::Write {
            path: self.path.display().to_string(),
            error,
        };
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(|error| {
                if error.kind() == std::io::ErrorKind::AlreadyExists {
                    KeyringError::Exists(self.path.display().to_string())
                } else {
                    write_error(error)
                }
            })?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(write_error)?;
        file.write_all(KEYRING_PREAMBLE.as_bytes())
            .and_then(|_| file.write_all(body.as_bytes()))
            .and_then(|_| file.sync_all())
            .map_err(write_error)?;
        durable::sync_parent_directory(&self.path).map_err(write_error)
    }

    /// The key that encrypts new objects.
    pub fn newest(&self) -> &KeyringKey {
        self.keys
            .last()
            .expect("a loaded keyring holds at least one key")
    }

    pub fn find(&self, id: KeyId) -> Option<&KeyringKey> {
        self.keys.iter().find(|key| key.id == id)
    }

    pub fn keys(&self) -> &[KeyringKey] {
        &self.keys
    }
}

/// Refuses a keyring that anyone but its owner could change, or that every user could read,
/// or that belongs to a user other than this one or root (who could swap in their own key). Group-readable is
/// allowed on purpose: Kubernetes mounts a Secret with `defaultMode: 0440` and the pod's
/// fsGroup as its group, and that group is the workload's own.
fn check_permissions(path: &Path, metadata: &std::fs::Metadata) -> Result<(), KeyringError> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let user = unsafe { libc::geteuid() };
    // Root may use a keyring of the service user it acts for (a restore run with sudo).
    if user != 0 && metadata.uid() != user && metadata.uid() != 0 {
        return Err(KeyringError::Owner {
            path: path.display().to_string(),
            owner: metadata.uid(),
            user,
        });
    }
    let mode = metadata.permissions().mode() & 0o777;
    let problem = if mode & 0o002 != 0 {
        "is writable by other users"
    } else if mode & 0o020 != 0 {
        "is writable by its group"
    } else if mode & 0o004 != 0 {
        "is readable by every user"
    } else {
        return Ok(());
    };
    Err(KeyringError::Permissions {
        path: path.display().to_string(),
        problem: format!("{problem} (mode {mode:04o})"),
    })
}

/// A random key id; 0 is reserved in object headers for "not encrypted".
fn random_key_id() -> KeyId {
    loop {
        let id = getrandom::u64().expect("the operating system's random source failed");
        if id != 0 {
            return KeyId(id);
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("cannot read the keyring {path}: {error}; check PITR_KEY_FILE")]
    Read { path: String, error: std::io::Error },
    #[error("cannot write the keyring {path}: {error}")]
    Write { path: String, error: std::io::Error },
    #[error(
        "the keyring {0} already exists; refusing to overwrite it (choose another --output path)"
    )]
    Exists(String),
    #[error("keyring {path} is malformed: {problem}; fix the file, or restore it from your copy")]
    Malformed { path: String, problem: String },
    #[error(
        "keyring {path} {problem}; run chmod 0600 {path} (or 0640 for a group that must read it, such as a Kubernetes fsGroup)"
    )]
    Permissions { path: String, problem: String },
    #[error(
        "keyring {path} belongs to uid {owner}, not to this user (uid {user}) or root, who could swap in a key of their own; give it to the user pitr runs as (chown)"
    )]
    Owner { path: String, owner: u32, user: u32 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_load_and_refuse_overwrite() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("keyring");
        let generated = Keyring::generate(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let loaded = Keyring::load(&path).unwrap();
        assert_eq!(loaded.newest().id, generated.newest().id);
        assert_eq!(
            loaded.newest().check_value(),
            generated.newest().check_value()
        );
        let error = Keyring::generate(&path).unwrap_err().to_string();
        assert!(
            error.contains("already exists; refusing to overwrite"),
            "{error}"
        );
    }

    #[test]
    fn wrapped_keys_are_bound_to_their_context() {
        let directory = tempfile::tempdir().unwrap();
        let keyring = Keyring::generate(&directory.path().join("k")).unwrap();
        let data_key = SecretKey::random();
        let (nonce, wrapped) = keyring.newest().wrap(&data_key, b"header");
        let unwrapped = keyring
            .newest()
            .unwrap(&nonce, &wrapped, b"header")
            .unwrap();
        assert_eq!(unwrapped.bytes(), data_key.bytes());
        assert!(
            keyring
                .newest()
                .unwrap(&nonce, &wrapped, b"other")
                .is_none()
        );
        assert!(!format!("{:?}", keyring).contains(&hex::encode(data_key.bytes())));
    }
}
