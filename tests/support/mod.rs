//! Helpers shared by the integration tests (`mod support;` in a test file).
//!
//! Layout:
//! - `lab`: multi-host labs of network-namespace hosts (a wrapper over `tools/lab`), and
//!   `wait_until`, the way tests wait for a condition.
//! - `pair`: two lab hosts running `hamirror daemon`, modules installed in both.
//! - `module_fixture`: a module directory in a temp home, for script and checker tests.
//! - `resync_trees`: source/target trees and tree comparison for the resync tests.

// Each test binary compiles this module on its own and uses only part of it.
#![allow(dead_code)]

pub mod lab;
pub mod module_fixture;
pub mod pair;
pub mod resync_trees;
