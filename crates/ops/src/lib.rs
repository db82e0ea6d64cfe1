//! What an operator does with running pipelines, as functions that return data: where every record
//! is ([`status`]), the dead letters ([`dead_letters`]: list, show, replay, purge, export), and the
//! target compared with the source ([`reconcile`]).
//! `conveyorctl` parses, prints and prompts around them; a web console can call the same.

pub mod dead_letters;
pub mod letters;
pub mod lineage;
pub mod overview;
pub mod reconcile;
pub mod status;

use conveyor_pipeline::Pipeline;

/// A pipeline given by name, or by its file.
pub fn pipeline_name(given: &str) -> anyhow::Result<String> {
    if given.ends_with(".toml") || std::path::Path::new(given).is_file() {
        return Ok(Pipeline::load(given)?.name().to_owned());
    }
    Ok(given.to_owned())
}
