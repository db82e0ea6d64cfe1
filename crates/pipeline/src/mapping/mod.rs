//! The transformation rules: how one source record becomes output records, declared in the pipeline file.
//!
//! Each output field names where it comes from (a dotted path into the source record, or an expression
//! over the fields before it), how it is cleaned (trim, empty to null, a value map, a default) and what
//! type it must become. Entry lines can be kept nested (mapped field by field) or flattened into one
//! output record per line that carries chosen fields of its parent. A filter skips records on purpose.
//! Everything is compiled when the pipeline file loads, so that a mistake is reported, naming the rule,
//! before any record moves.

mod apply;
mod compile;
pub mod convert;
pub mod expr;
mod output;
mod source;
mod spec;

pub use compile::Mapping;
pub use convert::FieldType;
pub use output::{Applied, MappedRecord};
pub use source::SourceRecord;
pub use spec::{FieldError, FieldSpec, FlattenSpec, SpecProblem, TransformSpec, Unmapped};

#[cfg(test)]
mod tests;
