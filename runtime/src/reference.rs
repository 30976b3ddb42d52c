//! The float64 CPU reference (being written).
