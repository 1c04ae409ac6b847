//! SMTP server (MX role): being written in the smtp branch.
