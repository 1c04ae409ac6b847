//! kermail's one integration test binary: every test drives a real `kermail serve` process over
//! real sockets with real, independently written clients (Python's smtplib and imaplib, mbsync,
//! strace for the on-disk order). See `harness` for the node and client helpers.

mod harness;

mod bad_input;
mod chaos;
mod cli;
mod cluster;
mod concurrency;
mod config_file;
mod durability;
mod idle;
mod mbsync;
mod outbound;
mod smtp_imap;
