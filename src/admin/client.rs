//! The CLI side of the admin socket: blocking, one request per connection.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use super::{AdminRequest, AdminResponse, MAX_ADMIN_MESSAGE_BYTES};

/// How long the CLI waits for the node's answer (password hashing and a commit fit easily).
pub const ADMIN_RESPONSE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "kermail is not running here (no admin socket at {path}): start it with `kermail serve`, \
         or name its configuration with --config"
    )]
    NotRunning { path: String },
    #[error("cannot talk to the node at {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("the node sent an answer this CLI does not understand: {0}")]
    Protocol(String),
}

pub fn send(socket_path: &Path, request: &AdminRequest) -> Result<AdminResponse, ClientError> {
    let path = socket_path.display().to_string();
    let io_error = |source| ClientError::Io {
        path: path.clone(),
        source,
    };
    let stream = match UnixStream::connect(socket_path) {
        Ok(stream) => stream,
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ClientError::NotRunning { path });
        }
        Err(error) => return Err(io_error(error)),
    };
    stream
        .set_read_timeout(Some(ADMIN_RESPONSE_TIMEOUT))
        .map_err(io_error)?;
    let mut line = serde_json::to_vec(request).map_err(|e| ClientError::Protocol(e.to_string()))?;
    line.push(b'\n');
    (&stream).write_all(&line).map_err(io_error)?;
    let mut reader = BufReader::new(&stream).take(MAX_ADMIN_MESSAGE_BYTES as u64);
    let mut answer = String::new();
    reader.read_line(&mut answer).map_err(io_error)?;
    serde_json::from_str(&answer).map_err(|e| ClientError::Protocol(e.to_string()))
}
