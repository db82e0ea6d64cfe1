//! The conveyor binaries (each a few lines over the stage libraries and
//! `conveyor_runtime::process`), and `conveyorctl`'s command line.

/// Every conveyor binary allocates through mimalloc (see the workspace's Cargo.toml for why).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod ctl;
pub mod dlq;
pub mod reconcile;
pub mod status;
