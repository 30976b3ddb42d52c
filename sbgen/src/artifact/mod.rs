//! Artifacts: a lowered kernel compiled to PTX, and the files it is kept in (docs/architecture.md#artifact-pipeline).

pub mod name;
