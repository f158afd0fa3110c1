//! What can go wrong fetching a repository, each said in one line with what to do.

use std::path::PathBuf;

/// A failed fetch. The message names the repository, the file and the remedy; nothing half-written
/// is left under a final name when one of these is returned.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error(
        "{hub} has no repository {repo} at revision {revision} (HTTP {status}); check the name and \
         the revision{token_hint}"
    )]
    NotFound {
        hub: &'static str,
        repo: String,
        revision: String,
        status: u16,
        token_hint: &'static str,
    },

    #[error("{hub} refused {repo} (HTTP {status}): {hint}")]
    Unauthorized {
        hub: &'static str,
        repo: String,
        status: u16,
        hint: String,
    },

    #[error("{hub} answered HTTP {status} for {url}; try again later")]
    Server {
        hub: &'static str,
        url: String,
        status: u16,
    },

    #[error(
        "cannot reach {endpoint} ({why}) and {not_cached}; check the network, or set \
         {endpoint_var} to a mirror"
    )]
    Unreachable {
        endpoint: String,
        endpoint_var: &'static str,
        why: String,
        /// "{repo} is not complete in the cache {dir} (missing …)".
        not_cached: String,
    },

    #[error(
        "{offline_var} is set and {repo} is not complete in the cache {cache} (missing {missing}); \
         unset {offline_var} to download it, or pass a local directory"
    )]
    Offline {
        offline_var: &'static str,
        repo: String,
        cache: PathBuf,
        missing: String,
    },

    #[error(
        "{file} of {repo} arrived damaged: {what}; the partial download was deleted, run the \
         command again to fetch it anew"
    )]
    Integrity {
        repo: String,
        file: String,
        what: String,
    },

    #[error(
        "the connection to {url} dropped after {got} of {size} bytes, {attempts} times; run the \
         command again: it resumes from the {got} bytes kept in {partial}"
    )]
    Interrupted {
        url: String,
        got: u64,
        size: String,
        attempts: usize,
        partial: PathBuf,
    },

    #[error(
        "disk full writing {path}; free space (or point {cache_var} at a larger disk) and run \
         again: the download resumes from what is on disk"
    )]
    DiskFull {
        path: PathBuf,
        cache_var: &'static str,
    },

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error(
        "{repo} is not a Qwen2 model: its config.json has model_type {model_type:?} and \
         architectures {architectures:?}; ferrolora loads Qwen2 / Qwen2.5 models"
    )]
    NotQwen2 {
        repo: String,
        model_type: Option<String>,
        architectures: Vec<String>,
    },

    #[error("{repo} has no {file}; {what}")]
    MissingFile {
        repo: String,
        file: String,
        what: &'static str,
    },

    #[error("{repo}: {file}: {why}")]
    BadFile {
        repo: String,
        file: String,
        why: String,
    },

    #[error("unexpected answer from {url}: {why}")]
    BadResponse { url: String, why: String },

    #[error("{path} is not a local directory, and as a hub id: {source}")]
    NeitherPathNorId {
        path: PathBuf,
        #[source]
        source: Box<HubError>,
    },
}

/// What a hub answered about a repository, for [`HubError::status`].
pub(crate) struct Answer<'a> {
    pub hub: &'static str,
    pub repo: &'a str,
    pub revision: &'a str,
    pub url: &'a str,
    /// Appended to "not found" (how a private repository is reached).
    pub token_hint: &'static str,
    /// The remedy for 401/403.
    pub refused_hint: String,
}

impl HubError {
    /// An HTTP error status in the hub's words: 404 not found, 401/403 refused, else a server error.
    pub(crate) fn status(code: u16, a: Answer) -> Self {
        match code {
            404 => HubError::NotFound {
                hub: a.hub,
                repo: a.repo.into(),
                revision: a.revision.into(),
                status: code,
                token_hint: a.token_hint,
            },
            401 | 403 => HubError::Unauthorized {
                hub: a.hub,
                repo: a.repo.into(),
                status: code,
                hint: a.refused_hint,
            },
            _ => HubError::Server {
                hub: a.hub,
                url: a.url.into(),
                status: code,
            },
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        HubError::Io {
            path: path.into(),
            source,
        }
    }

    /// An I/O error while writing into a cache: disk full is said as such.
    pub(crate) fn write(
        path: impl Into<PathBuf>,
        source: std::io::Error,
        cache_var: &'static str,
    ) -> Self {
        if kernels::io::is_storage_full(&source) {
            HubError::DiskFull {
                path: path.into(),
                cache_var,
            }
        } else {
            HubError::io(path, source)
        }
    }
}
