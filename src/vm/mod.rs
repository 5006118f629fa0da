//! `hamirror vm register`: the pure half. A domain's XML definition ([`domain`]) and the
//! files it names on this host become a registration plan ([`plan`]): the files to protect,
//! the directories to replicate, or why the VM cannot be registered as it is; [`render`]
//! turns the plan into the module's `userconfig.xml` (from a `vm-modules/` template) and into
//! the `--dry-run` description. See docs/vm.md.

pub mod domain;
pub mod plan;
pub mod render;
