//! Admin socket server and CLI client: being written.
