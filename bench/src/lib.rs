//! Exit-path benchmark pieces shared by the orchestrator (`vmm-bench`) and
//! the benchmark plugin.

pub mod floor;
pub mod guest;
