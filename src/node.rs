//! Node wiring: being written.
