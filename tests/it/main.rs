//! kermail's one integration test binary: every test drives a real `kermail serve` process over
//! real sockets with real, independently written clients (Python's smtplib and imaplib, mbsync,
//! strace for the on-disk order). See `harness` for the node and client helpers.

mod harness;

mod autoconfig;
mod backup;
mod bad_input;
mod chaos;
mod cli;
mod cluster;
mod concurrency;
mod condstore;
mod config_file;
mod durability;
mod idle;
mod imap_abuse;
mod imap_acl;
mod imap_binary;
mod imap_extensions;
mod imap_extensions2;
mod imap_notify;
mod imap_rev2;
mod imap_rfc;
mod imap_savedate;
mod imap_sort;
mod imap_sort_cache;
mod imap_sort_keys;
mod inbound_auth;
mod mbsync;
mod mesh_faults;
mod outbound;
mod private_files;
mod quota;
mod sieve;
mod smtp_abuse;
mod smtp_imap;
mod smtp_spill;
mod snapshot_install;
mod spam;
mod storage_faults;
