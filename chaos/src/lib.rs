//! The chaos harness (scenarios, fault injection, checkers, reports) is built in its own issue
//! on top of [`haven_client::devcluster`]; this crate reserves its place in the workspace.
