//! IMAP server: being written in the imap branch.
pub mod fetch;
pub mod search;
