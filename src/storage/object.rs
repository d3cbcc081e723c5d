//! The storage contract over object_store, for every URL scheme pitr takes: the builders and
//! their retry and timeout settings, the fsyncing local store, and create-only writes retried
//! with a look at whether the name exists.
//!
//! On the local filesystem object_store does not fsync what it has not written itself, so
//! this module does: an object is reported stored only once its data and every directory on
//! its path are durable.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use object_store::path::Path;
use object_store::{
    BackoffConfig, ClientConfigKey, GetResultPayload, ObjectMeta, ObjectStore, ObjectStoreExt,
    PutMode, PutOptions, PutPayload, RetryConfig,
};

use super::{
    Body, Durability, ObjectInfo, ObjectVersion, PutOutcome, Storage, StorageError, StorageResult,
    one_line,
};

/// What a store is built from besides its URL: the `[store]` options and the deadlines.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Every operation's deadline.
    pub timeout: Duration,
    /// object_store options, e.g. `aws_endpoint = "http://127.0.0.1:9000"`.
    pub options: BTreeMap<String, String>,
    /// Whether S3 may ask the instance metadata endpoint for credentials.
    pub instance_metadata: bool,
}

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A URL or option the builder refused, or an unknown scheme.
    #[error("{0}")]
    BadUrl(String),
    /// A `file://` URL that does not name a local directory.
    #[error("{0}")]
    LocalPath(String),
    #[error("cannot create the repository directory {}: {error}", root.display())]
    CreateRoot { root: PathBuf, error: io::Error },
    #[error("{0}")]
    NoCredentials(String),
}

/// Retries of a failed create-only write (`put_create_only`), as many as object_store makes.
const CREATE_RETRIES: u32 = 10;
const CREATE_RETRY_BACKOFF: Duration = Duration::from_millis(100);
const CREATE_RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Every scheme's store behind the contract.
pub struct ObjectStorage {
    store: Arc<dyn ObjectStore>,
    /// The same store without object_store's own retries, for create-only writes (see
    /// `put_create_only`). On `file://` it is the fsyncing store.
    create_store: Arc<dyn ObjectStore>,
    prefix: Path,
    /// The directory behind a `file://` store, which this module must fsync itself.
    local_root: Option<PathBuf>,
    /// For messages: the URL the store was opened with.
    url: String,
    timeout: Duration,
}

impl ObjectStorage {
    /// Builds the store a URL names. Nothing is read or written yet, except that a `file://`
    /// directory is created if missing.
    pub fn open(url_text: &str, config: &StoreConfig) -> Result<Self, OpenError> {
        let bad_url = |reason: String| OpenError::BadUrl(reason);
        let url = url::Url::parse(url_text).map_err(|error| bad_url(error.to_string()))?;
        let prefix = Path::from(url.path().trim_start_matches('/'));
        let retrying = retry_config(config.timeout);
        let once = RetryConfig {
            max_retries: 0,
            ..retry_config(config.timeout)
        };
        let built = |result: Result<Arc<dyn ObjectStore>, RemoteBuildError>| {
            result.map_err(|error| match error {
                RemoteBuildError::Store(error) => bad_url(error.to_string()),
                RemoteBuildError::NoCredentials(detail) => OpenError::NoCredentials(detail),
            })
        };
        let remote = |build: RemoteBuilder| -> Result<[Arc<dyn ObjectStore>; 2], OpenError> {
            let store = built(build(url_text, config, retrying.clone()))?;
            let create_store = built(build(url_text, config, once.clone()))?;
            Ok([store, create_store])
        };
        let ([store, create_store], prefix, local_root) = match url.scheme() {
            "file" => {
                let root = local_root(&url).map_err(OpenError::LocalPath)?;
                create_local_root(&root).map_err(|error| OpenError::CreateRoot {
                    root: root.clone(),
                    error,
                })?;
                let local = |fsync: bool| -> Result<Arc<dyn ObjectStore>, OpenError> {
                    Ok(Arc::new(
                        object_store::local::LocalFileSystem::new_with_prefix(&root)
                            .map_err(|error| bad_url(error.to_string()))?
                            .with_automatic_cleanup(true)
                            .with_fsync(fsync),
                    ))
                };
                // Create-only writes fsync the staged file before linking it under its name,
                // so no object is ever visible there before it is durable (a crash once left
                // empty objects that blocked every re-push). Reads and deferred writes, which
                // one syncfs makes durable, skip the per-object fsyncs.
                ([local(false)?, local(true)?], Path::default(), Some(root))
            }
            "s3" | "s3a" => (remote(build_s3)?, prefix, None),
            "gs" => (remote(build_gcs)?, prefix, None),
            "az" | "azure" | "abfs" | "abfss" => (remote(build_azure)?, prefix, None),
            other => return Err(bad_url(format!("the scheme '{other}' is not supported"))),
        };
        Ok(ObjectStorage {
            store,
            create_store,
            prefix,
            local_root,
            url: url_text.to_string(),
            timeout: config.timeout,
        })
    }

    /// An empty store in memory, for unit tests: the same contract, nothing on disk.
    pub fn memory(timeout: Duration) -> Self {
        let store: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
        ObjectStorage {
            create_store: store.clone(),
            store,
            prefix: Path::default(),
            local_root: None,
            url: "memory:///".to_string(),
            timeout,
        }
    }

    fn location(&self, key: &str) -> Path {
        Path::from(format!("{}/{key}", self.prefix).trim_start_matches('/'))
    }

    /// The key of a stored object, relative to the store's prefix.
    fn relative_key(&self, location: &Path) -> String {
        let full = location.as_ref();
        full.strip_prefix(self.prefix.as_ref())
            .map(|rest| rest.trim_start_matches('/'))
            .unwrap_or(full)
            .to_string()
    }

    fn info(&self, meta: ObjectMeta) -> ObjectInfo {
        ObjectInfo {
            key: self.relative_key(&meta.location),
            size: meta.size,
            version: ObjectVersion {
                e_tag: meta.e_tag,
                version: meta.version,
            },
        }
    }

    /// Runs one store operation under the deadline, so a stalled store fails the caller in
    /// bounded time instead of hanging it.
    async fn bounded<T>(
        &self,
        operation: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> StorageResult<T> {
        match tokio::time::timeout(self.timeout, operation).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(from_store(error)),
            Err(_) => Err(StorageError::TimedOut(self.timeout)),
        }
    }

    /// One create-only write, retried here rather than inside object_store, because between
    /// attempts it asks whether the name exists. Some stores answer a create-only write of a
    /// taken name by closing the connection before reading the body (s3s-fs does, and a server
    /// that stops reading a request it refuses may reset it), which the client sees as a
    /// failure to send. Retried blindly, as object_store does, the whole body went out up to
    /// ten more times with backoff: an identical re-push took up to 5 s instead of 0.1 s, and
    /// could miss its deadline. A lost response can also hide a write that landed. Either way
    /// the name exists now, and the caller compares contents, which settles both safely.
    async fn put_create_only(
        &self,
        key: &str,
        location: &Path,
        payload: PutPayload,
        store: &Arc<dyn ObjectStore>,
    ) -> StorageResult<PutOutcome> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut backoff = CREATE_RETRY_BACKOFF;
        let mut retries = 0;
        loop {
            let options = PutOptions {
                mode: PutMode::Create,
                ..PutOptions::default()
            };
            let put = store.put_opts(location, payload.clone(), options);
            let error = match tokio::time::timeout_at(deadline, put).await {
                Ok(Ok(_)) => return Ok(PutOutcome::Created),
                Ok(Err(object_store::Error::AlreadyExists { .. })) => {
                    return Ok(PutOutcome::AlreadyExists);
                }
                Ok(Err(error)) => error,
                Err(_) => return Err(StorageError::TimedOut(self.timeout)),
            };
            if self.exists_before(location, deadline).await {
                return Ok(PutOutcome::AlreadyExists);
            }
            let retry_at = tokio::time::Instant::now() + backoff;
            let error = from_store(error);
            if !matches!(error, StorageError::Unreachable(_))
                || retries == CREATE_RETRIES
                || retry_at >= deadline
            {
                return Err(error);
            }
            tracing::info!(key, "writing failed ({error}); retrying");
            tokio::time::sleep_until(retry_at).await;
            backoff = (backoff * 2).min(CREATE_RETRY_BACKOFF_MAX);
            retries += 1;
        }
    }

    /// Whether an object exists at `location`; false also when the store cannot say by
    /// `deadline`.
    async fn exists_before(&self, location: &Path, deadline: tokio::time::Instant) -> bool {
        matches!(
            tokio::time::timeout_at(deadline, self.store.head(location)).await,
            Ok(Ok(_))
        )
    }

    fn sync_if_local(&self, key: &str) -> StorageResult<()> {
        let Some(root) = &self.local_root else {
            return Ok(());
        };
        sync_local_object(root, &self.location(key)).map_err(|source| StorageError::Sync {
            key: key.to_string(),
            source,
        })
    }

    /// Ends a body stream with `Unreachable` when the store sends nothing for a whole timeout.
    fn guard_stalls(
        &self,
        body: BoxStream<'static, object_store::Result<Bytes>>,
    ) -> BoxStream<'static, StorageResult<Bytes>> {
        let (timeout, url) = (self.timeout, self.url.clone());
        futures::stream::unfold(Some(body), move |body| {
            let url = url.clone();
            async move {
                let mut body = body?;
                match tokio::time::timeout(timeout, body.next()).await {
                    Ok(Some(Ok(bytes))) => Some((Ok(bytes), Some(body))),
                    Ok(Some(Err(error))) => Some((Err(from_store(error)), None)),
                    Ok(None) => None,
                    Err(_) => Some((
                        Err(StorageError::Unreachable(format!(
                            "{url} stalled for {} s while sending an object",
                            timeout.as_secs()
                        ))),
                        None,
                    )),
                }
            }
        })
        .boxed()
    }
}

impl Storage for ObjectStorage {
    fn put_create<'a>(
        &'a self,
        key: &'a str,
        parts: Vec<Bytes>,
        durability: Durability,
    ) -> BoxFuture<'a, StorageResult<PutOutcome>> {
        async move {
            let immediate = durability == Durability::Immediate;
            let location = self.location(key);
            let store = match (immediate, self.is_local()) {
                (false, true) => &self.store,
                _ => &self.create_store,
            };
            let payload: PutPayload = parts.into_iter().collect();
            let outcome = self.put_create_only(key, &location, payload, store).await?;
            // A name already taken may hold the object of a writer that died before its fsync
            // (an older pitr, or a deferred write), so it is made durable now, before anyone
            // reports it stored. A new object on `file://` was made durable by the write.
            if immediate && outcome == PutOutcome::AlreadyExists {
                self.sync_if_local(key)?;
            }
            Ok(outcome)
        }
        .boxed()
    }

    fn update<'a>(
        &'a self,
        key: &'a str,
        parts: Vec<Bytes>,
        expected: &'a ObjectVersion,
    ) -> BoxFuture<'a, StorageResult<()>> {
        async move {
            let location = self.location(key);
            let payload: PutPayload = parts.into_iter().collect();
            // object_store's local store has no conditional update: check the version, then
            // rename a complete, fsynced staged file over the old one, both under a lock every
            // updating pitr takes, so two updates of one version cannot both succeed.
            let _lock = match &self.local_root {
                Some(root) => Some(update_lock(root)?),
                None => None,
            };
            let mode = if self.is_local() {
                let current = self.bounded(self.store.head(&location)).await;
                let current = match current {
                    Err(StorageError::NotFound) => None,
                    other => Some(self.info(other?).version),
                };
                if current.as_ref() != Some(expected) {
                    return Err(StorageError::Precondition(format!(
                        "{key} is no longer at the version to be replaced"
                    )));
                }
                PutMode::Overwrite
            } else {
                PutMode::Update(object_store::UpdateVersion {
                    e_tag: expected.e_tag.clone(),
                    version: expected.version.clone(),
                })
            };
            let options = PutOptions {
                mode,
                ..PutOptions::default()
            };
            let put = self.create_store.put_opts(&location, payload, options);
            self.bounded(put).await.map(|_| ())
        }
        .boxed()
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StorageResult<Body>> {
        async move {
            let result = self.bounded(self.store.get(&self.location(key))).await?;
            Ok(match result.payload {
                GetResultPayload::File(file, _) => Body::File(file),
                GetResultPayload::Stream(body) => Body::Stream(self.guard_stalls(body)),
            })
        }
        .boxed()
    }

    fn get_bytes<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StorageResult<Bytes>> {
        async move {
            let location = self.location(key);
            let read = async { self.store.get(&location).await?.bytes().await };
            self.bounded(read).await
        }
        .boxed()
    }

    fn get_bytes_versioned<'a>(
        &'a self,
        key: &'a str,
    ) -> BoxFuture<'a, StorageResult<(Bytes, ObjectVersion)>> {
        async move {
            let location = self.location(key);
            let read = async {
                let result = self.store.get(&location).await?;
                let version = ObjectVersion {
                    e_tag: result.meta.e_tag.clone(),
                    version: result.meta.version.clone(),
                };
                Ok((result.bytes().await?, version))
            };
            self.bounded(read).await
        }
        .boxed()
    }

    fn head<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StorageResult<ObjectInfo>> {
        async move {
            let meta = self.bounded(self.store.head(&self.location(key))).await?;
            Ok(self.info(meta))
        }
        .boxed()
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, StorageResult<Vec<ObjectInfo>>> {
        async move {
            let location = self.location(prefix);
            let listing = self.store.list(Some(&location)).collect::<Vec<_>>();
            let listing = tokio::time::timeout(self.timeout, listing)
                .await
                .map_err(|_| StorageError::TimedOut(self.timeout))?;
            let mut objects = listing
                .into_iter()
                .map(|meta| meta.map(|meta| self.info(meta)))
                .collect::<object_store::Result<Vec<_>>>()
                .map_err(from_store)?;
            // The local store lists in no order.
            objects.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(objects)
        }
        .boxed()
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StorageResult<()>> {
        async move {
            match self.bounded(self.store.delete(&self.location(key))).await {
                Err(StorageError::NotFound) => Ok(()),
                other => other,
            }
        }
        .boxed()
    }

    fn delete_many(&self, keys: Vec<String>) -> BoxFuture<'_, StorageResult<()>> {
        async move {
            let locations: Vec<object_store::Result<Path>> =
                keys.iter().map(|key| Ok(self.location(key))).collect();
            let mut deleted = self
                .store
                .delete_stream(futures::stream::iter(locations).boxed());
            loop {
                match tokio::time::timeout(self.timeout, deleted.next()).await {
                    Err(_) => return Err(StorageError::TimedOut(self.timeout)),
                    Ok(None) => return Ok(()),
                    Ok(Some(Ok(_))) => {}
                    Ok(Some(Err(error))) => match from_store(error) {
                        StorageError::NotFound => {}
                        other => return Err(other),
                    },
                }
            }
        }
        .boxed()
    }

    /// On `file://` one `syncfs` of the store's filesystem flushes every deferred write (and
    /// reports any writeback error since the writes); a remote store acknowledged each write
    /// as durable already.
    fn sync_deferred(&self) -> BoxFuture<'_, StorageResult<()>> {
        async move {
            let Some(root) = self.local_root.clone() else {
                return Ok(());
            };
            tokio::task::spawn_blocking(move || crate::durable::sync_filesystem(&root))
                .await
                .expect("the sync task does not panic")
                .map_err(|source| StorageError::Sync {
                    key: String::new(),
                    source,
                })
        }
        .boxed()
    }

    fn make_durable<'a>(&'a self, key: &'a str) -> BoxFuture<'a, StorageResult<()>> {
        async move { self.sync_if_local(key) }.boxed()
    }

    fn is_local(&self) -> bool {
        self.local_root.is_some()
    }

    fn exists_locally(&self, key: &str) -> bool {
        self.local_root
            .as_ref()
            .is_some_and(|root| root.join(self.location(key).as_ref()).is_file())
    }
}

/// Keeps the store's error kind: only a store that could not be reached (a transport
/// failure, a server error) is `Unreachable`, which is what the outage spool waits out. A
/// refusal of the credentials would never heal by waiting.
fn from_store(error: object_store::Error) -> StorageError {
    match error {
        object_store::Error::NotFound { .. } => StorageError::NotFound,
        object_store::Error::AlreadyExists { .. } => StorageError::AlreadyExists,
        object_store::Error::Precondition { .. } | object_store::Error::NotModified { .. } => {
            StorageError::Precondition(one_line(&error))
        }
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => StorageError::Denied(one_line(&error)),
        object_store::Error::Generic { .. } => match classify_generic(&error) {
            GenericKind::Outage => StorageError::Unreachable(one_line(&error)),
            GenericKind::Denied => StorageError::Denied(one_line(&error)),
            GenericKind::Refused => StorageError::Unsupported(one_line(&error)),
        },
        other => StorageError::Unsupported(one_line(&other)),
    }
}

/// What an object_store `Generic` error means for the caller. object_store gives 401, 403,
/// 404, 409 and 412 their own kinds and folds every other failure into `Generic`: a transport
/// failure, a timeout, a 5xx, but also a 400 that S3 sends for an expired session token, and
/// a failure to obtain credentials at all.
enum GenericKind {
    /// The store could not be reached or failed on its side: waiting may help.
    Outage,
    /// The credentials were refused or could not be obtained: waiting never helps.
    Denied,
    /// The store refused the request for another reason.
    Refused,
}

/// S3 error codes that mean the credentials, not the store, are the problem.
const CREDENTIAL_ERROR_CODES: [&str; 9] = [
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AuthorizationHeaderMalformed",
    "InvalidSecurity",
    "AccessDenied",
    "AccountProblem",
];

fn classify_generic(error: &object_store::Error) -> GenericKind {
    let text = one_line(error);
    if CREDENTIAL_ERROR_CODES
        .iter()
        .any(|code| text.contains(code))
        || text.to_ascii_lowercase().contains("credential")
    {
        return GenericKind::Denied;
    }
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        if current
            .downcast_ref::<object_store::client::HttpError>()
            .is_some()
        {
            return GenericKind::Outage;
        }
        if let Some(io) = current.downcast_ref::<io::Error>() {
            return match io.kind() {
                io::ErrorKind::PermissionDenied => GenericKind::Denied,
                _ => GenericKind::Outage,
            };
        }
        cause = current.source();
    }
    // An HTTP status, as object_store words it: a server error or throttling is an outage,
    // any other client error a refusal.
    match text
        .split("status code: ")
        .nth(1)
        .and_then(|rest| rest.get(..3))
    {
        Some(code) if code.starts_with('5') || code == "429" => GenericKind::Outage,
        Some(code) if code.starts_with('4') => GenericKind::Refused,
        _ => GenericKind::Outage,
    }
}

/// An exclusive lock on `tmp/.update.lock` in a `file://` store, released when dropped.
fn update_lock(root: &FsPath) -> StorageResult<std::fs::File> {
    let directory = root.join("tmp");
    let locked = std::fs::create_dir_all(&directory).and_then(|()| {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(directory.join(".update.lock"))?;
        file.lock()?;
        Ok(file)
    });
    locked.map_err(|error| {
        StorageError::Unsupported(format!(
            "cannot lock {} for an update: {error}",
            directory.display()
        ))
    })
}

/// The directory a `file://` URL names, percent-decoded. A host is refused rather than
/// dropped: `file://tmp/x` is a typo for `file:///tmp/x`, and would otherwise land in `/x`.
fn local_root(url: &url::Url) -> Result<PathBuf, String> {
    if let Some(host) = url.host_str().filter(|host| !host.is_empty()) {
        return Err(format!(
            "a file:// URL names a local path, not the host '{host}'; write file:///path (three slashes)"
        ));
    }
    url.to_file_path()
        .map_err(|()| "it does not name an absolute local path; write file:///path".to_string())
}

/// Creates a `file://` store's directory, 0700 like every directory pitr makes there, and
/// makes its entry durable. The umask (`main` sets 077) keeps object_store's own files and
/// directories private too.
fn create_local_root(root: &FsPath) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if root.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(root)?;
    match root.parent() {
        Some(parent) => std::fs::File::open(parent)?.sync_all(),
        None => Ok(()),
    }
}

/// Makes a stored local object durable: its data, then each directory from it up to the root.
fn sync_local_object(root: &FsPath, location: &Path) -> io::Result<()> {
    let path = root.join(location.as_ref());
    std::fs::File::open(&path)?.sync_all()?;
    let mut directory = path.parent();
    while let Some(current) = directory {
        std::fs::File::open(current)?.sync_all()?;
        if current == root {
            break;
        }
        directory = current.parent();
    }
    Ok(())
}

type RemoteBuilder =
    fn(&str, &StoreConfig, RetryConfig) -> Result<Arc<dyn ObjectStore>, RemoteBuildError>;

/// Why a remote store could not be built: a bad URL or option, or no credentials to use.
enum RemoteBuildError {
    Store(object_store::Error),
    NoCredentials(String),
}

impl From<object_store::Error> for RemoteBuildError {
    fn from(error: object_store::Error) -> Self {
        RemoteBuildError::Store(error)
    }
}

fn retry_config(timeout: Duration) -> RetryConfig {
    RetryConfig {
        backoff: BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            base: 2.0,
        },
        max_retries: 10,
        retry_timeout: timeout,
    }
}

/// Request timeouts, set key by key: replacing the whole `ClientOptions` would drop what the
/// builder read from the environment (`AWS_ALLOW_HTTP`, proxies, ...).
fn client_timeouts(timeout: Duration) -> [(ClientConfigKey, String); 2] {
    let connect = timeout.min(Duration::from_secs(5));
    [
        (
            ClientConfigKey::ConnectTimeout,
            format!("{}ms", connect.as_millis()),
        ),
        (
            ClientConfigKey::Timeout,
            format!("{}ms", timeout.as_millis()),
        ),
    ]
}

fn build_s3(
    url: &str,
    config: &StoreConfig,
    retry: RetryConfig,
) -> Result<Arc<dyn ObjectStore>, RemoteBuildError> {
    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
    let mut builder = AmazonS3Builder::from_env().with_url(url).with_retry(retry);
    for (key, value) in client_timeouts(config.timeout) {
        builder = builder.with_config(AmazonS3ConfigKey::Client(key), value);
    }
    for (key, value) in &config.options {
        builder = builder.with_config(key.parse::<AmazonS3ConfigKey>()?, value);
    }
    let source = s3_credential_source(&builder);
    if source == S3_INSTANCE_METADATA && !config.instance_metadata {
        return Err(RemoteBuildError::NoCredentials("none are configured and the instance metadata endpoint is turned off (store_instance_metadata = false); set aws_access_key_id and aws_secret_access_key in [store] (or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY), or use a web identity".to_string()));
    }
    // Once per process: the daemon and the backup open the store more than once.
    static LOGGED: std::sync::Once = std::sync::Once::new();
    LOGGED.call_once(|| tracing::info!(repository = url, "S3 credentials: {source}"));
    Ok(Arc::new(builder.build()?))
}

const S3_INSTANCE_METADATA: &str = "the instance metadata endpoint (no other credentials are configured; store_instance_metadata = false turns this off)";

/// Which credentials object_store will use, in the order it tries them. Without any, it asks
/// the instance metadata endpoint, which outside a cloud VM only times out: worth saying.
fn s3_credential_source(builder: &object_store::aws::AmazonS3Builder) -> &'static str {
    use object_store::aws::AmazonS3ConfigKey;
    let set = |key: AmazonS3ConfigKey| {
        builder
            .get_config_value(&key)
            .is_some_and(|v| !v.is_empty())
    };
    let environment = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    let unsigned = builder.get_config_value(&AmazonS3ConfigKey::SkipSignature);
    if unsigned.is_some_and(|value| value == "true") {
        "none: requests are unsigned (aws_skip_signature)"
    } else if set(AmazonS3ConfigKey::AccessKeyId) && set(AmazonS3ConfigKey::SecretAccessKey) {
        "a static access key (aws_access_key_id or AWS_ACCESS_KEY_ID)"
    } else if environment("AWS_WEB_IDENTITY_TOKEN_FILE") && environment("AWS_ROLE_ARN") {
        "a web identity token (AWS_WEB_IDENTITY_TOKEN_FILE and AWS_ROLE_ARN)"
    } else if set(AmazonS3ConfigKey::ContainerCredentialsRelativeUri)
        || set(AmazonS3ConfigKey::ContainerCredentialsFullUri)
    {
        "the container credentials endpoint (AWS_CONTAINER_CREDENTIALS_*)"
    } else {
        S3_INSTANCE_METADATA
    }
}

fn build_gcs(
    url: &str,
    config: &StoreConfig,
    retry: RetryConfig,
) -> Result<Arc<dyn ObjectStore>, RemoteBuildError> {
    use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
    let mut builder = GoogleCloudStorageBuilder::from_env()
        .with_url(url)
        .with_retry(retry);
    for (key, value) in client_timeouts(config.timeout) {
        builder = builder.with_config(GoogleConfigKey::Client(key), value);
    }
    for (key, value) in &config.options {
        builder = builder.with_config(key.parse::<GoogleConfigKey>()?, value);
    }
    Ok(Arc::new(builder.build()?))
}

fn build_azure(
    url: &str,
    config: &StoreConfig,
    retry: RetryConfig,
) -> Result<Arc<dyn ObjectStore>, RemoteBuildError> {
    use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
    let mut builder = MicrosoftAzureBuilder::from_env()
        .with_url(url)
        .with_retry(retry);
    for (key, value) in client_timeouts(config.timeout) {
        builder = builder.with_config(AzureConfigKey::Client(key), value);
    }
    for (key, value) in &config.options {
        builder = builder.with_config(key.parse::<AzureConfigKey>()?, value);
    }
    Ok(Arc::new(builder.build()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generic(message: &str) -> object_store::Error {
        object_store::Error::Generic {
            store: "S3",
            source: message.to_string().into(),
        }
    }

    #[test]
    fn only_an_unreachable_store_is_an_outage() {
        let kind = from_store;
        // S3 answers an expired session token with 400, which object_store folds into Generic.
        for denied in [
            "Error performing PUT http://s3/x in 20ms - Server returned non-2xx status code: 400 Bad Request: <Error><Code>ExpiredToken</Code></Error>",
            "Error getting credentials from instance metadata: connection refused",
        ] {
            assert!(
                matches!(kind(generic(denied)), StorageError::Denied(_)),
                "{denied}"
            );
        }
        for outage in [
            "Error performing GET http://s3/x in 5s - Server returned non-2xx status code: 503 Service Unavailable: ",
            "Error performing GET http://s3/x in 5s - Server returned non-2xx status code: 429 Too Many Requests: ",
        ] {
            assert!(
                matches!(kind(generic(outage)), StorageError::Unreachable(_)),
                "{outage}"
            );
        }
        let refused = "Error performing PUT http://s3/x in 2ms - Server returned non-2xx status code: 400 Bad Request: <Error><Code>InvalidArgument</Code></Error>";
        assert!(matches!(
            kind(generic(refused)),
            StorageError::Unsupported(_)
        ));
        let io = object_store::Error::Generic {
            store: "LocalFileSystem",
            source: Box::new(io::Error::from(io::ErrorKind::PermissionDenied)),
        };
        assert!(matches!(kind(io), StorageError::Denied(_)));
    }
}
