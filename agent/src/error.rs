//! The agent's one error type; messages say what to do.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration file is wrong; the message names the file and the field.
    #[error("config: {0}")]
    Config(String),
    /// The state directory holds something we cannot use.
    #[error("state: {0}")]
    State(String),
    /// The control server could not be reached or spoke something unexpected.
    #[error("control: {0}")]
    Control(String),
    /// No answer from the server at all (the network is down, the server away or stopped):
    /// cheap to retry soon, unlike a server that answers badly.
    #[error("control: {0}")]
    Unreachable(String),
    /// A DERP relay could not be reached or spoke something unexpected.
    #[error("DERP relay: {0}")]
    Derp(String),
    /// nftables could not be read or changed.
    #[error("firewall: {0}")]
    Firewall(String),
    /// headscale refused the registration; retrying with the same key will not help.
    #[error("registration refused: {0}")]
    Refused(String),
    /// headscale no longer knows this node (deleted there, or its database lost it).
    #[error("control: {0}")]
    NodeGone(String),
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
