//! The crate's one error type. Each variant says what went wrong and where, and maps to the
//! exit code metal-api acts on.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The userdata (or an argument) is wrong; the message names the place.
    #[error("{0}")]
    Input(String),

    /// The userdata is well-formed but a user entry collides with one of ours.
    #[error("userdata conflict: {0}")]
    Conflict(String),

    /// headscale could not be reached, or refused.
    #[error("headscale: {0}")]
    Headscale(String),

    /// A local file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    /// The process exit code: 2 for bad input, 3 for headscale, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Input(_) | Error::Conflict(_) => 2,
            Error::Headscale(_) => 3,
            Error::Io { .. } => 1,
        }
    }

    pub(crate) fn input(msg: impl Into<String>) -> Self {
        Error::Input(msg.into())
    }

    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
