//! Configuration: being written.
