//! IMAP server: being written in the imap branch.
