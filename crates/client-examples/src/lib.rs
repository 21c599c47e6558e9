//! Examples of the wsgate Rust client (`wsgate-client`), in `examples/`:
//! `cargo run -p wsgate-client-examples --example chat -- ws://127.0.0.1:8080/ws lobby`.
//!
//! They live in a package of their own because Cargo builds every
//! dev-dependency of a package for its examples, and `wsgate-client`'s
//! integration tests need the whole gateway and the test kit.
